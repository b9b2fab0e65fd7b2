"""The committed notebooks are read as documents: every code cell was run
and kept its output, and each shows at least one plot. (The suite also
executes them, small, through nbmake.)"""
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs_and_a_plot(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    not_run = [i for i, c in enumerate(cells) if c.get("execution_count") is None]
    assert not not_run, f"{path.name}: code cells {not_run} were not run before committing"
    counts = [c["execution_count"] for c in cells]
    assert counts == sorted(counts), f"{path.name}: cells were run out of order: {counts}"
    assert all(c["outputs"] for c in cells if "print(" in "".join(c["source"])), \
        f"{path.name}: a cell that prints has no output"
    images = [o for c in cells for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plot in the outputs"
    errors = [o for c in cells for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with an error: {errors[0].get('ename')}"

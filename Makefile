# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test build gpu-check bench clean

install:
	$(PIP) -e ".[demo]"

demo: install
	$(PY) -m smedjan demo

test:
	$(PIP) -e ".[test]"
	$(PY) -m pytest -q tests/ --nbmake notebooks/

# On a GPU machine: build in place, GPU tests, compute-sanitizer, benchmark
# against PyTorch; a short table last (logs under $OUT or gpu_check_logs/).
gpu-check:
	bash benchmarks/gpu_check.sh

# In-place build without pip (for machines with no package index).
build:
	$(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build smedjan/_C*.so *.egg-info

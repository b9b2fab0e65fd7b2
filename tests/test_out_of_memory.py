"""Memory that is not there is refused before it is asked for. Parameters,
gradients, AdamW state and activations are one budget, checked before each
allocation against memory_limit and against what the machine has available
(host: MemAvailable, or the memory cgroup's room; CUDA: free GPU memory).
The refusal is smedjan.OutOfMemoryError, a MemoryError, naming the bytes
asked, the device and what the model holds; nothing was allocated for it and
the process goes on.

What the machine reports is faked (SMEDJAN_MEM_AVAILABLE, SMEDJAN_SYS_ROOT):
no test here allocates more than a few MiB, whatever the machine has."""
import numpy as np
import pytest

import smedjan
from smedjan import _C

CFG = smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64)
SMALL = smedjan.Config.custom(32, 1, 2, 2, vocab_size=300, max_seq_len=64)


def batch(B=2, T=16, V=300, seed=0):
    r = np.random.default_rng(seed)
    return (r.integers(0, V, (B, T)).astype(np.int32), r.integers(0, V, (B, T)).astype(np.int32))


def machine_has(monkeypatch, nbytes):
    monkeypatch.setenv("SMEDJAN_MEM_AVAILABLE", str(int(nbytes)))


def test_trainer_too_big_for_the_machine_is_refused_and_the_process_goes_on(monkeypatch):
    m = smedjan.Model(CFG)
    n = m.n_params
    held = m.memory()["bytes"]
    machine_has(monkeypatch, 10 * n)      # the parameters fit; gradients + AdamW (12n) do not
    with pytest.raises(smedjan.OutOfMemoryError) as e:
        smedjan.Trainer(m)
    err = e.value
    assert isinstance(err, MemoryError)
    assert (err.requested, err.available, err.held, err.device) == (12 * n, 10 * n, held, "cpu")
    msg = str(err)
    assert msg.startswith("out of memory on the cpu: ") and f"({12 * n} bytes) asked for a " \
        "Trainer's AdamW state" in msg, msg
    assert "the model holds" in msg and "Nothing was allocated" in msg, msg
    assert m.memory()["bytes"] == held and not m._h.holds()[0]   # nothing was allocated
    # the process goes on: the model still runs, and a smaller Trainer trains
    assert np.isfinite(m.loss(*batch()))
    small = smedjan.Model(SMALL)
    tr = smedjan.Trainer(small, lr=1e-3, steps=2)
    assert np.isfinite(tr.step(*batch()).loss)
    machine_has(monkeypatch, 10 ** 12)    # and the big one, once the machine has room
    assert np.isfinite(smedjan.Trainer(m, steps=2).step(*batch()).loss)


def test_model_too_big_for_the_machine_is_refused_before_allocating(monkeypatch):
    n = _C.param_count(CFG.to_dict())
    machine_has(monkeypatch, 4 * n - 1)
    with pytest.raises(smedjan.OutOfMemoryError, match=rf"on the cpu: .* \({4 * n} bytes\) "
                                                       r"asked for the parameters") as e:
        smedjan.Model(CFG)
    assert e.value.requested == 4 * n and e.value.available == 4 * n - 1
    machine_has(monkeypatch, 4 * n + (1 << 16))   # parameters, plus the small bits: fits
    assert smedjan.Model(CFG).n_params == n


def test_huge_preset_is_refused_at_once_where_it_does_not_fit(monkeypatch):
    """Model("huge") wants 10.2 GB of parameters: on a machine with 8 GiB it
    is refused before a byte is asked for (it used to be killed by the kernel)."""
    n = _C.param_count(smedjan.Config.preset("huge", 8192).to_dict())
    machine_has(monkeypatch, 8 << 30)
    with pytest.raises(smedjan.OutOfMemoryError, match=r"on the cpu: 9\.5\d GiB .* asked for the "
                                                       r"parameters, 8\.00 GiB available") as e:
        smedjan.Model("huge")
    assert e.value.requested == 4 * n


def test_step_whose_activations_do_not_fit_is_refused_and_a_smaller_one_runs(monkeypatch):
    m = smedjan.Model(CFG)
    n = m.n_params
    big = m.plan_memory(8, 64)["arena_bytes"]
    small = m.plan_memory(1, 16)["arena_bytes"]
    room = 12 * n + small                    # the Trainer and a small arena, not a big one
    assert big > room
    machine_has(monkeypatch, room)
    tr = smedjan.Trainer(m, steps=3)
    held = m.memory()["bytes"]
    with pytest.raises(smedjan.OutOfMemoryError, match=r"asked for a batch 8 x seq 64 \(train\) "
                                                       r"run: its activation arena") as e:
        tr.step(*batch(8, 64))
    assert e.value.requested == big and m.memory()["bytes"] == held
    assert np.isfinite(tr.step(*batch(1, 16)).loss)


def test_memory_limit_counts_the_trainers_state_before_allocating():
    m = smedjan.Model(CFG)
    n = m.n_params
    with pytest.raises(smedjan.OutOfMemoryError, match=r"memory limit on the cpu: .* asked for a "
                                                       r"Trainer's AdamW state") as e:
        smedjan.Trainer(m, memory_limit=16 * n - 1)
    assert (e.value.requested, e.value.limit, e.value.held) == (12 * n, 16 * n - 1, 4 * n)
    assert m.memory()["bytes"] == 4 * n
    plan = m.plan_memory(2, 16)
    tr = smedjan.Trainer(m, memory_limit=plan["peak_bytes"])   # its planned peak: runs
    assert np.isfinite(tr.step(*batch()).loss)


def test_plan_memory_is_the_engines_accounting_and_says_what_is_available(monkeypatch):
    m = smedjan.Model(CFG)
    n = m.n_params
    machine_has(monkeypatch, 123456789)
    p = m.plan_memory(2, 16, "train", grad_accum=2)
    assert p["fixed_bytes"] == 16 * n and p["available_bytes"] == 123456789
    monkeypatch.delenv("SMEDJAN_MEM_AVAILABLE")
    avail, total, source = _C.mem_available("cpu")
    assert 0 < avail <= total and source in ("MemAvailable", "cgroup memory limit")


def fake_machine(root, meminfo_avail, cgroup_line, files):
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal:       16777216 kB\n"
                                          f"MemFree:         1000000 kB\n"
                                          f"MemAvailable:   {meminfo_avail // 1024:>8} kB\n")
    (root / "proc" / "self" / "cgroup").write_text(cgroup_line + "\n")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


MIB = 1 << 20


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cgroup_limit_below_memavailable_is_what_is_available(tmp_path, monkeypatch, version):
    """In a container the kernel kills at the cgroup's limit, whatever
    MemAvailable says: the room left there (limit - usage + inactive page
    cache) is what the machine can give."""
    if version == "v2":
        files = {"sys/fs/cgroup/job/memory.max": f"{1024 * MIB}\n",
                 "sys/fs/cgroup/job/memory.current": f"{900 * MIB}\n",
                 "sys/fs/cgroup/job/memory.stat": f"anon 1\ninactive_file {100 * MIB}\n"}
        line = "0::/job"
    else:
        files = {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": f"{1024 * MIB}\n",
                 "sys/fs/cgroup/memory/job/memory.usage_in_bytes": f"{900 * MIB}\n",
                 "sys/fs/cgroup/memory/job/memory.stat": f"total_inactive_file {100 * MIB}\n"}
        line = "4:memory:/job"
    fake_machine(tmp_path, 8192 * MIB, line, files)
    monkeypatch.setenv("SMEDJAN_SYS_ROOT", str(tmp_path))
    assert _C.mem_available("cpu") == (224 * MIB, 1024 * MIB, "cgroup memory limit")
    n = _C.param_count(smedjan.Config.preset("large", 8192).to_dict())   # 856 MB of weights
    m = smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64))
    assert m.n_params * 16 < 224 * MIB < 4 * n
    with pytest.raises(smedjan.OutOfMemoryError, match=r"224\.0 MiB available \(cgroup memory "
                                                       r"limit; 1\.00 GiB in all\)"):
        smedjan.Model("large")


def test_no_cgroup_limit_leaves_memavailable(tmp_path, monkeypatch):
    fake_machine(tmp_path, 3000 * MIB, "0::/job", {"sys/fs/cgroup/job/memory.max": "max\n",
                                                  "sys/fs/cgroup/job/memory.current": "5\n"})
    monkeypatch.setenv("SMEDJAN_SYS_ROOT", str(tmp_path))
    assert _C.mem_available("cpu") == (3000 * MIB, 16 << 30, "MemAvailable")


def test_train_cli_says_out_of_memory_instead_of_dying(tmp_path, monkeypatch, capsys):
    from smedjan.cli import main
    from smedjan.data import write_tokens
    data = str(tmp_path / "d.tok")
    write_tokens(data, [np.random.default_rng(0).integers(0, 300, 10_000)], dtype="uint16")
    n = _C.param_count(CFG.to_dict())
    machine_has(monkeypatch, 10 * n)
    rc = main(["train", "--data", data, "--vocab-size", "300", "--size", "custom", "--dim", "64",
               "--layers", "2", "--heads", "4", "--kv-heads", "2", "--seq-len", "32",
               "--batch-size", "2", "--steps", "2", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "out of memory on the cpu: " in err and f"({12 * n} bytes)" in err, err

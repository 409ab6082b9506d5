# The two commands: `make demo` (train on digits, sample, score, export, sample through ONNX and C++)
# and `make test` (the whole test suite). Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DDPM := $(VENV)/bin/ddpm
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: install cpp test demo clean

install: $(STAMP)

# torch==2.13.0 first when torch is missing: a bare requirement would pull a multi-GB CUDA build on a
# CPU-only machine. On a GPU machine, install the CUDA build of torch into .venv first.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

cpp: $(STAMP)
	PYTHON=$(abspath $(PY)) sh cpp_runner/build.sh

test: $(STAMP) cpp
	$(PY) -m pytest -q --durations=10

demo: $(STAMP) cpp
	$(DDPM) train --out $(RUN)
	$(DDPM) sample $(RUN)/checkpoint.pt --n 64 --out $(RUN)/samples.png
	$(DDPM) nll $(RUN)/checkpoint.pt
	$(DDPM) export $(RUN)/checkpoint.pt --out $(RUN)/model.onnx
	$(DDPM) onnx-sample $(RUN)/model.onnx --n 64 --sampler ddim --steps 50 --out $(RUN)/onnx-samples.png
	cpp_runner/build/ddpm_runner --model $(RUN)/model.onnx --n 64 --sampler ddim --steps 50 --seed 0 --out $(RUN)/cpp-samples.png
	@echo "samples: $(RUN)/samples.png (torch), $(RUN)/onnx-samples.png (onnxruntime), $(RUN)/cpp-samples.png (C++)"

clean:
	rm -rf $(VENV) cpp_runner/build runs/demo

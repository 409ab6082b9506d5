# The two commands: `make demo` (train on digits, score, export, sample the same images in torch, ONNX and C++)
# and `make test` (the whole test suite, as CI runs it). Both create .venv and install what they need.
# `make check` is the edit loop: the tests not marked slow (nothing that trains, compiles, builds the C++ runner
# or runs `make demo`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DDPM := $(VENV)/bin/ddpm
STAMP := $(VENV)/.installed
RUN ?= runs/demo
TRAIN_FLAGS ?=

.PHONY: install cpp test check demo clean

install: $(STAMP)

# torch==2.13.0 first when torch is missing: a bare requirement would pull a multi-GB CUDA build on a
# CPU-only machine. On a GPU machine, install the CUDA build of torch into .venv first.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,diffusers,openvino,int8]"
	@touch $@

cpp: $(STAMP)
	PYTHON=$(abspath $(PY)) sh cpp_runner/build.sh

test: $(STAMP) cpp
	$(PY) -m pytest -q --durations=10

check: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=10

# The demo trains afresh each time (--overwrite), so it runs again after any change; it samples the same 64 images
# (ancestral, seed 0, numpy's noise, float32) in PyTorch, onnxruntime and C++ and checks that they agree.
SAMPLE := --num-samples 64 --sampler ancestral --seed 0
demo: $(STAMP) cpp
	$(DDPM) train --out $(RUN) --overwrite $(TRAIN_FLAGS)
	$(DDPM) nll $(RUN)/checkpoint.pt
	$(DDPM) export $(RUN)/checkpoint.pt --out $(RUN)/model.onnx
	$(DDPM) sample $(RUN)/checkpoint.pt $(SAMPLE) --numpy-noise --precision fp32 --out $(RUN)/torch.png
	$(DDPM) onnx-sample $(RUN)/model.onnx $(SAMPLE) --out $(RUN)/onnxruntime.png
	cpp_runner/build/ddpm_runner --model $(RUN)/model.onnx $(SAMPLE) --out $(RUN)/cpp.png
	$(DDPM) compare $(RUN)/torch.png $(RUN)/onnxruntime.png $(RUN)/cpp.png
	@echo "demo: made $(RUN)/checkpoint.pt and model.onnx; the same 64 samples from PyTorch, onnxruntime and C++ in" \
	      "$(RUN)/torch.png, onnxruntime.png and cpp.png; training's own grid in $(RUN)/samples-*.png"

clean:
	rm -rf $(VENV) cpp_runner/build runs/demo

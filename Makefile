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

.PHONY: install cpp web test check demo clean

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

# The page of `ddpm web`: onnxruntime-web from npm (web/package-lock.json) and Debian's chromium for its tests.
web:
	sh web/install.sh

test: $(STAMP) cpp web
	$(PY) -m pytest -q --durations=10

check: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=10

# The demo trains afresh each time (--overwrite), so it runs again after any change; it samples the same 64 images
# (ancestral, seed 0, numpy's noise, float32) in PyTorch, onnxruntime and C++ and checks that they agree; then it
# distils the model into a student of 4 network calls (rounds of 8 and 4, then its adversarial tuning), samples it
# the same way (its own plan), and in the web page too (onnxruntime-web in headless Chromium), and writes the
# chain's grid and the student's side by side.
SAMPLE := --num-samples 64 --sampler ancestral --seed 0
STUDENT := --num-samples 64 --seed 0
DISTILL_FLAGS ?=
demo: $(STAMP) cpp web
	$(DDPM) train --out $(RUN) --overwrite $(TRAIN_FLAGS)
	$(DDPM) nll $(RUN)/checkpoint.pt
	$(DDPM) export $(RUN)/checkpoint.pt --out $(RUN)/model.onnx
	$(DDPM) sample $(RUN)/checkpoint.pt $(SAMPLE) --numpy-noise --precision fp32 --out $(RUN)/torch.png
	$(DDPM) onnx-sample $(RUN)/model.onnx $(SAMPLE) --out $(RUN)/onnxruntime.png
	cpp_runner/build/ddpm_runner --model $(RUN)/model.onnx $(SAMPLE) --out $(RUN)/cpp.png
	$(DDPM) compare $(RUN)/torch.png $(RUN)/onnxruntime.png $(RUN)/cpp.png
	$(DDPM) distill $(RUN)/checkpoint.pt --steps 4 --out $(RUN)/distill --overwrite $(DISTILL_FLAGS)
	$(DDPM) export $(RUN)/distill/steps-4/checkpoint.pt --out $(RUN)/student.onnx
	$(DDPM) sample $(RUN)/distill/steps-4/checkpoint.pt $(STUDENT) --numpy-noise --precision fp32 --out $(RUN)/student-torch.png
	$(DDPM) onnx-sample $(RUN)/student.onnx $(STUDENT) --out $(RUN)/student-onnxruntime.png
	cpp_runner/build/ddpm_runner --model $(RUN)/student.onnx $(STUDENT) --out $(RUN)/student-cpp.png
	$(DDPM) web $(RUN)/student.onnx --headless $(STUDENT) --out $(RUN)/student-web.png
	$(DDPM) compare $(RUN)/student-torch.png $(RUN)/student-onnxruntime.png $(RUN)/student-cpp.png $(RUN)/student-web.png
	$(DDPM) side-by-side $(RUN)/cpp.png $(RUN)/student-cpp.png --out $(RUN)/chain-and-student.png
	@echo "demo: made $(RUN)/checkpoint.pt and model.onnx; the same 64 samples from PyTorch, onnxruntime and C++ in" \
	      "$(RUN)/torch.png, onnxruntime.png and cpp.png; training's own grid in $(RUN)/samples-*.png; a student" \
	      "that samples in 4 network calls, $(RUN)/distill/steps-4/checkpoint.pt and student.onnx, the same in the" \
	      "three executors and the web page; the 1000-step chain and the 4-call student side by side in" \
	      "$(RUN)/chain-and-student.png"

clean:
	rm -rf $(VENV) cpp_runner/build runs/demo web/node_modules

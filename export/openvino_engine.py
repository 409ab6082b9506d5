# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""The network of an exported .onnx file on OpenVINO: OnnxSampler(path, engine="openvino").

OpenVINO reads the .onnx file itself (nothing is exported twice; the ddpm.* metadata arrive in the model's
rt_info) and computes, on CPUs with AVX512-BF16 or AMX, in bfloat16 (its INFERENCE_PRECISION_HINT) with its own
oneDNN kernels and fusions, where onnxruntime's CPU provider has float32 kernels only. OpenVinoSession is the part of
an onnxruntime.InferenceSession that OnnxSampler uses (get_inputs, get_outputs, get_modelmeta, io_binding,
run_with_iobinding), so the sampler runs the same plan, the same numpy noise and the same per-row update graphs
(onnxruntime's CPU provider, reading the network's output where OpenVINO wrote it): only the network's engine differs.
The network is compiled for a static batch (faster than a dynamic one, BENCHMARKS.md) once per batch size, and kept.

onnx_sampler imports this file only when the engine is asked for; an application copies it beside onnx_sampler.py.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import openvino as ov

PRECISIONS = ("auto", "fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}
_TYPES = {"f32": "tensor(float)", "i64": "tensor(int64)", "f16": "tensor(float16)", "i32": "tensor(int32)",
          "f64": "tensor(double)"}
_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


class OpenVinoError(ValueError):
    """The file cannot be compiled, or the precision asked for cannot be had on this CPU."""


def cpu_bf16() -> str | None:
    """Why this CPU computes bfloat16 fast, from the flags of /proc/cpuinfo: AMX or AVX512-BF16, the instructions
    that precision.fast_bf16 asks torch about (its probe needs torch; this file must not). None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((f"the CPU has {name}" for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))
                 if flag in flags), None)


def resolve_precision(precision: str, core: ov.Core) -> tuple[str, str]:
    """(fp32|bf16, why): auto is bf16 where the CPU has AMX or AVX512-BF16 (and OpenVINO lists BF16 for it), else
    fp32; bf16 asked for on a CPU without them is an OpenVinoError (OpenVINO would quietly compute in float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} for OpenVINO, got {precision!r}")
    why = cpu_bf16() if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else None
    if precision == "auto":
        return ("bf16", f"auto: {why}") if why else ("fp32", "auto: the CPU has neither AVX512-BF16 nor AMX")
    if precision == "bf16" and not why:
        raise OpenVinoError("precision bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither: use fp32 "
                            "(or auto)")
    return precision, "as asked"


class _Port:
    """An input or output as onnxruntime's NodeArg shows it: name, type ("tensor(float)"), shape (str: dynamic)."""

    def __init__(self, port):
        self.name = port.get_any_name()
        self.type = _TYPES.get(port.get_element_type().get_type_name(), str(port.get_element_type()))
        self.shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]


class _Metadata:
    def __init__(self, custom_metadata_map: dict):
        self.custom_metadata_map = custom_metadata_map


class _Binding:
    """The OrtValues bound by name, as onnxruntime's IOBinding holds them."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_ortvalue_input(self, name: str, value) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name: str, value) -> None:
        self.outputs[name] = value


def _host_array(value) -> np.ndarray:
    """A numpy view of a CPU OrtValue's memory, without a copy: what OpenVINO reads, or writes into."""
    dtype = np.dtype(_NUMPY[value.data_type()])
    count = int(np.prod(value.shape()))
    return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(value.data_ptr()),
                         dtype).reshape(value.shape())


class OpenVinoSession:
    """An exported eps_theta compiled by OpenVINO for the CPU at `precision` (auto|fp32|bf16, see resolve_precision),
    with `threads` inference threads (None: OpenVINO's choice, a thread per core). Attributes: precision, why
    (the reason for it), provider ("OpenVINO CPU"). Raises OpenVinoError where OpenVINO cannot read the file."""

    def __init__(self, path: str, precision: str = "auto", threads: int | None = None):
        self.core = ov.Core()
        self.precision, self.why = resolve_precision(precision, self.core)
        try:
            self.model = self.core.read_model(os.fspath(path))
        except Exception as e:  # OpenVINO raises RuntimeError or its own types for files it cannot read
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OpenVinoError(f"{path} is not an ONNX model OpenVINO can read ({reason[:200]})") from None
        self.provider = "OpenVINO CPU"
        self.config = {"INFERENCE_PRECISION_HINT": _HINT[self.precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._requests = {}  # batch -> the infer request of the model compiled for that static batch

    def get_inputs(self) -> list:
        return [_Port(p) for p in self.model.inputs]

    def get_outputs(self) -> list:
        return [_Port(p) for p in self.model.outputs]

    def get_modelmeta(self) -> _Metadata:
        framework = self.model.get_rt_info()["framework"] if self.model.has_rt_info(["framework"]) else {}
        return _Metadata({key: self.model.get_rt_info(["framework", key]).astype(str) for key in framework})

    def io_binding(self) -> _Binding:
        return _Binding()

    def request(self, batch: int):
        """The infer request of the network compiled for `batch` images (compiled at the first use of each)."""
        if batch not in self._requests:
            model = self.model.clone()
            model.reshape({p.get_any_name(): [batch, *list(p.get_partial_shape())[1:]] for p in model.inputs})
            self._requests[batch] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self._requests[batch]

    def run_with_iobinding(self, binding: _Binding) -> None:
        """One network call on the bound CPU OrtValues: OpenVINO reads the inputs and writes model_output in place."""
        out = _host_array(binding.outputs["model_output"])
        request = self.request(len(out))
        request.set_output_tensor(0, ov.Tensor(out, shared_memory=True))
        request.infer({name: _host_array(v) for name, v in binding.inputs.items()}, share_inputs=True)

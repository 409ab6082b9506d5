"""torch -> ONNX export of eps_theta, with the diffusion schedule written into the file's metadata.

The file is what export/onnx_sampler.py and cpp_runner/ read (README, "The sampling plan and the ONNX file"): inputs x float32 [B,C,H,W]
and t int64 [B] (timestep index 0..T-1), output model_output float32 [B,C_out,H,W], batch dynamic, the
metadata keys ddpm.*, everything in one .onnx file. Before the file appears it has passed the ONNX
checker and shape inference, and onnxruntime's outputs have been compared with PyTorch's.
"""
from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import os
import warnings
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from .onnx_sampler import FORMAT, write_atomically

FP32_TOLERANCE = 1e-4
# Measured on the digits U-Net (outputs of magnitude ~1.4): float16 convolutions and products differ from
# float32 PyTorch by 0.5e-3 to 1.5e-3; 1e-2 leaves a margin without hiding a broken conversion.
FP16_TOLERANCE = 1e-2
HALF_OPS = ("Conv", "Gemm", "MatMul")


class Schedule(Protocol):
    """What the export reads of a diffusion process (ddpm.Diffusion is one)."""
    betas: np.ndarray
    T: int
    parameterization: str
    variance: str


def version() -> str:
    """The package's version, from its installed metadata (pyproject.toml is the one place it is written)."""
    return importlib.metadata.version("ddpm-reference")


class ExportError(ValueError):
    """The export cannot be written, or the written graph does not compute what the PyTorch model does."""


def metadata(diffusion: Schedule, image_shape, clip_denoised: bool = True, classes=()) -> dict[str, str]:
    """The ddpm.* metadata the README specifies; betas as Python reprs of float64, which round-trip exactly.
    A class-conditional model (classes: its class names) adds ddpm.num_classes K, ddpm.null_label K and
    ddpm.class_names, a JSON list."""
    conditional = {"ddpm.num_classes": str(len(classes)), "ddpm.null_label": str(len(classes)),
                   "ddpm.class_names": json.dumps(list(classes))} if classes else {}
    return {**conditional, "ddpm.format": FORMAT, "ddpm.betas": ",".join(repr(float(b)) for b in diffusion.betas),
            "ddpm.num_timesteps": str(diffusion.T), "ddpm.parameterization": diffusion.parameterization,
            "ddpm.variance": diffusion.variance, "ddpm.image_shape": ",".join(str(int(s)) for s in image_shape),
            "ddpm.data_range": "-1,1", "ddpm.clip_denoised": "true" if clip_denoised else "false",
            "ddpm.timestep_dtype": "int64", "ddpm.version": version()}


def _trace(net: torch.nn.Module, image_shape, opset: int, conditional: bool = False) -> onnx.ModelProto:
    """The graph of net(x, t), or net(x, t, y) for a conditional net, with a dynamic batch axis (traced at
    batch 2, so that no axis is specialised to 1).

    The TorchScript exporter (dynamo=False) is pinned: in torch 2.13 it emits the requested opset directly
    (the dynamo exporter builds opset 18 and down-converts, a step it warns may fail), it exports the U-Net
    (GroupNorm, attention, nearest upsampling) in ~0.4 s where dynamo takes 6-8 s (2-core CPU), and its
    dynamic_axes give a symbolic batch with no shape constraints to satisfy. Both give outputs within
    1e-5 of PyTorch. It is deprecated, not removed; when it goes, switch to dynamo=True with
    dynamic_shapes={"x": {0: Dim("batch")}, "t": {0: Dim("batch")}}.
    """
    names = ["x", "t", "y"] if conditional else ["x", "t"]
    args = (torch.zeros(2, *image_shape), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    batch = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice, and constant-folding remarks
        torch.onnx.export(net, args[:len(names)], buffer, dynamo=False, opset_version=opset, input_names=names,
                          output_names=["model_output"], dynamic_axes={**{n: batch for n in names}, "model_output": batch},
                          do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    # The tracer drops an input the model never reads (a t-independent test net); the contract has them all.
    inputs = {i.name: i for i in model.graph.input}
    model.graph.ClearField("input")
    kinds = {"x": (TensorProto.FLOAT, image_shape), "t": (TensorProto.INT64, []), "y": (TensorProto.INT64, [])}
    model.graph.input.extend(inputs.get(name) or helper.make_tensor_value_info(name, kinds[name][0], ["batch", *kinds[name][1]])
                             for name in names)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Mixed precision as torch.autocast does it: convolutions and matrix products (nearly all the FLOPs and
    weights) run in float16 on float16 weights; normalisation, softmax, the sinusoidal timestep embedding
    (sin of t * freq needs float32) and elementwise ops stay float32, so do the inputs and the output.
    Each such op gets Cast nodes around it (one per tensor, shared between consumers)."""
    model = copy.deepcopy(model)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    half, nodes = {}, []
    for node in graph.node:
        if node.op_type not in HALF_OPS:
            nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if name and name not in half:
                init = initializers.get(name)
                if init is not None and init.data_type == TensorProto.FLOAT:
                    shared = not consumers[name] <= set(HALF_OPS)  # also read in float32 elsewhere: keep a copy
                    half[name] = name + "_fp16" if shared else name
                    tensor = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), half[name])
                    graph.initializer.append(tensor) if shared else init.CopyFrom(tensor)
                else:
                    half[name] = name + "_fp16"
                    nodes.append(helper.make_node("Cast", [name], [half[name]], to=TensorProto.FLOAT16))
            if name:
                node.input[j] = half[name]
        outputs = list(node.output)
        node.output[:] = [o + "_fp16" for o in outputs]
        half.update((o, o + "_fp16") for o in outputs)  # a float16 op reading this output skips the round trip
        nodes.append(node)
        nodes += [helper.make_node("Cast", [o + "_fp16"], [o], to=TensorProto.FLOAT) for o in outputs]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model


def _verify(path: str, net: torch.nn.Module, T: int, image_shape, c_out: int, fp16: bool,
            num_classes: int = 0) -> list[dict]:
    """The ONNX checker and strict shape inference on the written file, then onnxruntime (CPU) against PyTorch
    on random x at t = 0, T/2, T-1 (and mixed t) for batches 1 and 7, and random labels (the null label among
    them) for a conditional net. Raises ExportError past the tolerance."""
    try:
        onnx.checker.check_model(path, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).strip().splitlines()[0]}") from None
    out_type = inferred.graph.output[0].type.tensor_type
    dims = [d.dim_value or d.dim_param for d in out_type.shape.dim]
    if out_type.elem_type != TensorProto.FLOAT or dims[1:] != [c_out, *image_shape[1:]] or isinstance(dims[0], int):
        raise ExportError(f"the exported output is {dims}, type {out_type.elem_type}; expected float [batch, {c_out}, "
                          f"{image_shape[1]}, {image_shape[2]}]")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tolerance = FP16_TOLERANCE if fp16 else FP32_TOLERANCE
    generator = torch.Generator().manual_seed(0)
    checks = []
    for b in (1, 7):
        for t in (0, T // 2, T - 1) + (("mixed",) if b > 1 else ()):
            x = torch.randn(b, *image_shape, generator=generator)
            ts = torch.randint(0, T, (b,), generator=generator) if t == "mixed" else torch.full((b,), t)
            inputs = {"x": x, "t": ts}
            if num_classes:
                inputs["y"] = torch.randint(0, num_classes + 1, (b,), generator=generator)
            with torch.no_grad():
                want = net(*inputs.values()).numpy()
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
            checks.append({"batch": b, "t": t, "max_abs_diff": diff})
            if not diff <= tolerance:
                raise ExportError(f"onnxruntime differs from PyTorch by {diff:.3g} > {tolerance:g} at batch {b}, t={t}"
                                  + (" (float16 is too coarse for this model; export in float32)" if fp16 else ""))
    return checks


def export_onnx(model: torch.nn.Module, diffusion: Schedule, image_shape, path, *, opset: int = 17,
                fp16: bool = False, clip_denoised: bool = True, check: bool = True, classes=()) -> dict:
    """Write eps_theta `model` (called as model(x, t), or model(x, t, y) when `classes`, the class names of
    a class-conditional model, are given) and `diffusion`'s schedule to one .onnx file at `path`.

    image_shape: (C, H, W). fp16: convolutions and products in float16 (see to_fp16), float32 inputs and
    output, refused (ExportError) when the outputs move more than FP16_TOLERANCE from float32 PyTorch.
    check: validate the file and compare it with PyTorch before it replaces `path` (see _verify).
    Returns a report: path, opset, exporter, fp16, size_bytes, tolerance, max_abs_diff and the
    per-(batch, t) checks. Raises ExportError when the file cannot be written or fails a check.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: " + ("it is a folder" if os.path.isdir(path)
                                                    else "no writable folder " + folder))
    image_shape = tuple(int(s) for s in image_shape)
    net = copy.deepcopy(model).float().cpu().eval()
    c_out = 2 * image_shape[0] if diffusion.variance == "learned_range" else image_shape[0]
    labels = (torch.full((2,), len(classes), dtype=torch.int64),) if classes else ()
    with torch.no_grad():
        shape = tuple(net(torch.zeros(2, *image_shape), torch.zeros(2, dtype=torch.int64), *labels).shape)
    if shape != (2, c_out, *image_shape[1:]):
        raise ExportError(f"the model maps [2, {', '.join(map(str, image_shape))}] to {list(shape)}, but variance "
                          f"{diffusion.variance} needs {c_out} output channels of the input's size")
    graph = _trace(net, image_shape, opset, bool(classes))
    if fp16:
        graph = to_fp16(graph)
    for key, value in metadata(diffusion, image_shape, clip_denoised, classes).items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.producer_version = "ddpm-reference", version()
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    report = {"path": path, "opset": opset, "exporter": "torchscript", "fp16": fp16,
              "tolerance": FP16_TOLERANCE if fp16 else FP32_TOLERANCE, "checks": []}
    data = graph.SerializeToString()
    try:
        write_atomically(path, data, lambda tmp: report.update(
            checks=_verify(tmp, net, diffusion.T, image_shape, c_out, fp16, len(classes)) if check else []))
    except OSError as e:
        raise ExportError(str(e)) from None
    report["max_abs_diff"] = max((c["max_abs_diff"] for c in report["checks"]), default=None)
    report["size_bytes"] = os.path.getsize(path)
    return report

"""torch -> ONNX export of eps_theta, with the diffusion schedule written into the file's metadata.

The file is what export/onnx_sampler.py and cpp_runner/ read (docs/internals.md, "The sampling plan and the ONNX file"): inputs x float32 [B,C,H,W]
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
import tempfile
import warnings
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ..images import write_atomically
from .onnx_sampler import FORMAT, PRECISIONS

FP32_TOLERANCE = 1e-4
# float16 convolutions and products stay well inside 1e-2 of float32 PyTorch on the digits U-Net (BENCHMARKS.md,
# "Measurements behind design choices"); 1e-2 leaves a margin without hiding a broken conversion.
FP16_TOLERANCE = 1e-2
# int8 is checked on what it will see (noisy training images at random t), as the RMS of its error over the
# RMS of the float32 output; 0.1 passes the default digits U-Net with a margin (BENCHMARKS.md, "Measurements behind
# design choices") and refuses a quantization that broke.
INT8_TOLERANCE = 0.1
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


def metadata(diffusion: Schedule, image_shape, clip_denoised: bool = True, classes=(),
             precision: str = "fp32", plan: dict | None = None) -> dict[str, str]:
    """The ddpm.* metadata docs/internals.md specifies; betas as Python reprs of float64, which round-trip exactly.
    A class-conditional model (classes: its class names) adds ddpm.num_classes K, ddpm.null_label K and
    ddpm.class_names, a JSON list. ddpm.precision says how the network computes (informative: every
    file has the same float32 inputs and output). plan: the sampler, steps and spacing the model samples with when
    none is named (a distilled student's), as ddpm.sampler, ddpm.steps and ddpm.spacing."""
    own = {f"ddpm.{k}": str(plan[k]) for k in ("sampler", "steps", "spacing") if plan.get(k) is not None} if plan else {}
    conditional = {"ddpm.num_classes": str(len(classes)), "ddpm.null_label": str(len(classes)),
                   "ddpm.class_names": json.dumps(list(classes))} if classes else {}
    return {**conditional, **own, "ddpm.format": FORMAT, "ddpm.betas": ",".join(repr(float(b)) for b in diffusion.betas),
            "ddpm.num_timesteps": str(diffusion.T), "ddpm.parameterization": diffusion.parameterization,
            "ddpm.variance": diffusion.variance, "ddpm.image_shape": ",".join(str(int(s)) for s in image_shape),
            "ddpm.data_range": "-1,1", "ddpm.clip_denoised": "true" if clip_denoised else "false",
            "ddpm.timestep_dtype": "int64", "ddpm.precision": precision, "ddpm.version": version()}


def _trace(net: torch.nn.Module, image_shape, opset: int, conditional: bool = False) -> onnx.ModelProto:
    """The graph of net(x, t), or net(x, t, y) for a conditional net, with a dynamic batch axis (traced at
    batch 2, so that no axis is specialised to 1).

    The TorchScript exporter (dynamo=False) is pinned: in torch 2.13 it emits the requested opset directly
    (the dynamo exporter builds opset 18 and down-converts, a step it warns may fail), it exports the U-Net
    (GroupNorm, attention, nearest upsampling) faster than dynamo (BENCHMARKS.md), and its
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


def noisy_batches(images: np.ndarray, betas: np.ndarray, num_classes: int, seed: int, batch: int = 64) -> list[dict]:
    """Network inputs like those of sampling: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Eq. 4)
    for `images` (float32 NCHW in [-1, 1]) at uniform t, with uniform labels 0..K (the null label K among
    them) for a class-conditional model; as dicts of input name -> array, `batch` images each."""
    rng = np.random.default_rng(seed)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    batches = []
    for i in range(0, len(images), batch):
        x0 = images[i:i + batch].astype(np.float64)
        t = rng.integers(0, len(betas), len(x0))
        ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * rng.standard_normal(x0.shape)
        inputs = {"x": x.astype(np.float32), "t": t.astype(np.int64)}
        if num_classes:
            inputs["y"] = rng.integers(0, num_classes + 1, len(x0)).astype(np.int64)
        batches.append(inputs)
    return batches


def noisy_inputs(images: np.ndarray, betas: np.ndarray, num_classes: int, seed: int = 0) -> list[tuple]:
    """noisy_batches as the network's positional inputs (x, t[, y]), torch tensors: what PyTorch's int8
    (precision.quantize_int8) is calibrated on, the calibration of this export's int8."""
    return [tuple(torch.from_numpy(v) for v in inputs.values())
            for inputs in noisy_batches(images, betas, num_classes, seed)]


def quantize_int8(fp32: onnx.ModelProto, out_path: str, calibration: list[dict]) -> None:
    """Static int8 quantization of the float32 graph `fp32` into the file `out_path`, in the QDQ format (ONNX
    Runtime's quantize_static): per-output-channel int8 weights and per-tensor uint8 activations (MinMax over
    the `calibration` batches) for Conv, MatMul and Gemm; normalisation, attention softmax and the elementwise
    ops stay float32, as do the inputs and the output (the file is read by the same samplers). Quantizing those
    too made it less exact and slower.
    Unsigned activations, x86's native u8 x s8 product: signed ones ran much further from float32 on OpenVINO.
    The convolutions that read a concatenation (the decoder's 1x1 shortcuts over [h, skip]) stay float32, as in
    PyTorch's int8 (precision.concat_readers): they carried most of the error (BENCHMARKS.md, "Measurements
    behind design choices")."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            return next(self.batches, None)

    nodes = fp32.graph.node
    concat = {out for node in nodes if node.op_type == "Concat" for out in node.output}
    concat_readers = [node.name for node in nodes if node.op_type == "Conv" and node.input[0] in concat]
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        quantize_static(fp32, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=concat_readers,
                        calibrate_method=CalibrationMethod.MinMax)


class _quiet_logging:
    """The quantizer logs a warning per normalisation constant it leaves alone; nothing a user must act on."""

    def __enter__(self):
        import logging
        self.logger, self.level = logging.getLogger(), logging.getLogger().level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _verify(path: str, net: torch.nn.Module, T: int, image_shape, c_out: int, precision: str,
            num_classes: int = 0, held_out: list[dict] = ()) -> list[dict]:
    """The ONNX checker and strict shape inference on the written file, then onnxruntime (CPU) against PyTorch
    on random x at t = 0, T/2, T-1 (and mixed t) for batches 1 and 7, and random labels (the null label among
    them) for a conditional net; int8 instead on the `held_out` batches (noisy_batches), by relative RMS
    error. Raises ExportError past the tolerance."""
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
    if precision == "int8":
        return [_check_int8(session, net, inputs) for inputs in held_out]
    fp16 = precision == "fp16"
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


def _check_int8(session, net: torch.nn.Module, inputs: dict) -> dict:
    with torch.no_grad():
        want = net(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    got = session.run(None, inputs)[0]
    rel = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))
    if not rel <= INT8_TOLERANCE:
        raise ExportError(f"int8 onnxruntime differs from PyTorch by a relative RMS error of {rel:.3g} > "
                          f"{INT8_TOLERANCE:g} on noisy held-out images (export in fp32)")
    return {"batch": len(want), "t": "noisy images", "max_abs_diff": float(np.abs(got - want).max()), "relative_rms": rel}


def export_onnx(model: torch.nn.Module, diffusion: Schedule, image_shape, path, *, opset: int = 17,
                precision: str = "fp32", calibration_images=None, clip_denoised: bool = True, check: bool = True,
                classes=(), plan: dict | None = None) -> dict:
    """Write eps_theta `model` (called as model(x, t), or model(x, t, y) when `classes`, the class names of
    a class-conditional model, are given) and `diffusion`'s schedule to one .onnx file at `path`.

    image_shape: (C, H, W). precision: fp32; fp16, convolutions and products in float16 (see to_fp16), refused
    (ExportError) when the outputs move more than FP16_TOLERANCE from float32 PyTorch; int8, static QDQ
    quantization (see quantize_int8) calibrated on `calibration_images` (float32 NCHW in [-1, 1], e.g. training
    images: the first three quarters calibrate, the rest check), refused past INT8_TOLERANCE. Inputs and
    output are float32 (and int64) in all three, so every sampler reads every file.
    check: validate the file and compare it with PyTorch before it replaces `path` (see _verify). plan: the model's
    own sampler, steps and spacing (see metadata).
    Returns a report: path, opset, exporter, precision, size_bytes, tolerance, max_abs_diff and the
    per-(batch, t) checks. Raises ExportError when the file cannot be written or fails a check.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = _writable(os.fspath(path))
    image_shape = tuple(int(s) for s in image_shape)
    net, c_out = _checked_net(model, diffusion, image_shape, classes)
    graph, held_out = _at_precision(_trace(net, image_shape, opset, bool(classes)), precision, calibration_images,
                                    diffusion, image_shape, classes)
    for key, value in metadata(diffusion, image_shape, clip_denoised, classes, precision, plan).items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.producer_version = "ddpm-reference", version()
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    tolerance = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, "int8": INT8_TOLERANCE}[precision]
    report = {"path": path, "opset": opset, "exporter": "torchscript", "precision": precision,
              "tolerance": tolerance, "checks": []}
    data = graph.SerializeToString()
    try:
        write_atomically(path, data, lambda tmp: report.update(
            checks=_verify(tmp, net, diffusion.T, image_shape, c_out, precision, len(classes), held_out) if check else []))
    except OSError as e:
        raise ExportError(str(e)) from None
    report["max_abs_diff"] = max((c["max_abs_diff"] for c in report["checks"]), default=None)
    report["size_bytes"] = os.path.getsize(path)
    return report


def _writable(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: " + ("it is a folder" if os.path.isdir(path)
                                                    else "no writable folder " + folder))
    return path


def _checked_net(model, diffusion: Schedule, image_shape: tuple, classes) -> tuple:
    """(a float32 CPU copy of the model in eval mode, its output channels), or an ExportError when its output is not
    the variance's channels at the input's size."""
    net = copy.deepcopy(model).float().cpu().eval()
    c_out = 2 * image_shape[0] if diffusion.variance == "learned_range" else image_shape[0]
    labels = (torch.full((2,), len(classes), dtype=torch.int64),) if classes else ()
    with torch.no_grad():
        shape = tuple(net(torch.zeros(2, *image_shape), torch.zeros(2, dtype=torch.int64), *labels).shape)
    if shape != (2, c_out, *image_shape[1:]):
        raise ExportError(f"the model maps [2, {', '.join(map(str, image_shape))}] to {list(shape)}, but variance "
                          f"{diffusion.variance} needs {c_out} output channels of the input's size")
    return net, c_out


def _at_precision(graph, precision: str, calibration_images, diffusion: Schedule, image_shape: tuple, classes):
    """(the float32 graph at `precision`, the noisy inputs an int8 file is checked on: none for fp32 and fp16)."""
    if precision == "fp16":
        return to_fp16(graph), []
    if precision != "int8":
        return graph, []
    images = np.asarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != image_shape or len(images) < 8:
        raise ExportError(f"int8 needs calibration images of shape [N >= 8, {', '.join(map(str, image_shape))}] "
                          f"in [-1, 1], got {list(images.shape)}")
    cut = len(images) * 3 // 4  # calibrate on the first three quarters, check on the rest
    with tempfile.TemporaryDirectory() as tmp:
        quantize_int8(graph, os.path.join(tmp, "int8.onnx"),
                      noisy_batches(images[:cut], diffusion.betas, len(classes), seed=0))
        graph = onnx.load(os.path.join(tmp, "int8.onnx"))
    return graph, noisy_batches(images[cut:], diffusion.betas, len(classes), seed=1)

"""The precision the network computes in: float32, or bfloat16/float16 autocast where the device runs it fast, or
(sampling on the CPU) int8.
Training autocasts over float32 master weights; sampling runs a reduced-precision copy of the weights
(AtPrecision) whose output is float32, so the sampler's arithmetic stays float32."""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
SamplePrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]  # int8: sampling on the CPU, see quantize_int8
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device: torch.device) -> str | None:
    """Why `device` runs bfloat16 faster than float32 (CUDA with bf16; a CPU whose torch reports AMX or
    AVX512-BF16 matrix instructions), or None."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} runs bf16" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        for probe, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
            if getattr(torch.cpu, probe, lambda: False)():
                return f"the CPU has {name}"
    return None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(fp32|bf16|fp16|int8, why): `auto` is bf16 autocast where the device runs it fast, float32 elsewhere;
    int8 (sampling only) is refused (Int8Error) off the CPU."""
    if precision not in get_args(SamplePrecision):
        raise ValueError(f"precision must be one of {', '.join(get_args(SamplePrecision))}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise Int8Error(f"int8 runs on the CPU (x86's int8 kernels), not on {device.type}: use --device cpu")
    if precision != "auto":
        return precision, "as asked"
    why = fast_bf16(device)
    return ("bf16", f"auto: {why}") if why else ("fp32", f"auto: no fast bf16 on {device.type}")


def compile_for_sampling(model):
    """torch.compile for inference: inductor with freezing (the weights become constants, prepacked for the
    CPU's matrix kernels), which is sound because sampling never updates them. Compiles at the first call."""
    import torch._inductor.config as inductor
    inductor.freezing = True
    return torch.compile(model)


class Int8Error(Exception):
    """int8 cannot run here: no torchao, or not on the CPU."""


def quantize_int8(model: torch.nn.Module, calibration: list[tuple[torch.Tensor, ...]]) -> torch.nn.Module:
    """Static int8 quantization of model(*inputs) for the CPU, torchao's PT2E flow with its X86InductorQuantizer:
    per-output-channel int8 weights and per-tensor uint8 activations (histograms over the `calibration` inputs)
    for the convolutions and linear layers but those that read a concatenation (concat_readers); normalisation,
    attention's softmax and the elementwise ops stay float32, as in the int8 ONNX export. The graph runs int8
    kernels once compiled (compile_for_sampling: inductor with freezing lowers each quantized pattern to a oneDNN
    int8 kernel); uncompiled, it simulates int8 in float32."""
    for name in ("torchao", "torch.utils._pytree"):  # torchao's import logs each CUDA extension it cannot load
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning, "torch._inductor")  # its lowering
    try:
        from torchao.quantization.pt2e.inductor_passes import x86  # noqa: F401 (registers the int8 lowerings)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ModuleNotFoundError as e:
        raise Int8Error(f"int8 in PyTorch needs torchao ({e}): pip install 'ddpm-reference[int8]'") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        graph = torch.export.export(model.eval(), calibration[0], dynamic_shapes=[{0: batch}] * len(calibration[0]))
        config = xiq.get_default_x86_inductor_quantization_config()  # its global default also quantizes the adds:
        quantizer = xiq.X86InductorQuantizer()  # more error than these two alone (BENCHMARKS.md)
        quantizer.set_module_type_qconfig(torch.nn.Conv2d, config).set_module_type_qconfig(torch.nn.Linear, config)
        for name in concat_readers(graph.graph):
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(graph.module(), quantizer)
        for inputs in calibration:
            prepared(*inputs)
        return convert_pt2e(prepared)


def concat_readers(graph: torch.fx.Graph) -> list[str]:
    """The convolutions that read a concatenation (the U-Net decoder's 1x1 shortcuts over [h, skip]), by module
    name: their input joins channels of very different ranges (+-5 beside +-138 on the digits model), which one
    per-tensor int8 scale cannot hold (Q-Diffusion's observation, Li et al. 2023); they stay float32."""
    return [next(reversed(node.meta["nn_module_stack"].values()))[0] for node in graph.nodes
            if node.target == torch.ops.aten.conv2d.default and node.args[0].target == torch.ops.aten.cat.default]


class AtPrecision(torch.nn.Module):
    """model(*args) in `precision` for inference: bf16/fp16 run a copy of the weights in that dtype under
    autocast (which keeps the sinusoidal embedding and the normalisations' statistics in float32); the
    output is float32, so the sampler's arithmetic stays float32. fp32 calls the model itself; int8 a quantized
    copy (quantize_int8, calibrated on `calibration`: a list of the model's input tuples)."""

    def __init__(self, model: torch.nn.Module, precision: str, calibration=None):
        super().__init__()
        self.dtype = AUTOCAST_DTYPE.get(precision)
        self.class_names = getattr(model, "class_names", [])
        if precision == "int8":
            model = quantize_int8(copy.deepcopy(model), calibration)
        self.model = model if self.dtype is None else copy.deepcopy(model).to(self.dtype)

    def forward(self, *args):
        if self.dtype is None:
            return self.model(*args)
        with torch.autocast(args[0].device.type, dtype=self.dtype):
            return self.model(*args).float()

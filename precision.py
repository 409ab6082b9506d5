"""The precision the network computes in: float32, or bfloat16/float16 autocast where the device runs it fast.
Training autocasts over float32 master weights; sampling runs a reduced-precision copy of the weights
(AtPrecision) whose output is float32, so the sampler's arithmetic stays float32."""
from __future__ import annotations

import copy
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
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
    """(fp32|bf16|fp16, why): `auto` is bf16 autocast where the device runs it fast, float32 elsewhere."""
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}")
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


class AtPrecision(torch.nn.Module):
    """model(*args) in `precision` for inference: bf16/fp16 run a copy of the weights in that dtype under
    autocast (which keeps the sinusoidal embedding and the normalisations' statistics in float32); the
    output is float32, so the sampler's arithmetic stays float32. fp32 calls the model itself."""

    def __init__(self, model: torch.nn.Module, precision: str):
        super().__init__()
        self.dtype = AUTOCAST_DTYPE.get(precision)
        self.model = model if self.dtype is None else copy.deepcopy(model).to(self.dtype)
        self.class_names = getattr(model, "class_names", [])

    def forward(self, *args):
        if self.dtype is None:
            return self.model(*args)
        with torch.autocast(args[0].device.type, dtype=self.dtype):
            return self.model(*args).float()

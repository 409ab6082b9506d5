"""Small ONNX models of the project's file format (tiny conv nets that depend on t, with a schedule's metadata)
for the executors' parity tests, and the Python side the C++ runner is compared with."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

T = 200  # large enough for a 10-step quadratic spacing (S <= sqrt(0.8 T) + 1)
IMAGE = (1, 8, 8)


# ---------------------------------------------------------------- small test models
def export_net(path: Path, c_out: int) -> None:
    """A tiny conv net eps_theta(x, t) that really depends on t, exported like the project's U-Net."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(T, 8)
            self.c1 = torch.nn.Conv2d(IMAGE[0], 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, c_out, 3, padding=1)

        def forward(self, x, t):
            h = torch.nn.functional.silu(self.c1(x) + self.emb(t)[:, :, None, None])
            return torch.tanh(self.c2(h))

    torch.manual_seed(c_out)
    x, t = torch.zeros(2, *IMAGE), torch.zeros(2, dtype=torch.int64)
    batch = {0: "batch"}
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but still the plain route
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (x, t), str(path), input_names=["x", "t"], output_names=["model_output"],
                          dynamic_axes={"x": batch, "t": batch, "model_output": batch}, opset_version=17, dynamo=False)


def metadata(parameterization: str, variance: str, clip: bool = True, zero_snr: bool = False) -> dict[str, str]:
    from ddpm_reference import ddpm

    betas = ddpm.beta_schedule("linear", T)
    if zero_snr:  # alpha_bar_T = 0: the last beta is exactly 1
        betas = ddpm.rescale_zero_terminal_snr(betas)
    return {"ddpm.format": "1", "ddpm.betas": ",".join(repr(float(b)) for b in betas),
            "ddpm.num_timesteps": str(T), "ddpm.parameterization": parameterization, "ddpm.variance": variance,
            "ddpm.image_shape": ",".join(map(str, IMAGE)), "ddpm.data_range": "-1,1",
            "ddpm.clip_denoised": "true" if clip else "false", "ddpm.timestep_dtype": "int64", "ddpm.version": "test"}


def with_metadata(src: Path, dst: Path, meta: dict[str, str]) -> Path:
    model = onnx.load(str(src))
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(dst))
    return dst


def make_models(d: Path) -> dict[str, Path]:
    """The models of the parity tests, written into folder d."""
    export_net(d / "net1.onnx", IMAGE[0])
    export_net(d / "net2.onnx", 2 * IMAGE[0])
    return {
        "eps_small": with_metadata(d / "net1.onnx", d / "eps_small.onnx", metadata("eps", "fixed_small")),
        "v_large": with_metadata(d / "net1.onnx", d / "v_large.onnx", metadata("v", "fixed_large", clip=False)),
        "x0_small": with_metadata(d / "net1.onnx", d / "x0_small.onnx", metadata("x0", "fixed_small")),
        "eps_learned": with_metadata(d / "net2.onnx", d / "eps_learned.onnx", metadata("eps", "learned_range")),
        "v_zero_snr": with_metadata(d / "net1.onnx", d / "v_zero_snr.onnx", metadata("v", "fixed_small", zero_snr=True)),
        "v_student": with_metadata(d / "net1.onnx", d / "v_student.onnx", {  # a distilled student's own plan
            **metadata("v", "fixed_small", clip=False, zero_snr=True), "ddpm.sampler": "ddim", "ddpm.steps": "4",
            "ddpm.spacing": "trailing"}),
        "no_meta": d / "net1.onnx",
    }


def python_reference(model: Path, *, n: int, batch: int, sampler: str | None, steps: int | None = None, eta: float = 0.0,
                     spacing: str | None = None, clip: bool | None = None, seed: int = 0,
                     corrector_steps: int = 0) -> tuple[list[int], np.ndarray]:
    """(timesteps in sampling order, samples [n, C, H, W]) from the Python side: the project's onnxruntime
    sampler, export/onnx_sampler.py."""
    from ddpm_reference.export.onnx_sampler import OnnxSampler
    python = OnnxSampler(model, provider="cpu", threads=1)
    x = python.sample(n, sampler=sampler, steps=steps, eta=eta, spacing=spacing, clip=clip, seed=seed, batch=batch,
                      corrector_steps=corrector_steps)
    return python.plan(sampler, steps, eta=eta, spacing=spacing, clip=clip,
                       corrector_steps=corrector_steps).t.tolist(), x

"""The sampling runs that the commands make of a checkpoint or an exported file, on top of the executors (ddpm.run_plan,
OnnxSampler): a network at the asked precision (int8 calibrated on the run's noisy training images), a torch
run with the guidance of its labels (TorchRun), DDIM encoding and decoding with either (Encoder), and the digits FD
of a model's samples for the rows of `ddpm fd`'s tables (SampledFd)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from .data import calibration_images, load_dataset
from .ddpm import (Diffusion, UserError, classifier_free_guidance, classifier_guidance, classifier_mean_shift,
                   ddim_inversion_plan, load_model, make_plan, resolve_device, run_plan, sample, to_model_range,
                   to_uint8, torch_noise)
from .export import onnx_sampler
from .fd import FD_TABLE_ETAS, FD_TABLE_STEPS, GUIDANCE_TABLE, NFE_ROWS, DigitsFd
from .plan import DEFAULT_GUIDANCE, Plan, PlanOptions
from .precision import AtPrecision, compile_for_sampling, resolve_precision


@contextlib.contextmanager
def as_user_error():
    """ValueErrors of the library's own option checks (a plan the schedule cannot give, a config that does not
    fit together) become one-line user errors at the boundary; elsewhere a ValueError is a bug."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from None


def at_precision(model, precision: str, device: torch.device, compile: bool = False, cfg=None, diffusion=None):
    """(the model in the asked precision (AtPrecision), compiled if asked; "bf16 (auto: why)", which the
    command prints with its result: printed before, it would make a later user error two lines). int8 is
    calibrated on noisy training images of the run (`cfg`) at uniform t, and always compiled (its int8
    kernels exist only compiled)."""
    chosen, why = resolve_precision(precision, device)
    calibration = None
    if chosen == "int8":
        from .export.onnx_export import noisy_inputs
        calibration = noisy_inputs(calibration_images(cfg), diffusion.betas, len(model.class_names))
    net = AtPrecision(model, chosen, calibration)  # an Int8Error (a user's error) where int8 cannot be had
    compile = compile or chosen == "int8"
    return (compile_for_sampling(net) if compile else net), f"{chosen} ({why}{', compiled' if chosen == 'int8' else ''})"


@dataclasses.dataclass
class TorchRun:
    """A torch sampling run of `sample` and `fd`: the model (at its precision) and its diffusion, the plan, the
    labels of the run's images with their classifier-free guidance, classifier guidance (classifier = the
    `load_classifier` triple, with its scale g), and one noise stream for the whole run."""
    model: Any
    diffusion: Diffusion
    plan: Plan
    shape: tuple
    noise: Callable
    device: torch.device
    labels: np.ndarray | None = None
    guidance: float | None = None  # None: DEFAULT_GUIDANCE
    classifier: tuple | None = None
    scale: float = 1.0

    def images(self, start: int, stop: int, tick=None) -> torch.Tensor:
        """Images start..stop of the run: classifier-free guidance for a conditional model; with a classifier,
        Dhariwal & Nichol's mean shift for ancestral rows, their eps shift for the other samplers."""
        y = None if self.labels is None else torch.as_tensor(self.labels[start:stop], device=self.device)
        net, shape = self.model, (stop - start, *self.shape)
        if y is not None and self.model.class_names:
            scale = DEFAULT_GUIDANCE if self.guidance is None else self.guidance
            net = classifier_free_guidance(net, y, scale, len(self.model.class_names))
        if self.classifier is None:
            return sample(net, self.plan, shape, self.noise, tick).cpu()
        clf = self.classifier[0]
        if self.plan.sampler == "ancestral":
            return sample(net, self.plan, shape, self.noise, tick, classifier_mean_shift(clf, y, self.scale)).cpu()
        return sample(classifier_guidance(net, self.diffusion, clf, y, self.scale), self.plan, shape, self.noise,
                      tick).cpu()


class Encoder:
    """DDIM encoding and decoding with a checkpoint (torch) or an .onnx file (onnxruntime; the device names its
    provider), the same plans."""

    def __init__(self, model: str, device: str, data: str | None):
        if model.endswith(".onnx"):
            self.onnx = onnx_sampler.OnnxSampler(model, device)
            self.diffusion, shape, default_data = None, self.onnx.image_shape, "digits"
        else:
            self.onnx, dev = None, resolve_device(device)
            self.net, self.diffusion, cfg, shape = load_model(model, True, dev)
            default_data = cfg.data
        _, held_out = load_dataset(data or default_data)
        if tuple(held_out.shape[1:]) != tuple(shape):
            raise UserError(f"data images are {held_out.shape[1:]}, the model's are {tuple(shape)} (pass --data)")
        self.held_out, self.shape = held_out, tuple(shape)

    def images(self, idx) -> np.ndarray:
        return to_model_range(torch.from_numpy(self.held_out[idx])).numpy()

    def encode(self, x: np.ndarray, steps: int) -> np.ndarray:
        with as_user_error():
            if self.onnx:
                return self.onnx.run(self.onnx.inversion_plan(steps), x)
            dev = next(self.net.parameters()).device
            return run_plan(self.net, ddim_inversion_plan(self.diffusion, steps), torch.from_numpy(x).to(dev)).cpu().numpy()

    def decode(self, latents: np.ndarray, steps: int) -> np.ndarray:
        if self.onnx:
            return self.onnx.run(self.onnx.plan("ddim", steps, clip=False), latents)
        dev = next(self.net.parameters()).device
        plan = make_plan(self.diffusion, "ddim", steps, clip=False)
        return run_plan(self.net, plan, torch.from_numpy(latents).float().to(dev)).cpu().numpy()


@dataclasses.dataclass
class SampledFd:
    """The digits FD of num_samples images that a model samples (TorchRun, torch's noise of `seed`) with `options`,
    `classes` and `guidance` as a table's row changes them, with the model's variance or `variance`, and `seed`
    unless the row gives one: (FD, network calls, class accuracy). labels(class_names, classes, guidance, n) gives a
    run's labels; progress(total) is a context that yields a tick."""
    model: Any
    diffusion: Diffusion
    shape: tuple
    device: torch.device
    num_samples: int
    options: PlanOptions
    classes: str | None
    guidance: float | None
    labels: Callable
    progress: Callable
    variance: str | None = None
    seed: int = 0
    metric: DigitsFd = dataclasses.field(default_factory=DigitsFd)

    def __call__(self, variance=None, clf=None, scale=1.0, seed=None, **changes) -> tuple[float, int, float | None]:
        variance, seed = variance or self.variance, self.seed if seed is None else seed
        d = Diffusion(self.diffusion.betas, self.diffusion.parameterization, variance) if variance else self.diffusion
        classes, guidance = changes.pop("classes", self.classes), changes.pop("guidance", self.guidance)
        plan = make_plan(d, self.options.replace(**changes))
        labels = self.labels(self.model.class_names or (clf[2] if clf else []), classes, guidance, self.num_samples)
        noise = torch_noise(torch.Generator(self.device).manual_seed(seed), self.device)
        run = TorchRun(self.model, d, plan, self.shape, noise, self.device, labels, guidance, clf, scale)
        with self.progress(len(plan)) as tick:
            pixels = to_uint8(run.images(0, self.num_samples, tick))
        fd, accuracy = self.metric(pixels, labels)
        return fd, len(plan), accuracy

    def over_seeds(self, seeds, **row) -> tuple[float, float, int, float]:
        """(mean FD, its standard deviation, network calls, mean class accuracy) over `seeds`."""
        runs = np.array([self(seed=s, **row) for s in seeds], dtype=np.float64)
        return runs[:, 0].mean(), runs[:, 0].std(), int(runs[0, 1]), runs[:, 2].mean()

    def ddim_table(self) -> dict:
        """The DDIM table (Song et al. Table 1's shape): rows eta, columns S, and ancestral with both variances."""
        rows = {f"DDIM eta = {e:g}": [self(sampler="ddim", steps=s, eta=e)[:2] for s in FD_TABLE_STEPS]
                for e in FD_TABLE_ETAS}
        rows.update({f"ancestral, {v}": [self(v, sampler="ancestral", steps=self.diffusion.T)[:2]]
                     for v in ("fixed_small", "fixed_large")})
        return rows

    def nfe_table(self) -> dict:
        """FD against network calls for every sampler (NFE_ROWS)."""
        return {name: [self(**{**opts, "steps": s})[:2] for s in steps] for name, opts, steps in NFE_ROWS}

    def guidance_table(self, seeds, classifier=None, classifier_scales=()) -> dict:
        """Classifier-free guidance at GUIDANCE_TABLE's scales (a conditional model), and classifier guidance of the
        unconditional model (the null label) at each g of classifier_scales: name -> over_seeds."""
        rows = {f"classifier-free, s = {g:g}": self.over_seeds(seeds, guidance=g)
                for g in (GUIDANCE_TABLE if self.model.class_names else ())}
        if classifier:
            every_class = ",".join(map(str, range(len(classifier[2]))))
            rows.update({f"classifier guidance of the unconditional model, g = {g:g}":
                         self.over_seeds(seeds, clf=classifier, scale=g, classes=every_class, guidance=0.0)
                         for g in classifier_scales})
        return rows

"""Progressive distillation (Salimans & Ho 2022): students that sample in fewer network calls than their teacher.

Each round trains a student, initialised from its teacher, to do in one DDIM step what the teacher does in two:
from z_t it regresses the x0 that carries one DDIM step t -> t'' to where two teacher steps t -> t' -> t'' land
(distillation_target), with the loss weighted by max(SNR, 1) ("truncated SNR"). The student of K calls then
teaches the student of K/2. The first teacher is the model sampled with DDIM at teacher_steps calls; every
grid is the trailing spacing, which starts at T (pure noise at zero terminal SNR) and halves exactly:
trailing(K) is every other step of trailing(2K) when T/K is exact in binary (any power of two K).

A student is a checkpoint like any other (the teacher's config, its own weights) that records the plan it was
trained for: DDIM (eta 0) with its K calls, trailing spacing, x0 not clipped (its x0 is the effective one of two
teacher steps, not an image; the teacher's own steps clip theirs as its DDIM sampler does).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from . import ddpm
from .ddpm import PlanOptions, Trainer, TrainConfig, UserError, mean_flat
from .plan import space_timesteps


def ddim_step(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s):
    """DDIM with eta = 0 (Song et al. Eq. 12) from z_t to the noise level s, given x0:
    z_s = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t."""
    return alpha_s * x0 + sigma_s * (z_t - alpha_t * x0) / sigma_t


def distillation_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """Salimans & Ho, Algorithm 2: the x0 with which one DDIM step from z_t lands on z_s (two teacher steps away):
    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def truncated_snr_weight(alpha, sigma):
    """The weight of the x0 regression: max(SNR, 1) = max(alpha^2 / sigma^2, 1) (Salimans & Ho, Section 4)."""
    return torch.clamp(alpha ** 2 / sigma ** 2, min=1.0)


def distillation_loss(student, teacher, alpha, sigma, x0, j, noise):
    """Per example, max(SNR_t, 1) ||student(z_t, j) - x~||^2 (mean over pixels), z_t = alpha_t x0 + sigma_t noise:
    the student's x0 against distillation_target of two teacher DDIM steps t -> t' -> t''. t, t', t'' are the places
    j, j + 1, j + 2 of the teacher's grid, whose alpha and sigma are given (its last place: x0, alpha 1, sigma 0);
    student(z, j) and teacher(z, j) are x0 predictions."""
    a, s = (lambda i: alpha[i].view(-1, *[1] * (x0.ndim - 1))), (lambda i: sigma[i].view(-1, *[1] * (x0.ndim - 1)))
    z_t = a(j) * x0 + s(j) * noise
    with torch.no_grad():
        z_mid = ddim_step(z_t, teacher(z_t, j), a(j), s(j), a(j + 1), s(j + 1))
        z_end = ddim_step(z_mid, teacher(z_mid, j + 1), a(j + 1), s(j + 1), a(j + 2), s(j + 2))
        target = distillation_target(z_t, z_end, a(j), s(j), a(j + 2), s(j + 2))
    return truncated_snr_weight(a(j), s(j)).flatten() * mean_flat((student(z_t, j) - target) ** 2)


def student_options(steps: int) -> PlanOptions:
    """The plan a student of `steps` network calls samples with: the plan it is trained for."""
    return PlanOptions("ddim", steps, spacing="trailing", clip=False)


def round_steps(teacher_steps: int, steps: int) -> list[int]:
    """The students' network calls, teacher_steps / 2, teacher_steps / 4, ..., steps; a ValueError unless steps
    is teacher_steps halved one or more times."""
    counts = [teacher_steps // 2]
    while counts[-1] > steps and counts[-1] % 2 == 0:
        counts.append(counts[-1] // 2)
    if teacher_steps % 2 or counts[-1] != steps:
        raise ValueError(f"--steps {steps} is not --teacher-steps {teacher_steps} halved one or more times "
                         "(use powers of two)")
    return counts


def nested_grid(alphas_cumprod: np.ndarray, steps: int) -> np.ndarray:
    """The teacher's 2 * steps timesteps (descending, from T) of a student of `steps` calls, checked to hold the
    student's own trailing timesteps at every other place (else the two-step map would not end on its grid)."""
    T = len(alphas_cumprod)
    teacher = space_timesteps(T, 2 * steps, "trailing")[::-1].copy()
    if not np.array_equal(teacher[::2], space_timesteps(T, steps, "trailing")[::-1]):
        raise ValueError(f"the trailing timesteps of {steps} calls are not every other one of {2 * steps} for T = {T}")
    return teacher


class Distiller(Trainer):
    """A round of progressive distillation: the Trainer of a student of `steps` calls, initialised from `teacher`
    (a model(x_t, t, y) in eval mode), whose loss is the distillation loss instead of Algorithm 1's."""

    def __init__(self, cfg: TrainConfig, image_shape, device, rank: int = 0, ddp: bool = False, classes=None, *,
                 teacher, steps: int, config: dict):
        super().__init__(cfg, image_shape, device, rank, ddp, classes)
        self.model.load_state_dict(teacher.state_dict())
        self.ema.module.load_state_dict(teacher.state_dict())
        self.teacher, self.steps, self.config = teacher.requires_grad_(False), steps, config
        self.grid_options = student_options(steps)
        grid = nested_grid(self.diffusion.alphas_cumprod, steps)
        ab = np.append(self.diffusion.alphas_cumprod[grid], 1.0)  # the last step ends at x0: alpha 1, sigma 0
        self.grid = torch.as_tensor(grid, device=device)
        self.alpha = torch.as_tensor(np.sqrt(ab), dtype=torch.float32, device=device)
        self.sigma = torch.as_tensor(np.sqrt(1.0 - ab), dtype=torch.float32, device=device)

    def _x0(self, net, z, j, y, clip: bool):
        """A network's x0 at z, the teacher grid's timestep j, in float32."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = net(z.contiguous(memory_format=self.memory_format), self.grid[j], y).float()
        x0 = self.diffusion.to_x0(z, self.grid[j], out, self.diffusion.parameterization)
        return x0.clamp(-1.0, 1.0) if clip else x0

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """distillation_loss at student steps k ~ U{0..steps-1}, averaged over the batch."""
        j = 2 * torch.randint(0, self.steps, (x0.shape[0],), device=self.device, generator=self.gen)
        noise = torch.randn(x0.shape, device=self.device, generator=self.gen)
        y = self.dropped(labels)
        return distillation_loss(lambda z, i: self._x0(self.net, z, i, y, False),
                                 lambda z, i: self._x0(self.teacher, z, i, y, True), self.alpha, self.sigma, x0, j,
                                 noise).mean()

    def state_dict(self) -> dict:
        options = dataclasses.asdict(self.grid_options)
        return {**super().state_dict(), "plan": {k: options[k] for k in ("sampler", "steps", "spacing", "clip")},
                "distill": self.config}


def _option(default, help: str, **cli):
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass
class DistillConfig:
    """What a distillation depends on, saved in every student; each field is an option of `ddpm distill` with
    this default, help and range."""
    steps: int = _option(1, "network calls of the last student (the teacher's steps halved one or more times)",
                         min=1)
    teacher_steps: int = _option(32, "DDIM steps of the model, the first teacher (a power of two)", min=2)
    train_steps: int = _option(200, "optimizer steps of each round", min=1)
    lr: float = _option(1e-3, "AdamW learning rate after warm-up (cosine decay to 0 in each round)", min=1e-12)
    warmup: int = _option(20, "linear learning-rate warm-up steps of each round", min=0)
    batch_size: int = _option(128, "images per optimizer step", min=1)
    seed: int = _option(0, "seed of every random draw", min=0)
    device: ddpm.Device = _option("auto", "auto: CUDA if available, else CPU")
    precision: ddpm.Precision = _option("auto", "autocast precision of student and teacher (auto: bf16 where the "
                                               "device runs it fast)")
    checkpoint_every: int = _option(100, "write the round's checkpoint every this many steps (and at its end)", min=1)
    log_every: int = _option(25, "check the loss for NaN and report it every this many steps", min=1)
    out: str = _option("runs/distill", "folder of the students, OUT/steps-K/checkpoint.pt")

    def round_config(self, teacher: TrainConfig, steps: int) -> TrainConfig:
        """The TrainConfig of the round that makes the student of `steps` calls: the teacher's model and schedule,
        this distillation's optimiser, in OUT/steps-K."""
        return dataclasses.replace(teacher, steps=self.train_steps, lr=self.lr, warmup=self.warmup, lr_decay="cosine",
                                   batch_size=self.batch_size, accum=1, seed=self.seed, device=self.device,
                                   precision=self.precision, compile=False, channels_last=False,
                                   checkpoint_every=self.checkpoint_every, sample_every=self.train_steps,
                                   log_every=self.log_every, out=os.path.join(self.out, f"steps-{steps}"))


# What a resumed distillation may change (as ddpm.RESUMABLE): not what it trains.
RESUMABLE = ("steps", "device", "precision", "checkpoint_every", "log_every", "out")


def distill(checkpoint: str, cfg: DistillConfig, data, resume: bool = False, overwrite: bool = False,
            callback=None) -> dict:
    """Distil the model of `checkpoint` (EMA weights) into students of cfg.teacher_steps / 2, ..., cfg.steps calls,
    each trained by ddpm.train (its checkpoints, resume and NaN check) in OUT/steps-K/checkpoint.pt and taught by
    the one before. A finished student is kept and teaches the next round; with resume an unfinished one continues
    exactly. callback gets ddpm.train's reports with "round": K and "done": the steps of earlier rounds."""
    try:
        counts = round_steps(cfg.teacher_steps, cfg.steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = ddpm.resolve_device(cfg.device)
    teacher, diffusion, teacher_cfg, _ = ddpm.load_model(checkpoint, device=device)
    if teacher_cfg.T < 2 * counts[0]:
        raise UserError(f"--teacher-steps {cfg.teacher_steps}: the model has only T = {teacher_cfg.T} steps")
    config = {**dataclasses.asdict(cfg), "teacher": os.path.abspath(checkpoint)}
    rounds, t0 = [], time.perf_counter()
    for r, steps in enumerate(counts):
        path = os.path.join(cfg.out, f"steps-{steps}", "checkpoint.pt")
        saved = ddpm.load_checkpoint(path) if resume and os.path.exists(path) else None
        if saved is not None:
            _check_resumable(saved.get("distill", {}), config, path)
        if saved is not None and saved["step"] >= cfg.train_steps:
            rounds.append({"steps": steps, "checkpoint": path, "resumed": "finished"})
        else:
            make = lambda *args, teacher=teacher, steps=steps: Distiller(*args, teacher=teacher, steps=steps,  # noqa: E731
                                                                         config=config)
            report = callback and (lambda rep, steps=steps, r=r: callback({**rep, "round": steps,
                                                                           "done": r * cfg.train_steps,
                                                                           "total": len(counts) * cfg.train_steps}))
            result = ddpm.train(cfg.round_config(teacher_cfg, steps), data, saved is not None, report,
                                overwrite=overwrite, trainer=make)
            rounds.append({"steps": steps, "checkpoint": path, "loss": result["losses"][-1][1]})
        teacher = ddpm.load_model(path, device=device)[0]
    return {"rounds": rounds, "seconds": time.perf_counter() - t0}


def _check_resumable(saved: dict, config: dict, path: str) -> None:
    for key, value in config.items():
        if key not in RESUMABLE and saved.get(key) != value:
            raise UserError(f"{path} was distilled with {key} = {saved.get(key)!r}, not {value!r}: resume with the "
                            "same options, or pass --overwrite or another --out")

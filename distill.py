"""Progressive distillation (Salimans & Ho 2022): students that sample in fewer network calls than their teacher.

Each round trains a student, initialised from its teacher, to do in one DDIM step what the teacher does in two:
from z_t it regresses the x0 that carries one DDIM step t -> t'' to where two teacher steps t -> t' -> t'' land
(distillation_target), with the loss weighted by max(SNR, 1) ("truncated SNR"). The student of K calls then
teaches the student of K/2. The first teacher is the model sampled with DDIM at teacher_steps calls; every
grid is the trailing spacing, which starts at T (pure noise at zero terminal SNR) and halves exactly:
trailing(K) is every other step of trailing(2K) when T/K is exact in binary (any power of two K).

A student learns its teacher's map, so it samples no better than the teacher's DDIM. With adversarial_steps, the
students of few calls are then tuned (Tuner) as a GAN's generator: their own samples, judged by a discriminator
against the training images, held near the distilled student's samples from the same noise; the tuned student
teaches the next round.

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
from .ddpm import PlanOptions, Trainer, TrainConfig, UserError, lr_at, mean_flat
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


def student_grid(alphas_cumprod: np.ndarray, steps: int) -> np.ndarray:
    """The timesteps (descending, from T) of the plan of a student of `steps` calls (student_options)."""
    return space_timesteps(len(alphas_cumprod), steps, "trailing")[::-1].copy()


def nested_grid(alphas_cumprod: np.ndarray, steps: int) -> np.ndarray:
    """The teacher's 2 * steps timesteps (descending, from T) of a student of `steps` calls, checked to hold the
    student's own timesteps at every other place (else the two-step map would not end on its grid)."""
    teacher = student_grid(alphas_cumprod, 2 * steps)
    if not np.array_equal(teacher[::2], student_grid(alphas_cumprod, steps)):
        raise ValueError(f"the trailing timesteps of {steps} calls are not every other one of {2 * steps} for "
                         f"T = {len(alphas_cumprod)}")
    return teacher


class Student(Trainer):
    """The Trainer of a student of `steps` calls, initialised from `teacher` (a model(x_t, t, y) in eval mode): its
    checkpoint records the plan it is trained for and the distillation's config."""

    def __init__(self, cfg: TrainConfig, image_shape, device, rank: int = 0, ddp: bool = False, classes=None, *,
                 teacher, steps: int, config: dict):
        super().__init__(cfg, image_shape, device, rank, ddp, classes)
        self.model.load_state_dict(teacher.state_dict())
        self.ema.module.load_state_dict(teacher.state_dict())
        self.teacher, self.steps, self.config = teacher.requires_grad_(False), steps, config
        self.grid_options = student_options(steps)

    def _grid(self, timesteps: np.ndarray) -> None:
        """The timesteps (descending) that the network sees, and alpha, sigma at each with x0 (1, 0) appended."""
        ab = np.append(self.diffusion.alphas_cumprod[timesteps], 1.0)
        self.grid = torch.as_tensor(timesteps, device=self.device)
        self.alpha = torch.as_tensor(np.sqrt(ab), dtype=torch.float32, device=self.device)
        self.sigma = torch.as_tensor(np.sqrt(1.0 - ab), dtype=torch.float32, device=self.device)

    def _x0(self, net, z, j, y, clip: bool):
        """A network's x0 at z, the grid's timestep j (one, or one per example), in float32."""
        t = self.grid[j].expand(len(z))
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = net(z.contiguous(memory_format=self.memory_format), t, y).float()
        x0 = self.diffusion.to_x0(z, t, out, self.diffusion.parameterization)
        return x0.clamp(-1.0, 1.0) if clip else x0

    def state_dict(self) -> dict:
        options = dataclasses.asdict(self.grid_options)
        return {**super().state_dict(), "plan": {k: options[k] for k in ("sampler", "steps", "spacing", "clip")},
                "distill": self.config}


class Distiller(Student):
    """A round of progressive distillation: a student whose loss is the distillation loss instead of Algorithm 1's,
    on the teacher's grid of 2 * steps timesteps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grid(nested_grid(self.diffusion.alphas_cumprod, self.steps))

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """distillation_loss at student steps k ~ U{0..steps-1}, averaged over the batch."""
        j = 2 * torch.randint(0, self.steps, (x0.shape[0],), device=self.device, generator=self.gen)
        noise = torch.randn(x0.shape, device=self.device, generator=self.gen)
        y = self.dropped(labels)
        return distillation_loss(lambda z, i: self._x0(self.net, z, i, y, False),
                                 lambda z, i: self._x0(self.teacher, z, i, y, True), self.alpha, self.sigma, x0, j,
                                 noise).mean()


# The discriminator's optimisation (measured on the digits students, BENCHMARKS.md "Few-call students"): its
# learning rate, the weight of its R1 penalty, and its steps per step of the student.
DISCRIMINATOR_LR, R1_GAMMA, DISCRIMINATOR_STEPS = 1e-3, 0.05, 2


def make_discriminator(image_shape) -> torch.nn.Module:
    """A small convolutional discriminator D(x) -> logit: three 3x3 convolutions (64, 128, 256 channels, the last
    two of stride 2) with leaky ReLUs, and a linear head."""
    C, H, W = image_shape
    act = lambda: torch.nn.LeakyReLU(0.2)  # noqa: E731
    return torch.nn.Sequential(torch.nn.Conv2d(C, 64, 3, padding=1), act(), torch.nn.Conv2d(64, 128, 3, 2, 1), act(),
                               torch.nn.Conv2d(128, 256, 3, 2, 1), act(), torch.nn.Flatten(),
                               torch.nn.Linear(256 * -(-H // 4) * -(-W // 4), 1))


def discriminator_loss(d_real, d_fake):
    """The non-saturating GAN's discriminator loss (Goodfellow et al. 2014), per example: -log sigmoid(D(real))
    - log(1 - sigmoid(D(fake))) = softplus(-D(real)) + softplus(D(fake))."""
    return torch.nn.functional.softplus(-d_real).flatten() + torch.nn.functional.softplus(d_fake).flatten()


def r1_penalty(d_real, real):
    """R1 (Mescheder et al. 2018), per example: ||grad_x D(x)||^2 at the real images (differentiable)."""
    grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


def ddim_chain(x0_of, z, alpha, sigma):
    """The student's own plan from z: DDIM steps j = 0 .. K-1 over the grid's alpha, sigma (x0's 1, 0 last), each
    from x0_of(z, j); differentiable."""
    for j in range(len(alpha) - 1):
        z = ddim_step(z, x0_of(z, j), alpha[j], sigma[j], alpha[j + 1], sigma[j + 1])
    return z


class Tuner(Student):
    """Adversarial tuning of a student of `steps` calls (`teacher`: the distilled student, which it starts from):
    its samples, drawn with its own plan and back-propagated through all of its calls, are judged by a discriminator
    against the training images (non-saturating GAN loss, R1 penalty), and held near the samples that the distilled
    student draws from the same noise by anchor_weight * ||x - x_distilled||^2 (per pixel), which keeps its map
    from noise to digit (and so the digits' variety) and lets the discriminator sharpen them. The student is of an
    unconditional model (the discriminator sees no labels): DistillConfig.stages tunes no other."""
    anchor_weight = 0.1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.ddp:
            raise UserError("--adversarial-steps: adversarial tuning runs in one process, not under torchrun")
        self._grid(student_grid(self.diffusion.alphas_cumprod, self.steps))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=(0.0, 0.99))
        self.disc = make_discriminator(self.image_shape).to(self.device)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=DISCRIMINATOR_LR, betas=(0.0, 0.99))

    def train_step(self, data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """DISCRIMINATOR_STEPS steps of the discriminator on a batch of real images each and one batch of the
        student's samples, then one step of the student."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.width = ddpm.level_width(data) if self.width is None else self.width
        z = torch.randn((cfg.batch_size, *self.image_shape), device=self.device, generator=self.gen)
        fake = ddim_chain(lambda x, j: self._x0(self.net, x, j, None, False), z, self.alpha, self.sigma)
        self.disc.requires_grad_(True)
        for _ in range(DISCRIMINATOR_STEPS):
            idx = torch.randint(0, len(data), (cfg.batch_size,), device=self.device, generator=self.gen)
            # the real images as continuous as a sampler's: dequantized within their grey levels
            real = ddpm.dequantize(ddpm.to_model_range(data[idx]), self.width, self.gen).requires_grad_(True)
            d_real = self.disc(real)
            loss = (discriminator_loss(d_real, self.disc(fake.detach())) + R1_GAMMA / 2 * r1_penalty(d_real, real))
            self.disc_opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            self.disc_opt.step()
        self.disc.requires_grad_(False)
        with torch.no_grad():
            anchor = ddim_chain(lambda x, j: self._x0(self.teacher, x, j, None, False), z, self.alpha, self.sigma)
        loss = (torch.nn.functional.softplus(-self.disc(fake)).flatten()
                + self.anchor_weight * mean_flat((fake - anchor) ** 2)).mean()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.running += loss.detach()
        self.bad |= ~torch.isfinite(self.running)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update_parameters(self.model)
        self.step += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "discriminator": self.disc.state_dict(),
                "discriminator_optimizer": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.disc.load_state_dict(state["discriminator"])
        self.disc_opt.load_state_dict(state["discriminator_optimizer"])


def _option(default, help: str, **cli):
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass
class DistillConfig:
    """What a distillation depends on, saved in every student; each field is an option of `ddpm distill` with
    this default, help and range."""
    steps: int = _option(1, "network calls of the last student (the teacher's steps halved one or more times)",
                         min=1)
    teacher_steps: int = _option(16, "DDIM steps of the model, the first teacher (a power of two)", min=2)
    train_steps: int = _option(180, "optimizer steps of each round", min=1)
    lr: float = _option(1e-3, "AdamW learning rate after warm-up (cosine decay to 0 in each round)", min=1e-12)
    warmup: int = _option(20, "linear learning-rate warm-up steps of each round", min=0)
    batch_size: int = _option(128, "images per optimizer step", min=1)
    adversarial_steps: int = _option(100, "adversarial tuning steps of each student of at most --adversarial-calls "
                                        "calls, after its distillation (0: none)", min=0)
    adversarial_calls: int = _option(4, "tune the students of this many network calls or fewer", min=1)
    adversarial_lr: float = _option(5e-5, "Adam learning rate of the students' adversarial tuning", min=1e-12)
    seed: int = _option(0, "seed of every random draw", min=0)
    device: ddpm.Device = _option("auto", "auto: CUDA if available, else CPU")
    precision: ddpm.Precision = _option("auto", "autocast precision of student and teacher (auto: bf16 where the "
                                               "device runs it fast)")
    checkpoint_every: int = _option(100, "write the round's checkpoint every this many steps (and at its end)", min=1)
    log_every: int = _option(25, "check the loss for NaN and report it every this many steps", min=1)
    out: str = _option("runs/distill", "folder of the students, OUT/steps-K/checkpoint.pt")

    def round_config(self, teacher: TrainConfig, out: str) -> TrainConfig:
        """The TrainConfig of a round of distillation: the teacher's model and schedule, this distillation's
        optimiser, writing into the folder `out`."""
        return dataclasses.replace(teacher, steps=self.train_steps, lr=self.lr, warmup=self.warmup, lr_decay="cosine",
                                   batch_size=self.batch_size, accum=1, seed=self.seed, device=self.device,
                                   precision=self.precision, compile=False, channels_last=False,
                                   checkpoint_every=self.checkpoint_every, sample_every=self.train_steps,
                                   log_every=self.log_every, out=out)

    def tuning_config(self, teacher: TrainConfig, out: str) -> TrainConfig:
        """The TrainConfig of a student's adversarial tuning: round_config's, at --adversarial-lr (constant, no
        warm-up) for --adversarial-steps, with an EMA of decay 0.9."""
        return dataclasses.replace(self.round_config(teacher, out), steps=self.adversarial_steps,
                                   lr=self.adversarial_lr, warmup=0, lr_decay="constant", ema_decay=0.9,
                                   sample_every=self.adversarial_steps)

    def stages(self, counts: list[int], tune: bool = True) -> list[tuple[int, str, int]]:
        """(calls, "distill" or "tune", optimizer steps) of each stage, in order: a round's distillation, then, with
        tune, its student's tuning where adversarial_steps and the student has at most adversarial_calls calls."""
        return [(k, stage, n) for k in counts for stage, n in (("distill", self.train_steps), ("tune", self.adversarial_steps))
                if stage == "distill" or (tune and n and k <= self.adversarial_calls)]


# What a resumed distillation may change (as ddpm.RESUMABLE): not what it trains.
RESUMABLE = ("steps", "device", "precision", "checkpoint_every", "log_every", "out")


def distill(checkpoint: str, cfg: DistillConfig, data, resume: bool = False, overwrite: bool = False,
            callback=None) -> dict:
    """Distil the model of `checkpoint` (EMA weights) into students of cfg.teacher_steps / 2, ..., cfg.steps calls,
    each trained by ddpm.train (its checkpoints, resume and NaN check) in OUT/steps-K/checkpoint.pt and taught by
    the one before; a student that is tuned (cfg.stages; those of an unconditional model) is distilled in
    OUT/steps-K/distilled/ first. A finished stage is kept; with resume an unfinished one continues exactly.
    callback gets ddpm.train's reports with "round": K, "stage", "done": the steps of earlier stages and "total":
    those of all."""
    try:
        counts = round_steps(cfg.teacher_steps, cfg.steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = ddpm.resolve_device(cfg.device)
    teacher, diffusion, teacher_cfg, _ = ddpm.load_model(checkpoint, device=device)
    if teacher_cfg.T < 2 * counts[0]:
        raise UserError(f"--teacher-steps {cfg.teacher_steps}: the model has only T = {teacher_cfg.T} steps")
    config = {**dataclasses.asdict(cfg), "teacher": os.path.abspath(checkpoint)}
    stages = cfg.stages(counts, tune=not teacher.class_names)  # the discriminator is unconditional
    tuned = {k for k, stage, _ in stages if stage == "tune"}
    folders = [os.path.join(cfg.out, f"steps-{k}", "distilled" if k in tuned and stage == "distill" else "")
               for k, stage, _ in stages]
    for path in (os.path.join(f, "checkpoint.pt") for f in folders):
        if not resume and not overwrite and os.path.exists(path):  # before any work, not when its stage comes
            raise UserError(f"{path} exists: pass --resume to keep its finished students, --overwrite to start "
                            "afresh, or choose another --out")
    rounds, done, t0 = [], 0, time.perf_counter()
    for (steps, stage, n), folder in zip(stages, folders):
        path = os.path.join(folder, "checkpoint.pt")
        saved = ddpm.load_checkpoint(path) if resume and os.path.exists(path) else None
        if saved is not None:
            _check_resumable(saved.get("distill", {}), config, path)
        if saved is not None and saved["step"] >= n:
            rounds.append({"steps": steps, "stage": stage, "checkpoint": path, "resumed": "finished"})
        else:
            kind = Distiller if stage == "distill" else Tuner
            make = lambda *args, teacher=teacher, steps=steps, kind=kind: kind(  # noqa: E731
                *args, teacher=teacher, steps=steps, config=config)
            report = callback and (lambda rep, steps=steps, stage=stage, done=done: callback(
                {**rep, "round": steps, "stage": stage, "done": done, "total": sum(s[2] for s in stages)}))
            stage_cfg = (cfg.round_config if stage == "distill" else cfg.tuning_config)(teacher_cfg, folder)
            result = ddpm.train(stage_cfg, data, saved is not None, report, overwrite=overwrite, trainer=make)
            rounds.append({"steps": steps, "stage": stage, "checkpoint": path, "loss": result["losses"][-1][1]})
        done += n
        teacher = ddpm.load_model(path, device=device)[0]
    return {"rounds": rounds, "seconds": time.perf_counter() - t0}


def _check_resumable(saved: dict, config: dict, path: str) -> None:
    for key, value in config.items():
        if key not in RESUMABLE and saved.get(key) != value:
            raise UserError(f"{path} was distilled with {key} = {saved.get(key)!r}, not {value!r}: resume with the "
                            "same options, or pass --overwrite or another --out")

"""Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020), exact and small.

Sections, in order: schedules -> Diffusion (forward process, posterior, parameterisations, variances)
-> losses and bits/dim -> sampling plans and samplers (Algorithm 2, DDIM) -> data -> training
(Algorithm 1) -> measurement (fd, bench) -> command line (`ddpm ...`). The sampling plan is built in
export/onnx_sampler.py (numpy, no torch), which the onnxruntime sampler shares; this module executes it.

Conventions. Timesteps are stored 0..T-1: index 0 is the paper's t=1 and index T-1 its t=T. Every
per-timestep table is numpy float64, computed once; it is cast to the working dtype only when it is
indexed for a batch. A "model" is any callable `model(x_t, t) -> output`; the U-Net of unet.py is one,
the closed-form oracles of the tests are others.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import time
import warnings
from functools import cached_property
from typing import Callable, Literal, get_args

import numpy as np
import torch

from . import unet
from .export import onnx_sampler
from .export.onnx_sampler import (Plan, balanced_labels, ddim_coefficients, ddim_sigma,  # noqa: F401
                                  dpmpp_2m_coefficients, langevin_coefficients, log_snr, posterior_coefficients,
                                  save_images, space_timesteps, write_atomically, x0_coefficients)

__version__ = importlib.metadata.version("ddpm-reference")


class UserError(Exception):
    """A mistake the user can fix (bad path, bad file, bad option): one line, exit status 2."""


def check_choice(name: str, value, kind) -> None:
    """Raise ValueError naming the valid values when `value` is not one of the Literal `kind`."""
    if value not in get_args(kind):
        raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {value!r}")


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
    check_choice("precision", precision, Precision)
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


# ----------------------------------------------------------------------------------------- schedules

Schedule = Literal["linear", "cosine", "quad", "sigmoid", "const", "jsd"]


def beta_schedule(name: Schedule, T: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
                  s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Variances beta_1..beta_T of the forward process q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t I).

    linear/quad/sigmoid/const use beta_start..beta_end, given for T=1000 and scaled by 1000/T
    (improved-diffusion) so that alpha_bar_T stays comparable for any T. cosine is Nichol & Dhariwal's
    Eq. (17) with offset s, betas clipped at max_beta. jsd is 1/T, 1/(T-1), ..., 1.
    """
    check_choice("schedule", name, Schedule)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    scale = 1000.0 / T
    b0, b1 = beta_start * scale, min(beta_end * scale, max_beta)
    if name == "linear":
        betas = np.linspace(b0, b1, T)
    elif name == "quad":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, T) ** 2
    elif name == "sigmoid":
        betas = b0 + (b1 - b0) / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T)))
    elif name == "const":
        betas = np.full(T, b1)
    elif name == "jsd":
        betas = 1.0 / np.linspace(T, 1, T)
    else:
        f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    return betas.astype(np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 exactly
    (zero terminal SNR) while alpha_bar_1 is unchanged. Needs the v or x0 parameterisation."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


# ----------------------------------------------------------------------------------------- diffusion

Parameterization = Literal[onnx_sampler.PARAMETERIZATIONS]  # eps | x0 | v
Variance = Literal[onnx_sampler.VARIANCES]  # fixed_small | fixed_large | learned_range

_DEVICE_TABLES: dict = {}  # (id(table), device) -> (table, its copy on the device): one copy, not one per step


def _on_device(table: np.ndarray, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.from_numpy(table)  # shares the numpy memory
    key = (id(table), str(device))
    if key not in _DEVICE_TABLES:  # the table is kept in the value, so its id cannot be reused
        _DEVICE_TABLES[key] = (table, torch.from_numpy(table).to(device))
    return _DEVICE_TABLES[key][1]


def _broadcast(table: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] as a [B, 1, ..., 1] tensor in x's dtype and device (the float64 -> working dtype step)."""
    assert t.ndim == 1 and t.shape[0] == x.shape[0], (t.shape, x.shape)
    values = _on_device(table, x.device)[t.to(x.device).long()]
    return values.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Diffusion:
    """The forward process, its posterior and the reverse-process parameterisations of a schedule.

    parameterization: what the network predicts: eps (Ho et al.), x0, or v = sqrt(ab) eps - sqrt(1-ab) x0
    (Salimans & Ho). variance: Sigma_theta of p(x_{t-1} | x_t): fixed_small (posterior beta-tilde),
    fixed_large (beta), learned_range (Nichol & Dhariwal Eq. 15; the network outputs 2C channels).
    """

    def __init__(self, betas, parameterization: Parameterization = "eps",
                 variance: Variance = "fixed_small", alphas_cumprod=None):
        check_choice("parameterization", parameterization, Parameterization)
        check_choice("variance", variance, Variance)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not len(betas) or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.betas, self.parameterization, self.variance = betas, parameterization, variance
        self.T = len(betas)
        self.alphas = 1.0 - betas
        # alphas_cumprod may be given exactly (respace) rather than re-accumulated from rounded betas.
        self.alphas_cumprod = np.cumprod(self.alphas) if alphas_cumprod is None else np.asarray(alphas_cumprod, np.float64)
        if self.alphas_cumprod[-1] == 0 and parameterization == "eps":
            raise ValueError("zero terminal SNR (alpha_bar_T = 0) needs the v or x0 parameterization")
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Eq. (7): beta-tilde and the two coefficients of the posterior mean.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas)
                                     / (1.0 - self.alphas_cumprod))
        # beta-tilde_1 = 0: the log is clipped to beta-tilde_2, as in the original implementation.
        first = self.posterior_variance[1] if self.T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.fixed_large_log_variance = np.log(np.append(first, betas[1:]))
        self.log_betas = np.log(betas)

    # forward process
    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x_0), Eq. (4)."""
        mean = _broadcast(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, _broadcast(1.0 - self.alphas_cumprod, t, x0), _broadcast(self.log_one_minus_alphas_cumprod, t, x0)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, the closed form Eq. (4)."""
        assert noise.shape == x0.shape
        return (_broadcast(self.sqrt_alphas_cumprod, t, x0) * x0
                + _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), Eq. (6)-(7)."""
        assert x0.shape == x_t.shape
        mean = (_broadcast(self.posterior_mean_coef1, t, x_t) * x0
                + _broadcast(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _broadcast(self.posterior_variance, t, x_t),
                _broadcast(self.posterior_log_variance_clipped, t, x_t))

    # parameterisations: every prediction passes through x0
    def to_x0(self, x_t, t, value, kind: Parameterization):
        """The x_0 implied by a prediction of `kind` at (x_t, t): inverts Eq. (4) for eps, Eq. (9)."""
        if kind == "x0":
            return value
        if kind == "eps":
            return (_broadcast(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                    - _broadcast(self.sqrt_recipm1_alphas_cumprod, t, x_t) * value)
        return (_broadcast(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t) * value)

    def from_x0(self, x_t, t, x0, kind: Parameterization):
        """The eps, x0 or v that goes with (x_t, x_0); v = sqrt(ab) eps - sqrt(1-ab) x0."""
        if kind == "x0":
            return x0
        eps = ((x_t - _broadcast(self.sqrt_alphas_cumprod, t, x_t) * x0)
               / _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t))
        if kind == "eps":
            return eps
        return (_broadcast(self.sqrt_alphas_cumprod, t, x_t) * eps
                - _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x0)

    def split_output(self, output, x_t):
        """(prediction, variance output or None): learned_range networks output 2C channels."""
        if self.variance == "learned_range":
            assert output.shape[1] == 2 * x_t.shape[1], (output.shape, x_t.shape)
            return output.chunk(2, dim=1)
        assert output.shape == x_t.shape, (output.shape, x_t.shape)
        return output, None

    def model_log_variance(self, x_t, t, var_out=None):
        """log Sigma_theta(x_t, t): a fixed table, or Eq. (15) of Nichol & Dhariwal for learned_range."""
        if self.variance == "fixed_small":
            return _broadcast(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        if self.variance == "fixed_large":
            return _broadcast(self.fixed_large_log_variance, t, x_t).expand_as(x_t)
        frac = (var_out + 1) / 2
        return (frac * _broadcast(self.log_betas, t, x_t)
                + (1 - frac) * _broadcast(self.posterior_log_variance_clipped, t, x_t))

    def p_mean_variance(self, output, x_t, t, clip_denoised: bool = False):
        """Mean and log-variance of p_theta(x_{t-1} | x_t) from a network output: the predicted x_0
        (optionally clipped to [-1, 1]) is put into the posterior mean of Eq. (7)."""
        pred, var_out = self.split_output(output, x_t)
        pred_x0 = self.to_x0(x_t, t, pred, self.parameterization)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        log_variance = self.model_log_variance(x_t, t, var_out)
        return {"mean": mean, "log_variance": log_variance, "variance": log_variance.exp(), "pred_x0": pred_x0}

    def score(self, model, x_t, t):
        """grad log q(x_t) estimated as -eps_theta / sqrt(1 - alpha_bar_t) (the score-matching link, Eq. 12)."""
        pred, _ = self.split_output(model(x_t, t), x_t)
        eps = self.from_x0(x_t, t, self.to_x0(x_t, t, pred, self.parameterization), "eps")
        return -eps / _broadcast(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    @cached_property
    def lambda_vlb(self) -> np.ndarray:
        """vlb_weights(self), computed once (training reads it every step)."""
        return vlb_weights(self)

    def respace(self, timesteps) -> "Diffusion":
        """The process restricted to the kept `timesteps` (improved DDPM, Section 4): new betas
        1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}} keep alpha_bar at every kept step. The model is still
        called with the original indices (`timesteps`)."""
        ts = np.asarray(timesteps, dtype=np.int64)
        ab = self.alphas_cumprod[ts]
        betas = 1.0 - ab / np.append(1.0, ab[:-1])
        return Diffusion(betas, self.parameterization, self.variance, alphas_cumprod=ab)


# ------------------------------------------------------------------------------ losses and bits/dim

LossType = Literal["simple", "vlb", "hybrid"]
Weighting = Literal["constant", "vlb"]


def mean_flat(x):
    """Mean over every dimension but the batch one: losses here are per pixel (per dimension)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, e^(2 log_scale)) integrated over each pixel's bin
    of width 2/255, the outermost bins extended to -inf and +inf: the decoder L_0, Section 3.3.
    Uses the exact normal CDF (the original code uses a tanh approximation)."""
    assert x.shape == mean.shape == log_scale.shape
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (x - mean + 1 / 255), inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, mid))


def vlb_terms(diffusion: Diffusion, output, x0, x_t, t):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 1 and the decoder
    L_0 = -log p_theta(x_0 | x_1) for t = 1 (index 0), Eq. (5); per example, in bits per dimension."""
    true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
    p = diffusion.p_mean_variance(output, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
    return torch.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion: Diffusion, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim; no parameters, nearly 0."""
    t = torch.full((x0.shape[0],), diffusion.T - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    zero = torch.zeros_like(x0)
    return mean_flat(normal_kl(mean, log_var.expand_as(x0), zero, zero)) / math.log(2.0)


def vlb_weights(diffusion: Diffusion) -> np.ndarray:
    """lambda(t) = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)): the weight that turns the eps
    MSE into the true bound term L_{t-1} (Eq. 12); L_simple (Eq. 14) sets it to 1. Per dimension, nats."""
    log_var = (diffusion.fixed_large_log_variance if diffusion.variance == "fixed_large"
               else diffusion.posterior_log_variance_clipped)
    return diffusion.betas ** 2 / (2 * np.exp(log_var) * diffusion.alphas * (1 - diffusion.alphas_cumprod))


def training_losses(diffusion: Diffusion, model, x0, t, noise=None, loss: LossType = "simple",
                    weighting: Weighting = "constant", vlb_lambda: float = 1e-3):
    """Per-example loss of Algorithm 1 at timesteps t.

    simple: L_simple, Eq. (14): the MSE between the network output and its target (eps, x0 or v),
      mean over pixels, times lambda(t) when weighting == "vlb" (eps parameterisation only).
    vlb: T * L_t, an unbiased estimate of the bound without L_T (bits/dim).
    hybrid: L_simple + vlb_lambda * T * L_t with the mean stopped from the bound (Nichol & Dhariwal
      Eq. 16): only the learned variance learns from L_vlb.
    """
    check_choice("loss", loss, LossType)
    check_choice("weighting", weighting, Weighting)
    if weighting == "vlb" and diffusion.parameterization != "eps":
        raise ValueError("weighting='vlb' is the weight of the eps MSE: use parameterization='eps'")
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, t)
    pred, var_out = diffusion.split_output(output, x_t)
    if loss == "vlb":
        return diffusion.T * vlb_terms(diffusion, output, x0, x_t, t)
    target = diffusion.from_x0(x_t, t, x0, diffusion.parameterization)
    mse = mean_flat((target - pred) ** 2)
    if weighting == "vlb":
        mse = mse * _broadcast(diffusion.lambda_vlb, t, mse[:, None]).flatten()
    if loss == "simple":
        return mse
    frozen = pred.detach() if var_out is None else torch.cat([pred.detach(), var_out], dim=1)
    return mse + vlb_lambda * diffusion.T * vlb_terms(diffusion, frozen, x0, x_t, t)


class TimestepSampler:
    """t ~ Uniform{0..T-1}, or importance sampling p_t ~ sqrt(E[L_t^2]) from the last `history` losses
    of every t (improved DDPM, Section 3.3) once each t has them. Returns t and the weights 1/(T p_t)
    that keep the loss unbiased. Plain numpy state, saved with checkpoints."""

    def __init__(self, T: int, importance: bool = False, history: int = 10, uniform_prob: float = 1e-3):
        self.T, self.importance, self.uniform_prob = T, importance, uniform_prob
        self.losses = np.zeros((T, history))
        self.counts = np.zeros(T, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        if not self.importance or (self.counts < self.losses.shape[1]).any():
            return np.full(self.T, 1.0 / self.T)
        p = np.sqrt((self.losses ** 2).mean(axis=1))
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch: int, generator: torch.Generator | None = None, device="cpu"):
        if not self.importance:  # on the device, no host round trip
            t = torch.randint(0, self.T, (batch,), device=device, generator=generator)
            return t, torch.ones(batch, device=device)
        p = torch.from_numpy(self.probabilities()).to(device)
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (only used when importance sampling; it syncs with the device)."""
        if not self.importance:
            return
        for ti, li in zip(t.tolist(), losses.detach().float().tolist()):
            self.losses[ti] = np.roll(self.losses[ti], -1)
            self.losses[ti, -1] = li
            self.counts[ti] += 1

    def state_dict(self):
        return {"losses": self.losses.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state):
        self.losses, self.counts = state["losses"].copy(), state["counts"].copy()


@torch.no_grad()
def bits_per_dim(diffusion: Diffusion, model, x0, generator: torch.Generator | None = None,
                 callback: Callable[[dict], None] | None = None):
    """The full variational bound of Ho et al., Eq. (5), in bits/dim per example: L_T + sum_{t>1} L_{t-1}
    + L_0, each term evaluated at one x_t ~ q(x_t | x_0) (improved-diffusion's calc_bpd_loop).
    Returns total, prior (L_T), vb (sum of the KL terms), decoder (L_0), terms [B, T] and mse [B, T]
    (float64, on the CPU). callback({"i", "t"}) is called after each of the T evaluations."""
    B = x0.shape[0]
    terms = torch.zeros(B, diffusion.T, dtype=torch.float64, device=x0.device)  # on the device: no sync per t
    mse = torch.zeros_like(terms)
    for k, i in enumerate(range(diffusion.T - 1, -1, -1)):
        t = torch.full((B,), i, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        output = model(x_t, t)
        terms[:, i] = vlb_terms(diffusion, output, x0, x_t, t).double()
        pred, _ = diffusion.split_output(output, x_t)
        eps = diffusion.from_x0(x_t, t, diffusion.to_x0(x_t, t, pred, diffusion.parameterization), "eps")
        mse[:, i] = mean_flat((eps - noise) ** 2).double()
        if callback:
            callback({"i": k, "t": i})
    prior, terms, mse = prior_bpd(diffusion, x0).double().cpu(), terms.cpu(), mse.cpu()
    return {"total": prior + terms.sum(1), "prior": prior, "vb": terms[:, 1:].sum(1),
            "decoder": terms[:, 0], "terms": terms, "mse": mse}


# --------------------------------------------------------------------- sampling plans and samplers
# A sampler is a Plan: plain numpy arrays of per-step coefficients (Plan, space_timesteps, x0_coefficients,
# posterior_coefficients, ddim_sigma and ddim_coefficients live in export/onnx_sampler.py, which needs no
# torch). run_plan executes one in torch; the onnxruntime sampler and the C++ runner execute the same plan.

Sampler = Literal[onnx_sampler.SAMPLERS]  # ancestral | ddim | dpmpp2m | dpmpp2m-sde
Spacing = Literal[onnx_sampler.SPACINGS]  # uniform | linspace | trailing | quadratic | logsnr


def make_plan(diffusion: Diffusion, sampler: Sampler = "ancestral", steps: int | None = None,
              eta: float = 0.0, spacing: Spacing = "uniform", clip: bool = True, corrector_steps: int = 0,
              snr: float = 0.16) -> Plan:
    """The plan for `diffusion` of Algorithm 2 (ancestral, over all T steps or respaced, improved DDPM
    Section 4), DDIM with eta (Song et al. Eq. 12, 16), DPM-Solver++(2M) (dpmpp2m, Lu et al. 2022) or its
    SDE variant (dpmpp2m-sde), optionally with K = corrector_steps Langevin rows per timestep (Song et al.
    2021's predictor-corrector); steps defaults to T (ancestral) and min(50, T) (the others). See
    export/onnx_sampler.make_plan."""
    return onnx_sampler.make_plan(diffusion.alphas_cumprod, diffusion.parameterization, diffusion.variance,
                                  sampler, steps, eta, spacing, clip, corrector_steps, snr)


def ddim_inversion_plan(diffusion: Diffusion, steps: int | None = None, spacing: Spacing = "uniform") -> Plan:
    """Deterministic DDIM encoding x_0 -> x_T (Song et al., Section 4.3); decoding the result with the DDIM
    plan of the same steps reconstructs the data."""
    return onnx_sampler.ddim_inversion_plan(diffusion.alphas_cumprod, diffusion.parameterization, steps, spacing)


def ddim_reconstruct(model, diffusion: Diffusion, x0: torch.Tensor, steps: int | None = None,
                     spacing: Spacing = "uniform") -> torch.Tensor:
    """Encode x0 with DDIM inversion and decode the latent with DDIM (eta = 0) over the same `steps`
    timesteps (Song et al. Section 5.4, Table 2): the reconstruction, close to x0 for a good model."""
    latent = run_plan(model, ddim_inversion_plan(diffusion, steps, spacing), x0)
    return run_plan(model, make_plan(diffusion, "ddim", steps, spacing=spacing, clip=False), latent)


def slerp(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """Spherical interpolation between two latents, [len(alphas), *a.shape] (export/onnx_sampler.slerp)."""
    return torch.from_numpy(onnx_sampler.slerp(a.cpu().numpy(), b.cpu().numpy(), alphas)).to(a)


def guided_output(model, x, t, y, scale: float, null: int):
    """Classifier-free guidance (Ho & Salimans 2022) of a class-conditional model(x, t, y) in one call on the
    batch of 2B ([x; x], labels [y; null]): out_u + s (out_c - out_u) on the prediction channels (eps, x0 or v:
    the conversions are affine in the output, so this is the same guidance of eps), the variance channels of
    learned_range from the conditional half. s = 1 + w for their w."""
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = out.chunk(2)
    C = x.shape[1]
    return torch.cat([uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], dim=1)


def classifier_free_guidance(model, y: torch.Tensor, scale: float, null: int):
    """The model (x, t) -> output guided to the labels y with scale s (guided_output): s = 1 is the conditional
    model and s = 0 the unconditional one (the null label), each one call on the batch; any other s runs
    the two halves as one call on 2B."""
    def guided(x, t):
        if scale == 1 or scale == 0:
            return model(x, t, y if scale == 1 else torch.full_like(y, null))
        return guided_output(model, x, t, y, scale, null)
    return guided


def classifier_log_prob_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x log p_phi(y | x_t, t) of a noisy classifier classifier(x, t) -> logits (Dhariwal & Nichol 2021)."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x, t).float(), dim=-1)[torch.arange(len(y), device=x.device), y]
        return torch.autograd.grad(log_p.sum(), x)[0]


def classifier_guidance(model, diffusion: Diffusion, classifier, y: torch.Tensor, scale: float):
    """Dhariwal & Nichol's Algorithm 2 for DDIM-type samplers (ddim, dpmpp2m): the model (x, t) -> output whose
    eps is eps - g sqrt(1 - alpha_bar_t) grad log p_phi(y | x_t), returned in the model's parameterisation.
    For ancestral sampling use classifier_mean_shift (their Algorithm 1)."""
    def guided(x, t):
        out = model(x, t)
        pred, var_out = diffusion.split_output(out, x)
        eps = diffusion.from_x0(x, t, diffusion.to_x0(x, t, pred, diffusion.parameterization), "eps")
        eps = eps - scale * _broadcast(diffusion.sqrt_one_minus_alphas_cumprod, t, x) * classifier_log_prob_grad(
            classifier, x, t, y).to(x.dtype)
        pred = diffusion.from_x0(x, t, diffusion.to_x0(x, t, eps, "eps"), diffusion.parameterization)
        return pred if var_out is None else torch.cat([pred, var_out], dim=1)
    return guided


def classifier_mean_shift(classifier, y: torch.Tensor, scale: float):
    """Dhariwal & Nichol's Algorithm 1 for ancestral sampling, as run_plan's mean_shift: the mean of
    p(x_{t-1} | x_t) moves by g Sigma grad log p_phi(y | x_t)."""
    return lambda x, t, variance: scale * variance * classifier_log_prob_grad(classifier, x, t, y).to(x.dtype)


def numpy_noise(seed: int, device="cpu") -> Callable[[tuple], torch.Tensor]:
    """Noise from numpy.random.RandomState(seed).standard_normal as float32: the stream the onnxruntime
    sampler and the C++ runner reproduce (x_T first, then each step's z in order)."""
    rs = np.random.RandomState(seed)
    return lambda shape: torch.from_numpy(rs.standard_normal(shape).astype(np.float32)).to(device)


def torch_noise(generator: torch.Generator | None = None, device="cpu") -> Callable[[tuple], torch.Tensor]:
    """Noise from torch.randn with an explicit generator."""
    return lambda shape: torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def run_plan(model, plan: Plan, x: torch.Tensor, noise: Callable[[tuple], torch.Tensor] | None = None,
             callback: Callable[[dict], None] | None = None, mean_shift=None) -> torch.Tensor:
    """Execute a plan from x (x_T for sampling, data for DDIM inversion) and return the final x. Per row the
    arithmetic is a handful of fused elementwise ops on the device; no host synchronisation. The last
    plan.memory x0 predictions are kept for multistep rows (DPM-Solver++(2M)).
    callback({"i", "t", "x", "x0"}) is called after each row with the row's index, its timestep, the new
    x and the (clipped) x_0 prediction (new tensors at every row: keep them without copying).
    mean_shift(x_t, t, variance) -> tensor, if given, is added to the mean of every noisy row, with the row's
    variance Sigma (classifier guidance of ancestral sampling; torch only, it needs gradients)."""
    C, B, dev = x.shape[1], x.shape[0], x.device
    rows = zip(plan.t.tolist(), plan.x0_x.tolist(), plan.x0_o.tolist(), plan.mean_x0.tolist(),
               plan.mean_xt.tolist(), plan.sigma.tolist(), plan.log_var_min.tolist(),
               plan.log_var_max.tolist(), plan.add_noise.tolist(), plan.learned.tolist(), plan.mean_x0_prev.tolist())
    t_all = torch.as_tensor(plan.t, device=dev)
    earlier = [torch.zeros_like(x)] * plan.memory  # x0 of the previous rows, the latest first
    for k, (t, ax, ao, mx0, mxt, sigma, lo, hi, add, learned, weights) in enumerate(rows):
        x_t = x
        out = model(x, t_all[k].expand(B)).float()
        x0 = ax * x + ao * out[:, :C]
        if plan.clip:
            x0 = x0.clamp(-1.0, 1.0)
        x = mx0 * x0 + mxt * x
        for w, x0_j in zip(weights, earlier):
            x = x + w * x0_j
        if add:
            z = noise(x.shape)
            if learned:
                frac = (out[:, C:] + 1.0) * 0.5
                std = torch.exp(0.5 * (frac * hi + (1.0 - frac) * lo))
            if mean_shift is not None:
                x = x + mean_shift(x_t, t_all[k].expand(B), std ** 2 if learned else sigma ** 2)
            x = x + std * z if learned else x + sigma * z
        earlier = [x0, *earlier[:-1]] if earlier else earlier
        if callback:
            callback({"i": k, "t": t, "x": x, "x0": x0})
    return x


def sample(model, plan: Plan, shape: tuple, noise: Callable[[tuple], torch.Tensor] | None = None,
           callback: Callable[[dict], None] | None = None, mean_shift=None) -> torch.Tensor:
    """Draw x_T ~ N(0, I) of `shape` and run the plan: Algorithm 2, or DDIM (see make_plan).
    `noise` is a callable shape -> tensor (torch_noise(generator) or numpy_noise(seed))."""
    noise = noise or torch_noise()
    return run_plan(model, plan, noise(tuple(shape)), noise, callback, mean_shift)


# ---------------------------------------------------------------------------------------------- data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_digits_data(labels: bool = False):
    """scikit-learn's bundled 8x8 digits (17 grey levels 0..16) as uint8 [N, 1, 8, 8] on 0..255, split
    into 1437 training and 360 held-out images by a fixed permutation: (train, held_out), or with labels
    (train, held_out, train_labels, held_out_labels), the digit of each image as int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    order = np.random.RandomState(0).permutation(len(images))
    train, held = order[:-360], order[-360:]
    split = (images[train], images[held])
    return (*split, digits.target[train].astype(np.int64), digits.target[held].astype(np.int64)) if labels else split


@dataclasses.dataclass
class Data:
    """A data set's two splits: uint8 NCHW images and, where the data has them, int64 labels 0..K-1 with
    their class names (labels None and no classes otherwise)."""
    train: np.ndarray
    held_out: np.ndarray
    train_labels: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None
    classes: list = dataclasses.field(default_factory=list)


def _load_image_folder(path, image_size: int | None):
    """(images, labels, classes): labels from the first-level subfolder names, sorted (torchvision's
    ImageFolder), when every image sits in one; None and [] otherwise."""
    from PIL import Image
    from pathlib import Path
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no .png/.jpg/.jpeg images found (searched recursively)")
    images, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = "L" if im.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
                modes.add(mode)
                im = im.convert(mode)
        except OSError as e:
            raise UserError(f"{f}: unreadable image ({e})") from None
        if len(modes) > 1:
            raise UserError(f"{path}: mixed grey and colour images (first mismatch: {f}); use one mode")
        if image_size:
            s = image_size / min(im.size)  # resize the short side, then centre-crop a square
            im = im.resize((max(image_size, round(im.width * s)), max(image_size, round(im.height * s))),
                           Image.BICUBIC)
            left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        images.append(np.asarray(im, dtype=np.uint8))
    if len({a.shape for a in images}) > 1:
        raise UserError(f"{path}: images of different sizes; pass --image-size to resize and crop them")
    arr = np.stack(images)
    folders = [f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else None for f in files]
    classes = sorted(set(folders)) if None not in folders else []
    labels = np.array([classes.index(c) for c in folders], dtype=np.int64) if classes else None
    return (arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)), labels, classes


def _load_cifar_folder(path) -> Data:
    import pickle
    from pathlib import Path

    def read(name):
        with open(Path(path) / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)
    try:
        train = [read(f"data_batch_{i}") for i in range(1, 6)]
        held, held_labels = read("test_batch")
    except Exception as e:  # a foreign pickle fails in many ways
        raise UserError(f"{path}: not a readable cifar-10-batches-py folder ({type(e).__name__}: {e})") from None
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Data(np.concatenate([a for a, _ in train]), held, np.concatenate([y for _, y in train]), held_labels, classes)


def _load_npz(path):
    """(images, labels): uint8 images under arr_0 (or the first array), labels under arr_1 if there
    (the convention of OpenAI's sample files), else None."""
    try:
        with np.load(path) as f:
            arr = f["arr_0"] if "arr_0" in f else f[list(f.keys())[0]]
            labels = f["arr_1"] if "arr_0" in f and "arr_1" in f else None
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"{path}: not a readable .npz image array ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise UserError(f"{path}: expected uint8 images [N, H, W] or [N, H, W, C], got {arr.dtype} {arr.shape}")
    if labels is not None and (labels.shape != (len(arr),) or labels.dtype.kind not in "iu" or labels.min() < 0):
        raise UserError(f"{path}: arr_1 must hold one label >= 0 per image, got {labels.dtype} {labels.shape}")
    return (arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)), labels


def load_data(data: str = "digits", image_size: int | None = None) -> Data:
    """The splits of data: "digits", a folder of PNG/JPEG images (labelled by first-level subfolder), a
    cifar-10-batches-py folder, or a .npz file (uint8 NHWC under arr_0, labels under arr_1). Folders and
    .npz files keep their last 5% (at least 1 image) as the held-out split."""
    if data == "digits":
        return Data(*load_digits_data(labels=True), classes=[str(d) for d in range(10)])
    if not os.path.exists(data):
        raise UserError(f"{data}: no such file or folder (use 'digits', an image folder, a cifar-10-batches-py folder or a .npz)")
    if os.path.isdir(data) and os.path.exists(os.path.join(data, "data_batch_1")):
        return _load_cifar_folder(data)
    if os.path.isdir(data):
        arr, labels, classes = _load_image_folder(data, image_size)
    else:
        arr, labels = _load_npz(data)
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None else []
    held = max(1, len(arr) // 20) if len(arr) > 1 else 0
    split = (lambda a: (a[:-held], a[-held:])) if held else (lambda a: (a, a))  # noqa: E731
    train_labels, held_labels = split(labels) if labels is not None else (None, None)
    return Data(*split(arr), train_labels, held_labels, classes)


def load_dataset(data: str = "digits", image_size: int | None = None):
    """(train, held_out) uint8 NCHW numpy arrays of load_data(data, image_size)."""
    d = load_data(data, image_size)
    return d.train, d.held_out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (the bins of the discretized decoder are the 256 values)."""
    return images.float() / 127.5 - 1.0


def to_uint8(x):
    """[-1, 1] -> uint8 0..255 with clamping, the inverse of to_model_range (numpy or torch); the same
    rounding as the onnxruntime sampler and the C++ runner."""
    return onnx_sampler.to_uint8(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x)


# ---------------------------------------------------------------------------------- training (Alg. 1)

Device = Literal["auto", "cpu", "cuda"]
CHECKPOINT_FORMAT = "ddpm-reference-checkpoint-1"


def _option(default, help: str | None = None):
    """A TrainConfig field: its default and the help of its `ddpm train` option (the CLI is built from these)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint so that a run can be resumed or rebuilt.
    Each field is also an option of `ddpm train` (--batch-size for batch_size), with this default."""
    data: str = _option("digits", "'digits', an image folder, a cifar-10-batches-py folder, or a .npz")
    preset: str = _option("digits", "U-Net preset (see `ddpm info`)")
    image_size: int | None = _option(None, "resize and centre-crop folder images to this size")
    steps: int = _option(800, "optimizer steps in total (with --resume: the new total)")
    batch_size: int = _option(128)
    lr: float = _option(2e-3)
    warmup: int = _option(100, "linear learning-rate warm-up steps")
    weight_decay: float = _option(0.0)
    grad_clip: float = _option(1.0, "clip the gradient norm to this")
    accum: int = _option(1, "gradient accumulation: micro-batches per optimizer step")
    ema_decay: float = _option(0.998)
    schedule: str = _option("linear", "linear|cosine|quad|sigmoid|const|jsd")
    T: int = _option(1000, "diffusion steps")
    zero_terminal_snr: bool = _option(False, "rescale the schedule to alpha_bar_T = 0 (needs v or x0)")
    parameterization: str = _option("eps", "eps|x0|v")
    variance: str = _option("fixed_small", "fixed_small|fixed_large|learned_range")
    loss: str = _option("simple", "simple|vlb|hybrid")
    weighting: str = _option("constant", "constant|vlb")
    class_cond: bool = _option(False, "class-conditional eps_theta on the data's labels (for guidance)")
    p_uncond: float = _option(0.1, "with --class-cond: the probability of the null label (Ho & Salimans Alg. 1)")
    importance: bool = _option(False, "importance-sample t by the loss second moment")
    flip: bool = _option(False, "random horizontal flips")
    seed: int = _option(0)
    device: str = _option("auto", "auto|cpu|cuda")
    precision: str = _option("auto", "auto|fp32|bf16|fp16 autocast (auto: bf16 where the device runs it fast)")
    compile: bool = _option(False, "torch.compile the network")
    channels_last: bool = _option(False)
    checkpoint_every: int = _option(500)
    sample_every: int = _option(1000, "write a grid of DDIM samples every this many steps")
    log_every: int = _option(25, "check the loss for NaN and report it every this many steps")
    out: str = _option("runs/digits", "run folder: checkpoint.pt and samples-STEP.png")

    def validate(self) -> None:
        for name, kind in (("schedule", Schedule), ("parameterization", Parameterization), ("variance", Variance),
                           ("loss", LossType), ("weighting", Weighting), ("precision", Precision), ("device", Device)):
            check_choice(name, getattr(self, name), kind)
        for name in ("steps", "batch_size", "T", "accum", "checkpoint_every", "sample_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.variance == "learned_range" and self.loss == "simple":
            raise ValueError("learned_range variance needs loss 'hybrid' or 'vlb' (L_simple does not train it)")
        if not 0 <= self.ema_decay < 1 or self.lr <= 0:
            raise ValueError("ema_decay must be in [0, 1) and lr > 0")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")


def resolve_device(device: str) -> torch.device:
    check_choice("device", device, Device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def make_diffusion(cfg: TrainConfig) -> Diffusion:
    betas = beta_schedule(cfg.schedule, cfg.T)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Diffusion(betas, cfg.parameterization, cfg.variance)


def preset_config(preset: str) -> dict:
    """The U-Net keyword arguments of a preset (unet.PRESETS), or ValueError naming the presets."""
    if preset not in unet.PRESETS:
        raise ValueError(f"preset must be one of {', '.join(unet.PRESETS)}, got {preset!r}")
    return unet.PRESETS[preset]


def make_model(cfg: TrainConfig, image_shape, num_classes: int = 0):
    """The preset's U-Net for `image_shape` (C, H, W); 2C output channels for learned_range; class-conditional
    with num_classes labels (and the null label num_classes)."""
    C, H, _ = image_shape
    kwargs = dict(preset_config(cfg.preset), in_channels=C, image_size=H, num_classes=num_classes)
    kwargs["out_channels"] = 2 * C if cfg.variance == "learned_range" else C
    return unet.UNet(**kwargs)


def calibration_images(cfg: TrainConfig, n: int = 512) -> np.ndarray:
    """n training images of the run's data set (a fixed random choice), float32 NCHW in [-1, 1]: what an int8
    export is calibrated and checked on."""
    train_split = load_data(cfg.data, cfg.image_size).train
    pick = np.random.default_rng(0).permutation(len(train_split))[:n]
    return to_model_range(torch.from_numpy(train_split[pick])).numpy()


def save_checkpoint(path, state: dict) -> None:
    """torch.save, written atomically: a run killed while saving keeps its previous checkpoint."""
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu", expected: str = CHECKPOINT_FORMAT) -> dict:
    """A checkpoint written by `ddpm train` (or, with expected=CLASSIFIER_FORMAT, by `ddpm train-classifier`),
    or a UserError saying why it is not one."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # a foreign file can make the unpickler warn before it fails
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the weights-only unpickler of a foreign file raises IndexError, KeyError, ... as well
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable checkpoint (truncated or not written by torch.save): {first}") from None
    if not isinstance(state, dict) or state.get("format") != expected:
        what = "a classifier (write one with `ddpm train-classifier`)" if expected == CLASSIFIER_FORMAT else \
            "a ddpm checkpoint (write one with `ddpm train`)"
        raise UserError(f"{path}: not {what}")
    return state


def load_model(path, ema: bool = True, device="cpu"):
    """(model in eval mode, Diffusion, TrainConfig, image_shape) from a checkpoint, EMA weights by default.
    A class-conditional model's class names are model.class_names (empty for an unconditional one)."""
    state = load_checkpoint(path)
    cfg = TrainConfig(**{f.name: state["config"][f.name] for f in dataclasses.fields(TrainConfig)
                         if f.name in state["config"]})
    classes = list(state.get("classes", []))
    model = make_model(cfg, state["image_shape"], len(classes))
    model.load_state_dict(state["ema" if ema else "model"])
    model.class_names = classes
    return model.to(device).eval(), make_diffusion(cfg), cfg, tuple(state["image_shape"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (as Ho et al.)."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


def _rng_state(gen: torch.Generator) -> dict:
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_grid(model, diffusion: Diffusion, image_shape, path, n: int = 64, seed: int = 0, steps: int = 50,
              classes: int = 0):
    """A grid of n DDIM samples (eta = 0, `steps` steps) written as a PNG; for a model of `classes` classes,
    one row per class (conditional, no guidance)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    plan = make_plan(diffusion, "ddim", min(steps, diffusion.T))
    if classes:
        per = -(-n // classes)
        y = torch.as_tensor(balanced_labels(list(range(classes)), per * classes), device=device)
        model, n = classifier_free_guidance(model, y, 1.0, classes), per * classes
    x = sample(model, plan, (n, *image_shape), torch_noise(gen, device)).cpu().numpy()
    save_images(x, path, columns=-(-n // classes) if classes else None)


class Trainer:
    """The state of a run (network, EMA, optimizer, timestep sampler, RNG, step) and its optimizer step:
    Algorithm 1 with AdamW, warm-up, gradient clipping and accumulation, EMA, autocast and optional
    torch.compile / DDP. `ddpm train` and `ddpm bench train` both run Trainer.train_step."""

    def __init__(self, cfg: TrainConfig, image_shape, device: torch.device, rank: int = 0, ddp: bool = False,
                 classes: list | None = None):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.cfg, self.device, self.image_shape = cfg, device, tuple(image_shape)
        self.classes = list(classes or []) if cfg.class_cond else []
        if cfg.class_cond and not self.classes:
            raise UserError(f"--class-cond: {cfg.data} has no labels (an image folder needs one subfolder per "
                            "class; a .npz, labels under arr_1)")
        self.diffusion = make_diffusion(cfg)
        torch.manual_seed(cfg.seed + rank)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = make_model(cfg, image_shape, len(self.classes)).to(device, memory_format=self.memory_format)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ema.eval()  # only ever sampled from: no dropout, and no draws from the global RNG that training uses
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=device.type == "cuda")
        self.timesteps = TimestepSampler(self.diffusion.T, cfg.importance)
        self.gen = torch.Generator(device).manual_seed(cfg.seed + rank)
        net = torch.nn.parallel.DistributedDataParallel(self.model) if ddp else self.model
        self.net = torch.compile(net) if cfg.compile else net
        self.precision, why = resolve_precision(cfg.precision, device)
        self.precision_note = f"{self.precision} ({why})"  # what train reports
        self.autocast = AUTOCAST_DTYPE.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step = 0
        self.running = torch.zeros((), device=device)  # summed loss since the last report, kept on the device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a NaN/inf loss since the start

    def eps_theta(self, x_t, t, y=None):
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.net(x_t.contiguous(memory_format=self.memory_format), t, y).float()

    def train_step(self, data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One optimizer step on cfg.accum batches drawn from `data` (uint8 NCHW on the device; with class_cond,
        `labels` int64 on the device), without a host synchronisation: the loss is added to `running` and a
        non-finite loss sets `bad`. A class-conditional step replaces each label by the null label with
        probability p_uncond (Ho & Salimans 2022, Algorithm 1)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        for _ in range(cfg.accum):
            idx = torch.randint(0, len(data), (cfg.batch_size,), device=self.device, generator=self.gen)
            x0 = to_model_range(data[idx])
            if cfg.flip:
                flip = torch.rand(cfg.batch_size, device=self.device, generator=self.gen) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            t, weights = self.timesteps.sample(cfg.batch_size, self.gen, self.device)
            noise = torch.randn(x0.shape, device=self.device, generator=self.gen)
            model = self.eps_theta
            if self.classes:
                drop = torch.rand(cfg.batch_size, device=self.device, generator=self.gen) < cfg.p_uncond
                y = torch.where(drop, len(self.classes), labels[idx])
                model = lambda x_t, t_, y=y: self.eps_theta(x_t, t_, y)  # noqa: E731
            per_example = training_losses(self.diffusion, model, x0, t, noise, cfg.loss, cfg.weighting)
            loss = (per_example * weights).mean()
            self.scaler.scale(loss / cfg.accum).backward()
            self.timesteps.update(t, per_example)
            self.running += loss.detach() / cfg.accum
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.bad |= ~torch.isfinite(self.running)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update_parameters(self.model)
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "classes": self.classes, "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                "optimizer": self.opt.state_dict(),
                "timesteps": {k: torch.from_numpy(v) for k, v in self.timesteps.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.module.load_state_dict(state["ema"])
        self.ema.n_averaged.fill_(state["step"])
        self.opt.load_state_dict(state["optimizer"])
        self.timesteps.load_state_dict({k: v.numpy() for k, v in state["timesteps"].items()})
        self.step = state["step"]


def train(cfg: TrainConfig, resume: bool = False, callback: Callable[[dict], None] | None = None) -> dict:
    """Algorithm 1: repeat { x0 ~ q(x0), t ~ U, eps ~ N(0, I), gradient step on the loss } (Trainer), on
    every process under torchrun (DDP). Writes cfg.out/checkpoint.pt every checkpoint_every steps and at
    the end, and a sample grid every sample_every steps. callback({"step", "steps", "loss", "images_per_s"})
    is called on rank 0 once set up (loss None, and "precision": the precision chosen and why) and at each
    log step. Returns a summary."""
    cfg.validate()
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    ddp = world > 1
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available() and cfg.device != "cpu":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(cfg.device)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    os.makedirs(cfg.out, exist_ok=True)
    if not resume and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        cfg = TrainConfig(**{**state["config"], "steps": cfg.steps, "out": cfg.out})
    dataset = load_data(cfg.data, cfg.image_size)
    data = torch.from_numpy(dataset.train).to(device)  # whole dataset on the device: no loader in the hot loop
    labels = torch.from_numpy(dataset.train_labels).to(device) if cfg.class_cond and dataset.classes else None
    trainer = Trainer(cfg, dataset.train.shape[1:], device, rank, ddp, dataset.classes)
    if state is not None:
        trainer.load_state_dict(state)
        _set_rng_state(trainer.gen, state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])

    def checkpoint():
        rngs = [_rng_state(trainer.gen)]
        if ddp:  # every rank takes part in the gather; rank 0 writes
            import torch.distributed as dist
            rngs = [None] * dist.get_world_size()
            dist.all_gather_object(rngs, _rng_state(trainer.gen))
        if rank == 0:
            save_checkpoint(ckpt_path, {"format": CHECKPOINT_FORMAT, "version": __version__, "config": vars(cfg).copy(),
                                        "image_shape": list(trainer.image_shape), **trainer.state_dict(), "rng": rngs})

    losses, start_step, t0 = [], trainer.step, time.perf_counter()
    if callback and rank == 0:
        callback({"step": start_step, "steps": cfg.steps, "loss": None, "images_per_s": None,
                  "precision": trainer.precision_note})
    while trainer.step < cfg.steps:
        trainer.train_step(data, labels)
        step = trainer.step
        if step % cfg.log_every == 0 or step == cfg.steps or step % cfg.checkpoint_every == 0:
            if trainer.bad.item():  # checked here only: a per-step check would sync the device every step
                raise UserError(f"loss is NaN or inf before step {step}; the last good checkpoint "
                                f"({ckpt_path}) is kept. Lower --lr or use --precision fp32")
            losses.append((step, trainer.running.item() / (step - (losses[-1][0] if losses else start_step))))
            trainer.running.zero_()
            rate = (step - start_step) * cfg.batch_size * cfg.accum * world / (time.perf_counter() - t0)
            if callback and rank == 0:
                callback({"step": step, "steps": cfg.steps, "loss": losses[-1][1], "images_per_s": rate})
        t_io = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            save_grid(trainer.ema.module, trainer.diffusion, trainer.image_shape,
                      os.path.join(cfg.out, f"samples-{step}.png"), classes=len(trainer.classes))
        t0 += time.perf_counter() - t_io  # throughput counts training steps only
    elapsed = time.perf_counter() - t0
    if ddp:
        import torch.distributed as dist
        dist.destroy_process_group()
    return {"steps": trainer.step, "losses": losses, "seconds": elapsed, "checkpoint": ckpt_path,
            "precision": trainer.precision_note,
            "images_per_s": (trainer.step - start_step) * cfg.batch_size * cfg.accum * world / max(elapsed, 1e-9)}


CLASSIFIER_FORMAT = "ddpm-reference-classifier-1"


def make_classifier(cfg: TrainConfig, image_shape, num_classes: int):
    """The noisy classifier p_phi(y | x_t, t) of a preset: its U-Net's downsampling half and a pooled head."""
    C, H, _ = image_shape
    kwargs = {k: v for k, v in preset_config(cfg.preset).items() if k not in ("in_channels", "image_size")}
    return unet.NoisyClassifier(num_classes, in_channels=C, image_size=H, **kwargs)


def train_classifier(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> dict:
    """Train a noisy classifier for classifier guidance (Dhariwal & Nichol 2021): cross-entropy of the label
    of x_0 from x_t = q_sample(x_0, t, eps), t ~ U{0..T-1}, with AdamW, warm-up and gradient clipping, on
    cfg.data's labels and cfg's schedule. Writes cfg.out/classifier.pt at the end (atomically)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, cfg.image_size)
    if not data.classes:
        raise UserError(f"{cfg.data} has no labels to train a classifier on")
    diffusion = make_diffusion(cfg)
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg, data.train.shape[1:], len(data.classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, labels = torch.from_numpy(data.train).to(device), torch.from_numpy(data.train_labels).to(device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, len(images), (cfg.batch_size,), device=device, generator=gen)
        t = torch.randint(0, diffusion.T, (cfg.batch_size,), device=device, generator=gen)
        x0 = to_model_range(images[idx])
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, device=device, generator=gen))
        loss = torch.nn.functional.cross_entropy(model(x_t, t), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append((step + 1, loss.item()))
            if not math.isfinite(losses[-1][1]):
                raise UserError(f"classifier loss is NaN or inf at step {step + 1}; lower --lr")
            if callback:
                callback({"step": step + 1, "steps": cfg.steps, "loss": losses[-1][1],
                          "images_per_s": (step + 1) * cfg.batch_size / (time.perf_counter() - t0)})
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "classifier.pt")
    save_checkpoint(path, {"format": CLASSIFIER_FORMAT, "version": __version__, "config": vars(cfg).copy(),
                           "image_shape": list(data.train.shape[1:]), "classes": data.classes,
                           "model": model.state_dict()})
    return {"steps": cfg.steps, "losses": losses, "checkpoint": path}


def load_classifier(path, device="cpu"):
    """(classifier in eval mode, its TrainConfig, class names) from `ddpm train-classifier`'s file."""
    if str(path).endswith(".onnx"):
        raise UserError(f"{path}: classifier guidance needs the gradient of a torch classifier, not an .onnx file")
    state = load_checkpoint(path, expected=CLASSIFIER_FORMAT)
    cfg = TrainConfig(**state["config"])
    model = make_classifier(cfg, state["image_shape"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, list(state["classes"])


# ------------------------------------------------------------------------- measurement (fd, bench)

def digits_features():
    """A feature map for 8x8 digits: the 64-unit hidden layer of a small classifier trained on the
    training split, deterministically (fixed seed, full-batch, float64, CPU). The digits analogue of the
    Inception features of FID: it measures what this classifier sees, and nothing about other data.
    features.classify(images) is that classifier's digit for each image."""
    train, _, train_labels, _ = load_digits_data(labels=True)
    labels = torch.from_numpy(train_labels)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.nn.Linear(64, 64, dtype=torch.float64)
    head = torch.nn.Linear(64, 10, dtype=torch.float64)
    for layer in (hidden, head):
        torch.nn.init.normal_(layer.weight, std=0.1, generator=gen)
        torch.nn.init.zeros_(layer.bias)
    x = to_model_range(torch.from_numpy(train)).reshape(len(train), -1).double()
    opt = torch.optim.Adam([*hidden.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(torch.tanh(hidden(x))), labels)
        loss.backward()
        opt.step()

    def features(images_uint8: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            flat = to_model_range(torch.from_numpy(images_uint8)).reshape(len(images_uint8), -1).double()
            return torch.tanh(hidden(flat)).numpy()
    features.classify = lambda images_uint8: head(torch.from_numpy(features(images_uint8))).argmax(1).numpy()
    return features


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets;
    the trace of the root is the sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), which is symmetric."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def matmul_peak(dtype=torch.float32, device="cpu", n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n matrix product in dtype on the device (the best of `repeats` after a warm-up): the
    dense peak of this machine and precision, against which a network's achieved FLOP/s is read."""
    a = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return 2 * n ** 3 / min(_timed(lambda: a @ a, repeats, sync))


def _median_spread(times):
    return {"median_s": float(np.median(times)), "min_s": float(min(times)), "max_s": float(max(times))}


def _timed(fn, repeats: int, sync=lambda: None, bare=None):
    """Seconds of `repeats` calls of fn after one warm-up call. With `bare`, each repeat also times bare()
    right after fn(), and the pairs are returned: a shared machine drifts less within a pair."""
    fn()  # warm-up, excluded
    sync()
    times, bare_times = [], []
    for _ in range(repeats):
        for f, out in ((fn, times), (bare, bare_times))[:2 if bare else 1]:
            t0 = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t0)
    return (times, bare_times) if bare else times


def onnx_matmul_peak(precision: str = "fp32", n: int = 2048, repeats: int = 3, threads: int | None = None) -> float:
    """Operations/s of an n x n product in onnxruntime's CPU provider (the best of `repeats` after a warm-up):
    MatMul in float32 (fp16: float16), MatMulInteger (uint8 x int8 -> int32, the kernel under quantized
    Conv and MatMul) for int8. The peak an exported file's achieved FLOP/s is read against."""
    from onnx import TensorProto as TP, helper
    import onnxruntime as ort
    kind = {"fp32": (TP.FLOAT, TP.FLOAT, TP.FLOAT, "MatMul", np.float32, np.float32),
            "fp16": (TP.FLOAT16, TP.FLOAT16, TP.FLOAT16, "MatMul", np.float16, np.float16),
            "int8": (TP.UINT8, TP.INT8, TP.INT32, "MatMulInteger", np.uint8, np.int8)}[precision]
    a, b, c = (helper.make_tensor_value_info(name, kind[i], [n, n]) for i, name in enumerate("abc"))
    graph = helper.make_graph([helper.make_node(kind[3], ["a", "b"], ["c"])], "matmul", [a, b], [c])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what onnxruntime reads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 100, (n, n)).astype(kind[4]), "b": rng.integers(-100, 100, (n, n)).astype(kind[5])}
    return 2 * n ** 3 / min(_timed(lambda: session.run(None, feed), repeats))


def _ort_bench(onnx_path: str, provider: str, threads, batch: int, sampler: str, steps: int, repeats: int,
               precision: str, out: str) -> dict:
    """The onnxruntime rows' measurement, run by bench_sample in a process of its own: `repeats` timings
    (after a warm-up) of OnnxSampler.sample, the last samples saved to `out` (.npy), and the matmul peak
    of the file's precision."""
    from .export.onnx_sampler import OnnxSampler
    s = OnnxSampler(onnx_path, provider, threads)
    runs = [s.sample(batch, sampler, steps, return_timing=True) for _ in range(repeats + 1)][1:]
    np.save(out, runs[-1][0])
    return {"timings": [timing for _, timing in runs], "peak": onnx_matmul_peak(precision, threads=threads)}


def bench_sample(preset: str = "digits", batch: int = 64, backends=("torch", "ort", "cpp"), repeats: int = 3,
                 runs=(("ancestral", 1000), ("ddim", 50)), device: str = "auto", threads: int | None = None,
                 precisions=("auto",), checkpoint: str | None = None):
    """Images/s and network evaluations/s of each backend and precision for each (sampler, steps), the loop
    overhead (the loop's time / the time of the same number of bare network calls), and the achieved FLOP/s
    beside the matmul peak of the row's precision and library. torch runs fp32|bf16|fp16 (auto: see
    resolve_precision), onnxruntime and C++ an exported fp32|fp16|int8 file (auto: fp32).

    Without a checkpoint the weights are the preset's initialisation with a random output layer (speed does
    not depend on them) and int8 is calibrated on uniform noise images. With an (unconditional) checkpoint
    its EMA weights are timed, int8 is calibrated on its training images, and for 8x8 digits each row also
    gives the FD (see `ddpm fd`) of the `batch` images it sampled last: no speed without its quality."""
    import subprocess
    import sys
    import tempfile
    dev = resolve_device(device)
    if checkpoint:
        model, diffusion, cfg, image_shape = load_model(checkpoint, True)
        if model.class_names:
            raise UserError(f"{checkpoint} is class-conditional: bench sample times unconditional models")
        calibration = calibration_images(cfg)
    else:
        model = unet.build_unet(preset)
        torch.nn.init.normal_(model.conv_out.weight, std=0.01)  # zero-initialised: make the samples non-trivial
        diffusion = Diffusion(beta_schedule("linear", 1000))
        image_shape = (model.config["in_channels"], model.config["image_size"], model.config["image_size"])
        calibration = np.random.default_rng(0).uniform(-1, 1, (256, *image_shape)).astype(np.float32)
    model = model.to(dev).eval()
    shape = (batch, *image_shape)
    quality = _fd_of_samples() if checkpoint and tuple(image_shape) == (1, 8, 8) else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows, tmp = [], tempfile.mkdtemp()
    flops = unet.flops_per_forward(model)  # per image and network call
    x = torch.randn(shape, device=dev)
    t = torch.full((batch,), 500, device=dev, dtype=torch.long)
    provider = "cuda" if dev.type == "cuda" else "cpu"
    onnx_files, out = {}, os.path.join(tmp, "x.npy")

    def onnx_file(precision):
        if precision not in onnx_files:
            from .export.onnx_export import export_onnx
            onnx_files[precision] = os.path.join(tmp, f"model-{precision}.onnx")
            export_onnx(model.cpu(), diffusion, image_shape, onnx_files[precision], precision=precision,
                        calibration_images=calibration, check=False)
            model.to(dev)
        return onnx_files[precision]

    def row(backend, precision, sampler, steps, times, bare, where, peak, samples):
        r = _bench_row(backend, precision, sampler, steps, batch, times, bare, where, (flops, peak))
        return {**r, "fd": quality(samples)} if quality else r

    for backend in backends:
        if backend not in ("torch", "compile", "ort", "cpp"):
            raise ValueError(f"backends must be among torch, compile, ort, cpp, got {backend!r}")
        for precision in _backend_precisions(backend, precisions, dev):
            if backend in ("torch", "compile"):
                net = AtPrecision(model, precision)
                net = compile_for_sampling(net) if backend == "compile" else net
                peak, last = matmul_peak(AUTOCAST_DTYPE.get(precision, torch.float32), dev), []
                for sampler, steps in runs:
                    plan = make_plan(diffusion, sampler, steps)
                    gen = torch.Generator(dev).manual_seed(0)
                    times, bare = _timed(lambda: last.append(sample(net, plan, shape, torch_noise(gen, dev))), repeats,
                                         sync, bare=torch.no_grad()(lambda: [net(x, t) for _ in range(steps)]))
                    rows.append(row(backend, precision, sampler, steps, times, bare, str(dev), peak, last[-1]))
            elif backend == "ort":
                # In a process of its own, as the C++ runner: after torch has run, its OpenMP threads keep spinning
                # in this process and slow onnxruntime's (by 25% on 2 cores), which is not the sampler's cost.
                probe = ("import json, sys; from ddpm_reference import ddpm; "
                         "print(json.dumps(ddpm._ort_bench(*json.loads(sys.argv[1]))))")
                for sampler, steps in runs:  # the network's time inside the same loop (as the C++ runner reports it)
                    args = [onnx_file(precision), provider, threads, batch, sampler, steps, repeats, precision, out]
                    res = json.loads(subprocess.run([sys.executable, "-c", probe, json.dumps(args)], capture_output=True,
                                                    text=True, check=True).stdout.strip().splitlines()[-1])
                    times, bare = [r["total_s"] for r in res["timings"]], [r["network_s"] for r in res["timings"]]
                    rows.append(row(backend, precision, sampler, steps, times, bare, res["timings"][0]["provider"],
                                    res["peak"], np.load(out)))
            else:
                runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp_runner", "build", "ddpm_runner")
                if not os.path.exists(runner):
                    raise UserError(f"{runner} not built: run `make cpp` (or drop cpp from --backends)")
                peak = onnx_matmul_peak(precision, threads=threads)  # the C++ runner's library is onnxruntime's
                for sampler, steps in runs:
                    cmd = [runner, "--model", onnx_file(precision), "--n", str(batch), "--sampler", sampler,
                           "--steps", str(steps), "--json", "--out", out, "--provider", provider]
                    cmd += ["--threads", str(threads)] if threads else []
                    runs_json = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                                            .splitlines()[-1]) for _ in range(repeats + 1)][1:]
                    times, bare = [r["total_s"] for r in runs_json], [r["network_s"] for r in runs_json]
                    rows.append(row("cpp", precision, sampler, steps, times, bare, runs_json[0]["provider"], peak,
                                    np.load(out)))
    return rows


def _fd_of_samples():
    """samples (float in [-1, 1] or uint8, [N, 1, 8, 8]) -> their FD to the digits training split (`ddpm fd`)."""
    features = digits_features()
    ref = features(load_digits_data()[0])
    return lambda samples: frechet_distance(features(to_uint8(samples)), ref)


def _backend_precisions(backend: str, precisions, device: torch.device) -> list[str]:
    """The precisions of `precisions` that `backend` runs, auto resolved (torch: resolve_precision; an ONNX
    file: fp32), in order, once each."""
    torch_side = backend in ("torch", "compile")
    runs = ("fp32", "bf16", "fp16") if torch_side else ("fp32", "fp16", "int8")
    chosen = [(resolve_precision(p, device)[0] if torch_side else "fp32") if p == "auto" else p for p in precisions]
    for p in chosen:
        if p not in runs + ("int8", "bf16"):
            raise ValueError(f"precision must be among auto, fp32, bf16, fp16, int8, got {p!r}")
    return list(dict.fromkeys(p for p in chosen if p in runs))


def _bench_row(backend, precision, sampler, steps, batch, times, network_times, where, cost):
    """One report row; overhead is the median over repeats of loop time / network time of that repeat;
    cost = (FLOP per network call and image, the matmul peak FLOP/s of the row's precision) gives the
    achieved GFLOP/s and its share of that peak."""
    med = float(np.median(times))
    evals_per_s = batch * steps / med
    return {"backend": backend, "precision": precision, "sampler": sampler, "steps": steps, "batch": batch,
            "device": where,
            **_median_spread(times), "images_per_s": batch / med, "net_evals_per_s": evals_per_s,
            "network_s": float(np.median(network_times)),
            "overhead": float(np.median(np.array(times) / np.array(network_times))),
            "achieved_gflops": evals_per_s * cost[0] / 1e9, "of_matmul_peak": evals_per_s * cost[0] / cost[1]}


def bench_train(preset: str = "digits", batch: int = 64, precision: str = "auto", compile: bool = False,
                channels_last: bool = False, synthetic: bool = True, steps: int = 20, repeats: int = 3,
                device: str = "auto"):
    """Training images/s after warm-up (median of `repeats` timings of `steps` steps of Trainer.train_step,
    the step `ddpm train` runs, with the default TrainConfig otherwise), peak memory and the achieved
    FLOP/s, counting a training step as 3 forward passes (forward + backward), beside the matmul peak of the
    same precision on the same device (matmul_peak)."""
    import resource
    cfg = TrainConfig(preset=preset, batch_size=batch, precision=precision, compile=compile,
                      channels_last=channels_last, device=device)
    cfg.validate()
    dev = resolve_device(device)
    C, S = preset_config(preset)["in_channels"], preset_config(preset)["image_size"]
    if synthetic or preset != "digits":
        data = torch.randint(0, 256, (max(batch, 256), C, S, S), dtype=torch.uint8, device=dev)
    else:
        data = torch.from_numpy(load_digits_data()[0]).to(dev)
    trainer = Trainer(cfg, data.shape[1:], dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _timed(lambda: [trainer.train_step(data) for _ in range(steps)], repeats, sync)
    images_per_s = batch * steps / float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    flops = 3 * unet.flops_per_forward(trainer.model) * images_per_s
    dense = matmul_peak(AUTOCAST_DTYPE.get(trainer.precision, torch.float32), dev)
    return {"preset": preset, "batch": batch, "precision": trainer.precision, "compile": compile, "device": str(dev),
            **_median_spread([t / steps for t in times]), "images_per_s": images_per_s, "peak_memory_bytes": int(peak),
            "achieved_tflops": flops / 1e12, "matmul_peak_tflops": dense / 1e12, "of_matmul_peak": flops / dense}


# ---------------------------------------------------------------------------------------- command line

import contextlib  # noqa: E402  (the CLI is the last section; the library above needs neither typer nor rich)
import inspect  # noqa: E402
import typing  # noqa: E402

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Denoising Diffusion Probabilistic Models: train, sample, score, export.")
Opt = typer.Option
FD_TABLE_STEPS, FD_TABLE_ETAS = (10, 20, 50, 100, 1000), (0.0, 0.5, 1.0)


def _console():
    """Progress bars go to stderr: stdout carries results (tables, JSON) that users redirect."""
    from rich.console import Console
    return Console(stderr=True)


@contextlib.contextmanager
def _progress(description: str, total: int):
    """A transient progress bar on stderr; yields a callback that advances it by one (any arguments)."""
    from rich.progress import Progress
    with Progress(transient=True, console=_console()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda *_: bar.advance(task)


@contextlib.contextmanager
def _train_progress():
    """The training bar (it stays: it is the run's log), shown from train()'s first report on; yields
    train()'s callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=_console())
    task = None

    def report(r):
        nonlocal task
        if task is None:
            bar.start()
            name = f"train {r['precision'].split()[0]}" if "precision" in r else "train"
            task = bar.add_task(name, total=r["steps"], completed=r["step"], info="")
        info = "" if r["loss"] is None else f"loss {r['loss']:.4f}  {r['images_per_s']:.0f} img/s"
        bar.update(task, completed=r["step"], info=info)
    try:
        yield report
    finally:
        bar.stop()


PRECISION_OPT = Opt("auto", help="auto|fp32|bf16|fp16 of the network (auto: bf16 where the device runs it fast)")


COMPILE_OPT = Opt(False, help="torch.compile the network (inductor, frozen weights): a minute or so to compile, "
                              "then faster")


def _at_precision(model, precision: str, device: torch.device, compile: bool = False):
    """(the model in the asked precision (AtPrecision), compiled if asked; "bf16 (auto: why)", which the
    command prints with its result: printed before, it would make a later user error two lines)."""
    chosen, why = resolve_precision(precision, device)
    net = AtPrecision(model, chosen)
    return (compile_for_sampling(net) if compile else net), f"{chosen} ({why})"  # compiled: forwards .class_names


def _check_out(path: str, suffixes=(".png", ".npz")) -> str:
    if not path.lower().endswith(suffixes):
        raise UserError(f"--out {path}: must end in {' or '.join(suffixes)}")
    return path


def _samples_to_file(x: np.ndarray, out: str, columns: int | None = None, labels=None) -> None:
    try:
        save_images(x, out, columns, labels)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None


def _config_options(config) -> list[inspect.Parameter]:
    """A keyword-only typer option for every field of the dataclass `config`, with the field's type, default
    and help: the dataclass is the one place where an option and its default are written."""
    hints = typing.get_type_hints(config)
    params = []
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if hints[f.name] in (bool, bool | None) else flag
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                        default=Opt(f.default, decl, *f.metadata.get("aliases", ()),
                                                    help=f.metadata.get("help"))))
    return params


def _with_options(*configs):
    """Give a command `fn(..., **options)` the fields of the dataclasses `configs` as options."""
    def wrap(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = inspect.Signature(own + [p for c in configs for p in _config_options(c)])
        return fn
    return wrap


@dataclasses.dataclass
class SampleOptions:
    """The sampler of `sample`, `onnx-sample`, `fd` and the C++ runner (make_plan's arguments)."""
    sampler: str = _option("ancestral", "ancestral|ddim|dpmpp2m|dpmpp2m-sde")
    steps: int | None = _option(None, "network calls of the sampler (default T for ancestral, 50 for the others)")
    eta: float = _option(0.0, "DDIM's eta (ddim only)")
    spacing: str = _option("uniform", "uniform|linspace|trailing|quadratic|logsnr: the kept timesteps")
    clip: bool | None = _option(None, "clip the predicted x0 to [-1, 1] (default: on, or the .onnx file's)")
    corrector_steps: int = _option(0, "Langevin corrector steps per timestep (predictor-corrector; ancestral, ddim)")
    snr: float = _option(0.16, "the corrector's signal-to-noise ratio r: step size 2 (r sqrt(1 - alpha_bar))^2")


@app.command("train")
@_with_options(TrainConfig)
def train_cmd(*, resume: bool = Opt(False, help="continue OUT/checkpoint.pt"), **options):
    """Train eps_theta (Algorithm 1). Under torchrun it trains with DDP on every process."""
    cfg = TrainConfig(**options)
    with _train_progress() as callback:
        result = train(cfg, resume=resume, callback=callback)
    typer.echo(f"trained to step {result['steps']} in {result['precision']} ({result['images_per_s']:.0f} images/s); "
               f"final loss {result['losses'][-1][1]:.4f}; checkpoint {result['checkpoint']}")


@dataclasses.dataclass
class GuidanceOptions:
    """The classes and guidance of a class-conditional model (sample, onnx-sample, fd, the C++ runner)."""
    classes: str | None = dataclasses.field(default=None, metadata={
        "help": "a class or comma-separated classes (indices or names); default: every class, a row each",
        "aliases": ("--class",)})
    guidance: float = _option(1.0, "classifier-free guidance s: out_u + s (out_c - out_u); 1 conditional, 0 unconditional")


@app.command("train-classifier")
@_with_options(TrainConfig)
def train_classifier_cmd(**options):
    """Train a noisy classifier p_phi(y | x_t, t) on the data's labels, for `ddpm sample --classifier` (classifier
    guidance). Uses the options of train that apply: data, preset, schedule, T, steps, batch-size, lr, ..., out."""
    cfg = TrainConfig(**options)
    with _train_progress() as callback:
        result = train_classifier(cfg, callback)
    typer.echo(f"trained the classifier to step {result['steps']}; final loss {result['losses'][-1][1]:.4f}; "
               f"wrote {result['checkpoint']}")


def _torch_plan(diffusion: Diffusion, options: dict) -> Plan:
    plan = {f.name: options[f.name] for f in dataclasses.fields(SampleOptions)}
    return make_plan(diffusion, **{**plan, "clip": plan["clip"] is not False})


def _labels(class_names: list, classes: str | None, guidance: float, n: int) -> np.ndarray | None:
    """The n labels a command samples (a balanced sweep over the requested classes), or None for an
    unconditional model; UserError for labels or guidance it cannot take."""
    if not class_names:
        if classes is not None or guidance != 1.0:
            raise UserError("--class/--guidance need a class-conditional model (train one with --class-cond)")
        return None
    if classes is None:
        return balanced_labels(list(range(len(class_names))), n)
    wanted = []
    for c in classes.split(","):
        c = c.strip()
        index = class_names.index(c) if c in class_names else int(c) if c.lstrip("-").isdigit() else None
        if index is None or not 0 <= index < len(class_names):
            raise UserError(f"--class {c}: not a class of this model ({', '.join(class_names)}; or 0..{len(class_names) - 1})")
        wanted.append(index)
    return balanced_labels(wanted, n)


def _sample_batch(model, diffusion, plan, sampler, shape, labels, guidance, clf, scale, start, stop, noise, tick,
                  device):
    """Images start..stop of a `sample` run: classifier-free guidance for a conditional model, classifier
    guidance (Dhariwal & Nichol: the mean shift for ancestral rows, the eps shift for the others) with clf."""
    if clf is None:
        return sample(_guided(model, labels, guidance, start, stop, device), plan, (stop - start, *shape), noise,
                      tick).cpu()
    net = _guided(model, labels if model.class_names else None, guidance, start, stop, device)
    y = torch.as_tensor(labels[start:stop], device=device)
    if sampler == "ancestral":
        return sample(net, plan, (stop - start, *shape), noise, tick, classifier_mean_shift(clf[0], y, scale)).cpu()
    return sample(classifier_guidance(net, diffusion, clf[0], y, scale), plan, (stop - start, *shape), noise, tick).cpu()


def _row_per_class(labels) -> int | None:
    """Grid columns that put each class of balanced_labels on a row of its own (None: no labels)."""
    return None if labels is None else -(-len(labels) // len(set(labels.tolist())))


def _guided(model, labels, guidance: float, start: int, stop: int, device):
    """The model for images start..stop of a run (the labels of those), guided as asked."""
    if labels is None:
        return model
    y = torch.as_tensor(labels[start:stop], device=device)
    return classifier_free_guidance(model, y, guidance, len(model.class_names))


@app.command("sample")
@_with_options(SampleOptions, GuidanceOptions)
def sample_cmd(checkpoint: str, n: int = Opt(64, "--n", help="number of images"), seed: int = Opt(0),
               classifier: str = Opt(None, help="classifier guidance with this `ddpm train-classifier` file (torch only)"),
               classifier_scale: float = Opt(1.0, help="classifier guidance's g"),
               numpy_noise_: bool = Opt(False, "--numpy-noise", help="numpy RandomState noise: the stream of "
                                        "`onnx-sample` and the C++ runner"),
               ema: bool = Opt(True, help="EMA weights"), batch_size: int = Opt(256), device: str = Opt("auto"),
               precision: str = PRECISION_OPT, compile: bool = COMPILE_OPT,
               out: str = Opt("samples.png", help=".png grid or .npz (arr_0: uint8 NHWC; arr_1: labels)"), **options):
    """Sample images from a checkpoint: Algorithm 2, DDIM, DPM-Solver++(2M) (+SDE), with a corrector or not;
    a class-conditional model samples the requested classes, with classifier-free guidance."""
    _check_out(out)
    if checkpoint.endswith(".onnx"):
        raise UserError(f"{checkpoint} is an ONNX file: sample it with `ddpm onnx-sample` (classifier guidance, "
                        "which needs gradients, runs on checkpoints only)")
    dev = resolve_device(device)
    model, diffusion, cfg, shape = load_model(checkpoint, ema, dev)
    model, precision_note = _at_precision(model, precision, dev, compile)
    clf = load_classifier(classifier, dev) if classifier else None
    labels = _labels(model.class_names or (clf[2] if clf else []), options["classes"], options["guidance"], n)
    if clf and options["classes"] is None:
        raise UserError("--classifier guides to the classes of --class/--classes: give them")
    if clf and (clf[1].schedule, clf[1].T, clf[1].zero_terminal_snr) != (cfg.schedule, cfg.T, cfg.zero_terminal_snr):
        raise UserError(f"{classifier} was trained on the {clf[1].schedule} schedule with T = {clf[1].T}, the model "
                        f"on {cfg.schedule} with T = {cfg.T}: the noise levels must match")
    if clf and not model.class_names and options["guidance"] not in (0.0, 1.0):
        raise UserError("--guidance (classifier-free) needs a class-conditional model; --classifier-scale sets g")
    plan = _torch_plan(diffusion, options)
    noise = numpy_noise(seed, dev) if numpy_noise_ else torch_noise(torch.Generator(dev).manual_seed(seed), dev)
    with _progress("sampling", len(plan) * -(-n // batch_size)) as tick:
        xs = [_sample_batch(model, diffusion, plan, options["sampler"], shape, labels, options["guidance"], clf,
                            classifier_scale, i, min(n, i + batch_size), noise, tick, dev) for i in range(0, n, batch_size)]
    _samples_to_file(torch.cat(xs).numpy(), out, _row_per_class(labels), labels)
    typer.echo(f"wrote {n} samples ({options['sampler']}, {len(plan)} network calls, {precision_note}) to {out}")


@app.command("nll")
def nll_cmd(checkpoint: str, data: str = Opt(None, help="default: the checkpoint's data set"),
            n: int = Opt(360, "--n", help="held-out images to score"), batch_size: int = Opt(512),
            seed: int = Opt(0), ema: bool = Opt(True), device: str = Opt("auto"), precision: str = PRECISION_OPT,
            json_: bool = Opt(False, "--json", help="print JSON")):
    """Bits/dim of held-out data: the full variational bound (Eq. 5) and its terms."""
    dev = resolve_device(device)
    model, diffusion, cfg, shape = load_model(checkpoint, ema, dev)
    model, precision_note = _at_precision(model, precision, dev)
    dataset = load_data(data or cfg.data, cfg.image_size)
    held_out = dataset.held_out
    if tuple(held_out.shape[1:]) != shape:
        raise UserError(f"data images are {held_out.shape[1:]}, the model's are {shape}")
    x0 = to_model_range(torch.from_numpy(held_out[:n]))
    labels = dataset.held_out_labels[:n] if model.class_names and dataset.held_out_labels is not None else None
    gen = torch.Generator(dev).manual_seed(seed)
    with _progress("bits/dim", diffusion.T * -(-len(x0) // batch_size)) as tick:  # conditional: on the true labels
        parts = [bits_per_dim(diffusion, _guided(model, labels, 1.0, i, i + batch_size, dev),
                              x0[i:i + batch_size].to(dev), gen, tick) for i in range(0, len(x0), batch_size)]
    res = {k: torch.cat([p[k] for p in parts]).mean().item() for k in ("total", "prior", "vb", "decoder")}
    res["n"], res["precision"] = len(x0), precision_note
    typer.echo(json.dumps(res) if json_ else
               f"bits/dim {res['total']:.4f} on {res['n']} held-out images  (prior L_T {res['prior']:.2e}, "
               f"sum L_t-1 {res['vb']:.4f}, decoder L_0 {res['decoder']:.4f}; network in {precision_note})")


@app.command("export")
def export_cmd(checkpoint: str, out: str = Opt("model.onnx", help="the .onnx file to write"),
               opset: int = Opt(17), ema: bool = Opt(True, help="EMA weights"),
               precision: str = Opt("fp32", help="fp32|fp16|int8 (int8: static QDQ quantization, calibrated on "
                                                 "the checkpoint's training images)"),
               calibration: int = Opt(512, help="with int8: training images to calibrate and check on"),
               clip: bool = Opt(True, help="the file's default for clipping the predicted x0")):
    """Export eps_theta and its schedule to one self-describing ONNX file, checked against PyTorch."""
    from .export.onnx_export import export_onnx
    model, diffusion, cfg, shape = load_model(checkpoint, ema)
    images = calibration_images(cfg, calibration) if precision == "int8" else None
    report = export_onnx(model, diffusion, shape, out, opset=opset, precision=precision, calibration_images=images,
                         clip_denoised=clip, classes=model.class_names)
    rms = [c["relative_rms"] for c in report["checks"] if "relative_rms" in c]
    error = (f"relative RMS |onnxruntime - torch| = {max(rms):.3f} on {sum(c['batch'] for c in report['checks'])} "
             f"noisy training images not used to calibrate" if rms else
             f"max |onnxruntime - torch| = {report['max_abs_diff']:.2e} over {len(report['checks'])} checks")
    typer.echo(f"wrote {out} ({precision}, {report['size_bytes'] / 1e6:.1f} MB, opset {opset}, {report['exporter']} "
               f"exporter); {error} (tolerance {report['tolerance']:g})")


@app.command("onnx-sample")
@_with_options(SampleOptions, GuidanceOptions)
def onnx_sample_cmd(model: str, n: int = Opt(64, "--n"), seed: int = Opt(0), batch_size: int = Opt(256),
                    provider: str = Opt("auto", help="auto|cpu|cuda"), threads: int = Opt(None),
                    out: str = Opt("samples.png", help=".png grid or .npz (arr_0: uint8 NHWC; arr_1: labels)"),
                    **options):
    """Sample from an exported .onnx file with onnxruntime (no torch in the loop)."""
    _check_out(out)
    ort_sampler = _onnx_sampler(model, provider, threads)
    labels = _labels(ort_sampler.class_names, options.pop("classes"), options["guidance"], n)
    guidance = options.pop("guidance")
    plan = ort_sampler.plan(**options)
    with _progress("sampling", len(plan) * -(-n // batch_size)) as tick:
        x, timing = ort_sampler.run(plan, n, seed, batch_size, progress=tick, return_timing=True, labels=labels,
                                    guidance=guidance)
    _samples_to_file(x, out, _row_per_class(labels), labels)
    typer.echo(f"wrote {n} samples to {out}: {timing['steps']} network calls on {timing['provider']}, "
               f"{n / timing['total_s']:.1f} images/s, loop/network time {timing['total_s'] / timing['network_s']:.3f}")


def _onnx_sampler(model: str, provider: str = "cpu", threads: int | None = None) -> onnx_sampler.OnnxSampler:
    check_choice("provider", provider, Literal["auto", "cpu", "cuda"])
    return onnx_sampler.OnnxSampler(model, provider, threads)


class _Encoder:
    """DDIM encoding and decoding with a checkpoint (torch) or an .onnx file (onnxruntime), the same plans."""

    def __init__(self, model: str, device: str, data: str | None):
        if model.endswith(".onnx"):
            self.onnx = _onnx_sampler(model)
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


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} {text}: expected comma-separated whole numbers") from None
    return values


@app.command("reconstruct")
def reconstruct_cmd(model: str = typer.Argument(..., help="a checkpoint or an exported .onnx file"),
                    steps: str = Opt("10,20,50,100", help="comma-separated DDIM step counts S"),
                    n: int = Opt(360, "--n", help="held-out images"), data: str = Opt(None, help="default: the "
                                                                                           "checkpoint's data (digits for .onnx)"),
                    device: str = Opt("auto"), json_: bool = Opt(False, "--json")):
    """Encode held-out images with DDIM inversion, decode them, and print the per-dimension MSE in [0, 1]
    units for each S (the shape of Table 2 of Song et al.)."""
    enc = _Encoder(model, device, data)
    x = enc.images(slice(0, n))
    rows = []
    for S in _int_list(steps, "steps"):
        recon = enc.decode(enc.encode(x, S), S)
        rows.append({"steps": S, "mse": float((((recon - x) / 2) ** 2).mean()), "n": len(x)})
    if json_:
        typer.echo(json.dumps(rows))
        return
    typer.echo("| S | " + " | ".join(str(r["steps"]) for r in rows) + " |")
    typer.echo("|---" * (len(rows) + 1) + "|")
    typer.echo(f"| MSE per dimension, [0, 1] units, {len(x)} images | " + " | ".join(f"{r['mse']:.4g}" for r in rows) + " |")


@app.command("interpolate")
def interpolate_cmd(model: str = typer.Argument(..., help="a checkpoint or an exported .onnx file"),
                    a: int = Opt(0, "--a", help="index of the first held-out image"),
                    b: int = Opt(1, "--b", help="index of the second held-out image"),
                    seeds: str = Opt(None, help="A,B: interpolate between the x_T of these two seeds instead"),
                    n: int = Opt(8, "--n", help="images along the path, ends included"),
                    steps: int = Opt(50, help="DDIM steps"), data: str = Opt(None), device: str = Opt("auto"),
                    out: str = Opt("interpolation.png", help=".png grid or .npz")):
    """Slerp between the DDIM latents of two held-out images (or of two seeds' x_T) and decode each point
    (Song et al. Section 5.4)."""
    _check_out(out)
    if n < 2:
        raise UserError("--n must be at least 2")
    enc = _Encoder(model, device, data)
    if seeds:
        pair = _int_list(seeds, "seeds")
        if len(pair) != 2:
            raise UserError(f"--seeds {seeds}: expected two seeds A,B")
        latents = np.stack([np.random.RandomState(s).standard_normal(enc.shape) for s in pair]).astype(np.float32)
    else:
        for i in (a, b):
            if not 0 <= i < len(enc.held_out):
                raise UserError(f"image index {i} is out of range: the held-out split has {len(enc.held_out)} images")
        latents = enc.encode(enc.images([a, b]), steps)
    path = onnx_sampler.slerp(latents[0], latents[1], np.linspace(0, 1, n)).astype(np.float32)
    _samples_to_file(enc.decode(path, steps), out)
    typer.echo(f"wrote {n} images from {'seeds ' + seeds if seeds else f'held-out images {a} and {b}'} to {out}")


bench_app = typer.Typer(no_args_is_help=True, help="Speed: sampling per backend, training throughput.")
app.add_typer(bench_app, name="bench")


def _print_table(rows: list[dict], json_: bool) -> None:
    """Rows as JSON, or as a plain fixed-width table (it stays readable in a log or a narrow terminal)."""
    if json_:
        typer.echo(json.dumps(rows, indent=1))
        return
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(rows[0])]
    for line in [list(rows[0])] + cells:
        typer.echo("  ".join(c.rjust(w) for c, w in zip(line, widths)))


@bench_app.command("sample")
def bench_sample_cmd(checkpoint: str = Opt(None, help="time this checkpoint (and give each row's FD for digits) "
                                                         "instead of the preset's initial weights"),
                     preset: str = Opt("digits"), batch: int = Opt(64),
                     samplers: str = Opt("ancestral,ddim", help="comma-separated runs: ancestral (1000 steps), ddim (50), "
                                                                "dpmpp2m (10), dpmpp2m-sde (10)"),
                     steps: int = Opt(None, help="override every run's steps"),
                     backends: str = Opt("torch,ort,cpp", help="comma-separated: torch,compile,ort,cpp"),
                     precision: str = Opt("auto", help="comma-separated: fp32,bf16,fp16 (torch), fp32,fp16,int8 "
                                                       "(onnxruntime, C++); auto: bf16 where fast (torch), fp32 (ONNX)"),
                     repeats: int = Opt(3), device: str = Opt("auto"), threads: int = Opt(None, help="onnxruntime/C++ threads"),
                     json_: bool = Opt(False, "--json")):
    """Images/s, network evaluations/s, loop overhead (loop time / bare network time) and achieved FLOP/s
    against the matmul peak of the row's precision, for each sampler run (and FD with --checkpoint)."""
    default_steps = {"ancestral": 1000, "ddim": 50, "dpmpp2m": 10, "dpmpp2m-sde": 10}
    for name in samplers.split(","):
        check_choice("sampler", name, Literal["ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde"])
    runs = tuple((name, steps or default_steps[name]) for name in samplers.split(","))
    _print_table(bench_sample(preset, batch, tuple(backends.split(",")), repeats, runs, device, threads,
                              tuple(precision.split(",")), checkpoint), json_)


@bench_app.command("train")
def bench_train_cmd(preset: str = Opt("digits"), batch: int = Opt(64), precision: str = PRECISION_OPT,
                    compile: bool = Opt(False), channels_last: bool = Opt(False),
                    synthetic: bool = Opt(False, help="random data of the preset's shape (always for non-digits presets)"),
                    steps: int = Opt(20, help="steps per timing"), repeats: int = Opt(3), device: str = Opt("auto"),
                    json_: bool = Opt(False, "--json")):
    """Training images/s after warm-up, peak memory and achieved FLOP/s."""
    _print_table([bench_train(preset, batch, precision, compile, channels_last, synthetic, steps, repeats, device)], json_)


# The NFE table of BENCHMARKS.md: rows (name, sampler options, steps for each NFE column).
NFE_COLUMNS = (5, 10, 20, 50, 100, 1000)
NFE_ROWS = (("ancestral", {"sampler": "ancestral"}, NFE_COLUMNS),
            ("DDIM, eta = 0", {"sampler": "ddim"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M)", {"sampler": "dpmpp2m"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M), logsnr spacing", {"sampler": "dpmpp2m", "spacing": "logsnr"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M) SDE", {"sampler": "dpmpp2m-sde"}, NFE_COLUMNS[:-1]),
            ("PC: ancestral + 1 Langevin step", {"sampler": "ancestral", "corrector_steps": 1}, (3, 5, 10, 25, 50)))


@app.command("fd")
@_with_options(SampleOptions, GuidanceOptions)
def fd_cmd(source: str = typer.Argument(..., help="a checkpoint (samples are drawn) or a .npz of uint8 NHWC samples"),
           n: int = Opt(360, "--n", help="samples to draw from a checkpoint"),
           variance: str = Opt(None, help="override the sampler's variance"),
           table: bool = Opt(False, help="the DDIM table: S in 10,20,50,100,1000 x eta in 0,0.5,1, and ancestral "
                                         "with fixed_small and fixed_large, as a Markdown table"),
           nfe_table: bool = Opt(False, help="FD against network calls (NFE) for every sampler, as a Markdown table"),
           guidance_table: bool = Opt(False, help="a class-conditional model: class accuracy and FD for guidance "
                                                  "s = 0, 1, 2, 3 (and classifier guidance with --classifier)"),
           classifier: str = Opt(None, help="with --guidance-table: also classifier guidance with this classifier"),
           classifier_scale: str = Opt("1,2", help="with --guidance-table --classifier: the g values"),
           seed: int = Opt(0), device: str = Opt("auto"), precision: str = PRECISION_OPT, compile: bool = COMPILE_OPT,
           json_: bool = Opt(False, "--json"), **options):
    """Frechet distance to the digits training split in the features of a small digits classifier, with
    the real-vs-real floor (held-out vs training) to judge it by; for a class-conditional model (samples
    over all classes by default) also the share of samples that classifier assigns to the requested class."""
    features = digits_features()
    train, held = load_digits_data()
    ref = features(train)
    floor = frechet_distance(features(held), ref)
    if source.endswith(".npz"):
        arr, _ = _load_npz(source)
        if arr.shape[1:] != (1, 8, 8):
            raise UserError(f"{source}: expected 8x8 grey digits, got images of shape {arr.shape[1:]}")
        res = {"fd": frechet_distance(features(arr), ref), "floor": floor, "n": len(arr), "n_floor": len(held)}
        typer.echo(json.dumps(res) if json_ else f"FD {res['fd']:.3f} ({res['n']} samples vs the training split); "
                   f"real-vs-real floor {floor:.3f} ({len(held)} held-out images)")
        return
    dev = resolve_device(device)
    model, diffusion, _, shape = load_model(source, True, dev)
    if shape != (1, 8, 8):
        raise UserError(f"{source}: fd is defined for the 8x8 digits; this model makes {shape} images")
    model, note = _at_precision(model, precision, dev, compile)

    def fd_of(variance=None, clf=None, scale=1.0, **changes):
        d = Diffusion(diffusion.betas, diffusion.parameterization, variance) if variance else diffusion
        opts = {**options, **changes}
        plan = _torch_plan(d, opts)
        labels = _labels(model.class_names or (clf[2] if clf else []), opts["classes"], opts["guidance"], n)
        with _progress("sampling", len(plan)) as tick:
            x = _sample_batch(model, d, plan, opts["sampler"], shape, labels, opts["guidance"], clf, scale, 0, n,
                              torch_noise(torch.Generator(dev).manual_seed(seed), dev), tick, dev)
        pixels = to_uint8(x)
        accuracy = float((features.classify(pixels) == labels).mean()) if labels is not None else None
        return frechet_distance(features(pixels), ref), len(plan), accuracy

    if guidance_table:
        if not model.class_names and not classifier:
            raise UserError("--guidance-table needs a class-conditional model (or --classifier)")
        rows = {f"classifier-free, s = {g:g}": fd_of(guidance=g) for g in ((0.0, 1.0, 2.0, 3.0) if model.class_names else ())}
        if classifier:
            clf = load_classifier(classifier, dev)
            every_class = ",".join(map(str, range(len(clf[2]))))
            rows.update({f"classifier guidance of the unconditional model, g = {g}":  # the null label: s = 0
                         fd_of(clf=clf, scale=float(g), classes=every_class, guidance=0.0) for g in classifier_scale.split(",")})
        if json_:
            typer.echo(json.dumps({"rows": rows, "floor": floor, "n": n, "precision": note}))
            return
        typer.echo("| guidance | class accuracy | FD |\n|---|---|---|")
        for name, (fd, _, accuracy) in rows.items():
            typer.echo(f"| {name} | {100 * accuracy:.1f}% | {fd:.3f} |")
        typer.echo(f"\nreal-vs-real floor {floor:.3f}; {n} samples per row, an equal share of each class; "
                   f"network in {note}")
        return
    if nfe_table:
        rows = {name: [fd_of(**{**opts, "steps": s})[:2] for s in steps] for name, opts, steps in NFE_ROWS}
        _print_fd_table(rows, NFE_COLUMNS, "NFE", floor, n, json_, note)
    elif table:
        rows = {f"DDIM eta = {e:g}": [fd_of(sampler="ddim", steps=s, eta=e)[:2] for s in FD_TABLE_STEPS] for e in FD_TABLE_ETAS}
        rows.update({f"ancestral, {v}": [fd_of(v, sampler="ancestral", steps=diffusion.T)[:2]]
                     for v in ("fixed_small", "fixed_large")})
        _print_fd_table(rows, FD_TABLE_STEPS, "S", floor, n, json_, note)
    else:
        fd, _, accuracy = fd_of(variance)
        res = {"fd": fd, "floor": floor, "n": n, "n_floor": len(held), **({"class_accuracy": accuracy} if accuracy else {}),
               "precision": note}
        typer.echo(json.dumps(res) if json_ else f"FD {res['fd']:.3f} ({n} samples vs the training split, network in "
                   f"{note}); real-vs-real floor {floor:.3f} ({len(held)} held-out images)")


def _print_fd_table(rows: dict, columns: tuple, label: str, floor: float, n: int, json_: bool, note: str) -> None:
    typer.echo(json.dumps({"columns": columns, "label": label, "rows": rows, "floor": floor, "n": n, "precision": note})
               if json_ else fd_table_markdown(rows, columns, label, floor, n) + f"; network in {note}")


def fd_table_markdown(rows: dict, columns, label: str, floor: float, n: int) -> str:
    """rows: name -> [(fd, network calls)] filling the first columns (the last, for a row of one cell)."""
    lines = ["| sampler | " + " | ".join(f"{label} = {c}" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        cells = cells if len(cells) > 1 else [None] * (len(columns) - 1) + cells
        text = ["" if c is None else f"{c[0]:.3f}" + ("" if c[1] == col or label == "S" else f" ({c[1]})")
                for c, col in zip(cells + [None] * (len(columns) - len(cells)), columns)]
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    return "\n".join(lines) + (f"\n\nreal-vs-real floor (360 held-out vs training): {floor:.3f}; {n} samples per cell"
                               + ("; (k): the cell's network calls where they differ from its column" if label == "NFE" else ""))


@app.command("info")
def info_cmd(preset: str = Opt(None, help="one preset (default: all)")):
    """Parameters and FLOPs per forward pass of the U-Net presets."""
    names = [preset] if preset else list(unet.PRESETS)
    for name in names:
        model = unet.build_unet(name)
        c = model.config
        typer.echo(f"{name:12s} {c['in_channels']}x{c['image_size']}x{c['image_size']}  "
                   f"params {unet.count_parameters(model):,}  GFLOPs/forward {unet.flops_per_forward(model) / 1e9:.3f}")


def main(argv=None) -> None:
    """Entry point: user errors end in one line on stderr and exit status 2, with no traceback."""
    import sys
    from typer.exceptions import Abort, Exit, TyperException
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="ddpm", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Exit as e:
        sys.exit(e.exit_code)
    except Abort:
        sys.exit(130)
    except TyperException as e:  # usage errors: bad option, bad value, missing argument
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help())
            sys.exit(0)
        print(f"ddpm: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (UserError, ValueError) as e:
        print(f"ddpm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

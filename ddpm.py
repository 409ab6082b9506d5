"""Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020), exact and small.

Sections, in order: schedules -> Diffusion (forward process, posterior, parameterisations, variances)
-> losses and bits/dim -> sampling plans and samplers (Algorithm 2, DDIM, DPM-Solver++, guidance) ->
training (Algorithm 1). The sampling plan is built in plan.py (numpy), which every executor shares; this module
executes it in torch. Its users (data, fd, classifier, sampling, bench, cli) live beside it, never imported here.

Conventions. Timesteps are stored 0..T-1: index 0 is the paper's t=1 and index T-1 its t=T. Every
per-timestep table is numpy float64, computed once; it is cast to the working dtype only when it is
indexed for a batch. A "model" is any callable `model(x_t, t) -> output`; the U-Net of unet.py is one,
the closed-form oracles of the tests are others.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import time
import warnings
import weakref
from functools import cached_property
from typing import Callable, Literal, get_args

import numpy as np
import torch

from . import images, plan as plans, unet
from .precision import AUTOCAST_DTYPE, Precision, resolve_precision
from .images import save_images, write_atomically  # noqa: F401 (ddpm.save_images: the samples' file writer)
from .plan import (Plan, PlanOptions, balanced_labels, ddim_coefficients, ddim_sigma, dpmpp_2m_coefficients,  # noqa: F401
                   langevin_coefficients, log_snr, posterior_coefficients, space_timesteps, x0_coefficients)

__version__ = importlib.metadata.version("ddpm-reference")


class UserError(Exception):
    """A mistake the user can fix (bad path, bad file, bad option): one line, exit status 2."""


def check_choice(name: str, value, kind) -> None:
    """Raise ValueError naming the valid values when `value` is not one of the Literal `kind`."""
    if value not in get_args(kind):
        raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {value!r}")


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

Parameterization = Literal[plans.PARAMETERIZATIONS]  # eps | x0 | v
Variance = Literal[plans.VARIANCES]  # fixed_small | fixed_large | learned_range

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
Weighting = Literal["constant", "vlb", "min-snr"]


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


def min_snr_weights(diffusion: Diffusion, gamma: float) -> np.ndarray:
    """Min-SNR-gamma (Hang et al. 2023, Eq. 9): the x0 MSE weighted by min(SNR(t), gamma), SNR = ab / (1 - ab),
    written as the weight of the MSE of what the network predicts: min(SNR, gamma) / SNR for eps (whose MSE is
    SNR times x0's), min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
    snr = diffusion.alphas_cumprod / (1.0 - diffusion.alphas_cumprod)
    return np.minimum(snr, gamma) / {"eps": snr, "v": snr + 1.0, "x0": 1.0}[diffusion.parameterization]


def training_losses(diffusion: Diffusion, model, x0, t, noise=None, loss: LossType = "simple",
                    weighting: Weighting = "constant", vlb_lambda: float = 1e-3, snr_gamma: float = 5.0):
    """Per-example loss of Algorithm 1 at timesteps t.

    simple: L_simple, Eq. (14): the MSE between the network output and its target (eps, x0 or v),
      mean over pixels, times lambda(t) when weighting == "vlb" (eps parameterisation only), or times
      min_snr_weights when weighting == "min-snr".
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
    if weighting != "constant":
        w = diffusion.lambda_vlb if weighting == "vlb" else min_snr_weights(diffusion, snr_gamma)
        mse = mse * _broadcast(w, t, mse[:, None]).flatten()
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
# A sampler is a Plan: plain numpy arrays of per-step coefficients, built in plan.py (numpy, no torch).
# run_plan executes one in torch; the onnxruntime sampler and the C++ runner execute the same plan.

Sampler = Literal[plans.SAMPLERS]  # ancestral | ddim | dpmpp2m | dpmpp2m-sde | dpmpp3m | unipc
Spacing = Literal[plans.SPACINGS]  # uniform | linspace | trailing | quadratic | logsnr


def make_plan(diffusion: Diffusion, options: PlanOptions | Sampler | None = None, steps=None, **fields) -> Plan:
    """The plan for `diffusion` of Algorithm 2 (ancestral), DDIM, DPM-Solver++(2M) (+SDE) and (3M) or UniPC, with
    a Langevin corrector or not (plan.make_plan), for options as plan.plan_options takes them."""
    return plans.make_plan(diffusion.alphas_cumprod, diffusion.parameterization, diffusion.variance, options, steps,
                           **fields)


def ddim_inversion_plan(diffusion: Diffusion, steps: int | None = None, spacing: Spacing | None = None) -> Plan:
    """Deterministic DDIM encoding x_0 -> x_T (Song et al., Section 4.3): plan.ddim_inversion_plan."""
    return plans.ddim_inversion_plan(diffusion.alphas_cumprod, diffusion.parameterization, steps, spacing)


def ddim_reconstruct(model, diffusion: Diffusion, x0: torch.Tensor, steps: int | None = None,
                     spacing: Spacing | None = None) -> torch.Tensor:
    """Encode x0 with DDIM inversion and decode the latent with DDIM (eta = 0) over the same `steps`
    timesteps (Song et al. Section 5.4, Table 2): the reconstruction, close to x0 for a good model."""
    latent = run_plan(model, ddim_inversion_plan(diffusion, steps, spacing), x0)
    return run_plan(model, make_plan(diffusion, "ddim", steps, spacing=spacing, clip=False), latent)


def slerp(a: torch.Tensor, b: torch.Tensor, alphas) -> torch.Tensor:
    """Spherical interpolation between two latents, [len(alphas), *a.shape] (plan.slerp)."""
    return torch.from_numpy(plans.slerp(a.cpu().numpy(), b.cpu().numpy(), alphas)).to(a)


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
    plan.memory x0 predictions are kept for multistep rows (DPM-Solver++(2M) and (3M), UniPC).
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


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (the bins of the discretized decoder are the 256 values)."""
    return images.float() / 127.5 - 1.0


def dequantize(x0, width: float, generator=None):
    """Uniform dequantization: x0 + u, u ~ U(-width/2, width/2), reflected (x0 - u) where x0 + u would leave
    [-1, 1]; with width the data's smallest gap between grey levels, each value stays inside its own level."""
    u = (torch.rand(x0.shape, device=x0.device, generator=generator) - 0.5) * width
    return torch.where((x0 + u).abs() > 1, x0 - u, x0 + u)


def level_width(images: torch.Tensor) -> float:
    """The smallest gap between the grey levels present in uint8 images, in the model's range (2/255 for
    8-bit data with neighbouring levels; 15/127.5 for the digits' 17 levels)."""
    levels = torch.unique(images).float()
    return float(levels.diff().min()) / 127.5 if len(levels) > 1 else 0.0


def to_uint8(x):
    """[-1, 1] -> uint8 0..255 with clamping, the inverse of to_model_range (numpy or torch): images.to_uint8."""
    return images.to_uint8(x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x)


# ---------------------------------------------------------------------------------- training (Alg. 1)

Device = Literal["auto", "cpu", "cuda"]
CHECKPOINT_FORMAT = "ddpm-reference-checkpoint-1"


def _option(default, help: str, **cli):
    """A TrainConfig field: its default, and the help and range of its `ddpm train` option (cli: min, max, and
    flag where the option's name is not the field's; the CLI is built from these)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


Preset = Literal[tuple(unet.PRESETS)]
LRDecay = Literal["constant", "cosine"]


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint so that a run can be resumed or rebuilt.
    Each field is also an option of `ddpm train` (--batch-size for batch_size), with this default."""
    data: str = _option("digits", "'digits', an image folder, a cifar-10-batches-py folder, or a .npz")
    preset: Preset = _option("digits", "U-Net preset (see `ddpm info`)")
    image_size: int | None = _option(None, "resize and centre-crop folder images to this size", min=1)
    dropout: float | None = _option(None, "dropout of the U-Net's residual blocks (default: the preset's)", min=0.0,
                                    max=0.99)
    steps: int = _option(800, "optimizer steps in total (with --resume: the new total)", flag="--train-steps", min=1)
    batch_size: int = _option(128, "images per optimizer step (per process under torchrun)", min=1)
    lr: float = _option(2e-3, "AdamW learning rate after warm-up", min=1e-12)
    warmup: int = _option(100, "linear learning-rate warm-up steps", min=0)
    lr_decay: LRDecay = _option("constant", "the learning rate after warm-up: constant, or cosine decay to 0")
    weight_decay: float = _option(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = _option(1.0, "clip the gradient norm to this", min=1e-12)
    accum: int = _option(1, "gradient accumulation: micro-batches per optimizer step", min=1)
    ema_decay: float = _option(0.998, "decay of the exponential moving average of the weights", min=0.0, max=0.999999)
    ema_warmup: bool = _option(True, "warm the EMA's decay up as (1 + step) / (10 + step), capped at --ema-decay")
    schedule: Schedule = _option("cosine", "beta schedule (the paper: linear)")
    T: int = _option(1000, "diffusion steps T", flag="--diffusion-steps", min=1, max=100_000)
    zero_terminal_snr: bool = _option(True, "rescale the schedule to alpha_bar_T = 0 (needs v or x0; the paper: no)")
    parameterization: Parameterization = _option("v", "what the network predicts (the paper: eps)")
    variance: Variance = _option("fixed_small", "Sigma_theta of the reverse process")
    loss: LossType = _option("simple", "L_simple (Eq. 14), the bound, or L_hybrid")
    weighting: Weighting = _option("constant", "the MSE's weight over t: 1 (L_simple), lambda(t) of the bound, "
                                   "or Min-SNR-gamma")
    snr_gamma: float = _option(5.0, "with --weighting min-snr: gamma, where the weight min(SNR, gamma) saturates",
                               min=1e-6)
    dequantize: bool = _option(False, "add uniform noise one grey level of the data wide to its training images")
    class_cond: bool = _option(False, "class-conditional eps_theta on the data's labels (for guidance)")
    p_uncond: float = _option(0.1, "with --class-cond: the probability of the null label (Ho & Salimans Alg. 1)",
                              min=0.0, max=0.999999)
    importance: bool = _option(False, "importance-sample t by the loss second moment")
    flip: bool = _option(False, "random horizontal flips")
    seed: int = _option(0, "seed of the initial weights and of every random draw of training", min=0)
    device: Device = _option("auto", "auto: CUDA if available, else CPU")
    precision: Precision = _option("auto", "autocast precision (auto: bf16 where the device runs it fast)")
    compile: bool = _option(False, "torch.compile the network")
    channels_last: bool = _option(False, "channels-last memory format (faster convolutions on GPUs)")
    checkpoint_every: int = _option(500, "write OUT/checkpoint.pt every this many steps (and at the end)", min=1)
    sample_every: int = _option(1000, "write a grid of DDIM samples every this many steps", min=1)
    log_every: int = _option(25, "check the loss for NaN and report it every this many steps", min=1)
    out: str = _option("runs/digits", "run folder: checkpoint.pt and samples-STEP.png")

    def validate(self) -> None:
        for name, kind in (("schedule", Schedule), ("parameterization", Parameterization), ("variance", Variance),
                           ("loss", LossType), ("weighting", Weighting), ("precision", Precision), ("device", Device),
                           ("lr_decay", LRDecay)):
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


# What a resumed run may change: how long and how it trains, not what it trains.
RESUMABLE = ("steps", "batch_size", "lr", "lr_decay", "warmup", "weight_decay", "grad_clip", "accum", "ema_decay",
             "ema_warmup", "device", "precision", "compile", "channels_last", "checkpoint_every", "sample_every",
             "log_every", "out")


def option_flag(f: dataclasses.Field) -> str:
    """The `ddpm train` option of a TrainConfig field (--batch-size for batch_size, --train-steps for steps)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """UserError naming the first field outside RESUMABLE in which cfg differs from a checkpoint's config."""
    for f in dataclasses.fields(TrainConfig):
        if f.name not in RESUMABLE and f.name in saved and saved[f.name] != getattr(cfg, f.name):
            raise UserError(f"{option_flag(f)} {getattr(cfg, f.name)}: the run being resumed has {saved[f.name]!r}, and "
                            "a resumed run changes only how long and how it trains, not what (start a new run with "
                            "another --out)")


def resumed_config(saved: dict, given: dict) -> tuple[TrainConfig, list[str]]:
    """A resumed run's config: a checkpoint's `saved` one with the fields `given` by the user, checked
    (check_resumable), and what they change of how it trains, as "--flag old -> new"."""
    cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}, **given})
    check_resumable(saved, cfg)
    return cfg, [f"{option_flag(f)} {saved.get(f.name)} -> {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                 if f.name in given and f.name in RESUMABLE and f.name not in ("steps", "out")
                 and saved.get(f.name) != getattr(cfg, f.name)]


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


def make_model(cfg: TrainConfig, image_shape, num_classes: int = 0, unet_kwargs: dict | None = None):
    """The preset's U-Net for `image_shape` (C, H, W); 2C output channels for learned_range; class-conditional
    with num_classes labels (and the null label num_classes). unet_kwargs (a checkpoint's "unet", written by
    `ddpm import` for weights that are no preset) give the U-Net instead."""
    if unet_kwargs:
        return unet.UNet(**unet_kwargs)
    C, H, _ = image_shape
    kwargs = dict(preset_config(cfg.preset), in_channels=C, image_size=H, num_classes=num_classes)
    kwargs["out_channels"] = 2 * C if cfg.variance == "learned_range" else C
    kwargs["dropout"] = kwargs["dropout"] if cfg.dropout is None else cfg.dropout
    return unet.UNet(**kwargs)


def save_checkpoint(path, state: dict) -> None:
    """torch.save, written atomically: a run killed while saving keeps its previous checkpoint."""
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu", expected: str = CHECKPOINT_FORMAT,
                    what: str = "a ddpm checkpoint (write one with `ddpm train`)") -> dict:
    """A checkpoint written by `ddpm train` (or of another `expected` format, `what` the user is told it is not),
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
        raise UserError(f"{path}: not {what}")
    return state


def load_model(path, ema: bool = True, device="cpu"):
    """(model in eval mode, Diffusion, TrainConfig, image_shape) from a checkpoint, EMA weights by default; its
    class names (none: unconditional) and own plan (a student's: distilled for) are .class_names, .plan_options."""
    state = load_checkpoint(path)
    cfg = TrainConfig(**{f.name: state["config"][f.name] for f in dataclasses.fields(TrainConfig)
                         if f.name in state["config"]})
    classes = list(state.get("classes", []))
    model = make_model(cfg, state["image_shape"], len(classes), state.get("unet"))
    model.load_state_dict(state["ema" if ema else "model"])
    model.class_names = classes
    model.plan_options = PlanOptions(**state.get("plan", {}))
    return model.to(device).eval(), make_diffusion(cfg), cfg, tuple(state["image_shape"])


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """The EMA's decay at optimizer step `step` (the average starts as a copy of the weights after step 0):
    min(ema_decay, (1 + step) / (10 + step)) with the warm-up (diffusers' EMAModel), so that the average soon
    forgets the first, near-random weights: n steps into the warm-up they keep 10! (n + 1)! / (n + 10)! of it,
    where a constant decay d would keep d^n (0.998^800 = 20% after the default run)."""
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then constant (as Ho et al.), or with lr_decay "cosine"
    decayed to 0 at the last step as cfg.lr (1 + cos(pi p)) / 2, p the fraction of the steps after warm-up."""
    if cfg.lr_decay == "cosine" and step >= cfg.warmup:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))
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


def save_grid(model, diffusion: Diffusion, image_shape, path, options: PlanOptions, n: int = 64, seed: int = 0,
              classes: int = 0):
    """A PNG grid of n samples of the plan of `options`; a row per class for a model of `classes` classes."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    plan = make_plan(diffusion, options)
    if classes:
        per = -(-n // classes)
        y = torch.as_tensor(balanced_labels(list(range(classes)), per * classes), device=device)
        model, n = classifier_free_guidance(model, y, 1.0, classes), per * classes
    x = sample(model, plan, (n, *image_shape), torch_noise(gen, device)).cpu().numpy()
    save_images(x, path, columns=-(-n // classes) if classes else None)


class Trainer:
    """The state of a run (network, EMA, optimizer, timestep sampler, RNG, step) and its optimizer step:
    Algorithm 1 with AdamW, warm-up, gradient clipping and accumulation, EMA, autocast and optional
    torch.compile / DDP, for `ddpm train` and `ddpm bench train`; distill.Distiller has another loss and grid."""
    grid_options = PlanOptions("ddim")  # min(50, T) steps

    def __init__(self, cfg: TrainConfig, image_shape, device: torch.device, rank: int = 0, ddp: bool = False,
                 classes: list | None = None):
        from torch.optim.swa_utils import AveragedModel
        self.cfg, self.device, self.image_shape = cfg, device, tuple(image_shape)
        self.classes = list(classes or []) if cfg.class_cond else []
        if cfg.class_cond and not self.classes:
            raise UserError(f"--class-cond: {cfg.data} has no labels (an image folder needs one subfolder per "
                            "class; a .npz, labels under arr_1)")
        self.diffusion = make_diffusion(cfg)
        torch.manual_seed(cfg.seed + rank)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = make_model(cfg, image_shape, len(self.classes)).to(device, memory_format=self.memory_format)
        # The EMA calls back through a weak reference: a Trainer in a reference cycle would keep its DDP reducer, and
        # with it the process group and gloo's threads, alive until the interpreter's teardown, which then aborts.
        trainer = weakref.ref(self)
        self.ema = AveragedModel(self.model, multi_avg_fn=lambda ema, current, _: trainer()._ema_update(ema, current),
                                 use_buffers=True)
        self.ema.eval()  # only ever sampled from: no dropout, and no draws from the global RNG that training uses
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=device.type == "cuda")
        self.timesteps = TimestepSampler(self.diffusion.T, cfg.importance)
        self.gen = torch.Generator(device).manual_seed(cfg.seed + rank)
        # Under DDP the gradients are views of the all-reduce buckets and are zeroed, not freed, after a step: a
        # new gradient is accumulated into the bucket's layout, whatever strides a kernel gives it (a 1x1
        # convolution's weight gradient comes back channels-last from the CPU's kernels), without a copy.
        self.ddp = ddp
        for p in self.model.parameters() if ddp else ():  # DDP makes these the bucket views from the first step on
            p.grad = torch.zeros_like(p)
        net = torch.nn.parallel.DistributedDataParallel(self.model, gradient_as_bucket_view=True) if ddp else self.model
        self.net = torch.compile(net) if cfg.compile else net
        self.precision, why = resolve_precision(cfg.precision, device)
        self.precision_note = f"{self.precision} ({why})"  # what train reports
        self.autocast = AUTOCAST_DTYPE.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step, self.width = 0, None  # width: the data's grey-level gap, for cfg.dequantize
        self.running = torch.zeros((), device=device)  # summed loss since the last report, kept on the device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a NaN/inf loss since the start

    @torch.no_grad()
    def _ema_update(self, ema: list, current: list) -> None:
        """ema <- d ema + (1 - d) current with d = ema_decay_at(self.step) (the EMA's float tensors)."""
        torch._foreach_lerp_(ema, current, 1.0 - ema_decay_at(self.step, self.cfg))

    def eps_theta(self, x_t, t, y=None):
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.net(x_t.contiguous(memory_format=self.memory_format), t, y).float()

    def train_step(self, data: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """One optimizer step on cfg.accum batches drawn from `data` (uint8 NCHW on the device; with class_cond,
        `labels` int64 on the device), without a host synchronisation: the loss (self.loss) is added to `running`
        and a non-finite loss sets `bad`."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        for _ in range(cfg.accum):
            idx = torch.randint(0, len(data), (cfg.batch_size,), device=self.device, generator=self.gen)
            x0 = to_model_range(data[idx])
            if cfg.dequantize:
                self.width = level_width(data) if self.width is None else self.width
                x0 = dequantize(x0, self.width, self.gen)
            if cfg.flip:
                flip = torch.rand(cfg.batch_size, device=self.device, generator=self.gen) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            loss = self.loss(x0, labels[idx] if self.classes else None)
            self.scaler.scale(loss / cfg.accum).backward()
            self.running += loss.detach() / cfg.accum
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.bad |= ~torch.isfinite(self.running)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=not self.ddp)
        self.ema.update_parameters(self.model)
        self.step += 1

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Algorithm 1's loss on a batch x0 (training_losses at t ~ the timestep sampler, weighted by it)."""
        t, weights = self.timesteps.sample(len(x0), self.gen, self.device)
        noise = torch.randn(x0.shape, device=self.device, generator=self.gen)
        y = self.dropped(labels)
        per_example = training_losses(self.diffusion, lambda x_t, t_: self.eps_theta(x_t, t_, y), x0, t, noise,
                                      self.cfg.loss, self.cfg.weighting, snr_gamma=self.cfg.snr_gamma)
        self.timesteps.update(t, per_example)
        return (per_example * weights).mean()

    def dropped(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels with each replaced by the null label with probability p_uncond (Ho & Salimans Alg. 1)."""
        if labels is None:
            return None
        drop = torch.rand(len(labels), device=self.device, generator=self.gen) < self.cfg.p_uncond
        return torch.where(drop, len(self.classes), labels)

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


def train(cfg: TrainConfig, data, resume: bool = False, callback: Callable[[dict], None] | None = None,
          overwrite: bool = False, trainer=None) -> dict:
    """Algorithm 1: repeat { x0 ~ q(x0), t ~ U, eps ~ N(0, I), gradient step on the loss } (Trainer), on
    every process under torchrun (DDP), on `data` (data.Data: uint8 NCHW train images, and labels and class
    names for class_cond). Writes cfg.out/checkpoint.pt every checkpoint_every steps and at the end, and a
    sample grid every sample_every steps. resume continues cfg.out/checkpoint.pt with cfg (check_resumable);
    otherwise an existing checkpoint is an error unless overwrite (it is replaced at the first checkpoint).
    callback({"step", "steps", "loss", "images_per_s"}) is called on rank 0 once set up (loss None, and
    "precision": the precision chosen and why) and at each log step. trainer: makes the Trainer (default Trainer)."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _train(cfg, data, resume, callback, overwrite, 0, 1, trainer or Trainer)
    import torch.distributed as dist
    dist.init_process_group("nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        if torch.cuda.is_available() and cfg.device != "cpu":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return _train(cfg, data, resume, callback, overwrite, dist.get_rank(), world, trainer or Trainer)
    finally:  # on success and on error alike: a group left to the interpreter's teardown can abort the process
        dist.destroy_process_group()


def _start(cfg: TrainConfig, data, resume: bool, overwrite: bool, rank: int, world: int, make) -> tuple:
    """(the Trainer, a new run's or resumed from cfg.out/checkpoint.pt, and that path), or a UserError."""
    device = resolve_device(cfg.device)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    os.makedirs(cfg.out, exist_ok=True)
    if not resume and not overwrite and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, --overwrite to start it afresh, "
                        "or choose another --out")
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None and "optimizer" not in state:
        raise UserError(f"{ckpt_path} holds imported weights (`ddpm import`), not a run: there is nothing to resume")
    if state is not None:
        check_resumable(state["config"], cfg)
    trainer = make(cfg, data.train.shape[1:], device, rank, world > 1, data.classes)
    if state is not None:
        trainer.load_state_dict(state)
        if trainer.step >= cfg.steps:
            raise UserError(f"{ckpt_path} is at step {trainer.step}: resume to a larger total of steps")
        _set_rng_state(trainer.gen, state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    return trainer, ckpt_path


def _checkpoint(trainer: Trainer, path: str, rank: int, world: int) -> None:
    """Every rank's RNG state gathered (every rank takes part), the run written by rank 0."""
    rngs = [_rng_state(trainer.gen)]
    if world > 1:
        import torch.distributed as dist
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state(trainer.gen))
    if rank == 0:
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": __version__, "config": vars(trainer.cfg).copy(),
                               "image_shape": list(trainer.image_shape), **trainer.state_dict(), "rng": rngs})


def _train(cfg: TrainConfig, dataset, resume: bool, callback, overwrite: bool, rank: int, world: int, make) -> dict:
    """train's loop on this process (rank of world)."""
    trainer, ckpt_path = _start(cfg, dataset, resume, overwrite, rank, world, make)
    data = torch.from_numpy(dataset.train).to(trainer.device)  # all on the device: no loader in the hot loop
    labels = torch.from_numpy(dataset.train_labels).to(trainer.device) if trainer.classes else None
    losses, start_step, t0 = [], trainer.step, time.perf_counter()
    report = callback if callback and rank == 0 else (lambda r: None)
    report({"step": start_step, "steps": cfg.steps, "loss": None, "images_per_s": None,
            "precision": trainer.precision_note})
    images_per_step = cfg.batch_size * cfg.accum * world
    while trainer.step < cfg.steps:
        trainer.train_step(data, labels)
        step = trainer.step
        if step % cfg.log_every == 0 or step == cfg.steps or step % cfg.checkpoint_every == 0:
            if trainer.bad.item():  # checked here only: a per-step check would sync the device every step
                raise UserError(f"loss is NaN or inf before step {step}; the last good checkpoint "
                                f"({ckpt_path}) is kept. Lower --lr or use --precision fp32")
            losses.append((step, trainer.running.item() / (step - (losses[-1][0] if losses else start_step))))
            trainer.running.zero_()
            report({"step": step, "steps": cfg.steps, "loss": losses[-1][1],
                    "images_per_s": (step - start_step) * images_per_step / (time.perf_counter() - t0)})
        t_io = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _checkpoint(trainer, ckpt_path, rank, world)
        if rank == 0 and (step % cfg.sample_every == 0 or step == cfg.steps):
            save_grid(trainer.ema.module, trainer.diffusion, trainer.image_shape,
                      os.path.join(cfg.out, f"samples-{step}.png"), trainer.grid_options, classes=len(trainer.classes))
        t0 += time.perf_counter() - t_io  # throughput counts training steps only
    elapsed = time.perf_counter() - t0
    return {"steps": trainer.step, "losses": losses, "seconds": elapsed, "checkpoint": ckpt_path,
            "precision": trainer.precision_note,
            "images_per_s": (trainer.step - start_step) * images_per_step / max(elapsed, 1e-9)}

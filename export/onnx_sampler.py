# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""Sample from a DDPM exported by `ddpm export`, with numpy and onnxruntime only (no torch, no onnx).

This file is meant to be copied into an application as it is. It reads the schedule from the ONNX
file's metadata, builds the sampling plan of the README (section "The sampling plan and the ONNX file";
the project's one plan builder lives here, in numpy, and ddpm.make_plan calls it), and executes it:

    sampler = OnnxSampler("model.onnx")               # provider "auto": CUDA if it loads, else CPU
    x = sampler.sample(64, sampler="ddim", steps=50, seed=0)   # float32 [64, C, H, W] in about [-1, 1]
    save_images(x, "samples.png")

Each step runs the network, then a tiny second ONNX graph (built here, byte by byte, once per sampler and kind of row)
that applies the plan's update to x. Both run on the same execution provider with IO binding, so on
CUDA x never leaves the device between steps; on the CPU the same code path costs about 10 us per step
more than numpy would (batch 64 of 8x8 images), against ~20 ms for the network. The CUDA path relies on
onnxruntime synchronising the provider at the end of each run (its default), which also makes
network_s the real network time; it has the CPU path's tests, and a GPU test where CUDA loads. The noise is numpy.random.RandomState(seed).standard_normal, the stream the torch
sampler (ddpm.numpy_noise) and the C++ runner draw: on CUDA each step's z is drawn on the host and
copied to the device, one host->device copy per step, the price of bit-exact numpy noise.

An application that manages onnxruntime itself passes its own providers and session options:

    providers = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    sampler = OnnxSampler("model.onnx", providers=providers, session_options=my_options)  # .provider: the one used

The update graphs run on the network's providers (those of the list that loaded, with their options) and
take the threads, thread-pool, spinning and log settings of its session options, nothing else (an
optimized_model_filepath or profiling there is about the network). The sampler never changes onnxruntime's
global state (its default logger's level belongs to the application).

On a CPU the network can run on OpenVINO instead, in bfloat16 where the CPU has AVX512-BF16 or AMX (copy
openvino_engine.py beside this file; it needs the openvino package), with the same plan, noise and update graphs:

    sampler = OnnxSampler("model.onnx", engine="openvino")    # precision "auto": bf16 where fast; .why says why
"""
from __future__ import annotations

import _ctypes
import ctypes
import io
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable

import numpy as np
import onnxruntime as ort

SAMPLERS = ("ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde", "dpmpp3m", "unipc")
MULTISTEP = {"dpmpp2m": 1, "dpmpp2m-sde": 1, "dpmpp3m": 2, "unipc": 3}  # the multistep samplers' memory M
SPACINGS = ("uniform", "linspace", "trailing", "quadratic", "logsnr")
PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ENGINES = ("onnxruntime", "openvino")  # what runs the network (openvino: openvino_engine.py, the openvino package)
# The classifier-free guidance of a class-conditional model when none is given (the C++ runner's kDefaultGuidance):
# chosen from the guidance table of BENCHMARKS.md, where it is the scale of the best FD among those whose samples
# are the requested class at least 98% of the time.
DEFAULT_GUIDANCE = 1.0
PRECISIONS = ("fp32", "fp16", "int8")  # how an exported network computes (ddpm.precision); its inputs and output are float32
FORMAT = "1"


class ModelError(ValueError):
    """The file is not a DDPM model this sampler can run, or the requested provider cannot run it."""


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(str, valid))}, got {value!r}")


# ----------------------------------------------------------------------------------------- plan
# The one sampling plan of the project, in numpy so that this file needs no torch; ddpm.make_plan is this
# function given a Diffusion, and the C++ runner builds the same plan (its tests compare the two).

@dataclass
class Plan:
    """A sampler as plain data, in sampling order (row k calls the network at timestep t[k]). One row:
        x0 = clip?(x0_x * x + x0_o * out[:, :C])
        x  = mean_x0 * x0 + mean_xt * x + sum_j mean_x0_prev[k, j] * x0 of row k-1-j  (+ s * z when add_noise)
    with s = sigma, or s = exp((frac * log_var_max + (1 - frac) * log_var_min) / 2), frac = (out[:, C:] + 1) / 2,
    on the rows where `learned`. mean_x0_prev is [rows, M]: M = 0 for one-step samplers, 1 for DPM-Solver++(2M),
    2 for (3M), 3 for UniPC (MULTISTEP). The torch sampler, this file's sampler and the C++ runner all execute it;
    each keeps the last M x0 predictions between rows."""
    t: np.ndarray
    x0_x: np.ndarray
    x0_o: np.ndarray
    mean_x0: np.ndarray
    mean_xt: np.ndarray
    sigma: np.ndarray
    log_var_min: np.ndarray
    log_var_max: np.ndarray
    add_noise: np.ndarray
    learned: np.ndarray
    mean_x0_prev: np.ndarray
    clip: bool
    sampler: str = "custom"  # what made it: a name of SAMPLERS, "ddim-inversion", or "custom" for a hand-made plan

    def __len__(self):
        return len(self.t)

    @property
    def memory(self) -> int:
        """M: how many earlier x0 predictions a row reads."""
        return self.mean_x0_prev.shape[1]


# DPM-Solver needs a finite lambda: its samplers keep the timesteps with lambda >= LAMBDA_MIN, and the
# logsnr spacing spans lambda down to it at most (diffusers' lambda_min_clipped, the value recommended for
# the cosine schedule, whose clipped betas reach lambda = -9.9; Ho et al.'s linear schedule has
# lambda(T) = -5.06 and keeps all of its T steps).
LAMBDA_MIN = -5.1


def log_snr(ab: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = log(ab / (1 - ab)) / 2, with alpha = sqrt(ab) and sigma = sqrt(1 - ab), the
    time variable of DPM-Solver (Lu et al. 2022): +inf at ab = 1, -inf at ab = 0."""
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(ab) - np.log1p(-ab))


def space_timesteps(T: int, steps: int, spacing: str = "uniform", alphas_cumprod=None) -> np.ndarray:
    """The kept timestep indices, ascending, as the reference implementations choose them:
    uniform: i * (T // S) (DDIM's "uniform", diffusers' "leading"); linspace: round(linspace(0, T-1, S))
    (diffusers); trailing: round(T - i T/S) - 1 (Lin et al. 2023; always keeps T-1); quadratic:
    int(linspace(0, sqrt(0.8 T), S)^2) (DDIM); logsnr: for each of linspace(lambda_0, max(lambda_{T-1},
    LAMBDA_MIN), S) the timestep whose lambda is nearest (the first on a tie), raised to one above the previous
    one where they would coincide (near t = 0, where lambda falls fastest): uniform in lambda, as Lu et al.
    recommend (needs alphas_cumprod). round is numpy's, half to even. An error when the S timesteps are not
    distinct."""
    _choice("spacing", spacing, SPACINGS)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if steps == T:
        return np.arange(T, dtype=np.int64)
    if spacing == "uniform":
        ts = np.arange(steps) * (T // steps)
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, steps))
    elif spacing == "trailing":
        ts = np.round(T - np.arange(steps)[::-1] * (T / steps)) - 1
    elif spacing == "quadratic":
        ts = np.linspace(0, math.sqrt(0.8 * T), steps) ** 2
    else:
        lam = log_snr(np.asarray(alphas_cumprod, dtype=np.float64)[:T])
        ts = np.array([np.argmin(np.abs(lam - v)) for v in np.linspace(lam[0], max(lam[T - 1], LAMBDA_MIN), steps)])
        for i in range(1, steps):
            ts[i] = max(ts[i], ts[i - 1] + 1)
    ts = ts.astype(np.int64)
    if (np.diff(ts) <= 0).any() or ts[0] < 0 or ts[-1] > T - 1:
        raise ValueError(f"spacing {spacing!r} cannot give {steps} distinct steps for T={T}")
    return ts


def default_spacing(alphas_cumprod) -> str:
    """The spacing of a plan given none: trailing for a schedule that ends at zero SNR (alpha_bar_T = 0), whose
    sampler must start from T, which uniform never keeps (Lin et al. 2023, Section 3.3); uniform (DDIM's)
    otherwise."""
    return "trailing" if float(np.asarray(alphas_cumprod)[-1]) == 0.0 else "uniform"


def x0_coefficients(ab: np.ndarray, parameterization: str):
    """(a, b) with x0 = a x_t + b * output, for each parameterisation (Eq. 4 of Ho et al. solved for x_0;
    v = sqrt(ab) eps - sqrt(1 - ab) x0 of Salimans & Ho)."""
    if parameterization == "eps":
        return np.sqrt(1.0 / ab), -np.sqrt(1.0 / ab - 1.0)
    if parameterization == "v":
        return np.sqrt(ab), -np.sqrt(1.0 - ab)
    return np.zeros_like(ab), np.ones_like(ab)


def posterior_coefficients(ab: np.ndarray, ab_prev: np.ndarray):
    """(beta, beta-tilde, coefficient of x0, coefficient of x_t) of q(x_{t-1} | x_t, x_0), Eq. (6)-(7) of
    Ho et al., between consecutive kept steps (beta = 1 - ab / ab_prev: the respaced process)."""
    beta = 1.0 - ab / ab_prev
    return (beta, beta * (1.0 - ab_prev) / (1.0 - ab), beta * np.sqrt(ab_prev) / (1.0 - ab),
            (1.0 - ab_prev) * np.sqrt(1.0 - beta) / (1.0 - ab))


def ddim_sigma(ab: np.ndarray, ab_prev: np.ndarray, eta: float) -> np.ndarray:
    """sigma_t(eta) of DDIM, Song et al. Eq. (16): eta = 1 is the DDPM posterior standard deviation, eta = 0 none."""
    return eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))


def ddim_coefficients(ab: np.ndarray, ab_to: np.ndarray, sigma: np.ndarray):
    """DDIM's update, Song et al. Eq. (12), x_to = sqrt(ab_to) x0 + sqrt(1 - ab_to - sigma^2) eps + sigma z,
    with eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab) re-derived from the (clipped) x0: returns the
    coefficients of x0 and of x_t."""
    d = np.sqrt(np.maximum(1.0 - ab_to - sigma ** 2, 0.0))
    return np.sqrt(ab_to) - d * np.sqrt(ab) / np.sqrt(1.0 - ab), d / np.sqrt(1.0 - ab)


def dpmpp_2m_coefficients(ab: np.ndarray, ab_to: np.ndarray, r: np.ndarray, sde: bool):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; its SDE variant, Lu et al. Eq. (4.x) as diffusers'
    "sde-dpmsolver++" midpoint form) from ab to ab_to, with h = lambda_to - lambda and r = h_prev / h
    (r = inf: the first-order step, which is DDIM for the ODE and the ancestral DDPM step for the SDE).
    The x0 estimate is D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev. Returns the coefficients of x_t, x0, x0_prev and
    the noise's standard deviation:
        ODE: x_to = (sigma_to / sigma) x_t - alpha_to (e^-h - 1) D
        SDE: x_to = (sigma_to / sigma) e^-h x_t + alpha_to (1 - e^-2h) D + sigma_to sqrt(1 - e^-2h) z
    At ab_to = 1 (sigma_to = 0, h = inf) both return x_to = x0, and r must be inf there."""
    alpha_to, sigma_to, sigma = np.sqrt(ab_to), np.sqrt(1.0 - ab_to), np.sqrt(1.0 - ab)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = log_snr(ab_to) - log_snr(ab)
        weight = -np.expm1(-2.0 * h) if sde else -np.expm1(-h)  # 1 - e^-2h, or 1 - e^-h
        half_r = np.where(np.isinf(r), 0.0, 0.5 / r)
    mean_xt = sigma_to / sigma * (np.exp(-h) if sde else 1.0)
    noise = sigma_to * np.sqrt(weight) if sde else np.zeros_like(ab)
    return mean_xt, alpha_to * weight * (1.0 + half_r), -alpha_to * weight * half_r, noise


def langevin_coefficients(ab: np.ndarray, snr: float):
    """One Langevin corrector step at ab (Song et al. 2021, Algorithm 5), x' = x + e score + sqrt(2e) z with
    the score -(x - sqrt(ab) x0) / (1 - ab) = -eps / sqrt(1 - ab) and the step e = 2 (r sqrt(1 - ab))^2: Song
    et al.'s e = 2 (r ||z|| / ||score||)^2 with both norms at their expected values (sqrt(d) and
    sqrt(d / (1 - ab))), so it depends neither on the batch nor on the image size. Returns the coefficients
    of x_t and x0 and the noise's standard deviation: (1 - 2 r^2, 2 r^2 sqrt(ab), 2 r sqrt(1 - ab))."""
    return np.full_like(ab, 1.0 - 2.0 * snr ** 2), 2.0 * snr ** 2 * np.sqrt(ab), 2.0 * snr * np.sqrt(1.0 - ab)


def dpmpp_3m_coefficients(ab: np.ndarray, ab_to: np.ndarray, r0: np.ndarray, r1: np.ndarray):
    """DPM-Solver++(3M) (Lu et al. 2022, data prediction; diffusers' multistep_dpm_solver_third_order_update) from
    ab to ab_to, with h = lambda_to - lambda and r0 = h_0 / h, r1 = h_1 / h the two previous steps' h over h:
        D1_0 = (x0 - x0_1) / r0,  D1_1 = (x0_1 - x0_2) / r1
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1)
        x_to = (sigma_to / sigma) x_t - alpha_to phi_1 x0 + alpha_to phi_2 D1 - alpha_to phi_3 D2
    with phi_1 = e^-h - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2. Returns the coefficients of x_t, x0, x0_1
    (the previous row's x0) and x0_2 (the one before). D2 ~ h^2 x0'' / 2 and -phi_3 ~ h / 6 make its term half of
    the Taylor term alpha_to h^3 x0'' / 6 (as in diffusers and Lu et al.'s code): the method is second order."""
    alpha_to, sigma_to, sigma = np.sqrt(ab_to), np.sqrt(1.0 - ab_to), np.sqrt(1.0 - ab)
    h = log_snr(ab_to) - log_snr(ab)
    phi_1 = np.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    d1_0 = alpha_to * (phi_2 * (1.0 + r0 / (r0 + r1)) - phi_3 / (r0 + r1))  # the weights of D1_0 and D1_1
    d1_1 = alpha_to * (phi_3 / (r0 + r1) - phi_2 * r0 / (r0 + r1))
    return sigma_to / sigma, d1_0 / r0 - alpha_to * phi_1, d1_1 / r1 - d1_0 / r0, -d1_1 / r1


def _dpmpp_rows(ab_ts: np.ndarray, sampler: str):
    """(mean_xt, mean_x0, mean_x0_prev [S, M], sigma) of DPM-Solver++(2M), its SDE variant or (3M) over the kept
    timesteps ab_ts (ascending t), in sampling order, with the orders of diffusers' DPMSolverMultistepScheduler
    (lower_order_final=True, final_sigmas_type="zero", its defaults): the first step first order, the second
    second order (3M: then third order), the last step, to ab = 1, first order, and with 3M under 15 steps the
    step before it second order."""
    ab = ab_ts[::-1]
    S = len(ab)
    h = np.diff(np.append(log_snr(ab), np.inf))  # h[k] = lambda_{k+1} - lambda_k in sampling order; inf at the end
    order = np.minimum(np.arange(1, S + 1), 3 if sampler == "dpmpp3m" else 2)
    if 2 <= S < 15:
        order[-2] = min(order[-2], 2)
    order[-1] = 1
    h_1 = np.append(np.inf, h[:-1])  # the previous step's h, and the one before it
    h_2 = np.append(np.inf, h_1[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        r0 = np.where(order >= 2, h_1 / h, np.inf)  # inf: first order
        r1 = np.where(order == 3, h_2 / h, np.nan)
        ab_to = np.append(ab[1:], 1.0)
        mean_xt, mean_x0, prev_1, sigma = dpmpp_2m_coefficients(ab, ab_to, r0, sampler == "dpmpp2m-sde")
        third = dpmpp_3m_coefficients(ab, ab_to, r0, r1)
    if sampler != "dpmpp3m":
        return mean_xt, mean_x0, prev_1[:, None], sigma
    mean_x0, prev_1, prev_2 = (np.where(order == 3, a, b) for a, b in zip(third[1:], (mean_x0, prev_1, 0.0)))
    return mean_xt, mean_x0, np.stack([prev_1, prev_2], axis=1), sigma


def phi(z: float, k: int) -> float:
    """phi_k(z) = (e^z - sum_{m < k} z^m / m!) / z^k (phi_1(z) = (e^z - 1) / z), the exponential integrators'
    functions; as its series sum_m z^m / (m + k)! where |z| < 1, where the closed form loses digits."""
    if abs(z) >= 1.0:
        return (math.expm1(z) - sum(z ** m / math.factorial(m) for m in range(1, k))) / z ** k
    term, total = 1.0 / math.factorial(k), 0.0
    for m in range(1, 30):
        total += term
        term *= z / (m + k)
    return total


def unipc_coefficients(h: float, r: list, alpha_to: float, corrector: bool) -> np.ndarray:
    """One step of UniPC (Zhao et al. 2023; data prediction, B(h) = e^-h - 1, "bh2"; diffusers'
    multistep_uni_p_bh_update and multistep_uni_c_bh_update) from lambda to lambda_to = lambda + h, of order
    p = len(r) + 1, r_i = (lambda_i - lambda) / h for the earlier x0_i (i = 1..p-1, the latest first):
        x_to = (sigma_to / sigma) x_t - alpha_to (e^-h - 1) x0 - alpha_to B(h) sum_i rho_i D_i,  D_i = (x0_i - x0) / r_i
    UniP (the predictor) sums over i = 1..p-1; UniC (the corrector) also over D_0 = x0_to - x0 with r_0 = 1, x0_to
    predicted by the network at UniP's x_to. rho solves sum_i r_i^(k-1) rho_i = b_k = k! phi_{k+1}(-h) / phi_1(-h),
    k = 1..n, over its n r's, except UniP-2 and UniC-1 (n = 1), which take rho = 1/2. Returns the weights of x0_to
    (0 for UniP), x0, x0_1, ..., x0_{p-1}."""
    B = math.expm1(-h)
    weights = np.zeros(len(r) + 2)
    weights[1] = -alpha_to * B
    r = r + [1.0] if corrector else r
    if not r:
        return weights
    if len(r) == 1:
        rho = [0.5]
    else:
        b = [math.factorial(k) * phi(-h, k + 1) / phi(-h, 1) for k in range(1, len(r) + 1)]
        rho = np.linalg.solve(np.array([[ri ** k for ri in r] for k in range(len(r))]), b)
    for i, (ri, rho_i) in enumerate(zip(r, rho)):
        w = alpha_to * B * rho_i / ri
        weights[0 if corrector and i == len(r) - 1 else i + 2] -= w
        weights[1] += w
    return weights


def _unipc_rows(ab_ts: np.ndarray):
    """(mean_xt, mean_x0, mean_x0_prev [S, 3], sigma) of UniPC-3 over the kept timesteps ab_ts (ascending t), in
    sampling order, as diffusers' UniPCMultistepScheduler(solver_order=3) with its defaults (predict_x0=True,
    solver_type="bh2", lower_order_final=True, final_sigmas_type="zero"): step k has order min(3, k + 1, S - k),
    and from the second step on, UniC corrects x_k with the x0 that the network predicts at the uncorrected x_k,
    before UniP steps on from the corrected x_k. UniC and the UniP step before it both start from the corrected
    x_{k-1}, so x_k^c = x_k + (UniC - UniP weights) . (x0_k, x0_{k-1}, ...): a row is linear in x_k and
    x0_k..x0_{k-3}. Order 3 is diffusers' recommendation for unconditional sampling (2 for guided sampling),
    what this project's models mostly do."""
    ab = np.append(ab_ts[::-1], 1.0)
    S, lam, alpha, sigma = len(ab_ts), log_snr(ab), np.sqrt(ab), np.sqrt(1.0 - ab)
    order = [min(3, k + 1, S - k) for k in range(S)]

    def step(j: int, p: int, corrector: bool):  # from row j's x to row j + 1's
        h = lam[j + 1] - lam[j]
        return unipc_coefficients(h, [(lam[j - i] - lam[j]) / h for i in range(1, p)], alpha[j + 1], corrector)

    weights = np.zeros((S, 4))  # of x0_k, x0_{k-1}, x0_{k-2}, x0_{k-3}
    for k in range(S):
        weights[k, :order[k]] = step(k, order[k], False)[1:]
        if k:
            correction = step(k - 1, order[k - 1], True)
            correction[1:] -= step(k - 1, order[k - 1], False)[1:]
            weights[k, :order[k - 1] + 1] += sigma[k + 1] / sigma[k] * correction
    return sigma[1:] / sigma[:-1], weights[:, 0], weights[:, 1:], np.zeros(S)


def make_plan(alphas_cumprod, parameterization: str = "eps", variance: str = "fixed_small",
              sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0, spacing: str | None = None,
              clip: bool = True, corrector_steps: int = 0, snr: float = 0.16) -> Plan:
    """The plan (float64) for the schedule alpha_bar_1..T of: Algorithm 2 of Ho et al. (ancestral, over all T
    steps or on the process respaced to the kept steps, improved DDPM Section 4); DDIM with eta; DPM-Solver++(2M)
    (dpmpp2m), its SDE variant (dpmpp2m-sde), DPM-Solver++(3M) (dpmpp3m) or UniPC (unipc, order 3) over the kept
    timesteps with lambda >= LAMBDA_MIN. steps (network calls of the predictor) defaults to T for ancestral and
    min(50, T) otherwise, spacing to default_spacing. corrector_steps K adds K Langevin rows
    (langevin_coefficients, signal-to-noise ratio snr) at each kept timestep after the first, before its
    predictor row: Song et al.'s predictor-corrector sampler (with ancestral or ddim)."""
    _choice("sampler", sampler, SAMPLERS)
    _choice("parameterization", parameterization, PARAMETERIZATIONS)
    _choice("variance", variance, VARIANCES)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not {sampler}")
    if int(corrector_steps) != corrector_steps or corrector_steps < 0 or not snr > 0:
        raise ValueError(f"corrector_steps must be a whole number >= 0 and snr > 0, got {corrector_steps}, {snr}")
    multistep = sampler in MULTISTEP
    if corrector_steps and multistep:
        raise ValueError("the Langevin corrector runs with the one-step samplers (ancestral, ddim): a corrector "
                         f"row would replace the x0s that {sampler} keeps from its previous steps")
    ab_all = np.asarray(alphas_cumprod, dtype=np.float64)
    spacing = spacing or default_spacing(ab_all)
    T = int((log_snr(ab_all) >= LAMBDA_MIN).sum()) if multistep else len(ab_all)
    steps = steps or (T if sampler == "ancestral" else min(50, T))
    ts = space_timesteps(T, steps, spacing, ab_all)
    ab = ab_all[ts]
    ab_prev = np.append(1.0, ab[:-1])
    if multistep and not (np.diff(log_snr(ab)) < 0).all():
        raise ValueError(f"the kept timesteps' lambdas are not strictly decreasing ({spacing}, {steps} steps): "
                         "DPM-Solver's step h would be 0; use fewer steps or another spacing")
    x0_x, x0_o = x0_coefficients(ab, parameterization)
    beta, post_var, post_x0, post_xt = posterior_coefficients(ab, ab_prev)
    # beta-tilde_1 = 0: its log is clipped to beta-tilde_2, as in the original implementation.
    log_var_min = np.log(np.append(post_var[1] if steps > 1 else beta[0], post_var[1:]))
    prev = np.zeros((steps, 0))
    if sampler == "ancestral":
        mean_x0, mean_xt = post_x0, post_xt
        sigma = np.sqrt(beta if variance == "fixed_large" else post_var)
    elif sampler == "ddim":
        sigma = ddim_sigma(ab, ab_prev, eta)
        mean_x0, mean_xt = ddim_coefficients(ab, ab_prev, sigma)
    else:
        multistep_rows = _unipc_rows(ab) if sampler == "unipc" else _dpmpp_rows(ab, sampler)
        mean_xt, mean_x0, prev, sigma = (c[::-1] for c in multistep_rows)
    add_noise = (np.arange(steps) > 0) & (sampler in ("ancestral", "dpmpp2m-sde") or eta > 0)
    learned = np.full(steps, variance == "learned_range" and sampler == "ancestral")
    columns = [ts, x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, np.log(beta), add_noise, learned, prev]
    rows = [c[::-1].copy() for c in columns]  # sampling order
    if corrector_steps:
        rows = _with_corrector(rows, ab[::-1], parameterization, corrector_steps, snr)
    return Plan(*rows, clip=bool(clip), sampler=sampler)


def _with_corrector(rows: list, ab: np.ndarray, parameterization: str, K: int, snr: float) -> list:
    """The predictor rows (columns in sampling order, ab per row) with K Langevin rows at each row's timestep
    before it, from the second row on (x_T needs no correction)."""
    x0_x, x0_o = x0_coefficients(ab, parameterization)
    mean_xt, mean_x0, sigma = langevin_coefficients(ab, snr)
    corrector = [rows[0], x0_x, x0_o, mean_x0, mean_xt, sigma, 2 * np.log(sigma), 2 * np.log(sigma),
                 np.ones(len(ab), bool), np.zeros(len(ab), bool), np.zeros_like(rows[10])]
    order = [0] + [j for k in range(1, len(ab)) for j in [-k - 1] * K + [k]]  # -k-1: the corrector of row k
    return [np.stack([p[k] if k >= 0 else c[-k - 1] for k in order]) for p, c in zip(rows, corrector)]


def ddim_inversion_plan(alphas_cumprod, parameterization: str = "eps", steps: int | None = None,
                        spacing: str | None = None) -> Plan:
    """Deterministic DDIM encoding x_0 -> x_T (Song et al., Section 4.3): the data is taken as x at the
    first kept step, and each step runs Eq. (12) with eta = 0 forward, from t_k to t_{k+1}. Decoding the
    result with the DDIM plan of the same steps and spacing (default: default_spacing for both) reconstructs
    the data."""
    _choice("parameterization", parameterization, PARAMETERIZATIONS)
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    steps = steps or min(50, len(alphas_cumprod))
    ts = space_timesteps(len(alphas_cumprod), steps, spacing or default_spacing(alphas_cumprod), alphas_cumprod)
    ab = alphas_cumprod[ts]
    x0_x, x0_o = x0_coefficients(ab[:-1], parameterization)
    mean_x0, mean_xt = ddim_coefficients(ab[:-1], ab[1:], np.zeros(steps - 1))
    zeros, no = np.zeros(steps - 1), np.zeros(steps - 1, dtype=bool)
    return Plan(ts[:-1], x0_x, x0_o, mean_x0, mean_xt, zeros, zeros, zeros, no, no, np.zeros((steps - 1, 0)),
                clip=False, sampler="ddim-inversion")


def balanced_labels(classes, n: int) -> np.ndarray:
    """n labels over `classes` in equal blocks, classes[i // ceil(n / len(classes))]: a grid with
    ceil(n / len(classes)) columns shows one class a row."""
    per = -(-n // len(classes))
    return np.array([classes[i // per] for i in range(n)], dtype=np.int64)


def slerp(a: np.ndarray, b: np.ndarray, alphas) -> np.ndarray:
    """Spherical interpolation of two latents (Shoemake 1985; Song et al. Section 5.4 interpolate DDIM latents
    so): [len(alphas), *a.shape], sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b with theta the
    angle between a and b; Gaussian latents keep their norm along the way, where a straight line shrinks it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = np.asarray(alphas, np.float64).reshape(-1, *[1] * a.ndim)
    theta = np.arccos(np.clip((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
    if theta < 1e-7:  # (nearly) parallel: the straight line is the limit
        return (1 - w) * a + w * b
    return (np.sin((1 - w) * theta) * a + np.sin(w * theta) * b) / np.sin(theta)


# ------------------------------------------------------------------- the per-step update as ONNX

def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, value) -> bytes:
    """One protobuf field: int -> varint, str/bytes -> length-delimited, list -> repeated."""
    if isinstance(value, list):
        return b"".join(_field(number, v) for v in value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


# The update of the README's "Executing the plan", in the torch sampler's order of operations. c holds
# the row's coefficients as float32 (COEFFICIENTS, then the M weights of the earlier x0s); z is all zeros
# on rows that add no noise.
COEFFICIENTS = ("x0_x", "x0_o", "mean_x0", "mean_xt", "sigma", "log_var_min", "log_var_max", "lo", "hi", "one", "half")
_UPDATE = """Mul x0_x x -> a; Mul x0_o o -> b; Add a b -> x0u; Max x0u lo -> x0l; Min x0l hi -> x0
             Mul mean_x0 x0 -> m1; Mul mean_xt x -> m2; Add m1 m2 -> mean0"""
_LEARNED = """Add v one -> f1; Mul f1 half -> frac; Mul frac log_var_max -> p1; Sub one frac -> q
              Mul q log_var_min -> p2; Add p1 p2 -> p; Mul half p -> ph; Exp ph -> s"""


def step_graph(learned: bool, split_output: bool, memory: int = 0, guided: bool = False) -> bytes:
    """A serialised ONNX model (opset 17) of one plan row, x_next = update(x, out, z, c, x0_1..x0_M):
    x0 = clip(x0_x x + x0_o o), x_next = mean_x0 x0 + mean_xt x + w_1 x0_1 + ... + w_M x0_M + s z, with
    s = sigma, or Nichol & Dhariwal's Eq. (15) from the variance channels v when learned; o, v = the two
    halves of out when split_output, else o = out. With memory M > 0 it also outputs x0, the next row's x0_1.
    guided: out is [2B] (the conditional, then the unconditional half), o = o_u + scale (o_c - o_u) and v the
    conditional half's; it also outputs x_pair = [x_next; x_next], the network's next input."""
    weights = [f"w{j}" for j in range(1, memory + 1)]
    text = f"Split c -> {' '.join(COEFFICIENTS + tuple(weights))}; "
    if guided:
        text += "Halve out -> cond uncond; " + ("Split cond -> oc v; Split uncond -> ou vu; " if split_output else
                                                 "Identity cond -> oc; Identity uncond -> ou; ")
        text += "Sub oc ou -> gd; Mul scale gd -> gsd; Add ou gsd -> o; " + _UPDATE + ";"
    else:
        text += ("Split out -> o v; " if split_output else "Identity out -> o; ") + _UPDATE + ";"
    text += "".join(f"Mul {w} x0_{j} -> q{j}; Add mean{j - 1} q{j} -> mean{j};" for j, w in enumerate(weights, 1))
    text += (_LEARNED if learned else "Identity sigma -> s") + f"; Mul s z -> n; Add mean{memory} n -> x_next"
    text += "; Concat x_next x_next -> x_pair" if guided else ""
    nodes = []
    for statement in text.replace("\n", ";").split(";"):
        op, *inputs = statement.split("->")[0].split()
        outputs = statement.split("->")[1].split()
        # Split of a network output: channels (axis 1); Halve: the batch's two halves; Concat: along the batch
        axis = {"Halve": 0, "Concat": 0}.get(op, 1 if op == "Split" and inputs != ["c"] else None)
        op = "Split" if op == "Halve" else op
        attribute = [_field(1, "axis") + _field(3, axis) + _field(20, 2)] if axis is not None else []
        nodes.append(_field(1, inputs) + _field(2, outputs) + _field(4, op) + _field(5, attribute))

    def tensor(name, dims):  # ValueInfoProto of a float tensor; str dims are symbolic
        shape = _field(1, [_field(2 if isinstance(d, str) else 1, d) for d in dims])
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))
    image, output = ["B", "C", "H", "W"], ["B2" if guided else "B", "C_out", "H", "W"]
    inputs = [tensor("x", image), tensor("out", output), tensor("z", image),
              tensor("c", [len(COEFFICIENTS) + memory])] + [tensor(f"x0_{j}", image) for j in range(1, memory + 1)]
    inputs += [tensor("scale", [1])] if guided else []
    outputs = [tensor("x_next", image)] + ([tensor("x0", image)] if memory else [])
    outputs += [tensor("x_pair", ["B2", "C", "H", "W"])] if guided else []
    graph = _field(1, nodes) + _field(2, "ddpm_step") + _field(11, inputs) + _field(12, outputs)
    return _field(1, 8) + _field(8, _field(1, "") + _field(2, 17)) + _field(7, graph)


def step_coefficients(plan: Plan, k: int) -> np.ndarray:
    """The float32 vector c of row k, in COEFFICIENTS order (lo, hi = -1, 1 when clipping, else +-inf), then
    the row's M weights of the earlier x0 predictions."""
    lim = 1.0 if plan.clip else np.inf
    values = [getattr(plan, key)[k] for key in COEFFICIENTS[:7]] + [-lim, lim, 1.0, 0.5, *plan.mean_x0_prev[k]]
    return np.array(values, dtype=np.float32)


# ---------------------------------------------------------------------------------- the sampler

# The update graphs share the network's threads, thread pools and log levels; the rest of an app's session
# options concerns its network, and some would be wrong for a second graph (optimized_model_filepath would
# overwrite that file). Providers whose tensors live on a CUDA device take x as CUDA OrtValues.
_STEP_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "use_per_session_threads", "log_severity_level",
                 "log_verbosity_level")
_STEP_CONFIG = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
_CUDA_DEVICE = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _cuda_loads() -> bool:
    """Whether onnxruntime's CUDA provider library loads (CUDA, cuBLAS, the driver found), found out without a
    word on stderr. onnxruntime reports a provider library that fails to load on its global logger, which
    SessionOptions.log_severity_level does not reach (onnxruntime 1.31: the error and warning still print), and
    the global level has no getter to restore it from: it is the application's. So on Linux this repeats the
    two dlopen calls onnxruntime makes (the provider bridge with global symbols, then the provider; both
    RTLD_NOW, from the same folder) and closes them again. Elsewhere, or where the library is not where it
    looks, it answers True and onnxruntime's own attempt decides (and may print why it failed)."""
    folder = os.path.dirname(os.path.abspath(ort.capi.__file__))
    library = os.path.join(folder, "libonnxruntime_providers_cuda.so")
    if not sys.platform.startswith("linux") or not os.path.isfile(library) or "cuda-plugin-ep=" in ort.get_build_info():
        return True
    handles = []
    try:
        for path, mode in ((os.path.join(folder, "libonnxruntime_providers_shared.so"), os.RTLD_GLOBAL),
                           (library, os.RTLD_LOCAL)):
            handles.append(ctypes.CDLL(path, mode=mode)._handle)
        return True
    except OSError:
        return False
    finally:
        for handle in reversed(handles):
            _ctypes.dlclose(handle)  # POSIX only, as is this path


def _provider_name(entry) -> str | None:
    """The name in an entry of a providers list (a name, or a (name, options dict) pair); None if it is neither."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
        entry = entry[0]
    return entry if isinstance(entry, str) else None


def _providers(provider: str, providers) -> list:
    """The providers list for InferenceSession: an app's `providers`, checked, or the one `provider` names
    ("auto": CUDA then CPU where CUDA's library loads, else CPU alone)."""
    available = ort.get_available_providers()
    if providers is not None:
        if provider != "auto":
            raise ValueError(f"give provider or providers, not both (provider={provider!r}, providers={providers!r})")
        names = [_provider_name(p) for p in providers] if isinstance(providers, (list, tuple)) else []
        if not names or not all(name in available for name in names):
            raise ValueError("providers must be a non-empty list of provider names or (name, options dict) pairs, "
                             f"from those this onnxruntime has: {', '.join(available)}; got {providers!r}")
        return list(providers)
    _choice("provider", provider, ("auto", *PROVIDERS))
    cuda = PROVIDERS["cuda"] in available
    if provider == "cuda" and not cuda:
        raise ModelError("provider 'cuda' needs onnxruntime-gpu: this onnxruntime has no CUDAExecutionProvider "
                         "(use provider='cpu')")
    if provider == "cpu" or not cuda or (provider == "auto" and not _cuda_loads()):
        return [PROVIDERS["cpu"]]
    return [PROVIDERS["cuda"], PROVIDERS["cpu"]]


def _session_options(provider: str, threads: int | None, session_options):
    """An app's SessionOptions as given, or the sampler's: `threads` intra-op threads; errors only in the
    session's log under "auto", where a node left to the CPU (shape arithmetic) is the sampler's business."""
    if session_options is not None:
        if threads is not None:
            raise ValueError("give threads or session_options, not both: "
                             "set intra_op_num_threads on the SessionOptions")
        if not isinstance(session_options, ort.SessionOptions):
            raise ValueError("session_options must be an onnxruntime.SessionOptions, "
                             f"got {type(session_options).__name__}")
        return session_options
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if provider == "auto":
        options.log_severity_level = 3
    return options


def _step_options(options):
    """The update graphs' SessionOptions: the network's threads, thread pools and log levels (_STEP_OPTIONS)."""
    step = ort.SessionOptions()
    for name in _STEP_OPTIONS:
        setattr(step, name, getattr(options, name))
    for key in _STEP_CONFIG:
        try:
            step.add_session_config_entry(key, options.get_session_config_entry(key))
        except RuntimeError:  # not set there
            pass
    return step


class OnnxSampler:
    """A DDPM in an ONNX file written by `ddpm export`, ready to sample.

    provider: "auto" (CUDA if its library loads, else CPU; its sessions log errors only), "cpu" or "cuda"
    (ModelError if CUDA cannot be used). threads: onnxruntime's intra-op threads (None: its default).
    providers: an onnxruntime providers list as InferenceSession takes it (names, or (name, options dict) pairs,
    in order of preference), instead of `provider` (giving both is a ValueError); a provider that fails to load
    is skipped, as onnxruntime does, and one that raises is an error, never a silent fall back.
    session_options: an onnxruntime.SessionOptions for the network, used as given (with threads: a ValueError;
    set intra_op_num_threads on it). The per-step update graphs run on the same providers (see the module's
    docstring). engine: "onnxruntime", or "openvino" (the network on OpenVINO's CPU plugin, see openvino_engine.py;
    the update graphs on onnxruntime's CPU provider). precision: how the network computes; "auto" is the file's own
    (ddpm.precision) under onnxruntime, and bf16 under OpenVINO where the CPU has AVX512-BF16 or AMX, else fp32;
    "fp32" or "bf16" ask OpenVINO for that (a ModelError where the CPU cannot); OpenVINO runs an int8 file's
    quantized operations in int8 and reports precision "int8", the others at the precision asked. Attributes:
    provider (the one in use), precision and why (the reason for it), betas and alphas_cumprod (float64), T,
    parameterization, variance, image_shape (C, H, W), clip_denoised, metadata.
    """

    def __init__(self, path, provider: str = "auto", threads: int | None = None, *, providers=None,
                 session_options=None, engine: str = "onnxruntime", precision: str = "auto"):
        self.path = os.fspath(path)
        _choice("engine", engine, ENGINES)
        openvino = engine == "openvino"
        if openvino and (provider not in ("auto", "cpu") or providers is not None):
            raise ModelError("the openvino engine runs the network on the CPU: give provider 'auto' or 'cpu' and no "
                             "providers list")
        provider = "cpu" if openvino else provider
        options = _session_options(provider, threads, session_options)
        carried = providers is None and provider == "auto" and session_options is not None and \
            getattr(session_options, "has_providers", lambda: False)()  # chosen there by add_provider_for_devices
        wanted = None if carried else _providers(provider, providers)
        if not os.path.isfile(self.path):
            raise ModelError(f"{self.path}: no such file")
        if openvino:
            self._load_openvino(options, precision, threads)
        else:
            self._load(options, wanted, provider == "cuda", providers is not None or session_options is not None)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._read_metadata()
        self._check_signature()
        own = self.metadata.get("ddpm.precision", "fp32")
        if openvino and own == "int8":  # OpenVINO runs the quantized operations in int8, the others at its precision
            self.why = f"the file's ddpm.precision; its other operations {self.precision} ({self.why})"
            self.precision = "int8"
        elif not openvino:
            if precision not in ("auto", own):
                raise ModelError(f"precision {precision!r}: onnxruntime computes in the file's own precision ({own}); "
                                 "export the model at another precision, or use the openvino engine for bf16")
            self.precision, self.why = own, "the file's ddpm.precision"
        self._steps = {}  # (learned, memory, guided) -> the session of that row update, built once when first needed

    def _load_openvino(self, options, precision: str, threads: int | None) -> None:
        """The network on OpenVINO (openvino_engine.py, which needs the openvino package; ModelError without it),
        the update graphs on onnxruntime's CPU provider with the network's threads."""
        try:
            if __package__:
                from .openvino_engine import OpenVinoError, OpenVinoSession
            else:  # this file copied into an application, with openvino_engine.py beside it
                from openvino_engine import OpenVinoError, OpenVinoSession
        except ModuleNotFoundError as e:
            if e.name != "openvino":
                raise
            raise ModelError("the openvino engine needs the openvino package: pip install 'ddpm-reference[openvino]' "
                             "(or pip install openvino)") from None
        try:
            self.session = OpenVinoSession(self.path, precision, threads)
        except OpenVinoError as e:
            raise ModelError(str(e)) from None
        self.precision, self.why, self.provider = self.session.precision, self.session.why, self.session.provider
        self._providers, self._step_options = [PROVIDERS["cpu"]], _step_options(options)
        self._device, self._device_id = "cpu", 0

    def _load(self, options, wanted: list | None, cuda: bool, given: bool) -> None:
        """The network's session on the `wanted` providers (None: those of the options), ModelError where the
        file cannot be loaded or `cuda` was asked for and did not load; then what the update graphs run on:
        the entries of `wanted` that loaded (with their options), and the device of x."""
        try:
            # enable_fallback=0: onnxruntime's Python fallback would print to stdout and retry on the CPU alone
            self.session = ort.InferenceSession(self.path, options, providers=wanted, enable_fallback=0)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = ("cannot be loaded with these providers or session options" if given
                    else "is not a readable ONNX model")
            raise ModelError(f"{self.path} {what} ({reason[:200]})") from None
        used = self.session.get_providers()
        if cuda and used[0] != PROVIDERS["cuda"]:
            raise ModelError("provider 'cuda' requested but CUDAExecutionProvider failed to load (CUDA, cuDNN or a GPU "
                             "is missing; onnxruntime's message above says which); use provider='cpu'")
        self.provider = used[0]
        self._providers = [p for p in wanted if _provider_name(p) in used] if wanted else used
        self._step_options = _step_options(options)
        self._device = "cuda" if self.provider in _CUDA_DEVICE else "cpu"
        device_id = self.session.get_provider_options().get(self.provider, {}).get("device_id", "0")
        self._device_id = int(device_id) if self._device == "cuda" else 0

    def _meta(self, key: str) -> str:
        if key not in self.metadata:
            raise ModelError(f"{self.path} is not a DDPM model: missing metadata '{key}' "
                             "(export it with `ddpm export`)")
        return self.metadata[key]

    def _read_metadata(self) -> None:
        if self._meta("ddpm.format") != FORMAT:
            raise ModelError(f"{self.path}: ddpm.format {self.metadata['ddpm.format']!r} is not supported "
                             f"(this sampler reads format {FORMAT}; re-export the model)")
        try:
            self.betas = np.array([float(b) for b in self._meta("ddpm.betas").split(",")], dtype=np.float64)
            self.T = int(self._meta("ddpm.num_timesteps"))
            self.image_shape = tuple(int(s) for s in self._meta("ddpm.image_shape").split(","))
            self.num_classes = int(self.metadata.get("ddpm.num_classes", "0"))
            self.null_label = int(self.metadata.get("ddpm.null_label", str(self.num_classes)))
            self.class_names = [str(c) for c in json.loads(self.metadata.get("ddpm.class_names", "[]"))]
        except (ValueError, TypeError) as e:
            raise ModelError(f"{self.path}: malformed DDPM metadata ({e})") from None
        self.parameterization, self.variance = self._meta("ddpm.parameterization"), self._meta("ddpm.variance")
        clip, timestep = self._meta("ddpm.clip_denoised"), self.metadata.get("ddpm.timestep_dtype", "int64")
        checks = [
            (self.T == len(self.betas), f"ddpm.num_timesteps is {self.T} but there are {len(self.betas)} betas"),
            (((self.betas > 0) & (self.betas <= 1)).all(), "ddpm.betas must lie in (0, 1]"),
            (self.parameterization in PARAMETERIZATIONS, f"ddpm.parameterization {self.parameterization!r} is unknown"),
            (self.variance in VARIANCES, f"ddpm.variance {self.variance!r} is unknown"),
            (len(self.image_shape) == 3, f"ddpm.image_shape must be C,H,W, got {self.metadata['ddpm.image_shape']!r}"),
            (clip in ("true", "false"), f"ddpm.clip_denoised must be true or false, got {clip!r}"),
            (timestep == "int64", f"ddpm.timestep_dtype must be int64, got {timestep!r}"),
            (self.num_classes >= 0 and self.null_label == self.num_classes and len(self.class_names) == self.num_classes,
             "ddpm.num_classes K, ddpm.null_label K and K ddpm.class_names must agree"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ModelError(f"{self.path}: bad DDPM metadata: {problem}")
        self.clip_denoised = clip == "true"
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        if self.parameterization == "eps" and self.alphas_cumprod[-1] == 0.0:
            raise ModelError(f"{self.path}: zero terminal SNR needs the v or x0 parameterization, not eps")

    def _check_signature(self) -> None:
        """The graph must be eps_theta as the README specifies: x float32 [B,C,H,W], t int64 [B] (and y int64 [B]
        for a class-conditional model) -> model_output."""
        C, H, W = self.image_shape
        self.out_channels = 2 * C if self.variance == "learned_range" else C
        want = {"x": ("tensor(float)", [C, H, W]), "t": ("tensor(int64)", []),
                "model_output": ("tensor(float)", [self.out_channels, H, W])}
        if self.num_classes:
            want["y"] = ("tensor(int64)", [])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        have = {a.name: (a.type, a.shape[1:]) for a in inputs + outputs}

        def fits(name):
            dtype, dims = have.get(name, (None, None))
            return dtype == want[name][0] and len(dims) == len(want[name][1]) and all(
                not isinstance(d, int) or d == w for d, w in zip(dims, want[name][1]))

        names = (sorted(a.name for a in inputs), [a.name for a in outputs])
        expected = ["t", "x", "y"] if self.num_classes else ["t", "x"]
        if names != (expected, ["model_output"]) or not all(map(fits, want)):
            found = ", ".join(f"{a.name} {a.type} {a.shape}" for a in inputs + outputs)
            raise ModelError(f"{self.path} is not a DDPM eps_theta graph: expected inputs x float32 [B,{C},{H},{W}], "
                             f"t int64 [B]{' and y int64 [B]' if self.num_classes else ''} and output model_output "
                             f"float32 [B,{self.out_channels},{H},{W}]; found {found}")

    def plan(self, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0,
             spacing: str | None = None, clip: bool | None = None, corrector_steps: int = 0, snr: float = 0.16) -> Plan:
        """This model's plan (see make_plan); clip defaults to the file's ddpm.clip_denoised."""
        return make_plan(self.alphas_cumprod, self.parameterization, self.variance, sampler, steps, eta, spacing,
                         self.clip_denoised if clip is None else clip, corrector_steps, snr)

    def inversion_plan(self, steps: int | None = None, spacing: str | None = None) -> Plan:
        """DDIM encoding x_0 -> x_T (see ddim_inversion_plan); decode with plan("ddim", steps, clip=False)."""
        return ddim_inversion_plan(self.alphas_cumprod, self.parameterization, steps, spacing)

    def sample(self, n: int, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0,
               spacing: str | None = None, clip: bool | None = None, seed: int = 0, batch: int | None = None,
               progress: Callable[[int, int], None] | None = None, return_timing: bool = False,
               corrector_steps: int = 0, snr: float = 0.16, labels=None, guidance: float | None = None):
        """n samples, float32 [n, C, H, W], drawn in batches of `batch` (default: all at once) from one
        RandomState(seed) stream: each batch in order draws x_T, then each noisy row's z. progress(k, K)
        is called after every network call (K = rows x number of batches). With return_timing, returns
        (x, {"total_s", "network_s", "steps", "provider", "precision", "precision_why"}); network_s is the time
        inside the network's runs.
        labels (n ints, a class-conditional model) and guidance: see run."""
        plan = self.plan(sampler, steps, eta, spacing, clip, corrector_steps, snr)
        return self.run(plan, n, seed, batch, progress, return_timing, labels, guidance)

    def run(self, plan: Plan, x: np.ndarray | int, seed: int = 0, batch: int | None = None,
            progress: Callable[[int, int], None] | None = None, return_timing: bool = False, labels=None,
            guidance: float | None = None):
        """Execute `plan` from x (float [n, C, H, W]: latents to decode, or images to encode), or from n
        draws of x_T when x is a number n; noise from RandomState(seed), batch by batch (see sample).
        A class-conditional model runs with the null label (unconditionally), or with n `labels` in
        0..K-1 and classifier-free guidance out_u + s (out_c - out_u) on the prediction channels (s =
        `guidance`, default DEFAULT_GUIDANCE; 1: one conditional call per row, 0: one unconditional call, else
        one call on 2B)."""
        start = time.perf_counter()
        given = not isinstance(x, (int, np.integer))
        n = len(x) if given else x
        batch = n if batch is None else batch
        if int(n) != n or n < 1 or int(batch) != batch or batch < 1:
            raise ValueError(f"n and batch must be positive integers, got n={n}, batch={batch}")
        if given and tuple(np.shape(x)[1:]) != self.image_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self.image_shape))}], got {list(np.shape(x))}")
        labels, guidance = self._check_labels(labels, guidance, n)
        rng = np.random.RandomState(seed)
        coefficients = [self._ortvalue(step_coefficients(plan, k)) for k in range(len(plan))]
        result = np.empty((n, *self.image_shape), dtype=np.float32)
        network_s, done, total = 0.0, 0, len(plan) * -(-n // batch)
        for i in range(0, n, batch):
            b = min(batch, n - i)
            first = np.asarray(x[i:i + b], np.float32) if given else rng.standard_normal((b, *self.image_shape))
            y = None if labels is None else labels[i:i + b]
            result[i:i + b], seconds = self._run_batch(plan, coefficients, first.astype(np.float32), rng,
                                                       progress and (lambda k: progress(done + k, total)), y, guidance)
            network_s, done = network_s + seconds, done + len(plan)
        if not return_timing:
            return result
        return result, {"total_s": time.perf_counter() - start, "network_s": network_s, "steps": len(plan),
                        "provider": self.provider, "precision": self.precision, "precision_why": self.why}

    def _check_labels(self, labels, guidance: float | None, n: int):
        """(the labels as int64 [n] (the null label for a conditional model given none), the guidance scale), or
        ValueError."""
        if labels is None:
            if guidance not in (None, 1.0):
                raise ValueError("a guidance scale needs labels (the classes to guide to)")
            return (np.full(n, self.null_label, dtype=np.int64) if self.num_classes else None), 1.0
        if not self.num_classes:
            raise ValueError(f"{self.path} is an unconditional model: it takes no labels")
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu" or not ((labels >= 0) & (labels < self.num_classes)).all():
            raise ValueError(f"labels must be {n} whole numbers in 0..{self.num_classes - 1} (the classes "
                             f"{', '.join(self.class_names)}), got {labels.tolist()[:10]}")
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        return (labels.astype(np.int64) if guidance != 0 else np.full(n, self.null_label, dtype=np.int64)), guidance

    def _ortvalue(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, self._device_id)

    def _step_session(self, learned: bool, memory: int, guided: bool):
        key = (learned, memory, guided)
        if key not in self._steps:
            graph = step_graph(learned, self.out_channels == 2 * self.image_shape[0], memory, guided)
            self._steps[key] = ort.InferenceSession(graph, self._step_options, providers=self._providers,
                                                   enable_fallback=0)
        return self._steps[key]

    def _run_batch(self, plan: Plan, coefficients: list, x_first: np.ndarray, rng, tick, y=None, guidance=1.0):
        """One batch of the plan from x_first: x and the last M x0 predictions stay in OrtValues on the
        provider's device; returns (x, network seconds). Guided (labels y, guidance not 0 or 1): the network
        runs on [x; x] with labels [y; null], and the update combines the two halves and writes the next [x; x]."""
        C, H, W = self.image_shape
        shape, M = x_first.shape, plan.memory
        guided = y is not None and guidance not in (0.0, 1.0)
        net_shape = (2 * shape[0], *shape[1:]) if guided else shape
        new = lambda shape: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self._device,  # noqa: E731
                                                                       self._device_id)
        x, x_next, z, out = new(shape), new(shape), new(shape), new((net_shape[0], self.out_channels, H, W))
        x.update_inplace(x_first)  # a copy: ortvalue_from_numpy would alias x_first, which the loop then overwrites
        pair, pair_next = (new(net_shape), new(net_shape)) if guided else (x, None)
        if guided:
            pair.update_inplace(np.concatenate([x_first, x_first]))
            y = np.concatenate([y, np.full(len(y), self.null_label, dtype=np.int64)])
        zeros = self._ortvalue(np.zeros(shape, dtype=np.float32))
        x0s = [self._ortvalue(np.zeros(shape, dtype=np.float32)) for _ in range(M + 1 if M else 0)]  # a ring: zeros first
        timesteps = [self._ortvalue(np.full(net_shape[0], t, dtype=np.int64)) for t in plan.t]
        net = self.session.io_binding()
        net.bind_ortvalue_output("model_output", out)
        labels = None if y is None else self._ortvalue(np.ascontiguousarray(y, dtype=np.int64))  # held: bound below
        if labels is not None:
            net.bind_ortvalue_input("y", labels)
        scale = self._ortvalue(np.array([guidance], dtype=np.float32))
        updates = {}
        network_s = 0.0
        for k in range(len(timesteps)):
            net.bind_ortvalue_input("x", pair if guided else x)
            net.bind_ortvalue_input("t", timesteps[k])
            t0 = time.perf_counter()
            self.session.run_with_iobinding(net)
            network_s += time.perf_counter() - t0
            if plan.add_noise[k]:
                z.update_inplace(rng.standard_normal(shape).astype(np.float32))
            step = self._step_session(bool(plan.learned[k]), M, guided)
            if step not in updates:
                updates[step] = step.io_binding()
                updates[step].bind_ortvalue_input("out", out)
                if guided:
                    updates[step].bind_ortvalue_input("scale", scale)
            update = updates[step]
            update.bind_ortvalue_input("x", x)
            update.bind_ortvalue_input("z", z if plan.add_noise[k] else zeros)
            update.bind_ortvalue_input("c", coefficients[k])
            for j in range(1, M + 1):
                update.bind_ortvalue_input(f"x0_{j}", x0s[(k - j) % (M + 1)])
            if M:
                update.bind_ortvalue_output("x0", x0s[k % (M + 1)])
            update.bind_ortvalue_output("x_next", x_next)
            if guided:
                update.bind_ortvalue_output("x_pair", pair_next)
            step.run_with_iobinding(update)
            x, x_next = x_next, x
            if guided:
                pair, pair_next = pair_next, pair
            if tick:
                tick(k + 1)
        return x.numpy(), network_s


# ---------------------------------------------------------------------------------- images

def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, round((clamp(x, -1, 1) + 1) * 127.5), rounding half to even."""
    return np.rint((np.clip(np.asarray(x, dtype=np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    """A PNG (8-bit grey or RGB, no filtering) of a uint8 [H, W] or [H, W, 3] array."""
    h, w = image.shape[:2]
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                               + struct.pack(">I", zlib.crc32(tag + data)))
    rows = b"".join(b"\x00" + image[r].tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def image_grid(pixels: np.ndarray, pad: int = 2, columns: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] -> one image, `columns` (default ceil(sqrt(N))) columns with `pad`-pixel black gutters
    (as the C++ runner). Images under 32 pixels are enlarged by an integer factor (nearest neighbour) so that
    8x8 digits can be seen."""
    s = max(1, 32 // max(pixels.shape[2:]))
    pixels = pixels.repeat(s, axis=2).repeat(s, axis=3)
    N, C, H, W = pixels.shape
    cols = columns or math.ceil(math.sqrt(N))
    rows = -(-N // cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = \
            pixels[i].transpose(1, 2, 0)
    return grid[:, :, 0] if C == 1 else grid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path, data: bytes | Callable[[BinaryIO], None],
                     before_replace: Callable[[str], None] | None = None) -> None:
    """Write `data` (bytes, or a function that writes into the open binary file) to a temporary file in
    path's folder, call before_replace(temporary path) if given (it may raise to abandon the write), then
    rename it over `path`: readers never see half a file, and a run that dies leaves the old file."""
    path = os.fspath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
        if before_replace:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_images(x, path, columns: int | None = None, labels=None) -> None:
    """Save samples x (float [N, C, H, W] in [-1, 1]) as a .png grid (C = 1 or 3; `columns` as image_grid) or a
    .npz whose arr_0 is uint8 [N, H, W, C] (and arr_1 the labels, if given), both written atomically."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {x.shape}")
    pixels, suffix = to_uint8(x), os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=pixels.transpose(0, 2, 3, 1), **({} if labels is None else {"arr_1": np.asarray(labels)}))
        data = buffer.getvalue()
    elif suffix == ".png":
        if x.shape[1] not in (1, 3):
            raise ValueError(f"a .png needs 1 or 3 channels, the images have {x.shape[1]}; use .npz")
        data = _png(image_grid(pixels, columns=columns))
    else:
        raise ValueError(f"unknown image format {suffix!r} for {os.fspath(path)}; use .png or .npz")
    write_atomically(path, data)

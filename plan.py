# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""The sampling plan: every sampler of the project as a table of per-row coefficients, in numpy (float64).

One plan serves every executor: ddpm.run_plan (torch), export/onnx_sampler.py (onnxruntime, OpenVINO) and the
C++ runner's port of this file (cpp_runner/src/, held equal by the tests). A sampler is a choice of
timesteps (space_timesteps) and of coefficients (one short function per sampler and equation below); make_plan
puts them in rows, in sampling order. This file needs numpy only: an application copies it beside
onnx_sampler.py. docs/internals.md, "The sampling plan", describes the rows and how they are executed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

SAMPLERS = ("ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde", "dpmpp3m", "unipc")
MULTISTEP = {"dpmpp2m": 1, "dpmpp2m-sde": 1, "dpmpp3m": 2, "unipc": 3}  # the multistep samplers' memory M
SPACINGS = ("uniform", "linspace", "trailing", "quadratic", "logsnr")
PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
# The classifier-free guidance of a class-conditional model when none is given (the C++ runner's kDefaultGuidance):
# chosen from the guidance table of BENCHMARKS.md, where it is the scale of the best FD among those whose samples
# are the requested class at least 98% of the time.
DEFAULT_GUIDANCE = 1.0


def check_option(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(str, valid))}, got {value!r}")


@dataclass
class Plan:
    """A sampler as plain data, in sampling order (row k calls the network at timestep t[k]). One row:
        x0 = clip?(x0_x * x + x0_o * out[:, :C])
        x  = mean_x0 * x0 + mean_xt * x + sum_j mean_x0_prev[k, j] * x0 of row k-1-j  (+ s * z when add_noise)
    with s = sigma, or s = exp((frac * log_var_max + (1 - frac) * log_var_min) / 2), frac = (out[:, C:] + 1) / 2,
    on the rows where `learned`. mean_x0_prev is [rows, M]: M = 0 for one-step samplers, 1 for DPM-Solver++(2M),
    2 for (3M), 3 for UniPC (MULTISTEP). The torch executor (ddpm.run_plan), the ONNX sampler and the C++ runner
    all execute it; each keeps the last M x0 predictions between rows."""
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
    check_option("spacing", spacing, SPACINGS)
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


@dataclass(frozen=True)
class PlanOptions:
    """What a sampling plan is asked for, the same in every executor (the C++ runner's ddpm::PlanOptions, the
    options of `ddpm sample` and `ddpm onnx-sample`): the sampler, its network calls (steps; None: T for
    ancestral, min(50, T) otherwise), DDIM's eta, the spacing of the kept timesteps (None: default_spacing),
    whether x0 is clipped to [-1, 1] (None: the model's default, on for a checkpoint, ddpm.clip_denoised for an
    ONNX file) and the Langevin corrector (corrector_steps K, signal-to-noise ratio snr). Checked when made."""
    sampler: str = "ancestral"
    steps: int | None = None
    eta: float = 0.0
    spacing: str | None = None
    clip: bool | None = None
    corrector_steps: int = 0
    snr: float = 0.16

    def __post_init__(self):
        check_option("sampler", self.sampler, SAMPLERS)
        if self.spacing is not None:
            check_option("spacing", self.spacing, SPACINGS)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only, not {self.sampler}")
        K = self.corrector_steps
        if int(K) != K or K < 0 or not self.snr > 0:
            raise ValueError(f"corrector_steps must be a whole number >= 0 and snr > 0, got {K}, {self.snr}")
        if K and self.sampler in MULTISTEP:
            raise ValueError("the Langevin corrector runs with the one-step samplers (ancestral, ddim): a corrector "
                             f"row would replace the x0s that {self.sampler} keeps from its previous steps")

    def replace(self, **changes) -> "PlanOptions":
        return dataclasses.replace(self, **changes)


def plan_options(options: PlanOptions | str | None = None, steps: int | None = None, **fields) -> PlanOptions:
    """The PlanOptions that make_plan and the executors take as `options, steps, **fields`: a PlanOptions (which
    `steps` and the fields by name change), a sampler's name with its steps, or the fields by name."""
    if steps is not None:
        fields["steps"] = steps
    if isinstance(options, PlanOptions):
        return options.replace(**fields)
    return PlanOptions(**fields) if options is None else PlanOptions(options, **fields)


def model_options(default: PlanOptions, options: PlanOptions | str | None = None, steps: int | None = None,
                  **fields) -> PlanOptions:
    """The options a model samples with, given its own plan `default` (ancestral, or a distilled student's: the
    plan it was trained for, distill.student_options): options as plan_options takes them, fields given as None
    taken as not given. Where no sampler is named the default's sampler, steps and spacing apply; where no clip
    is given, the default's clip."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if options is None and "sampler" not in fields:
        return plan_options(default, steps, **fields)
    o = plan_options(options, steps, **fields)
    return o.replace(clip=default.clip) if o.clip is None else o


def make_plan(alphas_cumprod, parameterization: str = "eps", variance: str = "fixed_small",
              options: PlanOptions | str | None = None, steps: int | None = None, **fields) -> Plan:
    """The plan (float64) for the schedule alpha_bar_1..T and the options (plan_options) of:
    Algorithm 2 of Ho et al. (ancestral, over all T steps or on the process respaced to the kept steps, improved
    DDPM Section 4); DDIM with eta; DPM-Solver++(2M) (dpmpp2m), its SDE variant (dpmpp2m-sde), DPM-Solver++(3M)
    (dpmpp3m) or UniPC (unipc, order 3) over the kept timesteps with lambda >= LAMBDA_MIN. corrector_steps K adds
    K Langevin rows (langevin_coefficients) at each kept timestep after the first, before its predictor row:
    Song et al.'s predictor-corrector sampler (with ancestral or ddim). clip None is clipping."""
    o = plan_options(options, steps, **fields)
    check_option("parameterization", parameterization, PARAMETERIZATIONS)
    check_option("variance", variance, VARIANCES)
    ab_all = np.asarray(alphas_cumprod, dtype=np.float64)
    spacing = o.spacing or default_spacing(ab_all)
    T = int((log_snr(ab_all) >= LAMBDA_MIN).sum()) if o.sampler in MULTISTEP else len(ab_all)
    ts = space_timesteps(T, o.steps or (T if o.sampler == "ancestral" else min(50, T)), spacing, ab_all)
    ab = ab_all[ts]
    if o.sampler in MULTISTEP and not (np.diff(log_snr(ab)) < 0).all():
        raise ValueError(f"the kept timesteps' lambdas are not strictly decreasing ({spacing}, {len(ts)} steps): "
                         "DPM-Solver's step h would be 0; use fewer steps or another spacing")
    rows = [c[::-1].copy() for c in _predictor_columns(ts, ab, parameterization, variance, o)]  # sampling order
    if o.corrector_steps:
        rows = _with_corrector(rows, ab[::-1], parameterization, o.corrector_steps, o.snr)
    return Plan(*rows, clip=o.clip is not False, sampler=o.sampler)


def _predictor_columns(ts: np.ndarray, ab: np.ndarray, parameterization: str, variance: str, o: PlanOptions) -> list:
    """The columns of Plan (ascending t) of the predictor o.sampler over the kept timesteps ts, ab = alpha_bar[ts]."""
    steps = len(ts)
    ab_prev = np.append(1.0, ab[:-1])
    x0_x, x0_o = x0_coefficients(ab, parameterization)
    beta, post_var, post_x0, post_xt = posterior_coefficients(ab, ab_prev)
    # beta-tilde_1 = 0: its log is clipped to beta-tilde_2, as in the original implementation.
    log_var_min = np.log(np.append(post_var[1] if steps > 1 else beta[0], post_var[1:]))
    prev = np.zeros((steps, 0))
    if o.sampler == "ancestral":
        mean_x0, mean_xt = post_x0, post_xt
        sigma = np.sqrt(beta if variance == "fixed_large" else post_var)
    elif o.sampler == "ddim":
        sigma = ddim_sigma(ab, ab_prev, o.eta)
        mean_x0, mean_xt = ddim_coefficients(ab, ab_prev, sigma)
    else:
        multistep_rows = _unipc_rows(ab) if o.sampler == "unipc" else _dpmpp_rows(ab, o.sampler)
        mean_xt, mean_x0, prev, sigma = (c[::-1] for c in multistep_rows)
    add_noise = (np.arange(steps) > 0) & (o.sampler in ("ancestral", "dpmpp2m-sde") or o.eta > 0)
    learned = np.full(steps, variance == "learned_range" and o.sampler == "ancestral")
    return [ts, x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, np.log(beta), add_noise, learned, prev]


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
    check_option("parameterization", parameterization, PARAMETERIZATIONS)
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


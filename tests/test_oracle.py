"""With the closed-form optimal denoiser every sampler is a chain whose answer is known: nothing is trained."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_reference import ddpm
from ddpm_reference import plan as plans
from oracle import ClassOracle, GaussianOracle, MixtureOracle

MU, S = 0.3, 0.5
SHAPE = (4000, 1, 4, 4)  # 64,000 scalar samples per run


def empirical_check(x, m, v):
    n = x.numel()
    x = x.double()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / n), (x.mean().item(), m)
    assert abs(x.var().item() - v) < 5 * v * math.sqrt(2 / n), (x.var().item(), v)


CASES = [
    # (schedule, T, variance, parameterization, sampler, steps, eta, spacing)
    ("linear", 1000, "fixed_small", "eps", "ancestral", None, 0.0, "uniform"),
    ("linear", 1000, "fixed_large", "eps", "ancestral", None, 0.0, "uniform"),
    ("cosine", 1000, "fixed_small", "v", "ancestral", 100, 0.0, "linspace"),
    ("linear", 1000, "learned_range", "x0", "ancestral", 50, 0.0, "uniform"),
    ("linear", 1000, "fixed_small", "eps", "ddim", 10, 0.0, "uniform"),
    ("linear", 1000, "fixed_small", "eps", "ddim", 50, 0.5, "trailing"),
    ("cosine", 1000, "fixed_small", "v", "ddim", 20, 1.0, "quadratic"),
    ("quad", 200, "fixed_small", "x0", "ddim", 200, 0.0, "uniform"),
    ("linear", 1000, "fixed_small", "eps", "dpmpp2m", 10, 0.0, "logsnr"),
    ("cosine", 1000, "fixed_small", "v", "dpmpp2m", 25, 0.0, "trailing"),
    ("linear", 1000, "fixed_small", "eps", "dpmpp2m-sde", 20, 0.0, "logsnr"),
    ("linear", 1000, "learned_range", "x0", "dpmpp2m-sde", 30, 0.0, "linspace"),
    ("linear", 1000, "fixed_small", "eps", "dpmpp3m", 10, 0.0, "logsnr"),
    ("cosine", 1000, "fixed_small", "v", "unipc", 15, 0.0, "trailing"),
    ("linear", 1000, "fixed_small", "eps", "ancestral+2", 20, 0.0, "uniform"),  # +K: K Langevin corrector rows
    ("linear", 1000, "learned_range", "eps", "ancestral+1", 20, 0.0, "linspace"),
    ("cosine", 1000, "fixed_small", "v", "ddim+3", 10, 0.5, "trailing"),
]


@pytest.mark.parametrize("schedule,T,variance,param,sampler,steps,eta,spacing", CASES)
def test_sampler_moments_match_the_exact_chain(schedule, T, variance, param, sampler, steps, eta, spacing):
    d = ddpm.Diffusion(ddpm.beta_schedule(schedule, T), param, variance)
    oracle = GaussianOracle(d, MU, S, var_out=0.3)
    sampler, K = sampler.split("+") if "+" in sampler else (sampler, 0)
    plan = ddpm.make_plan(d, sampler, steps, eta=eta, spacing=spacing, clip=False, corrector_steps=int(K))
    g = torch.Generator().manual_seed(1)
    x = ddpm.sample(oracle, plan, SHAPE, ddpm.torch_noise(g))
    empirical_check(x, *oracle.exact_moments(plan))


def test_full_ancestral_sampler_reproduces_the_data_distribution():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    oracle = GaussianOracle(d, MU, S)
    x = ddpm.sample(oracle, ddpm.make_plan(d, clip=False), SHAPE, ddpm.numpy_noise(0)).double()
    assert abs(x.mean().item() - MU) < 0.02 * MU
    assert abs(x.std().item() - S) < 0.02 * S
    m, v = oracle.exact_moments(ddpm.make_plan(d, clip=False))
    assert abs(m - MU) < 0.02 * MU and abs(math.sqrt(v) - S) < 0.02 * S


def test_ancestral_sampler_reproduces_a_mixture():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    oracle = MixtureOracle(d, m=0.6, s=0.15, p=0.3)
    x = ddpm.sample(oracle, ddpm.make_plan(d, clip=False), SHAPE, ddpm.torch_noise(torch.Generator().manual_seed(2)))
    x = x.double().flatten()
    n = x.numel()
    assert abs((x > 0).double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert abs(x.mean().item() - (0.3 * 0.6 - 0.7 * 0.6)) < 0.01
    assert abs(x.var().item() - (0.15 ** 2 + 0.6 ** 2 - (0.3 * 0.6 - 0.7 * 0.6) ** 2)) < 0.01
    assert abs(x[x > 0].std().item() - 0.15) < 0.01


def test_ddim_inversion_reconstructs():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    oracle = GaussianOracle(d, MU, S)
    x0 = MU + S * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    inversion = ddpm.ddim_inversion_plan(d, 100)
    latent = ddpm.run_plan(oracle, inversion, x0)
    empirical_check(latent, *oracle.exact_moments(inversion, MU, S ** 2))
    assert abs(latent.var().item() - 1.0) < 0.1  # the DDIM ODE run forward ends near N(0, I)
    recon = ddpm.run_plan(oracle, ddpm.make_plan(d, "ddim", 100, clip=False), latent)
    assert ((recon - x0) ** 2).mean().item() < 0.01 * S ** 2  # 1% of the data variance


def test_callback_and_determinism():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 100))
    oracle = GaussianOracle(d, MU, S)
    plan = ddpm.make_plan(d, "ddim", 10, eta=0.5)
    hist = []
    a = ddpm.sample(oracle, plan, (3, 1, 2, 2), ddpm.numpy_noise(7), callback=hist.append)
    b = ddpm.sample(oracle, plan, (3, 1, 2, 2), ddpm.numpy_noise(7))
    assert [h["i"] for h in hist] == list(range(10)) and [h["t"] for h in hist] == plan.t.tolist()
    assert torch.equal(hist[-1]["x"], a) and torch.equal(a, b)
    assert not torch.equal(hist[-2]["x"], a)  # each step's x is its own tensor
    # x0 is the clipped prediction of that step: the oracle's x0 at (x before the step, t)
    x_before = hist[-2]["x"]
    t_last = torch.full((3,), int(plan.t[-1]))
    want = d.to_x0(x_before, t_last, oracle(x_before, t_last), "eps").float().clamp(-1, 1)
    torch.testing.assert_close(hist[-1]["x0"], want, rtol=1e-5, atol=1e-6)
    c = ddpm.sample(oracle, plan, (3, 1, 2, 2), ddpm.numpy_noise(8))
    assert not torch.equal(a, c)


def test_score_of_the_oracle_is_the_true_score():
    d = ddpm.Diffusion(ddpm.beta_schedule("cosine", 1000))
    oracle = GaussianOracle(d, MU, S)
    x_t = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    ab = torch.as_tensor(d.alphas_cumprod[t.numpy()]).reshape(-1, 1, 1, 1)
    true_score = -(x_t - ab.sqrt() * MU) / (ab * S ** 2 + 1 - ab)
    torch.testing.assert_close(d.score(oracle, x_t, t), true_score, rtol=1e-6, atol=1e-6)


def discrete_entropy_bits(mu, s):
    """Exact entropy of N(mu, s^2) quantised to the 256 bins of [-1, 1] (outer bins extended)."""
    edges = np.concatenate([[-np.inf], np.linspace(-1, 1, 256)[:-1] + 1 / 255, [np.inf]])
    p = np.diff(norm.cdf((edges - mu) / s))
    p = p[p > 0]
    return -(p * np.log2(p)).sum()


def test_bits_per_dim_of_the_oracle_bounds_the_exact_nll():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    mu, s = 0.1, 0.2  # clipping to [-1, 1] must not change the data: the oracle is for N(mu, s^2)
    oracle = GaussianOracle(d, mu, s)
    g = torch.Generator().manual_seed(4)
    x0 = mu + s * torch.randn((1000, 1, 4, 4), generator=g, dtype=torch.float64)
    x0 = (torch.round((x0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)
    out = ddpm.bits_per_dim(d, oracle, x0, generator=g)
    bpd = out["total"].mean().item()
    stderr = out["total"].std().item() / math.sqrt(len(x0))
    H = discrete_entropy_bits(mu, s)
    assert bpd > H - 4 * stderr  # an upper bound of the NLL, which is >= the entropy
    # Measured gap: 0.73 bits/dim, the same with the denoiser that is optimal for the 8-bit data (a
    # 256-component mixture): it is the cost of Gaussian reverse steps and decoder at t ~ 1, where the
    # noise (sqrt(beta_1) = 0.01) is about one bin wide, not of the denoiser.
    assert bpd - H < 0.8
    torch.testing.assert_close(out["total"], out["prior"] + out["vb"] + out["decoder"])
    assert out["terms"].shape == (1000, 1000) and out["prior"].abs().max() < 1e-4


@pytest.mark.parametrize("loss,param,variance", [("simple", "eps", "fixed_small"), ("simple", "v", "fixed_small"),
                                                 ("vlb", "eps", "fixed_large"), ("hybrid", "x0", "fixed_small")])
def test_training_loss_is_lowest_at_the_oracle(loss, param, variance):
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000), param, variance)
    oracle = GaussianOracle(d, MU, S)
    g = torch.Generator().manual_seed(5)
    x0 = MU + S * torch.randn((20000, 1, 2, 2), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (20000,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    best = ddpm.training_losses(d, oracle, x0, t, noise, loss=loss).mean()
    for scale, shift in [(1.05, 0.0), (0.95, 0.0), (1.0, 0.03), (1.0, -0.03), (1.2, 0.1)]:
        worse = ddpm.training_losses(d, lambda x, tt: scale * oracle(x, tt) + shift, x0, t, noise, loss=loss).mean()
        assert worse > best, (scale, shift)


def test_vlb_weighting_and_importance_sampling_are_unbiased():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 100))
    w = ddpm.vlb_weights(d)
    # lambda(t) times the eps MSE equals the KL term L_{t-1} for t > 1 (Eq. 12), checked on a biased eps.
    x0 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([37])
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x_t = d.q_sample(x0, t, eps)
    kl = ddpm.vlb_terms(d, eps + 0.1, x0, x_t, t).item() * math.log(2)
    assert math.isclose(kl, w[37] * 0.01, rel_tol=1e-9)
    sampler = ddpm.TimestepSampler(100, importance=True, history=2)
    losses = torch.arange(100, dtype=torch.float64) + 1
    for _ in range(2):
        sampler.update(torch.arange(100), losses)
    p = sampler.probabilities()
    assert math.isclose(p.sum(), 1.0) and p[-1] > p[0]
    tt, weights = sampler.sample(100_000, torch.Generator().manual_seed(0))
    # E_p[w L] equals the uniform mean of L: the weights keep the loss unbiased.
    assert abs((weights.double() * losses[tt]).mean().item() - losses.mean().item()) < 0.02 * losses.mean().item()


# ------------------------------------------------------------------- few-step samplers against exact maps
def deterministic_error(oracle, d, sampler, steps, spacing, x_T, reference):
    """RMS distance of the sampler's output from x_T (float64, no noise) to reference(plan)."""
    plan = ddpm.make_plan(d, sampler, steps, spacing=spacing, clip=False)
    out = ddpm.run_plan(oracle, plan, x_T.clone(), lambda shape: torch.zeros(shape, dtype=torch.float64))
    return ((out - reference(plan)) ** 2).mean().sqrt().item()


def gaussian_flow_map(oracle, d, x_T):
    """The exact answer of a deterministic plan for data N(mu, s^2): the probability-flow ODE keeps
    xi = (x_t - sqrt(ab_t) mu) / sqrt(ab_t s^2 + 1 - ab_t) fixed from the plan's first timestep to its last,
    and the last row outputs the exact E[x_0 | x_t] there."""
    def reference(plan):
        ab_first, ab_last = d.alphas_cumprod[plan.t[0]], d.alphas_cumprod[plan.t[-1]]
        xi = (x_T - math.sqrt(ab_first) * MU) / math.sqrt(ab_first * S ** 2 + 1 - ab_first)
        x_last = math.sqrt(ab_last) * MU + math.sqrt(ab_last * S ** 2 + 1 - ab_last) * xi
        return MU + oracle.gain(ab_last) * (x_last - math.sqrt(ab_last) * MU)
    return reference


@pytest.mark.parametrize("data", ["gaussian", "mixture"])
def test_ddim_is_first_order_and_dpm_solver_second_order(data):
    """Error ratios when N doubles: ~2 for DDIM (first order), ~4 for DPM-Solver++(2M) (second order); at
    N = 10 with logsnr spacing DPM-Solver++ is several times closer. Gaussian data: against the exact flow map;
    a mixture: against DPM-Solver++(2M) on all T = 1000 steps."""
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    x_T = torch.randn(2000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if data == "gaussian":
        oracle = GaussianOracle(d, MU, S)
        reference = gaussian_flow_map(oracle, d, x_T)
        dpm_band, few_step_gain = (3.5, 4.5), 5.0
    else:
        oracle = MixtureOracle(d, m=0.5, s=0.2, p=0.3)
        full = ddpm.run_plan(oracle, ddpm.make_plan(d, "dpmpp2m", 1000, clip=False), x_T.clone(),
                             lambda shape: torch.zeros(shape, dtype=torch.float64))
        reference = lambda plan: full  # noqa: E731  (every linspace/logsnr plan starts at T-1 and ends at 0)
        dpm_band, few_step_gain = (3.0, 4.5), 2.5
    err = {(sampler, n): deterministic_error(oracle, d, sampler, n, "linspace", x_T, reference)
           for sampler in ("ddim", "dpmpp2m") for n in (50, 100, 200)}
    for n in (50, 100):
        assert 1.8 < err["ddim", n] / err["ddim", 2 * n] < 2.2, err
    assert dpm_band[0] < err["dpmpp2m", 100] / err["dpmpp2m", 200] < dpm_band[1], err
    ddim_10 = deterministic_error(oracle, d, "ddim", 10, "logsnr", x_T, reference)
    dpm_10 = deterministic_error(oracle, d, "dpmpp2m", 10, "logsnr", x_T, reference)
    assert ddim_10 > few_step_gain * dpm_10, (ddim_10, dpm_10)


def test_uniform_lambda_steps_show_the_multistep_orders(monkeypatch):
    """On a schedule linear in lambda (T = 1200, uniform spacing: every step has the same h; on the linear schedule
    the integer timesteps make h uneven, and large near t = 0), against the exact flow map of Gaussian data, the
    error ratios as N doubles: ~4 for DPM-Solver++(2M); ~16 for UniPC-3 (fourth order: UniC adds one); ~4 for
    DPM-Solver++(3M), with about a third of 2M's error: diffusers' 3M (as Lu et al.'s code) weighs
    D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2 by -phi_3 ~ h / 6, half of the Taylor term h^3 x0'' / 6, so it is
    second order; twice that weight makes it (at least) third order."""
    T = 1200
    ab = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(4.0, -5.0, T)))
    d = ddpm.Diffusion(1.0 - ab / np.append(1.0, ab[:-1]))
    oracle = GaussianOracle(d, MU, S)
    x_T = torch.randn(500, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = gaussian_flow_map(oracle, d, x_T)
    err = {(sampler, n): deterministic_error(oracle, d, sampler, n, "uniform", x_T, reference)
           for sampler in ("dpmpp2m", "dpmpp3m", "unipc") for n in (50, 100, 200)}
    assert 3.8 < err["dpmpp2m", 100] / err["dpmpp2m", 200] < 4.2, err
    assert 3.8 < err["dpmpp3m", 100] / err["dpmpp3m", 200] < 4.4, err
    assert 12 < err["unipc", 100] / err["unipc", 200] < 20, err
    assert all(err["dpmpp2m", n] > 2 * err["dpmpp3m", n] > 20 * err["unipc", n] for n in (50, 100, 200)), err
    dpmpp_3m = plans.dpmpp_3m_coefficients

    def twice_d2(ab, ab_to, r0, r1):  # one more -alpha_to phi_3 D2
        mean_xt, *weights = dpmpp_3m(ab, ab_to, r0, r1)
        h = plans.log_snr(ab_to) - plans.log_snr(ab)
        extra = -np.sqrt(ab_to) * ((np.expm1(-h) / h + 1.0) / h - 0.5) / (r0 + r1)
        return mean_xt, weights[0] + extra / r0, weights[1] - extra * (1.0 / r0 + 1.0 / r1), weights[2] + extra / r1
    monkeypatch.setattr(plans, "dpmpp_3m_coefficients", twice_d2)
    third = [deterministic_error(oracle, d, "dpmpp3m", n, "uniform", x_T, reference) for n in (100, 200)]
    assert third[0] / third[1] > 7.5 and third[1] < err["dpmpp3m", 200] / 20, (third, err)


def test_dpm_solver_first_order_rows_are_ddim_and_the_sde_first_order_rows_are_ancestral():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    for sampler, same in (("dpmpp2m", ("ddim", 0.0)), ("dpmpp2m-sde", ("ancestral", 0.0)), ("dpmpp3m", ("ddim", 0.0)),
                          ("unipc", ("ddim", 0.0))):
        dpm, one_step = ddpm.make_plan(d, sampler, 2), ddpm.make_plan(d, *same[:1], 2)
        for key in ("mean_x0", "mean_xt"):  # two steps: both rows first order (the first, and the one to ab = 1)
            np.testing.assert_allclose(getattr(dpm, key), getattr(one_step, key), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dpm.sigma[dpm.add_noise], one_step.sigma[one_step.add_noise], rtol=1e-9)
        assert (dpm.mean_x0_prev == 0).all() and dpm.memory == plans.MULTISTEP[sampler]


def test_dpm_solver_rejects_lambdas_that_do_not_decrease():
    """Duplicate kept timesteps would give h = 0 (NaN in the 2M coefficients): a clear error instead."""
    betas = ddpm.beta_schedule("linear", 100)
    betas[40:60] = 1e-300  # alpha_bar (and lambda) constant over 20 timesteps, to rounding
    d = ddpm.Diffusion(betas)
    for sampler in plans.MULTISTEP:
        with pytest.raises(ValueError, match="not strictly decreasing"):
            ddpm.make_plan(d, sampler, 100)
    with np.errstate(divide="ignore"):  # log beta = -inf on those steps; the one-step samplers do not need lambda
        assert np.isfinite(ddpm.make_plan(d, "ddim", 100).mean_x0).all()


def langevin_plan(d, t: int, K: int, snr: float) -> ddpm.Plan:
    """K corrector rows at timestep t, nothing else."""
    ab = np.full(K, d.alphas_cumprod[t])
    x0_x, x0_o = ddpm.x0_coefficients(ab, d.parameterization)
    mean_xt, mean_x0, sigma = ddpm.langevin_coefficients(ab, snr)
    return ddpm.Plan(np.full(K, t), x0_x, x0_o, mean_x0, mean_xt, sigma, sigma, sigma, np.ones(K, bool),
                     np.zeros(K, bool), np.zeros((K, 0)), clip=False)


@pytest.mark.parametrize("param", ["eps", "v"])
def test_langevin_corrector_keeps_the_exact_marginal(param):
    """With the exact score, K corrector steps from samples of q(x_t) leave them distributed as q(x_t)
    (snr 0.05: the discretisation's stationary bias, var / (1 - e / (2 var)), is 0.2% here, far below the
    Monte-Carlo error); for any snr the empirical moments are those of the exact linear chain."""
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000), param)
    oracle = GaussianOracle(d, MU, S)
    t = 300
    ab = d.alphas_cumprod[t]
    g = torch.Generator().manual_seed(4)
    x0 = MU + S * torch.randn(SHAPE, generator=g)
    x_t = d.q_sample(x0, torch.full((SHAPE[0],), t), torch.randn(SHAPE, generator=g))
    m, v = math.sqrt(ab) * MU, ab * S ** 2 + 1 - ab
    for snr in (0.05, 0.16):
        plan = langevin_plan(d, t, 40, snr)
        x = ddpm.run_plan(oracle, plan, x_t, ddpm.torch_noise(g))
        chain_m, chain_v = oracle.exact_moments(plan, m, v)
        empirical_check(x, chain_m, chain_v)
        e = 2 * snr ** 2 * (1 - ab)  # the step size; the chain is x' - m = (1 - e / v) (x - m) + sqrt(2 e) z
        stationary = v / (1 - e / (2 * v))  # ULA's stationary variance for a Gaussian target
        after_40 = stationary + (v - stationary) * (1 - e / v) ** 80
        assert abs(chain_m - m) < 1e-9 and abs(chain_v - after_40) < 1e-9 * v, (chain_v, after_40)
        if snr == 0.05:
            empirical_check(x, m, v)


def test_predictor_corrector_run_has_the_right_final_moments():
    """Ancestral sampling with 2 corrector steps per timestep: the samples have the exact chain's moments, the
    corrector moves the few-step output towards the data's moments, and over all T steps it reaches them."""
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    oracle = GaussianOracle(d, MU, S)
    plan = ddpm.make_plan(d, "ancestral", 50, clip=False, corrector_steps=2)
    assert len(plan) == 50 + 2 * 49
    x = ddpm.sample(oracle, plan, SHAPE, ddpm.torch_noise(torch.Generator().manual_seed(5))).double()
    m, v = oracle.exact_moments(plan)
    empirical_check(x, m, v)
    _, v_predictor = oracle.exact_moments(ddpm.make_plan(d, "ancestral", 50, clip=False))
    assert abs(m - MU) < 1e-3 and abs(math.sqrt(v) - S) < 0.9 * abs(math.sqrt(v_predictor) - S), (v, v_predictor)
    m, v = oracle.exact_moments(ddpm.make_plan(d, "ancestral", clip=False, corrector_steps=1))
    assert abs(m - MU) < 1e-3 and abs(math.sqrt(v) - S) < 0.005 * S


def test_reconstruction_error_falls_with_steps_and_interpolation_keeps_its_ends():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    oracle = GaussianOracle(d, MU, S)
    x0 = MU + S * torch.randn(500, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mse = [((ddpm.ddim_reconstruct(oracle, d, x0, steps) - x0) ** 2).mean().item() for steps in (10, 20, 50, 100)]
    assert all(a > b for a, b in zip(mse, mse[1:])) and mse[-1] < 0.01 * S ** 2, mse
    latents = ddpm.run_plan(oracle, ddpm.ddim_inversion_plan(d, 100), x0[:2])
    path = ddpm.slerp(latents[0], latents[1], np.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], latents[0])
    torch.testing.assert_close(path[-1], latents[1])
    norms = path.flatten(1).norm(dim=1)
    assert (norms > 0.5 * latents.flatten(1).norm(dim=1).min()).all()  # slerp does not shrink towards 0 midway
    decoded = ddpm.run_plan(oracle, ddpm.make_plan(d, "ddim", 100, clip=False), path)
    assert ((decoded[[0, -1]] - x0[:2]) ** 2).mean().item() < 0.01 * S ** 2


# --------------------------------------------------------------- class-conditional sampling and guidance
def class_oracle(T=1000):
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", T))
    return d, ClassOracle(d, means=[-0.5, 0.1, 0.6], s=0.2, priors=[0.5, 0.3, 0.2])


CLASS_SHAPE = (3000, 1, 2, 2)


def test_conditional_sampling_hits_each_class_and_guidance_one_and_zero_are_exact():
    d, oracle = class_oracle()
    plan = ddpm.make_plan(d, "ddim", 50, eta=1.0, clip=False)
    for c in range(3):
        y = torch.full((CLASS_SHAPE[0],), c)
        x = ddpm.sample(ddpm.classifier_free_guidance(oracle, y, 1.0, 3), plan, CLASS_SHAPE, ddpm.numpy_noise(c))
        assert torch.equal(x, ddpm.sample(lambda x_, t_: oracle(x_, t_, y), plan, CLASS_SHAPE, ddpm.numpy_noise(c)))
        empirical_check(x, *oracle.classes[c].exact_moments(plan))
    y = torch.full((CLASS_SHAPE[0],), 1)
    uncond = ddpm.sample(lambda x_, t_: oracle(x_, t_), plan, CLASS_SHAPE, ddpm.numpy_noise(7))
    assert torch.equal(ddpm.sample(ddpm.classifier_free_guidance(oracle, y, 0.0, 3), plan, CLASS_SHAPE,
                                   ddpm.numpy_noise(7)), uncond)
    x = torch.randn(5, 1, 2, 2)
    t = torch.tensor([0, 10, 300, 700, 999])
    torch.testing.assert_close(ddpm.guided_output(oracle, x, t, torch.full((5,), 2), 1.0, 3), oracle(x, t, torch.full((5,), 2)),
                               rtol=0, atol=1e-6)  # the 2B path at s = 1 is the conditional model


def test_the_exact_classifiers_confidence_rises_with_guidance():
    d, oracle = class_oracle()
    plan = ddpm.make_plan(d, "ddim", 30, clip=False)
    y = torch.full((2000,), 1)  # the middle class, the one the others overlap most
    confidence = []
    for s in (1.0, 2.0, 4.0):
        x = ddpm.sample(ddpm.classifier_free_guidance(oracle, y, s, 3), plan, (2000, 1, 2, 2), ddpm.numpy_noise(3))
        p = torch.softmax(oracle.logits(x.double(), torch.zeros(2000, dtype=torch.long)), dim=1)[:, 1]
        confidence.append(p.mean().item())
    assert confidence[0] < confidence[1] < confidence[2], confidence


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_classifier_guidance_with_the_exact_classifier_is_conditional_sampling(sampler):
    """g = 1 with the exact p(y | x_t): the unconditional model's score plus grad log p(y | x_t) is the class's
    score, so the samples have the class's moments (within Monte-Carlo error and the discretisation's:
    Algorithm 1's mean shift is first order in the step)."""
    d, oracle = class_oracle()
    c = 2
    y = torch.full((CLASS_SHAPE[0],), c)
    unconditional = lambda x, t: oracle(x, t)  # noqa: E731
    if sampler == "ddim":
        plan = ddpm.make_plan(d, "ddim", 100, clip=False)
        x = ddpm.sample(ddpm.classifier_guidance(unconditional, d, oracle.logits, y, 1.0), plan, CLASS_SHAPE,
                        ddpm.numpy_noise(1))
    else:
        plan = ddpm.make_plan(d, "ancestral", clip=False)
        x = ddpm.sample(unconditional, plan, CLASS_SHAPE, ddpm.numpy_noise(1),
                        mean_shift=ddpm.classifier_mean_shift(oracle.logits, y, 1.0))
    m, v = oracle.classes[c].exact_moments(plan)
    x = x.double()
    assert abs(x.mean().item() - m) < 0.02 and abs(x.std().item() - math.sqrt(v)) < 0.02, (x.mean(), x.std(), m, v)
    assert abs(m - 0.6) < 0.01  # and the class's exact chain is at the class's data mean

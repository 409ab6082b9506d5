"""Property tests of the schedule identities, for every schedule and any T."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ddpm_reference import ddpm

SCHEDULES = ["linear", "cosine", "quad", "sigmoid", "const", "jsd"]
schedules = st.sampled_from(SCHEDULES)
Ts = st.integers(min_value=2, max_value=4000)


def diffusion_for(name, T, variance="fixed_small"):
    betas = ddpm.beta_schedule(name, T)
    # jsd ends at beta_T = 1 (alpha_bar_T = 0): only the v and x0 parameterisations are defined there.
    return ddpm.Diffusion(betas, "v" if name == "jsd" else "eps", variance)


@given(schedules, Ts)
def test_betas_in_range_and_alpha_bar_decreasing(name, T):
    betas = ddpm.beta_schedule(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas < 1).all() if name != "jsd" else (betas <= 1).all()
    assert (np.diff(np.cumprod(1 - betas)) < 0).all()


@given(schedules, Ts)
def test_chained_forward_process_equals_closed_form(name, T):
    """Chaining q(x_t | x_{t-1}) gives mean sqrt(alpha_bar_t) x0 and noise variance 1 - alpha_bar_t (Eq. 4)."""
    d = diffusion_for(name, T)
    mean_coef, var = 1.0, 0.0
    for t in range(T):
        mean_coef *= math.sqrt(1 - d.betas[t])
        var = (1 - d.betas[t]) * var + d.betas[t]
    assert math.isclose(mean_coef, d.sqrt_alphas_cumprod[-1], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(var, 1 - d.alphas_cumprod[-1], rel_tol=1e-9)


def test_chained_samples_match_closed_form_in_distribution():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 100))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(40):
        x = math.sqrt(1 - d.betas[t]) * x + math.sqrt(d.betas[t]) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    n = len(x)
    assert abs(x.mean().item() - 0.7 * d.sqrt_alphas_cumprod[39]) < 5 * math.sqrt(1 / n)
    assert abs(x.var().item() - (1 - d.alphas_cumprod[39])) < 5 * math.sqrt(2 / n)


@given(schedules, Ts)
def test_posterior_is_bayes(name, T):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precision and mean by Bayes (Eq. 6-7)."""
    d = diffusion_for(name, T)
    a, b, abp = d.alphas[1:], d.betas[1:], d.alphas_cumprod_prev[1:]
    var = 1.0 / (a / b + 1.0 / (1.0 - abp))
    np.testing.assert_allclose(d.posterior_variance[1:], var, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_variance[1:], b * (1 - abp) / (1 - d.alphas_cumprod[1:]), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1[1:], var * np.sqrt(abp) / (1 - abp), rtol=1e-8)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:], var * np.sqrt(a) / b, rtol=1e-8)
    # At t = 1 the posterior is the point mass at x_0.
    assert d.posterior_variance[0] == 0 and math.isclose(d.posterior_mean_coef1[0], 1.0)


@given(schedules, st.integers(2, 1000), st.data())
@settings(max_examples=50)
def test_posterior_mean_x0_form_equals_eps_form(name, T, data):
    """mu~(x_t, x0(eps)) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) (Eq. 11)."""
    betas = ddpm.beta_schedule(name, T)
    d = ddpm.Diffusion(betas[:-1] if name == "jsd" else betas)
    t = torch.tensor([data.draw(st.integers(0, d.T - 1))] * 4)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    x_t, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    mean, _, _ = d.q_posterior(d.to_x0(x_t, t, eps, "eps"), x_t, t)
    i = t[0].item()
    expected = (x_t - d.betas[i] / math.sqrt(1 - d.alphas_cumprod[i]) * eps) / math.sqrt(d.alphas[i])
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)


@given(schedules, st.integers(2, 2000), st.sampled_from(["eps", "x0", "v"]), st.sampled_from(["eps", "x0", "v"]),
       st.data())
@settings(max_examples=60)
def test_parameterisation_round_trips(name, T, src, dst, data):
    betas = ddpm.beta_schedule(name, T)
    d = ddpm.Diffusion(betas[:-1] if name == "jsd" else betas)
    t = torch.tensor([data.draw(st.integers(0, d.T - 1)) for _ in range(5)])
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
    x0, eps = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    x_t = d.q_sample(x0, t, eps)
    for kind, truth in (("eps", eps), ("x0", x0)):
        torch.testing.assert_close(d.from_x0(x_t, t, x0, kind), truth, rtol=1e-6, atol=1e-6)
    value = d.from_x0(x_t, t, x0, src)
    back = d.from_x0(x_t, t, d.to_x0(x_t, t, value, src), dst)
    torch.testing.assert_close(back, d.from_x0(x_t, t, x0, dst), rtol=1e-5, atol=1e-5)


@given(schedules, Ts, st.data())
def test_respacing_keeps_alpha_bar(name, T, data):
    d = diffusion_for(name, T)
    steps = data.draw(st.integers(1, T))
    ts = ddpm.space_timesteps(T, steps, "linspace")
    np.testing.assert_allclose(d.respace(ts).alphas_cumprod, d.alphas_cumprod[ts], rtol=1e-9)


@given(st.sampled_from(["linear", "cosine", "quad", "sigmoid"]), st.integers(2, 2000), st.data())
def test_ddim_eta_one_is_the_ancestral_step(name, T, data):
    d = ddpm.Diffusion(ddpm.beta_schedule(name, T))
    steps = data.draw(st.integers(1, T))
    anc = ddpm.make_plan(d, "ancestral", steps, spacing="linspace")
    ddim = ddpm.make_plan(d, "ddim", steps, eta=1.0, spacing="linspace")
    np.testing.assert_array_equal(anc.t, ddim.t)
    np.testing.assert_allclose(ddim.mean_x0, anc.mean_x0, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ddim.mean_xt, anc.mean_xt, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ddim.sigma[anc.add_noise], anc.sigma[anc.add_noise], rtol=1e-6)
    np.testing.assert_array_equal(ddim.add_noise, anc.add_noise)


@given(st.sampled_from(["uniform", "linspace", "trailing", "quadratic"]), st.integers(2, 4000), st.data())
def test_spacings_are_increasing_subsets(spacing, T, data):
    steps = data.draw(st.integers(1, T))
    try:
        ts = ddpm.space_timesteps(T, steps, spacing)
    except ValueError as e:
        assert spacing == "quadratic" and "distinct" in str(e)
        return
    assert len(ts) == steps and ts[0] >= 0 and ts[-1] <= T - 1 and (np.diff(ts) > 0).all()
    if spacing == "trailing":
        assert ts[-1] == T - 1


@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3))
def test_normal_kl_zero_for_identical_and_nonnegative(m1, lv1, m2, lv2):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert abs(ddpm.normal_kl(t(m1), t(lv1), t(m1), t(lv1)).item()) < 1e-12
    assert ddpm.normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item() >= -1e-12


@given(st.floats(-1.5, 1.5), st.floats(-6, 1))
def test_discretized_decoder_sums_to_one(mean, log_scale):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = ddpm.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert math.isclose(lp.exp().sum().item(), 1.0, rel_tol=1e-6)


def test_known_values():
    # alpha_bar_T of Ho et al.'s linear schedule (T = 1000) and beta_1 of the cosine schedule, computed
    # independently: prod(1 - linspace(1e-4, 0.02)) and 1 - cos^2((1/T + s) / (1 + s) pi/2) / cos^2(s / (1 + s) pi/2).
    assert math.isclose(np.prod(1 - ddpm.beta_schedule("linear", 1000)), 4.035829e-05, rel_tol=1e-5)
    assert math.isclose(ddpm.beta_schedule("linear", 1000)[-1], 0.02) and ddpm.beta_schedule("linear", 500)[0] == 2e-4
    assert math.isclose(ddpm.beta_schedule("cosine", 1000)[0], 4.12842e-05, rel_tol=1e-5)
    assert ddpm.beta_schedule("cosine", 1000).max() == 0.999
    np.testing.assert_allclose(ddpm.beta_schedule("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1])


def test_zero_terminal_snr():
    betas = ddpm.rescale_zero_terminal_snr(ddpm.beta_schedule("linear", 1000))
    ab = np.cumprod(1 - betas)
    assert ab[-1] == 0 and math.isclose(ab[0], 1 - 1e-4, rel_tol=1e-12)
    with pytest.raises(ValueError, match="v or x0"):
        ddpm.Diffusion(betas, "eps")
    ddpm.Diffusion(betas, "v")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="schedule must be one of"):
        ddpm.beta_schedule("cosin", 10)
    with pytest.raises(ValueError, match="variance must be one of"):
        ddpm.Diffusion(ddpm.beta_schedule("linear", 10), variance="small")
    with pytest.raises(ValueError, match="steps must be in"):
        ddpm.space_timesteps(10, 11)

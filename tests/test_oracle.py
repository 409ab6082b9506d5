"""With the closed-form optimal denoiser every sampler is a chain whose answer is known: nothing is trained."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from ddpm_reference import ddpm
from oracle import GaussianOracle, MixtureOracle

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
]


@pytest.mark.parametrize("schedule,T,variance,param,sampler,steps,eta,spacing", CASES)
def test_sampler_moments_match_the_exact_chain(schedule, T, variance, param, sampler, steps, eta, spacing):
    d = ddpm.Diffusion(ddpm.beta_schedule(schedule, T), param, variance)
    oracle = GaussianOracle(d, MU, S, var_out=0.3)
    plan = ddpm.make_plan(d, sampler, steps, eta=eta, spacing=spacing, clip=False)
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

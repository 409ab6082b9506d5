"""The training recipe's options against their closed forms: Min-SNR-gamma weights, uniform dequantization,
the learning-rate decay and the EMA decay's warm-up."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ddpm_reference import ddpm, unet
from ddpm_reference.data import load_digits_data


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["eps", "v", "x0"]), st.sampled_from(["linear", "cosine"]), st.floats(0.1, 20.0),
       st.integers(0, 2**31 - 1))
def test_min_snr_loss_is_the_x0_error_times_min_snr_gamma(parameterization, schedule, gamma, seed):
    """Hang et al.'s Min-SNR-gamma is min(SNR(t), gamma) ||x0_hat - x0||^2, whatever the network predicts."""
    d = ddpm.Diffusion(ddpm.beta_schedule(schedule, 200), parameterization)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.rand(16, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(16, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 200, (16,), generator=g)
    weight = torch.randn(1, dtype=torch.float64, generator=g)
    model = lambda x_t, t_: torch.tanh(weight * x_t) + 0.01 * t_[:, None, None, None]  # noqa: E731
    loss = ddpm.training_losses(d, model, x0, t, noise, weighting="min-snr", snr_gamma=gamma)
    x_t = d.q_sample(x0, t, noise)
    x0_hat = d.to_x0(x_t, t, model(x_t, t), parameterization)
    snr = torch.as_tensor(d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-10)


def test_min_snr_weights_are_one_where_snr_is_below_gamma_for_eps_and_saturate_above():
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000), "eps")
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    w = ddpm.min_snr_weights(d, 5.0)
    assert np.all(w[snr <= 5] == 1.0) and np.all(w[snr > 5] < 1.0) and (snr > 5).any() and (snr < 5).any()
    np.testing.assert_allclose((w * snr)[snr > 5], 5.0)


@pytest.mark.parametrize("levels", [np.round(np.arange(17) * 255 / 16), np.arange(256), np.array([0, 100, 255])])
def test_dequantization_keeps_each_value_inside_its_own_grey_level(levels):
    levels = levels.astype(np.uint8)
    images = torch.from_numpy(np.random.RandomState(0).choice(levels, size=(4096, 1, 8, 8)))
    width = ddpm.level_width(images)
    assert width == pytest.approx(np.diff(np.unique(levels)).min() / 127.5)
    x0 = ddpm.to_model_range(images)
    x = ddpm.dequantize(x0, width, torch.Generator().manual_seed(0))
    offset = (x - x0).abs()
    assert x.min() >= -1 and x.max() <= 1 and offset.max() <= width / 2 + 1e-6
    # a uniform offset on [0, width / 2]: its mean is width / 4, at every level (the end levels reflected inwards)
    for v in torch.unique(x0):
        assert offset[x0 == v].mean().item() == pytest.approx(width / 4, rel=0.1)


def test_the_digits_grey_level_gap_is_their_smallest_level_step():
    train, _ = load_digits_data()
    assert ddpm.level_width(torch.from_numpy(train)) == pytest.approx(np.diff(np.unique(train)).min() / 127.5)
    assert len(np.unique(train)) == 17


def test_cosine_learning_rate_decay_warms_up_then_falls_to_zero_through_half_way():
    cfg = ddpm.TrainConfig(steps=1100, warmup=100, lr=1e-3, lr_decay="cosine")
    lrs = np.array([ddpm.lr_at(s, cfg) for s in range(cfg.steps)])
    assert lrs[99] == pytest.approx(1e-3) and np.all(np.diff(lrs[:100]) > 0) and np.all(np.diff(lrs[100:]) < 0)
    assert lrs[600] == pytest.approx(0.5e-3) and lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 999 / 1000)))
    constant = ddpm.TrainConfig(steps=1100, warmup=100, lr=1e-3)
    assert {ddpm.lr_at(s, constant) for s in range(99, 1100)} == {1e-3}


@pytest.mark.parametrize("dropout", [None, 0.0, 0.3])
def test_dropout_overrides_the_presets(dropout):
    cfg = ddpm.TrainConfig(dropout=dropout)
    rates = {m.p for m in ddpm.make_model(cfg, (1, 8, 8)).modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {unet.PRESETS["digits"]["dropout"] if dropout is None else dropout}

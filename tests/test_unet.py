import math
import warnings

import numpy as np
import pytest
import torch

from unet import PRESETS, UNet, build_unet, count_parameters, flops_per_forward, timestep_embedding

TINY = dict(in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, image_size=16)


def on_meta(preset: str) -> UNet:
    with torch.device("meta"):
        return build_unet(preset)


def perturbed(model: UNet, seed: int = 0) -> UNet:
    """Weights moved off the zero init, so that every input (t included) reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def inputs(model: UNet, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c, s = model.config["in_channels"], model.config["image_size"]
    return torch.randn(batch, c, s, s, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def test_cifar10_has_the_papers_parameter_count():
    assert count_parameters(on_meta("cifar10")) == 35_746_307


@pytest.mark.parametrize("preset", ["celebahq256", "lsun256"])
def test_256_presets_have_about_114m_parameters(preset):
    assert 110_000_000 <= count_parameters(on_meta(preset)) <= 120_000_000


def test_digits_preset_is_small():
    assert count_parameters(build_unet("digits")) < 2_000_000


def test_bad_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="cifar10.*digits"):
        build_unet("imagenet")


def test_config_rebuilds_the_same_architecture():
    model = build_unet("digits", out_channels=2)
    rebuilt = UNet(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_timestep_embedding_matches_the_original_formula():
    t = torch.tensor([0, 1, 17, 999])
    for dim in (6, 7, 128):
        half = dim // 2
        freqs = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
        args = t.numpy()[:, None] * freqs[None, :]
        want = np.concatenate([np.sin(args), np.cos(args), np.zeros((4, dim % 2))], axis=1)
        np.testing.assert_allclose(timestep_embedding(t, dim).numpy(), want, atol=1e-4)


@pytest.mark.parametrize("config", [PRESETS["digits"], TINY])
@pytest.mark.parametrize("out_channels", [None, "2C"])
def test_forward_shape(config, out_channels):
    c = config["in_channels"]
    model = UNet(**{**config, "out_channels": 2 * c if out_channels else None})
    x, t = inputs(model, 3)
    assert model(x, t).shape == (3, 2 * c if out_channels else c, *x.shape[2:])


def test_int_and_float_timesteps_agree():
    model = perturbed(UNet(**TINY)).eval()
    x, t = inputs(model, 2)
    torch.testing.assert_close(model(x, t), model(x, t.float()), rtol=0, atol=0)


def test_batch_elements_are_independent():
    model = perturbed(build_unet("digits")).eval()
    x, t = inputs(model, 4)
    with torch.no_grad():
        together = model(x, t)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_output_is_zero_at_init_and_moves_after_one_step():
    torch.manual_seed(0)
    model = UNet(**TINY)
    x, t = inputs(model, 2)
    assert model(x, t).abs().max() == 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (model(x, t) - torch.randn_like(x)).pow(2).mean().backward()
    opt.step()
    assert model.eval()(x, t).abs().max() > 0


def test_timestep_changes_the_output():
    model = perturbed(UNet(**TINY)).eval()
    x, t = inputs(model, 2)
    diff = (model(x, t) - model(x, t + 100)).abs().max()
    assert diff > 1e-3


def test_channels_last_and_bf16_autocast():
    model = perturbed(UNet(**TINY)).eval()
    x, t = inputs(model, 2)
    with torch.no_grad():
        want = model(x, t)
        cl_model = UNet(**TINY).to(memory_format=torch.channels_last)
        cl_model.load_state_dict(model.state_dict())
        got = cl_model.eval()(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - want).abs().max() < 0.1 * want.abs().max()


def test_flops_per_forward():
    digits = flops_per_forward(build_unet("digits"))
    assert digits > 0 and flops_per_forward(build_unet("digits"), batch=3) == 3 * digits
    # Ho et al.'s CIFAR-10 model is about 6 GMACs (12 GFLOPs) per image.
    assert 10e9 < flops_per_forward(on_meta("cifar10")) < 15e9


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_with_dynamic_batch_matches_torch(tmp_path, dynamo):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = perturbed(build_unet("digits")).eval()
    path = tmp_path / "unet.onnx"
    if dynamo:  # example batch 2: torch.export would specialise a batch of 1
        batch = torch.export.Dim("batch")
        kw = dict(dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, external_data=False, verbose=False)
    else:
        kw = dict(dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs(model, 2), path, input_names=["x", "t"], output_names=["eps"],
                          opset_version=17, dynamo=dynamo, **kw)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        x, t = inputs(model, b, seed=b)
        (got,) = session.run(None, {"x": x.numpy(), "t": t.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x, t).numpy(), rtol=0, atol=1e-4)

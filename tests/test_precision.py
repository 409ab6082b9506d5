"""Precision: the auto choice (simulated machines), bf16 sampling in torch and int8 ONNX files in onnxruntime and
the C++ runner, against the exact moments of an oracle network and against float32 on a U-Net."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ddpm_reference import ddpm, unet
from ddpm_reference import precision as prec
from ddpm_reference.export import onnx_export
from ddpm_reference.export.onnx_sampler import OnnxSampler
from oracle import GaussianOracle
from conftest import run_runner as run

MU, S, T, IMAGE = 0.3, 0.5, 100, (1, 8, 8)


def simulate(monkeypatch, *, amx=False, avx512_bf16=False, cuda_bf16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")


@pytest.mark.parametrize("machine,device,want", [
    ({}, "cpu", "fp32"), ({"avx512_bf16": True}, "cpu", "bf16"), ({"amx": True}, "cpu", "bf16"),
    ({"avx512_bf16": True}, "cuda", "fp32"), ({"cuda_bf16": True}, "cuda", "bf16"), ({"cuda_bf16": True}, "cpu", "fp32"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, machine, device, want):
    simulate(monkeypatch, **machine)
    chosen, why = prec.resolve_precision("auto", torch.device(device))
    assert chosen == want and why.startswith("auto: ")
    assert prec.resolve_precision("fp32", torch.device(device)) == ("fp32", "as asked")


@pytest.mark.slow
def test_training_default_is_auto_and_fp32_without_bf16(monkeypatch):
    assert ddpm.TrainConfig().precision == "auto"
    cfg = ddpm.TrainConfig(steps=1, batch_size=4, T=T)
    simulate(monkeypatch)
    trainer = ddpm.Trainer(cfg, IMAGE, torch.device("cpu"))
    assert trainer.precision == "fp32" and trainer.autocast is None
    simulate(monkeypatch, avx512_bf16=True)
    trainer = ddpm.Trainer(cfg, IMAGE, torch.device("cpu"))
    assert trainer.precision == "bf16" and trainer.autocast is torch.bfloat16
    data = torch.randint(0, 256, (16, *IMAGE), dtype=torch.uint8)
    trainer.train_step(data)
    assert torch.isfinite(trainer.running) and trainer.step == 1 and not trainer.bad
    with pytest.raises(ValueError, match="precision must be one of"):
        prec.resolve_precision("int4", torch.device("cpu"))


class OracleNet(torch.nn.Module):
    """GaussianOracle's exact eps (affine in x_t: a_t x_t + b_t) as a network whose weights are the a_t and b_t,
    read by Linear layers from one-hot(t): the numbers a precision rounds (bf16 weights; int8 MatMul weights)."""

    def __init__(self, diffusion: ddpm.Diffusion, mu: float, s: float):
        super().__init__()
        ab = diffusion.alphas_cumprod
        g = GaussianOracle(diffusion, mu, s).gain(ab)
        # x0 = mu (1 - g sqrt(ab)) + g x_t and eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
        a = (1 - np.sqrt(ab) * g) / np.sqrt(1 - ab)
        b = -np.sqrt(ab) * mu * (1 - g * np.sqrt(ab)) / np.sqrt(1 - ab)
        self.T = len(ab)
        self.scale, self.shift = torch.nn.Linear(self.T, 1, bias=False), torch.nn.Linear(self.T, 1, bias=False)
        with torch.no_grad():
            self.scale.weight.copy_(torch.tensor(a, dtype=torch.float32)[None])
            self.shift.weight.copy_(torch.tensor(b, dtype=torch.float32)[None])

    def forward(self, x, t):
        onehot = torch.nn.functional.one_hot(t, self.T).float()
        return x * self.scale(onehot)[:, :, None, None] + self.shift(onehot)[:, :, None, None]


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory):
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", T))
    net = OracleNet(d, MU, S).eval()
    images = (MU + S * torch.randn(256, *IMAGE, generator=torch.Generator().manual_seed(0))).numpy()
    folder = tmp_path_factory.mktemp("oracle")
    files = {}
    for precision in ("fp32", "int8"):
        files[precision] = folder / f"oracle-{precision}.onnx"
        report = onnx_export.export_onnx(net, d, IMAGE, files[precision], precision=precision, calibration_images=images,
                                         clip_denoised=False)
        assert report["precision"] == precision and report["checks"]
    return d, net, files


def test_the_oracle_network_is_the_oracle(oracle_files):
    d, net, _ = oracle_files
    x, t = torch.randn(6, *IMAGE), torch.tensor([0, 1, 50, 98, 99, 7])
    torch.testing.assert_close(net(x, t), GaussianOracle(d, MU, S)(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("executor", ["torch fp32", "torch bf16", "onnxruntime int8"])
def test_reduced_precision_hits_the_exact_moments(oracle_files, executor):
    """DDIM (20 steps, no clipping) from the oracle network: the samples' mean and variance are the closed-form
    ones (GaussianOracle.exact_moments) within Monte-Carlo error plus a rounding allowance (bf16: ~3 digits;
    int8: 1/127 of each weight's range), and the reduced precisions really round (they differ from float32)."""
    d, net, files = oracle_files
    plan = ddpm.make_plan(d, "ddim", 20, clip=False)
    mean, var = GaussianOracle(d, MU, S).exact_moments(plan)
    n = 512
    if executor.startswith("torch"):
        model = prec.AtPrecision(net, executor.split()[1])
        x = ddpm.sample(model, plan, (n, *IMAGE), ddpm.numpy_noise(0, torch.device("cpu"))).numpy()
        assert x.dtype == np.float32
    else:
        sampler = OnnxSampler(files["int8"], provider="cpu", threads=1)
        x = sampler.sample(n, "ddim", 20, clip=False, seed=0)
    ref = OnnxSampler(files["fp32"], provider="cpu", threads=1).sample(n, "ddim", 20, clip=False, seed=0)
    assert np.isfinite(x).all()
    se = np.sqrt(var / x.size)
    allowance = {"torch fp32": 0.0, "torch bf16": 0.01, "onnxruntime int8": 0.03}[executor]
    assert abs(x.mean() - mean) < 5 * se + allowance * abs(MU)
    assert abs(x.var() / var - 1) < 5 * np.sqrt(2 / x.size) + 2 * allowance
    diff = np.abs(x - ref).max()
    assert (diff < 1e-4) if executor == "torch fp32" else (1e-4 < diff < 0.1)


def test_int8_file_runs_unchanged_in_the_cpp_runner(runner, oracle_files, tmp_path):
    """The C++ runner reads the quantized file as any other and gives the onnxruntime sampler's samples."""
    _, _, files = oracle_files
    want = OnnxSampler(files["int8"], provider="cpu", threads=1).sample(5, "ddim", 10, clip=False, seed=3, batch=2)
    run(runner, "--model", files["int8"], "--num-samples", 5, "--batch-size", 2, "--sampler", "ddim", "--steps", 10,
        "--no-clip", "--seed", 3, "--threads", 1, "--out", tmp_path / "x.npy")
    got = np.load(tmp_path / "x.npy")
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-3


def unet_with_outputs():
    torch.manual_seed(0)
    net = unet.build_unet("digits").eval()
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-initialised: make the output depend on the weights
    return net


def test_bf16_unet_is_close_to_fp32_and_really_bf16():
    net = unet_with_outputs()
    x, t = torch.randn(16, *IMAGE), torch.randint(0, 1000, (16,))
    with torch.no_grad():
        want, got = net(x, t), prec.AtPrecision(net, "bf16")(x, t)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert 1e-4 < rel < 0.05
    assert next(prec.AtPrecision(net, "bf16").model.parameters()).dtype == torch.bfloat16
    assert prec.AtPrecision(net, "fp32").model is net


@pytest.mark.slow
def test_int8_torch_network_is_int8_close_to_fp32_and_compiles_to_the_same_function():
    """--precision int8 in PyTorch: every convolution and linear layer reads int8 weights (per output channel) and
    uint8 activations, calibrated on noisy images at uniform t, and differs from float32 by the quantization's error
    (the export's bound, 10%); compiled (the int8 kernels) it is the same function within 1% of its output, for a
    batch it was not traced with."""
    net = unet_with_outputs()
    diffusion = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    images = torch.rand(128, *IMAGE).mul(2).sub(1).numpy()
    quantized = prec.AtPrecision(net, "int8", onnx_export.noisy_inputs(images, diffusion.betas, 0))
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in net.modules())
    graph = quantized.model.graph
    weights = [n for n in graph.nodes if n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default]
    x, t = torch.randn(5, *IMAGE), torch.randint(0, 1000, (5,))
    float32 = prec.concat_readers(torch.export.export(net, (x, t)).graph)  # the decoder's shortcuts over [h, skip]
    assert float32 and all(name.startswith("up.") and name.endswith(".res.shortcut") for name in float32)
    assert len(weights) == layers - len(float32) and all(n.args[-1] == torch.int8 for n in weights)
    with torch.no_grad():
        want, got = net(x, t), quantized(x, t)
        compiled = prec.compile_for_sampling(quantized)(x, t)
    relative = lambda a, b: ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()  # noqa: E731
    assert 1e-3 < relative(got, want) < 0.1 and relative(compiled, got) < 0.01


def test_int8_without_torchao_says_what_to_install(monkeypatch):
    import sys
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(prec.Int8Error, match=r"needs torchao .*pip install 'ddpm-reference\[int8\]'"):
        prec.quantize_int8(unet_with_outputs(), [(torch.randn(2, *IMAGE), torch.tensor([1, 2]))])


def test_int8_runs_on_the_cpu_only():
    with pytest.raises(prec.Int8Error, match="int8 runs on the CPU"):
        prec.resolve_precision("int8", torch.device("cuda"))
    assert prec.resolve_precision("int8", torch.device("cpu")) == ("int8", "as asked")


def test_int8_export_of_a_unet_within_tolerance_and_refused_past_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quantizer's scratch files must not land in the working folder
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    images = np.random.default_rng(0).uniform(-1, 1, (64, *IMAGE)).astype(np.float32)
    report = onnx_export.export_onnx(unet_with_outputs(), d, IMAGE, tmp_path / "u8.onnx", precision="int8",
                                     calibration_images=images)
    rel = max(c["relative_rms"] for c in report["checks"])
    assert 0 < rel <= onnx_export.INT8_TOLERANCE and report["tolerance"] == onnx_export.INT8_TOLERANCE
    assert OnnxSampler(tmp_path / "u8.onnx").metadata["ddpm.precision"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u8.onnx"]

    class Wide(torch.nn.Module):
        """Reads a channel 10^4 times smaller than its neighbour: one int8 scale per tensor rounds it to 0."""

        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.Conv2d(2, 1, 1, bias=False)
            with torch.no_grad():
                self.c1.weight.copy_(torch.tensor([1e4, 1.0]).reshape(2, 1, 1, 1))
                self.c2.weight.copy_(torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1))

        def forward(self, x, t):
            return self.c2(self.c1(x)) + 0 * t[:, None, None, None]

    with pytest.raises(onnx_export.ExportError, match="relative RMS error"):
        onnx_export.export_onnx(Wide().eval(), d, IMAGE, tmp_path / "wide.onnx", precision="int8", calibration_images=images)
    assert not (tmp_path / "wide.onnx").exists()
    with pytest.raises(onnx_export.ExportError, match="calibration images"):
        onnx_export.export_onnx(Wide().eval(), d, IMAGE, tmp_path / "wide.onnx", precision="int8")


class Joined(torch.nn.Module):
    """A convolution over a concatenation of channels 10^3 apart in range, whose output is the small one's: one
    int8 scale over both rounds the small channel to 0 (the U-Net decoder's shortcut over [h, skip])."""

    def __init__(self):
        super().__init__()
        self.big, self.small = torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.Conv2d(1, 1, 1, bias=False)
        self.joined = torch.nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.big.weight.fill_(1e3), self.small.weight.fill_(1.0)
            self.joined.weight.copy_(torch.tensor([1e-6, 1.0]).reshape(1, 2, 1, 1))

    def forward(self, x, t):
        return self.joined(torch.cat([self.big(x), self.small(x)], 1)) + 0 * t[:, None, None, None]


def test_int8_keeps_a_convolution_over_a_concatenation_in_float32(tmp_path, monkeypatch):
    """Both int8 paths leave the convolution that reads a concatenation in float32 (and only it): quantized,
    Joined's output would be 0 (relative error 1), refused by the export."""
    monkeypatch.chdir(tmp_path)
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    images = np.random.default_rng(0).uniform(-1, 1, (64, *IMAGE)).astype(np.float32)
    report = onnx_export.export_onnx(Joined().eval(), d, IMAGE, tmp_path / "j.onnx", precision="int8",
                                     calibration_images=images)
    assert max(c["relative_rms"] for c in report["checks"]) < 0.1  # int8's rounding of x; quantized joined: ~1
    graph = onnx.load(tmp_path / "j.onnx").graph
    produced_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = {node.name: produced_by.get(node.input[0]) for node in graph.node if node.op_type == "Conv"}
    assert sorted(convs.values()) == ["Concat", "DequantizeLinear", "DequantizeLinear"], convs

    inputs = onnx_export.noisy_inputs(images, d.betas, 0)
    quantized = prec.AtPrecision(Joined().eval(), "int8", inputs)
    x, t = inputs[0]
    with torch.no_grad():
        want, got = Joined().eval()(x, t), quantized(x, t)
    assert ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item() < 0.1


@pytest.mark.slow
def test_compiled_sampling_network_matches_eager():
    """compile_for_sampling (inductor, frozen weights) computes what the eager module does, in a sampler."""
    torch.manual_seed(0)
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", T))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = torch.nn.Embedding(T, 4), torch.nn.Conv2d(1, 4, 3, padding=1)
            self.out = torch.nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x, t):
            return self.out(torch.nn.functional.silu(self.conv(x) + self.emb(t)[:, :, None, None]))

    net = prec.AtPrecision(Tiny().eval(), "fp32")
    net.class_names = ["a"]
    compiled = prec.compile_for_sampling(net)
    plan = ddpm.make_plan(d, "ddim", 5)
    want = ddpm.sample(net, plan, (4, *IMAGE), ddpm.numpy_noise(0, torch.device("cpu")))
    got = ddpm.sample(compiled, plan, (4, *IMAGE), ddpm.numpy_noise(0, torch.device("cpu")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert compiled.class_names == ["a"]

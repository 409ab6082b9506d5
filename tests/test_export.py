"""export/: the torch -> ONNX round trip, the numpy plan of onnx_sampler against ddpm.make_plan, the onnxruntime
sampler against the torch sampler on the same noise, the sampler without torch, and one-line errors for files
that are not DDPM models."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from ddpm_reference import ddpm
from ddpm_reference.export import onnx_sampler
from ddpm_reference.export.onnx_export import FP16_TOLERANCE, ExportError, export_onnx, metadata
from ddpm_reference.export.onnx_sampler import DEFAULT_GUIDANCE, ModelError, OnnxSampler, save_images

try:
    from ddpm_reference import unet
except ImportError:  # the U-Net module lives in unet.py; a conv net with the same call signature stands in
    unet = None

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (1, 8, 8)
T = 100


class StandIn(torch.nn.Module):
    """A small conv eps_theta(x, t) that really depends on t, for when unet.py is absent."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.emb = torch.nn.Embedding(T, 16)
        self.c1, self.c2 = torch.nn.Conv2d(IMAGE[0], 16, 3, padding=1), torch.nn.Conv2d(16, out_channels, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.c2(torch.nn.functional.silu(self.c1(x) + self.emb(t)[:, :, None, None])))


def make_net(preset: str | None, out_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    """The digits U-Net (preset "digits") or a small U-Net (None), with every weight perturbed so that the
    zero-initialised output layers give a non-trivial eps_theta."""
    torch.manual_seed(seed)
    if unet is None:
        net = StandIn(out_channels)
    elif preset:
        net = unet.build_unet(preset, out_channels=out_channels)
    else:
        net = unet.UNet(in_channels=1, out_channels=out_channels, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                        attn_resolutions=(4,), dropout=0.0, image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def diffusion(parameterization="eps", variance="fixed_small", schedule="linear"):
    return ddpm.Diffusion(ddpm.beta_schedule(schedule, T), parameterization, variance)


def relabel(src: Path, dst: Path, d: ddpm.Diffusion, clip: bool = True, drop: str | None = None) -> Path:
    """A copy of an exported file with the metadata of another diffusion (same network), optionally less one key."""
    model = onnx.load(str(src))
    model.ClearField("metadata_props")
    for key, value in metadata(d, IMAGE, clip).items():
        if key != drop:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches here are tiny: one torch thread is as fast, and does not stall on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    net, d = make_net("digits"), diffusion()
    path = tmp_path_factory.mktemp("digits") / "model.onnx"
    return net, d, path, export_onnx(net, d, IMAGE, path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small U-Net, exported once with C and once with 2C output channels (learned_range)."""
    folder = tmp_path_factory.mktemp("small")
    nets = {c: make_net(None, out_channels=c, seed=c) for c in (1, 2)}
    export_onnx(nets[1], diffusion(), IMAGE, folder / "eps.onnx")
    export_onnx(nets[2], diffusion(variance="learned_range"), IMAGE, folder / "learned.onnx")
    return nets, folder


# ------------------------------------------------------------------------------------------- export
def test_export_round_trip(digits):
    net, d, path, report = digits
    onnx.checker.check_model(str(path), full_check=True)
    assert report["path"] == str(path) and report["opset"] == 17 and report["exporter"] == "torchscript"
    assert report["size_bytes"] == path.stat().st_size and report["precision"] == "fp32"
    assert {(c["batch"], c["t"]) for c in report["checks"]} >= {(b, t) for b in (1, 7) for t in (0, T // 2, T - 1)}
    assert report["max_abs_diff"] <= 1e-4 and not list(path.parent.glob(".tmp-*"))

    model = onnx.load(str(path))
    assert not any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta == metadata(d, IMAGE, True) and meta["ddpm.version"] == ddpm.__version__
    betas = np.array([float(b) for b in meta["ddpm.betas"].split(",")])
    assert betas.dtype == np.float64 and np.array_equal(betas.view(np.uint64), d.betas.view(np.uint64))
    assert [i.name for i in model.graph.input] == ["x", "t"] and model.graph.output[0].name == "model_output"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, t in [(1, 37), (7, 81)]:
        x, ts = torch.randn(b, *IMAGE), torch.full((b,), t)
        with torch.no_grad():
            want = net(x, ts).numpy()
        assert np.abs(session.run(None, {"x": x.numpy(), "t": ts.numpy()})[0] - want).max() <= 1e-4


def test_learned_range_export(small):
    nets, folder = small
    sampler = OnnxSampler(folder / "learned.onnx", provider="cpu", threads=1)
    assert sampler.variance == "learned_range" and sampler.out_channels == 2
    x, t = torch.randn(7, *IMAGE), torch.arange(7) * 13
    with torch.no_grad():
        want = nets[2](x, t).numpy()
    got = sampler.session.run(None, {"x": x.numpy(), "t": t.numpy()})[0]
    assert got.shape == (7, 2, 8, 8) and np.abs(got - want).max() <= 1e-4


def test_fp16_export_within_tolerance(digits, tmp_path):
    net, d, path32, _ = digits
    report = export_onnx(net, d, IMAGE, tmp_path / "half.onnx", precision="fp16")
    assert report["precision"] == "fp16" and report["tolerance"] == FP16_TOLERANCE and report["max_abs_diff"] <= FP16_TOLERANCE
    model = onnx.load(str(tmp_path / "half.onnx"))
    initializers = {i.name: i.data_type for i in model.graph.initializer}
    weights = [name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") for name in n.input
               if name in initializers]
    assert weights and all(initializers[name] == TensorProto.FLOAT16 for name in weights)
    assert report["size_bytes"] < path32.stat().st_size
    io_types = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    assert io_types == [TensorProto.FLOAT, TensorProto.INT64, TensorProto.FLOAT]
    assert {n.op_type for n in model.graph.node} >= {"Cast", "Conv"}
    a = OnnxSampler(tmp_path / "half.onnx", provider="cpu", threads=1).sample(2, sampler="ddim", steps=5, clip=False)
    b = OnnxSampler(path32, provider="cpu", threads=1).sample(2, sampler="ddim", steps=5, clip=False)
    assert np.abs(a - b).max() <= 0.05


class Loud(torch.nn.Module):
    """Outputs of magnitude ~1e4, where float16's 11-bit mantissa cannot stay within 1e-2."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=1e4)

    def forward(self, x, t):
        return self.conv(x)


def test_fp16_refused_when_too_coarse_and_nothing_written(tmp_path):
    with pytest.raises(ExportError, match="float16 is too coarse"):
        export_onnx(Loud(), diffusion(), IMAGE, tmp_path / "loud.onnx", precision="fp16")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


def test_export_errors(tmp_path):
    net = make_net(None)
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx(net, diffusion(), IMAGE, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ExportError, match="it is a folder"):
        export_onnx(net, diffusion(), IMAGE, tmp_path)
    with pytest.raises(ExportError, match="needs 2 output channels"):
        export_onnx(net, diffusion(variance="learned_range"), IMAGE, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- plan
SCHEDULES = {"linear": lambda T: ddpm.beta_schedule("linear", T), "cosine": lambda T: ddpm.beta_schedule("cosine", T),
             "jsd": lambda T: ddpm.beta_schedule("jsd", T),
             "zero_snr": lambda T: ddpm.rescale_zero_terminal_snr(ddpm.beta_schedule("linear", T))}


@pytest.mark.parametrize("schedule,T_", list(itertools.product(SCHEDULES, [1, 10, 100, 1000])))
def test_plan_from_the_file_is_the_diffusion_formulas(schedule, T_):
    """The plan the onnx sampler builds from a file's betas, checked against ddpm.Diffusion's own tables and
    conversions: the respaced posterior (Eq. 6-7) for ancestral, Eq. (12) and (16) of DDIM, and x0 recovered
    from any parameterisation (Diffusion.from_x0 / to_x0)."""
    betas = SCHEDULES[schedule](T_) if T_ > 1 or schedule != "zero_snr" else ddpm.beta_schedule("linear", 1)
    ab_file = np.cumprod(1.0 - betas)  # what OnnxSampler computes from the file's betas (repr round-trips)
    cases = itertools.product(["eps", "x0", "v"], ["fixed_small", "fixed_large", "learned_range"],
                              [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)],
                              [None, 1, 3, 10, T_], ["uniform", "linspace", "trailing", "quadratic"])
    gen = torch.Generator().manual_seed(0)
    for par, var, (sampler, eta), steps, spacing in cases:
        if (steps or 0) > T_ or (par == "eps" and ab_file[-1] == 0):
            continue
        d = ddpm.Diffusion(betas, par, var)
        try:
            plan = onnx_sampler.make_plan(ab_file, par, var, sampler, steps, eta=eta, spacing=spacing)
        except ValueError as e:
            assert spacing == "quadratic" and "distinct" in str(e)
            continue
        sub = d.respace(plan.t[::-1])
        k = torch.arange(len(plan) - 1, -1, -1)  # the respaced process's index of each step, in sampling order
        t = torch.as_tensor(plan.t)
        x, x0 = torch.randn(len(plan), 2, generator=gen, dtype=torch.float64).unbind(1)
        x, x0 = x.view(-1, 1), x0.view(-1, 1)
        col = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64).view(-1, 1)  # noqa: E731
        check = lambda got, want, what: torch.testing.assert_close(  # noqa: E731
            got, want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what} {par} {var} {sampler} {eta} {steps} {spacing}: {m}")
        check(col(plan.x0_x) * x + col(plan.x0_o) * d.from_x0(x, t, x0, par), x0, "x0 from the output")
        step = col(plan.mean_x0) * x0 + col(plan.mean_xt) * x
        noisy = torch.as_tensor(plan.add_noise)
        if sampler == "ancestral":
            mean, variance, log_variance = sub.q_posterior(x0, x, k)
            check(step, mean, "posterior mean")
            want_var = torch.as_tensor(sub.betas[k.numpy()]).view(-1, 1) if var == "fixed_large" else variance
            check(col(plan.sigma)[noisy] ** 2, want_var[noisy], "sigma^2")
            check(col(plan.log_var_min), log_variance, "log beta-tilde (clipped)")
            check(col(plan.log_var_max), torch.as_tensor(sub.log_betas[k.numpy()]).view(-1, 1), "log beta")
        else:
            ab_prev = torch.as_tensor(sub.alphas_cumprod_prev[k.numpy()]).view(-1, 1)
            sigma = col(plan.sigma)
            check(sigma, eta * sub.q_posterior(x0, x, k)[1].sqrt(), "Eq. (16)")
            eps = d.from_x0(x, t, x0, "eps")
            want = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            check(step, want, "Eq. (12)")
        assert (plan.learned == (var == "learned_range" and sampler == "ancestral")).all() and plan.memory == 0
        assert plan.add_noise.tolist() == [i < len(plan) - 1 and (sampler == "ancestral" or eta > 0)
                                           for i in range(len(plan))]


def test_plan_option_errors(small):
    sampler = OnnxSampler(small[1] / "eps.onnx", provider="cpu", threads=1)
    for kwargs, message in [({"sampler": "euler"}, "sampler must be one of"), ({"steps": T + 1}, "steps must be in"),
                            ({"spacing": "log"}, "spacing must be one of"), ({"eta": 2.0}, "eta must be in"),
                            ({"spacing": "quadratic", "steps": 20}, "cannot give 20 distinct steps"),
                            ({"sampler": "unipc", "corrector_steps": 1}, "one-step samplers"),
                            ({"batch": 0}, "positive integers")]:
        with pytest.raises(ValueError, match=message):
            sampler.sample(2, **kwargs)


# ------------------------------------------------------------------------------------------ sampler
SAMPLE_CASES = [  # (parameterization, variance, sampler, steps, eta, spacing, clip, n, batch)
    ("eps", "fixed_small", "ancestral", None, 0.0, "uniform", None, 2, None),
    ("eps", "fixed_small", "ddim", 20, 0.0, "uniform", None, 5, 2),
    ("eps", "fixed_large", "ancestral", 25, 0.0, "linspace", False, 3, 2),
    ("v", "fixed_small", "ddim", 10, 0.5, "trailing", False, 3, None),
    ("x0", "fixed_small", "ddim", 8, 1.0, "quadratic", True, 2, 1),
    ("eps", "learned_range", "ancestral", 20, 0.0, "uniform", False, 3, 2),
    ("eps", "learned_range", "ddim", 10, 0.5, "linspace", None, 2, None),
    ("eps", "fixed_small", "dpmpp2m", 10, 0.0, "logsnr", None, 3, 2),
    ("v", "fixed_small", "dpmpp2m", 6, 0.0, "trailing", False, 2, None),
    ("x0", "fixed_small", "dpmpp2m-sde", 8, 0.0, "uniform", True, 3, 2),
    ("eps", "learned_range", "dpmpp2m-sde", 8, 0.0, "logsnr", None, 2, None),
    ("eps", "fixed_small", "dpmpp3m", 10, 0.0, "logsnr", None, 3, 2),  # M = 2
    ("v", "learned_range", "unipc", 8, 0.0, "trailing", False, 3, 2),  # M = 3
    ("x0", "fixed_small", "unipc", 6, 0.0, "uniform", True, 2, None),
    ("eps", "fixed_small", "ancestral+2", 6, 0.0, "uniform", None, 3, 2),  # +K: K Langevin corrector rows
    ("eps", "learned_range", "ancestral+1", 6, 0.0, "linspace", False, 2, None),
    ("v", "fixed_small", "ddim+1", 5, 0.5, "trailing", None, 2, None),
]


@pytest.mark.parametrize("par,var,sampler,steps,eta,spacing,clip,n,batch", SAMPLE_CASES)
def test_onnx_sampler_matches_torch_sampler(small, tmp_path, par, var, sampler, steps, eta, spacing, clip, n, batch):
    nets, folder = small
    d = diffusion(par, var)
    c = 2 if var == "learned_range" else 1
    path = relabel(folder / ("learned.onnx" if c == 2 else "eps.onnx"), tmp_path / "m.onnx", d)
    seed = 2**31 + 5
    sampler, K = sampler.split("+") if "+" in sampler else (sampler, 0)
    got = OnnxSampler(path, provider="cpu", threads=1).sample(n, sampler, steps, eta=eta, spacing=spacing, clip=clip,
                                                              seed=seed, batch=batch, corrector_steps=int(K))
    plan = ddpm.make_plan(d, sampler, steps, eta=eta, spacing=spacing, clip=True if clip is None else clip,
                          corrector_steps=int(K))
    noise = ddpm.numpy_noise(seed)  # one stream, batches in order, as the onnx sampler draws it
    batch = batch or n
    want = torch.cat([ddpm.sample(nets[c], plan, (min(batch, n - i), *IMAGE), noise) for i in range(0, n, batch)])
    assert got.shape == (n, *IMAGE) and got.dtype == np.float32
    assert np.abs(got - want.numpy()).max() <= 1e-3


def test_progress_and_timing(small):
    calls = []
    x, timing = OnnxSampler(small[1] / "eps.onnx", provider="cpu", threads=1).sample(
        3, sampler="ddim", steps=4, batch=2, progress=lambda k, total: calls.append((k, total)), return_timing=True)
    assert calls == [(k, 8) for k in range(1, 9)]
    assert set(timing) == {"total_s", "network_s", "steps", "provider", "precision", "precision_why"}
    assert timing["steps"] == 4 and (timing["precision"], timing["precision_why"]) == ("fp32", "the file's ddpm.precision")
    assert 0 < timing["network_s"] <= timing["total_s"] and timing["provider"] == "CPUExecutionProvider"


CLASSES = ("cat", "dog", "eel")


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """Small class-conditional U-Nets (3 classes; C and 2C output channels), exported."""
    folder = tmp_path_factory.mktemp("conditional")
    nets = {}
    for c, var in ((1, "fixed_small"), (2, "learned_range")):
        torch.manual_seed(c)
        net = unet.UNet(in_channels=1, out_channels=c, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0, image_size=8, num_classes=len(CLASSES))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets[c] = net.eval()
        export_onnx(net, diffusion(variance=var), IMAGE, folder / f"cond{c}.onnx", classes=CLASSES)
    return nets, folder


GUIDED_CASES = [  # (channels, sampler, steps, eta, spacing, guidance)
    (1, "ddim", 10, 0.0, "uniform", 1.0), (1, "ddim", 10, 0.5, "trailing", 2.5), (1, "ancestral", 12, 0.0, "linspace", 0.0),
    (1, "dpmpp2m", 8, 0.0, "logsnr", 3.0), (2, "ancestral", 10, 0.0, "uniform", 2.0), (2, "ddim", 6, 0.0, "uniform", 1.0),
    (1, "unipc", 8, 0.0, "trailing", 2.0),
]


@pytest.mark.parametrize("c,sampler,steps,eta,spacing,guidance", GUIDED_CASES)
def test_guided_onnx_sampler_matches_torch(conditional, c, sampler, steps, eta, spacing, guidance):
    nets, folder = conditional
    d = diffusion(variance="learned_range" if c == 2 else "fixed_small")
    onnx_sampler_ = OnnxSampler(folder / f"cond{c}.onnx", provider="cpu", threads=1)
    assert (onnx_sampler_.num_classes, onnx_sampler_.class_names) == (3, list(CLASSES))
    n, batch, seed = 5, 3, 11
    labels = ddpm.balanced_labels([2, 0], n)
    got = onnx_sampler_.sample(n, sampler, steps, eta=eta, spacing=spacing, seed=seed, batch=batch, labels=labels,
                               guidance=guidance)
    plan, noise = ddpm.make_plan(d, sampler, steps, eta=eta, spacing=spacing), ddpm.numpy_noise(seed)
    want = torch.cat([ddpm.sample(ddpm.classifier_free_guidance(nets[c], torch.as_tensor(labels[i:i + batch]), guidance, 3),
                                  plan, (min(batch, n - i), *IMAGE), noise) for i in range(0, n, batch)])
    assert np.abs(got - want.numpy()).max() <= 1e-3


def test_guidance_one_and_zero_are_the_conditional_and_unconditional_models_and_the_default_is_the_constant(
        conditional):
    nets, folder = conditional
    sampler = OnnxSampler(folder / "cond1.onnx", provider="cpu", threads=1)
    labels = np.array([1, 1, 2])
    default = sampler.sample(3, "ddim", 5, seed=4, labels=labels)
    assert np.array_equal(default, sampler.sample(3, "ddim", 5, seed=4, labels=labels, guidance=DEFAULT_GUIDANCE))
    cond = sampler.sample(3, "ddim", 5, seed=4, labels=labels, guidance=1.0)
    guided = sampler.sample(3, "ddim", 5, seed=4, labels=labels, guidance=2.0)
    assert not np.allclose(guided, cond)
    uncond = sampler.sample(3, "ddim", 5, seed=4)  # no labels: the null label
    assert np.array_equal(uncond, sampler.sample(3, "ddim", 5, seed=4, labels=labels, guidance=0.0))
    assert not np.allclose(cond, uncond)
    # the batch-of-2B path at s = 1 gives the single-batch result (to float32 rounding of o_u + (o_c - o_u))
    x, t, y = torch.randn(3, *IMAGE), torch.tensor([5, 50, 99]), torch.as_tensor(labels)
    with torch.no_grad():
        two_b = ddpm.guided_output(nets[1], x, t, y, 1.0, 3)
        torch.testing.assert_close(two_b, nets[1](x, t, y), rtol=0, atol=1e-6)


def test_conditional_export_and_label_errors(conditional, small, tmp_path):
    nets, folder = conditional
    model = onnx.load(str(folder / "cond1.onnx"))
    assert [i.name for i in model.graph.input] == ["x", "t", "y"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["ddpm.num_classes"], meta["ddpm.null_label"], meta["ddpm.class_names"]) == ("3", "3", '["cat", "dog", "eel"]')
    sampler = OnnxSampler(folder / "cond1.onnx", provider="cpu", threads=1)
    for kwargs, message in [({"labels": [0, 3]}, "0..2"), ({"labels": [0]}, "2 whole numbers"),
                            ({"guidance": 2.0}, "needs labels")]:
        with pytest.raises(ValueError, match=message):
            sampler.sample(2, "ddim", 3, **kwargs)
    with pytest.raises(ValueError, match="unconditional model"):
        OnnxSampler(small[1] / "eps.onnx", provider="cpu").sample(2, "ddim", 3, labels=[0, 1])


@pytest.mark.parametrize("par", ["eps", "v"])
def test_onnx_encode_and_decode_from_given_x_match_torch(small, tmp_path, par):
    """OnnxSampler.run from the caller's x (DDIM inversion, then decoding, as `ddpm reconstruct` runs them),
    against ddpm.run_plan; the caller's array is left as it was."""
    nets, folder = small
    d = diffusion(par)
    sampler = OnnxSampler(relabel(folder / "eps.onnx", tmp_path / "m.onnx", d), provider="cpu", threads=1)
    x0 = np.random.RandomState(0).uniform(-1, 1, (5, *IMAGE)).astype(np.float32)
    given = x0.copy()
    for steps in (2, 3, 10):  # an even and an odd number of rows
        latent = sampler.run(sampler.inversion_plan(steps), given, batch=2)
        want = ddpm.run_plan(nets[1], ddpm.ddim_inversion_plan(d, steps), torch.from_numpy(x0)).numpy()
        assert np.abs(latent - want).max() <= 1e-4 and np.array_equal(given, x0)
        recon = sampler.run(sampler.plan("ddim", steps, clip=False), latent)
        want = ddpm.run_plan(nets[1], ddpm.make_plan(d, "ddim", steps, clip=False), torch.from_numpy(latent)).numpy()
        assert np.abs(recon - want).max() <= 1e-4
    with pytest.raises(ValueError, match="x must be"):
        sampler.run(sampler.inversion_plan(3), given[:, :, :4])


def test_step_graphs_are_valid_onnx():
    for learned, split, memory in itertools.product([False, True], [False, True], [0, 1, 2]):
        if learned and not split:
            continue
        model = onnx.load_from_string(onnx_sampler.step_graph(learned, split, memory))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == ["x", "out", "z", "c"] + [f"x0_{j}" for j in range(1, memory + 1)]
        assert [o.name for o in model.graph.output] == ["x_next"] + (["x0"] if memory else [])


def test_step_graph_with_memory_is_the_row_update():
    """An order-3 row (memory 2) on random inputs equals the update written out in numpy."""
    rng = np.random.default_rng(0)
    x, out, z, e1, e2 = (rng.standard_normal((2, 1, 3, 3)).astype(np.float32) for _ in range(5))
    c = rng.standard_normal(len(onnx_sampler.COEFFICIENTS) + 2).astype(np.float32)
    c[7:11] = [-1, 1, 1, 0.5]  # lo, hi, one, half
    session = ort.InferenceSession(onnx_sampler.step_graph(False, False, 2), providers=["CPUExecutionProvider"])
    x_next, x0 = session.run(None, {"x": x, "out": out, "z": z, "c": c, "x0_1": e1, "x0_2": e2})
    want_x0 = np.clip(c[0] * x + c[1] * out, -1, 1)
    np.testing.assert_array_equal(x0, want_x0)
    np.testing.assert_array_equal(x_next, c[2] * want_x0 + c[3] * x + c[11] * e1 + c[12] * e2 + c[4] * z)


def test_sampler_and_plan_copied_into_an_app_need_no_torch(small, tmp_path):
    """The files the README tells an app to copy (onnx_sampler.py, plan.py, images.py), alone in a folder and
    imported where torch, onnx and this package cannot be imported, sample the same and write the images."""
    for file in ("export/onnx_sampler.py", "plan.py", "images.py"):
        shutil.copy(ROOT / file, tmp_path / Path(file).name)
    model = small[1] / "eps.onnx"
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "ddpm", "unet", "export", "ddpm_reference"):
                    raise ImportError(name + " is not available here")
        sys.meta_path.insert(0, Block())
        sys.path = [{str(tmp_path)!r}] + [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        import numpy as np, onnx_sampler
        x = onnx_sampler.OnnxSampler({str(model)!r}, provider="cpu", threads=1).sample(2, "ddim", 3, seed=7)
        np.save({str(tmp_path / "x.npy")!r}, x)
        onnx_sampler.save_images(x, {str(tmp_path / "x.png")!r})
        assert not {{"torch", "onnx"}} & set(sys.modules), sorted(sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = OnnxSampler(model, provider="cpu", threads=1).sample(2, "ddim", 3, seed=7)
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), want, rtol=0, atol=1e-6)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- errors
def test_files_that_are_not_ours(small, tmp_path):
    good = small[1] / "eps.onnx"
    foreign = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])]), opset_imports=[helper.make_opsetid("", 17)])
    foreign.ir_version = 8
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    for key, value in metadata(diffusion(), IMAGE).items():
        foreign.metadata_props.add(key=key, value=value)
    onnx.save(foreign, str(tmp_path / "wrong_io.onnx"))
    (tmp_path / "truncated.onnx").write_bytes(good.read_bytes()[:5000])
    torch.save({"model": small[0][1].state_dict(), "step": 3}, tmp_path / "checkpoint.pt")
    cases = [
        (tmp_path / "foreign.onnx", "is not a DDPM model: missing metadata 'ddpm.format' .export it with `ddpm export`"),
        (relabel(good, tmp_path / "no_betas.onnx", diffusion(), drop="ddpm.betas"), "missing metadata 'ddpm.betas'"),
        (tmp_path / "wrong_io.onnx", "is not a DDPM eps_theta graph: expected inputs x float32"),
        (tmp_path / "truncated.onnx", "is not a readable ONNX model"),
        (tmp_path / "checkpoint.pt", "is not a readable ONNX model"),
        (tmp_path / "absent.onnx", "no such file"),
    ]
    for path, message in cases:
        with pytest.raises(ModelError, match=message) as info:
            OnnxSampler(path, provider="cpu", threads=1)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_cuda_provider_is_used_or_refused_plainly(small):
    """Where CUDA loads (a GPU machine) the CUDA path must agree with the CPU path; elsewhere it is a
    ModelError, never a silent fall back to the CPU."""
    path = small[1] / "eps.onnx"
    try:
        sampler = OnnxSampler(path, provider="cuda")
    except ModelError as e:
        assert "cuda" in str(e) and "provider='cpu'" in str(e) and "\n" not in str(e)
        assert OnnxSampler(path, provider="auto").provider == "CPUExecutionProvider"
        return
    assert sampler.provider == "CUDAExecutionProvider"
    got = sampler.sample(3, "ancestral", 20, batch=2, seed=1)
    want = OnnxSampler(path, provider="cpu", threads=1).sample(3, "ancestral", 20, batch=2, seed=1)
    assert np.abs(got - want).max() <= 1e-3


# ------------------------------------------------------------------------------------------- images
def test_save_images(tmp_path):
    from PIL import Image

    x = np.random.RandomState(0).uniform(-1.2, 1.2, size=(5, 1, 8, 8)).astype(np.float32)
    pixels = np.rint((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    save_images(x, tmp_path / "x.npz")
    assert np.array_equal(np.load(tmp_path / "x.npz")["arr_0"], pixels.transpose(0, 2, 3, 1))
    save_images(x, tmp_path / "x.png")
    grid = np.asarray(Image.open(tmp_path / "x.png"))
    # ceil(sqrt(5)) = 3 columns, 2 rows, 8x8 images enlarged 4x to 32x32, 2-pixel gutters
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34)
    for i in range(5):
        r, c = divmod(i, 3)
        tile = grid[2 + 34 * r: 34 + 34 * r, 2 + 34 * c: 34 + 34 * c]
        assert np.array_equal(tile, pixels[i, 0].repeat(4, 0).repeat(4, 1))
    rgb = np.random.RandomState(1).uniform(-1, 1, size=(2, 3, 4, 6))
    save_images(rgb, tmp_path / "rgb.png")
    assert np.asarray(Image.open(tmp_path / "rgb.png")).shape == (2 + 20 + 2, 2 + 2 * (30 + 2), 3)  # enlarged 5x
    with pytest.raises(ValueError, match="use .png or .npz"):
        save_images(x, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        save_images(np.zeros((1, 2, 4, 4)), tmp_path / "y.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.png", "x.npz", "x.png"]

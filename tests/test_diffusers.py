"""The weights Ho et al. released, in diffusers' format: the map between UNet2DModel and unet.UNet is exact (as
data, and on outputs at the paper's own configs), round trips are bit-identical, diffusers' DDPM and DDIM
schedulers stepping the exported model give this project's samples, the imported model runs through ONNX and
C++, and what cannot be imported is refused in one line. Random weights throughout: nothing is downloaded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel,  # noqa: E402
                       UniPCMultistepScheduler)

import diffusers_models as dm  # noqa: E402
from conftest import cli as run_cli  # noqa: E402
from ddpm_reference import ddpm, diffusers_io as dio, unet  # noqa: E402
from oracle import MixtureOracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DDPM = str(Path(sys.executable).parent / "ddpm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these networks are small (or run one image), and on a busy 2-core machine two threads
    wait on each other at every op (a 10 ms forward pass became 1.6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ours(checkpoint: dict) -> unet.UNet:
    model = unet.UNet(**checkpoint["unet"])
    model.load_state_dict(checkpoint["ema"])
    return model.eval()


def max_diff(theirs, mine, x, t) -> float:
    with torch.no_grad():
        return (theirs(x, t).sample - mine(x, t)).abs().max().item()


# ------------------------------------------------------------------------------------ the map, as data

@pytest.mark.parametrize("config", [dm.CIFAR10, dm.LSUN256, dm.TINY], ids=["cifar10", "256", "tiny"])
def test_every_tensor_is_mapped_once_with_its_shape(config):
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in UNet2DModel(**config).state_dict().items()}
    kwargs = dio.unet_kwargs(json.loads(json.dumps(config)))
    rows = dio.tensor_names(kwargs)
    with torch.device("meta"):
        mine = {k: tuple(v.shape) for k, v in unet.UNet(**kwargs).state_dict().items()}
    assert [r[0] for r in rows] == list(mine) and len({r[1] for r in rows}) == len(rows)
    assert {r[1]: r[3] for r in rows} == theirs  # every diffusers tensor, once, with diffusers' shape
    assert all(r[2] == mine[r[0]] for r in rows)
    as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731 (tuples as lists)
    full = as_json({**dio.UNET_DEFAULTS, **config, "_class_name": "UNet2DModel"})
    assert as_json(dio.diffusers_config(kwargs)) == {k: full[k] for k in dio.diffusers_config(kwargs)}


def test_the_configs_are_the_presets():
    """google/ddpm-cifar10-32 is the cifar10 preset, the 256 models the lsun256/celebahq256 one (parameter counts
    included), with TF's downsampling padding."""
    for config, preset in ((dm.CIFAR10, "cifar10"), (dm.LSUN256, "lsun256")):
        kwargs = dio.unet_kwargs(dict(config))
        assert {k: kwargs[k] for k in unet.PRESETS[preset] if k != "dropout"} == \
               {k: v for k, v in unet.PRESETS[preset].items() if k != "dropout"}
        assert kwargs["downsample_padding"] == "tf"
        with torch.device("meta"):
            count = unet.count_parameters(UNet2DModel(**config))
            assert count == unet.count_parameters(unet.build_unet(preset)) == unet.count_parameters(unet.UNet(**kwargs))
    assert unet.count_parameters(unet.build_unet("cifar10")) == 35_746_307


# ------------------------------------------------------------------------------------ outputs at the paper's configs

def test_cifar10_model_imports_exactly(tmp_path):
    theirs = dm.save_model(tmp_path / "cifar10", dm.CIFAR10)
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    checkpoint = dio.import_diffusers(str(tmp_path / "cifar10"))
    cfg = checkpoint["config"]
    assert (cfg["preset"], cfg["schedule"], cfg["T"], cfg["parameterization"], cfg["variance"]) == \
           ("cifar10", "linear", 1000, "eps", "fixed_large")
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([999, 37])
    assert max_diff(theirs, ours(checkpoint), x, t) <= 1e-5


def test_256_model_imports_exactly(tmp_path):
    """The layout of google/ddpm-church-256 (-bedroom, -cat, -celebahq): one image, one timestep (~10 s a forward)."""
    theirs = dm.save_model(tmp_path / "church", dm.LSUN256, {**dm.SCHEDULER, "variance_type": "fixed_small"})
    checkpoint = dio.import_diffusers(str(tmp_path / "church"))
    assert checkpoint["config"]["variance"] == "fixed_small"
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    assert max_diff(theirs, ours(checkpoint), x, torch.tensor([641])) <= 1e-5


def test_legacy_attention_names_and_bin_weights_import_the_same(tmp_path):
    """The released .bin files predate diffusers' Attention: query/key/value/proj_attn."""
    dm.save_model(tmp_path / "new", dm.TINY)
    state = safetensors_torch.load_file(str(tmp_path / "new" / dio.WEIGHTS[0]))
    renames = {f".{new}.": f".{old}." for old, new in dio.LEGACY_ATTENTION.items()}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old) if ".attentions." in key else key
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    os.remove(tmp_path / "old" / dio.WEIGHTS[0])
    torch.save(legacy, tmp_path / "old" / dio.WEIGHTS[1])
    a, b = dio.import_diffusers(str(tmp_path / "new")), dio.import_diffusers(str(tmp_path / "old"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_pipeline_layout_with_subfolders(tmp_path):
    model = dm.unet2d(dm.TINY)
    model.save_pretrained(str(tmp_path / "unet"))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**dm.SCHEDULER, "prediction_type": "v_prediction"}))
    checkpoint = dio.import_diffusers(str(tmp_path))
    assert checkpoint["config"]["parameterization"] == "v" and not checkpoint["notes"]


# ------------------------------------------------------------------------------------ round trips

def native_checkpoint(path, preset: str = "digits", **fields) -> dict:
    """A checkpoint as `ddpm train` writes it (perturbed initial weights, no training)."""
    cfg = ddpm.TrainConfig(preset=preset, **fields)
    shape = [1, 8, 8]
    model = dm.perturb(ddpm.make_model(cfg, shape), seed=3)
    state = {"format": ddpm.CHECKPOINT_FORMAT, "version": ddpm.__version__, "config": vars(cfg).copy(),
             "image_shape": shape, "step": 1, "classes": [], "model": model.state_dict(), "ema": model.state_dict()}
    ddpm.save_checkpoint(path, state)
    return state


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_round_trip_ours_diffusers_ours_is_bit_identical(tmp_path, capsys, zero_terminal_snr):
    native = native_checkpoint(tmp_path / "native.pt", schedule="cosine", T=400, parameterization="v",
                               zero_terminal_snr=zero_terminal_snr)
    code, out, err = run_cli("export-diffusers", tmp_path / "native.pt", "--out", tmp_path / "hf")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                   "model_index.json", "scheduler_config.json"]
    code, _, err = run_cli("import", tmp_path / "hf", "--out", tmp_path / "back.pt")
    assert code == 0, err
    back = ddpm.load_checkpoint(tmp_path / "back.pt")
    assert native["ema"].keys() == back["ema"].keys()
    assert all(torch.equal(native["ema"][k], back["ema"][k]) for k in native["ema"])
    assert {k: back["config"][k] for k in ("schedule", "T", "parameterization", "variance", "zero_terminal_snr")} == \
           {k: native["config"][k] for k in ("schedule", "T", "parameterization", "variance", "zero_terminal_snr")}
    # diffusers reads what was written, and computes what we do (symmetric padding: downsample_padding=1)
    theirs = UNet2DModel.from_pretrained(str(tmp_path / "hf")).eval()
    model, diffusion, _, _ = ddpm.load_model(tmp_path / "native.pt")
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 200, 399])
    assert max_diff(theirs, model, x, t) <= 1e-5
    scheduler = DDPMScheduler.from_pretrained(str(tmp_path / "hf"))
    if zero_terminal_snr:  # diffusers rescales in float32: 1 - ab_t / ab_t-1 loses digits of the small betas
        np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), diffusion.alphas_cumprod, atol=1e-6)
        assert scheduler.alphas_cumprod[-1] == diffusion.alphas_cumprod[-1] == 0
    else:
        np.testing.assert_allclose(scheduler.betas.double().numpy(), diffusion.betas, rtol=2e-6)


def test_round_trip_diffusers_ours_diffusers_is_bit_identical(tmp_path):
    dm.save_model(tmp_path / "hf", dm.TINY)
    dio.import_diffusers(str(tmp_path / "hf"), str(tmp_path / "ckpt.pt"))
    dio.export_diffusers(str(tmp_path / "ckpt.pt"), str(tmp_path / "again"))
    a = safetensors_torch.load_file(str(tmp_path / "hf" / dio.WEIGHTS[0]))
    b = safetensors_torch.load_file(str(tmp_path / "again" / dio.WEIGHTS[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["down_block_types"] == list(dm.TINY["down_block_types"]) and config["downsample_padding"] == 0


@pytest.mark.parametrize("schedule", ["linear", "quad", "sigmoid", "cosine", "const", "jsd"])
@pytest.mark.parametrize("T", [1000, 250])
def test_schedules_round_trip_through_diffusers(schedule, T):
    cfg = ddpm.TrainConfig(schedule=schedule, T=T, zero_terminal_snr=schedule == "linear" and T == 250,
                           parameterization="v" if schedule in ("linear", "jsd") else "eps")  # alpha_bar_T = 0
    config = dio.scheduler_config(cfg)
    theirs = DDPMScheduler.from_config(config).betas.double().numpy()
    mine = ddpm.make_diffusion(cfg).betas
    # diffusers rescales to zero terminal SNR in float32 (through sqrt(alpha_bar)): absolute errors ~5e-7
    np.testing.assert_allclose(theirs, mine, rtol=2e-6, atol=1e-6 if cfg.zero_terminal_snr else 1e-9)
    fields, _ = dio.schedule_fields(config)
    assert fields == {k: getattr(cfg, k) for k in fields}


# ------------------------------------------------------------------------------------ diffusers' schedulers

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TINY diffusers model (16x16, the CIFAR-10 block types, 32 channels, one ResNet a level) and its import."""
    folder = tmp_path_factory.mktemp("tiny")
    theirs = dm.save_model(folder / "hf", dm.TINY, seed=5)
    dio.import_diffusers(str(folder / "hf"), str(folder / "checkpoint.pt"))
    return theirs, folder


def diffusers_chain(scheduler, model, steps: int, seed: int, **step_kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x, generator=gen, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("schedule, zero_snr", [("linear", False), ("cosine", True), ("jsd", False)])
def test_exported_timestep_spacing_is_our_default(schedule, zero_snr):
    """jsd ends at beta_T = 1: alpha_bar_T = 0 without the rescaling, so it samples from T (trailing) as well."""
    cfg = ddpm.TrainConfig(schedule=schedule, zero_terminal_snr=zero_snr, parameterization="v")
    scheduler = DDIMScheduler.from_config(dio.scheduler_config(cfg))
    scheduler.set_timesteps(10)
    plan = ddpm.make_plan(ddpm.make_diffusion(cfg), "ddim", 10)
    np.testing.assert_array_equal(plan.t, scheduler.timesteps.numpy())
    assert (plan.t[0] == cfg.T - 1) == (schedule != "linear")


@pytest.mark.parametrize("sampler, variance, parameterization, steps, spacing, eta, zero_snr", [
    ("ancestral", "fixed_large", "eps", 50, "leading", 0.0, False),
    ("ancestral", "fixed_small", "x0", 25, "trailing", 0.0, False),
    ("ancestral", "fixed_small", "eps", 20, "linspace", 0.0, False), ("ddim", "fixed_small", "v", 50, "leading", 0.0, False),
    ("ddim", "fixed_small", "eps", 20, "leading", 0.5, False),
    ("ddim", "fixed_small", "v", 10, None, 0.0, True), ("ddim", "fixed_small", "eps", 10, None, 0.0, False)])
def test_diffusers_schedulers_on_the_export_equal_our_sampler_on_the_import(tiny, tmp_path, sampler, variance,
                                                                          parameterization, steps, spacing, eta,
                                                                          zero_snr):
    """Same noise (one torch generator, drawn in the same order: x_T, then each noisy step). diffusers' "leading"
    spacing is ours "uniform"; DDIM re-derives eps from the clipped x0 (use_clipped_model_output) as ours does.
    The network is the tiny one whatever it is said to predict: the parameterisations are a change of variable.
    spacing None: the exported scheduler's own spacing against make_plan's default (trailing at zero terminal SNR)."""
    _, folder = tiny
    state = ddpm.load_checkpoint(folder / "checkpoint.pt")
    state["config"].update(variance=variance, parameterization=parameterization, zero_terminal_snr=zero_snr)
    ddpm.save_checkpoint(tmp_path / "ckpt.pt", state)
    dio.export_diffusers(str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"))
    theirs = UNet2DModel.from_pretrained(str(tmp_path / "hf")).eval()
    kind = DDPMScheduler if sampler == "ancestral" else DDIMScheduler
    scheduler = kind.from_pretrained(str(tmp_path / "hf"), **({"timestep_spacing": spacing} if spacing else {}))
    extra = {"eta": eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
    want = diffusers_chain(scheduler, theirs, steps, seed=6, **extra)
    model, diffusion, _, _ = ddpm.load_model(tmp_path / "ckpt.pt")
    plan = ddpm.make_plan(diffusion, sampler, steps, eta=eta, spacing={"leading": "uniform"}.get(spacing, spacing))
    assert spacing or (plan.t[0] == diffusion.T - 1) == zero_snr  # the default starts at T at zero terminal SNR
    np.testing.assert_array_equal(plan.t, scheduler.timesteps.numpy())
    gen = torch.Generator().manual_seed(6)
    got = ddpm.sample(model, plan, (2, 3, 16, 16), lambda shape: torch.randn(shape, generator=gen))
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_full_chain_of_a_short_schedule(tmp_path, variance):
    """Algorithm 2 over every step (no respacing) of a T = 100 schedule, diffusers' DDPMScheduler against ours;
    learned_range (Nichol & Dhariwal's interpolated variance) with a network of 2C output channels."""
    scheduler_config = {**dm.SCHEDULER, "num_train_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.2,
                        "variance_type": variance}
    config = dict(dm.TINY, out_channels=6 if variance == "learned_range" else 3)
    theirs = dm.save_model(tmp_path / "hf", config, scheduler_config, seed=7)
    checkpoint = dio.import_diffusers(str(tmp_path / "hf"))
    assert (checkpoint["config"]["schedule"], checkpoint["config"]["T"]) == ("linear", 100)  # ours scales by 1000/T
    assert checkpoint["config"]["variance"] == variance
    want = diffusers_chain(DDPMScheduler.from_config(scheduler_config), theirs, 100, seed=8)
    cfg = ddpm.TrainConfig(**checkpoint["config"])
    gen = torch.Generator().manual_seed(8)
    got = ddpm.sample(ours(checkpoint), ddpm.make_plan(ddpm.make_diffusion(cfg), "ancestral"), (2, 3, 16, 16),
                      lambda shape: torch.randn(shape, generator=gen))
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sampler", ["dpmpp3m", "unipc"])
@pytest.mark.parametrize("steps, spacing", [(5, "trailing"), (10, "trailing"), (20, "trailing"), (10, "logsnr"),
                                            (16, "uniform")])
def test_diffusers_multistep_schedulers_equal_our_plans(sampler, steps, spacing):
    """DPMSolverMultistepScheduler and UniPCMultistepScheduler with solver_order=3 and otherwise their defaults
    (data prediction, lower_order_final, final_sigmas_type "zero"; UniPC: bh2, UniC at every step) step the same
    model as our plans: a Gaussian-mixture denoiser, nonlinear, so the network must be called at the same points
    (UniPC: at the uncorrected x_k). diffusers' "trailing" is ours; our other spacings are given to diffusers as
    its timesteps (UniPC's set_timesteps takes none: its timesteps and sigmas are set as set_timesteps sets them).
    20 steps: 3M's second-last step is third order (diffusers lowers it only under 15 steps)."""
    d = ddpm.Diffusion(ddpm.beta_schedule("linear", 1000))
    model = MixtureOracle(d, m=0.5, s=0.2, p=0.3)
    plan = ddpm.make_plan(d, sampler, steps, spacing=spacing, clip=False)
    kind = DPMSolverMultistepScheduler if sampler == "dpmpp3m" else UniPCMultistepScheduler
    scheduler = kind(trained_betas=d.betas, solver_order=3, timestep_spacing="trailing")
    if spacing == "trailing":
        scheduler.set_timesteps(steps)
    elif sampler == "dpmpp3m":
        scheduler.set_timesteps(timesteps=plan.t.tolist())
    else:
        scheduler.set_timesteps(steps)
        ab = scheduler.alphas_cumprod.numpy()[plan.t]
        scheduler.timesteps = torch.from_numpy(plan.t)
        scheduler.sigmas = torch.from_numpy(np.append(((1 - ab) / ab) ** 0.5, 0.0).astype(np.float32))
    np.testing.assert_array_equal(plan.t, scheduler.timesteps.numpy())
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    want = x_T
    for t in scheduler.timesteps:
        want = scheduler.step(model(want, t.expand(len(want))), t, want).prev_sample
    got = ddpm.run_plan(model, plan, x_T)
    assert (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------ ONNX and C++

def cpp_runner() -> Path:
    runner = ROOT / "cpp_runner" / "build" / "ddpm_runner"
    if not os.access(runner, os.X_OK):
        build = subprocess.run(["sh", str(ROOT / "cpp_runner" / "build.sh")], capture_output=True, text=True,
                               env={**os.environ, "PYTHON": sys.executable})
        if build.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cpp_runner/build.sh failed:\n{(build.stdout + build.stderr)[-3000:]}")
            pytest.skip("the C++ runner is not built and cpp_runner/build.sh failed (fatal when CI is set)")
    return runner


def test_imported_model_exports_to_onnx_and_cpp_draws_the_same_images(tiny, tmp_path, capsys):
    _, folder = tiny
    onnx_file, common = tmp_path / "model.onnx", ["--num-samples", "4", "--sampler", "ddim", "--steps", "10", "--seed", "3"]
    code, out, err = run_cli("export", folder / "checkpoint.pt", "--out", onnx_file)
    assert code == 0, err
    code, _, err = run_cli("onnx-sample", onnx_file, *common, "--threads", "1", "--out", tmp_path / "ort.npz")
    assert code == 0, err
    code, _, err = run_cli("sample", folder / "checkpoint.pt", *common, "--numpy-noise", "--precision", "fp32",
                       "--out", tmp_path / "torch.npz")
    assert code == 0, err
    proc = subprocess.run([str(cpp_runner()), "--model", str(onnx_file), *common, "--threads", "1",
                           "--out", str(tmp_path / "cpp.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ort_pixels, cpp_pixels = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("ort", "cpp"))
    assert ort_pixels.shape == (4, 16, 16, 3) and np.abs(ort_pixels.astype(int) - cpp_pixels).max() <= 1
    code, out, _ = run_cli("compare", tmp_path / "torch.npz", tmp_path / "ort.npz", tmp_path / "cpp.npz")
    assert code == 0, out


# ------------------------------------------------------------------------------------ what is refused

def one_line_error(capsys, *args) -> str:
    code, out, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddpm: error: "), (code, out, err)
    return lines[0]


def write_config(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {**dm.TINY, "_class_name": "UNet2DModel", **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
    (lambda p: write_config(p / "vae", _class_name="AutoencoderKL"), "_class_name 'AutoencoderKL' is not a diffusers UNet2DModel"),
    (lambda p: write_config(p / "cross", down_block_types=["CrossAttnDownBlock2D", *dm.TINY["down_block_types"][1:]]),
     "down_block_types = .* block type CrossAttnDownBlock2D"),
    (lambda p: write_config(p / "heads", attention_head_dim=8), "attention_head_dim = 8"),
    (lambda p: write_config(p / "mirror", up_block_types=["UpBlock2D"] * 4), "attention at the same levels"),
    (lambda p: write_config(p / "classes", num_class_embeds=10), "num_class_embeds = 10"),
    (lambda p: write_config(p / "flip", flip_sin_to_cos=True), "flip_sin_to_cos = true"),
    (lambda p: write_config(p / "unknown", cross_attention_dim=768), "field cross_attention_dim"),
    (lambda p: write_config(p / "noweights"), "neither diffusion_pytorch_model.safetensors"),
])
def test_import_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    import re
    folder = make(tmp_path)
    line = one_line_error(capsys, "import", folder, "--out", tmp_path / "out" / "checkpoint.pt")
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_tensor_of_the_wrong_shape(tmp_path, capsys):
    dm.save_model(tmp_path / "hf", dm.TINY)
    path = str(tmp_path / "hf" / dio.WEIGHTS[0])
    state = safetensors_torch.load_file(path)
    state["down_blocks.1.attentions.0.to_q.weight"] = torch.zeros(32, 16)
    safetensors_torch.save_file(state, path)
    line = one_line_error(capsys, "import", tmp_path / "hf", "--out", tmp_path / "ckpt.pt")
    assert "down_blocks.1.attentions.0.to_q.weight has shape [32, 16], the config implies [32, 32]" in line
    assert os.listdir(tmp_path) == ["hf"]
    state["extra.weight"] = torch.zeros(1)
    state["down_blocks.1.attentions.0.to_q.weight"] = torch.zeros(32, 32)
    safetensors_torch.save_file(state, path)
    assert "does not account for, e.g. extra.weight" in one_line_error(capsys, "import", tmp_path / "hf", "--out",
                                                                       tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("changes, message", [
    ({"variance_type": "learned"}, "variance_type 'learned'"), ({"prediction_type": "score"}, "prediction_type 'score'"),
    ({"beta_schedule": "exp"}, "beta_schedule 'exp'"), ({"beta_end": 0.03}, "none of this project's schedules"),
    ({"thresholding": True}, "thresholding")])
def test_import_refuses_a_scheduler_it_cannot_express(tmp_path, capsys, changes, message):
    dm.save_model(tmp_path / "hf", dm.TINY, {**dm.SCHEDULER, **changes})
    assert message in one_line_error(capsys, "import", tmp_path / "hf", "--out", tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


def test_export_diffusers_refuses_and_leaves_nothing(tmp_path, capsys):
    assert "no such checkpoint" in one_line_error(capsys, "export-diffusers", tmp_path / "none.pt", "--out", tmp_path / "o")
    native_checkpoint(tmp_path / "native.pt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "exists" in one_line_error(capsys, "export-diffusers", tmp_path / "native.pt", "--out", tmp_path / "taken")
    state = ddpm.load_checkpoint(tmp_path / "native.pt")
    model = ddpm.make_model(ddpm.TrainConfig(), [1, 8, 8], num_classes=3)
    ddpm.save_checkpoint(tmp_path / "cond.pt", {**state, "classes": ["a", "b", "c"], "ema": model.state_dict(),
                                                "model": model.state_dict()})
    assert "class-conditional" in one_line_error(capsys, "export-diffusers", tmp_path / "cond.pt", "--out", tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["cond.pt", "native.pt", "taken"]


@pytest.mark.slow
def test_imported_weights_cannot_be_resumed(tiny, tmp_path):
    _, folder = tiny
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(folder / "checkpoint.pt", run_dir / "checkpoint.pt")
    from ddpm_reference.data import load_data
    with pytest.raises(ddpm.UserError, match="imported weights"):
        ddpm.train(ddpm.TrainConfig(out=str(run_dir), device="cpu"), load_data("digits"), resume=True)


def test_ddpm_py_does_not_import_this_and_the_cli_imports_it_lazily():
    assert "diffusers_io" not in (ROOT / "ddpm.py").read_text()
    top_level = [line for line in (ROOT / "cli.py").read_text().splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "diffusers" in line]

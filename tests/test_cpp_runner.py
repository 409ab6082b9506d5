"""The C++ runner (cpp_runner/) against the sampling contract: same noise stream as numpy's RandomState,
same plan, same samples as a Python executor of the same ONNX file, the same files as `ddpm onnx-sample` writes,
the same command-line language, and one-line errors with exit status 2.

The Python side is `python_reference` below: the project's onnxruntime sampler (export/onnx_sampler.py);
plans are also compared with ddpm.make_plan directly.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_runner as run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from small_models import IMAGE, T, metadata, python_reference, with_metadata


# ---------------------------------------------------------------- the Python side: ddpm.make_plan + an executor
def reference_plan(meta: dict[str, str], sampler: str, steps: int | None, eta: float, spacing: str,
                   clip: bool | None, corrector_steps: int = 0):
    """The project's plan (ddpm.make_plan) for the schedule written into an ONNX file."""
    from ddpm_reference import ddpm

    betas = np.array([float(b) for b in meta["ddpm.betas"].split(",")], dtype=np.float64)
    diffusion = ddpm.Diffusion(betas, meta["ddpm.parameterization"], meta["ddpm.variance"])
    clip = (meta["ddpm.clip_denoised"] == "true") if clip is None else clip
    return ddpm.make_plan(diffusion, sampler, steps, eta=eta, spacing=spacing, clip=clip,
                          corrector_steps=corrector_steps)


def plan_args(sampler, steps, eta, spacing, clip, corrector_steps=0):
    args = (["--sampler", sampler] if sampler else []) + ["--corrector-steps", corrector_steps]
    args += ["--spacing", spacing] if spacing else []
    args += ["--steps", steps] if steps else []
    args += ["--eta", eta] if sampler == "ddim" else []
    args += [] if clip is None else ["--clip" if clip else "--no-clip"]
    return args


# ---------------------------------------------------------------- noise stream
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1])
def test_noise_stream_is_numpy_randomstate(runner, seed):
    out = run(runner, "--seed", seed, "--dump-noise", 1001).stdout.split()
    expected = np.random.RandomState(seed).standard_normal(1001)
    np.testing.assert_array_equal(np.array(out, dtype=np.float64), expected)


# ---------------------------------------------------------------- plan
PLAN_CASES = [(s, S, e, sp, 0) for s, e in [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5)]
              for sp in ["uniform", "linspace", "trailing", "quadratic"] for S in [1, 10, 13, 40]] + \
             [(s, S, 0.0, sp, 0) for s in ["dpmpp2m", "dpmpp2m-sde"]
              for sp in ["uniform", "trailing", "logsnr"] for S in [1, 2, 10, 40]] + \
             [("ancestral", None, 0.0, "uniform", 0), ("ddim", None, 0.0, "uniform", 0), ("ddim", T, 1.0, "trailing", 0),
              ("ddim", 10, 0.0, "logsnr", 0), ("ancestral", 10, 0.0, "linspace", 2), ("ddim", 7, 0.5, "trailing", 1),
              ("dpmpp2m", None, 0.0, "uniform", 0)] + \
             [(s, S, 0.0, None, 0) for s, S in [("ancestral", 10), ("ddim", 13), ("dpmpp2m", 5), ("unipc", 10)]] + \
             [(s, S, 0.0, sp, 0) for s in ["dpmpp3m", "unipc"]  # the orders' edges: warm-up, 3M's second-last step
              for sp, S in [("trailing", 1), ("uniform", 4), ("logsnr", 14), ("trailing", 15), ("logsnr", 40)]]


@pytest.mark.parametrize("sampler,steps,eta,spacing,K", PLAN_CASES)
@pytest.mark.parametrize("model_name", ["eps_small", "v_large", "x0_small", "eps_learned", "v_zero_snr"])
def test_plan_matches_contract(runner, models, model_name, sampler, steps, eta, spacing, K):
    model = models[model_name]
    proc = run(runner, "--model", model, "--dump-plan", *plan_args(sampler, steps, eta, spacing, None, K), check=False)
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    try:
        want = reference_plan(meta, sampler, steps, eta, spacing, None, K)
    except ValueError as e:  # e.g. quadratic spacing with more than sqrt(0.8 T) + 1 steps
        key = next(k for k in ("distinct steps", "not strictly decreasing", "steps must be in") if k in str(e))
        assert proc.returncode == 2 and key in proc.stderr, (str(e), proc.stderr)
        return
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["t"] == want.t.tolist()
    assert got["add_noise"] == want.add_noise.astype(int).tolist()
    assert got["learned"] == want.learned.astype(int).tolist()
    assert (bool(got["clip"]), got["channels"], got["memory"]) == (want.clip, IMAGE[0], want.memory)
    np.testing.assert_allclose(np.array(got["mean_x0_prev"], dtype=np.float64).reshape(want.mean_x0_prev.shape),
                               want.mean_x0_prev, rtol=1e-10, atol=1e-300)
    # float64 coefficients agree to rounding (the two sides order a few products differently); sigma only
    # where noise is added, the only place it is used.
    used = want.add_noise
    for key in ("x0_x", "x0_o", "mean_x0", "mean_xt", "sigma", "log_var_min", "log_var_max"):
        g, w = np.array(got[key]), getattr(want, key)
        if key == "sigma":
            g, w = g[used], w[used]
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-300, err_msg=key)


@pytest.mark.parametrize("model_name,spacing", [("v_zero_snr", "trailing"), ("eps_small", "uniform")])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpmpp2m", 5), ("ancestral", 7)])
def test_default_spacing_is_trailing_at_zero_terminal_snr(runner, models, model_name, spacing, sampler, steps):
    """Without --spacing the runner and both Python executors keep the same timesteps: trailing where alpha_bar_T
    = 0 (the first row is the last timestep the sampler can use), uniform (DDIM's) otherwise."""
    from ddpm_reference import ddpm
    from ddpm_reference.export.onnx_sampler import OnnxSampler

    model = models[model_name]
    got = json.loads(run(runner, "--model", model, "--dump-plan", "--sampler", sampler, "--steps", steps).stdout)["t"]
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert got == reference_plan(meta, sampler, steps, 0.0, spacing, None).t.tolist()
    assert got == reference_plan(meta, sampler, steps, 0.0, None, None).t.tolist()
    assert got == OnnxSampler(model, provider="cpu", threads=1).plan(sampler, steps).t.tolist()
    betas = np.array([float(b) for b in meta["ddpm.betas"].split(",")])
    finite = int((ddpm.plans.log_snr(np.cumprod(1 - betas)) >= ddpm.plans.LAMBDA_MIN).sum())
    last = finite if sampler == "dpmpp2m" else T  # DPM-Solver keeps the timesteps of finite lambda
    assert (got[0] == last - 1) == (spacing == "trailing")


def test_a_files_own_plan_is_the_default_of_both_executors(runner, models):
    """A distilled student's file (ddpm.sampler, ddpm.steps, ddpm.spacing, clip off): with no --sampler the runner and
    the Python sampler build the plan the student was trained for; a sampler named gets its own defaults (the
    steps and spacing of the file are not its), and the file's clip."""
    from ddpm_reference import distill, plan as plans
    from ddpm_reference.export.onnx_sampler import OnnxSampler

    python = OnnxSampler(models["v_student"], provider="cpu", threads=1)
    want = plans.make_plan(python.alphas_cumprod, "v", "fixed_small", distill.student_options(4))
    got = json.loads(run(runner, "--model", models["v_student"], "--dump-plan").stdout)
    assert got["t"] == python.plan().t.tolist() == want.t.tolist() and len(want) == 4 and got["t"][0] == T - 1
    np.testing.assert_allclose(got["mean_x0"], want.mean_x0, rtol=1e-10)
    assert not got["clip"] and not python.plan().clip
    named = json.loads(run(runner, "--model", models["v_student"], "--dump-plan", "--sampler", "ancestral").stdout)
    assert len(named["t"]) == T and not named["clip"] and len(python.plan("ancestral")) == T
    steps_only = json.loads(run(runner, "--model", models["v_student"], "--dump-plan", "--steps", 2).stdout)
    assert steps_only["t"] == python.plan(steps=2).t.tolist() == [T - 1, T // 2 - 1]  # still ddim, trailing
    for key, value, words in (("ddpm.sampler", "heun", "ddpm.sampler"), ("ddpm.steps", "0", "ddpm.steps"),
                              ("ddpm.spacing", "even", "ddpm.spacing")):
        meta = {p.key: p.value for p in onnx.load(str(models["v_student"])).metadata_props}
        bad = with_metadata(models["v_student"], models["v_student"].with_name("bad.onnx"), {**meta, key: value})
        proc = run(runner, "--model", bad, "--dump-plan", check=False)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        with pytest.raises(Exception, match=key):
            OnnxSampler(bad, provider="cpu")


def test_spacing_that_cannot_give_distinct_steps_is_an_error(runner, models):
    from ddpm_reference import ddpm

    with pytest.raises(ValueError):
        ddpm.space_timesteps(T, 14, "quadratic")
    proc = run(runner, "--model", models["eps_small"], "--dump-plan", "--spacing", "quadratic", "--steps", 14,
               check=False)
    assert proc.returncode == 2 and "cannot give 14 distinct steps" in proc.stderr


# ---------------------------------------------------------------- samples
SAMPLE_CASES = [(*case, 0) for case in [
    ("eps_small", "ancestral", None, 0.0, "uniform", None),
    ("v_large", "ancestral", None, 0.0, "uniform", None),
    ("x0_small", "ancestral", 10, 0.0, "trailing", False),
    ("eps_learned", "ancestral", None, 0.0, "uniform", None),
    ("eps_learned", "ancestral", 10, 0.0, "linspace", None),
    ("v_zero_snr", "ancestral", 10, 0.0, "trailing", None),
    ("v_zero_snr", "ddim", 10, 0.5, "trailing", None),
    ("v_zero_snr", "ddim", 10, 0.0, None, None), ("eps_small", "ddim", 10, 0.0, None, None),  # the default spacing
    ("v_student", None, None, 0.0, None, None), ("v_student", "ddim", 8, 0.0, None, True),  # a file's own plan
] + [("eps_small", "ddim", 10, eta, sp, None) for eta in (0.0, 0.5)
     for sp in ("uniform", "linspace", "trailing", "quadratic")] + [("eps_learned", "ddim", 10, 0.5, "uniform", True)]
] + [(m, s, 8, 0.0, sp, None, 0) for s in ("dpmpp2m", "dpmpp2m-sde")  # multistep rows keep the previous x0
     for m, sp in (("eps_small", "logsnr"), ("v_large", "trailing"), ("x0_small", "uniform"), ("eps_learned", "logsnr"),
                   ("v_zero_snr", "trailing"))] + [
    (m, s, 8, 0.0, sp, None, 0) for s in ("dpmpp3m", "unipc")  # M = 2 and 3 earlier x0s
    for m, sp in (("eps_small", "logsnr"), ("v_zero_snr", "trailing"), ("x0_small", "uniform"))] + [
    ("eps_small", "ancestral", 6, 0.0, "uniform", None, 2),  # predictor-corrector
    ("eps_learned", "ancestral", 6, 0.0, "trailing", None, 1),  # learned predictor rows, fixed corrector rows
    ("v_large", "ddim", 5, 0.0, "logsnr", False, 1),
]


@pytest.mark.parametrize("path", ["host", "step-graph"])
@pytest.mark.parametrize("model_name,sampler,steps,eta,spacing,clip,K", SAMPLE_CASES)
def test_samples_match_python(runner, models, tmp_path, model_name, sampler, steps, eta, spacing, clip, K, path):
    """host: the CPU loop; step-graph: the CUDA path (x and the update on the provider), run on the CPU."""
    model, n, batch, seed = models[model_name], 5, 2, 2**31 + 7  # a partial last batch; a seed above 2^31
    out = tmp_path / "x.npy"
    args = plan_args(sampler, steps, eta, spacing, clip, K)
    run(runner, "--model", model, "--num-samples", n, "--batch-size", batch, "--seed", seed, "--threads", 1,
        "--out", out, *args, *(["--step-graph"] if path == "step-graph" else []))
    got = np.load(out)
    ts, want = python_reference(model, n=n, batch=batch, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                                clip=clip, seed=seed, corrector_steps=K)
    plan = json.loads(run(runner, "--model", model, "--dump-plan", *args).stdout)
    assert plan["t"] == ts
    assert got.dtype == np.float32 and got.shape == (n, *IMAGE)
    assert np.isfinite(got).all() and np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("model_name", ["eps_small", "v_zero_snr"])  # the default spacing: uniform, trailing
@pytest.mark.parametrize("path", ["host", "step-graph"])
def test_encode_and_decode_from_init_match_python(runner, models, tmp_path, path, model_name):
    """--init x.npy --invert: DDIM encoding of given images; --init latents.npy: a plan run from given latents
    (here a noisy one: only the rows' z are drawn), both as OnnxSampler.run does them."""
    from ddpm_reference.export.onnx_sampler import OnnxSampler
    model, extra = models[model_name], (["--step-graph"] if path == "step-graph" else [])
    python = OnnxSampler(model, provider="cpu", threads=1)
    x0 = np.random.RandomState(1).uniform(-1, 1, (5, *IMAGE)).astype(np.float32)
    np.save(tmp_path / "x0.npy", x0)
    run(runner, "--model", model, "--init", tmp_path / "x0.npy", "--invert", "--steps", 7, "--batch-size", 2,
        "--threads", 1, "--out", tmp_path / "latent.npy", *extra)
    latent = np.load(tmp_path / "latent.npy")
    assert np.abs(latent - python.run(python.inversion_plan(7), x0, batch=2)).max() <= 1e-3
    assert np.abs(latent - x0).max() > 0.1  # it moved
    run(runner, "--model", model, "--init", tmp_path / "latent.npy", "--sampler", "ddim", "--steps", 7, "--eta", 0.5,
        "--seed", 3, "--threads", 1, "--out", tmp_path / "decoded.npy", *extra)
    want = python.run(python.plan("ddim", 7, eta=0.5), latent, seed=3)
    assert np.abs(np.load(tmp_path / "decoded.npy") - want).max() <= 1e-3


@pytest.mark.parametrize("path", ["host", "step-graph"])
@pytest.mark.parametrize("sampler,steps,eta,classes,guidance", [
    ("ancestral", 10, 0.0, "2,0", 2.5), ("ddim", 8, 0.5, "1", 1.0), ("ddim", 8, 0.0, "0,1,2", 0.0),
    ("dpmpp2m-sde", 6, 0.0, None, 3.0), ("ddim", 5, 0.0, None, 1.0), ("ddim", 5, 0.0, "2,0", None)])
def test_guided_samples_match_python(runner, conditional_model, tmp_path, path, sampler, steps, eta, classes, guidance):
    """guidance None: neither gives one, and both guide by DEFAULT_GUIDANCE."""
    from ddpm_reference.export.onnx_sampler import DEFAULT_GUIDANCE, OnnxSampler, balanced_labels
    n, batch, seed = 5, 2, 9
    args = ["--sampler", sampler, "--steps", steps] + (["--eta", eta] if eta else [])
    args += ["--guidance", guidance] if guidance is not None else []
    args += ["--classes", classes] if classes else []
    run(runner, "--model", conditional_model, "--num-samples", n, "--batch-size", batch, "--seed", seed, "--threads", 1,
        "--out", tmp_path / "x.npy", *args, *(["--step-graph"] if path == "step-graph" else []))
    python = OnnxSampler(conditional_model, provider="cpu", threads=1)
    labels = balanced_labels([int(c) for c in classes.split(",")] if classes else [0, 1, 2], n)
    want = python.sample(n, sampler, steps, eta=eta, seed=seed, batch=batch, labels=labels, guidance=guidance)
    assert np.abs(np.load(tmp_path / "x.npy") - want).max() <= 1e-3
    if guidance is None:
        assert np.array_equal(want, python.sample(n, sampler, steps, eta=eta, seed=seed, batch=batch, labels=labels,
                                                  guidance=DEFAULT_GUIDANCE))


def test_label_errors(runner, conditional_model, models, tmp_path):
    out = tmp_path / "x.npy"
    for model, args, message in [(models["eps_small"], ["--class", 1], "unconditional"),
                                 (models["eps_small"], ["--guidance", 2], "unconditional"),
                                 (conditional_model, ["--class", 3],
                                  "--class 3: not a class of this model (a, b, c; or 0..2)"),
                                 (conditional_model, ["--classes", "1,x"], "--class x: not a class"),
                                 (conditional_model, ["--classes", "b,"], "--class : not a class"),
                                 (conditional_model, ["--class", "-1"], "--class -1: not a class"),
                                 (conditional_model, ["--class", "B"], "--class B: not a class")]:
        proc = run(runner, "--model", model, "--out", out, "--steps", 3, "--sampler", "ddim", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_init_errors(runner, models, tmp_path):
    model = models["eps_small"]
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((2, *IMAGE)))
    np.save(tmp_path / "ok.npy", np.zeros((2, *IMAGE), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00\x10")
    (tmp_path / "x0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    for args, message in [(["--invert"], "--init"), (["--init", tmp_path / "wrong.npy"], "--init needs [N, 1, 8, 8]"),
                          (["--init", tmp_path / "f64.npy"], "float32"), (["--init", tmp_path / "junk.npy"], "truncated"),
                          (["--init", tmp_path / "ok.npy", "--num-samples", 3], "holds 2 images"),
                          (["--init", tmp_path / "missing.npy"], "cannot read"),
                          (["--init", tmp_path / "x0.png"], "not a .npy file")]:
        proc = run(runner, "--model", model, "--out", tmp_path / "x.npy", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_png_is_the_clamped_rounded_grid(runner, models, tmp_path):
    from PIL import Image

    args = ["--model", models["eps_small"], "--num-samples", 3, "--sampler", "ddim", "--steps", 5, "--seed", 3]
    run(runner, *args, "--out", tmp_path / "x.npy")
    run(runner, *args, "--out", tmp_path / "x.png")
    x = np.load(tmp_path / "x.npy")
    grid = np.asarray(Image.open(tmp_path / "x.png"))
    assert grid.shape == (2 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # 2 columns, 2 rows, 8x8 enlarged 4x, 2-pixel gutters
    pixels = np.rint((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
    for i in range(3):
        r, c = divmod(i, 2)
        tile = grid[2 + r * 34: 34 + r * 34, 2 + c * 34: 34 + c * 34]
        np.testing.assert_array_equal(tile, pixels[i, 0].repeat(4, 0).repeat(4, 1))


def test_json_summary(runner, models, tmp_path):
    proc = run(runner, "--model", models["eps_small"], "--num-samples", 4, "--sampler", "ddim", "--steps", 5, "--json",
               "--out", tmp_path / "x.npy")
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == 4 and summary["batch_size"] == 4 and summary["steps"] == 5
    # --provider auto (the default): CUDA where its execution provider can be used, else the CPU; the one used.
    assert summary["provider"] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert summary["provider"] in proc.stderr
    if not _has_gpu():  # also with the onnxruntime-gpu wheel: its CUDA provider cannot load, and auto says nothing
        assert summary["provider"] == "CPUExecutionProvider"
        assert len(proc.stderr.strip().splitlines()) == 2  # the progress and the summary: nothing from ONNX Runtime
    assert 0 < summary["network_s"] <= summary["total_s"] and summary["images_per_s"] > 0
    cpu = json.loads(run(runner, "--model", models["eps_small"], "--num-samples", 2, "--sampler", "ddim", "--steps", 2,
                         "--provider", "cpu", "--json", "--out", tmp_path / "y.npy").stdout)
    assert cpu["provider"] == "CPUExecutionProvider"


# ---------------------------------------------------------------- the files and the language of `ddpm onnx-sample`
def python_cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ddpm_reference.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("conditional", [True, False])
def test_npz_and_png_equal_what_onnx_sample_writes(runner, models, conditional_model, tmp_path, conditional):
    """.npz: arr_0 uint8 [N, H, W, C] (and arr_1 int64 labels for a class-conditional model), the arrays of
    `ddpm onnx-sample` for the same model, seed and options; .png: the same grid (a row per class)."""
    from PIL import Image
    model = conditional_model if conditional else models["eps_small"]
    args = ["--num-samples", 5, "--batch-size", 2, "--sampler", "ddim", "--steps", 8, "--seed", 3,
            "--provider", "cpu", "--threads", 1] + (["--classes", "c,0", "--guidance", 2] if conditional else [])
    for suffix in ("npz", "png"):
        python_cli("onnx-sample", model, *args, "--out", tmp_path / f"python.{suffix}")
        run(runner, "--model", model, *args, "--out", tmp_path / f"cpp.{suffix}")
    want, got = np.load(tmp_path / "python.npz"), np.load(tmp_path / "cpp.npz")
    assert sorted(got.files) == sorted(want.files) == (["arr_0", "arr_1"] if conditional else ["arr_0"])
    for key in want.files:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key])
    assert got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == (5, 8, 8, 1)
    if conditional:
        assert got["arr_1"].dtype == np.int64 and got["arr_1"].tolist() == [2, 2, 2, 0, 0]
    grid = np.asarray(Image.open(tmp_path / "cpp.png"))
    np.testing.assert_array_equal(grid, np.asarray(Image.open(tmp_path / "python.png")))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2)  # 3 columns: a row per class (2 of them), or ceil(sqrt(5))


def test_npz_pixels_are_to_uint8_of_the_samples(runner, models, tmp_path):
    """The pixels of export/onnx_sampler.to_uint8 (half to even) of the very samples; the suffix in any case."""
    from ddpm_reference.export.onnx_sampler import to_uint8
    args = ["--model", models["v_large"], "--num-samples", 7, "--sampler", "ddim", "--steps", 4, "--seed", 1]
    run(runner, *args, "--out", tmp_path / "x.npy")
    run(runner, *args, "--out", tmp_path / "x.NPZ")
    x = np.load(tmp_path / "x.npy")
    assert np.abs(x).max() > 1  # v_large does not clip: the clamp is exercised
    np.testing.assert_array_equal(np.load(tmp_path / "x.NPZ")["arr_0"], to_uint8(x).transpose(0, 2, 3, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.NPZ", "x.npy"]  # no temporary file left behind


def test_classes_by_name_or_index(runner, conditional_model, tmp_path):
    args = ["--model", conditional_model, "--num-samples", 4, "--sampler", "ddim", "--steps", 3, "--guidance", 2]
    run(runner, *args, "--classes", " c, a", "--out", tmp_path / "names.npz")
    run(runner, *args, "--classes", "2,0", "--out", tmp_path / "indices.npz")
    names, indices = np.load(tmp_path / "names.npz"), np.load(tmp_path / "indices.npz")
    assert names["arr_1"].tolist() == indices["arr_1"].tolist() == [2, 2, 0, 0]
    np.testing.assert_array_equal(names["arr_0"], indices["arr_0"])


def test_defaults_are_those_of_onnx_sample(runner, models, tmp_path):
    """64 samples, in batches of 256 (so one batch of 64), from the CPU where CUDA cannot be used."""
    proc = run(runner, "--model", models["eps_small"], "--sampler", "ddim", "--steps", 3, "--json",
               "--out", tmp_path / "x.npz")
    summary = json.loads(proc.stdout)
    assert (summary["num_samples"], summary["batch_size"]) == (64, 64)
    assert np.load(tmp_path / "x.npz")["arr_0"].shape == (64, 8, 8, 1)
    proc = run(runner, "--model", models["eps_small"], "--sampler", "ddim", "--steps", 3, "--num-samples", 300,
               "--json", "--out", tmp_path / "y.npy")
    assert json.loads(proc.stdout)["batch_size"] == 256


FLAGS = ["--model", "--out", "--num-samples", "--batch-size", "--sampler", "--steps", "--eta", "--spacing",
         "--corrector-steps", "--snr", "--clip", "--no-clip", "--seed", "--provider", "--threads", "--json", "--init",
         "--invert", "--class", "--classes", "--guidance", "--help", "--dump-noise", "--dump-plan", "--step-graph"]


def test_help_shows_every_option_with_its_default(runner):
    text = run(runner, "--help").stdout
    for flag in FLAGS:
        assert flag in text, flag
    for default in ["(samples.png)", "(64)", "(256)", "(the model's own", "(0.16)", "(auto)"]:
        assert default in text, default
    assert "(trailing\n" in text and "for a zero-terminal-SNR schedule, else uniform)" in text
    assert "--n " not in text and "--batch " not in text


NUMERIC_ERRORS = [
    (["--eta", "nan"], "--eta: not a finite number"), (["--eta", "inf"], "--eta: not a finite number"),
    (["--eta", "2"], "--eta must be in [0, 1]"), (["--eta", "-0.5"], "--eta must be in [0, 1]"),
    (["--guidance", "inf"], "--guidance: not a finite number"), (["--guidance", "nan"], "--guidance: not a finite"),
    (["--guidance", "x"], "--guidance: not a finite number"),
    (["--snr", "-1"], "--snr must be > 0"), (["--snr", "0"], "--snr must be > 0"), (["--snr", "nan"], "--snr: not a"),
    (["--steps", "0"], "--steps must be in 1.."), (["--steps", "-3"], "--steps must be in 1.."),
    (["--steps", "1.5"], "--steps: not an integer"), (["--steps", str(2**70)], "--steps: not an integer"),
    (["--num-samples", "0"], "--num-samples must be in 1.."), (["--num-samples", "-1"], "--num-samples must be"),
    (["--batch-size", "0"], "--batch-size must be in 1.."), (["--corrector-steps", "-1"], "--corrector-steps must be"),
    (["--corrector-steps", "1001"], "--corrector-steps must be in 0..1000"),
    (["--threads", "-1"], "--threads must be in 0..1024"), (["--threads", "1025"], "--threads must be in 0..1024"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"), (["--dump-noise", "-1"], "--dump-noise must be"),
    (["--spacing", "cubic"], "--spacing: unknown spacing 'cubic'"),
    (["--sampler", "euler"], "--sampler: unknown sampler 'euler' (ancestral, ddim, dpmpp2m, dpmpp2m-sde, dpmpp3m or unipc)"),
    (["--steps"], "--steps needs a value"),
]


@pytest.mark.parametrize("args,message", NUMERIC_ERRORS, ids=[" ".join(a) for a, _ in NUMERIC_ERRORS])
def test_options_are_checked_at_the_boundary(runner, models, tmp_path, args, message):
    """Checked before the model is read: even a missing model file is not reached."""
    proc = run(runner, "--model", tmp_path / "absent.onnx", "--out", tmp_path / "x.npz", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ddpm_runner: error: {message}"), proc.stderr
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------- user errors: one line, exit status 2
def _not_ddpm(path: Path) -> Path:
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[:200])
    return dst


ERROR_CASES = {
    "missing model": (lambda m, d: ["--model", d / "absent.onnx"], "not found"),
    "not a DDPM model": (lambda m, d: ["--model", _not_ddpm(d / "id.onnx")], "'ddpm.format' is missing"),
    "no metadata": (lambda m, d: ["--model", m["no_meta"]], "not a DDPM model"),
    "missing betas": (lambda m, d: ["--model", with_metadata(m["no_meta"], d / "nb.onnx", {"ddpm.format": "1"})],
                      "'ddpm.betas' is missing"),
    "eps with zero terminal SNR": (lambda m, d: ["--model", with_metadata(
        m["no_meta"], d / "z.onnx", metadata("eps", "fixed_small", zero_snr=True))], "zero terminal SNR"),
    "truncated file": (lambda m, d: ["--model", _truncated(m["eps_small"], d / "cut.onnx")], "cannot load"),
    "unknown flag": (lambda m, d: ["--model", m["eps_small"], "--frobnicate"], "unknown option"),
    "bad integer": (lambda m, d: ["--model", m["eps_small"], "--steps", "ten"], "--steps"),
    "too many steps": (lambda m, d: ["--model", m["eps_small"], "--steps", T + 1], f"steps must be in 1..{T}"),
    "bad sampler": (lambda m, d: ["--model", m["eps_small"], "--sampler", "euler"], "unknown sampler"),
    "bad spacing": (lambda m, d: ["--model", m["eps_small"], "--spacing", "cubic"], "unknown spacing"),
    "eta out of range": (lambda m, d: ["--model", m["eps_small"], "--sampler", "ddim", "--eta", 2], "eta"),
    "seed out of range": (lambda m, d: ["--model", m["eps_small"], "--seed", 2**32], "--seed"),
    "bad provider": (lambda m, d: ["--model", m["eps_small"], "--provider", "tpu"],
                     "--provider: unknown provider 'tpu'"),
    "unwritable output": (lambda m, d: ["--model", m["eps_small"], "--out", d / "no" / "dir" / "x.npy"], "cannot write"),
    "bad output type": (lambda m, d: ["--model", m["eps_small"], "--out", d / "x.jpg"], ".png, .npz or .npy"),
    "old flag --n": (lambda m, d: ["--model", m["eps_small"], "--n", 4], "unknown option '--n'"),
    "old flag --batch": (lambda m, d: ["--model", m["eps_small"], "--batch", 4], "unknown option '--batch'"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_and_status_2(runner, models, tmp_path, case):
    make_args, message = ERROR_CASES[case]
    args = make_args(models, tmp_path)
    if "--out" not in args:
        args += ["--out", tmp_path / "x.npy"]
    proc = run(runner, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm_runner: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "x.npy").exists()


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: the CUDA path is tested by test_cuda_matches_cpu")
def test_cuda_provider_without_gpu_is_one_line_error(runner, models, tmp_path):
    proc = run(runner, "--model", models["eps_small"], "--provider", "cuda", "--out", tmp_path / "x.npy", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm_runner: error: provider cuda: "), proc.stderr


@pytest.mark.skipif(not _has_gpu(), reason="no GPU here; the CPU path of the same loop is tested above")
def test_cuda_matches_cpu(runner, models, tmp_path):
    args = ["--model", models["eps_learned"], "--num-samples", 5, "--batch-size", 2, "--seed", 9]
    proc = run(runner, *args, "--provider", "cuda", "--json", "--out", tmp_path / "gpu.npy")
    assert json.loads(proc.stdout)["provider"] == "CUDAExecutionProvider"
    run(runner, *args, "--provider", "cpu", "--out", tmp_path / "cpu.npy")
    assert np.abs(np.load(tmp_path / "gpu.npy") - np.load(tmp_path / "cpu.npy")).max() <= 1e-3

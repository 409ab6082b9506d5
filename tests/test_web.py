"""The fourth executor, the page of web/ (onnxruntime-web in Chromium), against the others: its ports of the plan,
the noise and the metadata reader against Python's (in Node), and `ddpm web --headless` against `onnx-sample` for
the same file, sampler and seed; the page's own errors; the server's headers; the page as a person uses it."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, cli

from ddpm_reference import ddpm, plan as plans, web
from ddpm_reference.export.onnx_sampler import OnnxSampler, to_uint8
from small_models import metadata

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None and not os.environ.get("CI"), reason="node is missing")


def node(request: dict) -> dict:
    """tests/web_port.mjs on `request`: the JavaScript ports' answers."""
    res = subprocess.run([NODE or "node", str(ROOT / "tests" / "web_port.mjs")], input=json.dumps(request),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    special = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
    return json.loads(res.stdout, object_hook=lambda d: {k: special.get(v, v) if isinstance(v, str) else
                                                        [special.get(x, x) if isinstance(x, str) else x for x in v]
                                                        if isinstance(v, list) else v for k, v in d.items()})


SCHEDULES = {"linear": ddpm.beta_schedule("linear", 1000), "cosine": ddpm.beta_schedule("cosine", 1000),
             "zero-snr": ddpm.rescale_zero_terminal_snr(ddpm.beta_schedule("linear", 1000)),
             "linear-200": ddpm.beta_schedule("linear", 200)}
OPTIONS = [dict(sampler=s, steps=k) for s in plans.SAMPLERS for k in (1, 2, 3, 5, 10, 25)]
OPTIONS += [dict(sampler=s, steps=k, spacing=sp) for s in plans.SAMPLERS for k in (4, 20) for sp in plans.SPACINGS]
OPTIONS += [dict(sampler="ancestral"), dict(sampler="ancestral", steps=50, clip=False), dict(sampler="ddim", steps=10,
            eta=1.0), dict(sampler="ddim", steps=7, eta=0.3, spacing="linspace"), dict(sampler="ddim", steps=10,
            corrector_steps=2, snr=0.1), dict(sampler="ancestral", steps=8, corrector_steps=1), dict(sampler="dpmpp3m",
            steps=16), dict(sampler="unipc", steps=16, spacing="logsnr"), dict(sampler="dpmpp2m", steps=900)]
COLUMNS = ("t", "x0_x", "x0_o", "mean_x0", "mean_xt", "sigma", "log_var_min", "log_var_max", "add_noise", "learned",
           "mean_x0_prev")


def python_plan(case: dict):
    """Python's plan of a case of the port test, or its error's message."""
    try:
        ab = np.cumprod(1.0 - np.asarray(case["betas"]))
        options = plans.model_options(plans.PlanOptions(**case["own"]), **case["options"]) if case.get("own") else \
            plans.PlanOptions(**case["options"])
        return plans.make_plan(ab, case["parameterization"], case["variance"], options)
    except ValueError as e:
        return str(e)


def assert_same_plan(want, got: dict, where: str) -> None:
    if isinstance(want, str):
        assert "error" in got, f"{where}: Python refuses ({want}), JavaScript gives a plan"
        return
    assert "error" not in got, f"{where}: {got.get('error')}"
    assert got["clip"] == want.clip and got["memory"] == want.memory and got["sampler"] == want.sampler, where
    for column in COLUMNS:
        a, b = np.asarray(getattr(want, column), dtype=np.float64), np.asarray(got[column], dtype=np.float64)
        assert a.shape == b.shape, (where, column, a.shape, b.shape)
        both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
        close = np.isclose(a, b, rtol=1e-10, atol=1e-10) | both_inf
        assert close.all(), f"{where}: {column} differs by {np.nanmax(np.abs(a - b)[~both_inf]):.3g}"


@needs_node
def test_the_plan_port_equals_pythons():
    """Every sampler, spacing and corrector option, eta, clip, all parameterisations and variances, on a linear,
    a cosine, a zero-terminal-SNR and a T = 200 schedule: the same rows within 1e-10, the same refusals."""
    cases = []
    for name, betas in SCHEDULES.items():
        for i, options in enumerate(OPTIONS):
            parameterization = plans.PARAMETERIZATIONS[i % 3] if name != "zero-snr" else ("v", "x0")[i % 2]
            cases.append(dict(betas=betas.tolist(), parameterization=parameterization,
                              variance=plans.VARIANCES[i % 3], options=options, where=f"{name} {options}"))
    answers = node({"plans": cases})["plans"]
    assert len(answers) == len(cases) and sum("error" not in a for a in answers) > 0.9 * len(cases)
    for case, got in zip(cases, answers):
        assert_same_plan(python_plan(case), got, f"{case['where']} {case['parameterization']} {case['variance']}")


@needs_node
def test_a_files_own_plan_is_the_default_of_the_port():
    """plan.model_options in JavaScript: a student's own plan where no sampler is named (its steps, spacing, clip),
    a named sampler's own defaults otherwise."""
    own = dict(sampler="ddim", steps=4, spacing="trailing", clip=False)
    cases = [dict(betas=SCHEDULES["zero-snr"].tolist(), parameterization="v", variance="fixed_small", own=own,
                  options=options) for options in ({}, {"steps": 2}, {"clip": True}, {"sampler": "unipc", "steps": 5},
                                                   {"sampler": "ancestral", "steps": 10, "clip": None}, {"eta": 0.5})]
    for case, got in zip(cases, node({"plans": cases})["plans"]):
        assert_same_plan(python_plan(case), got, str(case["options"]))
    assert len(node({"plans": cases[:1]})["plans"][0]["t"]) == 4


@needs_node
def test_the_noise_port_is_numpys_random_state():
    """RandomState(seed).standard_normal in draws of several sizes (odd ones: the cached second value of the polar
    method carries over between draws), for seeds across numpy's range: float64 within two units in the last place
    (JavaScript's Math.log is not the C library's log), the float32 noise the samplers use identical."""
    sizes = [1, 6, 7, 1000, 3]
    cases = [{"seed": seed, "sizes": sizes} for seed in (0, 1, 9, 123456789, 2 ** 32 - 1)]
    for case, got in zip(cases, node({"noise": cases})["noise"]):
        rng = np.random.RandomState(case["seed"])
        for n, draws in zip(sizes, got):
            want = rng.standard_normal(n)
            assert (np.abs(np.array(draws) - want) <= 2 * np.spacing(np.abs(want))).all(), case["seed"]
            assert np.array_equal(np.float32(draws), want.astype(np.float32)), case["seed"]


@needs_node
def test_the_metadata_is_read_from_the_files_bytes(models, conditional_model, tmp_path):
    import onnx
    files = [models["eps_small"], models["v_student"], conditional_model]
    (tmp_path / "not-onnx.onnx").write_bytes(b"\x07" * 100)
    answers = node({"metadata": [str(f) for f in files] + [str(tmp_path / "not-onnx.onnx")]})["metadata"]
    for file, got in zip(files, answers):
        assert got == {p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props}
    assert "not an ONNX file" in answers[-1]["error"]


@needs_node
def test_the_metadata_checks_are_pythons(tmp_path):
    """The page refuses what OnnxSampler refuses, with the same reason, and takes a file's own plan."""
    good = metadata("v", "fixed_small", clip=False, zero_snr=True)
    bad = [{k: v for k, v in good.items() if k != "ddpm.betas"}, {**good, "ddpm.format": "2"},
           {**good, "ddpm.variance": "wide"}, {**good, "ddpm.sampler": "euler"}, {**good, "ddpm.steps": "0"},
           {**good, "ddpm.num_classes": "3"}, {**good, "ddpm.parameterization": "eps"}, {**good, "ddpm.clip_denoised": "1"}]
    answers = node({"info": [good, {**good, "ddpm.sampler": "ddim", "ddpm.steps": "4"}, *bad]})["info"]
    assert answers[0]["defaultOptions"]["sampler"] == "ancestral" and answers[0]["defaultOptions"]["clip"] is False
    assert answers[1]["defaultOptions"]["steps"] == 4
    for meta, got in zip(bad, answers[2:]):
        reason = next(k for k in ("missing metadata 'ddpm.betas'", "ddpm.format", "ddpm.variance 'wide'",
                                  "ddpm.sampler 'euler'", "ddpm.steps", "must agree", "zero terminal SNR",
                                  "ddpm.clip_denoised") if k in got.get("error", ""))
        assert reason, (meta, got)


@needs_node
def test_the_labels_are_the_clis():
    cases = [dict(numClasses=3, classes=[2, 0], n=5, guidance=2.0), dict(numClasses=3, classes=[1], n=4, guidance=0.0),
             dict(numClasses=3, classes=None, n=3, guidance=None), dict(numClasses=0, classes=None, n=3, guidance=None)]
    got = node({"labels": cases})["labels"]
    assert got[0] == [plans.balanced_labels([2, 0], 5).tolist(), 2.0]
    assert got[1] == [[3] * 4, 0.0] and got[2] == [[3] * 3, 1.0] and got[3] == [None, 1.0]


# ---------------------------------------------------------------------------- the page in Chromium

def grey_levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b)).max())


@pytest.mark.parametrize("name,sampler,steps,extra", [
    ("eps_small", "ddim", 10, {}), ("v_zero_snr", "unipc", 5, {}), ("eps_small", "dpmpp2m-sde", 10, {}),
    ("eps_learned", "ancestral", 50, {}), ("x0_small", "dpmpp3m", 8, {"spacing": "logsnr"}),
    ("v_large", "ddim", 6, {"eta": 0.7, "corrector_steps": 1, "snr": 0.2}), ("v_student", None, None, {}),
    ("eps_small", "ancestral", None, {"batch_size": 3})])
def test_the_page_samples_what_python_samples(browser, models, name, sampler, steps, extra):
    """The page's samples equal OnnxSampler's (float32 within 2e-5, the same pixels): several samplers, every
    parameterisation and variance, a corrector, a student's own plan, and batches smaller than the run."""
    n, seed = 7, 5
    got = web.run_headless(models[name], 300, sampler=sampler, steps=steps, seed=seed, num_samples=n, **extra)
    assert got["ok"], got
    python = OnnxSampler(models[name], "cpu", threads=1)
    fields = {k: v for k, v in extra.items() if k != "batch_size"}
    want = python.sample(n, sampler, steps, seed=seed, batch=extra.get("batch_size"), **fields)
    assert got["calls"] == len(python.plan(sampler, steps, **fields)) * -(-n // extra.get("batch_size", n))
    assert np.abs(got["samples"] - want).max() <= 2e-5 and grey_levels(got["samples"], want) <= 1
    assert got["provider"] == "wasm" and got["isolated"] and got["threads"] >= 1


@pytest.mark.parametrize("name,sampler,steps", [("eps_small", "ddim", 10), ("eps_learned", "ancestral", 20),
                                                ("v_zero_snr", "unipc", 5)])
def test_the_webgpu_provider_samples_what_python_samples(browser, models, name, sampler, steps):
    """WebGPU, the page's optional provider (here on Chromium's software Vulkan where there is no GPU): the same
    images within one grey level."""
    got = web.run_headless(models[name], 300, sampler=sampler, steps=steps, seed=2, num_samples=5, provider="webgpu")
    assert got["ok"] and got["provider"].startswith("webgpu ("), got
    want = OnnxSampler(models[name], "cpu", threads=1).sample(5, sampler, steps, seed=2)
    assert np.abs(got["samples"] - want).max() <= 1e-4 and grey_levels(got["samples"], want) <= 1


@pytest.mark.parametrize("classes,guidance", [("2,0", 2.5), ("1", None), (None, 0.0)])
def test_the_page_guides_a_class_conditional_file_as_onnx_sample(browser, conditional_model, tmp_path, classes, guidance):
    args = ["--num-samples", "6", "--sampler", "ddim", "--steps", "8", "--seed", "3"]
    args += (["--classes", classes] if classes else []) + (["--guidance", str(guidance)] if guidance is not None else [])
    assert cli("web", conditional_model, "--headless", *args, "--out", tmp_path / "web.npz").returncode == 0
    assert cli("onnx-sample", conditional_model, *args, "--out", tmp_path / "ort.npz").returncode == 0
    web_npz, ort_npz = np.load(tmp_path / "web.npz"), np.load(tmp_path / "ort.npz")
    assert np.abs(web_npz["arr_0"].astype(int) - ort_npz["arr_0"]).max() <= 1
    assert np.array_equal(web_npz["arr_1"], ort_npz["arr_1"])


def test_the_page_shows_its_errors(browser, models):
    """What the page shows (and posts) for a file that is not ours and for a sampler it does not know."""
    got = web.run_headless(models["no_meta"], 120)
    assert not got["ok"] and "is not a DDPM model: missing metadata 'ddpm.format'" in got["error"]
    got = web.run_headless(models["eps_small"], 120, sampler="euler")
    assert not got["ok"] and got["error"].startswith("sampler must be one of ancestral, ddim")


def test_the_server_isolates_the_page_and_serves_the_right_types(browser, models):
    with web.Server(models["eps_small"]) as server:
        base = server.url().split("?")[0]
        for path, mime in (("", "text/html"), ("app.js", "text/javascript"), ("model.onnx", "application/octet-stream"),
                           ("ort/ort-wasm-simd-threaded.jsep.wasm", "application/wasm")):
            with urllib.request.urlopen(base + path) as r:
                assert r.headers["Content-Type"].startswith(mime), path
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        for path in ("../web.py", "ort/../../package.json", "node_modules/onnxruntime-web/package.json"):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(base + path)


def test_web_errors(models, tmp_path):
    assert_user_error(cli("web", models["eps_small"], "--out", tmp_path / "x.png"), "--out", "needs --headless")
    assert_user_error(cli("web", models["no_meta"], "--headless"), "not a DDPM model")
    assert_user_error(cli("web", models["eps_small"], "--headless", "--sampler", "ddim", "--eta", "2"), "--eta")
    assert_user_error(cli("web", models["eps_small"], "--headless", "--classes", "1"), "class-conditional")
    assert_user_error(cli("web", models["eps_small"], "--headless", "--out", tmp_path / "x.gif"), ".png or .npz")


def test_no_browser_is_an_error_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPM_BROWSER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(web.WebError, match="apt-get install chromium"):
        web.browser()
    monkeypatch.setenv("DDPM_BROWSER", str(tmp_path / "chrome"))
    with pytest.raises(web.WebError, match="DDPM_BROWSER"):
        web.browser()


def test_the_page_as_a_person_uses_it(browser, tmp_path):
    """`ddpm web MODEL` prints the page's address; opened there (playwright-core), Sample draws the digits model's
    grid with the progress bar moving through the run, and reports calls per second, provider and threads."""
    import torch
    from ddpm_reference import unet
    from ddpm_reference.export.onnx_export import export_onnx
    torch.manual_seed(0)
    net = unet.UNet(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, image_size=8)
    export_onnx(net.eval(), ddpm.Diffusion(ddpm.beta_schedule("linear", 100)), (1, 8, 8), tmp_path / "model.onnx")
    server = subprocess.Popen([str(Path(sys.executable).parent / "ddpm"), "web", str(tmp_path / "model.onnx"),
                               "--port", "0", "--num-samples", "16"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = line.split(" on ", 1)[1].split(" (Ctrl-C")[0]
        assert url.startswith("http://127.0.0.1:") and "num_samples=16" in url, line
        res = subprocess.run([NODE or "node", str(ROOT / "tests" / "web_page.mjs"), url, str(tmp_path / "page.png")],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "BROWSER": browser})
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(30)
    shown = json.loads(res.stdout)
    assert shown["error"] == "" and shown["progress"] == 1 and "100 network calls" in shown["status"], shown
    assert "calls/s" in shown["status"] and "wasm" in shown["status"] and "T = 100" in shown["about"], shown
    assert len([p for p in shown["progressSeen"] if 0 < p < 1]) >= 2, shown  # it moved while sampling
    assert shown["width"] == 4 * 34 + 2 and shown["lit"] > 0.5, shown  # a 4 x 4 grid of 32-pixel images, drawn
    assert (tmp_path / "page.png").stat().st_size > 10000


def test_the_page_refuses_bad_controls(browser, models):
    for query, error in (({"batch_size": -3}, "batch size must be a whole number >= 1"),
                         ({"num_samples": 0}, "images must be a whole number >= 1"),
                         ({"sampler": "ddim", "eta": 3}, "eta must be in [0, 1]"),
                         ({"sampler": "ddim", "steps": 2.5}, "steps must be a whole number")):
        got = web.run_headless(models["eps_small"], 120, **query)
        assert not got["ok"] and got["error"].startswith(error), (query, got)


def test_a_port_in_use_is_a_user_error(browser, models):
    with web.Server(models["eps_small"]) as server:
        assert_user_error(cli("web", models["eps_small"], "--port", server.port), "cannot serve on 127.0.0.1")

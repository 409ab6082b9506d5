"""export/onnx_sampler.py as an application embeds it: its own providers and session options, onnxruntime's
global logger left alone (and no provider-load noise under "auto"), and the licence it is copied with."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddpm_reference import ddpm
from ddpm_reference.export import onnx_sampler
from ddpm_reference.export.onnx_export import export_onnx
from ddpm_reference.export.onnx_sampler import ModelError, OnnxSampler

ROOT = Path(__file__).resolve().parents[1]
IMAGE, T = (1, 8, 8), 20
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


class TinyEps(torch.nn.Module):
    """A small conv eps_theta(x, t) that depends on t (test_export's stand-in): the sampler is tested, not the net."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(T, 8)
        self.c1, self.c2 = torch.nn.Conv2d(IMAGE[0], 8, 3, padding=1), torch.nn.Conv2d(8, IMAGE[0], 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.c2(torch.nn.functional.silu(self.c1(x) + self.emb(t)[:, :, None, None])))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "eps.onnx"
    export_onnx(TinyEps().eval(), ddpm.Diffusion(ddpm.beta_schedule("linear", T)), IMAGE, path)
    return path


def options(threads: int = 1) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    return o


def draw(sampler: OnnxSampler) -> list[np.ndarray]:
    """Samples through a noisy one-step plan and a two-step-memory plan (both kinds of update graph)."""
    return [sampler.sample(3, "ancestral", 4, seed=5), sampler.sample(3, "dpmpp2m", 4, seed=5, batch=2)]


# ------------------------------------------------------------------------------------------- licence
def test_licence_travels_with_the_single_file():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Copyright (c) 2026 The DDPM reference authors" in licence
    assert "Permission is hereby granted, free of charge" in licence
    lines = (ROOT / "export" / "onnx_sampler.py").read_text().splitlines()
    assert lines[0] == "# SPDX-License-Identifier: MIT" and lines[1].startswith("# Copyright (c) 2026")
    assert onnx_sampler.__doc__.startswith("Sample from a DDPM")  # the comment did not displace the docstring


# ------------------------------------------------------------------------------------------- the global logger
def test_the_global_log_level_is_never_set(model, monkeypatch):
    """onnxruntime has no getter for its default logger's level: record every call that would change it."""
    calls = []
    for name in ("set_default_logger_severity", "set_default_logger_verbosity"):
        monkeypatch.setattr(ort, name, lambda *a, name=name: calls.append((name, a)))
        monkeypatch.setattr(ort.capi._pybind_state, name, lambda *a, name=name: calls.append((name, a)))
    for kwargs in ({"provider": "auto"}, {"provider": "cpu", "threads": 1}, {"providers": [CPU]},
                   {"session_options": options()}):
        draw(OnnxSampler(model, **kwargs))
    assert calls == []


def test_auto_is_quiet_and_the_apps_level_holds(model):
    """In a fresh process whose app set the global level to INFO: constructing samplers prints no provider-load
    failure (on a machine with onnxruntime-gpu and no CUDA, onnxruntime would print one), and afterwards a
    session of the app still logs at INFO (the old sampler reset the level to WARNING)."""
    script = textwrap.dedent(f"""
        import sys
        import onnxruntime as ort
        from ddpm_reference.export.onnx_sampler import OnnxSampler
        ort.set_default_logger_severity(1)
        for provider in ("auto", "cpu"):
            OnnxSampler({str(model)!r}, provider).sample(2, "ancestral", 3, seed=0)
        sys.stderr.write("--- app ---\\n"); sys.stderr.flush()
        ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sampler_part, app_part = proc.stderr.split("--- app ---\n")
    for noise in ("Failed to load library", "Failed to create CUDAExecutionProvider", "[E:onnxruntime"):
        assert noise not in sampler_part, sampler_part[-2000:]
    assert "[I:onnxruntime" in app_part, app_part[-2000:]


def test_auto_takes_cuda_wherever_cuda_loads(model, capfd):
    """The silent check behind "auto" agrees with onnxruntime: where provider "cuda" loads, "auto" uses it (and the
    update graphs too); where CUDA's libraries are missing, the check says so and "auto" is the CPU."""
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    try:
        cuda = OnnxSampler(model, "cuda")
    except ModelError:
        if "Failed to load library" in capfd.readouterr().err:  # onnxruntime's own attempt, on stderr
            assert not onnx_sampler._cuda_loads()
        assert OnnxSampler(model, "auto").provider == CPU
        return
    auto = OnnxSampler(model, "auto")
    assert onnx_sampler._cuda_loads() and auto.provider == cuda.provider == CUDA
    own = OnnxSampler(model, providers=[(CUDA, {"device_id": "0"}), CPU])
    want = draw(OnnxSampler(model, "cpu", threads=1))
    for sampler in (auto, own):
        for got, x in zip(draw(sampler), want):
            assert np.abs(got - x).max() <= 1e-3
        assert all(step.get_providers()[0] == CUDA for step in sampler._steps.values())


# ------------------------------------------------------------------------------------------- own providers and options
def test_own_providers_and_session_options_sample_the_same(model, tmp_path):
    want = draw(OnnxSampler(model, "cpu", threads=1))
    spin = options()
    spin.add_session_config_entry("session.intra_op.allow_spinning", "0")
    spin.optimized_model_filepath = str(tmp_path / "optimised.onnx")  # the network's business only
    samplers = [OnnxSampler(model, providers=[CPU], session_options=options()),
                OnnxSampler(model, providers=[(CPU, {})], threads=1),
                OnnxSampler(model, "cpu", session_options=spin)]
    for sampler in samplers:
        assert sampler.provider == CPU
        for got, x in zip(draw(sampler), want):
            np.testing.assert_array_equal(got, x)
        assert sampler._steps and all(step.get_providers() == [CPU] for step in sampler._steps.values())
    step = next(iter(samplers[2]._steps.values())).get_session_options()
    assert step.intra_op_num_threads == 1 and step.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert step.optimized_model_filepath == ""
    assert [i.name for i in onnx.load(str(tmp_path / "optimised.onnx")).graph.input] == ["x", "t"]


@pytest.mark.parametrize("kwargs, message", [
    ({"providers": CPU}, "providers must be a non-empty list of provider names or .name, options dict. pairs"),
    ({"providers": []}, "providers must be a non-empty list"),
    ({"providers": ["NoSuchExecutionProvider", CPU]}, f"from those this onnxruntime has: .*{CPU}"),
    ({"providers": [(CPU, "threads=1")]}, "providers must be a non-empty list"),
    ({"providers": [CPU], "provider": "cpu"}, "give provider or providers, not both"),
    ({"session_options": options(), "threads": 2}, "give threads or session_options, not both"),
    ({"session_options": {"intra_op_num_threads": 1}}, "session_options must be an onnxruntime.SessionOptions"),
    ({"provider": "gpu"}, "provider must be one of auto, cpu, cuda, got 'gpu'"),
])
def test_bad_provider_arguments_are_clear_errors(model, kwargs, message, capfd):
    with pytest.raises(ValueError, match=message) as info:
        OnnxSampler(model, **kwargs)
    assert "\n" not in str(info.value) and not isinstance(info.value, ModelError)
    assert "EP Error" not in capfd.readouterr().out  # onnxruntime's printed fall back never ran


def test_a_provider_that_raises_is_an_error_not_a_fall_back(model, capfd):
    """onnxruntime's own fall back (print "EP Error", retry on the CPU without the app's options) would hide that the
    app's providers were not used. TensorRT raises where its libraries are missing; where they load, it is used."""
    trt = "TensorrtExecutionProvider"
    if trt not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider")
    try:
        assert OnnxSampler(model, providers=[trt, CPU]).provider == trt
    except ModelError as e:
        assert str(model) in str(e) and "cannot be loaded with these providers or session options" in str(e)
        assert "\n" not in str(e)
    assert "EP Error" not in capfd.readouterr().out

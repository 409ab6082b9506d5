"""The OpenVINO engine (export/openvino_engine.py; cpp_runner built with -DDDPM_WITH_OPENVINO=ON): the same plan and
noise stream as onnxruntime, float32 samples within 1 grey level of onnxruntime's in Python and C++, bfloat16
network outputs within a bounded relative error of float32 (the FD of bf16 samples of a trained model is measured by
`ddpm bench sample --checkpoint`, BENCHMARKS.md), the precision chosen and explained, and one-line errors."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ddpm_reference import ddpm, unet
from ddpm_reference.export.onnx_export import export_onnx
from ddpm_reference.export.onnx_sampler import ModelError, OnnxSampler, to_uint8
from conftest import cli, run_runner

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino package is not installed "
                                                             "(pip install 'ddpm-reference[openvino]')")
IMAGE, T, CLASSES = (1, 8, 8), 100, ("cat", "dog", "eel")


def bf16_cpu() -> str | None:
    from ddpm_reference.export.openvino_engine import cpu_bf16
    return cpu_bf16()


def small_unet(out_channels: int, num_classes: int = 0) -> torch.nn.Module:
    """A small U-Net (GroupNorm, attention at 4x4, the timestep embedding) with every weight perturbed."""
    torch.manual_seed(out_channels + num_classes)
    net = unet.UNet(in_channels=1, out_channels=out_channels, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                    attn_resolutions=(4,), dropout=0.0, image_size=8, num_classes=num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """eps.onnx (unconditional, fixed_small) and cond.onnx (3 classes, learned_range: 2C output channels)."""
    folder = tmp_path_factory.mktemp("openvino")
    schedule = ddpm.beta_schedule("linear", T)
    # check=False: the export's own torch comparison is test_export's; here onnxruntime is the reference
    export_onnx(small_unet(1), ddpm.Diffusion(schedule), IMAGE, folder / "eps.onnx", check=False)
    export_onnx(small_unet(2, len(CLASSES)), ddpm.Diffusion(schedule, variance="learned_range"), IMAGE,
                folder / "cond.onnx", classes=CLASSES, check=False)
    calibration = np.random.default_rng(0).uniform(-1, 1, (64, *IMAGE)).astype(np.float32)
    export_onnx(small_unet(1), ddpm.Diffusion(schedule), IMAGE, folder / "int8.onnx", precision="int8",
                calibration_images=calibration, check=False)
    return folder


def grey_levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b)).max())


# ------------------------------------------------------------------------------------------- Python
@needs_openvino
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ancestral", 10), ("dpmpp2m", 6)])
def test_float32_samples_equal_onnxruntimes(models, sampler, steps):
    want = OnnxSampler(models / "eps.onnx", "cpu", threads=1).sample(5, sampler, steps, seed=3, batch=3)
    vino = OnnxSampler(models / "eps.onnx", threads=1, engine="openvino", precision="fp32")
    got, timing = vino.sample(5, sampler, steps, seed=3, batch=3, return_timing=True)
    assert grey_levels(got, want) <= 1 and np.abs(got - want).max() <= 1e-3
    assert (timing["provider"], timing["precision"], timing["precision_why"]) == ("OpenVINO CPU", "fp32", "as asked")
    assert sorted(vino.session._requests) == [2, 3]  # compiled once for each static batch, and kept


@needs_openvino
def test_guided_learned_range_samples_equal_onnxruntimes(models):
    labels, kwargs = [2, 2, 0, 0], {"seed": 5, "batch": 4, "guidance": 2.0}
    want = OnnxSampler(models / "cond.onnx", "cpu", threads=1).sample(4, "ancestral", 8, labels=labels, **kwargs)
    vino = OnnxSampler(models / "cond.onnx", threads=1, engine="openvino", precision="fp32")
    assert vino.class_names == list(CLASSES)  # the metadata, read by OpenVINO from the same file
    got = vino.sample(4, "ancestral", 8, labels=labels, **kwargs)
    assert grey_levels(got, want) <= 1 and np.abs(got - want).max() <= 1e-3
    assert sorted(vino.session._requests) == [8]  # guided: the network runs on [x; x]


@needs_openvino
def test_int8_file_runs_its_quantized_network(models):
    """OpenVINO runs the QDQ file's convolutions in int8 as onnxruntime does: both differ from the float32 network
    by the quantization's error, within the export's tolerance (10%), and from each other by less. (With signed
    int8 activations, OpenVINO's output was 56% off on this network; the export writes unsigned ones.)"""
    from ddpm_reference.export.openvino_engine import OpenVinoSession
    x = np.random.default_rng(0).standard_normal((16, *IMAGE)).astype(np.float32)
    int8 = ort.InferenceSession(str(models / "int8.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(models / "eps.onnx"), providers=["CPUExecutionProvider"])
    vino = OpenVinoSession(models / "int8.onnx", "fp32", threads=1).request(16)
    for t in (0, 50, T - 1):
        feed = {"x": x, "t": np.full(16, t, dtype=np.int64)}
        want, exact, got = int8.run(None, feed)[0], fp32.run(None, feed)[0], vino.infer(feed)[0]
        assert relative_rms(got, want) < relative_rms(want, exact) < 0.1 and relative_rms(got, exact) < 0.1, t
    sampler = OnnxSampler(models / "int8.onnx", engine="openvino", precision="fp32")
    assert sampler.precision == "int8" and sampler.why == "the file's ddpm.precision; its other operations fp32 (as asked)"


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@needs_openvino
@pytest.mark.skipif(HAS_OPENVINO and not bf16_cpu(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_bf16_network_outputs_are_within_a_bounded_relative_error(models):
    """OpenVINO's bf16 differs from float32 (it is really used) by a relative RMS well under 3% on every timestep,
    the network error that DDIM samples of the trained digits model tolerate (their FD: BENCHMARKS.md)."""
    from ddpm_reference.export.openvino_engine import OpenVinoSession
    path = str(models / "eps.onnx")
    reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    vino = OpenVinoSession(path, "auto", threads=1)
    assert (vino.precision, vino.why) == ("bf16", f"auto: {bf16_cpu()}")
    request = vino.request(16)
    x = np.random.default_rng(0).standard_normal((16, *IMAGE)).astype(np.float32)
    for t in (0, 50, T - 1):
        ts = np.full(16, t, dtype=np.int64)
        want = reference.run(None, {"x": x, "t": ts})[0]
        got = request.infer({"x": x, "t": ts})[0]
        assert 1e-5 < relative_rms(got, want) < 0.03, (t, relative_rms(got, want))


@needs_openvino
def test_precision_auto_follows_the_cpu_and_bf16_needs_it(models, monkeypatch):
    from ddpm_reference.export import openvino_engine
    have = bf16_cpu()
    auto = OnnxSampler(models / "eps.onnx", engine="openvino")
    assert (auto.precision, auto.why) == (("bf16", f"auto: {have}") if have else
                                          ("fp32", "auto: the CPU has neither AVX512-BF16 nor AMX"))
    monkeypatch.setattr(openvino_engine, "cpu_bf16", lambda: None)
    plain = OnnxSampler(models / "eps.onnx", engine="openvino")
    assert (plain.precision, plain.why) == ("fp32", "auto: the CPU has neither AVX512-BF16 nor AMX")
    with pytest.raises(ModelError, match="bf16 needs a CPU with AVX512-BF16 or AMX"):
        OnnxSampler(models / "eps.onnx", engine="openvino", precision="bf16")


def test_onnxruntime_computes_in_the_files_precision(models):
    s = OnnxSampler(models / "eps.onnx", "cpu", precision="fp32")
    assert (s.precision, s.why) == ("fp32", "the file's ddpm.precision")
    with pytest.raises(ModelError, match="onnxruntime computes in the file's own precision"):
        OnnxSampler(models / "eps.onnx", "cpu", precision="bf16")
    with pytest.raises(ModelError, match="runs the network on the CPU"):
        OnnxSampler(models / "eps.onnx", "cuda", engine="openvino")


# ------------------------------------------------------------------------------------------- command line
@needs_openvino
def test_onnx_sample_with_openvino_says_what_it_ran(models, capsys, tmp_path):
    code, out, err = cli("onnx-sample", models / "eps.onnx", "--engine", "openvino", "--precision", "fp32",
                         "--num-samples", 4, "--sampler", "ddim", "--steps", 5, "--out", tmp_path / "x.npz")
    assert code == 0, err
    assert "network calls on OpenVINO CPU in fp32 (as asked)" in out and (tmp_path / "x.npz").is_file()


def without_openvino(monkeypatch):
    """As if the openvino package were not installed: importing it fails, as it does then."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(sys.modules, "ddpm_reference.export.openvino_engine", raising=False)


@pytest.mark.parametrize("args, says", [
    (("--precision", "bf16"), "onnxruntime computes in the file's own precision (fp32)"),
    (("--engine", "openvino", "--provider", "cuda"), "the openvino engine runs the network on the CPU"),
    (("--engine", "openvino", "--precision", "int8"), "precision must be one of auto, fp32, bf16 for OpenVINO"),
    (("--engine", "openvino", "--precision", "bf16"), "precision bf16 needs a CPU with AVX512-BF16 or AMX"),
    (("--engine", "openvino"), "the openvino engine needs the openvino package: pip install 'ddpm-reference[openvino]'"),
])
def test_onnx_sample_errors_are_one_line(models, capsys, monkeypatch, tmp_path, args, says):
    if "bf16" in args and "openvino" in args:  # a CPU without bf16
        if not HAS_OPENVINO:
            pytest.skip("the openvino package is not installed")
        from ddpm_reference.export import openvino_engine
        monkeypatch.setattr(openvino_engine, "cpu_bf16", lambda: None)
    if args == ("--engine", "openvino") or ("int8" in args and not HAS_OPENVINO):
        without_openvino(monkeypatch)
        says = says if args == ("--engine", "openvino") else "needs the openvino package"
    code, out, err = cli("onnx-sample", models / "eps.onnx", *args, "--out", tmp_path / "x.png")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@needs_openvino
def test_bench_sample_openvino_precisions(runner, models):
    """bench sample's OpenVINO rows, in Python and in the C++ runner: the float32 file at fp32, and the int8 file;
    each row says the engine and precision that ran it."""
    from ddpm_reference import bench
    openvino_runner(runner, models / "eps.onnx")  # the runner that bench runs, built by the fixture
    rows = bench.bench_sample("digits", 2, ("openvino", "cpp-openvino"), 1, (("ddim", 2),), "cpu", None,
                              ("fp32", "int8"))
    said = [(r["backend"], r["precision"], r["device"].split(" (")[0]) for r in rows]
    assert said == [("openvino", "fp32", "OpenVINO CPU"), ("openvino", "int8", "OpenVINO CPU"),
                    ("cpp-openvino", "fp32", "OpenVINO CPU fp32"), ("cpp-openvino", "int8", "OpenVINO CPU int8")]
    assert all(r["net_evals_per_s"] > 0 and r["of_matmul_peak"] > 0 for r in rows)


def test_bench_sample_without_openvino_is_a_one_line_error(capsys, monkeypatch):
    without_openvino(monkeypatch)
    code, _, err = cli("bench", "sample", "--backends", "openvino", "--samplers", "ddim", "--steps", 1,
                       "--batch-size", 1, "--repeats", 1, "--device", "cpu")
    assert code == 2 and "the openvino backend needs the openvino package" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- C++
def openvino_runner(runner, path):
    """The runner, if its build has the OpenVINO engine: it must where the openvino wheel is installed (build.sh
    builds it then); skipped elsewhere."""
    proc = run_runner(runner, "--model", path, "--engine", "openvino", "--dump-plan", check=False)
    if "built without OpenVINO" in proc.stderr:
        if HAS_OPENVINO:
            pytest.fail(f"the openvino wheel is installed but cpp_runner was built without it: {proc.stderr}")
        pytest.skip("the openvino package is not installed, and cpp_runner/build.sh built without OpenVINO")
    assert proc.returncode == 0, proc.stderr
    return runner


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_cpp_float32_samples_equal_onnxruntimes(runner, models, tmp_path, sampler):
    path = models / "eps.onnx"
    openvino_runner(runner, path)
    args = ["--model", path, "--num-samples", 5, "--batch-size", 3, "--sampler", sampler, "--steps", 10, "--seed", 3]
    proc = run_runner(runner, *args, "--engine", "openvino", "--precision", "fp32", "--out", tmp_path / "x.npy", "--json")
    assert '"provider": "OpenVINO CPU fp32 (as asked)"' in proc.stdout
    want = OnnxSampler(path, "cpu", threads=1).sample(5, sampler, 10, seed=3, batch=3)
    got = np.load(tmp_path / "x.npy")
    assert grey_levels(got, want) <= 1 and np.abs(got - want).max() <= 1e-3


@pytest.mark.skipif(HAS_OPENVINO and not bf16_cpu(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_cpp_bf16_is_pythons_bf16(runner, models, tmp_path):
    """The same engine at the same precision in both languages: the same network outputs, the same update."""
    path = models / "cond.onnx"
    openvino_runner(runner, path)
    run_runner(runner, "--model", path, "--num-samples", 4, "--sampler", "ddim", "--steps", 8, "--seed", 1,
               "--classes", "eel,cat", "--guidance", 2, "--engine", "openvino", "--out", tmp_path / "x.npy")
    want = OnnxSampler(path, engine="openvino", precision="bf16").sample(4, "ddim", 8, seed=1, labels=[2, 2, 0, 0],
                                                                         guidance=2.0)
    assert np.abs(np.load(tmp_path / "x.npy") - want).max() <= 1e-4


def test_cpp_int8_is_pythons_int8(runner, models, tmp_path):
    """The int8 file on OpenVINO in both languages: the same network outputs, the same update, and it says int8."""
    path = models / "int8.onnx"
    openvino_runner(runner, path)
    proc = run_runner(runner, "--model", path, "--num-samples", 4, "--sampler", "ddim", "--steps", 8, "--seed", 2,
                      "--engine", "openvino", "--precision", "fp32", "--out", tmp_path / "x.npy", "--json")
    assert '"provider": "OpenVINO CPU int8 (the file\'s ddpm.precision), its other operations fp32 (as asked)"' in proc.stdout
    want = OnnxSampler(path, engine="openvino", precision="fp32").sample(4, "ddim", 8, seed=2)
    assert np.abs(np.load(tmp_path / "x.npy") - want).max() <= 1e-4


def test_cpp_engine_errors_are_one_line(runner, models):
    for args, says in [(("--precision", "bf16"), "ONNX Runtime computes in the file's own precision (fp32)"),
                       (("--engine", "openvino", "--provider", "cuda"), "engine openvino runs the network on the CPU"),
                       (("--engine", "vino"), "--engine: unknown engine 'vino' (onnxruntime or openvino)"),
                       (("--precision", "fp16"), "--precision: unknown precision 'fp16' (auto, fp32 or bf16)")]:
        proc = run_runner(runner, "--model", models / "eps.onnx", *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

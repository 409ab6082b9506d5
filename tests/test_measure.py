"""`ddpm fd` and `ddpm bench`: the metric's basic properties and the reports' structure (never the speed)."""
import json
import os

import numpy as np
import pytest

from ddpm_reference import bench, fd, unet
from ddpm_reference import data as datasets
from conftest import ROOT, assert_user_error, cli


def test_frechet_distance_closed_form_and_identity():
    rng = np.random.RandomState(0)
    a = rng.standard_normal((500, 3))
    a = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T  # mean 0, covariance I
    b = a * [1.5, 2.0, 0.5] + [1.0, 0.0, 0.0]
    # diagonal covariances: FD = ||mu_a - mu_b||^2 + sum (s_a - s_b)^2
    assert abs(fd.frechet_distance(a, b) - (1.0 + 0.25 + 1.0 + 0.25)) < 1e-9
    assert abs(fd.frechet_distance(a, a)) < 1e-8
    assert abs(fd.frechet_distance(a, b) - fd.frechet_distance(b, a)) < 1e-8


@pytest.fixture(scope="module")
def features():
    return fd.digits_features()


def test_digits_fd_properties(features):
    train, held = datasets.load_digits_data()
    ref = features(train)
    np.testing.assert_array_equal(ref, fd.digits_features()(train))  # trained deterministically
    assert abs(fd.frechet_distance(ref, ref)) < 1e-8
    floor = fd.frechet_distance(features(held), ref)
    rng = np.random.RandomState(0)
    fds = []
    for sigma in (20, 60, 150):
        noised = np.clip(held + rng.normal(0, sigma, held.shape), 0, 255).astype(np.uint8)
        fds.append(fd.frechet_distance(features(noised), ref))
    assert fds[0] < fds[1] < fds[2] and fds[2] > 3 * floor, (floor, fds)
    noise = rng.randint(0, 256, held.shape).astype(np.uint8)
    assert fd.frechet_distance(features(noise), ref) > 10 * floor


def test_the_second_feature_space_classifies_and_ranks_noise():
    """The CNN features (`ddpm fd --features cnn`): a classifier of the held-out digits, and an FD that grows with
    the noise added to them, far past its floor for noise alone."""
    features = fd.digits_cnn_features()
    train, held, _, held_labels = datasets.load_digits_data(labels=True)
    assert (features.classify(held) == held_labels).mean() > 0.95
    ref = features(train)
    floor = fd.frechet_distance(features(held), ref)
    rng = np.random.RandomState(0)
    fds = [fd.frechet_distance(features(np.clip(held + rng.normal(0, s, held.shape), 0, 255).astype(np.uint8)), ref)
           for s in (40, 80, 160)]
    assert floor < fds[0] < fds[1] < fds[2] and fds[2] > 3 * floor, (floor, fds)


def test_fd_cli_on_npz(tmp_path):
    _, held = datasets.load_digits_data()
    np.savez(tmp_path / "held.npz", held.transpose(0, 2, 3, 1))
    res = cli("fd", tmp_path / "held.npz", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["num_samples"] == 360 and abs(out["fd"] - out["floor"]) < 1e-9
    cnn = json.loads(cli("fd", tmp_path / "held.npz", "--features", "cnn", "--json").stdout)
    assert abs(cnn["fd"] - cnn["floor"]) < 1e-9 and abs(cnn["floor"] - out["floor"]) > 1e-3  # another space
    np.savez(tmp_path / "rgb.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert_user_error(cli("fd", tmp_path / "rgb.npz"), "8x8 grey digits")


FLOPS_PER_DIGIT = unet.flops_per_forward(unet.build_unet("digits"))


@pytest.mark.slow
def test_bench_sample_report():
    backends = ("torch", "ort") + (("cpp",) if os.path.exists(os.path.join(ROOT, "cpp_runner/build/ddpm_runner")) else ())
    rows = bench.bench_sample("digits", batch=4, backends=backends, repeats=1, runs=(("ancestral", 3), ("ddim", 2)),
                             device="cpu", precisions=("fp32", "bf16", "int8"))
    want_precisions = {"torch": ("fp32", "bf16"), "ort": ("fp32", "int8"), "cpp": ("fp32", "int8")}
    assert [(r["backend"], r["precision"], r["sampler"], r["steps"]) for r in rows] == [
        (b, p, s, n) for b in backends for p in want_precisions[b] for s, n in (("ancestral", 3), ("ddim", 2))]
    for r in rows:
        assert r["images_per_s"] > 0 and r["network_s"] > 0 and r["overhead"] > 0
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert abs(r["net_evals_per_s"] - r["images_per_s"] * r["steps"]) < 1e-6 * r["net_evals_per_s"]
        assert r["achieved_gflops"] == pytest.approx(r["net_evals_per_s"] * FLOPS_PER_DIGIT / 1e9) and r["of_matmul_peak"] > 0
        assert "fd" not in r  # no checkpoint: random weights, no quality to report
    peak = {(r["backend"], r["precision"], r["sampler"]): r["achieved_gflops"] * 1e9 / r["of_matmul_peak"] for r in rows}
    for b, p in {(b, p) for b, p, _ in peak}:  # torch: one probe per precision; an ONNX row: its own process's
        assert min(v for k, v in peak.items() if k[:2] == (b, p)) > 1e9
    assert peak["torch", "bf16", "ddim"] == pytest.approx(peak["torch", "bf16", "ancestral"])
    with pytest.raises(ValueError, match="backends"):
        bench.bench_sample("digits", batch=2, backends=("tpu",), repeats=1, runs=(("ddim", 1),), device="cpu")
    with pytest.raises(ValueError, match="precision"):
        bench.bench_sample("digits", batch=2, backends=("torch",), repeats=1, runs=(("ddim", 1),), device="cpu",
                          precisions=("int4",))


def test_bench_sample_checks_its_backends_first_and_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    timed = []

    def once(fn, repeats, sync=None, bare=None):  # what is timed, run once
        timed.append(fn())
        return ([1.0], [1.0]) if bare else [1.0]
    monkeypatch.setattr(bench, "_timed", once)
    monkeypatch.setattr(bench, "RUNNER", str(tmp_path / "ddpm_runner"))  # not built
    args = ["bench", "sample", "--samplers", "ddim", "--steps", 1, "--batch-size", 2, "--repeats", 1,
            "--precision", "fp32", "--device", "cpu"]
    res = cli(*args, "--backends", "torch,cpp")
    assert_user_error(res, "not built", "make cpp")
    assert timed == [] and res.stdout == ""  # refused before the torch row was timed

    def failing_child(cmd, backend):
        raise bench.UserError(f"backend {backend}: the engine failed")
    monkeypatch.setattr(bench, "_child_json", failing_child)
    res = cli(*args, "--backends", "torch,ort")
    assert_user_error(res, "backend ort: the engine failed")
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "backend" and lines[1].split()[:2] == ["torch", "fp32"]


@pytest.mark.slow
def test_bench_sample_of_a_checkpoint_gives_each_rows_fd(tmp_path):
    res = cli("train", "--train-steps", 5, "--batch-size", 8, "--diffusion-steps", 20, "--device", "cpu", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    res = cli("bench", "sample", "--checkpoint", tmp_path / "checkpoint.pt", "--batch-size", 20, "--samplers", "ddim",
              "--steps", 2, "--repeats", 1, "--backends", "torch,ort", "--precision", "fp32,int8", "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")]
    fds = [r["fd"] for r in rows]
    assert all(f > 0 for f in fds)
    assert_user_error(cli("bench", "sample", "--samplers", "euler"), "--samplers", "is not one of")
    fd_of = lambda *seeds: json.loads(cli("fd", tmp_path / "checkpoint.pt", "--sampler", "ddim", "--steps", 2,  # noqa: E731
                                          "--num-samples", 20, "--device", "cpu", "--json", *seeds).stdout)
    one, two, both = fd_of("--seed", 3), fd_of("--seed", 4), fd_of("--seeds", "3,4")
    assert both["fd"] == pytest.approx((one["fd"] + two["fd"]) / 2) and one["fd"] != two["fd"]
    assert both["fd_std"] == pytest.approx(abs(one["fd"] - two["fd"]) / 2) and both["seeds"] == [3, 4]
    assert_user_error(cli("fd", tmp_path / "checkpoint.pt", "--seed", 1, "--seeds", "3,4"), "give one")


@pytest.mark.slow
def test_bench_train_cli_json():
    res = cli("bench", "train", "--batch-size", 4, "--train-steps", 2, "--repeats", 1, "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["preset"] == "digits" and row["images_per_s"] > 0 and row["peak_memory_bytes"] > 0
    assert row["achieved_tflops"] > 0 and row["matmul_peak_tflops"] > 0
    assert row["of_matmul_peak"] == pytest.approx(row["achieved_tflops"] / row["matmul_peak_tflops"])
    assert_user_error(cli("bench", "train", "--precision", "fp8"), "--precision", "is not one of")


@pytest.mark.slow
def test_guidance_table_rows_are_fd_runs_of_the_sampler_given(tmp_path):
    """fd --guidance-table: one row per classifier-free scale, each the mean over --seeds of what `fd --guidance s`
    gives with the same sampler and seed (its FD and class agreement)."""
    res = cli("train", "--class-cond", "--train-steps", 5, "--batch-size", 8, "--diffusion-steps", 20, "--device", "cpu",
              "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    run = lambda *args: json.loads(cli("fd", tmp_path / "checkpoint.pt", "--sampler", "ddim", "--steps", 2,  # noqa: E731
                                       "--num-samples", 20, "--device", "cpu", "--json", *args).stdout)
    table = run("--guidance-table", "--seeds", "3,4")
    assert list(table["rows"]) == [f"classifier-free, s = {g:g}" for g in (0, 1, 1.5, 2, 3)] and table["seeds"] == [3, 4]
    for g in (1.5, 3):
        fd_mean, fd_std, calls, accuracy = table["rows"][f"classifier-free, s = {g:g}"]
        one, two = run("--guidance", g, "--seed", 3), run("--guidance", g, "--seed", 4)
        assert fd_mean == pytest.approx((one["fd"] + two["fd"]) / 2) and fd_std == pytest.approx(abs(one["fd"] - two["fd"]) / 2)
        assert accuracy == pytest.approx((one["class_accuracy"] + two["class_accuracy"]) / 2) and calls == 2
    assert_user_error(cli("fd", tmp_path / "checkpoint.pt", "--guidance-table", "--guidance", 2), "table's rows")

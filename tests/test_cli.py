"""The command line speaks one language: every option has help and a default, numbers are checked at the
boundary, options that cannot apply are refused, user errors are one line and bugs keep their traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli as run_cli
import typer

from ddpm_reference import classifier, cli, ddpm
from ddpm_reference import data as datasets


def commands():
    """(name, click command) of every command, bench's included."""
    root = typer.main.get_command(cli.app)
    for name, command in root.commands.items():
        if hasattr(command, "commands"):
            yield from ((f"{name} {sub}", c) for sub, c in command.commands.items())
        else:
            yield name, command


def test_every_option_has_help_and_shows_its_default():
    for name, command in commands():
        for p in command.params:
            if p.param_type_name != "option" or p.name == "help":
                continue
            assert p.help and p.help.strip(), f"ddpm {name} {p.opts[0]} has no help"
            assert p.show_default is not False, f"ddpm {name} {p.opts[0]} hides its default"
            assert not {"--n", "--batch", "--T", "--a", "--b"} & set(p.opts + p.secondary_opts), (name, p.opts)


def test_version(capsys):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"ddpm-reference {ddpm.__version__}"


@pytest.mark.parametrize("args, flag", [
    (("sample", "x.pt", "--guidance", "nan"), "--guidance"), (("sample", "x.pt", "--steps", "0"), "--steps"),
    (("sample", "x.pt", "--eta", "inf"), "--eta"), (("sample", "x.pt", "--num-samples", "0"), "--num-samples"),
    (("sample", "x.pt", "--seed", "-1"), "--seed"), (("sample", "x.pt", "--classifier-scale", "-inf"), "--classifier-scale"),
    (("onnx-sample", "x.onnx", "--snr", "-1"), "--snr"), (("onnx-sample", "x.onnx", "--batch-size", "0"), "--batch-size"),
    (("train", "--lr", "nan"), "--lr"), (("train", "--ema-decay", "1"), "--ema-decay"),
    (("train", "--train-steps", "0"), "--train-steps"), (("train", "--p-uncond", "inf"), "--p-uncond"),
    (("fd", "x.pt", "--num-samples", "1"), "--num-samples"), (("nll", "x.pt", "--num-images", "0"), "--num-images"),
    (("interpolate", "x.pt", "--frames", "1"), "--frames"), (("bench", "sample", "--batch-size", "0"), "--batch-size"),
    (("sample", "x.pt", "--sampler", "euler"), "--sampler"), (("export", "x.pt", "--precision", "bf16"), "--precision"),
])
def test_numbers_and_choices_are_checked_at_the_boundary(capsys, args, flag):
    code, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddpm: error:") and flag in lines[0], err


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(capsys, monkeypatch):
    def broken(*_, **__):
        raise ValueError("an internal inconsistency")
    monkeypatch.setattr(cli, "load_model", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        cli.main(["sample", "x.pt"])
    monkeypatch.undo()
    code, _, err = run_cli("sample", "missing.pt")
    assert code == 2 and err.strip() == "ddpm: error: missing.pt: no such checkpoint file"


def test_measurements_default_to_float32():
    by_name = dict(commands())
    for name in ("nll", "fd"):
        assert {p.name: p.default for p in by_name[name].params}["precision"] == "fp32", name


def test_train_classifier_shows_exactly_the_options_it_reads(monkeypatch, tmp_path):
    params = {p.name for p in dict(commands())["train-classifier"].params if p.name != "help"}
    assert params == set(cli.CLASSIFIER_OPTIONS)
    read = set()

    class Spy(ddpm.TrainConfig):
        def __getattribute__(self, name):
            read.add(name)
            return object.__getattribute__(self, name)

        def validate(self):
            pass
    cfg = Spy(steps=2, batch_size=4, T=10, device="cpu", out=str(tmp_path), log_every=1)
    classifier.train_classifier(cfg, datasets.load_data("digits"))
    unread = set(cli.CLASSIFIER_OPTIONS) - read - {"data", "image_size"}  # the command loads the data with these
    assert not unread, f"train-classifier shows options it never reads: {unread}"


@pytest.mark.slow
def test_resume_applies_and_says_what_may_change_and_refuses_the_rest(capsys, tmp_path):
    base = ["train", "--train-steps", 3, "--batch-size", 4, "--diffusion-steps", 10, "--device", "cpu", "--out", tmp_path,
            "--precision", "fp32"]
    assert run_cli(*base)[0] == 0
    code, out, _ = run_cli(*base[:2], 5, "--lr", 1e-4, "--out", tmp_path, "--resume")
    state = ddpm.load_checkpoint(tmp_path / "checkpoint.pt")
    assert code == 0 and "resumed with --lr 0.002 -> 0.0001" in out, out
    assert state["step"] == 5 and state["config"]["lr"] == 1e-4 and state["config"]["T"] == 10
    code, _, err = run_cli("train", "--train-steps", 6, "--schedule", "linear", "--out", tmp_path, "--resume")
    assert code == 2 and "--schedule linear" in err and "resumed run" in err, err
    code, _, err = run_cli(*base)
    assert code == 2 and "--overwrite" in err
    assert run_cli(*base, "--overwrite")[0] == 0
    assert ddpm.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_options_that_cannot_apply_are_refused(capsys, tmp_path):
    for args, words in [(("sample", "x.pt", "--classifier-scale", 2), "needs --classifier"),
                        (("sample", "x.pt", "--snr", 0.2), "needs --corrector-steps"),
                        (("export", "x.pt", "--calibration", 8), "int8 only"),
                        (("fd", "x.npz", "--steps", 5), "not to a .npz"),
                        (("fd", "x.pt", "--table", "--eta", 0.5), "table's rows"),
                        (("interpolate", "x.pt", "--seeds", "1,2", "--images", "3,4"), "give one"),
                        (("train", "--resume", "--overwrite", "--out", tmp_path), "give one")]:
        code, _, err = run_cli(*args)
        assert code == 2 and words in err, (args, err)


def children(pid: int) -> list[int]:
    """The pids whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_bench_sample_ends_its_onnxruntime_child():
    bench = subprocess.Popen([sys.executable, "-m", "ddpm_reference.cli", "bench", "sample", "--backends", "ort",
                              "--samplers", "ancestral", "--batch-size", "2", "--repeats", "50", "--device", "cpu"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids = time.time() + 300, []
    while not kids and time.time() < deadline and bench.poll() is None:
        time.sleep(0.5)
        kids = children(bench.pid)
    assert kids, "bench sample started no child process"
    time.sleep(1.0)  # the child is past its start
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.time() + 20
    while any(running(k) for k in kids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [k for k in kids if running(k)], f"children {kids} outlived their bench"


def running(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("command", [("sample", "missing.pt"), ("onnx-sample", "missing.onnx"),
                                     ("interpolate", "missing.pt")])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, command):
    """--out in a folder that does not exist is the first error, before the model is even read."""
    code, _, err = run_cli(*command, "--out", tmp_path / "no" / "such" / "x.png")
    assert code == 2 and "--out" in err and "is not a writable folder" in err and "missing" not in err, err


def test_side_by_side_puts_grids_in_one_row(tmp_path):
    """Two grids of different sizes (a .png and a .npz) in one PNG: each where it belongs, a white gap between."""
    import numpy as np
    from PIL import Image
    from ddpm_reference.images import image_grid, save_images
    a = np.random.RandomState(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    b = np.random.RandomState(1).uniform(-1, 1, (9, 1, 8, 8)).astype(np.float32)
    save_images(a, tmp_path / "a.png")
    save_images(b, tmp_path / "b.npz")
    res = run_cli("side-by-side", tmp_path / "a.png", tmp_path / "b.npz", "--out", tmp_path / "ab.png")
    assert res.returncode == 0, res.stderr
    got = np.asarray(Image.open(tmp_path / "ab.png"))
    ga, gb = np.asarray(Image.open(tmp_path / "a.png")), image_grid(ddpm.to_uint8(b))
    assert got.shape == (max(ga.shape[0], gb.shape[0]), ga.shape[1] + 8 + gb.shape[1])
    assert np.array_equal(got[:ga.shape[0], :ga.shape[1]], ga) and (got[ga.shape[0]:, :ga.shape[1]] == 0).all()
    assert (got[:, ga.shape[1]:ga.shape[1] + 8] == 255).all() and np.array_equal(got[:, ga.shape[1] + 8:], gb)
    for args, words in (((tmp_path / "a.png",), "two or more"), ((tmp_path / "a.png", tmp_path / "b.npz", "--out",
                                                                  tmp_path / "x.npz"), "must end in .png")):
        code, _, err = run_cli("side-by-side", *args)
        assert code == 2 and words in err, err

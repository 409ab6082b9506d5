"""Data loading, Algorithm 1, checkpoints, resume (also after SIGKILL), DDP on CPU, CLI errors."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_user_error, cli
from ddpm_reference import ddpm
from ddpm_reference import data as datasets
from ddpm_reference.export.onnx_sampler import DEFAULT_GUIDANCE

FAST = dict(steps=40, batch_size=32, warmup=5, log_every=10, checkpoint_every=20, sample_every=10_000,
            T=100, device="cpu")


def fit(cfg: ddpm.TrainConfig, resume: bool = False) -> dict:
    """ddpm.train on the config's data set, as `ddpm train` runs it."""
    return ddpm.train(cfg, datasets.load_data(cfg.data, cfg.image_size), resume)


# ---- data

def test_digits_split_and_range():
    train, held = datasets.load_digits_data()
    assert train.shape == (1437, 1, 8, 8) and held.shape == (360, 1, 8, 8) and train.dtype == np.uint8
    assert train.max() == 255 and train.min() == 0 and len(np.unique(train)) == 17
    x = ddpm.to_model_range(torch.from_numpy(train))
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(ddpm.to_uint8(x), train)
    again, _ = datasets.load_digits_data()
    np.testing.assert_array_equal(train, again)


def test_image_folder_labels_are_its_subfolders(tmp_path):
    for cls, count in (("zebra", 3), ("cat", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            Image.fromarray(np.full((8, 8), 10 * i + len(cls), np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = datasets.load_data(str(tmp_path))
    assert data.classes == ["cat", "zebra"]  # sorted, as torchvision's ImageFolder
    assert np.concatenate([data.train_labels, data.held_out_labels]).tolist() == [0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.png")  # an image outside every class folder
    assert datasets.load_data(str(tmp_path)).classes == []


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(5):
        Image.fromarray(np.full((12, 16, 3), i * 40, np.uint8)).save(tmp_path / "sub" / f"{i}.png")
    Image.fromarray(np.full((20, 10, 3), 7, np.uint8)).save(tmp_path / "x.jpg")
    train, held = datasets.load_dataset(str(tmp_path), image_size=8)
    assert train.shape[1:] == (3, 8, 8) and len(train) + len(held) == 6
    with pytest.raises(ddpm.UserError, match="different sizes"):
        datasets.load_dataset(str(tmp_path))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ddpm.UserError, match="no .png"):
        datasets.load_dataset(str(tmp_path))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ddpm.UserError, match="mixed grey and colour"):
        datasets.load_dataset(str(tmp_path))
    (tmp_path / "b.png").unlink()
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(ddpm.UserError, match="unreadable image"):
        datasets.load_dataset(str(tmp_path))


def test_cifar_folder_and_npz(tmp_path):
    rng = np.random.RandomState(0)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(tmp_path / name, "wb") as f:  # the python batches' layout: data [N, 3072] and labels
            pickle.dump({b"data": rng.randint(0, 256, (4, 3072)).astype(np.uint8), b"labels": [i, 9, 0, 3]}, f)
    data = datasets.load_data(str(tmp_path))
    assert data.train.shape == (20, 3, 32, 32) and data.held_out.shape == (4, 3, 32, 32)
    assert data.train_labels.tolist()[:8] == [0, 9, 0, 3, 1, 9, 0, 3] and data.held_out_labels.tolist() == [5, 9, 0, 3]
    assert data.classes[9] == "truck" and len(data.classes) == 10
    arr = rng.randint(0, 256, (40, 6, 6, 3)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", arr)
    train, held = datasets.load_dataset(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(np.concatenate([train, held]), arr.transpose(0, 3, 1, 2))
    assert datasets.load_data(str(tmp_path / "a.npz")).train_labels is None
    np.savez(tmp_path / "labelled.npz", arr, np.arange(40) % 3)  # OpenAI's sample files: labels under arr_1
    data = datasets.load_data(str(tmp_path / "labelled.npz"))
    assert data.classes == ["0", "1", "2"] and np.concatenate([data.train_labels, data.held_out_labels]).tolist() == \
        (np.arange(40) % 3).tolist()
    np.savez(tmp_path / "badlabels.npz", arr, np.arange(39))
    with pytest.raises(ddpm.UserError, match="one label"):
        datasets.load_data(str(tmp_path / "badlabels.npz"))
    np.savez(tmp_path / "b.npz", arr.astype(np.float32))
    with pytest.raises(ddpm.UserError, match="expected uint8"):
        datasets.load_dataset(str(tmp_path / "b.npz"))


# ---- training

@pytest.mark.slow
def test_loss_falls_and_checkpoint_round_trips(tmp_path):
    cfg = ddpm.TrainConfig(**{**FAST, "steps": 60}, out=str(tmp_path))
    res = fit(cfg)
    losses = [l for _, l in res["losses"]]
    assert losses[-1] < 0.7 * losses[0], losses
    model, diffusion, cfg2, shape = ddpm.load_model(res["checkpoint"])
    assert shape == (1, 8, 8) and cfg2 == cfg and diffusion.T == 100
    raw, _, _, _ = ddpm.load_model(res["checkpoint"], ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))
    x = ddpm.sample(model, ddpm.make_plan(diffusion, "ddim", 10), (4, *shape))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.slow
def test_resume_gives_identical_losses(tmp_path):
    full = fit(ddpm.TrainConfig(**FAST, out=str(tmp_path / "a")))
    fit(ddpm.TrainConfig(**{**FAST, "steps": 20}, out=str(tmp_path / "b")))
    resumed = fit(ddpm.TrainConfig(**FAST, out=str(tmp_path / "b")), resume=True)
    assert resumed["losses"] == [x for x in full["losses"] if x[0] > 20]
    a, b = (ddpm.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_sigkill_then_resume_continues_exactly(tmp_path):
    args = ["train", "--train-steps", 400, "--batch-size", 16, "--diffusion-steps", 100, "--checkpoint-every", 20, "--log-every", 10,
            "--sample-every", 100_000, "--device", "cpu", "--warmup", 5]
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_reference.cli", *map(str, args), "--out",
                             str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ddpm.load_checkpoint(ckpt)["step"]
    assert 20 <= killed_at < 100
    res = cli(*args, "--train-steps", 100, "--out", tmp_path / "run", "--resume")
    assert res.returncode == 0, res.stderr
    ref = cli(*args, "--train-steps", 100, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    a, b = (ddpm.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("ref", "run"))
    assert a["step"] == b["step"] == 100
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = ddpm.training_losses

    def diverging(*args, **kwargs):  # the loss turns NaN from the 26th step on
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 25 else loss
    monkeypatch.setattr(ddpm, "training_losses", diverging)
    cfg = ddpm.TrainConfig(**{**FAST, "checkpoint_every": 10, "log_every": 10}, out=str(tmp_path))
    with pytest.raises(ddpm.UserError, match="NaN or inf before step 30"):
        fit(cfg)
    kept = ddpm.load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 20 and all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.slow
def test_sample_grids_do_not_change_training(tmp_path):
    for name, every in (("a", 10_000), ("b", 5)):
        fit(ddpm.TrainConfig(**{**FAST, "steps": 20, "sample_every": every}, out=str(tmp_path / name)))
    assert (tmp_path / "b" / "samples-5.png").exists()
    a, b = (ddpm.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten(tmp_path):
    fit(ddpm.TrainConfig(**{**FAST, "steps": 10, "checkpoint_every": 10}, out=str(tmp_path)))
    with pytest.raises(ddpm.UserError, match="pass --resume"):
        fit(ddpm.TrainConfig(**FAST, out=str(tmp_path)))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "ddpm_reference.cli", "train", "--train-steps", "10", "--batch-size", "8",
                          "--diffusion-steps", "50", "--device", "cpu", "--checkpoint-every", "10", "--sample-every", "1000",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Grad strides do not match" not in res.stderr  # gradients accumulate in the buckets' layout, no copy
    state = ddpm.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 10 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])  # ranks draw different data


# ---- command line

def test_cli_user_errors(tmp_path):
    assert_user_error(cli("train", "--schedule", "cosin"), "--schedule", "is not one of")
    assert_user_error(cli("train", "--train-steps", "x"), "--train-steps")
    assert_user_error(cli("train", "--data", tmp_path / "missing"), "no such file or folder")
    assert_user_error(cli("train", "--variance", "learned_range"), "hybrid")
    assert_user_error(cli("train", "--preset", "huge"), "--preset", "is not one of")
    assert_user_error(cli("sample", tmp_path / "missing.pt"), "no such checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x05" + np.random.default_rng(0).bytes(1000))
    assert_user_error(cli("sample", tmp_path / "junk.pt"), "not a readable checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert_user_error(cli("nll", tmp_path / "other.pt"), "not a ddpm checkpoint")
    assert_user_error(cli("sample", tmp_path / "other.pt", "--out", "x.jpg"), "must end in")
    assert_user_error(cli("bogus"), "No such command")


def test_foreign_and_truncated_files_are_user_errors(tmp_path):
    """Random bytes, random bytes behind a pickle header (the unpickler then fails in many ways: IndexError,
    KeyError, UnicodeDecodeError, ...) and truncations of a real checkpoint: each one a UserError."""
    rng = np.random.default_rng(0)
    torch.save({"format": ddpm.CHECKPOINT_FORMAT, "w": torch.arange(1000.0)}, tmp_path / "real.pt")
    real = (tmp_path / "real.pt").read_bytes()
    cases = [rng.bytes(int(rng.integers(1, 2000))) for _ in range(100)]
    cases += [b"\x80" + bytes([p]) + rng.bytes(int(rng.integers(0, 2000))) for _ in range(100) for p in (2, 5)]
    cases += [real[:int(n)] for n in rng.integers(0, len(real) - 1, 100)]
    for data in cases:
        (tmp_path / "junk.pt").write_bytes(data)
        with pytest.raises(ddpm.UserError, match="not a readable checkpoint"):
            ddpm.load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.slow
def test_cli_few_step_samplers_reconstruct_and_interpolate(tmp_path):
    res = cli("train", "--train-steps", 10, "--batch-size", 16, "--diffusion-steps", 50, "--device", "cpu", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    ckpt, onnx_file = tmp_path / "checkpoint.pt", tmp_path / "model.onnx"
    for args in (["--sampler", "dpmpp2m", "--steps", 6, "--spacing", "logsnr"], ["--sampler", "dpmpp2m-sde", "--steps", 6],
                 ["--sampler", "ancestral", "--steps", 5, "--corrector-steps", 2, "--snr", 0.1]):
        res = cli("sample", ckpt, "--num-samples", 3, *args, "--out", tmp_path / "s.npz")
        assert res.returncode == 0 and np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 1), res.stderr
    assert "13 network calls" in res.stdout  # 5 predictor rows and 2 corrector rows at each of the last 4 timesteps
    assert cli("export", ckpt, "--out", onnx_file).returncode == 0
    res = cli("onnx-sample", onnx_file, "--num-samples", 3, "--sampler", "dpmpp2m", "--steps", 6, "--out", tmp_path / "o.npz")
    assert res.returncode == 0, res.stderr
    tables = []
    for model in (ckpt, onnx_file):
        res = cli("reconstruct", model, "--step-counts", "4,8", "--num-images", 20, "--json")
        assert res.returncode == 0, res.stderr
        tables.append(json.loads(res.stdout))
        assert [r["steps"] for r in tables[-1]] == [4, 8] and all(r["num_images"] == 20 and r["mse"] >= 0 for r in tables[-1])
        res = cli("interpolate", model, "--images", "2,5", "--frames", 4, "--steps", 5, "--out", tmp_path / "i.npz")
        assert res.returncode == 0 and np.load(tmp_path / "i.npz")["arr_0"].shape == (4, 8, 8, 1), res.stderr
    assert [r["mse"] for r in tables[0]] == pytest.approx([r["mse"] for r in tables[1]], rel=1e-3)  # torch = onnxruntime
    assert cli("interpolate", ckpt, "--seeds", "1,2", "--frames", 3, "--out", tmp_path / "j.png").returncode == 0
    assert_user_error(cli("interpolate", ckpt, "--images", "10000,1", "--out", tmp_path / "k.png"), "out of range")
    assert_user_error(cli("interpolate", ckpt, "--seeds", "1", "--out", tmp_path / "k.png"), "two numbers")
    assert_user_error(cli("reconstruct", ckpt, "--step-counts", "4,x"), "comma-separated")
    assert_user_error(cli("sample", ckpt, "--sampler", "dpmpp2m", "--corrector-steps", 1), "one-step samplers")
    assert_user_error(cli("sample", ckpt, "--sampler", "dpmpp3"), "--sampler", "is not one of")
    assert_user_error(cli("onnx-sample", onnx_file, "--sampler", "ancestral", "--eta", 0.5), "eta applies")
    assert_user_error(cli("onnx-sample", onnx_file, "--class", 1), "class-conditional model")
    assert_user_error(cli("onnx-sample", onnx_file, "--guidance", 2), "class-conditional model")


@pytest.mark.slow
def test_class_conditional_training_learns_and_resumes_exactly(tmp_path):
    cfg = dict(FAST, steps=40, class_cond=True, p_uncond=0.2)
    res = fit(ddpm.TrainConfig(**cfg, out=str(tmp_path / "a")))
    losses = [l for _, l in res["losses"]]
    assert losses[-1] < 0.7 * losses[0], losses
    model, _, cfg_loaded, _ = ddpm.load_model(tmp_path / "a" / "checkpoint.pt")
    assert model.class_names == [str(d) for d in range(10)] and cfg_loaded.class_cond and model.label_emb.num_embeddings == 11
    fit(ddpm.TrainConfig(**{**cfg, "steps": 20}, out=str(tmp_path / "b")))
    resumed = fit(ddpm.TrainConfig(**cfg, out=str(tmp_path / "b")), resume=True)
    assert resumed["losses"][-1] == res["losses"][-1]  # the labels' dropout draws resume with the RNG
    a, b = (ddpm.load_checkpoint(tmp_path / d / "checkpoint.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    res = cli("nll", tmp_path / "a" / "checkpoint.pt", "--num-images", 8, "--json")  # conditioned on the true labels
    assert res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1])["total"] > 0, res.stderr
    assert_user_error(cli("sample", tmp_path / "a" / "checkpoint.pt", "--class", 12), "not a class of this model")
    ckpt, files = tmp_path / "a" / "checkpoint.pt", iter(range(10))

    def pixels(command, model, *args):
        out = tmp_path / f"{next(files)}.npz"
        res = cli(command, model, "--num-samples", 6, "--sampler", "ddim", "--steps", 4, *args, "--out", out)
        assert res.returncode == 0, res.stderr
        return np.load(out)["arr_0"].astype(int)
    assert cli("export", ckpt, "--out", tmp_path / "cond.onnx").returncode == 0
    guided = pixels("sample", ckpt, "--numpy-noise")  # no --guidance: DEFAULT_GUIDANCE, in torch and onnxruntime
    assert np.array_equal(guided, pixels("sample", ckpt, "--numpy-noise", "--guidance", DEFAULT_GUIDANCE))
    assert not np.array_equal(guided, pixels("sample", ckpt, "--numpy-noise", "--guidance", DEFAULT_GUIDANCE + 1))
    assert np.abs(guided - pixels("onnx-sample", tmp_path / "cond.onnx")).max() <= 1
    np.savez(tmp_path / "unlabelled.npz", np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(ddpm.UserError, match="no labels"):
        fit(ddpm.TrainConfig(**{**cfg, "data": str(tmp_path / "unlabelled.npz")}, out=str(tmp_path / "c")))


@pytest.mark.slow
def test_cli_classifier_guidance(tmp_path):
    assert cli("train", "--train-steps", 10, "--diffusion-steps", 50, "--batch-size", 16, "--out", tmp_path, "--device", "cpu").returncode == 0
    res = cli("train-classifier", "--train-steps", 30, "--diffusion-steps", 50, "--batch-size", 32, "--out", tmp_path, "--device", "cpu")
    assert res.returncode == 0 and (tmp_path / "classifier.pt").exists(), res.stderr
    ckpt, clf = tmp_path / "checkpoint.pt", tmp_path / "classifier.pt"
    for sampler in ("ancestral", "ddim"):
        res = cli("sample", ckpt, "--classifier", clf, "--class", 3, "--classifier-scale", 2, "--num-samples", 4,
                  "--sampler", sampler, "--steps", 5, "--out", tmp_path / "g.npz")
        assert res.returncode == 0 and np.load(tmp_path / "g.npz")["arr_1"].tolist() == [3] * 4, res.stderr
    assert_user_error(cli("sample", ckpt, "--classifier", clf, "--out", tmp_path / "g.png"), "give them")
    assert_user_error(cli("sample", ckpt, "--classifier", ckpt, "--class", 1), "not a classifier")
    assert cli("export", ckpt, "--out", tmp_path / "m.onnx").returncode == 0
    assert_user_error(cli("sample", tmp_path / "m.onnx", "--classifier", clf, "--class", 1), "ONNX file")
    assert_user_error(cli("onnx-sample", tmp_path / "m.onnx", "--classifier", clf), "No such option")
    assert_user_error(cli("sample", ckpt, "--class", 1), "class-conditional model")
    res = cli("train-classifier", "--train-steps", 5, "--diffusion-steps", 100, "--batch-size", 8, "--out", tmp_path / "other")
    assert_user_error(cli("sample", ckpt, "--classifier", tmp_path / "other" / "classifier.pt", "--class", 1),
                      "noise levels must match")


@pytest.mark.slow
def test_cli_train_sample_nll(tmp_path):
    res = cli("train", "--train-steps", 20, "--batch-size", 16, "--diffusion-steps", 20, "--device", "cpu", "--out", tmp_path,
              "--sample-every", 20)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "samples-20.png").exists()
    ckpt = tmp_path / "checkpoint.pt"
    res = cli("sample", ckpt, "--num-samples", 5, "--batch-size", 2, "--out", tmp_path / "s.npz", "--sampler", "ddim", "--steps", 5)
    assert res.returncode == 0, res.stderr
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    res = cli("nll", ckpt, "--num-images", 8, "--json")
    assert res.returncode == 0, res.stderr
    import json
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["num_images"] == 8 and out["total"] > 0 and abs(out["total"] - out["prior"] - out["vb"] - out["decoder"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("decay, updates, cap_step", [(0.999, 50, None), (0.9, 200, 80)])
def test_ema_forgets_the_first_weights_as_its_warm_up_says(decay, updates, cap_step):
    """The EMA's weight on the weights after step 0, after `updates` more steps: the closed form of the warm-up
    (1 + k) / (10 + k), prod_{k=1..n} = 10! (n + 1)! / (n + 10)!, then decay per step once capped (from cap_step)."""
    cfg = ddpm.TrainConfig(**{**FAST, "ema_decay": decay})
    trainer = ddpm.Trainer(cfg, (1, 8, 8), torch.device("cpu"))
    for step in range(updates + 1):
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(1.0 if step == 0 else 0.0)  # the EMA's value is then its weight on step 0
        trainer.ema.update_parameters(trainer.model)
        trainer.step += 1
    n = updates if cap_step is None else cap_step - 1
    closed = math.factorial(10) * math.factorial(n + 1) / math.factorial(n + 10)
    closed *= decay ** (updates - n)
    for p in trainer.ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, closed), rtol=1e-5, atol=0), (p.flatten()[0].item(), closed)
    without = ddpm.TrainConfig(**{**FAST, "ema_decay": decay, "ema_warmup": False})
    assert ddpm.ema_decay_at(1, without) == decay and ddpm.ema_decay_at(1, cfg) == min(decay, 2 / 11)

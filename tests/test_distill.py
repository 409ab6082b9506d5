"""Progressive distillation: the target and its weight against closed forms on Gaussian data (whose optimal denoiser
is known), a student trained to the target reproduces the teacher's two-step map, the rounds' grids, exact resume,
and a student's own plan in every executor (torch, onnxruntime, C++), class-conditional too."""
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_user_error, cli, run_runner
from oracle import GaussianOracle

from ddpm_reference import ddpm, distill
from ddpm_reference import plan as plans
from ddpm_reference.data import load_data

MU, S = 0.3, 0.5


def zero_snr_v(T: int = 1000) -> ddpm.Diffusion:
    return ddpm.Diffusion(ddpm.rescale_zero_terminal_snr(ddpm.beta_schedule("cosine", T)), "v")


def teacher_grid(d: ddpm.Diffusion, steps: int):
    """(timesteps, alpha, sigma) of the teacher's grid of a student of `steps` calls, float64, x0 appended."""
    grid = distill.nested_grid(d.alphas_cumprod, steps)
    ab = np.append(d.alphas_cumprod[grid], 1.0)
    return torch.as_tensor(grid), torch.as_tensor(np.sqrt(ab)), torch.as_tensor(np.sqrt(1 - ab))


def test_the_target_is_the_x0_of_one_step_that_lands_where_two_exact_ddim_steps_land():
    """On Gaussian data with the optimal denoiser as the teacher: the teacher's two steps are rows 2k and 2k + 1 of
    the project's own DDIM plan of 2K steps, and one row k of the student's K-step plan with x0 = x~ from the same
    z_t lands on the same point (float64)."""
    d, K = zero_snr_v(), 4
    oracle = GaussianOracle(d, MU, S)
    grid, alpha, sigma = teacher_grid(d, K)
    two = plans.make_plan(d.alphas_cumprod, "v", "fixed_small", plans.PlanOptions("ddim", 2 * K, spacing="trailing",
                                                                                  clip=False))
    one = plans.make_plan(d.alphas_cumprod, "v", "fixed_small", distill.student_options(K))
    assert one.t.tolist() == two.t[::2].tolist() == grid[::2].tolist() and one.clip is False
    z_t = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k in range(K):
        z = z_t
        for row in (2 * k, 2 * k + 1):  # two rows of the plan, as run_plan executes them
            t = torch.full((len(z),), int(two.t[row]))
            z = two.mean_x0[row] * (two.x0_x[row] * z + two.x0_o[row] * oracle(z, t)) + two.mean_xt[row] * z
        j = 2 * k
        mid = distill.ddim_step(z_t, oracle.x0_hat(z_t, grid[[j]]), alpha[j], sigma[j], alpha[j + 1], sigma[j + 1])
        end = distill.ddim_step(mid, oracle.x0_hat(mid, grid[[j + 1]]), alpha[j + 1], sigma[j + 1], alpha[j + 2],
                                sigma[j + 2])
        torch.testing.assert_close(end, z, rtol=1e-10, atol=1e-12)
        target = distill.distillation_target(z_t, end, alpha[j], sigma[j], alpha[j + 2], sigma[j + 2])
        torch.testing.assert_close(one.mean_x0[k] * target + one.mean_xt[k] * z_t, z, rtol=1e-10, atol=1e-12)
    assert k == K - 1 and alpha[2 * K] == 1 and sigma[2 * K] == 0  # the last student step ends at x0


def test_a_student_trained_to_the_target_reproduces_the_two_step_map():
    """The teacher's two-step map on Gaussian data is affine in z_t, so an affine student x0 = g_k z + c_k per step
    can hold it exactly: trained by gradient descent on distillation_loss, its one-step map becomes the two-step
    map (and the loss falls to nothing)."""
    d, K = zero_snr_v(), 4
    oracle = GaussianOracle(d, MU, S)
    grid, alpha, sigma = teacher_grid(d, K)
    g = torch.zeros(2 * K + 1, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(2 * K + 1, dtype=torch.float64, requires_grad=True)
    student = lambda z, j: g[j].view(-1, 1, 1, 1) * z + c[j].view(-1, 1, 1, 1)  # noqa: E731
    teacher = lambda z, j: oracle.x0_hat(z, grid[j])  # noqa: E731
    opt = torch.optim.Adam([g, c], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(600):
        x0 = MU + S * torch.randn(256, 1, 2, 2, dtype=torch.float64, generator=gen)
        j = 2 * torch.randint(0, K, (256,), generator=gen)
        loss = distill.distillation_loss(student, teacher, alpha, sigma, x0, j, torch.randn(x0.shape, generator=gen,
                                                                                            dtype=torch.float64))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert loss.mean().item() < 1e-6
    z_t = torch.linspace(-3, 3, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    for k in range(K):
        j = torch.full((7,), 2 * k)
        mid = distill.ddim_step(z_t, teacher(z_t, j), alpha[j[0]], sigma[j[0]], alpha[j[0] + 1], sigma[j[0] + 1])
        two = distill.ddim_step(mid, teacher(mid, j + 1), alpha[j[0] + 1], sigma[j[0] + 1], alpha[j[0] + 2],
                                sigma[j[0] + 2])
        one = distill.ddim_step(z_t, student(z_t, j).detach(), alpha[j[0]], sigma[j[0]], alpha[j[0] + 2],
                                sigma[j[0] + 2])
        torch.testing.assert_close(one, two, rtol=0, atol=2e-3)


def test_the_loss_weight_is_the_truncated_snr():
    """max(SNR, 1) with SNR = alpha_bar / (1 - alpha_bar): 1 at zero terminal SNR and wherever SNR < 1, SNR where
    it is above."""
    d = zero_snr_v()
    ab = d.alphas_cumprod[:-1]
    alpha, sigma = torch.as_tensor(np.sqrt(d.alphas_cumprod)), torch.as_tensor(np.sqrt(1 - d.alphas_cumprod))
    w = distill.truncated_snr_weight(alpha, sigma).numpy()
    np.testing.assert_allclose(w[:-1], np.maximum(ab / (1 - ab), 1.0), rtol=1e-12)
    assert w[-1] == 1.0 and (w[:-1] > 1).any() and (w[:-1] == 1).any()


def test_the_tuners_chain_is_the_students_own_plan():
    """What adversarial tuning back-propagates through is what a student samples: ddim_chain over student_grid with
    the optimal denoiser of Gaussian data lands where run_plan of the student's own plan lands (which rounds its
    coefficients to float32)."""
    d = zero_snr_v()
    oracle = GaussianOracle(d, MU, S)
    for K in (1, 2, 4, 8):
        grid = distill.student_grid(d.alphas_cumprod, K)
        ab = np.append(d.alphas_cumprod[grid], 1.0)
        z = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(K))
        chain = distill.ddim_chain(lambda x, j: oracle.x0_hat(x, torch.as_tensor(grid[[j] * len(x)])), z,
                                   torch.as_tensor(np.sqrt(ab)), torch.as_tensor(np.sqrt(1 - ab)))
        plan = ddpm.make_plan(d, distill.student_options(K))
        assert plan.t.tolist() == grid.tolist()
        torch.testing.assert_close(chain, ddpm.run_plan(oracle, plan, z), rtol=1e-6, atol=1e-7)


def test_the_gan_losses_against_their_closed_forms():
    """The discriminator's loss is -log sigmoid(D(real)) - log(1 - sigmoid(D(fake))); R1 is ||grad_x D||^2 at each
    real image: ||w||^2 for a linear D, ||2 x||^2 for D(x) = ||x||^2."""
    d_real, d_fake = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64), torch.tensor([1.0, -0.5, 4.0],
                                                                                    dtype=torch.float64)
    expected = -torch.log(torch.sigmoid(d_real)) - torch.log(1 - torch.sigmoid(d_fake))
    torch.testing.assert_close(distill.discriminator_loss(d_real, d_fake), expected, rtol=1e-12, atol=0)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(distill.r1_penalty(x.flatten(1) @ w + 0.3, x), (w ** 2).sum().expand(5), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(distill.r1_penalty(x.pow(2).flatten(1).sum(1), x),
                               (2 * x.detach()).pow(2).flatten(1).sum(1), rtol=1e-12, atol=0)


def test_rounds_halve_down_to_the_last_student_on_nested_grids():
    assert distill.round_steps(32, 1) == [16, 8, 4, 2, 1]
    assert distill.round_steps(8, 4) == [4] and distill.round_steps(6, 3) == [3]
    for teacher, last in ((32, 3), (32, 32), (8, 16), (7, 1)):
        with pytest.raises(ValueError, match="halved"):
            distill.round_steps(teacher, last)
    for T in (1000, 100, 64):
        for K in (1, 2, 4, 8, 16):
            grid = distill.nested_grid(np.linspace(0.99, 0.0, T), K)
            assert grid[0] == T - 1 and len(grid) == 2 * K and (np.diff(grid) < 0).all()


# ---------------------------------------------------------------- a distillation run and its students
FAST = dict(preset="digits", steps=3, batch_size=8, T=64, checkpoint_every=3, sample_every=3, log_every=1,
            device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two small trained checkpoints (a few steps of the digits model, T = 64): unconditional and class-conditional."""
    folder = tmp_path_factory.mktemp("teachers")
    data = load_data("digits")
    for name, cond in (("plain", False), ("cond", True)):
        ddpm.train(ddpm.TrainConfig(**FAST, class_cond=cond, out=str(folder / name)), data)
    return {name: str(folder / name / "checkpoint.pt") for name in ("plain", "cond")}


def run_distill(teacher: str, out, stop_at: int | None = None, resume: bool = False, **changes) -> dict:
    cfg = distill.DistillConfig(**{**dict(steps=2, teacher_steps=8, train_steps=4, adversarial_steps=0, batch_size=8,
                                          warmup=1, checkpoint_every=2, log_every=1, device="cpu", precision="fp32",
                                          out=str(out)), **changes})

    def stop(report):  # dies in the last stage of the round of 2 calls, after its first checkpoint (step 2)
        last = "tune" if cfg.adversarial_steps else "distill"
        if stop_at is not None and (report["round"], report["stage"], report["step"]) == (2, last, stop_at):
            raise KeyboardInterrupt
    return distill.distill(teacher, cfg, load_data("digits"), resume=resume, callback=stop)


@pytest.mark.slow
def test_resume_is_exact_and_each_student_records_its_plan(teachers, tmp_path):
    full = run_distill(teachers["plain"], tmp_path / "full")
    assert [r["steps"] for r in full["rounds"]] == [4, 2]
    with pytest.raises(KeyboardInterrupt):
        run_distill(teachers["plain"], tmp_path / "cut", stop_at=3)
    resumed = run_distill(teachers["plain"], tmp_path / "cut", resume=True)
    assert resumed["rounds"][0]["resumed"] == "finished" and "loss" in resumed["rounds"][1]
    for K in (4, 2):
        a = torch.load(tmp_path / "full" / f"steps-{K}" / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / f"steps-{K}" / "checkpoint.pt", weights_only=True)
        assert a["step"] == b["step"] == 4
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), (K, key)
        assert a["plan"] == {"sampler": "ddim", "steps": K, "spacing": "trailing", "clip": False}
        assert a["distill"]["teacher_steps"] == 8 and a["config"]["T"] == 64
        model = ddpm.load_model(tmp_path / "full" / f"steps-{K}" / "checkpoint.pt")[0]
        assert model.plan_options == distill.student_options(K)
    # what it may not change on resume, and bad rounds, are one-line errors
    with pytest.raises(ddpm.UserError, match="lr"):
        run_distill(teachers["plain"], tmp_path / "cut", resume=True, lr=5e-4)
    assert_user_error(cli("distill", teachers["plain"], "--steps", 3, "--out", tmp_path / "x"), "halved")
    assert_user_error(cli("distill", tmp_path / "none.pt", "--out", tmp_path / "x"), "no such checkpoint")
    assert_user_error(cli("distill", teachers["plain"], "--teacher-steps", 128, "--steps", 64, "--out", tmp_path / "x"),
                      "T = 64")
    assert_user_error(cli("distill", teachers["plain"], "--teacher-steps", 8, "--steps", 4, "--train-steps", 1,
                          "--out", tmp_path / "full"), "exists")


@pytest.mark.slow
def test_adversarial_tuning_resumes_exactly_and_tunes_only_the_students_of_few_calls(teachers, tmp_path):
    tune = dict(adversarial_steps=4, adversarial_calls=2)
    full = run_distill(teachers["plain"], tmp_path / "full", **tune)
    assert [(r["steps"], r["stage"]) for r in full["rounds"]] == [(4, "distill"), (2, "distill"), (2, "tune")]
    with pytest.raises(KeyboardInterrupt):
        run_distill(teachers["plain"], tmp_path / "cut", stop_at=3, **tune)
    resumed = run_distill(teachers["plain"], tmp_path / "cut", resume=True, **tune)
    assert [r.get("resumed") for r in resumed["rounds"]] == ["finished", "finished", None]
    for K, stage in ((4, ""), (2, "distilled/"), (2, "")):
        a = torch.load(tmp_path / "full" / f"steps-{K}" / stage / "checkpoint.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / f"steps-{K}" / stage / "checkpoint.pt", weights_only=True)
        assert a["step"] == b["step"] == 4 and a["plan"]["steps"] == K
        for key in ("model", "ema") + (("discriminator",) if "discriminator" in a else ()):
            assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), (K, stage, key)
    assert "discriminator" in a and not (tmp_path / "full" / "steps-4" / "distilled").exists()
    distilled = torch.load(tmp_path / "full" / "steps-2" / "distilled" / "checkpoint.pt", weights_only=True)
    assert not all(torch.equal(a["model"][n], distilled["ema"][n]) for n in a["model"])  # tuning moved it
    assert ddpm.load_model(tmp_path / "full" / "steps-2" / "checkpoint.pt")[0].plan_options == distill.student_options(2)
    # a class-conditional model's students are distilled, not tuned (the discriminator sees no labels)
    cond = run_distill(teachers["cond"], tmp_path / "cond", **tune)
    assert [r["stage"] for r in cond["rounds"]] == ["distill", "distill"]
    assert_user_error(cli("distill", teachers["cond"], "--teacher-steps", 8, "--steps", 4, "--adversarial-steps", 2,
                          "--out", tmp_path / "x"), "unconditional")


def sample_everywhere(runner, checkpoint, tmp_path, *args) -> dict:
    """The same images of a checkpoint with no --sampler, from `ddpm sample` (torch), `onnx-sample` and the C++ runner:
    the outputs of each, and the exported file's metadata."""
    onnx_file = tmp_path / "student.onnx"
    assert cli("export", checkpoint, "--out", onnx_file).returncode == 0
    common = ["--num-samples", 6, "--seed", 3, *args]
    torch_run = cli("sample", checkpoint, *common, "--numpy-noise", "--precision", "fp32", "--out", tmp_path / "t.npz")
    ort_run = cli("onnx-sample", onnx_file, *common, "--out", tmp_path / "o.npz")
    run_runner(runner, "--model", onnx_file, *common, "--out", tmp_path / "c.npz")
    assert torch_run.returncode == 0 and ort_run.returncode == 0, torch_run.stderr + ort_run.stderr
    compared = cli("compare", tmp_path / "t.npz", tmp_path / "o.npz", tmp_path / "c.npz")
    assert compared.returncode == 0 and "the same images" in compared.stdout, compared
    return {"torch": torch_run.stdout, "onnx": ort_run.stdout,
            "meta": {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}}


@pytest.mark.slow
def test_a_student_samples_its_own_plan_in_torch_onnxruntime_and_cpp(teachers, runner, tmp_path):
    run_distill(teachers["plain"], tmp_path / "d", steps=4, adversarial_steps=2)  # a tuned student, as by default
    student = tmp_path / "d" / "steps-4" / "checkpoint.pt"
    got = sample_everywhere(runner, student, tmp_path)
    assert "(ddim, 4 network calls" in got["torch"] and ": 4 network calls" in got["onnx"]
    meta = got["meta"]
    assert (meta["ddpm.sampler"], meta["ddpm.steps"], meta["ddpm.spacing"], meta["ddpm.clip_denoised"]) == (
        "ddim", "4", "trailing", "false")
    from ddpm_reference.export.onnx_sampler import OnnxSampler
    assert OnnxSampler(tmp_path / "student.onnx", provider="cpu").default_options == distill.student_options(4)
    # a sampler named is that sampler with its own defaults, the model's clip kept
    named = cli("sample", student, "--sampler", "ancestral", "--num-samples", 2, "--out", tmp_path / "a.png")
    assert "(ancestral, 64 network calls" in named.stdout, named


@pytest.mark.slow
def test_a_class_conditional_teacher_gives_a_guided_class_conditional_student(teachers, runner, tmp_path):
    run_distill(teachers["cond"], tmp_path / "d", steps=4)
    student = tmp_path / "d" / "steps-4" / "checkpoint.pt"
    assert ddpm.load_model(student)[0].class_names == [str(i) for i in range(10)]
    got = sample_everywhere(runner, student, tmp_path, "--classes", "3,7", "--guidance", 2)
    assert got["meta"]["ddpm.num_classes"] == "10" and "4 network calls" in got["torch"]
    assert np.array_equal(np.load(tmp_path / "t.npz")["arr_1"], [3, 3, 3, 7, 7, 7])


def test_distill_config_is_the_commands_options():
    """`ddpm distill` has an option for each DistillConfig field, with its default."""
    from ddpm_reference.cli import DISTILL
    for f in dataclasses.fields(distill.DistillConfig):
        assert DISTILL[f.name].default == f.default, f.name

"""The command line, `ddpm ...`: train, sample, score, export and benchmark, on top of ddpm.py.

One name per concept across the commands and the C++ runner (docs/commands.md's table): --num-samples (images
drawn), --num-images (held-out images read), --batch-size (images per network call or optimizer step), --steps
(the sampler's network calls), --train-steps (optimizer steps). Every option is checked at this boundary
(choices, ranges, finite numbers), and an option given where it cannot apply is an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import typing

import numpy as np
import torch
import typer
from typer._click.core import ParameterSource

from . import unet
from .bench import BACKENDS, PRECISIONS as BENCH_PRECISIONS, bench_sample, bench_train
from .classifier import load_classifier, train_classifier
from .data import calibration_images, load_data, load_npz
from .distill import DistillConfig, distill
from .images import image_grid, png, side_by_side, write_atomically
from .ddpm import (Device, Diffusion, LossType, LRDecay, Parameterization, Preset, Sampler, Schedule, Spacing, TrainConfig,
                   UserError, Variance, Weighting, __version__,
                   balanced_labels, bits_per_dim, classifier_free_guidance, load_checkpoint, load_model, make_plan,
                   numpy_noise, option_flag, resolve_device, resumed_config, save_images, to_model_range, torch_noise,
                   train)
from .export import onnx_sampler
from .fd import FD_TABLE_STEPS, FEATURES, NFE_COLUMNS, DigitsFd, fd_table_markdown
from .plan import DEFAULT_GUIDANCE, PlanOptions, model_options, slerp
from .precision import Int8Error, Precision, SamplePrecision
from .sampling import Encoder, SampledFd, TorchRun, as_user_error, at_precision
from .web import Server, WebError, run_headless

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Denoising Diffusion Probabilistic Models: train, sample, score, export.")
Opt = typer.Option
Provider = typing.Literal[("auto", *onnx_sampler.PROVIDERS)]  # onnxruntime providers by name


def _finite(value):
    """A float option's check: click's ranges let nan and inf through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def Number(default, help: str, *decls, min=None, max=None):  # noqa: N802 (an option, like typer.Option)
    """A float option: finite, within [min, max] where given."""
    return Opt(default, *decls, help=help, min=min, max=max, callback=_finite)


SEED = Opt(0, min=0, max=2 ** 32 - 1, help="seed of the noise (numpy RandomState's range)")
JSON = Opt(False, "--json", help="print JSON")
DEVICE = Opt("auto", help="torch device (auto: CUDA if available, else CPU)")
EITHER_DEVICE = Opt("auto", "--device", help="a checkpoint's torch device, or an .onnx file's onnxruntime provider "
                                             "(auto: CUDA if available, else CPU)")
PROVIDER = Opt("auto", help="onnxruntime provider (auto: CUDA if it loads, else CPU)")
THREADS = Opt(None, min=1, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
BATCH = Opt(256, "--batch-size", min=1, help="images per network call")
EMA = Opt(True, help="the EMA weights (--no-ema: the raw weights)")
COMPILE = Opt(False, help="torch.compile the network (inductor, frozen weights): a minute or so to compile, then faster")
OUT_IMAGES = "a .png grid, or a .npz (arr_0: uint8 NHWC, the layout of OpenAI's evaluation scripts; arr_1: labels)"


def _console():
    """Progress bars go to stderr: stdout carries results (tables, JSON) that users redirect."""
    from rich.console import Console
    return Console(stderr=True)


@contextlib.contextmanager
def _progress(description: str, total: int):
    """A transient progress bar on stderr; yields a callback that advances it by one (any arguments)."""
    from rich.progress import Progress
    with Progress(transient=True, console=_console()) as bar:
        task = bar.add_task(description, total=total)
        yield lambda *_: bar.advance(task)


@contextlib.contextmanager
def _train_progress(name: str = "train"):
    """The training bar (it stays: it is the run's log), shown from the first report on; yields the callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=_console())
    task = None

    def report(r):
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(f"{name} {r['precision'].split()[0]}" if "precision" in r else name,
                                total=r["steps"], completed=r["step"], info="")
        info = "" if r["loss"] is None else f"loss {r['loss']:.4f}  {r['images_per_s']:.0f} img/s"
        bar.update(task, completed=r["step"], info=info)
    try:
        yield report
    finally:
        bar.stop()


def _given(ctx: typer.Context) -> set[str]:
    """The parameters given on the command line (not defaults)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def _refuse(ctx: typer.Context, names, why: str) -> None:
    """An option that cannot apply is an error, not silently ignored."""
    given = sorted(_given(ctx) & set(names))
    if given:
        raise UserError(f"--{given[0].replace('_', '-').rstrip('-')} {why}")


def _check_out(path: str, suffixes=(".png", ".npz")) -> str:
    """The checks of --out that can be made before any work (as the C++ runner's): its format, and a folder to
    write it into."""
    if not path.lower().endswith(suffixes):
        raise UserError(f"--out {path}: must end in {' or '.join(suffixes)}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"--out {path}: cannot write: {folder} is not a writable folder")
    return path


def _samples_to_file(x: np.ndarray, out: str, columns: int | None = None, labels=None) -> None:
    try:
        save_images(x, out, columns, labels)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None


def _calls(n: int, what: str = "network ") -> str:
    return f"{n} {what}call{'' if n == 1 else 's'}"


def _int_list(text: str, flag: str, lo: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < lo:
        raise UserError(f"{flag} {text}: expected comma-separated whole numbers >= {lo}")
    return values


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text}: expected comma-separated finite numbers")
    return values


# ----------------------------------------------------------------------------- options shared by commands

def _config_option(f: dataclasses.Field, kind, help: str | None = None):
    """The typer option of a TrainConfig field: its flag, default, help and range (finite, for a float) as the field
    declares them, so that the dataclass is the one place where an option and its default are written."""
    flag = option_flag(f)
    decl = f"{flag}/--no-{flag[2:]}" if kind in (bool, bool | None) else flag
    number = {"min": f.metadata.get("min"), "max": f.metadata.get("max")} if kind in (int, float, int | None,
                                                                                      float | None) else {}
    check = {"callback": _finite} if kind in (float, float | None) else {}
    return Opt(f.default, decl, *f.metadata.get("aliases", ()), help=help or f.metadata["help"], **number, **check)


_KINDS = typing.get_type_hints(TrainConfig)
TRAIN = {f.name: _config_option(f, _KINDS[f.name]) for f in dataclasses.fields(TrainConfig)}  # by field name


def _train_config(ctx: typer.Context) -> TrainConfig:
    """The TrainConfig of a training command's options (its parameters named as the fields)."""
    return TrainConfig(**{k: v for k, v in ctx.params.items() if k in TrainConfig.__dataclass_fields__})


# The options of a sampling plan (plan.PlanOptions) and of a class-conditional model, the same in `sample`,
# `onnx-sample`, `fd` and the C++ runner; each of those commands lists them in its signature.
SAMPLER = Opt(None, help="the sampler (default: the model's own, with its steps and spacing: ancestral, or a "
                         "distilled student's DDIM)")
STEPS = Opt(None, min=1, help="network calls of the sampler (default: T for ancestral, 50 for the others; a student's "
                              "own)")
ETA = Number(0.0, "DDIM's eta (ddim only)", min=0.0, max=1.0)
SPACING = Opt(None, help="which timesteps are kept when --steps < T (default: trailing for a zero-terminal-SNR "
                         "schedule, else uniform)")
CLIP = Opt(None, "--clip/--no-clip", help="clip the predicted x0 to [-1, 1] (default: the model's: on, off for a "
                                          "distilled student)")
CORRECTOR_STEPS = Opt(0, min=0, max=1000, help="Langevin corrector steps per timestep (predictor-corrector; ancestral, "
                                               "ddim)")
SNR = Number(0.16, "the corrector's signal-to-noise ratio r (with --corrector-steps)", min=1e-6, max=10.0)
CLASSES = Opt(None, "--classes", "--class", help="a class or comma-separated classes (indices or names); default: "
                                                 "every class, a row each")
GUIDANCE = Number(None, "classifier-free guidance s: out_u + s (out_c - out_u); 1 conditional, 0 unconditional; "
                        f"default {DEFAULT_GUIDANCE:g}")
SAMPLING_OPTIONS = ("sampler", "steps", "eta", "spacing", "clip", "corrector_steps", "snr", "classes", "guidance")


def _plan_options(ctx: typer.Context, sampler, steps, eta, spacing, clip, corrector_steps, snr):
    """What makes the PlanOptions of a command's sampling options from the model's own plan (plan.model_options:
    the model's where the options give none), checked before any work as far as the model does not matter: a user
    error for options that do not fit together, and for --snr without a corrector, which cannot apply."""
    if corrector_steps == 0:
        _refuse(ctx, ["snr"], "needs --corrector-steps K > 0 (it sets the corrector's step size)")
    fields = dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing, clip=clip, corrector_steps=corrector_steps,
                  snr=snr)

    def options(default: PlanOptions) -> PlanOptions:
        with as_user_error():
            return model_options(default, **fields)
    if sampler is not None:
        options(PlanOptions())
    return options


def _labels(class_names: list, classes: str | None, guidance: float, n: int) -> np.ndarray | None:
    """The n labels a command samples (a balanced sweep over the requested classes), or None for an
    unconditional model; UserError for labels or guidance it cannot take."""
    if not class_names:
        if classes is not None or guidance is not None:
            raise UserError("--class/--guidance need a class-conditional model (train one with --class-cond)")
        return None
    return balanced_labels(_class_indices(class_names, classes), n)


def _class_indices(class_names: list, classes: str | None) -> list[int]:
    """The indices of --classes (names or indices; None: every class), or UserError."""
    if classes is None:
        return list(range(len(class_names)))
    wanted = []
    for c in classes.split(","):
        c = c.strip()
        index = class_names.index(c) if c in class_names else int(c) if c.lstrip("-").isdigit() else None
        if index is None or not 0 <= index < len(class_names):
            raise UserError(f"--class {c}: not a class of this model ({', '.join(class_names)}; or 0..{len(class_names) - 1})")
        wanted.append(index)
    return wanted


def _row_per_class(labels) -> int | None:
    """Grid columns that put each class of balanced_labels on a row of its own (None: no labels)."""
    return None if labels is None else -(-len(labels) // len(set(labels.tolist())))


def _torch_plan(diffusion: Diffusion, options: PlanOptions):
    with as_user_error():
        return make_plan(diffusion, options)


# ------------------------------------------------------------------------------------------- commands

def _version(value: bool):
    if value:
        typer.echo(f"ddpm-reference {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = Opt(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """Denoising Diffusion Probabilistic Models: train, sample, score, export."""


@app.command("train")
def train_cmd(ctx: typer.Context, resume: bool = Opt(False, help="continue OUT/checkpoint.pt (changing only how long "
                                                                "and how it trains)"),
              overwrite: bool = Opt(False, help="start afresh, replacing OUT/checkpoint.pt at the first checkpoint"),
              # TrainConfig's fields, with their defaults, help and ranges (ddpm.TrainConfig):
              data: str = TRAIN["data"], preset: Preset = TRAIN["preset"], image_size: int | None = TRAIN["image_size"],
              dropout: float | None = TRAIN["dropout"], steps: int = TRAIN["steps"],
              batch_size: int = TRAIN["batch_size"], lr: float = TRAIN["lr"], warmup: int = TRAIN["warmup"],
              lr_decay: LRDecay = TRAIN["lr_decay"], weight_decay: float = TRAIN["weight_decay"],
              grad_clip: float = TRAIN["grad_clip"], accum: int = TRAIN["accum"], ema_decay: float = TRAIN["ema_decay"],
              ema_warmup: bool = TRAIN["ema_warmup"], schedule: Schedule = TRAIN["schedule"], T: int = TRAIN["T"],
              zero_terminal_snr: bool = TRAIN["zero_terminal_snr"],
              parameterization: Parameterization = TRAIN["parameterization"], variance: Variance = TRAIN["variance"],
              loss: LossType = TRAIN["loss"], weighting: Weighting = TRAIN["weighting"],
              snr_gamma: float = TRAIN["snr_gamma"], dequantize: bool = TRAIN["dequantize"],
              class_cond: bool = TRAIN["class_cond"], p_uncond: float = TRAIN["p_uncond"],
              importance: bool = TRAIN["importance"], flip: bool = TRAIN["flip"], seed: int = TRAIN["seed"],
              device: Device = TRAIN["device"], precision: Precision = TRAIN["precision"],
              compile: bool = TRAIN["compile"], channels_last: bool = TRAIN["channels_last"],
              checkpoint_every: int = TRAIN["checkpoint_every"], sample_every: int = TRAIN["sample_every"],
              log_every: int = TRAIN["log_every"], out: str = TRAIN["out"]):
    """Train eps_theta (Algorithm 1). Under torchrun it trains with DDP on every process."""
    if resume and overwrite:
        raise UserError("--resume continues OUT/checkpoint.pt and --overwrite replaces it: give one")
    cfg, changes = _train_config(ctx), []
    if resume:
        given = {name: ctx.params[name] for name in _given(ctx) & set(TrainConfig.__dataclass_fields__)}
        cfg, changes = resumed_config(load_checkpoint(f"{cfg.out}/checkpoint.pt")["config"], given)
    with as_user_error():
        cfg.validate()
    with _train_progress() as callback:
        result = train(cfg, load_data(cfg.data, cfg.image_size), resume, callback, overwrite)
    said = f"; resumed with {', '.join(changes)}" if changes else ""
    typer.echo(f"trained to step {result['steps']} in {result['precision']} ({result['images_per_s']:.0f} images/s); "
               f"final loss {result['losses'][-1][1]:.4f}; checkpoint {result['checkpoint']}{said}")


DISTILL = {f.name: _config_option(f, typing.get_type_hints(DistillConfig)[f.name])
           for f in dataclasses.fields(DistillConfig)}


@app.command("distill")
def distill_cmd(ctx: typer.Context, checkpoint: str = typer.Argument(..., help="a checkpoint of `ddpm train`, the teacher"),
                resume: bool = Opt(False, help="keep the finished students of OUT and continue the unfinished one"),
                overwrite: bool = Opt(False, help="start afresh, replacing the students of OUT"),
                # DistillConfig's fields, with their defaults, help and ranges (distill.DistillConfig):
                steps: int = DISTILL["steps"], teacher_steps: int = DISTILL["teacher_steps"],
                train_steps: int = DISTILL["train_steps"], lr: float = DISTILL["lr"], warmup: int = DISTILL["warmup"],
                batch_size: int = DISTILL["batch_size"], adversarial_steps: int = DISTILL["adversarial_steps"],
                adversarial_calls: int = DISTILL["adversarial_calls"], adversarial_lr: float = DISTILL["adversarial_lr"],
                seed: int = DISTILL["seed"], device: Device = DISTILL["device"],
                precision: Precision = DISTILL["precision"], checkpoint_every: int = DISTILL["checkpoint_every"],
                log_every: int = DISTILL["log_every"], out: str = DISTILL["out"]):
    """Progressive distillation (Salimans & Ho 2022): students of the model that sample in --teacher-steps / 2,
    ..., --steps network calls (DDIM), each a checkpoint OUT/steps-K/checkpoint.pt that samples its own plan; with
    --adversarial-steps, those of at most --adversarial-calls calls are then tuned against a discriminator."""
    if resume and overwrite:
        raise UserError("--resume continues OUT and --overwrite replaces it: give one")
    cfg = DistillConfig(**{k: v for k, v in ctx.params.items() if k in DistillConfig.__dataclass_fields__})
    teacher, _, teacher_cfg, _ = load_model(checkpoint)
    if teacher.class_names:
        _refuse(ctx, ("adversarial_steps", "adversarial_calls", "adversarial_lr"), "tunes the students of an "
                "unconditional model (its discriminator sees no labels); those of this class-conditional one are distilled")
    with _train_progress("distill") as bar:
        result = distill(checkpoint, cfg, load_data(teacher_cfg.data, teacher_cfg.image_size), resume, overwrite,
                         lambda r: bar({**r, "step": r["done"] + r["step"], "steps": r["total"]}))
    students = list({r["steps"]: r for r in result["rounds"]}.values())  # each student's last stage
    typer.echo(f"distilled {checkpoint} to {len(students)} students in {result['seconds']:.0f} s: " + ", ".join(
        f"{_calls(r['steps'], '')} {r['checkpoint']} (" + ("tuned, " if r["stage"] == "tune" else "")
        + (f"loss {r['loss']:.4f})" if "loss" in r else "kept)") for r in students))


# The TrainConfig fields that train-classifier reads (tests/test_cli.py holds its options to them); the others keep
# their defaults.
CLASSIFIER_OPTIONS = ("data", "preset", "image_size", "steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip",
                      "schedule", "T", "zero_terminal_snr", "seed", "device", "log_every", "out")


@app.command("train-classifier")
def train_classifier_cmd(ctx: typer.Context, data: str = TRAIN["data"], preset: Preset = TRAIN["preset"],
                         image_size: int | None = TRAIN["image_size"], steps: int = TRAIN["steps"],
                         batch_size: int = TRAIN["batch_size"], lr: float = TRAIN["lr"], warmup: int = TRAIN["warmup"],
                         weight_decay: float = TRAIN["weight_decay"], grad_clip: float = TRAIN["grad_clip"],
                         schedule: Schedule = TRAIN["schedule"], T: int = TRAIN["T"],
                         zero_terminal_snr: bool = TRAIN["zero_terminal_snr"], seed: int = TRAIN["seed"],
                         device: Device = TRAIN["device"],
                         log_every: int = _config_option(TrainConfig.__dataclass_fields__["log_every"], int,
                                                         "report the loss every this many steps"),
                         out: str = _config_option(TrainConfig.__dataclass_fields__["out"], str,
                                                   "folder of the classifier file, OUT/classifier.pt")):
    """Train a noisy classifier p_phi(y | x_t, t) on the data's labels, for `ddpm sample --classifier` (classifier
    guidance). Its schedule (--schedule, --diffusion-steps) must be the model's."""
    cfg = _train_config(ctx)
    with as_user_error():
        cfg.validate()
    with _train_progress() as callback:
        result = train_classifier(cfg, load_data(cfg.data, cfg.image_size), callback)
    typer.echo(f"trained the classifier to step {result['steps']}; final loss {result['losses'][-1][1]:.4f}; "
               f"wrote {result['checkpoint']}")


@app.command("sample")
def sample_cmd(ctx: typer.Context, checkpoint: str = typer.Argument(..., help="a checkpoint of `ddpm train`"),
               num_samples: int = Opt(64, min=1, help="images to draw"), seed: int = SEED,
               classifier: str = Opt(None, help="classifier guidance with this `ddpm train-classifier` file (torch only)"),
               classifier_scale: float = Number(1.0, "classifier guidance's g (with --classifier)"),
               numpy_noise_: bool = Opt(False, "--numpy-noise", help="numpy RandomState noise: the stream of "
                                        "`onnx-sample` and the C++ runner (same seed, same images)"),
               ema: bool = EMA, batch_size: int = BATCH, device: Device = DEVICE,
               precision: SamplePrecision = Opt("auto", help="network precision (auto: bf16 where the device runs it "
                                                "fast; int8: the CPU, compiled, needs torchao)"),
               compile: bool = COMPILE, out: str = Opt("samples.png", help=OUT_IMAGES),
               sampler: Sampler | None = SAMPLER, steps: int | None = STEPS, eta: float = ETA,
               spacing: Spacing | None = SPACING, clip: bool | None = CLIP, corrector_steps: int = CORRECTOR_STEPS,
               snr: float = SNR, classes: str | None = CLASSES, guidance: float | None = GUIDANCE):
    """Sample images from a checkpoint: Algorithm 2, DDIM, DPM-Solver++(2M) (+SDE) and (3M), UniPC, with a corrector
    or not; a class-conditional model samples the requested classes, with classifier-free guidance."""
    _check_out(out)
    if checkpoint.endswith(".onnx"):
        raise UserError(f"{checkpoint} is an ONNX file: sample it with `ddpm onnx-sample` (classifier guidance, "
                        "which needs gradients, runs on checkpoints only)")
    if classifier is None:
        _refuse(ctx, ["classifier_scale"], "needs --classifier")
    plan_options = _plan_options(ctx, sampler, steps, eta, spacing, clip, corrector_steps, snr)
    dev = resolve_device(device)
    model, diffusion, cfg, shape = load_model(checkpoint, ema, dev)
    plan_options = plan_options(model.plan_options)
    model, precision_note = at_precision(model, precision, dev, compile, cfg, diffusion)
    clf = load_classifier(classifier, dev) if classifier else None
    labels = _labels(model.class_names or (clf[2] if clf else []), classes, guidance, num_samples)
    if clf and classes is None:
        raise UserError("--classifier guides to the classes of --class/--classes: give them")
    if clf and (clf[1].schedule, clf[1].T, clf[1].zero_terminal_snr) != (cfg.schedule, cfg.T, cfg.zero_terminal_snr):
        raise UserError(f"{classifier} was trained on the {clf[1].schedule} schedule with T = {clf[1].T}, the model "
                        f"on {cfg.schedule} with T = {cfg.T}: the noise levels must match")
    if clf and not model.class_names and guidance not in (None, 0.0, 1.0):
        raise UserError("--guidance (classifier-free) needs a class-conditional model; --classifier-scale sets g")
    plan = _torch_plan(diffusion, plan_options)
    noise = numpy_noise(seed, dev) if numpy_noise_ else torch_noise(torch.Generator(dev).manual_seed(seed), dev)
    run = TorchRun(model, diffusion, plan, shape, noise, dev, labels, guidance, clf, classifier_scale)
    with _progress("sampling", len(plan) * -(-num_samples // batch_size)) as tick:
        xs = [run.images(i, min(num_samples, i + batch_size), tick) for i in range(0, num_samples, batch_size)]
    _samples_to_file(torch.cat(xs).numpy(), out, _row_per_class(labels), labels)
    typer.echo(f"wrote {num_samples} samples ({plan_options.sampler}, {_calls(len(plan))}, {precision_note}) to {out}")


@app.command("nll")
def nll_cmd(checkpoint: str = typer.Argument(..., help="a checkpoint of `ddpm train`"),
            data: str = Opt(None, help="the data set (default: the checkpoint's)"),
            num_images: int = Opt(360, min=1, help="held-out images to score"),
            batch_size: int = Opt(512, "--batch-size", min=1, help="images per network call"),
            seed: int = SEED, ema: bool = EMA, device: Device = DEVICE,
            precision: Precision = Opt("fp32", help="network precision (fp32: the published figures; bf16 moves them)"),
            json_: bool = JSON):
    """Bits/dim of held-out data: the full variational bound (Eq. 5) and its terms."""
    dev = resolve_device(device)
    model, diffusion, cfg, shape = load_model(checkpoint, ema, dev)
    net, precision_note = at_precision(model, precision, dev)
    dataset = load_data(data or cfg.data, cfg.image_size)
    held_out = dataset.held_out
    if tuple(held_out.shape[1:]) != shape:
        raise UserError(f"data images are {held_out.shape[1:]}, the model's are {shape}")
    x0 = to_model_range(torch.from_numpy(held_out[:num_images]))
    labels = dataset.held_out_labels[:num_images] if model.class_names and dataset.held_out_labels is not None else None

    def guided(i):  # a conditional model is scored on the true labels
        if labels is None:
            return net
        return classifier_free_guidance(net, torch.as_tensor(labels[i:i + batch_size], device=dev), 1.0,
                                        len(model.class_names))
    gen = torch.Generator(dev).manual_seed(seed)
    with _progress("bits/dim", diffusion.T * -(-len(x0) // batch_size)) as tick:
        parts = [bits_per_dim(diffusion, guided(i), x0[i:i + batch_size].to(dev), gen, tick)
                 for i in range(0, len(x0), batch_size)]
    res = {k: torch.cat([p[k] for p in parts]).mean().item() for k in ("total", "prior", "vb", "decoder")}
    res["num_images"], res["precision"] = len(x0), precision_note
    typer.echo(json.dumps(res) if json_ else
               f"bits/dim {res['total']:.4f} on {len(x0)} held-out images  (prior L_T {res['prior']:.2e}, "
               f"sum L_t-1 {res['vb']:.4f}, decoder L_0 {res['decoder']:.4f}; network in {precision_note})")


@app.command("export")
def export_cmd(ctx: typer.Context, checkpoint: str = typer.Argument(..., help="a checkpoint of `ddpm train`"),
               out: str = Opt("model.onnx", help="the .onnx file to write"),
               opset: int = Opt(17, min=17, max=23, help="ONNX opset"), ema: bool = EMA,
               precision: typing.Literal[onnx_sampler.PRECISIONS] = Opt(
                   "fp32", help="how the file's network computes (int8: static QDQ quantization, calibrated on the "
                                "checkpoint's training images); its inputs and output are float32 in all three"),
               calibration: int = Opt(512, min=1, help="with int8: training images to calibrate and check on"),
               clip: bool | None = Opt(None, "--clip/--no-clip", help="the file's default for clipping the predicted x0 "
                                                                     "(default: the model's: on, off for a student)")):
    """Export eps_theta and its schedule to one self-describing ONNX file, checked against PyTorch."""
    from .export.onnx_export import ExportError, export_onnx
    if precision != "int8":
        _refuse(ctx, ["calibration"], "applies to --precision int8 only")
    model, diffusion, cfg, shape = load_model(checkpoint, ema)
    images = calibration_images(cfg, calibration) if precision == "int8" else None
    try:
        report = export_onnx(model, diffusion, shape, out, opset=opset, precision=precision, calibration_images=images,
                             clip_denoised=model.plan_options.clip is not False if clip is None else clip,
                             classes=model.class_names, plan=dataclasses.asdict(model.plan_options))
    except ExportError as e:
        raise UserError(str(e)) from None
    rms = [c["relative_rms"] for c in report["checks"] if "relative_rms" in c]
    error = (f"relative RMS |onnxruntime - torch| = {max(rms):.3f} on {sum(c['batch'] for c in report['checks'])} "
             f"noisy training images not used to calibrate" if rms else
             f"max |onnxruntime - torch| = {report['max_abs_diff']:.2e} over {len(report['checks'])} checks")
    typer.echo(f"wrote {out} ({precision}, {report['size_bytes'] / 1e6:.1f} MB, opset {opset}, {report['exporter']} "
               f"exporter); {error} (tolerance {report['tolerance']:g})")


@app.command("onnx-sample")
def onnx_sample_cmd(ctx: typer.Context, model: str = typer.Argument(..., help="an .onnx file of `ddpm export`"),
                    num_samples: int = Opt(64, min=1, help="images to draw"), seed: int = SEED,
                    batch_size: int = BATCH, provider: Provider = PROVIDER, threads: int = THREADS,
                    engine: typing.Literal[onnx_sampler.ENGINES] = Opt(
                        "onnxruntime", help="what runs the network: onnxruntime, or openvino (CPU; pip install "
                                            "'ddpm-reference[openvino]')"),
                    precision: typing.Literal["auto", "fp32", "bf16", "fp16", "int8"] = Opt(
                        "auto", help="how the network computes: onnxruntime, the file's own (auto); openvino, fp32 or "
                                     "bf16 (auto: bf16 where the CPU has AVX512-BF16 or AMX)"),
                    out: str = Opt("samples.png", help=OUT_IMAGES),
                    sampler: Sampler | None = SAMPLER, steps: int | None = STEPS, eta: float = ETA,
                    spacing: Spacing | None = SPACING, clip: bool | None = CLIP, corrector_steps: int = CORRECTOR_STEPS,
                    snr: float = SNR, classes: str | None = CLASSES, guidance: float | None = GUIDANCE):
    """Sample from an exported .onnx file with onnxruntime or OpenVINO (no torch in the loop)."""
    _check_out(out)
    with as_user_error():
        ort_sampler = onnx_sampler.OnnxSampler(model, provider, threads, engine=engine, precision=precision)
    labels = _labels(ort_sampler.class_names, classes, guidance, num_samples)
    plan_options = _plan_options(ctx, sampler, steps, eta, spacing, clip, corrector_steps, snr)(
        ort_sampler.default_options)
    with as_user_error():
        plan = ort_sampler.plan(plan_options)
    with _progress("sampling", len(plan) * -(-num_samples // batch_size)) as tick:
        x, timing = ort_sampler.run(plan, num_samples, seed, batch_size, progress=tick, return_timing=True,
                                    labels=labels, guidance=guidance)
    _samples_to_file(x, out, _row_per_class(labels), labels)
    typer.echo(f"wrote {num_samples} samples to {out}: {_calls(timing['steps'])} on {timing['provider']} in "
               f"{timing['precision']} ({timing['precision_why']}), {num_samples / timing['total_s']:.1f} images/s, "
               f"loop/network time "
               f"{timing['total_s'] / timing['network_s']:.3f}")


@app.command("web")
def web_cmd(ctx: typer.Context, model: str = typer.Argument(..., help="an .onnx file of `ddpm export`"),
            port: int = Opt(8000, min=0, max=65535, help="the port on 127.0.0.1 (0: any free one)"),
            headless: bool = Opt(False, help="run the page once in a headless Chromium and write what it sampled to "
                                             "--out"),
            num_samples: int = Opt(64, min=1, help="images to draw"), seed: int = SEED, batch_size: int = BATCH,
            threads: int | None = Opt(None, min=1, help="onnxruntime-web's wasm threads (default: all cores)"),
            provider: typing.Literal["wasm", "webgpu"] = Opt(
                "wasm", help="onnxruntime-web's execution provider: wasm (the CPU), or webgpu (headless: the GPU, "
                             "else Chromium's software renderer)"),
            out: str = Opt("web.png", help=OUT_IMAGES + " (--headless)"),
            timeout: float = Number(600.0, "seconds the headless page may take (--headless)", min=1.0),
            sampler: Sampler | None = SAMPLER, steps: int | None = STEPS, eta: float = ETA,
            spacing: Spacing | None = SPACING, clip: bool | None = CLIP, corrector_steps: int = CORRECTOR_STEPS,
            snr: float = SNR, classes: str | None = CLASSES, guidance: float | None = GUIDANCE):
    """Sample an exported .onnx file in the browser: serve the page (onnxruntime-web) and the model on 127.0.0.1, or,
    with --headless, run it once in Chromium and write its samples, the same images as `onnx-sample`."""
    if not headless:
        _refuse(ctx, ["out", "timeout"], "needs --headless (the page shows its samples)")
    if headless:
        _check_out(out)
    with as_user_error():  # the file, the options and the classes checked here, as `onnx-sample` checks them
        checked = onnx_sampler.OnnxSampler(model, "cpu")
    labels = _labels(checked.class_names, classes, guidance, num_samples)
    with as_user_error():
        plan = checked.plan(_plan_options(ctx, sampler, steps, eta, spacing, clip, corrector_steps, snr)(
            checked.default_options))
    page = dict(sampler=sampler, steps=steps, eta=eta or None, spacing=spacing, corrector_steps=corrector_steps or None,
                snr=snr if corrector_steps else None, clip=None if clip is None else str(clip).lower(), seed=seed,
                num_samples=num_samples, batch_size=batch_size, threads=threads, provider=provider, guidance=guidance,
                classes=None if labels is None else ",".join(map(str, _class_indices(checked.class_names, classes))))
    try:
        if not headless:
            with Server(model, port) as server:
                typer.echo(f"serving {model} on {server.url(**page)} (Ctrl-C stops)")
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
            return
        with _progress("sampling in Chromium", len(plan) * -(-num_samples // batch_size)) as tick:
            result = run_headless(model, timeout, progress=tick, **page)
    except WebError as e:
        raise UserError(str(e)) from None
    if not result["ok"]:
        raise UserError(f"the page: {result['error']}")
    _samples_to_file(result["samples"], out, _row_per_class(labels), labels)
    seconds = result["seconds"]
    typer.echo(f"wrote {num_samples} samples to {out}: {_calls(result['calls'])} in Chromium (onnxruntime-web "
               f"{result['provider']}, {result['threads']} thread{'' if result['threads'] == 1 else 's'}"
               f"{', cross-origin isolated' if result['isolated'] else ''}), {result['calls'] / seconds:.1f} calls/s, "
               f"{num_samples / seconds:.1f} images/s")


MODEL_ARG = typer.Argument(..., help="a checkpoint or an exported .onnx file")


@app.command("reconstruct")
def reconstruct_cmd(model: str = MODEL_ARG,
                    step_counts: str = Opt("10,20,50,100", help="comma-separated DDIM step counts S"),
                    num_images: int = Opt(360, min=1, help="held-out images to encode and decode"),
                    data: str = Opt(None, help="the data set (default: the checkpoint's; digits for an .onnx file)"),
                    device: Device = EITHER_DEVICE, json_: bool = JSON):
    """Encode held-out images with DDIM inversion, decode them, and print the per-dimension MSE in [0, 1]
    units for each S (the shape of Table 2 of Song et al.)."""
    counts = _int_list(step_counts, "--step-counts", lo=2)
    enc = Encoder(model, device, data)
    x = enc.images(slice(0, num_images))
    rows = []
    for S in counts:
        recon = enc.decode(enc.encode(x, S), S)
        rows.append({"steps": S, "mse": float((((recon - x) / 2) ** 2).mean()), "num_images": len(x)})
    if json_:
        typer.echo(json.dumps(rows))
        return
    typer.echo("| S | " + " | ".join(str(r["steps"]) for r in rows) + " |")
    typer.echo("|---" * (len(rows) + 1) + "|")
    typer.echo(f"| MSE per dimension, [0, 1] units, {len(x)} images | " + " | ".join(f"{r['mse']:.4g}" for r in rows) + " |")


@app.command("interpolate")
def interpolate_cmd(ctx: typer.Context, model: str = MODEL_ARG,
                    images: str = Opt("0,1", help="I,J: the held-out images whose DDIM latents are interpolated"),
                    seeds: str = Opt(None, help="A,B: interpolate between the x_T of these two seeds instead"),
                    frames: int = Opt(8, min=2, help="images along the path, ends included"),
                    steps: int = Opt(50, min=2, help="DDIM steps"),
                    data: str = Opt(None, help="the data set of --images (default: the checkpoint's; digits for .onnx)"),
                    device: Device = EITHER_DEVICE, out: str = Opt("interpolation.png", help=OUT_IMAGES)):
    """Slerp between the DDIM latents of two held-out images (or of two seeds' x_T) and decode each point
    (Song et al. Section 5.4)."""
    _check_out(out)
    if seeds:
        _refuse(ctx, ["images"], "and --seeds are two starting points: give one")
    pair = _int_list(seeds or images, "--seeds" if seeds else "--images")
    if len(pair) != 2:
        raise UserError(f"{'--seeds' if seeds else '--images'} {seeds or images}: expected two numbers A,B")
    enc = Encoder(model, device, data)
    if seeds:
        latents = np.stack([np.random.RandomState(s).standard_normal(enc.shape) for s in pair]).astype(np.float32)
    else:
        for i in pair:
            if not 0 <= i < len(enc.held_out):
                raise UserError(f"--images: {i} is out of range: the held-out split has {len(enc.held_out)} images")
        latents = enc.encode(enc.images(pair), steps)
    path = slerp(latents[0], latents[1], np.linspace(0, 1, frames)).astype(np.float32)
    _samples_to_file(enc.decode(path, steps), out)
    typer.echo(f"wrote {frames} images from {'seeds' if seeds else 'held-out images'} {pair[0]} and {pair[1]} to {out}")


bench_app = typer.Typer(no_args_is_help=True, help="Speed: sampling per backend, training throughput.")
app.add_typer(bench_app, name="bench")


def _print_table(rows: list[dict], json_: bool) -> None:
    """Rows as JSON, or as a plain fixed-width table (it stays readable in a log or a narrow terminal)."""
    if json_:
        typer.echo(json.dumps(rows, indent=1))
        return
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(rows[0])]
    for line in [list(rows[0])] + cells:
        typer.echo("  ".join(c.rjust(w) for c, w in zip(line, widths)))


BENCH_STEPS = {"ancestral": 1000, "ddim": 50, "dpmpp2m": 10, "dpmpp2m-sde": 10, "dpmpp3m": 10, "unipc": 10}


def _choices(text: str, flag: str, valid) -> tuple:
    values = tuple(v.strip() for v in text.split(","))
    bad = [v for v in values if v not in valid]
    if bad:
        raise UserError(f"{flag} {text}: {bad[0]!r} is not one of {', '.join(valid)}")
    return values


@bench_app.command("sample")
def bench_sample_cmd(checkpoint: str = Opt(None, help="time this checkpoint (and give each row's FD for digits) "
                                                      "instead of the preset's initial weights"),
                     preset: Preset = Opt("digits", help="U-Net preset timed without --checkpoint (see `ddpm info`)"),
                     batch_size: int = Opt(64, min=1, help="images per network call"),
                     samplers: str = Opt("ancestral,ddim", help="comma-separated runs: ancestral (1000 steps), ddim (50), "
                                                                "dpmpp2m, dpmpp2m-sde, dpmpp3m, unipc (10 each)"),
                     steps: int = Opt(None, min=1, help="every run's network calls (default: each sampler's above)"),
                     backends: str = Opt("torch,ort,cpp", help=f"comma-separated: {','.join(BACKENDS)}"),
                     precision: str = Opt("auto", help="comma-separated: fp32,bf16,fp16 (torch; int8 too, compile), fp32,fp16,int8 "
                                                       "(ort, cpp), fp32,bf16,int8 (openvino, cpp-openvino; int8: the "
                                                       "int8 file); auto: bf16 where fast (torch, OpenVINO), fp32 "
                                                       "(onnxruntime)"),
                     repeats: int = Opt(3, min=1, help="timed runs per row (after a warm-up)"), device: Device = DEVICE,
                     threads: int = THREADS, json_: bool = JSON):
    """Images/s, network evaluations/s, loop overhead (loop time / bare network time) and achieved FLOP/s
    against the matmul peak of the row's precision, for each sampler run (and FD with --checkpoint)."""
    runs = tuple((name, steps or BENCH_STEPS[name]) for name in _choices(samplers, "--samplers", onnx_sampler.SAMPLERS))
    rows = []  # printed even when a later backend fails: the rows measured by then are kept
    try:
        bench_sample(preset, batch_size, _choices(backends, "--backends", BACKENDS), repeats, runs, device, threads,
                     _choices(precision, "--precision", BENCH_PRECISIONS), checkpoint, rows)
    finally:
        if rows:
            _print_table(rows, json_)


@bench_app.command("train")
def bench_train_cmd(preset: Preset = Opt("digits", help="U-Net preset (see `ddpm info`)"),
                    batch_size: int = Opt(64, min=1, help="images per optimizer step"),
                    precision: Precision = Opt("auto", help="autocast precision (auto: bf16 where the device runs it fast)"),
                    compile: bool = Opt(False, help="torch.compile the network"),
                    channels_last: bool = Opt(False, help="channels-last memory format"),
                    synthetic: bool = Opt(False, help="random data of the preset's shape (always for non-digits presets)"),
                    train_steps: int = Opt(20, min=1, help="optimizer steps per timing"),
                    repeats: int = Opt(3, min=1, help="timings (after a warm-up)"), device: Device = DEVICE,
                    json_: bool = JSON):
    """Training images/s after warm-up, peak memory and achieved FLOP/s."""
    _print_table([bench_train(preset, batch_size, precision, compile, channels_last, synthetic, train_steps, repeats,
                              device)], json_)


@app.command("fd")
def fd_cmd(ctx: typer.Context,
           source: str = typer.Argument(..., help="a checkpoint (samples are drawn) or a .npz of uint8 NHWC samples"),
           num_samples: int = Opt(360, min=2, help="images to draw from a checkpoint"),
           features: typing.Literal[tuple(FEATURES)] = Opt(
               "mlp", help="the feature space: mlp, the hidden layer of a small classifier (the published figures); "
                           "cnn, that of a small convolutional one (a second opinion)"),
           variance: Variance = Opt(None, help="override the model's variance for the sampler"),
           table: bool = Opt(False, help="the DDIM table: S in 10,20,50,100,1000 x eta in 0,0.5,1, and ancestral "
                                         "with fixed_small and fixed_large, as a Markdown table"),
           nfe_table: bool = Opt(False, help="FD against network calls (NFE) for every sampler, as a Markdown table"),
           guidance_table: bool = Opt(False, help="a class-conditional model: class accuracy and FD for guidance "
                                                  "s = 0, 1, 1.5, 2, 3 with the sampler given (and classifier "
                                                  "guidance with --classifier)"),
           classifier: str = Opt(None, help="with --guidance-table: also classifier guidance with this classifier"),
           classifier_scales: str = Opt("1,2", help="with --guidance-table --classifier: the g values"),
           seed: int = SEED, seeds: str = Opt(None, help="A,B,...: draw the samples once with each seed and report the "
                                                                "mean FD and its standard deviation over them"),
           device: Device = DEVICE,
           precision: SamplePrecision = Opt("fp32", help="network precision (fp32: the published figures)"),
           compile: bool = COMPILE, json_: bool = JSON,
           sampler: Sampler | None = SAMPLER, steps: int | None = STEPS, eta: float = ETA,
           spacing: Spacing | None = SPACING, clip: bool | None = CLIP, corrector_steps: int = CORRECTOR_STEPS,
           snr: float = SNR, classes: str | None = CLASSES, guidance: float | None = GUIDANCE):
    """Frechet distance to the digits training split in the features of a small digits classifier, with
    the real-vs-real floor (held-out vs training) to judge it by; for a class-conditional model (samples
    over all classes by default) also the share of samples that classifier assigns to the requested class."""
    _check_fd_options(ctx, source, table, nfe_table, guidance_table, seeds)
    plan_options = _plan_options(ctx, sampler, steps, eta, spacing, clip, corrector_steps, snr)
    seed_list = _int_list(seeds, "--seeds") if seeds else [seed]
    if source.endswith(".npz"):
        _fd_of_file(source, features, json_)
        return
    dev = resolve_device(device)
    model, diffusion, cfg, shape = load_model(source, True, dev)
    plan_options = plan_options(model.plan_options)
    if shape != (1, 8, 8):
        raise UserError(f"{source}: fd is defined for the 8x8 digits; this model makes {shape} images")
    model, note = at_precision(model, precision, dev, compile, cfg, diffusion)
    if not (table or nfe_table):  # a plan the schedule cannot give is the user's error, before anything is drawn
        _torch_plan(Diffusion(diffusion.betas, diffusion.parameterization, variance) if variance else diffusion,
                    plan_options)
    runs = SampledFd(model, diffusion, shape, dev, num_samples, plan_options, classes, guidance, _labels,
                     lambda total: _progress("sampling", total), variance, seed, DigitsFd(features))
    if guidance_table:
        if not model.class_names and not classifier:
            raise UserError("--guidance-table needs a class-conditional model (or --classifier)")
        clf = load_classifier(classifier, dev) if classifier else None
        rows = runs.guidance_table(seed_list, clf, _float_list(classifier_scales, "--classifier-scales"))
        _print_guidance_table(rows, runs.metric.floor, num_samples, seeds, seed_list, json_, note)
        return
    if nfe_table or table:
        rows = runs.nfe_table() if nfe_table else runs.ddim_table()
        columns, label = (NFE_COLUMNS, "NFE") if nfe_table else (FD_TABLE_STEPS, "S")
        _print_fd_table(rows, columns, label, runs.metric.floor, num_samples, json_, note)
        return
    _print_fd(runs.over_seeds(seed_list), runs.metric, num_samples, seeds, seed_list, json_, note)


def _print_fd(result: tuple, metric, n: int, seeds: str | None, seed_list: list, json_: bool, note: str) -> None:
    """fd's one line (or JSON): the mean FD over the seeds, its spread, the floor and the class agreement."""
    fd, spread, _, accuracy = result
    res = {"fd": fd, "floor": metric.floor, "num_samples": n, "n_floor": metric.n_floor,
           **({"fd_std": spread, "seeds": seed_list} if seeds else {}),
           **({"class_accuracy": accuracy} if not np.isnan(accuracy) else {}), "precision": note}
    over = f" +- {spread:.3f} (mean and standard deviation over seeds {seeds})" if seeds else ""
    typer.echo(json.dumps(res) if json_ else f"FD {fd:.3f}{over} ({n} samples vs the training split, "
               f"network in {note}); real-vs-real floor {res['floor']:.3f} ({res['n_floor']} held-out images)"
               + (f"; class agreement {100 * accuracy:.1f}%" if "class_accuracy" in res else ""))


def _check_fd_options(ctx: typer.Context, source: str, table: bool, nfe_table: bool, guidance_table: bool,
                      seeds: str | None) -> None:
    """fd's options that cannot apply together, or to a table or a file of samples: user errors."""
    if sum((table, nfe_table, guidance_table)) > 1:
        raise UserError("--table, --nfe-table and --guidance-table are separate tables: give one")
    if not guidance_table:
        _refuse(ctx, ["classifier", "classifier_scales"], "applies to --guidance-table only")
    if table or nfe_table:
        _refuse(ctx, ["variance", "sampler", "steps", "eta", "seeds"], "is set by the table's rows")
    if guidance_table:
        _refuse(ctx, ["classes", "guidance"], "is set by the table's rows")
    if source.endswith(".npz"):
        _refuse(ctx, [*SAMPLING_OPTIONS, "num_samples", "variance", "table", "nfe_table", "guidance_table", "seed",
                      "seeds", "device", "precision", "compile"], "applies to a checkpoint, not to a .npz")
    if seeds:
        _refuse(ctx, ["seed"], "and --seeds both choose the noise: give one")


def _fd_of_file(source: str, features: str, json_: bool) -> None:
    """`ddpm fd SAMPLES.npz`: the FD of samples drawn elsewhere."""
    arr, _ = load_npz(source)
    if arr.shape[1:] != (1, 8, 8):
        raise UserError(f"{source}: expected 8x8 grey digits, got images of shape {arr.shape[1:]}")
    metric = DigitsFd(features)
    res = {"fd": metric(arr)[0], "floor": metric.floor, "num_samples": len(arr), "n_floor": metric.n_floor}
    typer.echo(json.dumps(res) if json_ else f"FD {res['fd']:.3f} ({len(arr)} samples vs the training split); "
               f"real-vs-real floor {metric.floor:.3f} ({metric.n_floor} held-out images)")


def _print_guidance_table(rows: dict, floor: float, n: int, seeds: str | None, seed_list: list, json_: bool,
                          note: str) -> None:
    if json_:
        typer.echo(json.dumps({"rows": rows, "floor": floor, "num_samples": n, "seeds": seed_list, "precision": note}))
        return
    typer.echo("| guidance | class accuracy | FD |\n|---|---|---|")
    for name, (fd, spread, _, accuracy) in rows.items():
        typer.echo(f"| {name} | {100 * accuracy:.1f}% | {fd:.3f}" + (f" +- {spread:.3f}" if seeds else "") + " |")
    typer.echo(f"\nreal-vs-real floor {floor:.3f}; {n} samples per row, an equal share of each class"
               + (f", mean and standard deviation over seeds {seeds}" if seeds else "") + f"; network in {note}")


def _print_fd_table(rows: dict, columns: tuple, label: str, floor: float, n: int, json_: bool, note: str) -> None:
    typer.echo(json.dumps({"columns": columns, "label": label, "rows": rows, "floor": floor, "num_samples": n,
                           "precision": note})
               if json_ else fd_table_markdown(rows, columns, label, floor, n) + f"; network in {note}")


def _pixels(path: str) -> np.ndarray:
    """The uint8 pixels of a .npz of samples (arr_0) or of a .png grid."""
    if path.lower().endswith(".npz"):
        return load_npz(path)[0]
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


@app.command("compare")
def compare_cmd(files: list[str] = typer.Argument(..., help="two or more .png grids or .npz files of the same images"),
                tolerance: int = Opt(1, min=0, max=255, help="the largest difference allowed, in grey levels")):
    """The largest pixel difference between sample files of the same images (the parity of the three executors,
    checked by `make demo`); exit status 1 when it exceeds --tolerance."""
    if len(files) < 2:
        raise UserError("compare needs two or more files")
    first = _pixels(files[0])
    worst = 0
    for path in files[1:]:
        other = _pixels(path)
        if other.shape != first.shape:
            raise UserError(f"{path}: {other.shape} images, {files[0]}: {first.shape}: not the same images")
        worst = max(worst, int(np.abs(other.astype(np.int16) - first).max()))
    same = "the same images" if worst <= tolerance else "DIFFERENT images"
    typer.echo(f"{', '.join(files)}: {same} (largest difference {worst} grey levels, tolerance {tolerance})")
    raise typer.Exit(0 if worst <= tolerance else 1)


@app.command("side-by-side")
def side_by_side_cmd(files: list[str] = typer.Argument(..., help="two or more .png grids or .npz files of samples"),
                     out: str = Opt("side-by-side.png", help="the .png to write")):
    """Sample grids in one row, left to right in the order given (a .npz as the grid `sample` would write)."""
    _check_out(out, (".png",))
    if len(files) < 2:
        raise UserError("side-by-side needs two or more files")
    grids = [image_grid(p) if p.ndim == 4 else p for p in map(_pixels, files)]
    try:
        write_atomically(out, png(side_by_side(grids)))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
    typer.echo(f"wrote {out}: {', '.join(files)} side by side")


@app.command("import")
def import_cmd(folder: str = typer.Argument(..., help="a diffusers UNet2DModel folder (config.json, weights, "
                                                       "scheduler_config.json beside it or in ../scheduler/), or a "
                                                       "pipeline folder with unet/ and scheduler/"),
               out: str = Opt("checkpoint.pt", help="the checkpoint to write")):
    """Import the weights Ho et al. released (google/ddpm-cifar10-32, ...-256), in diffusers' format, as a
    checkpoint that sample, nll, export and bench use. Local files only: nothing is downloaded."""
    from .diffusers_io import import_diffusers
    state = import_diffusers(folder, out)
    cfg, kw = state["config"], state["unet"]
    params = sum(t.numel() for t in state["model"].values())
    typer.echo(f"wrote {out}: {'x'.join(map(str, state['image_shape']))} U-Net of {params:,} parameters "
               f"(ch {kw['ch']}, ch_mult {','.join(map(str, kw['ch_mult']))}, attention at {kw['attn_resolutions']}), "
               f"{cfg['schedule']} schedule, T = {cfg['T']}, predicts {cfg['parameterization']}, {cfg['variance']} variance")
    for note in state["notes"]:
        typer.echo(f"note: {note}")


@app.command("export-diffusers")
def export_diffusers_cmd(checkpoint: str = typer.Argument(..., help="a checkpoint of `ddpm train` or `ddpm import`"),
                         out: str = Opt("diffusers-model", help="the folder to write (must not exist, or be empty)"),
                         ema: bool = EMA):
    """Write a checkpoint as a diffusers folder (UNet2DModel + DDPMScheduler, google/ddpm-cifar10-32's layout)."""
    from .diffusers_io import export_diffusers
    report = export_diffusers(checkpoint, out, ema)
    typer.echo(f"wrote {out}: UNet2DModel of {report['parameters']:,} parameters ({report['tensors']} tensors), "
               f"DDPMScheduler ({report['scheduler']['beta_schedule']}, T = {report['scheduler']['num_train_timesteps']}, "
               f"{report['scheduler']['prediction_type']}, {report['scheduler']['variance_type']})")


@app.command("info")
def info_cmd(preset: Preset = Opt(None, help="one preset (default: all)")):
    """Parameters and FLOPs per forward pass of the U-Net presets."""
    for name in [preset] if preset else list(unet.PRESETS):
        model = unet.build_unet(name)
        c = model.config
        typer.echo(f"{name:12s} {c['in_channels']}x{c['image_size']}x{c['image_size']}  "
                   f"params {unet.count_parameters(model):,}  GFLOPs/forward {unet.flops_per_forward(model) / 1e9:.3f}")


def main(argv=None) -> None:
    """Entry point: a user's error (a bad option, path or file) ends in one line on stderr and exit status 2, with no
    traceback; anything else is a bug and keeps its traceback."""
    from typer.exceptions import Abort, Exit, TyperException
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="ddpm", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Exit as e:
        sys.exit(e.exit_code)
    except Abort:
        sys.exit(130)
    except TyperException as e:  # usage errors: bad option, bad value, missing argument
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.ctx.get_help())
            sys.exit(0)
        print(f"ddpm: error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(2)
    except (UserError, onnx_sampler.ModelError, Int8Error) as e:
        print(f"ddpm: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

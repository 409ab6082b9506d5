"""The weights Ho et al. released, in diffusers' format: import them as a checkpoint of this project, and export
a checkpoint back to that format.

google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256 and -cat-256 are folders of a diffusers
`UNet2DModel` (config.json and diffusion_pytorch_model.safetensors or .bin) and a `DDPMScheduler`
(scheduler_config.json), side by side or in unet/ and scheduler/ subfolders. The UNet2DModel of those configs is
unet.UNet block for block: DownBlock2D/AttnDownBlock2D levels are our levels (attention where the block type says),
ResnetBlock2D is ResBlock, the single-head Attention (Linear q, k, v, out) is AttnBlock (1x1 convs), and
downsample_padding=0 is TF's 'SAME' padding, unet.UNet's downsample_padding="tf".

One table, tensor_names, pairs every tensor of ours with its diffusers name; to_ours and to_diffusers are its two
directions, consume every tensor exactly once and check every shape. The schedule, the parameterisation
(prediction_type) and the variance (variance_type) come from the scheduler config. What unet.UNet or
ddpm.Diffusion cannot express (another block type, multi-head or cross-attention, class embeddings, a schedule
that is not one of ddpm.Schedule, ...) is refused with a UserError naming the field. Nothing is downloaded.

Imports ddpm and unet; ddpm.py does not import this module. Needs the `diffusers` extra (safetensors) only to
read and write .safetensors files; diffusers itself is not imported.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import math
import os
import shutil
import tempfile
from typing import get_args

import numpy as np
import torch

from . import ddpm, unet
from .ddpm import UserError
from .images import current_umask
from .plan import default_spacing

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# UNet2DModel's arguments and their defaults (diffusers 0.42), for configs that leave some out. A field that is
# not here is refused: it may change the network in a way no tensor shape shows.
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)
# The fields whose value unet.UNet fixes: the allowed values (the paper's network).
UNET_FIXED = dict(
    center_input_sample=(False,), time_embedding_type=("positional",), freq_shift=(1,), flip_sin_to_cos=(False,),
    mid_block_type=("UNetMidBlock2D",), mid_block_scale_factor=(1,), downsample_type=("conv",), upsample_type=("conv",),
    act_fn=("silu", "swish"), norm_num_groups=(32,), attn_norm_num_groups=(None, 32), norm_eps=(1e-6,),
    resnet_time_scale_shift=("default",), add_attention=(True,), class_embed_type=(None,), num_class_embeds=(None,))
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          trained_betas=None, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                          prediction_type="epsilon", thresholding=False, rescale_betas_zero_snr=False)
# diffusers' beta_schedule -> ddpm.Schedule (the same formula; ours scales beta_start/end by 1000/T)
SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "sigmoid": "sigmoid", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large", "learned_range": "learned_range"}


# ------------------------------------------------------------------------------------ the architecture

def _refuse(config: dict, field: str, why: str):
    raise UserError(f"config.json: {field} = {json.dumps(config[field])}: {why}")


def _attention_levels(c: dict, n: int) -> list[bool]:
    """Which of the n levels attend, from the block types (DownBlock2D/AttnDownBlock2D and the mirror image up)."""
    strip = lambda kind: kind[7:] if kind.startswith("UNetRes") else kind  # noqa: E731 (as diffusers does)
    kinds = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}
    levels = {}
    for field, ok in kinds.items():
        types = [strip(k) for k in c[field]]
        if len(types) != n:
            _refuse(c, field, f"needs {n} block types, as many as block_out_channels")
        if bad := [k for k in types if k not in ok]:
            _refuse(c, field, f"block type {bad[0]} is not one of unet.UNet's ({', '.join(ok)})")
        levels[field] = [k == ok[1] for k in types]
    if levels["down_block_types"] != levels["up_block_types"][::-1]:
        _refuse(c, "up_block_types", "unet.UNet has attention at the same levels on the way down and up")
    return levels["down_block_types"]


def unet_kwargs(config: dict) -> dict:
    """unet.UNet's keyword arguments for a diffusers UNet2DModel config, or a UserError naming the first field
    that unet.UNet cannot express."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel" or "block_out_channels" not in config:
        raise UserError(f"config.json: _class_name {name!r} is not a diffusers UNet2DModel (the network of "
                        "google/ddpm-cifar10-32 and its kin)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise UserError(f"config.json: field {unknown[0]} is not a UNet2DModel argument that unet.UNet knows")
    c = {**UNET_DEFAULTS, **config}
    for field, allowed in UNET_FIXED.items():
        if c[field] not in allowed:
            _refuse(c, field, f"unet.UNet has {' or '.join(json.dumps(a) for a in allowed)}")
    channels, n = list(c["block_out_channels"]), len(c["block_out_channels"])
    attn, ch = _attention_levels(c, n), channels[0]
    if ch <= 0 or any(x % ch for x in channels):
        _refuse(c, "block_out_channels", "unet.UNet's channels are multiples of the first level's")
    size = c["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    if not isinstance(size, int) or size % 2 ** (n - 1):
        _refuse(c, "sample_size", f"unet.UNet needs a square size divisible by 2**{n - 1}")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        _refuse(c, "time_embedding_dim", f"unet.UNet's is 4 x block_out_channels[0] = {4 * ch}")
    heads = [channels[i] for i in range(n) if attn[i]] + [channels[-1]]  # mid_block always attends
    if c["attention_head_dim"] is not None and any(c["attention_head_dim"] != h for h in heads):
        _refuse(c, "attention_head_dim", "unet.UNet's attention has one head (null, or the channels of every "
                                         "attention block)")
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        _refuse(c, "out_channels", "unet.UNet predicts in_channels (eps, x0, v) or 2 x in_channels (learned_range)")
    if c["downsample_padding"] not in (0, 1):
        _refuse(c, "downsample_padding", "unet.UNet pads 1 (symmetric) or 0 (TF's 'SAME', bottom/right)")
    return dict(in_channels=c["in_channels"], out_channels=c["out_channels"], ch=ch,
                ch_mult=tuple(x // ch for x in channels), num_res_blocks=int(c["layers_per_block"]),
                attn_resolutions=tuple(size // 2 ** i for i in range(n) if attn[i]), dropout=float(c["dropout"]),
                image_size=size, num_classes=0,
                downsample_padding="tf" if c["downsample_padding"] == 0 else "symmetric")


def diffusers_config(kwargs: dict) -> dict:
    """The UNet2DModel config of unet.UNet(**kwargs): the inverse of unet_kwargs."""
    if kwargs.get("num_classes"):
        raise UserError("a class-conditional U-Net (num_classes > 0) has no UNet2DModel equivalent here")
    n, size, ch = len(kwargs["ch_mult"]), kwargs["image_size"], kwargs["ch"]
    attn = [size // 2 ** i in kwargs["attn_resolutions"] for i in range(n)]
    return dict(
        _class_name="UNet2DModel", sample_size=size, in_channels=kwargs["in_channels"],
        out_channels=kwargs["out_channels"] or kwargs["in_channels"], center_input_sample=False,
        time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[ch * m for m in kwargs["ch_mult"]], layers_per_block=kwargs["num_res_blocks"],
        mid_block_scale_factor=1, downsample_padding=0 if kwargs.get("downsample_padding") == "tf" else 1,
        dropout=kwargs["dropout"], act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)


# ------------------------------------------------------------------------------------ the tensors

def _prefixes(kwargs: dict) -> dict[str, str]:
    """Our module paths -> diffusers' (levels in order down, in reverse order up)."""
    n, blocks = len(kwargs["ch_mult"]), kwargs["num_res_blocks"]
    table = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
             "mid1.res": "mid_block.resnets.0", "mid1.attn": "mid_block.attentions.0", "mid2": "mid_block.resnets.1",
             "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    for half, per_level, sampler in (("down", blocks, "downsamplers"), ("up", blocks + 1, "upsamplers")):
        i = 0
        for level in range(n):
            for j in range(per_level):
                table[f"{half}.{i}.res"] = f"{half}_blocks.{level}.resnets.{j}"
                table[f"{half}.{i}.attn"] = f"{half}_blocks.{level}.attentions.{j}"
                i += 1
            if level < n - 1:
                table[f"{half}.{i}.conv"] = f"{half}_blocks.{level}.{sampler}.0.conv"
                i += 1
    return table


LEAVES = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut", "q": "to_q", "k": "to_k", "v": "to_v",
          "proj_out": "to_out.0", "norm": "group_norm"}
# diffusers < 0.14 (the released .bin files) named the attention's tensors so; diffusers renames them on load too.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def tensor_names(kwargs: dict) -> list[tuple[str, str, tuple, tuple]]:
    """The map: (our name, diffusers' name, our shape, diffusers' shape) for every tensor of unet.UNet(**kwargs),
    in its state_dict order. The attention's 1x1 convs [C, C, 1, 1] are diffusers' Linear layers [C, C]."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in unet.UNet(**kwargs).state_dict().items()}
    table, rows = _prefixes(kwargs), []
    for key, shape in shapes.items():
        parts = key.split(".")
        cut = next(k for k in (3, 2, 1) if ".".join(parts[:k]) in table)
        prefix, leaf = ".".join(parts[:cut]), parts[cut:]
        attention = prefix.endswith(".attn")
        leaf = [LEAVES[p] if p in LEAVES and (attention or p not in ("q", "k", "v", "norm")) else p for p in leaf]
        linear = attention and len(shape) == 4
        rows.append((key, ".".join([table[prefix], *leaf]), shape, shape[:2] if linear else shape))
    return rows


def _modern_names(state: dict) -> dict:
    """diffusers' current names for a state dict that may use the legacy attention names."""
    def rename(key):
        *path, module, kind = key.split(".")
        legacy = module in LEGACY_ATTENTION and len(path) >= 2 and path[-2] == "attentions"
        return ".".join([*path, LEGACY_ATTENTION[module], kind]) if legacy else key
    return {rename(k): v for k, v in state.items()}


def _convert(state: dict, rows, source: int, target: int, what: str) -> dict:
    """Move every tensor of `state` from column `source` of the map to column `target`: each consumed once,
    each shape checked, nothing left over."""
    state, out = dict(state), {}
    for row in rows:
        name, want = row[source], row[source + 2]
        if name not in state:
            raise UserError(f"{what}: tensor {name} is missing (the config implies it)")
        tensor = state.pop(name)
        if tuple(tensor.shape) != want:
            raise UserError(f"{what}: tensor {name} has shape {list(tensor.shape)}, the config implies {list(want)}")
        out[row[target]] = tensor.reshape(row[target + 2])
    if state:
        raise UserError(f"{what}: {len(state)} tensor(s) the config does not account for, e.g. {sorted(state)[0]}")
    return out


def to_ours(state: dict, kwargs: dict, what: str = "weights") -> dict:
    """A UNet2DModel state dict -> unet.UNet(**kwargs)'s, float32."""
    return {k: v.float().contiguous() for k, v in _convert(_modern_names(state), tensor_names(kwargs), 1, 0, what).items()}


def to_diffusers(state: dict, kwargs: dict, what: str = "checkpoint") -> dict:
    """unet.UNet(**kwargs)'s state dict -> the UNet2DModel's."""
    return {k: v.contiguous() for k, v in _convert(state, tensor_names(kwargs), 0, 1, what).items()}


# ------------------------------------------------------------------------------------ the schedule

def _schedule_defaults() -> tuple[float, float]:
    defaults = inspect.signature(ddpm.beta_schedule).parameters
    return defaults["beta_start"].default, defaults["beta_end"].default


def scheduler_betas(config: dict) -> np.ndarray:
    """The betas (float64) a diffusers scheduler config defines, through ddpm.beta_schedule with diffusers'
    unscaled beta_start/beta_end (ours are scaled by 1000/T)."""
    T = int(config["num_train_timesteps"])
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
        if betas.shape != (T,):
            raise UserError(f"scheduler_config.json: trained_betas has {betas.size} values, num_train_timesteps {T}")
    elif config["beta_schedule"] in SCHEDULES:
        betas = ddpm.beta_schedule(SCHEDULES[config["beta_schedule"]], T, beta_start=config["beta_start"] * T / 1000,
                                   beta_end=config["beta_end"] * T / 1000)
    else:
        raise UserError(f"scheduler_config.json: beta_schedule {config['beta_schedule']!r} is not one of "
                        f"{', '.join(SCHEDULES)}")
    return ddpm.rescale_zero_terminal_snr(betas) if config["rescale_betas_zero_snr"] else betas


def schedule_fields(config: dict) -> tuple[dict, list[str]]:
    """The TrainConfig fields (schedule, T, zero_terminal_snr, parameterization, variance) of a scheduler config,
    and notes for the user; a UserError naming the field ddpm.Diffusion cannot express."""
    c = {**SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if "Scheduler" not in config.get("_class_name", "Scheduler"):
        raise UserError(f"scheduler_config.json: _class_name {config['_class_name']!r} is not a diffusers scheduler")
    for field, ok in (("prediction_type", PREDICTIONS), ("variance_type", VARIANCES)):
        if c[field] not in ok:
            raise UserError(f"scheduler_config.json: {field} {c[field]!r} is not one of {', '.join(ok)}")
    if c["thresholding"]:
        raise UserError("scheduler_config.json: thresholding (dynamic thresholding) is not a sampler of this project")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise UserError(f"scheduler_config.json: clip_sample_range {c['clip_sample_range']}: this project clips "
                        "x0 to [-1, 1]")
    T, theirs = int(c["num_train_timesteps"]), scheduler_betas(c)
    for name in get_args(ddpm.Schedule):
        for zero in (False, True):
            ours = ddpm.beta_schedule(name, T)
            ours = ddpm.rescale_zero_terminal_snr(ours) if zero else ours
            if np.allclose(ours, theirs, rtol=1e-9, atol=0):
                notes = [] if c["clip_sample"] else ["the scheduler does not clip x0: sample with --no-clip"]
                return dict(schedule=name, T=T, zero_terminal_snr=zero, parameterization=PREDICTIONS[c["prediction_type"]],
                            variance=VARIANCES[c["variance_type"]]), notes
    start, end = _schedule_defaults()
    raise UserError(f"scheduler_config.json: beta_schedule {c['beta_schedule']!r} from beta_start {c['beta_start']} to "
                    f"beta_end {c['beta_end']} over num_train_timesteps {T} is none of this project's schedules (theirs "
                    f"run from {start} x 1000/T to {end} x 1000/T)")


def scheduler_config(cfg: ddpm.TrainConfig) -> dict:
    """The DDPMScheduler config of a checkpoint's TrainConfig: the inverse of schedule_fields."""
    start, end = _schedule_defaults()
    scale, named = 1000.0 / cfg.T, {v: k for k, v in SCHEDULES.items()}
    spacing = default_spacing(ddpm.make_diffusion(cfg).alphas_cumprod)  # make_plan's default
    config = dict(_class_name="DDPMScheduler", num_train_timesteps=cfg.T, beta_start=start * scale,
                  beta_end=min(end * scale, 0.999), beta_schedule=named.get(cfg.schedule, "linear"), trained_betas=None,
                  variance_type=cfg.variance, clip_sample=True, clip_sample_range=1.0,
                  prediction_type={v: k for k, v in PREDICTIONS.items()}[cfg.parameterization],
                  rescale_betas_zero_snr=cfg.zero_terminal_snr, steps_offset=0,
                  timestep_spacing={"uniform": "leading"}.get(spacing, spacing))
    if cfg.schedule not in named:  # const, jsd: written out
        config["trained_betas"] = ddpm.beta_schedule(cfg.schedule, cfg.T).tolist()
    return config


# ------------------------------------------------------------------------------------ folders and files

def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object")
    return config


def _find(folder: str) -> tuple[str, str | None]:
    """(the UNet2DModel's folder, the scheduler config's path or None) of a model or pipeline folder."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder (download one first; nothing is fetched here)")
    flat = os.path.isfile(os.path.join(folder, "config.json"))
    if not flat and not os.path.isfile(os.path.join(folder, "unet", "config.json")):
        raise UserError(f"{folder}: no config.json (nor unet/config.json): not a diffusers model folder")
    model = folder if flat else os.path.join(folder, "unet")
    for path in (os.path.join(model, "scheduler_config.json"), os.path.join(model, os.pardir, "scheduler", "scheduler_config.json")):
        if os.path.isfile(path):
            return model, os.path.normpath(path)
    return model, None


def _load_weights(folder: str) -> tuple[str, dict]:
    """(path, state dict) of the UNet2DModel's weights in `folder`: .safetensors, else .bin."""
    for name in WEIGHTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return path, load_file(path)
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package: "
                            "pip install 'ddpm-reference[diffusers]'") from None
        except Exception as e:  # a truncated or foreign file raises anything from either reader
            raise UserError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    raise UserError(f"{folder}: neither {' nor '.join(WEIGHTS)}")


def import_diffusers(folder: str, out: str | None = None) -> dict:
    """A checkpoint of this project (ddpm.load_model reads it; `ddpm sample`, `nll`, `export` use it) from a
    diffusers UNet2DModel folder and its scheduler: EMA and raw weights both the released ones, the U-Net's
    keyword arguments under "unet", the source configs under "diffusers", and notes for the user. With `out`,
    also written there (atomically, once every check has passed)."""
    model_dir, scheduler_path = _find(folder)
    config = _read_json(os.path.join(model_dir, "config.json"))
    kwargs = unet_kwargs(config)
    scheduler = _read_json(scheduler_path) if scheduler_path else {}
    fields, notes = schedule_fields(scheduler)
    if not scheduler_path:
        notes.append("no scheduler_config.json: DDPMScheduler's defaults (the paper's linear schedule, T = 1000)")
    if (fields["variance"] == "learned_range") != (kwargs["out_channels"] == 2 * kwargs["in_channels"]):
        raise UserError(f"config.json: out_channels {kwargs['out_channels']} does not go with the scheduler's "
                        f"variance_type {scheduler.get('variance_type', 'fixed_small')!r} (learned_range: 2 x in_channels)")
    weights_path, weights = _load_weights(model_dir)
    state = to_ours(weights, kwargs, weights_path)
    shape = [kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]]
    preset = next((p for p, k in unet.PRESETS.items() if all(k[f] == kwargs[f] for f in
                   ("in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "image_size"))), "digits")
    cfg = ddpm.TrainConfig(data="(imported weights: pass --data)", preset=preset, **fields,
                           loss="hybrid" if fields["variance"] == "learned_range" else "simple",
                           out=os.path.dirname(out) if out else ddpm.TrainConfig.out)
    checkpoint = {"format": ddpm.CHECKPOINT_FORMAT, "version": ddpm.__version__, "config": dataclasses.asdict(cfg),
                  "image_shape": shape, "step": 0, "classes": [], "model": state, "ema": state, "unet": kwargs,
                  "diffusers": {"source": os.path.abspath(folder), "unet": config, "scheduler": scheduler}, "notes": notes}
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        ddpm.save_checkpoint(out, checkpoint)
    return checkpoint


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_diffusers(checkpoint_path: str, out_folder: str, ema: bool = True) -> dict:
    """Write a checkpoint as a diffusers folder (config.json, diffusion_pytorch_model.safetensors,
    scheduler_config.json, model_index.json: the flat layout of google/ddpm-cifar10-32, which
    UNet2DModel.from_pretrained, DDPMScheduler.from_pretrained and DDPMPipeline.from_pretrained read). It is
    written in a temporary folder beside out_folder and renamed: a failure leaves nothing. Returns a report."""
    if os.path.exists(out_folder) and not (os.path.isdir(out_folder) and not os.listdir(out_folder)):
        raise UserError(f"--out {out_folder}: exists; remove it or choose another folder")
    model, _, cfg, _ = ddpm.load_model(checkpoint_path, ema)
    config, scheduler = diffusers_config(model.config), scheduler_config(cfg)
    state = to_diffusers(model.state_dict(), model.config)
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("writing .safetensors needs the safetensors package: pip install 'ddpm-reference[diffusers]'") from None
    version = {"_diffusers_version": _version("diffusers") or "0.27.0"}
    parent = os.path.dirname(os.path.abspath(out_folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_folder))}.tmp-")
    try:
        save_file(state, os.path.join(tmp, WEIGHTS[0]), metadata={"format": "pt"})
        index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        for name, content in (("config.json", config), ("scheduler_config.json", scheduler), ("model_index.json", index)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump({**content, **version}, f, indent=2, sort_keys=True)
        for name in os.listdir(tmp):  # mkdtemp and safetensors make private files; give the usual permissions
            os.chmod(os.path.join(tmp, name), 0o666 & ~current_umask())
        os.chmod(tmp, 0o777 & ~current_umask())
        if os.path.isdir(out_folder):
            os.rmdir(out_folder)  # empty, checked above
        os.rename(tmp, out_folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out_folder, "tensors": len(state), "parameters": sum(math.prod(t.shape) for t in state.values()),
            "config": config, "scheduler": scheduler}

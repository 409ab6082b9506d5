"""The noisy classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021): its training and
its file. ddpm.classifier_guidance uses it at sampling time."""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

from . import unet
from .ddpm import (TrainConfig, UserError, __version__, load_checkpoint, lr_at, make_diffusion, preset_config,
                   resolve_device, save_checkpoint, to_model_range)

CLASSIFIER_FORMAT = "ddpm-reference-classifier-1"


def make_classifier(cfg: TrainConfig, image_shape, num_classes: int):
    """The noisy classifier p_phi(y | x_t, t) of a preset: its U-Net's downsampling half and a pooled head."""
    C, H, _ = image_shape
    kwargs = {k: v for k, v in preset_config(cfg.preset).items() if k not in ("in_channels", "image_size")}
    return unet.NoisyClassifier(num_classes, in_channels=C, image_size=H, **kwargs)


def train_classifier(cfg: TrainConfig, data, callback: Callable[[dict], None] | None = None) -> dict:
    """Train a noisy classifier for classifier guidance (Dhariwal & Nichol 2021): cross-entropy of the label
    of x_0 from x_t = q_sample(x_0, t, eps), t ~ U{0..T-1}, with AdamW, warm-up and gradient clipping, on
    the labels of `data` (data.Data) and cfg's schedule. Writes cfg.out/classifier.pt at the end (atomically)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if not data.classes:
        raise UserError(f"{cfg.data} has no labels to train a classifier on")
    diffusion = make_diffusion(cfg)
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg, data.train.shape[1:], len(data.classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images, labels = torch.from_numpy(data.train).to(device), torch.from_numpy(data.train_labels).to(device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, len(images), (cfg.batch_size,), device=device, generator=gen)
        t = torch.randint(0, diffusion.T, (cfg.batch_size,), device=device, generator=gen)
        x0 = to_model_range(images[idx])
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, device=device, generator=gen))
        loss = torch.nn.functional.cross_entropy(model(x_t, t), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            losses.append((step + 1, loss.item()))
            if not math.isfinite(losses[-1][1]):
                raise UserError(f"classifier loss is NaN or inf at step {step + 1}; lower --lr")
            if callback:
                callback({"step": step + 1, "steps": cfg.steps, "loss": losses[-1][1],
                          "images_per_s": (step + 1) * cfg.batch_size / (time.perf_counter() - t0)})
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "classifier.pt")
    save_checkpoint(path, {"format": CLASSIFIER_FORMAT, "version": __version__, "config": vars(cfg).copy(),
                           "image_shape": list(data.train.shape[1:]), "classes": data.classes,
                           "model": model.state_dict()})
    return {"steps": cfg.steps, "losses": losses, "checkpoint": path}


def load_classifier(path, device="cpu"):
    """(classifier in eval mode, its TrainConfig, class names) from `ddpm train-classifier`'s file."""
    if str(path).endswith(".onnx"):
        raise UserError(f"{path}: classifier guidance needs the gradient of a torch classifier, not an .onnx file")
    state = load_checkpoint(path, expected=CLASSIFIER_FORMAT, what="a classifier (write one with `ddpm train-classifier`)")
    cfg = TrainConfig(**state["config"])
    model = make_classifier(cfg, state["image_shape"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, list(state["classes"])


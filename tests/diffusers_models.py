"""diffusers folders for the tests, at random (perturbed) weights: the configs of the weights Ho et al. released,
and small stand-ins with the same block types. Nothing is downloaded.

google/ddpm-cifar10-32's config is CIFAR10 below; google/ddpm-cat-256's config.json (as published, diffusers
0.0.4; -church-256, -bedroom-256 and -celebahq-256 share the layout) is LSUN256. Their scheduler configs are
DDPMScheduler, linear 1e-4..0.02, T = 1000, clip_sample, variance fixed_large (CIFAR-10) or fixed_small (256).
"""
from __future__ import annotations

import json
import os

import torch

CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, time_embedding_type="positional", freq_shift=1,
               flip_sin_to_cos=False, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
               downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
               dropout=0.1)
LSUN256 = dict(CIFAR10, sample_size=256, dropout=0.0, block_out_channels=(128, 128, 256, 256, 512, 512),
               down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
# The stand-in of the README: CIFAR10's blocks and size, 32 channels a level (the least GroupNorm(32) allows).
STAND_IN = dict(CIFAR10, block_out_channels=(32, 32, 32, 32), dropout=0.0)
# Smaller still, for the sampler comparisons: 16x16 (attention at 8x8), one ResNet a level.
TINY = dict(CIFAR10, sample_size=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1, dropout=0.0)

SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
             "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
             "variance_type": "fixed_large"}
PIPELINE = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"]}


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Every tensor moved off its initialisation: zero-initialised layers (biases, norms' shifts) would hide a wrong map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def unet2d(config: dict, seed: int = 0):
    """diffusers.UNet2DModel(**config) in eval mode, its weights perturbed."""
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return perturb(UNet2DModel(**config), seed).eval()


def save_model(folder, config: dict = STAND_IN, scheduler: dict | None = None, seed: int = 0, model=None):
    """A flat diffusers folder, as the released repositories are: config.json, diffusion_pytorch_model.safetensors,
    scheduler_config.json and model_index.json. Returns the UNet2DModel."""
    model = model if model is not None else unet2d(config, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name, content in (("scheduler_config.json", SCHEDULER if scheduler is None else scheduler),
                          ("model_index.json", PIPELINE)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    return model


def save_stand_in(folder) -> None:
    """The README's stand-in for google/ddpm-cifar10-32 (same files, block types, size and scheduler; 32 channels
    a level): a few seconds to write, and cheap to sample."""
    save_model(folder, STAND_IN, SCHEDULER)

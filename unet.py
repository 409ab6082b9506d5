"""eps_theta: the U-Net of Ho, Jain & Abbeel (2020), ported from their `diffusion_tf/models/unet.py`.

A plain nn.Module mapping (x_t, t) -> tensor of x_t's spatial shape; it knows nothing about diffusion.
Layer order, initialisation (variance scaling, fan_avg, uniform; zero "init_scale=0." layers) and
GroupNorm(32, eps=1e-6) follow the original, and the CIFAR-10 model has the paper's 35,746,307
parameters. One deliberate difference by default: the stride-2 conv pads one pixel on every side, where
TF's 'SAME' pads only bottom/right. That shifts the downsampling grid by half a pixel, which does not
matter when training from scratch, and keeps out a Pad op that torch.onnx's dynamo exporter cannot convert to
opset 17. downsample_padding="tf" pads as TF does (F.pad, then an unpadded conv: diffusers'
downsample_padding=0), which the weights Ho et al. released need (diffusers_io.py imports them); the
TorchScript exporter that export/ uses writes that Pad at opset 17.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, init_scale: float = 1.0) -> nn.Conv2d:
    """Conv with the original's init: variance_scaling(init_scale, 'fan_avg', 'uniform') is
    Xavier-uniform with gain sqrt(init_scale); init_scale=0 gives an all-zero layer."""
    layer = nn.Conv2d(cin, cout, k, stride, padding=k // 2)
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(init_scale))
    nn.init.zeros_(layer.bias)
    return layer


def linear(cin: int, cout: int) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)  # tf.contrib.layers.group_norm defaults


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim], exactly `get_timestep_embedding` of the original
    (frequencies exp(-log(10000) * i / (half - 1)), [sin, cos], zero pad for odd dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """`resnet_block`: two 3x3 convs, the timestep embedding added after the first, 1x1 shortcut
    ('nin_shortcut') when the channel count changes."""

    def __init__(self, cin: int, cout: int, tdim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv(cin, cout)
        self.temb_proj = linear(tdim, cout)
        self.norm2, self.dropout, self.conv2 = norm(cout), nn.Dropout(dropout), conv(cout, cout, init_scale=0.0)
        self.shortcut = conv(cin, cout, k=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """`attn_block`: single-head self-attention over all H*W positions, softmax(q k^T / sqrt(C)) v,
    with a zero-initialised output projection so the block starts as the identity."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v = conv(c, c, k=1), conv(c, c, k=1), conv(c, c, k=1)
        self.proj_out = conv(c, c, k=1, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # default scale is C ** -0.5, as the original
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """A ResBlock, followed by self-attention at the chosen resolutions."""

    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, tdim, dropout)
        self.attn = AttnBlock(cout) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


DOWNSAMPLE_PADDINGS = ("symmetric", "tf")


class Resample(nn.Module):
    """`downsample` (3x3 conv, stride 2; padding "symmetric": one pixel on every side, "tf": TF's 'SAME',
    one pixel bottom/right only) or `upsample` (nearest x2, then 3x3 conv)."""

    def __init__(self, c: int, up: bool, padding: str = "symmetric"):
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, got {padding!r}")
        self.up, self.tf_pad = up, padding == "tf" and not up
        self.conv = conv(c, c, stride=1 if up else 2)
        if self.tf_pad:
            self.conv.padding = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.tf_pad else x)


class Encoder(nn.Module):
    """The downsampling half of the U-Net with its time (and class) embedding: conv_in, `len(ch_mult)`
    levels down (num_res_blocks blocks each, then a stride-2 conv) and the middle (ResBlock, Attn, ResBlock).
    With num_classes K > 0, a label embedding of K + 1 rows (row K: the "null" label of an unconditional
    call) is added to the time embedding, as in guided-diffusion; K = 0 adds no parameter."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], dropout: float, image_size: int, num_classes: int,
                 downsample_padding: str = "symmetric"):
        super().__init__()
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(ch_mult) - 1}")
        self.ch, self.num_classes, tdim = ch, num_classes, 4 * ch
        self.temb = nn.Sequential(linear(ch, tdim), nn.SiLU(), linear(tdim, tdim))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes + 1, tdim)
        self.conv_in = conv(in_channels, ch)
        self.skips, c, self.res = [ch], ch, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(c, ch * mult, tdim, dropout, self.res in attn_resolutions))
                c = ch * mult
                self.skips.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(Resample(c, up=False, padding=downsample_padding))
                self.skips.append(c)
                self.res //= 2
        self.mid1 = Block(c, c, tdim, dropout, attn=True)
        self.mid2 = ResBlock(c, c, tdim, dropout)
        self.channels = c

    def embedding(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.ch))
        if self.num_classes:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes=0): it takes no labels")
        return temb

    def features(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The middle's output and the skips of every level."""
        hs = [self.conv_in(x)]
        for m in self.down:
            hs.append(m(hs[-1]) if isinstance(m, Resample) else m(hs[-1], temb))
        return self.mid2(self.mid1(hs[-1], temb), temb), hs


class UNet(Encoder):
    """The `model` function of the original: the Encoder, levels up (num_res_blocks + 1 blocks each, every
    one concatenating a skip, then upsampling), and GroupNorm -> SiLU -> zero-initialised conv_out.
    Attention sits at the feature-map sizes in `attn_resolutions`, measured from `image_size`. With
    num_classes K > 0 it is class-conditional: forward(x, t, y) with y in 0..K, K the null label.
    downsample_padding: "symmetric" (the default, see the module docstring) or "tf" (the released weights)."""

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ch: int = 128,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1, image_size: int = 32,
                 num_classes: int = 0, downsample_padding: str = "symmetric"):
        super().__init__(in_channels, ch, tuple(ch_mult), num_res_blocks, tuple(attn_resolutions), dropout,
                         image_size, num_classes, downsample_padding)
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                           dropout=dropout, image_size=image_size, num_classes=num_classes,
                           downsample_padding=downsample_padding)
        skips, c, res, tdim = list(self.skips), self.channels, self.res, 4 * ch
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(Block(c + skips.pop(), ch * mult, tdim, dropout, res in attn_resolutions))
                c = ch * mult
            if level != 0:
                self.up.append(Resample(c, up=True))
                res *= 2
        self.norm_out, self.conv_out = norm(c), conv(c, out_channels, init_scale=0.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] float; t: [B] timesteps (int or float); y: [B] labels (a conditional network;
        None: the null label). Returns [B, out_channels, H, W]."""
        temb = self.embedding(t, y)
        h, hs = self.features(x, temb)
        for m in self.up:
            h = m(h) if isinstance(m, Resample) else m(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class NoisyClassifier(Encoder):
    """p_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021): the U-Net's downsampling half
    (Encoder, unconditional) with a pooled head, GroupNorm -> SiLU -> mean over positions -> linear to K logits."""

    def __init__(self, num_classes: int, in_channels: int = 3, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 image_size: int = 32):
        super().__init__(in_channels, ch, tuple(ch_mult), num_res_blocks, tuple(attn_resolutions), dropout,
                         image_size, 0)
        self.config = dict(num_classes=num_classes, in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions), dropout=dropout,
                           image_size=image_size)
        self.norm_out, self.head = norm(self.channels), linear(self.channels, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of the class of the clean image behind x_t."""
        h, _ = self.features(x, self.embedding(t, None))
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


PRESETS: dict[str, dict] = {
    # Ho et al. Appendix B: 35.7M parameters for CIFAR-10, 114M for the 256x256 models.
    "cifar10": dict(in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                    dropout=0.1, image_size=32),
    "celebahq256": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.0, image_size=256),
    "lsun256": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.0, image_size=256),
    # 8x8 greyscale scikit-learn digits, small enough to train on a 2-core CPU in minutes:
    # ch=32 is the least GroupNorm(32) allows; more makes a train step much slower (BENCHMARKS.md).
    "digits": dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                   dropout=0.1, image_size=8),
}


def build_unet(preset: str, out_channels: int | None = None) -> UNet:
    """The U-Net of a named preset; out_channels=2*C for a model that also learns variances."""
    if preset not in PRESETS:
        raise ValueError(f"unknown U-Net preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return UNet(**PRESETS[preset], out_channels=out_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_per_forward(model: UNet, batch: int = 1) -> int:
    """FLOPs of one forward pass as torch counts them (a multiply-add is 2), on a weightless copy
    built on the meta device so that even the 256x256 models cost nothing to measure."""
    cfg = model.config
    with torch.device("meta"):
        ghost = UNet(**cfg).eval()
        x = torch.zeros(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        ghost(x, t)
    return counter.get_total_flops()

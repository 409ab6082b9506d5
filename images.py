# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""Samples to files: uint8 pixels, a PNG grid or a .npz, written atomically. numpy only (an application copies it
beside onnx_sampler.py)."""
from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import zlib
from typing import BinaryIO, Callable

import numpy as np


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels, round((clamp(x, -1, 1) + 1) * 127.5), rounding half to even."""
    return np.rint((np.clip(np.asarray(x, dtype=np.float32), -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    """A PNG (8-bit grey or RGB, no filtering) of a uint8 [H, W] or [H, W, 3] array."""
    h, w = image.shape[:2]
    chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                               + struct.pack(">I", zlib.crc32(tag + data)))
    rows = b"".join(b"\x00" + image[r].tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if image.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def image_grid(pixels: np.ndarray, pad: int = 2, columns: int | None = None) -> np.ndarray:
    """uint8 [N, C, H, W] -> one image, `columns` (default ceil(sqrt(N))) columns with `pad`-pixel black gutters
    (as the C++ runner). Images under 32 pixels are enlarged by an integer factor (nearest neighbour) so that
    8x8 digits can be seen."""
    s = max(1, 32 // max(pixels.shape[2:]))
    pixels = pixels.repeat(s, axis=2).repeat(s, axis=3)
    N, C, H, W = pixels.shape
    cols = columns or math.ceil(math.sqrt(N))
    rows = -(-N // cols)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = \
            pixels[i].transpose(1, 2, 0)
    return grid[:, :, 0] if C == 1 else grid


def side_by_side(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """uint8 images ([H, W] grey or [H, W, 3]) in one row, top-aligned on black, with `gap` white columns between
    them (grey ones made RGB when any is RGB)."""
    rgb = any(im.ndim == 3 for im in images)
    images = [np.repeat(im[:, :, None], 3, axis=2) if rgb and im.ndim == 2 else im for im in images]
    height = max(im.shape[0] for im in images)
    row = []
    for i, im in enumerate(images):
        if i:
            row.append(np.full((height, gap, *im.shape[2:]), 255, dtype=np.uint8))
        row.append(np.pad(im, [(0, height - im.shape[0])] + [(0, 0)] * (im.ndim - 1)))
    return np.concatenate(row, axis=1)


def current_umask() -> int:
    """The process's file-mode creation mask (os.umask has no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path, data: bytes | Callable[[BinaryIO], None],
                     before_replace: Callable[[str], None] | None = None) -> None:
    """Write `data` (bytes, or a function that writes into the open binary file) to a temporary file in
    path's folder, call before_replace(temporary path) if given (it may raise to abandon the write), then
    rename it over `path`: readers never see half a file, and a run that dies leaves the old file."""
    path = os.fspath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
        if before_replace:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_images(x, path, columns: int | None = None, labels=None) -> None:
    """Save samples x (float [N, C, H, W] in [-1, 1]) as a .png grid (C = 1 or 3; `columns` as image_grid) or a
    .npz whose arr_0 is uint8 [N, H, W, C] (and arr_1 the labels, if given), both written atomically."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {x.shape}")
    pixels, suffix = to_uint8(x), os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=pixels.transpose(0, 2, 3, 1), **({} if labels is None else {"arr_1": np.asarray(labels)}))
        data = buffer.getvalue()
    elif suffix == ".png":
        if x.shape[1] not in (1, 3):
            raise ValueError(f"a .png needs 1 or 3 channels, the images have {x.shape[1]}; use .npz")
        data = png(image_grid(pixels, columns=columns))
    else:
        raise ValueError(f"unknown image format {suffix!r} for {os.fspath(path)}; use .png or .npz")
    write_atomically(path, data)

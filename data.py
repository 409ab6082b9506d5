"""Data sets for training and evaluation: scikit-learn's 8x8 digits (the default, bundled with scikit-learn),
image folders, cifar-10-batches-py folders and .npz arrays, as uint8 NCHW images with optional labels."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .ddpm import TrainConfig, UserError, to_model_range

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_digits_data(labels: bool = False):
    """scikit-learn's bundled 8x8 digits (17 grey levels 0..16) as uint8 [N, 1, 8, 8] on 0..255, split
    into 1437 training and 360 held-out images by a fixed permutation: (train, held_out), or with labels
    (train, held_out, train_labels, held_out_labels), the digit of each image as int64."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    order = np.random.RandomState(0).permutation(len(images))
    train, held = order[:-360], order[-360:]
    split = (images[train], images[held])
    return (*split, digits.target[train].astype(np.int64), digits.target[held].astype(np.int64)) if labels else split


@dataclasses.dataclass
class Data:
    """A data set's two splits: uint8 NCHW images and, where the data has them, int64 labels 0..K-1 with
    their class names (labels None and no classes otherwise)."""
    train: np.ndarray
    held_out: np.ndarray
    train_labels: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None
    classes: list = dataclasses.field(default_factory=list)


def _load_image_folder(path, image_size: int | None):
    """(images, labels, classes): labels from the first-level subfolder names, sorted (torchvision's
    ImageFolder), when every image sits in one; None and [] otherwise."""
    from PIL import Image
    from pathlib import Path
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path}: no .png/.jpg/.jpeg images found (searched recursively)")
    images, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = "L" if im.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
                modes.add(mode)
                im = im.convert(mode)
        except OSError as e:
            raise UserError(f"{f}: unreadable image ({e})") from None
        if len(modes) > 1:
            raise UserError(f"{path}: mixed grey and colour images (first mismatch: {f}); use one mode")
        if image_size:
            s = image_size / min(im.size)  # resize the short side, then centre-crop a square
            im = im.resize((max(image_size, round(im.width * s)), max(image_size, round(im.height * s))),
                           Image.BICUBIC)
            left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        images.append(np.asarray(im, dtype=np.uint8))
    if len({a.shape for a in images}) > 1:
        raise UserError(f"{path}: images of different sizes; pass --image-size to resize and crop them")
    arr = np.stack(images)
    folders = [f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else None for f in files]
    classes = sorted(set(folders)) if None not in folders else []
    labels = np.array([classes.index(c) for c in folders], dtype=np.int64) if classes else None
    return (arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)), labels, classes


def _load_cifar_folder(path) -> Data:
    import pickle
    from pathlib import Path

    def read(name):
        with open(Path(path) / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)
    try:
        train = [read(f"data_batch_{i}") for i in range(1, 6)]
        held, held_labels = read("test_batch")
    except Exception as e:  # a foreign pickle fails in many ways
        raise UserError(f"{path}: not a readable cifar-10-batches-py folder ({type(e).__name__}: {e})") from None
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Data(np.concatenate([a for a, _ in train]), held, np.concatenate([y for _, y in train]), held_labels, classes)


def load_npz(path):
    """(images, labels): uint8 images under arr_0 (or the first array), labels under arr_1 if there
    (the convention of OpenAI's sample files), else None."""
    try:
        with np.load(path) as f:
            arr = f["arr_0"] if "arr_0" in f else f[list(f.keys())[0]]
            labels = f["arr_1"] if "arr_0" in f and "arr_1" in f else None
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"{path}: not a readable .npz image array ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise UserError(f"{path}: expected uint8 images [N, H, W] or [N, H, W, C], got {arr.dtype} {arr.shape}")
    if labels is not None and (labels.shape != (len(arr),) or labels.dtype.kind not in "iu" or labels.min() < 0):
        raise UserError(f"{path}: arr_1 must hold one label >= 0 per image, got {labels.dtype} {labels.shape}")
    return (arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)), labels


def load_data(data: str = "digits", image_size: int | None = None) -> Data:
    """The splits of data: "digits", a folder of PNG/JPEG images (labelled by first-level subfolder), a
    cifar-10-batches-py folder, or a .npz file (uint8 NHWC under arr_0, labels under arr_1). Folders and
    .npz files keep their last 5% (at least 1 image) as the held-out split."""
    if data == "digits":
        return Data(*load_digits_data(labels=True), classes=[str(d) for d in range(10)])
    if not os.path.exists(data):
        raise UserError(f"{data}: no such file or folder (use 'digits', an image folder, a cifar-10-batches-py folder or a .npz)")
    if os.path.isdir(data) and os.path.exists(os.path.join(data, "data_batch_1")):
        return _load_cifar_folder(data)
    if os.path.isdir(data):
        arr, labels, classes = _load_image_folder(data, image_size)
    else:
        arr, labels = load_npz(data)
        classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None else []
    held = max(1, len(arr) // 20) if len(arr) > 1 else 0
    split = (lambda a: (a[:-held], a[-held:])) if held else (lambda a: (a, a))  # noqa: E731
    train_labels, held_labels = split(labels) if labels is not None else (None, None)
    return Data(*split(arr), train_labels, held_labels, classes)


def load_dataset(data: str = "digits", image_size: int | None = None):
    """(train, held_out) uint8 NCHW numpy arrays of load_data(data, image_size)."""
    d = load_data(data, image_size)
    return d.train, d.held_out


def calibration_images(cfg: TrainConfig, n: int = 512) -> np.ndarray:
    """n training images of the run's data set (a fixed random choice), float32 NCHW in [-1, 1]: what an int8
    export is calibrated and checked on."""
    train_split = load_data(cfg.data, cfg.image_size).train
    pick = np.random.default_rng(0).permutation(len(train_split))[:n]
    return to_model_range(torch.from_numpy(train_split[pick])).numpy()


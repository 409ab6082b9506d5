"""The digits FD: the Frechet distance between generated and real 8x8 digits in the features of a small
digits classifier (the digits analogue of FID), and that classifier's labels for class agreement."""
from __future__ import annotations

import numpy as np
import torch

from .data import load_digits_data
from .ddpm import to_model_range, to_uint8


def digits_features():
    """A feature map for 8x8 digits: the 64-unit hidden layer of a small classifier trained on the
    training split, deterministically (fixed seed, full-batch, float64, CPU). The digits analogue of the
    Inception features of FID: it measures what this classifier sees, and nothing about other data.
    features.classify(images) is that classifier's digit for each image."""
    train, _, train_labels, _ = load_digits_data(labels=True)
    labels = torch.from_numpy(train_labels)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.nn.Linear(64, 64, dtype=torch.float64)
    head = torch.nn.Linear(64, 10, dtype=torch.float64)
    for layer in (hidden, head):
        torch.nn.init.normal_(layer.weight, std=0.1, generator=gen)
        torch.nn.init.zeros_(layer.bias)
    x = to_model_range(torch.from_numpy(train)).reshape(len(train), -1).double()
    opt = torch.optim.Adam([*hidden.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(torch.tanh(hidden(x))), labels)
        loss.backward()
        opt.step()

    def features(images_uint8: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            flat = to_model_range(torch.from_numpy(images_uint8)).reshape(len(images_uint8), -1).double()
            return torch.tanh(hidden(flat)).numpy()
    features.classify = lambda images_uint8: head(torch.from_numpy(features(images_uint8))).argmax(1).numpy()
    return features


def digits_cnn_features():
    """A second feature map for 8x8 digits: the 64-unit layer of a small convolutional classifier (3x3 convolutions
    of 16 and 32 channels, 2x2 max pooling, a dense layer) trained on the training split like digits_features
    (fixed seed, full-batch Adam, CPU). Where the MLP sees the image as one vector, this one sees local shapes: the
    stray grey of a background, a broken stroke. features.classify(images) is its classifier's digit."""
    train, _, train_labels, _ = load_digits_data(labels=True)
    labels = torch.from_numpy(train_labels)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(512, 64),
                              torch.nn.Tanh())
    head = torch.nn.Linear(64, 10)
    x = to_model_range(torch.from_numpy(train))
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(net(x)), labels).backward()
        opt.step()

    def features(images_uint8: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(to_model_range(torch.from_numpy(images_uint8))).double().numpy()
    features.classify = lambda images_uint8: head(torch.from_numpy(features(images_uint8)).float()).argmax(1).numpy()
    return features


FEATURES = {"mlp": digits_features, "cnn": digits_cnn_features}  # `ddpm fd --features`


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets;
    the trace of the root is the sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), which is symmetric."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


class DigitsFd:
    """The digits FD of uint8 [N, 1, 8, 8] images against the training split, with its real-vs-real floor (the
    held-out split's FD) and, given labels, the share of images the features' classifier assigns to them."""

    def __init__(self, features: str = "mlp"):
        self.features = FEATURES[features]()
        train, held = load_digits_data()
        self.ref, self.n_floor = self.features(train), len(held)
        self.floor = frechet_distance(self.features(held), self.ref)

    def __call__(self, pixels: np.ndarray, labels=None) -> tuple[float, float | None]:
        accuracy = None if labels is None else float((self.features.classify(pixels) == labels).mean())
        return frechet_distance(self.features(pixels), self.ref), accuracy


def fd_of_samples():
    """samples (float in [-1, 1] or uint8, [N, 1, 8, 8]) -> their FD to the digits training split (`ddpm fd`)."""
    metric = DigitsFd()
    return lambda samples: metric(to_uint8(samples))[0]


# The tables of `ddpm fd` (BENCHMARKS.md): the DDIM table's steps and etas, the guidance table's classifier-free
# scales, and the NFE table's rows (name, sampler options, steps for each NFE column).
FD_TABLE_STEPS, FD_TABLE_ETAS = (10, 20, 50, 100, 1000), (0.0, 0.5, 1.0)
GUIDANCE_TABLE = (0.0, 1.0, 1.5, 2.0, 3.0)
NFE_COLUMNS = (5, 10, 20, 50, 100, 1000)
NFE_ROWS = (("ancestral", {"sampler": "ancestral"}, NFE_COLUMNS),
            ("DDIM, eta = 0", {"sampler": "ddim"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M)", {"sampler": "dpmpp2m"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M), logsnr spacing", {"sampler": "dpmpp2m", "spacing": "logsnr"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(2M) SDE", {"sampler": "dpmpp2m-sde"}, NFE_COLUMNS[:-1]),
            ("DPM-Solver++(3M)", {"sampler": "dpmpp3m"}, NFE_COLUMNS[:-1]),
            ("UniPC (order 3, bh2)", {"sampler": "unipc"}, NFE_COLUMNS[:-1]),
            ("PC: ancestral + 1 Langevin step", {"sampler": "ancestral", "corrector_steps": 1}, (3, 5, 10, 25, 50)))


def fd_table_markdown(rows: dict, columns, label: str, floor: float, n: int) -> str:
    """rows: name -> [(fd, network calls)] filling the first columns (the last, for a row of one cell)."""
    lines = ["| sampler | " + " | ".join(f"{label} = {c}" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        cells = cells if len(cells) > 1 else [None] * (len(columns) - 1) + cells
        text = ["" if c is None else f"{c[0]:.3f}" + ("" if c[1] == col or label == "S" else f" ({c[1]})")
                for c, col in zip(cells + [None] * (len(columns) - len(cells)), columns)]
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    return "\n".join(lines) + (f"\n\nreal-vs-real floor (360 held-out vs training): {floor:.3f}; {n} samples per cell"
                               + ("; (k): the cell's network calls where they differ from its column" if label == "NFE" else ""))

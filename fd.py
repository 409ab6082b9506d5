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


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets;
    the trace of the root is the sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), which is symmetric."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)

def fd_of_samples():
    """samples (float in [-1, 1] or uint8, [N, 1, 8, 8]) -> their FD to the digits training split (`ddpm fd`)."""
    features = digits_features()
    ref = features(load_digits_data()[0])
    return lambda samples: frechet_distance(features(to_uint8(samples)), ref)


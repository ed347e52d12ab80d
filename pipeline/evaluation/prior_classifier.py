"""Classifier two-sample test: can a small CNN tell prior draws from real galaxies?

Both sets are cut to the same size n (the larger one subsampled) and each is split in halves by a
seeded permutation: a classifier with a fixed architecture and budget is trained on the first halves
(label 1 = draws, 0 = data) and scores the held-out halves. Its AUC there is the Mann-Whitney
statistic U / (n1 n2). Under H0 (draws and data from the same law) the held-out scores of both
classes are exchangeable, whatever the classifier learned from its separate training split, so the
AUC has the Mann-Whitney null: mean 1/2, sd sqrt((n1 + n2 + 1) / (12 n1 n2)) (no ties), close to
normal. The p-value is one-sided (only AUC > 1/2 is evidence against H0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

from pipeline.evaluation.prior_fidelity import as_stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierBudget:
    """The classifier's fixed architecture and training budget (set before any data is seen)."""

    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; 2x2 max-pool after every block but the last
    epochs: int = 30  # passes over the training halves
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam L2 penalty


def classifier_network(channels: tuple[int, ...]) -> nn.Sequential:
    """Conv3x3-ReLU blocks (2x2 max-pool between them), global average pool, a linear logit."""
    layers, c_in = [], 1
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 1))


def auc(scores_pos, scores_neg) -> float:
    """Area under the ROC curve = Mann-Whitney U / (n1 n2): the probability that a positive scores above
    a negative (ties count 1/2)."""
    pos, neg = np.asarray(scores_pos, np.float64), np.asarray(scores_neg, np.float64)
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def auc_null(n1: int, n2: int, auc_value: float | None = None) -> dict:
    """The AUC null of exchangeable scores (normal approximation of the Mann-Whitney law): its mean,
    sd, one-sided 95th percentile and, given ``auc_value``, the one-sided p-value P(AUC >= auc_value)."""
    sd = float(np.sqrt((n1 + n2 + 1) / (12.0 * n1 * n2)))
    out = {"mean": 0.5, "sd": sd, "p95": 0.5 + float(stats.norm.ppf(0.95)) * sd}
    if auc_value is not None:
        out["p_value"] = float(stats.norm.sf((auc_value - 0.5) / sd))
    return out


def split_halves(n_draws: int, n_data: int, seed: int) -> dict:
    """Indices of the fixed split: n = min(n_draws, n_data) of each set (seeded permutation), the first
    n // 2 to train on and the remaining n - n // 2 held out."""
    rng = np.random.default_rng(seed)
    n = min(n_draws, n_data)
    pick_d, pick_r = rng.permutation(n_draws)[:n], rng.permutation(n_data)[:n]
    h = n // 2
    return {"train_draws": pick_d[:h], "train_data": pick_r[:h], "held_draws": pick_d[h:], "held_data": pick_r[h:]}


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random flip/transpose of the whole batch (the eight symmetries of the square pixel grid)."""
    flips = torch.randint(0, 2, (3,), generator=gen).tolist()
    if flips[0]:
        x = x.flip(-1)
    if flips[1]:
        x = x.flip(-2)
    return x.transpose(-1, -2) if flips[2] and x.shape[-1] == x.shape[-2] else x


def _train(x: torch.Tensor, y: torch.Tensor, budget: ClassifierBudget, gen: torch.Generator) -> tuple[nn.Module, float]:
    net = classifier_network(budget.channels)
    opt = torch.optim.Adam(net.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    loss_fn, loss = nn.BCEWithLogitsLoss(), torch.tensor(float("nan"))
    for epoch in range(budget.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), budget.batch_size):
            idx = order[start:start + budget.batch_size]
            loss = loss_fn(net(_dihedral(x[idx], gen))[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == budget.epochs:
            log.info("classifier epoch %d/%d: training loss %.4f", epoch + 1, budget.epochs, loss.item())
    return net, loss.item()


def classifier_two_sample_test(draws, data, seed: int = 0, budget: ClassifierBudget = ClassifierBudget()) -> dict:
    """Train the fixed CNN to tell ``draws`` (n, H, W) from ``data`` (m, H, W) on the training halves of
    :func:`split_halves` and return the held-out AUC with its null (:func:`auc_null`) and the settings.

    Inputs are mapped to asinh(x / s), s = 1.4826 x the median absolute deviation of the pooled training
    pixels (about the background noise; bright cores are compressed logarithmically). Deterministic given
    ``seed``: the network's initialisation, batches and flips come from seeded generators and torch runs on
    one thread (restored afterwards).
    """
    draws, data = as_stack(draws, "draws"), as_stack(data, "data")
    if min(len(draws), len(data)) < 4:
        raise ValueError(f"the classifier test needs >= 4 images per set, got {len(draws)} draws and {len(data)} data")
    split = split_halves(len(draws), len(data), seed)
    x_train = np.concatenate([draws[split["train_draws"]], data[split["train_data"]]])
    pix = x_train.ravel()
    s = max(1.4826 * float(np.median(np.abs(pix - np.median(pix)))), 1e-12)

    def tensor(a):
        return torch.from_numpy(np.arcsinh(a / s)).float()[:, None]

    y_train = torch.cat([torch.ones(len(split["train_draws"])), torch.zeros(len(split["train_data"]))])
    threads, t0 = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, last_loss = _train(tensor(x_train), y_train, budget, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            score_d = net(tensor(draws[split["held_draws"]]))[:, 0].numpy()
            score_r = net(tensor(data[split["held_data"]]))[:, 0].numpy()
    finally:
        torch.set_num_threads(threads)
    value = auc(score_d, score_r)
    null = auc_null(len(score_d), len(score_r), value)
    return {"auc": value, "null_mean": null["mean"], "null_sd": null["sd"], "null_p95": null["p95"],
            "p_value": null["p_value"], "rejects_at_0.05": bool(null["p_value"] < 0.05),
            "n_train_per_set": len(split["train_draws"]), "n_heldout_per_set": len(split["held_draws"]),
            "seed": int(seed), "input_scale": s, "final_train_loss": last_loss, "threads": 1,
            "seconds": round(time.perf_counter() - t0, 1),
            "budget": {**asdict(budget), "channels": list(budget.channels), "optimizer": "Adam",
                       "loss": "BCE with logits", "augment": "random dihedral flip per batch"},
            "split": "seeded permutation of each set; n = min(sizes); first n//2 train, rest held out"}

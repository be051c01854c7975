"""Streaming statistics of features, as sums that add across batches and ranks; no image or feature is kept.

FeatureStats holds float64 sums of the features and of their outer products (EDM2's accumulation): the mean and
covariance of any number of images in O(d^2) memory. InceptionScoreStats holds, per split, the sum of p(y|x) and
of sum_y p(y|x) log p(y|x); a sample's split is its seed index modulo the number of splits, so the score depends
neither on the batch size nor on how the samples were dealt to ranks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(*tensors: Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


class FeatureStats:
    """Mean and unbiased covariance of the features passed to `update`; `all_reduce()` once, after the last one.
    `device` holds the sums: the features' device, which the process group's backend must be able to reduce."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # exact up to 2^53 samples

    def update(self, features: Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), found {tuple(features.shape)}")
        f = features.to(self.sum.device, torch.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def all_reduce(self) -> None:
        _all_reduce(self.sum, self.outer, self.count)

    @property
    def n(self) -> int:
        return int(self.count.item())

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("no features were accumulated")
        return (self.sum / self.count).cpu().numpy()

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, found {self.n}")
        mu = self.sum / self.count
        return ((self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)).cpu().numpy()


class InceptionScoreStats:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split (Salimans et al. 2016), from logits; `score()` gives the mean and
    the standard deviation over splits with ddof=0, as the original code and torch-fidelity report it
    (torchmetrics divides by splits - 1)."""

    def __init__(self, classes: int = 1008, splits: int = 10, device: str | torch.device = "cpu"):
        self.classes, self.splits = classes, splits
        self.p_sum = torch.zeros(splits, classes, dtype=torch.float64, device=device)
        self.p_log_p_sum = torch.zeros(splits, dtype=torch.float64, device=device)
        self.count = torch.zeros(splits, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, ids: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.classes or ids.shape != logits.shape[:1]:
            raise ValueError(f"logits must be (B, {self.classes}) with B ids, found {tuple(logits.shape)} and "
                             f"{tuple(ids.shape)}")
        device = self.count.device
        log_p = torch.log_softmax(logits.to(device, torch.float64), dim=1)
        p = log_p.exp()
        split = ids.to(device, torch.int64) % self.splits
        self.p_sum.index_add_(0, split, p)
        self.p_log_p_sum.index_add_(0, split, (p * log_p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def all_reduce(self) -> None:
        _all_reduce(self.p_sum, self.p_log_p_sum, self.count)

    def score(self) -> tuple[float, float]:
        if bool((self.count == 0).any()):
            raise ValueError(f"every one of the {self.splits} splits needs a sample, found "
                             f"{self.count.to(torch.int64).tolist()}")
        marginal = self.p_sum / self.count[:, None]  # p(y) of each split
        # E_x KL(p(y|x) || p(y)) = E_x sum_y p log p - sum_y p(y) log p(y), since p(y) is E_x p(y|x)
        kl = self.p_log_p_sum / self.count - torch.special.xlogy(marginal, marginal).sum(1)
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())

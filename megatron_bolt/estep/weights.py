"""Importance weights, resampling and ELBO estimates for one chunk's K latent samples (bolt-method.md).

For samples z_1..z_K ~ q(z | x) with log w_k = log p(z_k, x) - log q(z_k | x):
- resampling picks k with probability softmax(log w)_k (sampling-importance-resampling: K = 1 returns a
  draw from q, K -> infinity a draw from the posterior p(z | x));
- logsumexp(log w[:n]) - log n is a stochastic lower bound on log p(x) whose expectation rises with n;
- the effective sample size (sum w)^2 / sum w^2 lies in [1, K].
Invalid samples (unfinished generations) carry log w = -inf: they can never be picked.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def log_weights(log_p: list[float | None], log_q: list[float | None]) -> list[float]:
    """log p - log q per sample; a missing side (None) makes the sample invalid (-inf)."""
    return [p - q if p is not None and q is not None else -math.inf for p, q in zip(log_p, log_q, strict=True)]


def chunk_key(purpose: str, seed: int, doc_id: int, chunk_index: int) -> int:
    """A 64-bit integer that depends only on its arguments: per-chunk randomness is the same in any shard."""
    digest = hashlib.sha256(f"bolt-{purpose}/{seed}/{doc_id}/{chunk_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def chunk_rng(seed: int, doc_id: int, chunk_index: int) -> np.random.Generator:
    """The resampling generator of one chunk."""
    return np.random.default_rng(chunk_key("resample", seed, doc_id, chunk_index))


def normalized(log_w: list[float]) -> np.ndarray | None:
    """softmax(log w), or None when every sample is invalid."""
    lw = np.asarray(log_w, dtype=np.float64)
    top = lw.max(initial=-math.inf)
    if not math.isfinite(top):
        return None
    w = np.exp(lw - top)
    return w / w.sum()


def resample(log_w: list[float], rng: np.random.Generator) -> int | None:
    """Index drawn from softmax(log w) (inverse CDF of one uniform), or None when no sample is valid."""
    probs = normalized(log_w)
    if probs is None:
        return None
    u = rng.random()
    return int(min(np.searchsorted(np.cumsum(probs), u, side="right"), len(probs) - 1))


def effective_sample_size(log_w: list[float]) -> float:
    probs = normalized(log_w)
    return 0.0 if probs is None else float(1.0 / np.square(probs).sum())


def elbo(log_w: list[float], n: int) -> float:
    """logsumexp(log w[:n]) - log n (-inf when none of the first n is valid)."""
    if not 1 <= n <= len(log_w):
        raise ValueError(f"n={n} needs 1 <= n <= K={len(log_w)}")
    head = np.asarray(log_w[:n], dtype=np.float64)
    top = head.max()
    if not math.isfinite(top):
        return -math.inf
    return float(top + math.log(np.exp(head - top).sum()) - math.log(n))


ELBO_NS = (1, 2, 4)


def elbo_estimates(log_w: list[float]) -> dict[str, float]:
    """{"1": ..., "2": ..., "4": ...} for every n in ELBO_NS that K allows."""
    return {str(n): elbo(log_w, n) for n in ELBO_NS if n <= len(log_w)}

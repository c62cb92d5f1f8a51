"""Importance weights, resampling and ELBO estimates against brute-force enumeration on a toy model.

The toy: latents are the strings of length 1-2 over {a, b} (6 latents), with explicit tables p(z, x) and
q(z | x). Everything the E-step computes has an exact expectation obtained by enumerating all K-tuples of
samples; the Monte-Carlo behaviour of our functions must match it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from megatron_bolt.estep import weights

LATENTS = ["a", "b", "aa", "ab", "ba", "bb"]


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    joint = rng.dirichlet(np.ones(len(LATENTS))) * 0.3  # p(z, x): p(x) = 0.3
    q = 0.3 * joint / 0.3 + 0.7 * rng.dirichlet(np.ones(len(LATENTS)))  # a proposal that covers the posterior
    return {"q": q, "log_q": np.log(q), "log_p": np.log(joint), "posterior": joint / joint.sum(),
            "log_px": math.log(joint.sum())}


def sir_law(toy, k: int) -> np.ndarray:
    """Exact law of the resampled latent with K samples: sum over all K-tuples of q-probability x softmax(w)."""
    law = np.zeros(len(LATENTS))
    for tup in itertools.product(range(len(LATENTS)), repeat=k):
        prob = np.prod(toy["q"][list(tup)])
        log_w = [toy["log_p"][i] - toy["log_q"][i] for i in tup]
        for pos, i in enumerate(tup):
            law[i] += prob * weights.normalized(log_w)[pos]
    return law


def expected(toy, k: int, fn) -> float:
    return sum(np.prod(toy["q"][list(tup)]) * fn([toy["log_p"][i] - toy["log_q"][i] for i in tup])
               for tup in itertools.product(range(len(LATENTS)), repeat=k))


def tv(a, b) -> float:
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def test_log_weights_and_invalid_samples():
    assert weights.log_weights([-3.0, None, -1.0], [-2.0, -1.0, None]) == [-1.0, -math.inf, -math.inf]
    rng = np.random.default_rng(1)
    assert all(weights.resample([-math.inf, 0.5, -math.inf], rng) == 1 for _ in range(50))
    assert weights.resample([-math.inf, -math.inf], rng) is None
    assert weights.effective_sample_size([-math.inf] * 3) == 0.0
    assert weights.effective_sample_size([2.0, 2.0, 2.0, 2.0]) == pytest.approx(4.0)
    assert weights.effective_sample_size([0.0, -math.inf, -math.inf]) == pytest.approx(1.0)
    assert weights.effective_sample_size([0.0, math.log(3.0)]) == pytest.approx(16 / 10)


def test_resampling_law_matches_enumeration(toy):
    rng = np.random.default_rng(7)
    for k in (1, 2, 3):
        exact = sir_law(toy, k)
        assert exact.sum() == pytest.approx(1.0)
        trials = 30000
        counts = np.zeros(len(LATENTS))
        draws = rng.choice(len(LATENTS), size=(trials, k), p=toy["q"])
        for tup in draws:
            pick = weights.resample([toy["log_p"][i] - toy["log_q"][i] for i in tup], rng)
            counts[tup[pick]] += 1
        assert tv(counts / trials, exact) < 0.015, f"K={k}"
    np.testing.assert_allclose(sir_law(toy, 1), toy["q"], atol=1e-12)  # K = 1 returns a draw from q


def test_more_samples_move_the_choice_toward_the_posterior(toy):
    distances = [tv(sir_law(toy, k), toy["posterior"]) for k in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances
    rng = np.random.default_rng(3)
    counts = np.zeros(len(LATENTS))
    for _ in range(4000):
        tup = rng.choice(len(LATENTS), size=64, p=toy["q"])
        counts[tup[weights.resample([toy["log_p"][i] - toy["log_q"][i] for i in tup], rng)]] += 1
    assert tv(counts / 4000, toy["posterior"]) < min(0.04, distances[-1])


def test_elbo_estimates_match_enumeration_and_bound_log_px(toy):
    exact_elbo = float(np.sum(toy["q"] * (toy["log_p"] - toy["log_q"])))
    assert expected(toy, 1, lambda lw: weights.elbo(lw, 1)) == pytest.approx(exact_elbo, abs=1e-12)
    bounds = [expected(toy, n, lambda lw, n=n: weights.elbo(lw, n)) for n in (1, 2, 4)]
    assert bounds[0] < bounds[1] < bounds[2] < toy["log_px"]
    lw = [-1.0, -2.0, -0.5, -3.0]
    est = weights.elbo_estimates(lw)
    assert set(est) == {"1", "2", "4"}
    assert est["2"] == pytest.approx(math.log((math.exp(-1) + math.exp(-2)) / 2))
    assert est["4"] == pytest.approx(math.log(sum(math.exp(x) for x in lw) / 4))
    assert set(weights.elbo_estimates([0.0, 1.0])) == {"1", "2"}
    assert weights.elbo([-math.inf, 0.0], 1) == -math.inf
    with pytest.raises(ValueError, match="n=3"):
        weights.elbo([0.0, 0.0], 3)


def test_chunk_rng_depends_only_on_its_key():
    a = weights.chunk_rng(0, 12, 3).random(4)
    assert np.array_equal(a, weights.chunk_rng(0, 12, 3).random(4))
    assert not np.array_equal(a, weights.chunk_rng(0, 12, 4).random(4))
    assert not np.array_equal(a, weights.chunk_rng(1, 12, 3).random(4))

"""The fast calibration statistics give the slow ones' answers: amax_entropy (all clipping points at once)
against pytorch-quantization's loop written out here, and abs_bin_counts (AbsHistogram.add's binning)
against np.histogram, bin edges and float rounding included. Correctness only: timings are in the report."""

from __future__ import annotations

import numpy as np
import pytest

from trtnet.quant.histogram import FAST_BINNING_MAX_BINS, AbsHistogram, abs_bin_counts, amax_entropy


# -- entropy -----------------------------------------------------------------------------------------
def _kl_like_scipy(p: np.ndarray, q: np.ndarray) -> float:
    """scipy.stats.entropy(p, q): both normalized, sum of p log(p / q), inf where q is 0 and p is not. A Q with
    no count at all is inf too (scipy gives nan there, which pytorch-quantization's argmin would pick)."""
    if q.sum() == 0:
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    total = 0.0
    for pj, qj in zip(p, q):
        if pj > 0:
            if qj == 0:
                return float("inf")
            total += pj * np.log(pj / qj)
    return total


def entropy_by_the_book(counts, edges, num_bits: int = 8, start_bin: int = 128) -> tuple[float, np.ndarray]:
    """pytorch-quantization's _compute_amax_entropy (calib/histogram.py, stride 1) one clipping point at a
    time: the amax and every divergence. Its per-bin Python loops are bincounts here, same sums."""
    bins = np.array(counts, dtype=np.float64)
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    first = min(start_bin, bins.size)  # pytorch-quantization has no clipping point at all below start_bin bins
    divergences = []
    for i in range(first, bins.size + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(np.arange(i), space) - 1
        kept = bins[:i] != 0
        density = np.bincount(digitized[kept], weights=bins[:i][kept], minlength=nbins)
        members = np.bincount(digitized[kept], minlength=nbins)
        q = np.zeros(i)
        q[kept] = density[digitized[kept]] / members[digitized[kept]]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        divergences.append(_kl_like_scipy(p, q))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[first + last_argmin]), divergences


def _edges(size: int, width: float = 0.01) -> np.ndarray:
    return np.arange(size + 1, dtype=np.float64) * width


def _laplace(seed: int, bins: int = 2048) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.abs(rng.laplace(0, 1, 200_000)) * (rng.uniform(size=200_000) > 0.3)  # ReLU-like zeros
    values = np.concatenate([values, rng.uniform(0, 60, 3 + seed)])  # a sparse tail: empty bins between
    return np.histogram(values, bins=bins, range=(0, values.max()))[0]


def _grown(seed: int) -> AbsHistogram:
    """2048 bins from a first batch, then grown past 3000 by a batch with larger values."""
    rng = np.random.default_rng(seed)
    h = AbsHistogram()
    h.add(rng.normal(0, 1, 50_000).astype(np.float32))
    h.add(rng.normal(0, 1.7, 50_000).astype(np.float32))
    assert h.counts.size > 3000
    return h


def _counts_and_edges(h: AbsHistogram) -> tuple[np.ndarray, np.ndarray]:
    return h.counts, h.edges


def _sparse(seed: int, size: int = 700) -> np.ndarray:
    rng = np.random.default_rng(seed)
    decaying = rng.poisson(200 * np.exp(-np.arange(size) / 80))
    return decaying * (rng.uniform(size=size) > 0.5)  # about half the bins emptied besides


CASES = {
    **{f"laplace{seed}": (lambda seed=seed: (_laplace(seed), _edges(2048))) for seed in range(3)},
    **{f"grown{seed}": (lambda seed=seed: _counts_and_edges(_grown(seed))) for seed in range(2)},
    **{f"sparse{seed}": (lambda seed=seed: (_sparse(seed), _edges(700))) for seed in range(2)},
    "small counts": lambda: (np.random.default_rng(7).poisson(3 * np.exp(-np.arange(900) / 300)), _edges(900)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entropy_amax_is_the_reference_loops(case):
    counts, edges = CASES[case]()
    expected, divergences = entropy_by_the_book(counts, edges)
    assert amax_entropy(counts, edges) == expected
    assert np.isfinite(divergences).sum() > 10  # the cases do compare real minima, not an all-inf scan


def test_entropy_with_fewer_levels_and_an_earlier_start_is_the_reference_loops():
    """6 bits (32 levels) from bin 16: clipping points below the level count, where a level can be empty."""
    counts, edges = _laplace(0, 300), _edges(300)
    assert amax_entropy(counts, edges, num_bits=6, start_bin=16) == entropy_by_the_book(counts, edges, 6, 16)[0]


def test_closed_form_divergences_match_the_reference_loops_to_1e_12():
    """KL_TIE_TOLERANCE (1e-9) must dwarf the closed form's rounding: every clipping point's divergence."""
    from trtnet.quant import histogram

    counts = _grown(1).counts
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    running = histogram._Prefix(np.concatenate([[0.0], np.cumsum(bins)]), np.concatenate([[0], np.cumsum(bins != 0)]))
    fast = histogram._divergences(bins, running, np.arange(128, bins.size + 1), 128)
    slow = entropy_by_the_book(counts, _edges(counts.size))[1]
    assert np.array_equal(np.isinf(fast), np.isinf(slow))
    finite = np.isfinite(slow)
    assert np.max(np.abs(fast[finite] - slow[finite])) < 1e-12


def test_entropy_keeps_the_full_range_when_every_value_has_one_magnitude():
    """All counts in the last bin: below it Q holds nothing (no candidate); at 2048 Q = P, KL 0. (Here scipy's
    nan would make pytorch-quantization's argmin return edges[2047]; a nan divergence never wins here.)"""
    counts = np.zeros(2048, np.int64)
    counts[-1] = 1000
    assert amax_entropy(counts, _edges(2048)) == _edges(2048)[-1]


def test_entropy_tie_goes_to_the_larger_clip():
    """128 ones and an empty bin 128: clipping at 128 or 129 both give Q = P (KL 0); the last one wins."""
    counts = np.append(np.ones(128, np.int64), 0)
    assert amax_entropy(counts, _edges(129)) == _edges(129)[129]


def test_entropy_never_clips_where_q_is_empty_but_p_is_not():
    """128 ones, an empty bin, then 5: clipping at 129 folds 5 into the empty bin 128 (Q 0 there: inf); 128 folds
    it onto a one (finite, > 0); 130 is exact (KL 0) and wins."""
    counts = np.concatenate([np.ones(128, np.int64), [0, 5]])
    assert amax_entropy(counts, _edges(130)) == _edges(130)[130]
    _, divergences = entropy_by_the_book(counts, _edges(130))
    assert np.isinf(divergences[1]) and divergences[0] > 0 == divergences[2]


def test_entropy_of_fewer_bins_than_the_start_is_the_whole_range():
    assert amax_entropy(np.array([3, 1, 4, 1, 5]), _edges(5)) == _edges(5)[5]


# -- binning -----------------------------------------------------------------------------------------
def _np_counts(a: np.ndarray, bins: int, top: float) -> np.ndarray:
    return np.histogram(np.abs(np.asarray(a, np.float32)), bins=bins, range=(0.0, top))[0]


def _on_and_beside_the_edges(bins: int, top: float) -> np.ndarray:
    """Every float32 edge np.histogram uses, the float32 next to it on each side, both signs, and 0, -0."""
    edges = np.histogram_bin_edges(np.zeros(0, np.float32), bins=bins, range=(0.0, top))
    near = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(0))])
    near = near[(near >= 0) & (near <= np.float32(top))]
    return np.concatenate([near, -near, [0.0, -0.0]]).astype(np.float32)


@pytest.mark.parametrize("bins, top", [(4, 1.0), (2048, 0.1 * 7), (2053, 3.3), (5000, 1e-6), (3, 7.0 / 3)])
def test_bin_counts_are_np_histograms_on_and_beside_every_edge(bins, top):
    a = _on_and_beside_the_edges(bins, top)
    assert abs_bin_counts(a, bins, top).tolist() == _np_counts(a, bins, top).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_bin_counts_are_np_histograms_on_activations(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(300_000) * rng.choice([0.0, 1.0, 30.0], 300_000)).astype(np.float32)  # zeros, outliers
    top = float(np.abs(x).max())
    for bins, reach in ((2048, top), (2048, top * 1.37), (2111, top * 2)):  # the last: a grown histogram
        assert np.array_equal(abs_bin_counts(x, bins, reach), _np_counts(x, bins, reach))


def test_bin_counts_put_the_top_in_the_last_bin():
    assert abs_bin_counts(np.array([0.0, 0.5, -1.0, 1.0], np.float32), 4, 1.0).tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("bins, top", [(FAST_BINNING_MAX_BINS + 1, 1.0), (16, 1e-32)])
def test_bin_counts_outside_the_fast_path_are_np_histograms(bins, top):
    a = np.random.default_rng(0).uniform(-top, top, 10_000).astype(np.float32)
    assert np.array_equal(abs_bin_counts(a, bins, top), _np_counts(a, bins, top))


def test_add_counts_each_batch_as_np_histogram_over_the_grown_range():
    rng = np.random.default_rng(5)
    batches = [rng.normal(0, s, 40_000).astype(np.float32) for s in (1.0, 0.5, 3.0, 2.0)]
    h = AbsHistogram()
    expected = np.zeros(0, np.int64)
    for x in batches:
        h.add(x)
        expected = np.pad(expected, (0, h.counts.size - expected.size))
        expected += _np_counts(x, h.counts.size, h.counts.size * h.width)
    assert h.counts.size > 2048
    assert np.array_equal(h.counts, expected)
    assert h.max == max(float(np.abs(x).max()) for x in batches)

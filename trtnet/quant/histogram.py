"""Per-tensor activation statistics and the three ways to turn them into an amax (INT8 range).

Histograms are of |x| over [0, max], 2048 bins to start, grown with the same bin width when a later
batch holds larger values — the collection of NVIDIA's pytorch-quantization `HistogramCalibrator`
(torch branch), so one batch at a time is held in memory. The amax methods follow the same library's
`calib/histogram.py`:
- entropy: TensorRT's IInt8EntropyCalibrator2 — the amax whose 128-level quantized histogram has the
  smallest KL divergence from the clipped reference histogram (the last such amax on ties);
- percentile: the bin edge where the cumulative share of |x| reaches `percentile` %;
- max: the largest |x| seen (exact, not from the histogram).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trtnet.errors import TrtnetError

METHODS = ("entropy", "percentile", "max")
ALIASES = {"minmax": "max"}  # TensorRT's name for its max calibrator (IInt8MinMaxCalibrator)
NUM_BINS = 2048
START_BIN = 128  # the smallest clipping point entropy considers: 128 levels map one to one
DEFAULT_PERCENTILE = 99.99


@dataclass
class AbsHistogram:
    """Running histogram of |x| for one tensor; `add` takes one batch (any shape) at a time."""

    num_bins: int = NUM_BINS
    counts: np.ndarray | None = None  # int64 [bins]
    width: float = 0.0  # bin width, fixed by the first batch with a nonzero value
    max: float = 0.0  # largest |x| seen
    pending_zeros: int = 0  # values seen before any nonzero one (they land in bin 0)

    def add(self, x: np.ndarray) -> None:
        a = np.asarray(x, dtype=np.float32).ravel()
        if a.size == 0:
            return
        peak = float(max(a.max(), -a.min()))  # max |x| without writing |x| out
        if not np.isfinite(peak):
            raise TrtnetError("calibration: a tensor holds inf or NaN values; the fp32 network overflows")
        self.max = max(self.max, peak)
        if self.counts is None:
            if peak == 0.0:
                self.pending_zeros += a.size
                return
            self.width = peak / self.num_bins
            self.counts = np.zeros(self.num_bins, np.int64)
            self.counts[0] += self.pending_zeros
        needed = int(np.ceil(peak / self.width))
        if needed > self.counts.size:
            self.counts = np.concatenate([self.counts, np.zeros(needed - self.counts.size, np.int64)])
        self.counts += abs_bin_counts(a, self.counts.size, self.counts.size * self.width)

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.counts.size + 1, dtype=np.float64) * self.width

    def amax(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
        method = canonical_method(method)
        if method == "max" or self.counts is None:
            return self.max  # an all-zero tensor has amax 0 whatever the method
        if method == "percentile":
            return amax_percentile(self.counts, self.edges, percentile)
        return amax_entropy(self.counts, self.edges)


def canonical_method(method: str) -> str:
    """`method` by its name here (minmax → max); an unknown method is an error naming the choices."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise TrtnetError(f"--calib-method {method}: use one of {', '.join(METHODS)} (or minmax)")
    return method


FAST_BINNING_MAX_BINS = 1 << 20  # the index bound in abs_bin_counts holds below this many bins
_BLOCK = 1 << 16  # elements binned at a time: the temporaries stay in cache


def abs_bin_counts(a: np.ndarray, bins: int, top: float) -> np.ndarray:
    """np.histogram(|a|, bins, range=(0, top))[0] for a float32 `a` whose |a| all lie in [0, top], faster.

    np.histogram's rule: bin k holds edges[k] <= |a| < edges[k+1], the last bin its right edge too, with its
    float32 edges (np.histogram_bin_edges). trunc(|a| * s), s a 2^-21 margin under bins / top, is that bin or
    the one below: float32 rounding moves each factor by ~2^-24, less than the margin, and the margin moves
    an index under 2^20 by less than one. One comparison with the bin's upper edge settles it."""
    a = np.asarray(a, dtype=np.float32).ravel()
    if bins > FAST_BINNING_MAX_BINS or top / bins < 1e-30:  # out of the bound, or bins / top past float32
        return np.histogram(np.abs(a), bins=bins, range=(0.0, top))[0]
    edges = np.histogram_bin_edges(a[:0], bins=bins, range=(0.0, top))
    upper = np.append(edges[1:-1], np.inf).astype(np.float32)  # where bin k ends; the last one never does
    scale = np.float32(bins / top * (1 - 2.0**-21))
    counts = np.zeros(bins, np.int64)
    size = min(a.size, _BLOCK)
    magnitude, scaled, bound = (np.empty(size, np.float32) for _ in range(3))
    index, past = np.empty(size, np.intp), np.empty(size, bool)
    for start in range(0, a.size, _BLOCK):
        block = a[start:start + _BLOCK]
        m, f, u, i, p = (buf[:block.size] for buf in (magnitude, scaled, bound, index, past))
        np.abs(block, out=m)
        np.multiply(m, scale, out=f)
        i[...] = f  # truncates: the bin or the one below, never above (so never past bins - 1)
        np.take(upper, i, out=u, mode="clip")
        np.greater_equal(m, u, out=p)
        np.add(i, p, out=i)
        counts += np.bincount(i, minlength=bins)
    return counts


def amax_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The edge at which the cumulative share first reaches `percentile` % (pytorch-quantization's rule:
    the lower edge of the bin where it is crossed)."""
    if not 0 <= percentile <= 100:
        raise TrtnetError(f"percentile {percentile}: must lie in [0, 100]")
    cdf = np.cumsum(counts / counts.sum())
    return float(edges[int(np.searchsorted(cdf, percentile / 100))])


# Clipping points whose closed-form KL lies this close to the smallest are re-checked bin by bin: far above the
# closed form's rounding (under 2e-13 on yolov5n's 50 histograms), so the bin-by-bin minimum is among them.
KL_TIE_TOLERANCE = 1e-9
_CLIPS_PER_PASS = 256  # clipping points per pass: the [points x levels] tables stay in cache
_TINY = 1e-300


def amax_entropy(counts: np.ndarray, edges: np.ndarray, num_bits: int = 8, start_bin: int = START_BIN) -> float:
    """The clipping edge i (i >= start_bin) minimizing KL(P_i || Q_i), the largest one on ties.

    P_i: bins [0, i) with everything beyond folded into bin i-1. Q_i: bins [0, i) merged into 2^(bits-1)
    levels, each level's count spread evenly over its nonzero bins (empty bins stay empty). Bin 0 takes
    bin 1's count first: zeros, usually from ReLU, would otherwise dominate.

    Every divergence comes from prefix sums at once (`_divergences`); the few clipping points within
    KL_TIE_TOLERANCE of the smallest are then evaluated bin by bin, in order, so that near-ties resolve on
    exactly the values the bin-by-bin loop of pytorch-quantization sees."""
    bins = np.asarray(counts, dtype=np.float64).copy()
    if bins.size > 1:
        bins[0] = bins[1]
    levels = 1 << (num_bits - 1)
    filled = bins != 0
    running = _Prefix(np.concatenate([[0.0], np.cumsum(bins)]), np.concatenate([[0], np.cumsum(filled)]))
    clips = np.arange(min(start_bin, bins.size), bins.size + 1)
    divergences = _divergences(bins, running, clips, levels)
    best_i, best_kl = bins.size, np.inf
    for i in clips[divergences <= divergences.min() + KL_TIE_TOLERANCE]:
        kl = _clipped_kl(bins, filled, running, int(i), levels)
        if kl <= best_kl:  # `<=`: the last minimum wins, as pytorch-quantization's reversed argmin
            best_i, best_kl = int(i), kl
    return float(edges[best_i])


def _divergences(bins: np.ndarray, running: _Prefix, clips: np.ndarray, levels: int) -> np.ndarray:
    """KL(P_i || Q_i) for every clipping point i of `clips`, inf where Q_i is 0 somewhere P_i is not.

    With S the total, C_i the count below i, T_i the tail at and past i, and L_k, F_k level k's count and
    nonzero bins: sum_j P_j log Q_j = sum_k L_k log(L_k / F_k) + T_i log Q_(i-1), so
    KL = (sum_j P_j log P_j - sum_j P_j log Q_j) / S + log(C_i / S)."""
    xlogx_below = np.concatenate([[0.0], np.cumsum(_xlogx(bins))])
    filled_below = running.filled.astype(np.float64)
    total = running.counts[-1]
    shift = levels.bit_length() - 1
    out = np.empty(clips.size)
    for first in range(0, clips.size, _CLIPS_PER_PASS):
        i = clips[first:first + _CLIPS_PER_PASS]
        # level k: bins [starts[k], starts[k+1]), starts[k] = ceil(k i / levels) (levels: a power of two)
        starts = (np.arange(levels + 1) * i[:, None] + (levels - 1)) >> shift
        level_total = np.diff(running.counts[starts], axis=1)
        log_q = _log_spread(level_total, np.diff(filled_below[starts], axis=1))
        last, tail, below = bins[i - 1], total - running.counts[i], running.counts[i]
        last_log_q = log_q[np.arange(i.size), (i - 1) * levels // i]  # the level bin i-1 falls in
        p_log_p = xlogx_below[i - 1] + _xlogx(last + tail)
        p_log_q = (level_total * log_q).sum(axis=1) + tail * last_log_q
        with np.errstate(divide="ignore", invalid="ignore"):  # C_i = 0, or S = 0: no candidate
            kl = (p_log_p - p_log_q) / total + np.log(below / total)
        out[first:first + _CLIPS_PER_PASS] = np.where(((last == 0) & (tail > 0)) | (below == 0), np.inf, kl)
    return out


def _log_spread(level_total: np.ndarray, level_filled: np.ndarray) -> np.ndarray:
    """log(L_k / F_k), written over `level_filled`; an empty level (0 / 0) gets a finite log that its
    zero count cancels. _TINY leaves every count >= 1e-280 exact: it only keeps log(0) away."""
    spread = np.divide(level_total, np.maximum(level_filled, 1.0, out=level_filled), out=level_filled)
    spread += _TINY
    return np.log(spread, out=spread)


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x, 0 at x = 0."""
    return x * np.log(x + _TINY)


@dataclass(frozen=True)
class _Prefix:
    counts: np.ndarray  # counts[j]: the sum of bins [0, j)
    filled: np.ndarray  # filled[j]: how many of bins [0, j) are nonzero


def _clipped_kl(bins: np.ndarray, filled: np.ndarray, running: _Prefix, i: int, levels: int) -> float:
    # Level k merges the bins j with edge_k <= j < edge_k+1 (np.digitize on the same linspace).
    starts = np.ceil(np.linspace(0, i, num=levels + 1)).astype(np.int64)
    level_total = running.counts[starts[1:]] - running.counts[starts[:-1]]
    level_filled = running.filled[starts[1:]] - running.filled[starts[:-1]]
    spread = np.divide(level_total, level_filled, out=np.zeros(levels), where=level_filled > 0)
    q = np.where(filled[:i], np.repeat(spread, np.diff(starts)), 0.0)
    p = bins[:i].copy()
    p[-1] += running.counts[-1] - running.counts[i]
    return _kl(p, q)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of the normalized histograms, as scipy.stats.entropy(p, q)."""
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    if np.any(q[support] == 0):
        return float("inf")
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def weight_amax_per_channel(w: np.ndarray, axis: int = 0) -> np.ndarray:
    """Symmetric per-output-channel amax: max |w| over every axis but `axis`."""
    w = np.abs(np.asarray(w, dtype=np.float32))
    others = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    return w.max(axis=others) if others else w


def int8_scale(amax) -> np.ndarray:
    """amax / 127 as float32, with a zero amax (an all-zero tensor or channel) given scale 1: TensorRT
    requires positive scales, and zeros quantize to zero at any scale."""
    amax = np.asarray(amax, dtype=np.float64)
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)

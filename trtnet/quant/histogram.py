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
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if a.size == 0:
            return
        peak = float(a.max())
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
        top = self.counts.size * self.width
        self.counts += np.histogram(a, bins=self.counts.size, range=(0.0, top))[0]

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


def amax_percentile(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The edge at which the cumulative share first reaches `percentile` % (pytorch-quantization's rule:
    the lower edge of the bin where it is crossed)."""
    if not 0 <= percentile <= 100:
        raise TrtnetError(f"percentile {percentile}: must lie in [0, 100]")
    cdf = np.cumsum(counts / counts.sum())
    return float(edges[int(np.searchsorted(cdf, percentile / 100))])


def amax_entropy(counts: np.ndarray, edges: np.ndarray, num_bits: int = 8, start_bin: int = START_BIN) -> float:
    """The clipping edge i (i >= start_bin) minimizing KL(P_i || Q_i), the largest one on ties.

    P_i: bins [0, i) with everything beyond folded into bin i-1. Q_i: bins [0, i) merged into 2^(bits-1)
    levels, each level's count spread evenly over its nonzero bins (empty bins stay empty). Bin 0 takes
    bin 1's count first: zeros, usually from ReLU, would otherwise dominate."""
    bins = np.asarray(counts, dtype=np.float64).copy()
    if bins.size > 1:
        bins[0] = bins[1]
    levels = 1 << (num_bits - 1)
    filled = bins != 0
    running = _Prefix(np.concatenate([[0.0], np.cumsum(bins)]), np.concatenate([[0], np.cumsum(filled)]))
    best_i, best_kl = bins.size, np.inf
    for i in range(min(start_bin, bins.size), bins.size + 1):
        kl = _clipped_kl(bins, filled, running, i, levels)
        if kl <= best_kl:  # `<=`: the last minimum wins, as pytorch-quantization's reversed argmin
            best_i, best_kl = i, kl
    return float(edges[best_i])


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

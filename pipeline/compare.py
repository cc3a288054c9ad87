"""Two models compared on the same val frames: a paired bootstrap of the dataset-level mIoU.

`seg eval` keeps each frame's counts (its confusion matrix and its void predictions, K x (K+1))
in `confusion_per_image.parquet` beside metrics.json. From two such files scored on the same
frames, `paired_bootstrap` resamples frames with replacement (the same frame indices for both
models), sums each resample's counts and recomputes mIoU exactly as the dataset-level metric
does (pipeline.metrics.SegMetrics.compute): per class IoU = tp / (tp + fp + fn) from the summed
counts, then the mean over the classes it defines. The spread of the 2,000 resampled
differences gives ΔmIoU's 95 % interval, and each class's.

A class absent from a resample is handled as the dataset-level metric handles an absent class,
for each model on its own: absent from the resample's ground truth and never predicted on its
valid pixels, its IoU is undefined (NaN, reported as null) and left out of that resample's
mean (the official getScoreAverage skips NaN entries); absent from the ground truth but
predicted somewhere, it scores 0 and counts. A class's own Δ is undefined in a resample where
either model leaves the class undefined; its interval comes from the resamples that define it
(`defined` says what fraction did).

The interval is BCa (bias-corrected and accelerated, Efron 1987; Efron & Tibshirani 1993,
ch. 14): the percentile interval's levels moved by the bootstrap distribution's median bias
(z0) and by its skewness, estimated with a leave-one-frame-out jackknife (a). mIoU is a mean
of ratios of sums, a biased and skewed statistic when a few frames carry a class; there the
plain percentile interval falls short of its level, which BCa corrects to second order
(benchmarks/compare_coverage.py measures both on a known population; `method="percentile"`
is kept for that comparison).

The whole bootstrap is one matrix product: (R, N) resample counts (how often each frame was
drawn) times (N, 3K) per-frame sums (tp, ground-truth pixels, predicted pixels per class), in
float64, exact for integer counts below 2**53 (benchmarks/compare_speed.py: 2,000 resamples
of 500 frames x 19 classes on one core).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from pipeline.errors import DataError

FILE = "confusion_per_image.parquet"  # beside metrics.json
_META_KEY = b"deeplab_pipeline"
# the eval settings that change a score: two runs compare only when these agree
SETTINGS = ("mode", "scales", "flip", "output_stride")
SLIDE_SETTINGS = ("crop_size", "stride")  # also these where mode is slide
RESAMPLES = 2000
LEVEL = 0.95
METHODS = ("studentized", "bca", "percentile")
METHOD = "studentized"  # the default: benchmarks/compare_bootstrap.py measured the three


# ----------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class FrameCounts:
    """One evaluation's per-frame counts: `counts` (N, K, K + 1) int64, rows ground truth,
    columns prediction, the last column void predictions; `keys` (N,) the frames, sorted;
    `meta`: dataset, the val data's sha256, the eval settings, the checkpoint and where the
    file came from (`source`, filled in by whoever read it)."""

    keys: list[str]
    counts: np.ndarray
    classes: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def miou(self) -> float:
        """The dataset-level mIoU of these frames (as metrics.json's `miou`)."""
        return float(mean_iou(class_iou(class_stats(self.counts).sum(0))))


def eval_settings(evaluate: dict, output_stride: int) -> dict:
    """The settings a score depends on, from params' `evaluate` section (a dict) and the output
    stride the model ran at (evaluate.output_stride, or the checkpoint's own)."""
    out = {k: evaluate[k] for k in SETTINGS if k != "output_stride"}
    out["scales"] = [float(s) for s in out["scales"]]
    out["output_stride"] = int(output_stride)
    if out["mode"] == "slide":
        out.update({k: list(evaluate[k]) for k in SLIDE_SETTINGS})
    return out


def write_frame_counts(path: Path | str, fc: FrameCounts) -> None:
    """Write as parquet to `path` as it is (callers pass a temporary path: pipeline.atomic):
    one row per frame, `key` and `counts` (K * (K + 1) int64, row-major)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = len(fc.keys), fc.num_classes
    if fc.counts.shape != (n, k, k + 1):
        raise ValueError(f"counts of shape {fc.counts.shape}, expected {(n, k, k + 1)}")
    flat = np.ascontiguousarray(fc.counts, dtype=np.int64).reshape(-1)
    width = k * (k + 1)
    table = pa.table(
        {
            "key": pa.array(fc.keys, pa.string()),
            "counts": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int64()), width),
        }
    )
    meta = {"classes": list(fc.classes), **{k_: v for k_, v in fc.meta.items() if k_ != "source"}}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True)})
    pq.write_table(table, path)


def read_frame_counts(source, name: str | None = None) -> FrameCounts:
    """Read a `write_frame_counts` file (a path or a binary file object); `name` is what the
    errors and `meta["source"]` call it (default: the path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = name or str(source)
    try:
        table = pq.read_table(source)
        meta = json.loads((table.schema.metadata or {})[_META_KEY])
        classes = list(meta.pop("classes"))
        k = len(classes)
        keys = table.column("key").to_pylist()
        flat = table.column("counts").combine_chunks()
        if not isinstance(flat.type, pa.FixedSizeListType) or flat.type.list_size != k * (k + 1):
            raise ValueError(f"counts are not {k} x {k + 1} per frame")
        counts = flat.values.to_numpy(zero_copy_only=False).reshape(len(keys), k, k + 1)
    except FileNotFoundError:
        raise DataError(f"{name}: no per-image counts (run `seg eval` to write them)") from None
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"{name}: not a per-image counts file ({exc})") from None
    if counts.min(initial=0) < 0:
        raise DataError(f"{name}: negative counts")
    return FrameCounts(keys, counts.astype(np.int64), classes, {**meta, "source": name})


def why_not_comparable(a: FrameCounts, b: FrameCounts) -> str | None:
    """Why two evaluations cannot be compared frame by frame (None: they can): other classes,
    other val data (the manifest's sha256), other frames, or other eval settings; the line
    names the difference."""

    def short(x) -> str:
        return str(x)[:12] if x else "unknown"

    if a.classes != b.classes:
        return f"different classes ({a.num_classes} vs {b.num_classes}: {a.meta.get('dataset')} vs {b.meta.get('dataset')})"
    da, db = a.meta.get("data_sha256"), b.meta.get("data_sha256")
    if da != db or da is None:
        return f"scored on different val data (manifest sha256 {short(da)} vs {short(db)})"
    if a.keys != b.keys:
        only = sorted(set(a.keys) ^ set(b.keys))
        return f"scored on different frames ({len(a.keys)} vs {len(b.keys)}; e.g. {only[:1]})"
    sa, sb = a.meta.get("eval") or {}, b.meta.get("eval") or {}
    keys = SETTINGS + (SLIDE_SETTINGS if "slide" in (sa.get("mode"), sb.get("mode")) else ())
    diff = [f"{k} {_show(sa.get(k))} vs {_show(sb.get(k))}" for k in keys if sa.get(k) != sb.get(k)]
    if diff:
        return "scored with different eval settings: " + ", ".join(diff)
    return None


def _show(value) -> str:
    return json.dumps(value) if value is not None else "unknown"


# ----------------------------------------------------------------------------- the metric


def class_stats(counts: np.ndarray) -> np.ndarray:
    """(..., K, K + 1) counts -> (..., 3, K) float64: per class tp, ground-truth pixels (void
    predictions included: they are misses) and predicted pixels (on valid ground truth), the
    sums SegMetrics.compute takes its scores from."""
    k = counts.shape[-2]
    conf = counts[..., :k].astype(np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    gt = counts.sum(-1, dtype=np.float64)
    pred = conf.sum(-2)
    return np.stack([tp, gt, pred], axis=-2)


def class_iou(stats: np.ndarray) -> np.ndarray:
    """(..., 3, K) -> (..., K): tp / (tp + fp + fn), NaN where nothing is there to score
    (absent from the ground truth and never predicted), as SegMetrics.compute."""
    tp, gt, pred = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    den = gt + pred - tp  # = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tp / np.where(den > 0, den, 1.0), np.nan)


def mean_iou(iou: np.ndarray) -> np.ndarray:
    """Mean over the classes with a defined IoU (getScoreAverage); NaN where none is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are NaN, as meant
        return np.nanmean(iou, axis=-1)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(R, n) float64: how often each of n frames is drawn in each of R resamples of n frames
    with replacement. Seeded: the same seed draws the same frames for both models."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    idx += (np.arange(resamples) * n)[:, None]
    return (
        np.bincount(idx.reshape(-1), minlength=resamples * n)
        .reshape(resamples, n)
        .astype(np.float64)
    )


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A statistic's value on all frames and its interval; None where undefined."""

    value: float | None
    lo: float | None
    hi: float | None
    defined: float = 1.0  # fraction of resamples where the statistic was defined

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "defined": self.defined}


def _scores(sums: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """(..., M, 3, K) summed stats of M models -> (..., 1 + K): Σ_m sign_m mIoU_m, then per
    class Σ_m sign_m IoU_m (B - A for signs (-1, +1); one model's own scores for (+1,))."""
    iou = class_iou(sums)  # (..., M, K)
    miou = mean_iou(iou)  # (..., M)
    return np.concatenate(
        [(miou * signs).sum(-1)[..., None], (iou * signs[:, None]).sum(-2)], axis=-1
    )


def _jackknife_se(
    frames: np.ndarray,
    weights: np.ndarray,
    signs: np.ndarray,
    centre: np.ndarray | None = None,
    chunk: int = 8,
) -> np.ndarray:
    """(R, 1 + K) jackknife standard errors of `_scores` in each weighting of the frames
    (weights (R, N): how often each frame was drawn): leave out one draw of frame i,
    se**2 = (n - 1) / n Σ_i w_i (θ_(i) - θ_(.))**2. The jackknife, not the delta method: on
    ratio scores with a few frames carrying a class, the delta method's (and the bootstrap's)
    variance came out 15 % low where the jackknife's was right (benchmarks/
    compare_bootstrap.py; Efron & Stein 1981: its bias is upward). `centre` (R, 1 + K): each
    weighting's own scores, subtracted before squaring (well-conditioned moments). Vectorised
    over chunks of resamples: (chunk, N, M, K) leave-one-out sums at a time (8: they stay in
    the CPU cache; 0.6 s for 2,000 x 500 x 19 on one core, 64: 0.9 s)."""
    tp = frames[:, :, 0]  # (N, M, K)
    den = frames[:, :, 1] + frames[:, :, 2] - tp  # tp + fp + fn
    sums = np.tensordot(weights, np.stack([tp, den], 1), axes=1)  # (R, 2, M, K)
    centre = np.zeros((len(weights), 1 + tp.shape[-1])) if centre is None else centre
    centre = np.where(np.isnan(centre), 0.0, centre)
    out = np.empty((len(weights), 1 + tp.shape[-1]))
    for s in range(0, len(weights), chunk):
        w, c = weights[s : s + chunk], centre[s : s + chunk]  # (c, N), (c, 1 + K)
        den_loo = sums[s : s + chunk, None, 1] - den  # (c, N, M, K)
        ok = den_loo > 0  # integer counts: where den is 0, so is tp
        iou = (sums[s : s + chunk, None, 0] - tp) / np.maximum(den_loo, 1.0)
        # the mIoU: each model's mean over the classes its leave-out defines
        miou = iou.sum(-1) / np.maximum(ok.sum(-1), 1)  # (c, N, M)
        x = miou @ signs - c[:, :1]  # (c, N)
        n = w.sum(1)
        m1, m2 = np.einsum("cn,cn->c", w, x) / n, np.einsum("cn,cn->c", w, x * x) / n
        out[s : s + chunk, 0] = np.sqrt(np.maximum(m2 - m1**2, 0.0) * (n - 1))
        # each class: the draws whose leave-out defines it for every model
        xk = np.einsum("cnmk,m->cnk", iou, signs) - c[:, None, 1:]
        u = w[..., None] * ok.all(-2)  # (c, N, K)
        t = np.maximum(u.sum(1), 1.0)
        m1, m2 = np.einsum("cnk,cnk->ck", u, xk) / t, np.einsum("cnk,cnk->ck", u, xk * xk) / t
        out[s : s + chunk, 1:] = np.sqrt(np.maximum(m2 - m1**2, 0.0) * (t - 1))
    return out


def bootstrap(
    frames: np.ndarray,
    signs: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    method: str = METHOD,
) -> tuple[list[Interval], np.ndarray]:
    """Intervals of Σ_m sign_m mIoU_m and of each class's Σ_m sign_m IoU_m over frames
    resampled with replacement, the same frames for every model.

    `frames` (N, M, 3, K): each frame's tp, ground-truth and predicted pixels per model and
    class (class_stats). Returns 1 + K intervals and the (R, 1 + K) resampled values."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
    if not 0 < level < 1:
        raise ValueError(f"level {level}: a fraction in (0, 1)")
    n = frames.shape[0]
    if n < 2:
        raise DataError(f"{n} frame(s): the bootstrap needs at least 2")
    signs = np.asarray(signs, dtype=np.float64)
    shape = frames.shape[1:]
    flat = frames.reshape(n, -1)
    total = flat.sum(0)
    observed = _scores(total.reshape(shape), signs)  # (1 + K,)
    weights = resample_weights(n, resamples, seed)
    boot = _scores((weights @ flat).reshape(resamples, *shape), signs)  # (R, 1 + K)
    alpha = (1 - level) / 2
    if method == "studentized":
        lo, hi = _studentized(frames, weights, signs, observed, boot, alpha)
    else:
        if method == "percentile":
            lo_q = np.full(observed.shape, alpha)
            hi_q = np.full(observed.shape, 1 - alpha)
        else:  # leave one frame out
            jack = _scores((total[None, :] - flat).reshape(n, *shape), signs)
            lo_q, hi_q = _bca_levels(observed, boot, jack, alpha)
        lo, hi = _quantiles(boot, lo_q), _quantiles(boot, hi_q)
    defined = (~np.isnan(boot)).mean(0)
    out = []
    for o, a, b, d in zip(observed, lo, hi, defined, strict=True):
        if math.isnan(o) or math.isnan(a) or math.isnan(b):
            out.append(Interval(None if math.isnan(o) else float(o), None, None, float(d)))
        else:
            out.append(Interval(float(o), float(a), float(b), float(d)))
    return out, boot


def _studentized(frames, weights, signs, observed, boot, alpha):
    """Bootstrap-t (Efron & Tibshirani 1993, ch. 12.5): t* = (θ* - θ) / se*, each resample
    with its own jackknife standard error; the interval θ - t*_(1-α) se .. θ - t*_(α) se. A
    resample where the statistic or its standard error is undefined or zero (t* would be 0/0)
    does not count; where the frames' own standard error is 0 (identical models), the
    interval is the point."""
    se_obs = _jackknife_se(frames, np.ones((1, frames.shape[0])), signs, observed[None])[0]
    se_boot = _jackknife_se(frames, weights, signs, boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (boot - observed) / se_boot
    t = np.where(np.isfinite(t), t, np.nan)
    t_hi, t_lo = (
        _quantiles(t, np.full(observed.shape, 1 - alpha)),
        _quantiles(t, np.full(observed.shape, alpha)),
    )
    flat = se_obs == 0
    lo = np.where(flat, observed, observed - t_hi * se_obs)
    hi = np.where(flat, observed, observed - t_lo * se_obs)
    return lo, hi


_NORMAL = NormalDist()


def _bca_levels(observed, boot, jack, alpha):
    """The BCa interval's quantile levels per column: Φ(z0 + (z0 + z) / (1 - a (z0 + z))) for
    z = z_alpha, z_(1-alpha). z0 from the share of resamples below the observed value (ties
    count half, so a constant distribution has z0 = 0), a from the jackknife's skewness."""
    ok = ~np.isnan(boot)
    r = np.maximum(ok.sum(0), 1)
    below = ((boot < observed) & ok).sum(0) + 0.5 * ((boot == observed) & ok).sum(0)
    share = np.clip(below / r, 0.5 / r, 1 - 0.5 / r)  # finite z0 when all fall on one side
    z0 = np.array([_NORMAL.inv_cdf(float(s)) for s in share])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column the jackknife never defines
        d = np.nanmean(jack, axis=0) - jack
    d = np.where(np.isnan(d), 0.0, d)  # leave-outs that undefine the statistic do not count
    num, den = (d**3).sum(0), 6.0 * ((d**2).sum(0)) ** 1.5
    a = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    levels = []
    for z in (_NORMAL.inv_cdf(alpha), _NORMAL.inv_cdf(1 - alpha)):
        shifted = z0 + (z0 + z) / (1 - a * (z0 + z))
        levels.append(np.array([_NORMAL.cdf(float(v)) for v in shifted]))
    return levels[0], levels[1]


def _quantiles(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per column, the q-quantile of its defined (not NaN) values, with numpy's default
    linear interpolation; NaN for a column with none."""
    ordered = np.sort(values, axis=0)  # NaNs last
    n = (~np.isnan(values)).sum(0)
    pos = q * np.maximum(n - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    cols = np.arange(values.shape[1])
    frac = pos - lo
    lo_v, hi_v = ordered[lo, cols], ordered[hi, cols]
    value = np.where(frac == 0, lo_v, lo_v + (hi_v - lo_v) * frac)
    return np.where(n > 0, value, np.nan)


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Comparison:
    """B against A on the same frames: mIoU of each, ΔmIoU = B - A with its interval, and per
    class IoU of each and Δ with its interval. Fractions (0.004 = 0.4 mIoU points)."""

    miou_a: float
    miou_b: float
    delta: Interval
    classes: list[str]
    iou_a: list[float | None]
    iou_b: list[float | None]
    class_delta: list[Interval]
    frames: int
    resamples: int
    seed: int
    level: float
    method: str
    samples: np.ndarray = field(repr=False, compare=False)  # (R,) resampled ΔmIoU

    def line(self) -> str:
        """'ΔmIoU +0.4 [-0.3, +1.1]' in mIoU points."""
        return f"ΔmIoU {_points(self.delta.value)} [{_points(self.delta.lo)}, {_points(self.delta.hi)}]"

    def to_dict(self) -> dict:
        return {
            "miou_a": self.miou_a,
            "miou_b": self.miou_b,
            "delta_miou": self.delta.to_dict(),
            "per_class": [
                {"class": c, "iou_a": a, "iou_b": b, "delta": d.to_dict()}
                for c, a, b, d in zip(
                    self.classes, self.iou_a, self.iou_b, self.class_delta, strict=True
                )
            ],
            "frames": self.frames,
            "resamples": self.resamples,
            "seed": self.seed,
            "level": self.level,
            "method": self.method,
        }


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _nan_to_none(x) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def paired_bootstrap(
    a: FrameCounts,
    b: FrameCounts,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    method: str = METHOD,
) -> Comparison:
    """ΔmIoU = mIoU(B) - mIoU(A) with a `level` interval from a paired bootstrap over frames,
    and each class's ΔIoU. Refuses (DataError, one line) two evaluations that were not scored
    on the same frames with the same settings."""
    why = why_not_comparable(a, b)
    if why:
        raise DataError(f"cannot compare {_name(a)} and {_name(b)}: {why}")
    return paired_bootstrap_counts(
        a.counts, b.counts, a.classes, resamples=resamples, seed=seed, level=level, method=method
    )


def _name(fc: FrameCounts) -> str:
    return str(fc.meta.get("source") or "?")


def paired_bootstrap_counts(
    a: np.ndarray,
    b: np.ndarray,
    classes: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    method: str = METHOD,
) -> Comparison:
    """`paired_bootstrap` on bare (N, K, K + 1) count arrays, frame i of A paired with frame
    i of B."""
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != a.shape[1] + 1:
        raise DataError(
            f"per-image counts of shapes {a.shape} and {b.shape}: not paired (N, K, K+1)"
        )
    k = a.shape[1]
    frames = np.stack([class_stats(a), class_stats(b)], axis=1)  # (N, 2, 3, K)
    intervals, boot = bootstrap(frames, (-1.0, 1.0), resamples, seed, level, method)
    total_iou = class_iou(frames.sum(0))
    miou = mean_iou(total_iou)
    return Comparison(
        miou_a=float(miou[0]),
        miou_b=float(miou[1]),
        delta=intervals[0],
        classes=list(classes) if classes is not None else [str(i) for i in range(k)],
        iou_a=[_nan_to_none(v) for v in total_iou[0]],
        iou_b=[_nan_to_none(v) for v in total_iou[1]],
        class_delta=intervals[1:],
        frames=len(a),
        resamples=resamples,
        seed=seed,
        level=level,
        method=method,
        samples=boot[:, 0],
    )


def miou_interval(
    fc: FrameCounts,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    method: str = METHOD,
) -> Interval:
    """One evaluation's mIoU with its `level` bootstrap interval over its frames."""
    frames = class_stats(fc.counts)[:, None]  # (N, 1, 3, K)
    return bootstrap(frames, (1.0,), resamples, seed, level, method)[0][0]

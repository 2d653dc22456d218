"""Per-slide calibration: a threshold from the slide's own scores.

Scores shift from patient to patient (``docs/model_card.md``): on one new patient's slide
the stroma sits at 0.3, on another's at 0.7, while inside each slide tumour still ranks
above it. One fixed threshold cannot serve both. The slide's own threshold is where its
analysed patches' scores split best into two groups - Otsu's threshold on their
log-odds - held between a floor and a ceiling:

* the floor (:data:`THRESHOLD_FLOOR`) keeps a slide with little or no tumour, whose scores
  are one group of noise, from having its noise split in two and marked;
* the ceiling (:data:`THRESHOLD_CEILING`) keeps a slide that is mostly tumour from losing it.

Scores are then moved so that the slide's threshold reads 0.5: the calibrated score is
``sigmoid(logit(p) - logit(t))``, the same order within the slide (its AUC is unchanged)
and comparable between slides. The analysis's ``threshold`` setting (default 0.5) applies to
calibrated scores.
"""

from __future__ import annotations

import numpy as np

__all__ = ["slide_threshold", "calibrate", "logit", "LOGIT_CLIP", "THRESHOLD_FLOOR", "THRESHOLD_CEILING"]

#: Least per-slide threshold: calibration only ever raises the bar a raw score must pass
THRESHOLD_FLOOR = 0.5
#: Highest per-slide threshold
THRESHOLD_CEILING = 0.9
#: Log-odds are clipped to this magnitude (a probability of 1 - 3e-4): scores of 1.0 in float32 are common
LOGIT_CLIP = 8.0


def logit(p: np.ndarray, clip: float | None = LOGIT_CLIP) -> np.ndarray:
    """Log-odds of probabilities (float64), clipped to +-``clip`` (None: not clipped)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    values = np.log(p) - np.log1p(-p)
    return values if clip is None else np.clip(values, -clip, clip)


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """The cut that maximises the between-group variance of ``values``."""
    counts, edges = np.histogram(values, bins=bins, range=(-LOGIT_CLIP, LOGIT_CLIP))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def slide_threshold(scores: np.ndarray, floor: float = THRESHOLD_FLOOR, ceiling: float = THRESHOLD_CEILING) -> float:
    """The slide's own threshold on its raw (or context-refined) scores.

    Args:
        scores: the slide's patch scores in [0, 1], any shape; NaN (not analysed) is ignored.
        floor: the least threshold.
        ceiling: the highest threshold.

    Returns:
        Otsu's threshold on the log-odds of the analysed scores, held within
        [``floor``, ``ceiling``]; ``floor`` when fewer than two patches were analysed.
    """
    if not 0 < floor <= ceiling < 1:
        raise ValueError(f"floor and ceiling must satisfy 0 < floor <= ceiling < 1, got {floor} and {ceiling}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2 or np.ptp(values) == 0:
        return floor
    cut = 1.0 / (1.0 + np.exp(-_otsu(logit(values))))
    return float(min(max(cut, floor), ceiling))


def calibrate(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Scores moved so that ``threshold`` reads 0.5: ``sigmoid(logit(p) - logit(threshold))``
    (float32, NaN kept)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    scores = np.asarray(scores)
    shifted = logit(np.nan_to_num(scores, nan=0.5)) - float(logit(threshold))
    return np.where(np.isfinite(scores), 1.0 / (1.0 + np.exp(-shifted)), np.nan).astype(np.float32)

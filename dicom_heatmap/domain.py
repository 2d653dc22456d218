"""The domain check: is this input like what the model was trained on?

The model knows H&E-stained breast tissue at about 4 um per pixel. On tissue unlike that
- another stain, another organ, another scanner's colours - its 13 conv layers' heads,
each trained alone on the same tiles, stop agreeing: the shallow ones read colour and
texture, the deep ones shapes, and off the training data they read it differently. The
statistic is the mean, over the analysed patches (or tiles), of the standard deviation
of the 13 layer probabilities of a patch: an ensemble's disagreement, which needs
nothing beyond what the scoring already computed.

Measured with model 1.1 on the 16 development whole slides of the IDC set (not the
held-out ones): 0.036 to 0.089, median 0.050. :data:`DISAGREEMENT_LIMIT` was set just
above the highest of them, on those slides alone. Checked afterwards on inputs it was not
set on: the BCSS regions of another cohort (breast H&E, must pass) 0.048 and 0.083; the
CMU skin crop (must warn) 0.115 - see ``docs/model_card.md``.

Besides, an image too coarse for the model's patches (under
:data:`dicom_heatmap.api.MIN_PATCH_SIDE` pixels a patch) is outside its scale.
"""

from __future__ import annotations

import numpy as np

__all__ = ["layer_disagreement", "DISAGREEMENT_LIMIT"]

#: Mean spread of the 13 layer probabilities above which an input is outside the model's domain
DISAGREEMENT_LIMIT = 0.10


def layer_disagreement(layer_probabilities: np.ndarray) -> float | None:
    """Mean over analysed patches of the standard deviation of their 13 layer probabilities.

    Args:
        layer_probabilities: (..., 13), NaN where not analysed.

    Returns:
        the statistic, or None where nothing was analysed.
    """
    values = np.asarray(layer_probabilities, dtype=np.float64).reshape(-1, np.shape(layer_probabilities)[-1])
    values = values[np.isfinite(values).all(axis=1)]
    return float(values.std(axis=1).mean()) if len(values) else None

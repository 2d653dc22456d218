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

Besides, another modality than the model's (CT, MR) and an image too coarse for the
model's patches (under :data:`MIN_PATCH_SIDE` pixels a patch) are outside its domain;
:func:`domain_warning` says which, in words.
"""

from __future__ import annotations

import numpy as np

from dicom_heatmap.scorer import MODEL_DOMAIN, MODEL_MODALITIES
from transforms.io.dicom import shown_code

__all__ = ["layer_disagreement", "domain_warning", "DISAGREEMENT_LIMIT", "MIN_PATCH_SIDE"]

#: Mean spread of the 13 layer probabilities above which an input is outside the model's domain
DISAGREEMENT_LIMIT = 0.10
#: Fewest pixels a side of a model patch: on a coarser image tiles are scored whole.
MIN_PATCH_SIDE = 16


def domain_warning(modality: str, too_coarse_spacing_um: float | None, disagreement: float | None,
                   field_of_view_um: float) -> str | None:
    """Why an analysis's scores are no findings, in words; None when the input is in the
    model's domain.

    Args:
        modality: the input's modality.
        too_coarse_spacing_um: the pixel spacing (micrometres) of an image the model knows
            that was too coarse for its patches; None when patches were cut (or the spacing
            is unknown).
        disagreement: :func:`layer_disagreement` of what was scored.
        field_of_view_um: the model's patch side.
    """
    if modality not in MODEL_MODALITIES:
        # quoted only when it is a valid code string: header text never reaches a console raw
        named = f"{modality} " if shown_code(modality) == modality else ""
        return f"the model knows only {MODEL_DOMAIN}; on this {named}image its scores are not findings"
    if too_coarse_spacing_um is not None:
        return (f"the image read is too coarse for the model ({too_coarse_spacing_um:.3g} um per pixel: a "
                f"{field_of_view_um:g} um patch would be under {MIN_PATCH_SIDE} pixels), so its scores are not "
                "findings; read a finer level with --resolution-um or --level")
    if disagreement is not None and disagreement > DISAGREEMENT_LIMIT:
        return (f"the model's 13 layers disagree on this tissue (mean spread {disagreement:.3f}, above "
                f"{DISAGREEMENT_LIMIT:g}): it looks unlike what the model knows ({MODEL_DOMAIN}; another stain, "
                "organ or scanner?), so its scores are not findings")
    return None


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

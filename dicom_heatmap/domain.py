"""The model's domain and the domain check: is this input like what the model was trained on?

Every model file declares its domain (:class:`ModelDomain`, stored in the state dict as
the ``domain`` buffer, UTF-8 JSON): the modalities it knows, the body part, the intensity
normalisation its tiles had, a summary of its training data, and how far its 13 layers
may disagree on inputs it knows. A model file without the buffer (every one before 1.8,
the shipped model among them) is the H&E model: :data:`HE_DOMAIN`. The field of view (the
physical side of a tile or patch) is the network's own ``field_of_view_um`` buffer.

How the domain is used: a slide-microscopy model (its modalities include SM) has patches
cut at its scale and scored; a radiology model (CT, MR) has the grid's tiles cut at its
field of view and the images normalised as its training tiles were.

The disagreement statistic: off the training data, the heads of the 13 conv layers, each
trained alone on the same tiles, stop agreeing (the shallow ones read colour and
texture, the deep ones shapes). :func:`layer_disagreement` is the mean, over the analysed
patches (or tiles), of the standard deviation of the 13 layer probabilities of one.
Measured with model 1.1 on the 16 development whole slides of the IDC set (not the
held-out ones): 0.036 to 0.089, median 0.050. :data:`DISAGREEMENT_LIMIT` was set just
above the highest of them, on those slides alone. Checked afterwards on inputs it was not
set on: the BCSS regions of another cohort (breast H&E, must pass) 0.048 and 0.083; the
CMU skin crop (must warn) 0.115 - see ``docs/model_card.md``. A radiology model trained
here sets its own limit from its training series (see
:func:`pipelines.training.radiology.train_datalist`).

:func:`domain_warning` says in words why an input lies outside: another modality, another
body part, an image too coarse for the model's patches, or layers that disagree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from transforms.io.dicom import shown_code

__all__ = ["ModelDomain", "HE_DOMAIN", "layer_disagreement", "domain_warning", "input_body_part", "DISAGREEMENT_LIMIT", "MIN_PATCH_SIDE"]

#: Mean spread of the 13 layer probabilities above which an input is outside the H&E model's domain
DISAGREEMENT_LIMIT = 0.10
#: Fewest pixels a side of a model patch: on a coarser image tiles are scored whole.
MIN_PATCH_SIDE = 16
#: The modalities a radiology model may be trained on (those :class:`~transforms.intensity.NormalizeByModality` knows).
RADIOLOGY_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class ModelDomain:
    """What a model was trained on, as its model file declares it.

    Attributes:
        modalities: DICOM modalities the model knows (pictures and slide exports without
            a header read as OT).
        description: the domain in words, for warnings and the model card.
        body_part: DICOM Body Part Examined of the training series, where all had the same.
        ct_window: (centre, width) in HU that mapped CT values to 0..255.
        mr_percentiles: lower and upper percentile of a series mapped to 0 and 255 (MR).
        lesion_fraction: least lesion share of a training tile labelled positive (radiology).
        disagreement_limit: :func:`layer_disagreement` above which an input is outside.
        training_data: a summary of the training data (series, patients, tiles, positives).
    """

    modalities: tuple[str, ...] = ("SM", "OT")
    description: str = "H&E-stained breast tissue, slide microscopy at about 4 um per pixel"
    body_part: str | None = None
    ct_window: tuple[float, float] = (40.0, 400.0)
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    lesion_fraction: float | None = None
    disagreement_limit: float = DISAGREEMENT_LIMIT
    training_data: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(str(m) for m in self.modalities))
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        object.__setattr__(self, "mr_percentiles", tuple(float(v) for v in self.mr_percentiles))
        if not self.modalities:
            raise ValueError("a model domain needs at least one modality")
        if self.ct_window[1] <= 0:
            raise ValueError(f"ct_window's width must be positive, got {self.ct_window[1]}")
        if not 0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100:
            raise ValueError(f"mr_percentiles must rise within 0..100, got {self.mr_percentiles}")

    @property
    def is_radiology(self) -> bool:
        """A CT/MR model: grid tiles at its field of view, not patches of slides."""
        return all(m in RADIOLOGY_MODALITIES for m in self.modalities)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelDomain":
        """The domain a model file declares; :data:`HE_DOMAIN` for an empty text.

        Raises:
            ValueError: text that is not a domain.
        """
        if not text:
            return HE_DOMAIN
        try:
            values = json.loads(text)
            known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
            return cls(**known)
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"the model's domain record is damaged ({error})") from None


#: The domain of every model file without a ``domain`` record: the shipped H&E model's
HE_DOMAIN = ModelDomain()


def input_body_part(meta: dict) -> str | None:
    """The Body Part Examined an input's first source dataset states, or None."""
    sources = meta.get("source_datasets") or []
    return (str(sources[0].get("BodyPartExamined", "") or "") or None) if sources else None


def domain_warning(domain: ModelDomain, modality: str, body_part: str | None, too_coarse_spacing_um: float | None,
                   disagreement: float | None, field_of_view_um: float) -> str | None:
    """Why an analysis's scores are no findings, in words; None when the input is in the
    model's domain.

    Args:
        domain: the model's declared domain.
        modality: the input's modality.
        body_part: the input's Body Part Examined, or None.
        too_coarse_spacing_um: the pixel spacing (micrometres) of an image the model knows
            that was too coarse for its patches; None when patches were cut (or the spacing
            is unknown).
        disagreement: :func:`layer_disagreement` of what was scored.
        field_of_view_um: the model's patch side.
    """
    if modality not in domain.modalities:
        # quoted only when it is a valid code string: header text never reaches a console raw
        named = f"{modality} " if shown_code(modality) == modality else ""
        return f"the model knows only {domain.description}; on this {named}image its scores are not findings"
    if domain.body_part and body_part and body_part.upper() != domain.body_part.upper():
        named = f"of {body_part} " if shown_code(body_part) == body_part else "of another body part "
        return (f"the model was trained on {domain.body_part} only ({domain.description}); on this image {named}its "
                "scores are not findings")
    if too_coarse_spacing_um is not None:
        return (f"the image read is too coarse for the model ({too_coarse_spacing_um:.3g} um per pixel: a "
                f"{field_of_view_um:g} um patch would be under {MIN_PATCH_SIDE} pixels), so its scores are not "
                "findings; read a finer level with --resolution-um or --level")
    if disagreement is not None and disagreement > domain.disagreement_limit:
        kind, causes = (("image", "another scanner, protocol or body part?") if domain.is_radiology
                        else ("tissue", "another stain, organ or scanner?"))
        return (f"the model's 13 layers disagree on this {kind} (mean spread {disagreement:.3f}, above "
                f"{domain.disagreement_limit:g}): it looks unlike what the model knows ({domain.description}; {causes}), "
                "so its scores are not findings")
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

"""The context stage: a patch's tumour probability refined by its neighbours'.

The tile network scores each patch alone. On a whole slide that is not how a pathologist
reads: invasive tumour is contiguous tissue, and a patch of stroma that scores high among
low neighbours is more likely a false positive than a tumour one patch wide. Following
NCRF (Li & Ping, 2018: a conditional random field over neighbouring patches' features
cleaned the tumour maps of Camelyon16), :class:`PatchContext` is a small convolutional
network over the *patch map*: it reads, for every analysed patch, the fused score and
the 13 layer probabilities of the patch and of its neighbours (a 7 x 7-patch view), and
returns a refined tumour probability. :func:`whole_slide_scores` then calibrates the slide to
its own threshold (:mod:`dicom_heatmap.calibration`): what the analysis does with a patch map.

Its input, per patch (``INPUT_CHANNELS``):

* the log-odds of the fused score and of the 13 layer probabilities, clipped to
  +-``LOGIT_CLIP`` and scaled by 1 / ``LOGIT_CLIP``;
* the fused log-odds less their median over the slide's analysed patches: where this
  slide's patches stand against each other, which survives the shift of scores from
  patient to patient;
* 1 where the patch was analysed, 0 on glass (the other channels are 0 there, so glass
  neither raises nor lowers a neighbour).

It is trained by ``dicom-heatmap train-context`` (:mod:`pipelines.training.context_stage`) on
whole slides scored by models that never saw their patients, and stored in the model file
(keys ``context.*``); a model file without them has no context stage.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dicom_heatmap.calibration import LOGIT_CLIP, calibrate, logit, slide_threshold

__all__ = ["PatchContext", "context_inputs", "whole_slide_scores", "INPUT_CHANNELS", "LOGIT_CLIP"]
#: fused + 13 layer log-odds, the slide-centred fused log-odds, the analysed flag
INPUT_CHANNELS = 16
#: Width of the hidden layers
HIDDEN = 16
#: Most the context may move a patch's log-odds, either way: a small tumour of confident
#: patches among low neighbours is lowered, never erased (a prior, not a veto)
MAX_CHANGE = 3.0


def context_inputs(probabilities: np.ndarray) -> torch.Tensor:
    """(1, INPUT_CHANNELS, rows, cols) network input of one patch map.

    Args:
        probabilities: (rows, cols, 14): the fused score then the 13 layer probabilities
            of each patch, NaN where the patch was not analysed.
    """
    analysed = np.isfinite(probabilities[..., 0])
    logits = logit(np.nan_to_num(probabilities, nan=0.5))
    centred = logits[..., :1] - (np.median(logits[..., 0][analysed]) if analysed.any() else 0.0)
    channels = np.concatenate([logits, centred], axis=-1) / LOGIT_CLIP * analysed[..., None]
    channels = np.concatenate([channels, analysed[..., None].astype(np.float64)], axis=-1)
    return torch.from_numpy(channels.astype(np.float32)).permute(2, 0, 1)[None]


class PatchContext(nn.Module):
    """Refines each patch's tumour log-odds from its own and its neighbours' layer outputs.

    ``1x1 conv -> ReLU -> 3x3 conv -> ReLU -> 3x3 conv (dilation 2) -> ReLU -> 1x1 conv``,
    bounded to +-:data:`MAX_CHANGE` and added to the patch's own fused log-odds (so an
    untrained stage leaves the scores as they were): its receptive field is 7 x 7 patches,
    1.4 mm at the IDC scale.
    The buffer ``trained`` is 1 once fit; a model without a trained stage keeps raw scores.
    """

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(INPUT_CHANNELS, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(hidden, 1, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.register_buffer("trained", torch.tensor(0, dtype=torch.int64))
        self.logit_clip, self.max_change = LOGIT_CLIP, MAX_CHANGE  # attributes, not globals: TorchScript compiles them

    @property
    def is_trained(self) -> bool:
        return bool(self.trained.item())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Refined log-odds (N, 1, rows, cols) from :func:`context_inputs` (N, C, rows, cols)."""
        own = inputs[:, :1] * self.logit_clip
        return own + self.max_change * torch.tanh(self.body(inputs) / self.max_change)

    @torch.inference_mode()
    def refine(self, probabilities: np.ndarray) -> np.ndarray:
        """(rows, cols) refined tumour probabilities of a patch map; NaN where not analysed.

        Args:
            probabilities: (rows, cols, 14) fused score and layer probabilities, NaN on glass.
        """
        analysed = np.isfinite(probabilities[..., 0])
        logits = self(context_inputs(probabilities))[0, 0].double().numpy()
        refined = 1.0 / (1.0 + np.exp(-logits))
        return np.where(analysed, refined, np.nan).astype(np.float32)


def whole_slide_scores(probabilities: np.ndarray, context: PatchContext | None) -> tuple[np.ndarray, float]:
    """What the analysis makes of a patch map: the fused scores refined by ``context`` (where
    it is given and trained), then calibrated to the slide's own threshold; and that threshold.

    Args:
        probabilities: (rows, cols, 14) fused score and layer probabilities, NaN on glass.
        context: the model's context stage, or None for the raw scores.
    """
    scores = context.refine(probabilities) if context is not None and context.is_trained else probabilities[..., 0]
    threshold = slide_threshold(scores)
    return calibrate(scores, threshold), threshold

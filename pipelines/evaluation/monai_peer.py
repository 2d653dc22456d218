"""The peer ``dicom-heatmap bench`` races: a competent MONAI whole-slide pipeline.

What a MONAI user would write to score a slide with the project's model: MONAI's
``PatchWSIDataset`` (OpenSlide backend) reads the patches, a ``DataLoader`` with one
worker reads the next batches while this process scores, and the project's network runs
in torch with bf16 autocast and channels-last (its fastest torch path on these CPUs),
64 patches a batch. Tuned as a careful user would: the worker keeps its slide open
(MONAI's dataset reopens an OpenSlide slide for every patch), and torch uses every core.

It scores exactly the patches the project scored on the same slide (the lattice and the
tissue cells of the project's ``result.json``), with the same weights, resize and
normalisation, and writes the raw patch scores as ``scores.npy``. It does less than the
project: no stain normalisation, no whole-slide stage, no DICOM. Run as
``python -m pipelines.evaluation.monai_peer SLIDE RESULT_JSON OUT_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, PatchWSIDataset

from dicom_heatmap.scorer import TileScorer

__all__ = ["patch_locations", "score_slide"]


class _OpenSlidePatches(PatchWSIDataset):
    """MONAI's patch dataset, keeping its OpenSlide handle between patches."""

    def _get_data(self, sample: dict):
        return self.wsi_reader.get_data(wsi=self._get_wsi_object(sample), location=self._get_location(sample),
                                        size=self._get_size(sample), level=self._get_level(sample))


def patch_locations(result: dict, downsample: float) -> list[tuple[int, int]]:
    """Top-left corners, in level-0 pixels, of the patches the project scored."""
    patches = result["patches"]
    rows, cols = patches["row_edges"], patches["col_edges"]
    return [(int(round(rows[r] * downsample)), int(round(cols[c] * downsample)))
            for r, line in enumerate(patches["raw_scores"] if "raw_scores" in patches else patches["scores"])
            for c, value in enumerate(line) if value is not None]


def score_slide(slide: Path, result_json: Path, out_dir: Path) -> int:
    """Score the project's patches of ``slide`` the MONAI way; return how many."""
    import openslide

    result = json.loads(result_json.read_text())
    side = result["patches"]["row_edges"][1] - result["patches"]["row_edges"][0]
    with openslide.OpenSlide(str(slide)) as handle:  # the level the project read: its pixels are the patches'
        level = int(np.argmin([abs(d - 4.0 / float(handle.properties["openslide.mpp-x"])) for d in handle.level_downsamples]))
        downsample = handle.level_downsamples[level]
    scorer = TileScorer.load(precision="bf16", backend="torch")
    network, size = scorer.network, scorer.input_size
    data = [{"image": str(slide), "location": location, "label": 0.0}
            for location in patch_locations(result, downsample)]
    dataset = _OpenSlidePatches(data, patch_size=side, patch_level=level, reader="OpenSlide", center_location=False,
                                include_label=False)
    loader = DataLoader(dataset, batch_size=64, num_workers=1)
    scores = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in loader:
            x = batch["image"].float() if isinstance(batch, dict) else batch.float()
            x = F.interpolate(x[:, :3], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = network.normalize(x).contiguous(memory_format=torch.channels_last)
            scores.append(network(x)[:, 0].float().numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    values = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    np.save(out_dir / "scores.npy", values)
    return len(values)


if __name__ == "__main__":
    print(score_slide(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))

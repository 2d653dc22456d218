"""``make demo``: analyse the sample data shipped in ``tests/data`` and say what was found."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.errors import say
from dicom_heatmap.scorer import TileScorer

__all__ = ["run_demo", "SAMPLES"]

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

#: (file, settings, what it is)
SAMPLES = [
    ("idc_mosaic_tail.png", AnalysisSettings(grid=(8, 12), pixel_size_um=4),
     "mosaic of real breast H&E tiles (IDC), tumour focus on the left with a tail to the right"),
    ("wsi_lymph_node.dcm", AnalysisSettings(), "real DICOM whole-slide image (H&E lymph node, JPEG tiles)"),
    ("cmu_small_region.svs", AnalysisSettings(), "real Aperio SVS slide region (H&E)"),
    ("CT_small.dcm", AnalysisSettings(), "real CT slice (pydicom test data)"),
]


def run_demo(out_dir: str | Path) -> int:
    """Analyse every sample into ``out_dir``; return the exit status."""
    out_dir = Path(out_dir)
    scorer = TileScorer.load()
    print(f"model: {scorer.checksum[:16]}... (input {scorer.input_size} px, {scorer.precision} on {scorer.device.type}, {scorer.backend})")
    folders = {}
    for name, settings, what in SAMPLES:
        started = time.perf_counter()
        result = analyze(DATA / name, scorer, settings)
        folder = result.save(out_dir)
        print()
        print(f"{name}: {what}")
        print(f"  {result.summary_line()}  [{time.perf_counter() - started:.1f} s]")
        if result.domain_warning:
            print(f"  warning: {result.domain_warning}")
        if result.scale_notice:
            print(f"  notice: {result.scale_notice}")
        truth = DATA / name.replace(".png", ".json")
        if name.endswith(".png") and truth.exists():
            layout = np.array(json.loads(truth.read_text())["layout"])
            scores = np.nan_to_num(result.heatmap, nan=0.0)
            auc = float(compute_roc_auc(torch.as_tensor(scores.ravel()), torch.as_tensor(layout.ravel())))
            print(f"  against the known layout: tile AUC {auc:.3f}; "
                  f"expected direction right (0 deg), found {result.spread.words} ({result.spread.angle_deg} deg)")
        folders[name] = folder
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("sc-"))
        say(f"  -> {folder}/ (sc-*.dcm, {', '.join(names)})")
    print()
    say(f"All outputs are in {out_dir}/. Research use only, not for diagnosis.")
    program = sys.argv[0] if Path(sys.argv[0]).name == "dicom-heatmap" else "dicom-heatmap"  # as it was called
    say(f"To pan and zoom a heatmap over its image in the browser: {program} view {folders[SAMPLES[0][0]]}")
    return 0

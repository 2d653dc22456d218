"""Heatmap sanity check on BCSS regions with pixel tumour masks.

    python -m pipelines.evaluation.sanity --bcss ../shared/data/bcss --out docs

BCSS regions are at a much finer scale than the IDC training tiles (cells tens of pixels
wide against fat cells of 10-20 pixels), so each region is zoomed down before the split;
every zoom in ``ZOOMS`` is reported, none is picked on these numbers. For each region and
zoom: the tiles' scores against the tumour fraction of the mask under them (Spearman
correlation, and AUC for "more than half tumour"). Writes ``bcss_sanity.json`` and a
picture of the heatmap beside the mask for the middle zoom.

The scale that matches the training tiles is :data:`MATCHED_ZOOM`: BCSS regions are at
0.25 um per pixel (40x), the IDC tiles at about 4 um (40x downsampled 16:1). A region
then holds only a dozen 50 px tiles, so at that scale 50 px patches are scored every
:data:`MATCHED_STRIDE` pixels (overlapping) through :class:`TileScorer` directly and each
is compared with the mask under it (``matched_scale`` in the JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.render import colorize
from dicom_heatmap.scorer import TileScorer
from pipelines.training.metrics import roc_auc

__all__ = ["run_sanity", "matched_scale_check", "ZOOMS", "MATCHED_ZOOM"]

#: Zooms applied to the BCSS regions before the 50 px tiles are cut (0.25: 200 px of BCSS per tile).
ZOOMS = (0.125, 0.25, 0.5)
TILE = 50
#: BCSS (0.25 um per pixel) zoomed to the IDC tiles' scale (about 4 um per pixel)
MATCHED_ZOOM = 1 / 16
#: Step between the overlapping patches scored at the matched scale
MATCHED_STRIDE = 10


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)  # noqa: E731
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def matched_scale_check(image: np.ndarray, mask: np.ndarray, scorer: TileScorer, zoom: float = MATCHED_ZOOM,
                        stride: int = MATCHED_STRIDE) -> dict:
    """Score overlapping 50 px patches of ``image`` zoomed by ``zoom`` against the tumour
    fraction of ``mask`` under each (Spearman, and AUC for "more than half tumour").

    Args:
        image: (H, W, 3) uint8 region.
        mask: (H, W) bool tumour mask.
        scorer: the model.
        zoom: the factor that brings the region to the model's scale.
        stride: pixels between patches, at the zoomed scale.
    """
    size = (max(TILE, round(image.shape[1] * zoom)), max(TILE, round(image.shape[0] * zoom)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BOX))
    fraction = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.BOX))
    tops, lefts = range(0, size[1] - TILE + 1, stride), range(0, size[0] - TILE + 1, stride)
    patches = np.stack([small[t : t + TILE, l : l + TILE] for t in tops for l in lefts])
    truth = np.array([fraction[t : t + TILE, l : l + TILE].mean() for t in tops for l in lefts])
    scores = scorer.score(patches)
    return {"patches": int(len(patches)), "spearman": _spearman(scores, truth), "auc_majority_tumour": roc_auc(truth > 0.5, scores),
            "tumour_share": float((truth > 0.5).mean())}


def run_sanity(bcss: str | Path, out_dir: str | Path, model: str | Path | None = None) -> dict:
    bcss, out_dir = Path(bcss), Path(out_dir)
    scorer = TileScorer.load(model)
    results: dict = {"zooms": {}, "matched_scale": {"zoom": MATCHED_ZOOM, "stride": MATCHED_STRIDE},
                     "model_sha256": scorer.checksum, "precision": scorer.precision}
    for image_path in sorted((bcss / "images").glob("*.jpg")):
        mask = np.asarray(Image.open(bcss / "masks" / f"{image_path.stem}.png")) > 127
        image = np.asarray(Image.open(image_path).convert("RGB"))
        results["matched_scale"][image_path.stem] = matched_scale_check(image, mask, scorer)
    pictures = []
    for zoom in ZOOMS:
        per_region = {}
        for image_path in sorted((bcss / "images").glob("*.jpg")):
            mask = np.asarray(Image.open(bcss / "masks" / f"{image_path.stem}.png")) > 127
            result = analyze(image_path, scorer, AnalysisSettings(zoom=zoom, tile_size=TILE, tissue_threshold=0.25), progress=False)
            grid = result.tile_map.grid
            scores = result.heatmap
            # the mask's tumour fraction under each tile, in the zoomed image's pixel grid
            zoomed = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(result.image.shape[2:0:-1], Image.BILINEAR)) / 255.0
            fraction = np.add.reduceat(np.add.reduceat(zoomed, grid.row_edges[:-1], axis=0), grid.col_edges[:-1], axis=1)
            fraction /= np.diff(grid.row_edges)[:, None] * np.diff(grid.col_edges)[None, :]
            analysed = np.isfinite(scores)
            per_region[image_path.stem] = {
                "tiles": int(analysed.sum()),
                "spearman": _spearman(scores[analysed], fraction[analysed]),
                "auc_majority_tumour": roc_auc(fraction[analysed] > 0.5, scores[analysed]),
            }
            if zoom == ZOOMS[1]:
                pictures.append((result.image[0], np.nan_to_num(scores, nan=0.0), fraction))
        results["zooms"][str(zoom)] = per_region
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bcss_sanity.json").write_text(json.dumps(results, indent=1))
    _picture(pictures, out_dir / "bcss_sanity.png")
    return results


def _picture(pictures, path: Path) -> None:
    """Each region: the image, the heatmap, the mask's tumour fraction per tile, side by side."""
    rows = []
    for image, scores, fraction in pictures:
        height, width = image.shape[:2]
        scale = 320 / height
        size = (round(width * scale), 320)
        panels = [
            Image.fromarray(image).resize(size, Image.BILINEAR),
            Image.fromarray(colorize(scores)).resize(size, Image.NEAREST),
            Image.fromarray(colorize(fraction)).resize(size, Image.NEAREST),
        ]
        row = Image.new("RGB", (sum(p.width for p in panels) + 20, 320), "white")
        x = 0
        for panel in panels:
            row.paste(panel, (x, 0))
            x += panel.width + 10
        rows.append(row)
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 10 * len(rows)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + 10
    canvas.save(path)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bcss", required=True)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--model", help="model file (default: the shipped model)")
    args = parser.parse_args()
    results = run_sanity(args.bcss, args.out, args.model)
    print(json.dumps({"matched_scale": results["matched_scale"], "zooms": results["zooms"]}, indent=1))

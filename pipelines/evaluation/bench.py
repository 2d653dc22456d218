"""``dicom-heatmap bench``: tile-scoring speed, as ratios measured in one run.

On the same real tiles (the embedded mosaic of IDC tiles, resized), at 224 px and at the
model's input size, it times

* the naive loop: fp32 torch eager, one tile at a time;
* the fast path: :class:`TileScorer` as ``analyze`` uses it (precision and backend
  ``auto``: OpenVINO bf16 on a CPU with bf16 instructions, batches);
* torch's own fast path (bf16 autocast, channels-last, batches) beside it, when the
  fast path is another runtime, so the runtime's share of the gain shows;

and prints tiles/s, effective GFLOP/s of the 13 conv layers, fast / naive, and each
against the machine's matrix-product peak for that precision, measured in the same run.

Then it writes a large synthetic slide (a tiled pyramidal TIFF, half tissue, half glass),
runs ``dicom-heatmap analyze`` on it in a child process, and prints end-to-end tiles/s
against model-only tiles/s on the same tiles, and the child's peak resident memory.

Last, the cost of the whole-slide stage (context network and per-slide calibration): the
embedded rebuilt IDC slide (``tests/data/idc_slide_14082.jpg``, 478 patches at 4 um) is
analysed with the stage and without it in interleaved rounds, and the ratio of the medians
is printed. The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dicom_heatmap.network import HeadedVGG16
from dicom_heatmap.scorer import TileScorer

__all__ = ["conv_flops", "cpu_model", "run_bench"]

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def conv_flops(network: HeadedVGG16, size: int) -> float:
    """Floating-point operations (2 per multiply-add) of the 13 conv layers for one tile."""
    flops, side = 0.0, size
    for layer in network.features:
        if isinstance(layer, torch.nn.Conv2d):
            flops += 2.0 * layer.in_channels * layer.out_channels * 9 * side * side
        elif isinstance(layer, torch.nn.MaxPool2d):
            side //= 2
    return flops


def _timed(step, minimum_seconds: float) -> float:
    """Calls of ``step`` per second over at least ``minimum_seconds`` (after one warm-up call)."""
    step()
    calls, started = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= minimum_seconds:
            return calls / elapsed


def matmul_peak(dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of a large matrix product in ``dtype`` on this machine now."""
    a = torch.randn(2048, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    rate = _timed(lambda: torch.mm(a, b), seconds)
    return rate * 2 * 2048**3 / 1e9


def _tiles(count: int) -> np.ndarray:
    mosaic = np.asarray(Image.open(DATA / "idc_mosaic_tail.png").convert("RGB"))
    tiles = [mosaic[r * 50 : (r + 1) * 50, c * 50 : (c + 1) * 50] for r in range(8) for c in range(12)]
    return np.stack([tiles[i % len(tiles)] for i in range(count)])


def run_bench(model: str | Path | None = None, seconds: float = 4.0, large_side: int = 40000, tile: int = 224) -> list[dict]:
    """Measure and print both tables; return the model rows and the large-slide row."""
    torch.set_grad_enabled(False)
    fast = TileScorer.load(model)
    torch_fast = TileScorer.load(model, backend="torch") if fast.backend != "torch" else None
    reference = TileScorer.load(model, precision="fp32")
    naive_network = reference.network.to(memory_format=torch.contiguous_format)
    peaks = {"fp32": matmul_peak(torch.float32, seconds / 2)}
    if fast.precision == "bf16":
        peaks["bf16"] = matmul_peak(torch.bfloat16, seconds / 2)
    rows = []
    for size in (224, fast.input_size):
        tiles = _tiles(64)
        resized = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
        resized = F.interpolate(resized, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        singles = [naive_network.normalize(t[None]) for t in resized]
        position = iter(range(10**9))

        def naive_step() -> None:  # one tile at a time, fp32, no batching: what a simple script does
            naive_network(singles[next(position) % len(singles)])

        upsized = resized.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()
        batch = upsized[: fast.batch_size]
        fast_rate = _scoring_rate(fast, batch, size, seconds)
        torch_rate = _scoring_rate(torch_fast, batch, size, seconds) if torch_fast else fast_rate
        naive_rate = _timed(naive_step, seconds)
        gflop = conv_flops(fast.network, size) / 1e9
        rows.append({
            "size": size, "naive_tiles_s": naive_rate, "fast_tiles_s": fast_rate, "precision": fast.precision,
            "backend": fast.backend, "torch_fast_tiles_s": torch_rate,
            "naive_gflops": naive_rate * gflop, "fast_gflops": fast_rate * gflop, "speedup": fast_rate / naive_rate,
            "naive_of_peak": naive_rate * gflop / peaks["fp32"], "fast_of_peak": fast_rate * gflop / peaks[fast.precision],
        })
    print(f"CPU: {cpu_model()}")
    print("matrix-product peak measured now: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"threads: {torch.get_num_threads()}; fast path: {fast.backend}, {fast.precision}, batch {fast.batch_size}")
    print("| tile px | naive fp32 tiles/s | torch bf16 tiles/s | fast tiles/s | fast / naive | naive GFLOP/s (of fp32 peak) "
          "| fast GFLOP/s (of its peak) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['size']} | {row['naive_tiles_s']:.1f} | {row['torch_fast_tiles_s']:.1f} | {row['fast_tiles_s']:.1f} "
              f"({row['backend']} {row['precision']}) | {row['speedup']:.2f}x | {row['naive_gflops']:.0f} "
              f"({row['naive_of_peak']:.0%}) | {row['fast_gflops']:.0f} ({row['fast_of_peak']:.0%}) |")
    if large_side:
        rows.append(_large_slide(fast, large_side, tile, seconds))
    rows.append(_whole_slide_stage_cost(fast))
    return rows


def _whole_slide_stage_cost(scorer: TileScorer, rounds: int = 3) -> dict:
    """Median ``analyze`` time of the embedded slide with and without the whole-slide stage
    (interleaved rounds after a warm-up), and their ratio."""
    from dicom_heatmap.api import AnalysisSettings, analyze

    source = DATA / "idc_slide_14082.jpg"
    times: dict[bool, list[float]] = {True: [], False: []}
    analyze(source, scorer, AnalysisSettings(tile_size=50, pixel_size_um=4), progress=False)  # warm-up
    for _ in range(rounds):
        for context in (False, True):
            started = time.perf_counter()
            analyze(source, scorer, AnalysisSettings(tile_size=50, pixel_size_um=4, context=context), progress=False)
            times[context].append(time.perf_counter() - started)
    with_stage, without = float(np.median(times[True])), float(np.median(times[False]))
    print(f"\nwhole-slide stage: {source.name} (478 patches at 4 um), `analyze` without writing, median of {rounds} "
          "interleaved rounds")
    print("| without the stage s | with it s | with / without |")
    print("| --- | --- | --- |")
    print(f"| {without:.2f} | {with_stage:.2f} | {with_stage / without:.3f} |")
    return {"whole_slide_stage_s": with_stage, "without_stage_s": without, "stage_ratio": with_stage / without}


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it (from /proc/cpuinfo), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _scoring_rate(scorer: TileScorer, batch: np.ndarray, size: int, seconds: float) -> float:
    """Tiles per second of ``scorer`` on ``batch`` scored at ``size`` px."""
    saved_size = scorer.input_size
    scorer.input_size = size  # score at this size: the scorer resizes to it (a no-op here)
    try:
        return _timed(lambda: scorer.score(batch), seconds) * len(batch)
    finally:
        scorer.input_size = saved_size


def _large_slide(fast: TileScorer, side: int, tile: int, seconds: float) -> dict:
    """End to end on a synthetic slide of side x side pixels, half glass, streamed at level 0,
    in a child process (its peak memory is its own), against model-only speed on the same
    tiles as the analysis reads them (measured before and after the run, and averaged: the
    machine's speed drifts)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dicom-heatmap-bench-") as folder:
        started = time.perf_counter()
        slide = make_synthetic_slide(Path(folder) / "slide.tif", side)
        written = time.perf_counter() - started
        tiles = _slide_tiles(slide, tile, 8 * fast.batch_size, fast.input_size)
        model_before = _timed(lambda: fast.score_details(tiles), seconds) * len(tiles)
        # The child reports its own peak (VmHWM of its own address space: a child's
        # ru_maxrss also counts this big parent's memory at the fork) and the time of the
        # run itself, from the command's start after the imports to its last file.
        report = Path(folder) / "report"
        launcher = ("import atexit, pathlib, re, sys, time\n"
                    "import pipelines.cli, dicom_heatmap.api\n"
                    "started = time.perf_counter()\n"
                    "def report():\n"
                    "    status = pathlib.Path('/proc/self/status').read_text()\n"
                    "    peak = re.search(r'VmHWM:\\s+(\\d+)', status).group(1)\n"
                    f"    pathlib.Path({str(report)!r}).write_text(f'{{peak}} {{time.perf_counter() - started}}')\n"
                    "atexit.register(report)\n"
                    "sys.exit(pipelines.cli.main(sys.argv[1:]))\n")
        command = [sys.executable, "-c", launcher, "analyze", str(slide), "--level", "0", "--tile-size", str(tile),
                   "--out", str(Path(folder) / "out"), "--quiet"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        process_wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        model_after = _timed(lambda: fast.score_details(tiles), seconds) * len(tiles)
        peak_kb, run_wall = report.read_text().split()
        peak_mb, wall = int(peak_kb) / 1024, float(run_wall)
        result = json.loads(next((Path(folder) / "out").glob("*/result.json")).read_text())
    analysed = result["statistics"]["analysed_tiles"]
    total = result["grid"]["rows"] * result["grid"]["cols"]
    model_rate = (model_before + model_after) / 2
    end_to_end = analysed / wall
    height, width = tiles[0].shape[:2]
    print(f"\nlarge slide: {side} x {side} px, half glass, level 0 streamed, tiles of {tile} px "
          f"({total} tiles, {analysed} with tissue scored; slide written in {written:.0f} s)")
    print(f"end to end = `dicom-heatmap analyze` from model load to the last file written ({wall:.1f} s); the "
          f"interpreter's start and imports before it ({process_wall - wall:.1f} s) are not counted")
    print(f"model-only = scoring {len(tiles)} of the slide's tissue tiles as the analysis reads them "
          f"({height} x {width} px from the pyramid), held in memory: {model_before:.1f} tiles/s before the run, "
          f"{model_after:.1f} after")
    print("| end-to-end tiles/s | model-only tiles/s | end-to-end / model-only | wall s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {end_to_end:.1f} | {model_rate:.1f} | {end_to_end / model_rate:.0%} | {wall:.0f} | {peak_mb:.0f} |")
    return {"side": side, "tiles": total, "analysed": analysed, "end_to_end_tiles_s": end_to_end, "model_tiles_s": model_rate,
            "ratio": end_to_end / model_rate, "wall_s": wall, "process_wall_s": process_wall, "peak_rss_mb": peak_mb}


def _slide_tiles(slide: Path, tile: int, count: int, input_size: int) -> list[np.ndarray]:
    """The first ``count`` tissue tiles of ``slide`` on a grid of ``tile`` px, read the way
    :func:`dicom_heatmap.analyze` reads them."""
    from dicom_heatmap.api import AnalysisSettings, preprocessing

    data = preprocessing(AnalysisSettings(tile_size=tile, level=0))({"image": slide})
    grid, image = data["image_grid"], data["image"]
    numbers = np.flatnonzero(grid.is_tissue.ravel())[:count] + 1
    return [np.ascontiguousarray(piece) for piece in grid.tiles(image, numbers, min_side=input_size)]


def make_synthetic_slide(path: str | Path, side: int, tile: int = 256, smallest: int = 1024,
                         mpp: float | None = None) -> Path:
    """Write a tiled pyramidal TIFF (openslide reads it) of ``side`` x ``side`` RGB pixels:
    the left half real H&E texture (the embedded IDC mosaic, repeated), the right half
    blank glass. Written tile by tile, so memory stays small whatever ``side`` is.

    Levels are 4x apart down to one no wider than ``smallest`` px, as scanners write them;
    a small last level is also what gives OpenSlide its ``quickhash-1`` of the content.
    With ``mpp`` (micrometres per pixel of the full level) the TIFF states its resolution,
    which OpenSlide reads as the slide's pixel size."""
    import tifffile

    texture = np.asarray(Image.open(DATA / "idc_mosaic_tail.png").convert("RGB"))
    glass = np.full((tile, tile, 3), 242, dtype=np.uint8)

    def tiles(level_side: int, step: int):
        for top in range(0, level_side, tile):
            for left in range(0, level_side, tile):
                if left * step >= side // 2:
                    yield glass
                    continue
                rows = (np.arange(top, top + tile) * step) % texture.shape[0]
                cols = (np.arange(left, left + tile) * step) % texture.shape[1]
                yield texture[rows][:, cols]

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        step = 1
        while True:
            level_side = side // step
            # pixels per centimetre, the unit OpenSlide turns into its mpp properties
            resolution = {"resolution": (1e4 / (mpp * step), 1e4 / (mpp * step)), "resolutionunit": "CENTIMETER"} if mpp else {}
            writer.write(tiles(level_side, step), shape=(level_side, level_side, 3), dtype=np.uint8, tile=(tile, tile),
                         photometric="rgb", subfiletype=0 if step == 1 else 1, metadata=None, **resolution)
            if level_side <= smallest:
                return path
            step *= 4

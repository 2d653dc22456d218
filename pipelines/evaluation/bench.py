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

Then the cost of the whole-slide stage (context network and per-slide calibration): the
embedded rebuilt IDC slide (``tests/data/idc_slide_14082.jpg``, 478 patches at 4 um) is
analysed with the stage and without it in interleaved rounds, and the ratio of the medians
is printed. Then where the fixed cost goes: the PNG sample analysed and written in a child
process, its imports, model load, analysis and writing timed apart.

Last, what users run: synthetic pyramidal TIFFs of 12k, 40k and 80k pixels a side at
0.25 um/px (half real H&E texture, half glass), each analysed with every default by
``dicom-heatmap analyze`` and scored by a competent MONAI pipeline on the same patches
(:mod:`pipelines.evaluation.monai_peer`), both as whole processes, in interleaved rounds;
it prints the ratio of their wall times with its spread, each one's peak memory, and each
one's fixed cost and cost a patch (a least-squares line over the slides).
The machine is shared and noisy: read the ratios, not the absolute numbers.
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


def run_bench(model: str | Path | None = None, seconds: float = 4.0, sides: tuple[int, ...] = (12000, 40000, 80000),
              rounds: int = 3) -> list[dict]:
    """Measure and print the tables; return their rows.

    Args:
        model: the model file (the shipped one when ``None``).
        seconds: time per tile-scoring measurement.
        sides: sides in pixels of the synthetic slides raced against the MONAI pipeline
            (none: skip the race).
        rounds: interleaved rounds of the race per slide.
    """
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
    rows.append(_whole_slide_stage_cost(fast))
    rows.append(_fixed_cost())
    if sides:
        rows += _slide_race(tuple(sides), rounds)
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


def _child(code: str, report: Path) -> tuple[float, float]:
    """Wall seconds of a child Python running ``code`` (which writes its own peak resident
    memory, VmHWM in kB, to ``report``: a child's ru_maxrss would count this process's
    memory at the fork), and that peak in MB."""
    import subprocess
    import sys

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return wall, int(report.read_text()) / 1024


#: Ends a child: its peak memory into the report file, then out at once as the console script does.
_CHILD_END = ("import os, re, sys\n"
              "open({report!r}, 'w').write(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "sys.stdout.flush(); sys.stderr.flush(); os._exit(status)\n")


def _project_code(slide: Path, out: Path, report: Path) -> str:
    """``dicom-heatmap analyze SLIDE`` with every default, as the console script runs it."""
    return ("from pipelines import cli\n"
            f"status = cli.main(['analyze', {str(slide)!r}, '--out', {str(out)!r}, '--quiet'])\n"
            + _CHILD_END.format(report=str(report)))


def _peer_code(slide: Path, result_json: Path, out: Path, report: Path) -> str:
    """The MONAI pipeline (:mod:`pipelines.evaluation.monai_peer`) on the same patches."""
    return ("from pathlib import Path\n"
            "from pipelines.evaluation.monai_peer import score_slide\n"
            f"score_slide(Path({str(slide)!r}), Path({str(result_json)!r}), Path({str(out)!r})); status = 0\n"
            + _CHILD_END.format(report=str(report)))


#: The PNG sample analysed and written in a child, each phase timed, then out at once.
_PHASES = """import json, os, sys, time
started = time.perf_counter()
from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.scorer import TileScorer
from dicom_heatmap.writers.common import read_standard_tables_in_background
imported = time.perf_counter()
read_standard_tables_in_background()
scorer = TileScorer.load()
loaded = time.perf_counter()
result = analyze(sys.argv[1], scorer, AnalysisSettings(grid=(8, 12), pixel_size_um=4), progress=False)
analysed = time.perf_counter()
result.save(sys.argv[2])
saved = time.perf_counter()
print(json.dumps({"imports": imported - started, "model load": loaded - imported, "analysis": analysed - loaded,
                  "writing": saved - analysed}))
sys.stdout.flush()
os._exit(0)
"""


def _fixed_cost(rounds: int = 3) -> dict:
    """Where the fixed cost goes: the PNG sample (``tests/data/idc_mosaic_tail.png``, 96
    tiles) analysed and written as ``analyze`` does it, in a child process, each phase timed,
    against the wall time of the whole process (start and exit included); medians of
    ``rounds`` runs after a warm-up."""
    import subprocess
    import sys
    import tempfile

    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dicom-heatmap-bench-") as folder:
        for index in range(rounds + 1):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _PHASES, str(DATA / "idc_mosaic_tail.png"), f"{folder}/{index}"],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
            wall = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-500:])
            if index:  # the first run warms the caches
                for name, seconds in {**json.loads(done.stdout), "whole process": wall}.items():
                    phases.setdefault(name, []).append(seconds)
    medians = {name: float(np.median(values)) for name, values in phases.items()}
    medians["start and exit"] = medians["whole process"] - sum(v for k, v in medians.items() if k != "whole process")
    print(f"\nfixed cost: the PNG sample (96 tiles) analysed and written, in a child process, median of {rounds} warm runs")
    names = ["imports", "model load", "analysis", "writing", "start and exit", "whole process"]
    print("| " + " | ".join(names) + " |")
    print("| " + " | ".join("---" for _ in names) + " |")
    print("| " + " | ".join(f"{medians[name]:.2f} s" for name in names) + " |")
    return {"fixed_cost_s": medians}


def _slide_race(sides: tuple[int, ...], rounds: int) -> list[dict]:
    """The default analysis of synthetic slides at 0.25 um/px against the MONAI pipeline on
    the same patches: one warm-up of each, then ``rounds`` interleaved rounds (the order
    alternating), each a child process timed from its start to its exit."""
    import shutil
    import sys
    import tempfile

    rows = []
    for side in sides:
        with tempfile.TemporaryDirectory(prefix="dicom-heatmap-bench-") as folder:
            folder = Path(folder)
            started = time.perf_counter()
            slide = make_synthetic_slide(folder / "slide.tif", side, mpp=0.25)
            written = time.perf_counter() - started
            report = folder / "peak"
            walls: dict[str, list[float]] = {"project": [], "monai": []}
            peaks: dict[str, list[float]] = {"project": [], "monai": []}

            def project() -> tuple[float, float]:
                shutil.rmtree(folder / "project", ignore_errors=True)
                return _child(_project_code(slide, folder / "project", report), report)

            def monai() -> tuple[float, float]:
                result_json = next((folder / "project").glob("*/result.json"))
                return _child(_peer_code(slide, result_json, folder / "monai", report), report)

            print(f"racing on a {side:,}-pixel slide (written in {written:.0f} s): a warm-up, then {rounds} rounds",
                  file=sys.stderr, flush=True)
            project()  # warm-up: the page cache, the compiled-model cache; and the patches the peer scores
            monai()
            patches = len(np.load(folder / "monai" / "scores.npy"))
            for index in range(rounds):
                order = (("project", project), ("monai", monai))
                for name, run in order if index % 2 == 0 else order[::-1]:
                    wall, peak = run()
                    walls[name].append(wall)
                    peaks[name].append(peak)
            ratios = [m / p for m, p in zip(walls["monai"], walls["project"])]
            rows.append({"side": side, "patches": patches, "written_s": written,
                         "project_s": float(np.median(walls["project"])), "monai_s": float(np.median(walls["monai"])),
                         "ratio": float(np.median(ratios)), "ratio_low": min(ratios), "ratio_high": max(ratios),
                         "project_peak_mb": max(peaks["project"]), "monai_peak_mb": max(peaks["monai"])})
    print(f"\nslides: synthetic pyramidal TIFFs at 0.25 um/px (left half real H&E texture, right half glass), "
          f"the default analysis (`dicom-heatmap analyze SLIDE`) against a MONAI pipeline on the same patches "
          f"(PatchWSIDataset + DataLoader, the same weights, torch bf16: pipelines/evaluation/monai_peer.py); "
          f"medians of {rounds} interleaved rounds, each a whole process from start to exit")
    print("| slide | patches scored | project s | MONAI s | MONAI / project (spread) | peak RSS project / MONAI |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['side'] // 1000}k x {row['side'] // 1000}k | {row['patches']:,} | {row['project_s']:.1f} | "
              f"{row['monai_s']:.1f} | {row['ratio']:.2f}x ({row['ratio_low']:.2f}-{row['ratio_high']:.2f}) | "
              f"{row['project_peak_mb'] / 1024:.2f} / {row['monai_peak_mb'] / 1024:.2f} GB |")
    if len(rows) >= 2:
        for name in ("project", "monai"):
            slope, intercept = np.polyfit([row["patches"] for row in rows], [row[f"{name}_s"] for row in rows], 1)
            print(f"{name}: {intercept:.2f} s + {slope * 1000:.2f} ms a patch (least squares over the slides)")
    return rows


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

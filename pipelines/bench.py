"""``dicom-heatmap bench``: tile-scoring speed, as ratios measured in one run.

On the same real tiles (the embedded mosaic of IDC tiles, resized), at 224 px and at the
model's input size, it times

* the naive loop: fp32 torch eager, one tile at a time;
* the fast path: :class:`TileScorer` as ``analyze`` uses it (precision ``auto``, batches);

and prints tiles/s, effective GFLOP/s of the 13 conv layers, fast / naive, and each
against the machine's matrix-product peak for that precision, measured in the same run.
The machine is shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dicom_heatmap.network import HeadedVGG16
from dicom_heatmap.scorer import TileScorer

__all__ = ["conv_flops", "run_bench"]

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


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


def run_bench(model: str | Path | None = None, seconds: float = 4.0) -> list[dict]:
    """Measure and print the table; return its rows."""
    torch.set_grad_enabled(False)
    fast = TileScorer.load(model)
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
        saved_size = fast.input_size
        fast.input_size = size  # score at this size: the scorer resizes to it (a no-op here)
        try:
            fast_rate = _timed(lambda: fast.score(batch), seconds) * len(batch)
        finally:
            fast.input_size = saved_size
        naive_rate = _timed(naive_step, seconds)
        gflop = conv_flops(fast.network, size) / 1e9
        rows.append({
            "size": size, "naive_tiles_s": naive_rate, "fast_tiles_s": fast_rate, "precision": fast.precision,
            "naive_gflops": naive_rate * gflop, "fast_gflops": fast_rate * gflop, "speedup": fast_rate / naive_rate,
            "naive_of_peak": naive_rate * gflop / peaks["fp32"], "fast_of_peak": fast_rate * gflop / peaks[fast.precision],
        })
    print(f"matrix-product peak measured now: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"threads: {torch.get_num_threads()}; fast path: torch, {fast.precision}, batch {fast.batch_size}, channels-last")
    print("| tile px | naive fp32 tiles/s | fast tiles/s | fast / naive | naive GFLOP/s (of fp32 peak) | fast GFLOP/s (of its peak) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['size']} | {row['naive_tiles_s']:.1f} | {row['fast_tiles_s']:.1f} ({row['precision']}) | {row['speedup']:.2f}x | "
              f"{row['naive_gflops']:.0f} ({row['naive_of_peak']:.0%}) | {row['fast_gflops']:.0f} ({row['fast_of_peak']:.0%}) |")
    return rows

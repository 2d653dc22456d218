"""Where the network runs: torch, or OpenVINO on a CPU.

OpenVINO earns its place by measurement: on this project's CPUs its bf16 graph scores
several times as many of the model's 48 px patches per second as torch's bf16 autocast
(``dicom-heatmap bench`` prints both in one run), and its scores stay within the accuracy
guard of the fp32 torch reference (a test checks it). The whole network runs there as one
graph - the 13 conv layers, their pooled taps, the 13 heads and the fusion - so no torch
thread competes with OpenVINO's for the cores between batches.

Every batch has one static shape (the scorer's batch size; a short last batch is padded),
because dynamic shapes run several times slower and each new shape costs a compile. Two
caches keep later runs from paying the first run's costs, both in one folder keyed by the
weights' checksum and the versions involved: the converted network (about 1.7 s of tracing
the torch module, saved as OpenVINO IR) and OpenVINO's own compiled-model cache (the
compile, a few tenths of a second). The folder is ``$DICOM_HEATMAP_CACHE``, else
``$XDG_CACHE_HOME/dicom-heatmap``, else ``~/.cache/dicom-heatmap``; when it cannot be
written the network is converted and compiled every time.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from dicom_heatmap.errors import ConfigurationError
from dicom_heatmap.network import HeadedVGG16

__all__ = ["BACKENDS", "openvino_available", "cache_dir", "OpenVinoNetwork"]

# OpenVINO's converter reports usage through openvino_telemetry, which writes an "intel"
# folder (a client id) into the home directory on import; a hospital tool neither phones
# home nor writes outside its folders. With the module unimportable, OpenVINO uses its own
# no-op stub (openvino.tools.ovc.telemetry_stub). Set before anything imports openvino.
if "openvino_telemetry" not in sys.modules:
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]

#: What ``backend`` may be: ``auto`` is OpenVINO on a CPU where it is installed, else torch.
BACKENDS = ("auto", "torch", "openvino")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    """Where converted networks are kept between runs."""
    if os.environ.get("DICOM_HEATMAP_CACHE"):
        return Path(os.environ["DICOM_HEATMAP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dicom-heatmap"


class OpenVinoNetwork:
    """A :class:`HeadedVGG16` compiled by OpenVINO for the CPU: tiles in, the network's
    (N, 14) output (score, then the 13 heads' probabilities) out.

    Args:
        network: the eval-mode network with batch norm folded.
        precision: ``fp32`` (OpenVINO is told to keep f32; it would pick bf16 on its own
            on these CPUs) or ``bf16``.
        batch_size: the one batch shape compiled; shorter batches are padded to it.
        threads: CPU threads for inference (``None``: torch's current setting, so worker
            processes that share the cores do not oversubscribe them).
        weights_key: identifies the weights (the model file's checksum), so the converted
            and compiled network can be cached; ``None``: no cache.
    """

    def __init__(self, network: HeadedVGG16, precision: str, batch_size: int, threads: int | None = None,
                 weights_key: str | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigurationError(f"the openvino backend runs fp32 or bf16, not {precision}")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be positive, got {batch_size}")
        import openvino as ov

        self._ov = ov
        self._network = network
        self._batch_size = batch_size
        self._weights_key = weights_key
        self._core = ov.Core()
        self._config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        }
        if weights_key is not None and _writable(cache_dir() / "compiled"):
            self._config["CACHE_DIR"] = str(cache_dir() / "compiled")
        self._requests: dict[int, object] = {}
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, 14) float32 output of normalised input (N, 3, S, S), N up to the batch size."""
        count, side = len(batch), batch.shape[-1]
        if count > self._batch_size:
            raise ValueError(f"a batch of {count} tiles is more than the compiled batch size {self._batch_size}")
        padded = np.zeros((self._batch_size, 3, side, side), dtype=np.float32)
        padded[:count] = batch
        # One compiled model and one reused infer request per tile side: a fresh request per
        # call made memory grow with the number of batches (1 GB more on a 40k slide).
        with self._lock:
            request = self._requests.get(side)
            if request is None:
                request = self._compile(side).create_infer_request()
                self._requests[side] = request
            return np.array(request.infer({0: padded})[0][:count], dtype=np.float32)

    def _compile(self, side: int):
        shape = [self._batch_size, 3, side, side]
        xml = self._cached_ir(shape)
        if xml is not None:
            try:  # from the file, so OpenVINO can find its compiled blob without reading the model
                return self._core.compile_model(str(xml), "CPU", self._config)
            except RuntimeError:  # a damaged cache entry: convert again and replace it
                xml.unlink(missing_ok=True)
        model = self._convert(shape)
        if self._weights_key is not None and self._save(model, shape):
            return self._core.compile_model(str(self._ir_name(shape)), "CPU", self._config)  # the blob later runs find
        return self._core.compile_model(model, "CPU", self._config)

    def _convert(self, shape: list[int]):
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # OpenVINO traces with torch.jit
            return self._ov.convert_model(self._network.eval(), example_input=torch.zeros(shape), input=[shape])

    def _ir_name(self, shape: list[int]) -> Path:
        from dicom_heatmap._version import __version__

        name = hashlib.sha256("|".join(map(str, (
            self._weights_key, shape, list(self._network.conv_widths), self._ov.__version__, torch.__version__, __version__,
        ))).encode()).hexdigest()[:32]
        return cache_dir() / f"openvino-{name}.xml"

    def _cached_ir(self, shape: list[int]) -> Path | None:
        if self._weights_key is None:
            return None
        xml = self._ir_name(shape)
        return xml if xml.is_file() and xml.with_suffix(".bin").is_file() else None

    def _save(self, model, shape: list[int]) -> bool:
        xml = self._ir_name(shape)
        try:
            xml.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".openvino-", dir=xml.parent))
            try:
                # weights kept exact (the default would store them as fp16)
                self._ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
                os.replace(staging / "model.bin", xml.with_suffix(".bin"))  # the .xml last: it marks the entry complete
                os.replace(staging / "model.xml", xml)
            finally:
                for leftover in staging.glob("*"):
                    leftover.unlink()
                staging.rmdir()
        except OSError:
            return False  # no cache this time
        return True


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)

"""Where the 13 conv layers run: torch, or OpenVINO on a CPU.

OpenVINO earns its place by measurement: on this project's CPUs (Intel Xeon with AMX) its
bf16 conv layers score about 2.5x as many 224 px tiles per second as torch's bf16 autocast
and 1.5x as many at the model's 48 px (``dicom-heatmap bench`` prints both in one run),
and its scores stay within the accuracy guard of the fp32 reference (a test checks it).
Only the conv layers and their pooled taps run there; the 13 heads and the fusion stay
in fp32 torch, so both backends share one scoring code.

The network is converted with a dynamic batch and tile size (about 1.7 s, tracing the
torch module) and the result is kept in a cache folder keyed by the weights' checksum and
the versions involved, so later runs read it in a fraction of that; a static-shape copy
is compiled per batch shape on first use (tens of milliseconds) because dynamic shapes
run several times slower. The cache folder is ``$DICOM_HEATMAP_CACHE``, else
``$XDG_CACHE_HOME/dicom-heatmap``, else ``~/.cache/dicom-heatmap``; when it cannot be
written the network is simply converted every time.
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
from torch import nn

from dicom_heatmap.errors import ConfigurationError
from dicom_heatmap.network import HeadedVGG16

__all__ = ["BACKENDS", "openvino_available", "cache_dir", "OpenVinoExtractor"]

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


class _PooledTaps(nn.Module):
    """The conv layers with the 13 pooled taps concatenated: what OpenVINO converts."""

    def __init__(self, network: HeadedVGG16) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.network.extract(x)
        return torch.cat(pooled, dim=1)


class OpenVinoExtractor:
    """The pooled taps of a network, computed by OpenVINO on the CPU.

    Args:
        network: the eval-mode network with batch norm folded.
        precision: ``fp32`` (OpenVINO is told to keep f32; it would pick bf16 on its own
            on these CPUs) or ``bf16``.
        threads: CPU threads for inference (``None``: torch's current setting, so worker
            processes that share the cores do not oversubscribe them).
        weights_key: identifies the weights (the model file's checksum), so the converted
            network can be cached; ``None``: convert without the cache.
    """

    def __init__(self, network: HeadedVGG16, precision: str, threads: int | None = None,
                 weights_key: str | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigurationError(f"the openvino backend runs fp32 or bf16, not {precision}")
        import openvino as ov

        self._ov = ov
        self._core = ov.Core()
        self._widths = list(network.conv_widths)
        self._model = self._cached_model(network, weights_key)
        self._config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        }
        self._requests: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()

    def _convert(self, network: HeadedVGG16):
        size = int(network.input_size)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # OpenVINO traces with torch.jit
            module = _PooledTaps(network).eval()
            return self._ov.convert_model(module, example_input=torch.zeros(1, 3, size, size), input=[(-1, 3, -1, -1)])

    def _cached_model(self, network: HeadedVGG16, weights_key: str | None):
        if weights_key is None:
            return self._convert(network)
        from dicom_heatmap._version import __version__

        name = hashlib.sha256("|".join(map(str, (
            weights_key, int(network.input_size), self._widths, self._ov.__version__, torch.__version__, __version__,
        ))).encode()).hexdigest()[:32]
        folder = cache_dir()
        xml, binary = folder / f"openvino-{name}.xml", folder / f"openvino-{name}.bin"
        if xml.is_file() and binary.is_file():
            try:
                return self._core.read_model(str(xml))
            except Exception:  # a damaged cache entry: convert again and replace it
                pass
        model = self._convert(network)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".openvino-", dir=folder))
            try:
                # weights kept exact (the default would store them as fp16)
                self._ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
                os.replace(staging / "model.bin", binary)  # the .xml last: it marks the entry complete
                os.replace(staging / "model.xml", xml)
            finally:
                for leftover in staging.glob("*"):
                    leftover.unlink()
                staging.rmdir()
        except OSError:
            pass  # no cache this time
        return model

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 13 pooled taps, each (N, C_i) float32, of normalised input (N, 3, S, S)."""
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        # One compiled model and one reused infer request per shape: a fresh request per
        # call made memory grow with the number of batches (1 GB more on a 40k slide).
        with self._lock:
            request = self._requests.get(batch.shape)
            if request is None:
                model = self._model.clone()
                model.reshape(list(batch.shape))
                request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
                self._requests[batch.shape] = request
            taps = np.array(request.infer({0: batch})[0], dtype=np.float32)
        return list(torch.from_numpy(taps).split(self._widths, dim=1))

"""Batched tile scoring with a trained :class:`HeadedVGG16`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dicom_heatmap.checksum import file_sha256
from dicom_heatmap.domain import HE_DOMAIN, ModelDomain
from dicom_heatmap.errors import ConfigurationError, ModelError
from dicom_heatmap.network import HeadedVGG16
from dicom_heatmap.runtime import BACKENDS, OpenVinoNetwork, openvino_available

__all__ = ["TileScorer", "TileScores", "DEFAULT_MODEL_PATH", "PRECISIONS", "fast_precision"]

#: What ``precision`` may be: ``auto`` picks the fastest that keeps the scores right.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: The shipped model: a state dict of :class:`HeadedVGG16`.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "model.pt"


@dataclass
class TileScores:
    """Scores of a batch of tiles.

    Attributes:
        scores: (N,) float32 fused tumour score in [0, 1].
        layer_probabilities: (N, 13) float32 tumour probability of each conv layer's head.
    """

    scores: np.ndarray
    layer_probabilities: np.ndarray


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_precision(device: torch.device) -> str:
    """The precision ``auto`` means on ``device``: fp16 on a CUDA GPU; bf16 on a CPU with
    native bf16 instructions (avx512_bf16 or AMX); fp32 otherwise (emulated bf16 is slower)."""
    if device.type == "cuda":
        return "fp16"
    return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def _as_tile_list(tiles: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray] | np.ndarray:
    """What users pass, as tiles of uint8 RGB: a batch, one tile, floats in 0..1."""
    if isinstance(tiles, np.ndarray) and tiles.ndim == 3 and tiles.shape[-1] == 3:
        tiles = tiles[None]  # one tile
    if isinstance(tiles, np.ndarray) and tiles.ndim == 4 and tiles.shape[-1] == 3 and tiles.dtype == np.uint8:
        return tiles  # the common case: no copy
    converted = []
    for tile in tiles:
        tile = np.asarray(tile)
        if tile.ndim != 3 or tile.shape[2] != 3:
            raise ValueError(f"tiles must be RGB: an (N, H, W, 3) array, one (H, W, 3) tile or a list of them; "
                             f"got a tile of shape {tile.shape}")
        if tile.dtype != np.uint8:
            tile = tile.astype(np.float32)
            if tile.size and float(np.nanmax(tile)) <= 1.0:
                tile = tile * 255.0  # floats in 0..1
            tile = np.clip(np.nan_to_num(tile), 0, 255).round().astype(np.uint8)
        converted.append(tile)
    return converted


class TileScorer:
    """Scores uint8 RGB tiles of any size; resizing and normalisation are its own.

    Build one with :meth:`load`. ``network`` is the eval-mode network with batch norm
    folded; ``checksum`` is the sha256 of the model file (it enters output UIDs).
    ``field_of_view_um`` is the physical side of the tiles the model was trained on (stored
    in the model file): :func:`dicom_heatmap.analyze` scores patches of that side where the
    source's pixel spacing is known (a radiology model: grid tiles of that side).
    ``domain`` is what the model file declares it was trained on
    (:class:`~dicom_heatmap.domain.ModelDomain`).

    The network runs in ``precision`` on ``backend``: torch (the conv layers in bf16 or
    fp16 through autocast, channels-last; the 13 heads and the fusion in fp32) or OpenVINO
    (CPU: the whole network as one graph; see :mod:`dicom_heatmap.runtime`). ``fp32`` on
    torch is the reference path.

    Args:
        network: a :class:`HeadedVGG16`.
        checksum: identifies the weights in outputs and provenance.
        batch_size: tiles per forward pass (OpenVINO pads a shorter batch to it).
        precision: one of :data:`PRECISIONS`.
        device: ``"cpu"``, ``"cuda"``, or ``None`` for a GPU when there is one.
        backend: one of :data:`~dicom_heatmap.runtime.BACKENDS`; ``auto`` is OpenVINO
            for bf16 on a CPU where it is installed, torch otherwise (fp32 stays on torch,
            the reference, unless ``openvino`` is asked for).
    """

    #: the H&E model's where a network declares none
    domain: ModelDomain = HE_DOMAIN

    def __init__(self, network: HeadedVGG16, checksum: str, batch_size: int = 64, precision: str = "auto",
                 device: str | torch.device | None = None, backend: str = "auto") -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be positive, got {batch_size}")
        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise ConfigurationError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = fast_precision(self.device) if precision == "auto" else precision
        if backend == "auto":
            backend = ("openvino" if self.device.type == "cpu" and self.precision == "bf16" and openvino_available()
                       else "torch")
        if backend == "openvino":
            if self.device.type != "cpu" or self.precision not in ("fp32", "bf16"):
                raise ConfigurationError(f"the openvino backend runs on the CPU in fp32 or bf16, not {self.precision} "
                                         f"on {self.device.type}")
            if not openvino_available():
                raise ConfigurationError("the openvino backend needs the openvino package (pip install openvino)")
        self.backend = backend
        self._openvino: OpenVinoNetwork | None = None
        self.network = network.eval().to(self.device)
        if backend == "torch":  # what torch's conv kernels run fastest on; OpenVINO takes the weights as they are
            self.network = self.network.to(memory_format=torch.channels_last)
        self.checksum = checksum
        self.batch_size = batch_size
        self.input_size = int(network.input_size)
        self.field_of_view_um = float(network.field_of_view_um)
        self.domain = network.model_domain

    @property
    def identity(self) -> str:
        """The weights, the precision and the runtime: all change the scores, so all enter output UIDs."""
        return f"{self.checksum}/{self.precision}" + ("/openvino" if self.backend == "openvino" else "")

    @classmethod
    def load(cls, path: str | Path | None = None, network: HeadedVGG16 | None = None, batch_size: int = 64,
             precision: str = "auto", device: str | torch.device | None = None, backend: str = "auto") -> "TileScorer":
        """Load a model file (a state dict of :class:`HeadedVGG16`, or a training checkpoint).

        Args:
            path: the model file; the shipped ``models/model.pt`` when ``None``.
            network: a network to load the weights into (the bundle's ``network_def``);
                by default one of the shape the state dict describes. Its batch norm is
                folded in place, so it is for inference from then on.
            batch_size: tiles per forward pass.
            precision: one of :data:`PRECISIONS`.
            device: ``"cpu"``, ``"cuda"``, or ``None`` for a GPU when there is one.
            backend: ``auto``, ``torch`` or ``openvino`` (see the class).
        """
        path = Path(path) if path is not None else DEFAULT_MODEL_PATH
        if not path.is_file():
            raise ModelError(path, "the model file does not exist; pass --model PATH or train one with `dicom-heatmap train`")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several kinds on a damaged file
            raise ModelError(path, f"cannot read the model file ({type(error).__name__}); is it a torch state dict?") from None
        if isinstance(state, dict) and "network" in state and "optimizer" in state:
            state = state["network"]  # a training checkpoint
        if not isinstance(state, dict):
            raise ModelError(path, "the file does not hold a state dict")
        try:
            if network is None:
                network = HeadedVGG16.from_state_dict(state)
            else:
                network.load_weights(state)
        except (ValueError, RuntimeError) as error:
            raise ModelError(path, f"the weights do not fit the 13-head VGG16 ({str(error).splitlines()[0]})") from None
        try:
            network.model_domain  # noqa: B018 - a damaged domain record is refused here, with the file named
        except ValueError as error:
            raise ModelError(path, str(error)) from None
        network.eval().fold_batch_norm()
        return cls(network, file_sha256(path), batch_size, precision, device, backend)

    def _prepare(self, tiles: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 tiles -> normalised (N, 3, S, S) float tensor at the network's size.

        Tiles of one shape are resized together (one interpolation per shape, not per tile).
        """
        size = self.input_size
        tiles = [np.asarray(tile) for tile in tiles]
        for tile in tiles:
            if tile.ndim != 3 or tile.shape[2] != 3:
                raise ValueError(f"tiles must be (H, W, 3) RGB, got shape {tile.shape}")
        batch = torch.empty(len(tiles), 3, size, size)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tile in enumerate(tiles):
            by_shape.setdefault(tile.shape, []).append(index)
        for shape, indices in by_shape.items():
            group = torch.from_numpy(np.stack([tiles[i] for i in indices])).permute(0, 3, 1, 2).float()  # a copy
            if shape[:2] != (size, size):
                group = F.interpolate(group, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            batch[indices] = group
        return self.network.normalize(batch.to(self.device)).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def score_details(self, tiles: np.ndarray | Sequence[np.ndarray]) -> TileScores:
        """Fused scores and the 13 per-layer probabilities of ``tiles``.

        Args:
            tiles: (N, H, W, 3) RGB array, one (H, W, 3) tile, or a sequence of (H, W, 3)
                tiles of any sizes; uint8 0..255, or float 0..1 (scaled to 0..255; floats
                above 1 are read as 0..255).

        Raises:
            ValueError: a tile that is not (H, W, 3) RGB, naming its shape.
        """
        tiles = _as_tile_list(tiles)
        count = len(tiles)
        scores = np.empty(count, dtype=np.float32)
        layers = np.empty((count, self.network.num_layers), dtype=np.float32)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        for start in range(0, count, self.batch_size):
            x = self._prepare(tiles[start : start + self.batch_size])
            if self.backend == "openvino":
                output = self._openvino_network()(x.numpy())
            else:
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    pooled, _ = self.network.extract(x)
                output = self.network.score_taps(pooled).cpu().numpy()
            scores[start : start + len(output)] = output[:, 0]
            layers[start : start + len(output)] = output[:, 1:]
        return TileScores(scores, layers)

    def _openvino_network(self) -> OpenVinoNetwork:
        if self._openvino is None:  # compiled on first use: loading a scorer stays cheap
            self._openvino = OpenVinoNetwork(self.network, self.precision, self.batch_size, weights_key=self.checksum)
        return self._openvino

    def score(self, tiles: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N,) float32 tumour scores in [0, 1] of RGB tiles (see :meth:`score_details`)."""
        return self.score_details(tiles).scores

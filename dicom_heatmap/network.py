"""The tile network of the method: VGG16 with a binary head on each of its 13 conv layers.

``HeadedVGG16`` is one ``torch.nn.Module`` holding

* ``features`` - the 13 conv layers of VGG16 (3x3, stride 1, same padding), each
  followed by batch normalisation and a ReLU, with the 5 max-pool layers (2x2, stride 2);
* ``classifier`` - the 3 fully connected layers, used to train the extractor (stage 1);
* ``heads`` - 13 binary classifiers, head ``i`` on the global-average-pooled output of
  conv ReLU ``i``: ``Linear(C_i, 512) -> ReLU -> Linear(512, 2)``;
* ``fusion`` - the same shape of classifier on the 13 head tumour probabilities;
* ``context`` - the whole-slide stage (:class:`dicom_heatmap.context.PatchContext`), which
  refines a map of patch scores from each patch's neighbours; untrained (and unused) in a
  model file without ``context.*`` weights.

The tile score is the fusion's softmax probability of the tumour class (index 1).
``forward`` returns one tensor (N, 14): column 0 the tile score, columns 1-13 the heads'
tumour probabilities, so the network exports to TorchScript and checks as a MONAI bundle.
Input size, intensity normalisation, field of view, the optional per-tile stain
normalisation and the model's domain (:class:`dicom_heatmap.domain.ModelDomain`) are
buffers, so a state dict describes itself.
"""

from __future__ import annotations

import torch
from torch import nn

from dicom_heatmap.context import PatchContext
from dicom_heatmap.domain import ModelDomain
from dicom_heatmap.stain import normalise_stains

__all__ = ["VGG16_CONV_WIDTHS", "HeadedVGG16", "BinaryHead", "OUTPUT_CHANNELS", "DEFAULT_FIELD_OF_VIEW_UM", "DEFAULT_INPUT_SIZE"]

#: Output channels of the 13 conv layers; "M" marks a 2x2 max pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_CONV_WIDTHS = tuple(c for c in VGG16_LAYOUT if c != "M")
HIDDEN_UNITS = 512
TUMOUR = 1
#: Side in pixels of the network's square input (the shipped model's).
DEFAULT_INPUT_SIZE = 48
#: Physical side of the IDC training tiles (50 px of a 40x slide downsampled 16:1), in micrometres.
DEFAULT_FIELD_OF_VIEW_UM = 200.0
#: Columns of the forward output: the fused score, then the 13 head probabilities.
OUTPUT_CHANNELS = 14


def _text_tensor(text: str) -> torch.Tensor:
    """UTF-8 text as a uint8 tensor: a state dict holds tensors only (it loads with ``weights_only``)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


class BinaryHead(nn.Sequential):
    """``Linear(in, 512) -> ReLU -> Linear(512, 2)``: the method's small binary classifier."""

    def __init__(self, in_features: int, hidden: int = HIDDEN_UNITS) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))


class HeadedVGG16(nn.Module):
    """VGG16 whose 13 conv layers each feed a binary head, fused into one tile score.

    Args:
        input_size: side in pixels of the square tile the network expects; tiles of
            other sizes are resized by :class:`dicom_heatmap.TileScorer`.
        width_multiplier: scales every conv width (1.0 is VGG16; smaller values are for
            experiments only).
        batch_norm: put batch normalisation after each conv (folded for inference).
        dropout: dropout between the fully connected layers of the stage-1 classifier.
        mean: per-channel mean of the input after scaling 0..255 to 0..1.
        std: per-channel standard deviation, as ``mean``.
        field_of_view_um: the physical side of the tiles the network was trained on, in
            micrometres (the IDC tiles: 50 px at about 4 um per pixel). It is stored with
            the weights; :class:`dicom_heatmap.TileScorer` cuts patches of this side from
            sources whose pixel spacing is known.
        stain_reference: haematoxylin and eosin amounts (optical density) to which
            :meth:`normalize` scales each tile's 99th percentiles
            (:func:`dicom_heatmap.stain.normalise_stains`); ``None`` feeds tiles as they are.
        domain: what the model is trained on (:class:`dicom_heatmap.domain.ModelDomain`),
            stored as the ``domain`` buffer; ``None`` stores none, which reads as the H&E
            model's domain.
    """


    #: TorchScript leaves it out (it returns a Python dataclass; scoring does not need it)
    __jit_unused_properties__ = ["model_domain"]

    def __init__(
        self,
        input_size: int = DEFAULT_INPUT_SIZE,
        width_multiplier: float = 1.0,
        batch_norm: bool = True,
        dropout: float = 0.5,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.25, 0.25, 0.25),
        field_of_view_um: float = DEFAULT_FIELD_OF_VIEW_UM,
        stain_reference: tuple[float, float] | None = None,
        domain: ModelDomain | None = None,
    ) -> None:
        super().__init__()
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32 (five 2x2 pools), got {input_size}")
        if not 0 < width_multiplier <= 1:
            raise ValueError(f"width_multiplier must lie in (0, 1], got {width_multiplier}")
        if not 10 <= field_of_view_um <= 100_000:
            raise ValueError(f"field_of_view_um must lie in 10..100000 micrometres, got {field_of_view_um}")
        if stain_reference is not None and (len(stain_reference) != 2 or not all(0 < v < 10 for v in stain_reference)):
            raise ValueError(f"stain_reference must be two optical densities in (0, 10), got {stain_reference}")
        widths = [max(8, int(round(c * width_multiplier))) for c in VGG16_CONV_WIDTHS]
        self.conv_widths = tuple(widths)
        self.tumour = TUMOUR  # an attribute, not the global, so TorchScript compiles ``forward``

        # Buffers, so that a saved state dict carries how to feed the network.
        self.register_buffer("input_size", torch.tensor(input_size, dtype=torch.int64))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("field_of_view_um", torch.tensor(float(field_of_view_um), dtype=torch.float32))
        # zeros: no stain normalisation (every model before it was measured)
        self.register_buffer("stain_reference", torch.tensor(stain_reference or (0.0, 0.0), dtype=torch.float32))
        self.register_buffer("domain", _text_tensor(domain.to_json() if domain is not None else ""))

        layers: list[nn.Module] = []
        self.tap_indices = []  # index in ``features`` of each conv's ReLU
        in_channels = 3
        conv = iter(widths)
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = next(conv)
            layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            self.tap_indices.append(len(layers) - 1)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)

        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, HIDDEN_UNITS),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN_UNITS, HIDDEN_UNITS),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN_UNITS, 2),
        )
        self.heads = nn.ModuleList(BinaryHead(c) for c in widths)
        self.fusion = BinaryHead(len(widths))
        if not self.features[0].weight.is_meta:  # built to be filled from a state dict (from_state_dict)
            self._init_weights()
        self.context = PatchContext()  # after _init_weights: its own initialisation leaves scores as they are

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    @property
    def num_layers(self) -> int:
        return len(self.conv_widths)

    def normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        """Scale (N, 3, H, W) values in 0..255 (any dtype) to the network's input, first
        normalising each tile's stains where the network was trained so."""
        if self.stain_normalised:
            tiles = normalise_stains(tiles, self.stain_reference)
        return (tiles.float() / 255.0 - self.mean) / self.std

    @property
    def model_domain(self) -> ModelDomain:
        """The domain the model file declares (the H&E model's where it declares none)."""
        if self.domain.is_meta:
            raise ValueError("the network's weights are not loaded yet")
        return ModelDomain.from_json(bytes(self.domain.tolist()).decode("utf-8"))

    def set_domain(self, domain: ModelDomain) -> "HeadedVGG16":
        """Declare what the model is trained on (stored with the weights)."""
        self.domain = _text_tensor(domain.to_json()).to(self.field_of_view_um.device)
        return self

    @property
    def stain_normalised(self) -> bool:
        """Whether :meth:`normalize` normalises each tile's stains (see ``stain_reference``)."""
        return bool(self.stain_reference.gt(0).all())

    def extract(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the conv layers on normalised input.

        Returns:
            the 13 pooled taps, each (N, C_i) in float32, and the last feature map.
        """
        pooled: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.tap_indices:  # a list, not a set: TorchScript compiles list membership only
                pooled.append(x.float().mean(dim=(2, 3)))
        return pooled, x

    def head_probabilities(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(N, 13) tumour probability of each head from the pooled taps."""
        probs: list[torch.Tensor] = []
        for index, head in enumerate(self.heads):  # enumerate, not zip: TorchScript iterates a ModuleList only so
            probs.append(torch.softmax(head(pooled[index].float()), dim=1)[:, self.tumour])
        return torch.stack(probs, dim=1)

    def score_taps(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """(N, 14) from the pooled taps: the fused score, then the 13 head probabilities (float32)."""
        layer_probabilities = self.head_probabilities(pooled)
        score = torch.softmax(self.fusion(layer_probabilities), dim=1)[:, self.tumour : self.tumour + 1]
        return torch.cat([score, layer_probabilities], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score normalised tiles (N, 3, S, S): (N, 14), the fused score then the 13 head probabilities."""
        pooled, _ = self.extract(x)
        return self.score_taps(pooled)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "HeadedVGG16":
        """Build a network of the shape a state dict describes and load it."""
        try:
            input_size = int(state["input_size"])
            first_width = state["features.0.weight"].shape[0]
            batch_norm = "features.1.running_mean" in state
        except KeyError as missing:
            raise ValueError(f"not a HeadedVGG16 state dict: key {missing} is missing") from None
        with torch.device("meta"):  # no memory and no random initialisation: the state dict fills every tensor
            net = cls(input_size=input_size, width_multiplier=first_width / VGG16_CONV_WIDTHS[0], batch_norm=batch_norm,
                      field_of_view_um=float(state.get("field_of_view_um", DEFAULT_FIELD_OF_VIEW_UM)))
        # (the stain reference needs no argument: load_weights copies the buffer)
        return net.load_weights(state)

    def compact_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as the project stores models: the conv kernels from the second
        layer on and the stage-1 classifier (not used for scoring) in fp16; the first conv
        kernel, batch norm, the 13 heads and the fusion, to which the scores are most
        sensitive, in fp32.

        Measured on the 0.5.0 model over all 8,011 IDC tiles: scores move by at most 0.0003
        from the fp32 weights; the first kernel in fp16 too moved them by 0.0011 (above the
        project's 1e-3), nearly all of it from that one 3-channel layer. 39 MB instead of 70.
        """
        state = self.state_dict()
        kernels = [name for name, tensor in state.items() if name.startswith("features.") and tensor.ndim == 4]
        halved = set(kernels[1:]) | {name for name, tensor in state.items()
                                     if name.startswith("classifier.") and tensor.is_floating_point()}
        return {name: (tensor.half() if name in halved else tensor).contiguous() for name, tensor in state.items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> "HeadedVGG16":
        """Load a state dict, stored weights in any float precision (see :meth:`compact_state_dict`)."""
        # model files from before 1.2 do not store their field of view (theirs is the IDC
        # tile's) and those from before 1.4 no stain reference (they take tiles as they are)
        # and those from before 1.5 no context stage (their scores are used as they are)
        with torch.device("cpu"):
            untrained_context = {f"context.{name}": value for name, value in PatchContext().state_dict().items()}
            state = {"field_of_view_um": torch.tensor(DEFAULT_FIELD_OF_VIEW_UM), "stain_reference": torch.zeros(2),
                     "domain": _text_tensor(""), **untrained_context, **state}
        on_meta = any(tensor.is_meta for tensor in self.state_dict().values())  # built by from_state_dict
        self.domain = state["domain"].clone()  # the record's length is the file's, not the one this network was built with
        self.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=on_meta)
        return self

    def fold_batch_norm(self) -> "HeadedVGG16":
        """Fold each batch norm into the conv before it (inference only; in place)."""
        layers = list(self.features)
        folded: list[nn.Module] = []
        taps: list[int] = []
        index = 0
        while index < len(layers):
            layer = layers[index]
            if isinstance(layer, nn.Conv2d) and index + 1 < len(layers) and isinstance(layers[index + 1], nn.BatchNorm2d):
                bn = layers[index + 1]
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=True, device="meta")
                with torch.no_grad():
                    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                    conv.weight = nn.Parameter(layer.weight * scale.view(-1, 1, 1, 1))
                    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
                folded.append(conv)
                index += 2
                continue
            folded.append(layer)
            if isinstance(layer, nn.ReLU):
                taps.append(len(folded) - 1)
            index += 1
        self.features = nn.Sequential(*folded)
        self.tap_indices = taps
        return self

"""Three-stage training of :class:`dicom_heatmap.network.HeadedVGG16` (the README's "The method").

1. extractor: the VGG16 with its 3 fully connected layers as a tumour / non-tumour
   tile classifier, on the extractor folds, with flips, 90 degree rotations, random
   crops, H&E colour jitter and random erasing;
2. heads: extractor frozen, the 13 heads on the pooled activations of patients the
   extractor never saw (first half of the head folds' patients);
3. fusion: heads frozen, the fusion head on the other half of those patients.

Every epoch writes a checkpoint (``OUT/checkpoint.pt``); a stopped run resumes from it.
A fixed seed gives the same model. The result is ``OUT/model.pt`` (a state dict).

Run by ``dicom-heatmap train`` and the bundle's ``configs/train.json``; what each stage
trains on is planned in :mod:`pipelines.training.plan`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dicom_heatmap.errors import InputError
from dicom_heatmap.network import TUMOUR, HeadedVGG16
from dicom_heatmap.stain import jitter_stains, stain_percentiles
from pipelines.training.metrics import roc_auc
from pipelines.training.plan import STAGES, TrainSettings, stage_sets
from pipelines.training.tile_data import TileTable, load_tile_table

__all__ = ["stain_reference", "train"]


def stain_reference(extractor_set: TileTable, seed: int, sample: int = 4000) -> tuple[float, float]:
    """The median over (a sample of) the extractor's tiles of each tile's 99th percentile of
    haematoxylin and of eosin: the target of the per-tile stain normalisation."""
    rng = np.random.default_rng(seed)  # its own stream: the training draws stay as they were
    index = np.sort(rng.choice(len(extractor_set), min(sample, len(extractor_set)), replace=False))
    tiles = torch.from_numpy(extractor_set.images[index]).permute(0, 3, 1, 2)
    reference = stain_percentiles(tiles).median(dim=0).values
    return round(float(reference[0]), 4), round(float(reference[1]), 4)


def _augment(batch: torch.Tensor, size: int, generator: torch.Generator, jitter: float = 1.0,
             stain: float = 0.0) -> torch.Tensor:
    """Random crop, flips, 90 degree rotation, stain jitter (``stain``: its sigma, 0 = off),
    colour jitter (its ranges scaled by ``jitter``) and erasing; uint8 NHWC -> float NCHW 0..255."""
    n, height, width, _ = batch.shape
    x = batch.permute(0, 3, 1, 2).float()
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        scale = 0.75 + 0.25 * torch.rand(1, generator=generator).item()
        crop = max(8, int(round(min(height, width) * math.sqrt(scale))))
        top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
        tile = x[i : i + 1, :, top : top + crop, left : left + crop]
        tile = F.interpolate(tile, size=(size, size), mode="bilinear", align_corners=False)[0]
        if torch.rand(1, generator=generator) < 0.5:
            tile = tile.flip(2)
        tile = torch.rot90(tile, int(torch.randint(0, 4, (1,), generator=generator)), dims=(1, 2))
        out[i] = tile
    if stain > 0:  # drawn only when asked, so that stain 0 keeps the random stream of the models before 1.0
        out = jitter_stains(out, stain, generator)
    # H&E colour jitter: brightness, contrast, saturation and a small per-channel shift
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    # (written so that jitter 1 computes exactly what the shipped model was trained with)
    brightness = (1 - 0.15 * jitter) + 0.3 * jitter * rand(n, 1, 1, 1)
    contrast = (1 - 0.2 * jitter) + 0.4 * jitter * rand(n, 1, 1, 1)
    saturation = (1 - 0.2 * jitter) + 0.4 * jitter * rand(n, 1, 1, 1)
    shift = (rand(n, 3, 1, 1) - 0.5) * (16 * jitter)
    out = out * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean
    grey = out.mean(dim=1, keepdim=True)
    out = (out - grey) * saturation + grey + shift
    # random erasing: hide a random rectangle with noise, half of the tiles
    for i in range(n):
        if torch.rand(1, generator=generator) < 0.5:
            eh = int(torch.randint(size // 8, size // 2, (1,), generator=generator))
            ew = int(torch.randint(size // 8, size // 2, (1,), generator=generator))
            top = int(torch.randint(0, size - eh + 1, (1,), generator=generator))
            left = int(torch.randint(0, size - ew + 1, (1,), generator=generator))
            out[i, :, top : top + eh, left : left + ew] = 255 * rand(3, eh, ew)
    return out.clamp_(0, 255)


def _resize(batch: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def epoch_order(labels: np.ndarray, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """The tile indices of one stage-1 epoch: a permutation, or with ``balanced`` as many
    draws (with replacement) in which each class comes up equally often on average."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    per_tile = 1.0 / np.bincount(labels, minlength=2).clip(1)[labels]
    return torch.multinomial(torch.from_numpy(per_tile), len(labels), replacement=True, generator=generator)


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    return torch.tensor(len(labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


@torch.no_grad()
def tap_features(net: HeadedVGG16, table: TileTable, settings: TrainSettings) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled taps (13 tensors (N, C_i)) and stage-1 logits for every tile, no augmentation."""
    net.eval()
    pooled_parts: list[list[torch.Tensor]] = [[] for _ in range(net.num_layers)]
    logits = []
    for start in tqdm(range(0, len(table), 128), desc="activations", unit="batch", leave=False):
        x = net.normalize(_resize(table.images[start : start + 128], settings.input_size))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            pooled, last = net.extract(x.contiguous(memory_format=torch.channels_last))
            logits.append(net.classifier(last).float())
        for i, tap in enumerate(pooled):
            pooled_parts[i].append(tap.float())
    return [torch.cat(p) for p in pooled_parts], torch.cat(logits)


def _fit_small(module: torch.nn.Module, inputs, labels: np.ndarray, epochs: int, generator: torch.Generator, desc: str) -> None:
    """Fit a head (or all heads at once) with Adam on fixed inputs; ``inputs`` is a callable of indices."""
    weights = _class_weights(labels)
    target = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-4)
    module.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 128):
            index = order[start : start + 128]
            loss = inputs(index, target[index], weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    module.eval()


def _fit_heads(heads: torch.nn.ModuleList, pooled: list[torch.Tensor], labels: np.ndarray, epochs: int,
               generator: torch.Generator, desc: str) -> None:
    """Fit the 13 heads, each on its own layer's pooled activations, all in one loop."""
    heads.requires_grad_(True)

    def loss(index, target, weights):
        return sum(F.cross_entropy(head(tap[index]), target, weight=weights) for head, tap in zip(heads, pooled))

    _fit_small(heads, loss, labels, epochs, generator, desc)
    heads.requires_grad_(False)


#: What :func:`stage_sets` returns, in this order
def _resume(checkpoint_path: Path, net: HeadedVGG16, optimizer, scheduler, generator: torch.Generator) -> tuple[int, list]:
    """Restore stage 1 from its checkpoint where one exists; returns the epochs done and the
    history so far. Loaded with ``weights_only`` (tensors and plain values only): a
    checkpoint from elsewhere cannot run code."""
    if not checkpoint_path.exists():
        return 0, []
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged, or holding objects beyond tensors and plain values
        raise InputError(checkpoint_path, f"cannot resume from this checkpoint ({type(error).__name__}); "
                                          "delete it to train from the start") from None
    net.load_weights(checkpoint["network"])  # a checkpoint from before 1.2 lacks the field of view
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    generator.set_state(checkpoint["generator"])
    torch.set_rng_state(checkpoint["torch_rng"])
    print(f"resuming from {checkpoint_path} after epoch {checkpoint['epoch']}")
    return checkpoint["epoch"], checkpoint["history"]


def _save_checkpoint(checkpoint_path: Path, net: HeadedVGG16, optimizer, scheduler, generator: torch.Generator,
                     history: list[dict]) -> None:
    """Everything stage 1 needs to resume after ``history``'s last epoch, written whole or not at all."""
    temporary = checkpoint_path.with_suffix(".tmp")
    torch.save({"network": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": history[-1]["epoch"],
                "history": history}, temporary)
    temporary.replace(checkpoint_path)


def _train_extractor(net: HeadedVGG16, extractor_set: TileTable, validation_set: TileTable, settings: TrainSettings,
                     generator: torch.Generator, checkpoint_path: Path) -> tuple[list[dict], float]:
    """Stage 1: the extractor with its FC layers as a tile classifier, a checkpoint every epoch.

    Resumes from ``checkpoint_path`` when it exists. Returns the per-epoch history (loss,
    AUC of the classifier on ``validation_set``, patients stage 1 never saw) and the
    seconds this call trained.
    """
    # every parameter but the whole-slide stage's, trained later on whole slides: the same
    # group as before 1.5, so a checkpoint written then resumes
    tile_parameters = [parameter for name, parameter in net.named_parameters() if not name.startswith("context.")]
    optimizer = torch.optim.SGD(
        tile_parameters, lr=settings.learning_rate, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay
    )
    steps_per_epoch = math.ceil(len(extractor_set) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=settings.epochs * steps_per_epoch, pct_start=0.15
    )
    first_epoch, history = _resume(checkpoint_path, net, optimizer, scheduler, generator)
    # The classes are balanced either in the loss (weights) or in what is drawn (each
    # class half of every epoch, tiles drawn with replacement), never both.
    weights = None if settings.balanced_sampling else _class_weights(extractor_set.labels)
    labels = torch.from_numpy(extractor_set.labels)
    images = torch.from_numpy(extractor_set.images)
    started = time.time()
    for epoch in range(first_epoch, settings.epochs):
        net.train()
        order = epoch_order(extractor_set.labels, settings.balanced_sampling, generator)
        bar = tqdm(range(0, len(order), settings.batch_size), desc=f"stage 1 epoch {epoch + 1}/{settings.epochs}", unit="batch")
        running = 0.0
        for step, start in enumerate(bar):
            index = order[start : start + settings.batch_size]
            if len(index) < 2:
                continue
            x = net.normalize(_augment(images[index], settings.input_size, generator, settings.colour_jitter,
                                       settings.stain_jitter))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                pooled, last = net.extract(x.contiguous(memory_format=torch.channels_last))
                logits = net.classifier(last).float()
            loss = F.cross_entropy(logits, labels[index], weight=weights, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        _, logits = tap_features(net, validation_set, settings)
        validation_auc = roc_auc(validation_set.labels, torch.softmax(logits, 1)[:, 1].numpy())
        history.append({"epoch": epoch + 1, "loss": running, "validation_auc": validation_auc})
        print(f"stage 1 epoch {epoch + 1}: loss {running:.3f}, AUC on the fusion patients (unseen by stage 1) {validation_auc:.3f}")
        _save_checkpoint(checkpoint_path, net, optimizer, scheduler, generator, history)
    return history, round(time.time() - started, 1)


def _train_heads_and_fusion(net: HeadedVGG16, head_set: TileTable, fusion_set: TileTable, settings: TrainSettings,
                            generator: torch.Generator) -> dict:
    """Stages 2 and 3: the 13 heads with the extractor frozen, then the fusion with the heads
    frozen, on patients the extractor never saw. Returns the tiles each stage was fit on."""
    # Stage 2: one head per conv layer, extractor frozen, on unseen patients
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    head_pooled, fusion_pooled = tap_features(net, head_set, settings)[0], tap_features(net, fusion_set, settings)[0]
    if settings.cross_fit:
        # Each half's heads score the other half, so the fusion learns from heads that never
        # saw its tiles, on every kept patient; the shipped heads are then fit on both halves.
        out_of_fold = []
        for fit_pooled, fit_labels, other_pooled in [(head_pooled, head_set.labels, fusion_pooled),
                                                     (fusion_pooled, fusion_set.labels, head_pooled)]:
            heads = copy.deepcopy(net.heads)  # the same starting weights as the shipped heads
            _fit_heads(heads, fit_pooled, fit_labels, settings.head_epochs, generator, "stage 2 heads (cross-fit)")
            with torch.no_grad():
                out_of_fold.append(torch.stack([torch.softmax(head(tap), dim=1)[:, TUMOUR] for head, tap in zip(heads, other_pooled)], dim=1))
        fusion_inputs = torch.cat(out_of_fold)
        fusion_labels = np.concatenate([fusion_set.labels, head_set.labels])
        both = [torch.cat(pair) for pair in zip(head_pooled, fusion_pooled)]
        _fit_heads(net.heads, both, np.concatenate([head_set.labels, fusion_set.labels]), settings.head_epochs, generator,
                   "stage 2 heads")
    else:
        _fit_heads(net.heads, head_pooled, head_set.labels, settings.head_epochs, generator, "stage 2 heads")
        with torch.no_grad():
            fusion_inputs = net.head_probabilities(fusion_pooled)
        fusion_labels = fusion_set.labels

    # Stage 3: the fusion head on the 13 probabilities, from heads that never saw those tiles
    net.fusion.requires_grad_(True)

    def fusion_loss(index, target, weights):
        return F.cross_entropy(net.fusion(fusion_inputs[index]), target, weight=weights)

    _fit_small(net.fusion, fusion_loss, fusion_labels, settings.fusion_epochs, generator, "stage 3 fusion")
    return {"heads": len(head_set) + (len(fusion_set) if settings.cross_fit else 0), "fusion": len(fusion_labels)}


def _test_metrics(net: HeadedVGG16, test_set: TileTable, settings: TrainSettings) -> dict:
    """AUC of the classifier, of the fusion and of every head on the held-out patients."""
    with torch.no_grad():
        pooled, logits = tap_features(net, test_set, settings)
        layers = net.head_probabilities(pooled)
        fused = torch.softmax(net.fusion(layers), 1)[:, 1]
    return {
        "classifier_auc": roc_auc(test_set.labels, torch.softmax(logits, 1)[:, 1].numpy()),
        "fusion_auc": roc_auc(test_set.labels, fused.numpy()),
        "head_auc": [roc_auc(test_set.labels, layers[:, i].numpy()) for i in range(net.num_layers)],
    }


def train(data: str | Path | TileTable, out_dir: str | Path, settings: TrainSettings | None = None, root: str | Path | None = None,
          network: HeadedVGG16 | None = None, before_save: Callable[[HeadedVGG16, dict, dict], None] | None = None) -> Path:
    """Run the three stages and write ``out_dir/model.pt`` and ``out_dir/training.json``.

    Args:
        data: labels table (columns path, patient_id, label, fold), or its loaded tiles.
        out_dir: folder for the checkpoint, the model and the training record.
        settings: see :class:`TrainSettings`.
        root: folder the table's paths are relative to (the table's folder by default).
        network: the network to train (its domain, field of view and starting weights
            set); by default a new one of ``settings``' shape, from a random start.
        before_save: called with the trained network, the training record and the stage
            sets before the model is written (a radiology run sets the domain's limits).

    Returns:
        the path of the trained state dict.
    """
    settings = settings or TrainSettings()
    table = data if isinstance(data, TileTable) else load_tile_table(data, root)
    sets = stage_sets(table, settings, source="the tile table" if isinstance(data, TileTable) else data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    extractor_set, head_set, fusion_set, test_set = (sets[name] for name in STAGES)
    record = {
        "settings": asdict(settings),
        "tiles": {name: len(part) for name, part in sets.items()},
        "patients": {name: int(len(np.unique(part.patients))) for name, part in sets.items()},
    }

    if network is None:
        reference = stain_reference(extractor_set, settings.seed) if settings.stain_normalisation else None
        network = HeadedVGG16(input_size=settings.input_size, width_multiplier=settings.width_multiplier,
                              stain_reference=reference)
    net = network.to(memory_format=torch.channels_last)
    record["history"], record["stage1_seconds_this_run"] = _train_extractor(net, extractor_set, fusion_set, settings,
                                                                            generator, out_dir / "checkpoint.pt")
    record["tiles_fit"] = _train_heads_and_fusion(net, head_set, fusion_set, settings, generator)
    net.eval()
    if len(test_set):
        record["test"] = _test_metrics(net, test_set, settings)
        print(json.dumps(record["test"], indent=1))
    else:
        print("no held-out patients in the table: no test metrics")
    if before_save is not None:
        before_save(net, record, sets)
    model_path = out_dir / "model.pt"
    state = net.compact_state_dict()
    temporary = model_path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(model_path)
    (out_dir / "training.json").write_text(json.dumps(record, indent=1))
    return model_path

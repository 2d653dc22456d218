"""Training the whole-slide stage: the context network and the per-slide calibration.

Run by ``dicom-heatmap train-context``. The tile model scores patches one by one; on a
whole slide of a patient it never saw, stroma, fat and benign ducts light up and the
scores shift from patient to patient (``docs/model_card.md``). This stage learns, from
whole slides with the pathologist's outline, how a patch's tumour probability follows
from its own 13 layer probabilities and fused score *and those of its neighbours*
(:class:`dicom_heatmap.context.PatchContext`), and checks the per-slide threshold
(:mod:`dicom_heatmap.calibration`) on the refined maps.

The maps it learns from must look like maps of new patients: a model's maps of the
patients it was trained on are too clean. So each whole slide is scored by a model that
never saw its patient where one is given (``--map-model``: the cross-validation runs'
models, each knowing from its ``training.json`` which folds it left out), else by the
model being extended. The held-out patients (``models/held_out_patients.txt``) are in no
map and no fit.

Every slide is rebuilt from its tiles (:func:`pipelines.training.whole_slides.rebuild_slide`) and runs
through the real :func:`dicom_heatmap.api.analyze` path with the context stage off; the
patch maps are cached in ``OUT/maps/`` by model checksum, so a second run does not score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dicom_heatmap.context import LOGIT_CLIP, PatchContext, context_inputs, whole_slide_scores
from dicom_heatmap.scorer import TileScorer
from pipelines.training.whole_slides import analyze_picture, lattice_settings, map_record, read_rows, rebuild_slide

__all__ = ["SlideMap", "slide_map", "cached_slide_maps", "model_unseen_patients", "fit_context", "leave_slides_out",
           "format_report", "train_context", "CONTEXT_EPOCHS"]


@dataclass
class SlideMap:
    """The patch map of one rebuilt slide, as the tile model scored it.

    Attributes:
        patient: the patient ID.
        probabilities: (rows, cols, 14) float32: the fused score, then the 13 layer
            probabilities of each patch; NaN where the patch was not analysed (glass).
        labels: (rows, cols) int8: 1 IDC, 0 other tissue, -1 no tile.
        model: sha256 of the model that scored it.
    """

    patient: str
    probabilities: np.ndarray
    labels: np.ndarray
    model: str

    @property
    def analysed(self) -> np.ndarray:
        return np.isfinite(self.probabilities[..., 0])


def slide_map(labels_csv: str | Path, patient: str, scorer: TileScorer, rows: list[dict] | None = None) -> SlideMap:
    """Rebuild ``patient``'s slide and score it through :func:`dicom_heatmap.api.analyze`
    (50 px patches on the IDC lattice, the context stage off)."""
    slide = rebuild_slide(labels_csv, patient, rows=rows)
    result = analyze_picture(slide.picture, scorer, lattice_settings(context=False))
    patches = result.tile_map.patches if result.tile_map.patches is not None else result.tile_map
    probabilities = np.concatenate([patches.scores[0][..., None], patches.layer_probabilities[0]], axis=-1)
    if probabilities.shape[:2] != slide.labels.shape:
        raise ValueError(f"patient {patient}: the patch map {probabilities.shape[:2]} is not the tile lattice {slide.labels.shape}")
    return SlideMap(patient, probabilities.astype(np.float32), slide.labels, scorer.checksum)


def model_unseen_patients(model_path: str | Path, labels_csv: str | Path) -> set[str]:
    """Patients no stage of the model at ``model_path`` saw, from the ``training.json`` beside
    it: the patients of its test folds and its held-out patients; empty without the record."""
    import csv

    record_path = Path(model_path).parent / "training.json"
    if not record_path.is_file():
        return set()
    settings = json.loads(record_path.read_text())["settings"]
    test_folds = {str(f) for f in settings.get("test_folds", [])}
    with Path(labels_csv).open(newline="") as handle:
        unseen = {row["patient_id"] for row in csv.DictReader(handle) if str(row.get("fold", "")).strip() in test_folds}
    return unseen | set(settings.get("held_out_patients", []))


def cached_slide_maps(labels_csv: str | Path, patients: list[str], scorer: TileScorer, cache: str | Path,
                      progress: bool = True) -> list[SlideMap]:
    """:func:`slide_map` of each patient, read from ``cache/<model sha256[:12]>/<patient>.npz``
    where an earlier run left it."""
    folder = Path(cache) / scorer.checksum[:12]
    folder.mkdir(parents=True, exist_ok=True)
    rows = None
    maps = []
    for patient in tqdm(patients, desc="scoring slides", unit="slide", disable=not progress, leave=False):
        path = folder / f"{patient}.npz"
        if path.is_file():
            with np.load(path) as stored:
                maps.append(SlideMap(patient, stored["probabilities"], stored["labels"], scorer.checksum))
            continue
        rows = rows if rows is not None else read_rows(Path(labels_csv))
        found = slide_map(labels_csv, patient, scorer, rows)
        temporary = path.with_suffix(".tmp.npz")
        np.savez_compressed(temporary, probabilities=found.probabilities, labels=found.labels)
        temporary.replace(path)
        maps.append(found)
    return maps



#: Passes over the training slides
CONTEXT_EPOCHS = 20
#: Range of the random shift of a training slide's log-odds (all 14 alike): new patients'
#: scores shift up or down as a whole, which the slides a model trained on do not show
LOGIT_SHIFT = (-1.0, 3.0)


def _augmented(inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random quarter turn and flip of a map, and a random shift of its log-odds."""
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    inputs, labels = torch.rot90(inputs, turns, (2, 3)), torch.rot90(labels, turns, (0, 1))
    if torch.rand(1, generator=generator).item() < 0.5:
        inputs, labels = torch.flip(inputs, (3,)), torch.flip(labels, (1,))
    low, high = LOGIT_SHIFT
    shift = low + (high - low) * torch.rand(1, generator=generator).item()
    analysed = inputs[:, -1:]
    logits = (inputs[:, :14] * LOGIT_CLIP + shift).clamp(-LOGIT_CLIP, LOGIT_CLIP) / LOGIT_CLIP * analysed
    return torch.cat([logits, inputs[:, 14:]], dim=1), labels


def fit_context(maps: list[SlideMap], epochs: int = CONTEXT_EPOCHS, seed: int = 20261206,
                progress: bool = True) -> PatchContext:
    """Train a :class:`~dicom_heatmap.context.PatchContext` on the labelled patches of ``maps``.

    Class-weighted binary cross-entropy over the analysed, annotated patches; each step one
    slide, turned, flipped and shifted at random (:func:`_augmented`); Adam, weight decay.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    context = PatchContext()
    data = [(context_inputs(m.probabilities), torch.from_numpy(m.labels.astype(np.int64))) for m in maps]
    positives = sum(int((m.labels == 1).sum()) for m in maps)
    negatives = sum(int((m.labels == 0).sum()) for m in maps)
    positive_weight = negatives / max(positives, 1)
    optimiser = torch.optim.AdamW(context.parameters(), lr=3e-3, weight_decay=1e-3)
    context.train()
    for _ in tqdm(range(epochs), desc="fitting the context stage", unit="epoch", disable=not progress, leave=False):
        for index in torch.randperm(len(data), generator=generator).tolist():
            inputs, labels = _augmented(*data[index], generator)
            known = (labels >= 0) & (inputs[0, -1] > 0)
            if not known.any():
                continue
            logits = context(inputs)[0, 0][known]
            target = (labels[known] == 1).float()
            weight = torch.where(target > 0, positive_weight, 1.0)
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    context.eval()
    context.trained.fill_(1)
    return context


#: Groups of slides in the leave-slides-out report
REPORT_GROUPS = 4


def leave_slides_out(maps: list[SlideMap], epochs: int = CONTEXT_EPOCHS, groups: int = REPORT_GROUPS,
                     progress: bool = True) -> list[dict]:
    """Each slide's record (see :func:`pipelines.training.whole_slides.map_comparison`) with the context stage
    fit on the other groups' slides (slide ``i`` is in group ``i % groups``); ``raw`` holds the
    tile model's map read the same way (fixed threshold 0.5, no calibration)."""
    records: list[dict] = [{} for _ in maps]
    for group in tqdm(range(groups), desc="leave slides out", unit="group", disable=not progress, leave=False):
        train = [m for i, m in enumerate(maps) if i % groups != group]
        context = fit_context(train, epochs, progress=False)
        for index, slide in enumerate(maps):
            if index % groups != group:
                continue
            scores, threshold = whole_slide_scores(slide.probabilities, context)
            record = map_record(slide.patient, slide.labels, scores)
            record["slide_threshold"] = threshold
            record["raw"] = map_record(slide.patient, slide.labels, slide.probabilities[..., 0])
            records[index] = record
    return records


def format_report(records: list[dict]) -> str:
    """Raw against refined, a line a slide and the medians, as a Markdown table."""
    def cells(r: dict) -> str:
        error = "missed" if r["direction_missed"] else ("-" if r["direction_error_deg"] is None else f"{r['direction_error_deg']:.0f}")
        return f"{r['tile_auc']:.3f} | {r['non_idc_marked']:.2f} | {r['extent_f1']:.2f} | {error}"

    lines = ["| slide | tiles | IDC | raw AUC | raw non-IDC marked | raw F1 | raw direction error | refined AUC | "
             "non-IDC marked | F1 | direction error | slide threshold |", "| --- " * 12 + "|"]
    for r in records:
        lines.append(f"| {r['patient']} | {r['tiles']} | {r['tumour_tiles']} | {cells(r['raw'])} | {cells(r)} | "
                     f"{r['slide_threshold']:.2f} |")
    for name, pick in (("raw", lambda r: r["raw"]), ("refined", lambda r: r)):
        chosen = [pick(r) for r in records]
        errors = [r["direction_error_deg"] for r in chosen if r["direction_error_deg"] is not None]
        lines.append(f"\n{name}: tile AUC median {np.median([r['tile_auc'] for r in chosen]):.3f} (worst "
                     f"{min(r['tile_auc'] for r in chosen):.3f}); non-IDC marked median "
                     f"{np.median([r['non_idc_marked'] for r in chosen]):.2f} (most {max(r['non_idc_marked'] for r in chosen):.2f}); "
                     f"extent F1 median {np.median([r['extent_f1'] for r in chosen]):.2f}; direction error median "
                     f"{np.median(errors) if errors else float('nan'):.0f} deg over {len(errors)}, "
                     f"{sum(e > 60 for e in errors)} over 60, {sum(r['direction_missed'] for r in chosen)} missed")
    return "\n".join(lines)


def train_context(labels_csv: str | Path, out_dir: str | Path, model: str | Path | None = None,
                  map_models: list[str | Path] = (), epochs: int = CONTEXT_EPOCHS, progress: bool = True) -> Path:
    """What ``dicom-heatmap train-context`` runs: score the whole slides of the table (less the
    held-out patients), report the stage left slides out, fit it on every slide and write
    ``OUT/model.pt`` (``model``'s weights with the context stage), ``OUT/context.json`` and
    ``OUT/context.md``.

    Args:
        labels_csv: the IDC table.
        out_dir: where the model, the report and the cached maps (``maps/``) go.
        model: the model to extend; the shipped one when ``None``.
        map_models: models that never saw some patients (cross-validation runs with their
            ``training.json``): a slide is scored by the first that never saw its patient,
            else by ``model``.
        epochs: passes over the slides.
        progress: show progress bars.

    Returns:
        the path of the model written.
    """
    from dicom_heatmap.checksum import file_sha256
    from dicom_heatmap.scorer import DEFAULT_MODEL_PATH
    from pipelines.training.whole_slides import chosen_whole_patients
    from pipelines.training.tile_data import HELD_OUT_PATIENTS_FILE, read_patient_list

    out_dir = Path(out_dir)
    model_path = Path(model) if model is not None else DEFAULT_MODEL_PATH
    held_out = set(read_patient_list(HELD_OUT_PATIENTS_FILE))
    patients = [p for p in chosen_whole_patients(labels_csv) if p not in held_out]
    unseen = [(Path(path), model_unseen_patients(path, labels_csv) - held_out) for path in map_models]
    base = TileScorer.load(model_path)
    source_of = {p: next((path for path, known in unseen if p in known), None) for p in patients}
    maps: dict[str, SlideMap] = {}
    for path in [None, *dict.fromkeys(v for v in source_of.values() if v is not None)]:
        chosen = [p for p in patients if source_of[p] == path]
        if chosen:
            scorer = base if path is None else TileScorer.load(path)
            maps.update({m.patient: m for m in cached_slide_maps(labels_csv, chosen, scorer, out_dir / "maps", progress)})
    ordered = [maps[p] for p in patients]
    records = leave_slides_out(ordered, epochs, progress=progress)
    context = fit_context(ordered, epochs, progress=progress)
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("context.")}
    state.update({f"context.{k}": v.clone() for k, v in context.state_dict().items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = out_dir / "model.pt"
    temporary = written.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(written)
    report = {"base_model_sha256": file_sha256(model_path), "model_sha256": file_sha256(written), "epochs": epochs,
              "slides_scored_by": {p: str(source_of[p] or model_path) for p in patients},
              "leave_slides_out": records}
    (out_dir / "context.json").write_text(json.dumps(report, indent=1))
    table = format_report(records)
    (out_dir / "context.md").write_text(table + "\n")
    print(table)
    return written

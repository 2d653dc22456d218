"""The model lab's commands: ``train``, ``train-context``, ``evaluate`` and ``bench``.

:mod:`pipelines.cli` adds them to the ``dicom-heatmap`` command line
(:data:`LAB_PARSERS`, :data:`LAB_HANDLERS`); each imports its workflow from
:mod:`pipelines.training` or :mod:`pipelines.evaluation` only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_heatmap.errors import ConfigurationError, say
from dicom_heatmap.runtime import BACKENDS
from dicom_heatmap.scorer import PRECISIONS
from pipelines.arguments import positive, sides
from pipelines.training.radiology import DEFAULT_FIELD_OF_VIEW_MM, DEFAULT_LESION_FRACTION

__all__ = ["LAB_PARSERS", "LAB_HANDLERS"]


def _add_train(commands) -> None:
    """``train``: the method's three stages (the model lab)."""
    train = commands.add_parser("train", help="train the model in the method's three stages: on H&E tiles (--data) or "
                                              "on one's own CT/MR series with lesion labels (--datalist)")
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="labels.csv of H&E tiles (columns path, patient_id, label, fold)")
    data.add_argument("--datalist", type=Path, metavar="JSON",
                      help="a MONAI datalist of CT/MR series (DICOM folder or file) and lesion labels (DICOM SEG or NIfTI "
                           "mask): {\"training\": [{\"image\": ..., \"label\": ...}], \"validation\": [...]}")
    train.add_argument("--out", type=Path, required=True, help="folder for checkpoints, the model and its record")
    # the plan's defaults live in one place, pipelines.training.plan.TrainSettings: an option not given is not passed
    plan_default = argparse.SUPPRESS
    train.add_argument("--epochs", type=int, default=plan_default, help="stage-1 epochs (default: the shipped model's, 10)")
    train.add_argument("--test-fold", type=int, help="patient fold held out for testing (cross-validation); by default "
                       "every fold trains and only the --hold-out patients are kept out (the shipped model)")
    train.add_argument("--hold-out", type=Path, metavar="FILE",
                       help="patient IDs, one a line, kept out of every stage and tested (default without --test-fold: "
                            "models/held_out_patients.txt; with it: none)")
    train.add_argument("--input-size", type=int, default=plan_default,
                       help="tile side the network sees (default 48; 32 with --datalist)")
    train.add_argument("--width-multiplier", type=float, default=plan_default, metavar="F",
                       help="scale every conv width (default 1, VGG16; smaller for quick trials only)")
    train.add_argument("--max-tiles", type=int, help="cap every split (smoke runs)")
    train.add_argument("--colour-jitter", type=float, default=plan_default, metavar="F",
                       help="scale of the colour jitter (default 1, the shipped model's; 0.5 with --datalist)")
    train.add_argument("--balanced-sampling", action="store_true",
                       help="stage 1 draws both classes equally often instead of weighting the loss by class")
    train.add_argument("--stain-jitter", type=float, default=plan_default, metavar="SIGMA",
                       help="scale and shift each stain's optical density by up to SIGMA (default 0.2, the shipped "
                            "model's; 0 turns it off; 0 with --datalist)")
    train.add_argument("--label-smoothing", type=float, default=plan_default, metavar="EPS",
                       help="stage 1 learns soft targets: 1 - EPS/2 for the tile's class (default 0, hard labels)")
    train.add_argument("--stain-normalisation", action="store_true",
                       help="the network scales each tile's haematoxylin and eosin to the training tiles' 99th "
                            "percentiles, in training and when it scores (stored with the model)")
    train.add_argument("--cross-fit", action="store_true",
                       help="the fusion learns from heads fit on the other half of the head patients (cross-fitting); "
                            "the heads are then fit on both halves")
    train.add_argument("--head-share", type=float, metavar="F",
                       help="share of the head folds' patients kept for the heads and the fusion; the rest train the "
                            "extractor (default: 1 with --test-fold, 2/3 without)")
    radiology = train.add_argument_group("with --datalist (CT/MR)")
    radiology.add_argument("--field-of-view-mm", type=positive(), default=DEFAULT_FIELD_OF_VIEW_MM, metavar="MM",
                           help=f"side of a tile in mm; the analysis's grid for the model (default {DEFAULT_FIELD_OF_VIEW_MM:g})")
    radiology.add_argument("--lesion-fraction", type=positive(), default=DEFAULT_LESION_FRACTION, metavar="F",
                           help=f"least lesion share of a positive tile (default {DEFAULT_LESION_FRACTION:g})")
    radiology.add_argument("--init", type=Path, metavar="MODEL",
                           help="start from these weights (e.g. models/model.pt) instead of a random start")
    radiology.add_argument("--ct-window", type=float, nargs=2, default=(40.0, 400.0), metavar=("CENTRE", "WIDTH"),
                           help="CT window in HU mapped to 0..255 (default 40 400)")
    radiology.add_argument("--mr-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                           help="MR percentiles of each series mapped to 0 and 255 (default 1 99)")
    radiology.add_argument("--quiet", action="store_true", help="no progress bar while the series are read")


def _add_train_context(commands) -> None:
    """``train-context``: the whole-slide stage (the model lab)."""
    context = commands.add_parser("train-context", help="train the whole-slide context stage on whole slides and add it "
                                  "to a model")
    context.add_argument("--data", type=Path, required=True, help="labels.csv of the IDC tiles (whole patients are rebuilt "
                         "as slides; the held-out patients are left out)")
    context.add_argument("--out", type=Path, required=True, help="folder for the model, the report and the cached maps")
    context.add_argument("--model", type=Path, help="the model to extend (default: the shipped model)")
    context.add_argument("--map-model", type=Path, action="append", default=[], metavar="MODEL",
                         help="a cross-validation run's model (its training.json beside it): the slides of the patients "
                              "it never saw are scored by it, so the stage learns from maps like those of new patients; "
                              "may be given several times")
    context.add_argument("--epochs", type=int, default=None, help="passes over the slides (default 30)")
    context.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_bench(commands) -> None:
    """``bench``: speed as ratios measured in one run."""
    bench = commands.add_parser("bench", help="speed as ratios in one run: tile scoring, the fixed cost, and the default "
                                              "analysis of synthetic slides against a MONAI pipeline")
    bench.add_argument("--model", type=Path, help="model file (default: the shipped model)")
    bench.add_argument("--seconds", type=float, default=4.0, help="time per measurement (default 4)")
    bench.add_argument("--sides", type=sides, default=(12000, 40000, 80000), metavar="PX,PX,...",
                       help="sides of the synthetic slides raced against a MONAI pipeline (default 12000,40000,80000; "
                            "0: no race)")
    bench.add_argument("--rounds", type=positive(int), default=3, help="interleaved rounds of the race (default 3)")


def _add_evaluate(commands) -> None:
    """``evaluate``: metrics of a model (the model lab)."""
    evaluate = commands.add_parser("evaluate", help="metrics of a model: on labelled H&E tiles with a ROC plot (--csv), or "
                                                    "on CT/MR series with lesion labels (--datalist)")
    data = evaluate.add_mutually_exclusive_group(required=True)
    data.add_argument("--csv", type=Path, help="labels.csv (columns path, patient_id, label, fold)")
    data.add_argument("--datalist", type=Path, metavar="JSON",
                      help="a MONAI datalist of CT/MR series and lesion labels: tile AUC, per-series AUC, lesions found, "
                           "spread direction against the mask's, on its validation series")
    evaluate.add_argument("--root", type=Path, help="folder the csv paths are relative to (default: the csv's folder)")
    evaluate.add_argument("--model", type=Path, help="model file (default: the shipped model)")
    evaluate.add_argument("--folds", type=lambda t: [int(v) for v in t.split(",")], help="only these patient folds, e.g. 3")
    evaluate.add_argument("--patients", type=Path, metavar="FILE",
                          help="only these patients (IDs one a line), e.g. models/held_out_patients.txt")
    evaluate.add_argument("--slides", action="store_true",
                          help="also rebuild the slide of every whole patient among those chosen (every tile in the "
                               "table), analyse it and compare heatmap and spread direction with the annotation")
    evaluate.add_argument("--mosaics", type=int, default=0, metavar="N",
                          help="also build N mosaics of real tiles of the patients chosen (a focus with a tail in "
                               "N - N//4 directions round the compass, and N//4 round lesions), analyse them and compare "
                               "with their layout")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"),
                          help="folder for metrics.json and roc.png (with --slides also slides.md, slides.json, slides/; "
                               "with --mosaics mosaics.md, mosaics.json, mosaics/; with --datalist "
                               "datalist_evaluation.json)")
    evaluate.add_argument("--series", choices=("validation", "all"), default="validation",
                          help="with --datalist: the validation series (default; or the highest fold), or all")
    evaluate.add_argument("--threshold", type=float, default=0.5, help="with --datalist: score of a lesion tile (default 0.5)")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for analyze")
    evaluate.add_argument("--backend", choices=BACKENDS, default="auto", help="as for analyze")



def run_train(args: argparse.Namespace) -> int:
    from pipelines.training.tile_data import read_patient_list
    from pipelines.training.plan import TrainSettings, fold_plan
    from pipelines.training.train import train

    given = {name: getattr(args, name) for name in ("epochs", "input_size", "colour_jitter", "stain_jitter", "label_smoothing",
                                                     "width_multiplier") if hasattr(args, name)}
    if args.datalist is not None:
        return _train_datalist(args, given)
    plan = fold_plan(args.test_fold)
    if args.head_share is not None:
        plan["head_share"] = args.head_share
    if args.hold_out is not None:
        plan["held_out_patients"] = read_patient_list(args.hold_out)
    settings = TrainSettings(max_tiles=args.max_tiles, balanced_sampling=args.balanced_sampling, cross_fit=args.cross_fit,
                             stain_normalisation=args.stain_normalisation, **given, **plan)
    model = train(args.data, args.out, settings)
    say(f"model written to {model}")
    return 0


def _train_datalist(args: argparse.Namespace, given: dict) -> int:
    from pipelines.training.radiology import radiology_settings, train_datalist

    refused = [option for option, value in (("--test-fold", args.test_fold), ("--hold-out", args.hold_out),
                                            ("--head-share", args.head_share), ("--stain-normalisation", args.stain_normalisation),
                                            ("--cross-fit", args.cross_fit)) if value not in (None, False)]
    if refused:
        raise ConfigurationError(f"{refused[0]} is for --data (H&E tiles); a datalist's split is its own")
    settings = radiology_settings(max_tiles=args.max_tiles, balanced_sampling=args.balanced_sampling, **given)
    model = train_datalist(args.datalist, args.out, settings, args.field_of_view_mm, args.lesion_fraction, args.init,
                           tuple(args.ct_window), tuple(args.mr_percentiles), progress=not args.quiet)
    say(f"model written to {model}; its card: {model.parent / 'model_card.md'}")
    return 0


def run_train_context(args: argparse.Namespace) -> int:
    from dicom_heatmap.errors import checked_number
    from pipelines.training.context_stage import CONTEXT_EPOCHS, train_context

    epochs = checked_number("epochs", args.epochs if args.epochs is not None else CONTEXT_EPOCHS, int, 1, 10_000)
    model = train_context(args.data, args.out, args.model, args.map_model, epochs, progress=not args.quiet)
    say(f"model with the context stage written to {model}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    if args.datalist is not None:
        from pipelines.evaluation.datalist_eval import evaluate_datalist

        evaluate_datalist(args.datalist, args.model, args.out, args.series, args.threshold, args.precision, args.backend)
        return 0
    from pipelines.evaluation.evaluate import run_evaluation
    from pipelines.training.tile_data import read_patient_list

    patients = read_patient_list(args.patients) if args.patients is not None else None
    run_evaluation(args.csv, args.out, args.model, args.root, args.folds, patients, args.slides, args.mosaics,
                   args.precision, args.backend)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from pipelines.evaluation.bench import run_bench as bench

    bench(args.model, args.seconds, args.sides, args.rounds)
    return 0


#: What :func:`pipelines.cli.build_parser` adds, in the order of ``--help``
LAB_PARSERS = (_add_train, _add_train_context, _add_evaluate, _add_bench)
#: The command's name -> what runs it
LAB_HANDLERS = {"train": run_train, "train-context": run_train_context, "evaluate": run_evaluate, "bench": run_bench}

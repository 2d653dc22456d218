"""The model lab, first room: how the shipped model was made.

- :mod:`~pipelines.training.tile_data`: the labelled tile tables (``labels.csv`` + PNG tiles)
  and patient lists.
- :mod:`~pipelines.training.train`: the method's three stages (extractor, 13 heads,
  fusion) on those tiles - ``dicom-heatmap train`` and the bundle's ``configs/train.json``.
- :mod:`~pipelines.training.whole_slides`: whole IDC slides rebuilt from their tiles, and
  how a patch map compares with their labels.
- :mod:`~pipelines.training.context_stage`: the whole-slide context stage fit on those
  slides - ``dicom-heatmap train-context``.
- :mod:`~pipelines.training.metrics`: the measures training and evaluation report.

Nothing here imports :mod:`pipelines.evaluation`; evaluation imports what it needs from here.
"""

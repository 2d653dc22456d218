"""The model lab, second room: how the model was chosen and what it measures.

- :mod:`~pipelines.evaluation.evaluate`: tile metrics and the ROC plot of a model on
  labelled tiles, with whole slides and mosaics on request - ``dicom-heatmap evaluate``
  and the bundle's ``configs/evaluate.json``.
- :mod:`~pipelines.evaluation.slides`: rebuilt whole slides analysed and compared with
  their annotation (``evaluate --slides``).
- :mod:`~pipelines.evaluation.mosaics`: mosaics of real tiles on a known layout
  (``evaluate --mosaics``; ``python -m pipelines.evaluation.mosaics`` builds the demo's).
- :mod:`~pipelines.evaluation.sanity`: the BCSS regions of another cohort against their
  masks (``python -m pipelines.evaluation.sanity``).
- :mod:`~pipelines.evaluation.grid_check`: whether the spread direction holds when the
  grid changes (``python -m pipelines.evaluation.grid_check``).
- :mod:`~pipelines.evaluation.bench`: speed as ratios measured in one run
  (``dicom-heatmap bench``).

It builds on :mod:`pipelines.training` (the tile tables, rebuilt slides, metrics); the
product (:mod:`pipelines.cli`, ``demo``, ``bundle``, ``pacs``) imports it only to run
these commands.
"""

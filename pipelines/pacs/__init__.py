"""The PACS-side batch job and DICOM node (``dicom-heatmap pacs poll|listen|status``).

- :mod:`~pipelines.pacs.commands`: the three commands, as the CLI runs them.
- :mod:`~pipelines.pacs.config`: what a configuration holds; :mod:`~pipelines.pacs.config_file`
  reads and checks ``pacs.yaml`` into it.
- :mod:`~pipelines.pacs.ledger`: the SQLite ledger of every series and its states.
- :mod:`~pipelines.pacs.archive`: the interface (find, retrieve, store) and its errors;
  :mod:`~pipelines.pacs.dimse` and :mod:`~pipelines.pacs.dicomweb` implement it (with our
  storage SCP in ``dimse``); :mod:`~pipelines.pacs.connect` opens the one configured.
- :mod:`~pipelines.pacs.worker`: the per-series analysis (the same core as ``analyze``).
- :mod:`~pipelines.pacs.runner`: fetch → analyse → store, with retries and the ledger.
- :mod:`~pipelines.pacs.poll` and :mod:`~pipelines.pacs.listen`: the two ways to run.
"""

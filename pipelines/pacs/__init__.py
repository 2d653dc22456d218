"""The PACS-side batch job and DICOM node (``dicom-heatmap pacs poll|listen|status``).

- :mod:`~pipelines.pacs.config`: the ``pacs.yaml`` file, checked when read.
- :mod:`~pipelines.pacs.ledger`: the SQLite ledger of every series and its states.
- :mod:`~pipelines.pacs.archive`, :mod:`~pipelines.pacs.dimse`, :mod:`~pipelines.pacs.dicomweb`:
  find, retrieve and store over DIMSE or DICOMweb; our storage SCP.
- :mod:`~pipelines.pacs.worker`: the per-series analysis (the same core as ``analyze``).
- :mod:`~pipelines.pacs.runner`: fetch → analyse → store, with retries and the ledger.
- :mod:`~pipelines.pacs.poll` and :mod:`~pipelines.pacs.listen`: the two ways to run.
"""

from pipelines.pacs.config import PacsConfig, load_config
from pipelines.pacs.ledger import Ledger
from pipelines.pacs.listen import Listener
from pipelines.pacs.poll import PollJob

__all__ = ["PacsConfig", "load_config", "Ledger", "PollJob", "Listener"]

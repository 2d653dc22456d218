"""dicom-heatmap: tile-wise tumour heatmaps and spread direction for DICOM, slides and pictures.

Research software, not for diagnostic use.

>>> from dicom_heatmap import analyze
>>> result = analyze("slide.svs")          # doctest: +SKIP
>>> result.heatmap, result.direction.words  # doctest: +SKIP
>>> result.save("out/")                     # doctest: +SKIP
"""

from dicom_heatmap._version import __version__
from dicom_heatmap.api import AnalysisSettings, analyze
from dicom_heatmap.result import AnalysisResult
from dicom_heatmap.errors import DicomHeatmapError
from dicom_heatmap.scorer import TileScorer

__all__ = ["__version__", "analyze", "AnalysisResult", "AnalysisSettings", "TileScorer", "DicomHeatmapError"]

"""``dicom-heatmap view RESULT_DIR``: a local page that lays the heatmap over the source image.

:mod:`~pipelines.viewer.scene` reads a result folder and its source into what the page
shows (Deep Zoom pyramids of the source, the overlay in the source's pixels);
:mod:`~pipelines.viewer.server` serves it on 127.0.0.1 with the page in ``page/`` and the
OpenSeadragon library the Makefile installs.
"""

"""Loading inputs: one module per input kind, the guards in one of their own.

- :mod:`~transforms.io.load`: :class:`~transforms.io.load.LoadInput` / ``LoadInputd``, the
  transform that dispatches a path to its reader.
- :mod:`~transforms.io.dicom_series`: DICOM CT/MR series folders, single images, enhanced
  multi-frame volumes (:mod:`~transforms.io.dicom` reads and checks one DICOM file).
- :mod:`~transforms.io.dicom_wsi`: DICOM whole-slide images.
- :mod:`~transforms.io.slide`: SVS/TIFF slides through openslide, large levels streamed.
- :mod:`~transforms.io.picture`: PNG/JPEG pictures.
- :mod:`~transforms.io.guards`: what an input will decode to, judged before decoding.
- :mod:`~transforms.io.common`: the metadata every loader gives, affines, level choice.
"""

"""Loaders and preprocessing keep pixels and geometry right."""

import numpy as np
import pydicom
import pytest

from conftest import write_series
from transforms.intensity import NormalizeByModality, NormalizeByModalityd
from transforms.io.load import LoadInput, LoadInputd
from transforms.spatial import CropToTissue, CropTemplate, RotateWithGeometry, RotateWithGeometryd, ZoomWithGeometry


def position(meta, index):
    return (meta["affine"] @ np.append(np.asarray(index, float), 1.0))[:3]


def test_series_is_sorted_by_position_and_rescaled(tmp_path, data_dir):
    write_series(tmp_path, slices=4, spacing=2.5)  # written in reverse order
    image, meta = LoadInput()(tmp_path)
    assert image.shape == (4, 128, 128, 1)
    z = [float(ds.ImagePositionPatient[2]) for ds in meta["source_datasets"]]
    assert z == sorted(z)
    assert np.linalg.norm(meta["affine"][:3, 0]) == pytest.approx(2.5)
    source = pydicom.dcmread(data_dir / "CT_small.dcm")
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_allclose(image[0, ..., 0], hu)


def test_monochrome1_is_inverted(tmp_path):
    write_series(tmp_path / "m2", slices=1)
    write_series(tmp_path / "m1", slices=1, photometric="MONOCHROME1")
    plain, _ = LoadInput()(tmp_path / "m2")
    inverted, _ = LoadInput()(tmp_path / "m1")
    assert np.corrcoef(plain.ravel(), inverted.ravel())[0, 1] < -0.99


def test_whole_slide_image_assembles_its_tiles(data_dir):
    image, meta = LoadInput()(data_dir / "wsi_lymph_node.dcm")
    assert image.shape == (1, 700, 1152, 3) and image.dtype == np.uint8
    assert meta["frame"] == "SLIDE" and meta["kind"] == "slide"
    # pydicom already converts the JPEG's YBR to RGB: H&E is pink/purple, red above green
    tissue = image[0][image[0].mean(axis=-1) < 200]
    assert tissue[:, 0].mean() > tissue[:, 1].mean()
    assert np.linalg.norm(meta["affine"][:3, 2]) == pytest.approx(0.028969, rel=1e-3)


def test_rotation_by_quarter_turns_keeps_positions(data_dir):
    image, meta = LoadInput()(data_dir / "CT_small.dcm")
    image, meta = NormalizeByModality()(image, meta)
    turned, turned_meta = RotateWithGeometry(90)(image, meta)
    assert turned.shape == (1, 128, 128, 3)
    # the pixel at (row 10, col 20) moves to (row 128-1-20, col 10) and keeps its position
    assert np.array_equal(turned[0, 107, 10], image[0, 10, 20])
    np.testing.assert_allclose(position(turned_meta, (0, 107, 10)), position(meta, (0, 10, 20)), atol=1e-9)


def test_arbitrary_rotation_agrees_with_the_exact_one():
    image = np.zeros((1, 41, 41, 3), dtype=np.uint8)
    image[0, 5:10, 25:30] = 200
    meta = {"affine": np.eye(4), "tissue_rule": "intensity"}
    exact, exact_meta = RotateWithGeometry(90)(image, meta)
    resampled, resampled_meta = RotateWithGeometry(90.0000001)(image, meta)
    np.testing.assert_allclose(resampled_meta["affine"], exact_meta["affine"], atol=1e-5)
    assert np.abs(resampled.astype(int) - exact.astype(int)).max() <= 1


def test_zoom_and_crop_update_the_geometry(data_dir):
    image, meta = LoadInput()(data_dir / "CT_small.dcm")
    image, meta = NormalizeByModality()(image, meta)
    zoomed, zoomed_meta = ZoomWithGeometry(0.5)(image, meta)
    assert zoomed.shape == (1, 64, 64, 3)
    # new pixel (0,0) covers old pixels 0..1: its centre lies between them
    np.testing.assert_allclose(position(zoomed_meta, (0, 0, 0)), position(meta, (0, 0.5, 0.5)), atol=1e-9)
    framed = image.copy()
    framed[:, :10], framed[:, :, :7] = 0, 0  # air above and left of the body
    framed[:, 10:, 7:] = np.maximum(framed[:, 10:, 7:], 60)
    cropped, cropped_meta = CropToTissue()(framed, meta)
    assert cropped.shape == (1, 118, 121, 3)
    np.testing.assert_allclose(position(cropped_meta, (0, 0, 0)), position(meta, (0, 10, 7)), atol=1e-9)


def test_crop_template_frames_the_most_tissue():
    image = np.full((1, 100, 100, 3), 245, dtype=np.uint8)
    image[0, 60:90, 10:40] = (150, 60, 140)
    meta = {"affine": np.eye(4), "tissue_rule": "stain", "source_path": "t"}
    window, window_meta = CropTemplate((30, 30))(image, meta)
    assert window.shape == (1, 30, 30, 3)
    assert (window[0] == (150, 60, 140)).all()
    assert window_meta["affine"][1, 3] == 60 and window_meta["affine"][2, 3] == 10


def test_dictionary_forms_chain(data_dir):
    data = LoadInputd("image")({"image": data_dir / "MR_small.dcm"})
    loaded = data["image_meta_dict"]["affine"].copy()
    data = NormalizeByModalityd("image")(data)
    data = RotateWithGeometryd("image", 180)(data)
    assert data["image"].shape == (1, 64, 64, 3) and data["image"].dtype == np.uint8
    assert data["image_meta_dict"]["modality"] == "MR"
    # half a turn about the centre: index (r, c) now lies where (63 - r, 63 - c) lay
    affine = data["image_meta_dict"]["affine"]
    for row, col in [(0, 0), (10, 50), (63, 0)]:
        np.testing.assert_allclose(affine @ [0, row, col, 1], loaded @ [0, 63 - row, 63 - col, 1], atol=1e-6)


def test_whole_slide_folder_reads_the_volume_level_not_the_thumbnail(tmp_path, data_dir):
    import shutil

    for name in ("openslide_boxes_0.dcm", "openslide_boxes_1.dcm"):  # VOLUME and THUMBNAIL of one series
        shutil.copy(data_dir / name, tmp_path / name)
    image, meta = LoadInput()(tmp_path)
    assert meta["kind"] == "slide" and image.shape == (1, 16, 16, 3)
    assert meta["source_path"].endswith("openslide_boxes_0.dcm")


def test_whole_slide_level_follows_the_wanted_resolution():
    from pydicom.dataset import Dataset

    from pydicom.uid import VLWholeSlideMicroscopyImageStorage

    from transforms.io.dicom_wsi import choose_wsi_level

    def level(spacing, side):
        ds, shared, measures = Dataset(), Dataset(), Dataset()
        measures.PixelSpacing = [spacing, spacing]
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.SOPClassUID, ds.SamplesPerPixel = VLWholeSlideMicroscopyImageStorage, 3
        ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = side
        return ds

    levels = [("l0", level(0.00025, 80000)), ("l1", level(0.001, 20000)), ("l2", level(0.004, 5000)), ("l3", level(0.016, 1250))]
    assert choose_wsi_level(levels, "slide", 1.1) == "l1"  # micrometres
    assert choose_wsi_level(levels, "slide", None) == "l3"  # the finest level of at most 4096 px
    # for the model (4.2 um an input pixel): the coarsest level of at most 1.25 times that...
    assert choose_wsi_level(levels, "slide", None, model_scale_um=200 / 48) == "l2"
    assert choose_wsi_level(levels, "slide", None, model_scale_um=2.0, max_values=2 * 10**9) == "l1"
    # ...among the levels the size guard lets through whole
    assert choose_wsi_level(levels, "slide", None, model_scale_um=200 / 48, max_values=5000 * 5000) == "l3"

"""The Python API: analyze() on paths and on datasets, and what the result offers."""

import json

import numpy as np
import pydicom
import pytest

from conftest import write_series
from dicom_heatmap import AnalysisSettings, analyze
from dicom_heatmap.errors import ConfigurationError


def test_analyze_a_picture_and_save(scorer, data_dir, tmp_path):
    result = analyze(data_dir / "idc_mosaic_tail.png", scorer, grid=(8, 12), progress=False)
    assert result.heatmap.shape == (8, 12)
    assert result.layer_probabilities.shape == (8, 12, 13)
    assert result.tile_numbers[0, 0] == 1 and result.tile_numbers[1, 0] == 13 and result.tile_numbers[-1, -1] == 96
    analysed = np.isfinite(result.heatmap)
    assert analysed.sum() == result.tile_map.grid.is_tissue.sum()
    assert np.all((result.heatmap[analysed] >= 0) & (result.heatmap[analysed] <= 1))
    folder = result.save(tmp_path)
    saved = json.loads((folder / "result.json").read_text())
    assert saved["spread"] == json.loads(json.dumps(result.direction.to_dict()))
    tile = saved["tiles"][12]
    assert (tile["number"], tile["row"], tile["col"], tile["box"]) == (13, 1, 0, [50, 0, 100, 50])
    assert len(tile["flow"]) == 3 and saved["tiles"][0]["flow"][0] == 0.0  # a 2D image has no through-plane flow


def test_analyze_datasets_of_a_series(scorer, tmp_path, dciodvfy):
    paths = write_series(tmp_path / "series", slices=3, spacing=4.0)
    datasets = [pydicom.dcmread(p) for p in paths]
    result = analyze(datasets, scorer, grid=(4, 4), progress=False)
    assert result.heatmap.shape == (3, 4, 4)
    assert result.meta["kind"] == "series" and result.meta["frame"] == "PATIENT"
    assert np.linalg.norm(result.tile_map.tile_affine[:3, 0]) == pytest.approx(4.0)
    folder = result.save(tmp_path / "out")
    assert sorted(p.name for p in folder.glob("sc-*.dcm")) == ["sc-0001.dcm", "sc-0002.dcm", "sc-0003.dcm"]
    pm = pydicom.dcmread(folder / "pm.dcm")
    assert int(pm.NumberOfFrames) == 3
    # each slice's SC caption names it and its position along the slice normal (the z of these axial slices)
    z = [float(ds.ImagePositionPatient[2]) for ds in sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))]
    assert [result.slice_label(i) for i in range(3)] == [f"slice {i + 1} of 3, at {z[i]:.1f} mm" for i in range(3)]
    for path in folder.glob("*.dcm"):
        assert dciodvfy(path) == [], path.name


def test_two_series_of_one_study_give_result_series_that_say_which(scorer, tmp_path, dciodvfy):
    """In an archive's list of the study, each result series names its source series."""
    study = pydicom.uid.generate_uid()
    numbers, descriptions = set(), set()
    for series_number, description in [(2, "AX SOFT TISSUE"), (5, "COR BONE")]:
        datasets = [pydicom.dcmread(p) for p in write_series(tmp_path / str(series_number), slices=2, study_uid=study)]
        for ds in datasets:
            ds.SeriesNumber, ds.SeriesDescription = series_number, description
        folder = analyze(datasets, scorer, grid=(4, 4), progress=False).save(tmp_path / "out")
        for name, offset in [("sc-0001.dcm", 1), ("pm.dcm", 2), ("sr.dcm", 3)]:
            ds = pydicom.dcmread(folder / name)
            assert int(ds.SeriesNumber) == series_number * 1000 + offset
            assert f"of series {series_number} '{description}'" in ds.SeriesDescription, ds.SeriesDescription
            assert len(ds.SeriesDescription) <= 64 and dciodvfy(folder / name) == []
            numbers.add(int(ds.SeriesNumber))
            descriptions.add(str(ds.SeriesDescription))
    assert len(numbers) == len(descriptions) == 6


def test_settings_are_checked():
    with pytest.raises(ConfigurationError, match="crop"):
        AnalysisSettings(crop="middle")
    with pytest.raises(ConfigurationError, match="threshold"):
        AnalysisSettings(threshold=2)
    for bad in [dict(zoom=300), dict(rotate=float("nan")), dict(tile_size=True), dict(grid=(8, "x")),
                dict(grid=(4, 4), tile_size=64), dict(level=-1), dict(tile_size_um=float("inf"))]:
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            AnalysisSettings(**bad)
    # the same settings however they are spelled: the same canonical text, hence the same UIDs
    assert AnalysisSettings(tile_size_um=400, grid=None).canonical() == AnalysisSettings(tile_size_um=400.0).canonical()
    assert AnalysisSettings(grid=[8, 12]).canonical() == AnalysisSettings(grid=(8, 12)).canonical()
    with pytest.raises(ConfigurationError, match="either settings or keyword"):
        analyze("x.png", "model.pt", AnalysisSettings(), grid=(2, 2))


def test_tile_scorer_takes_what_users_pass(scorer, data_dir):
    """A batch of uint8 tiles, one tile, floats in 0..1: the same scores; other shapes are refused by name."""
    import numpy as np
    import pytest
    from PIL import Image

    picture = np.asarray(Image.open(data_dir / "idc_mosaic_tail.png").convert("RGB"))
    tiles = np.stack([picture[:50, 50 * i : 50 * (i + 1)] for i in range(4)])
    batch = scorer.score(tiles)
    np.testing.assert_allclose(scorer.score(tiles[0]), batch[:1], atol=1e-5)  # a batch of one runs other kernels
    np.testing.assert_allclose(scorer.score(tiles.astype(np.float32) / 255.0), batch, atol=1e-6)
    with pytest.raises(ValueError, match=r"tiles must be RGB.*shape \(224, 3\)"):
        scorer.score([np.zeros((224, 3), np.uint8)])


def test_a_picture_with_a_declared_pixel_size_is_cut_in_micrometres(scorer, data_dir, run_cli, tmp_path):
    """The mosaic is made of 50 px IDC tiles at about 4 um: 200 um tiles are those 50 px tiles."""
    from PIL import Image

    height, width = Image.open(data_dir / "idc_mosaic_tail.png").size[::-1]
    result = analyze(data_dir / "idc_mosaic_tail.png", scorer, pixel_size_um=4, tile_size_um=200, progress=False)
    assert result.heatmap.shape == (height // 50, width // 50)
    assert result.meta["frame"] == "SLIDE" and result.spread.unit == "mm"
    # the command line says when the scale is unknown, and refuses a declared size where the input has its own
    plain = run_cli("analyze", data_dir / "idc_mosaic_tail.png", "--out", tmp_path / "a", "--quiet")
    assert plain.returncode == 0 and "the pixel size is unknown" in plain.stderr
    declared = run_cli("analyze", data_dir / "idc_mosaic_tail.png", "--out", tmp_path / "b", "--quiet", "--pixel-size-um", "4")
    assert declared.returncode == 0 and "unknown" not in declared.stderr
    refused = run_cli("analyze", data_dir / "CT_small.dcm", "--out", tmp_path / "c", "--quiet", "--pixel-size-um", "4")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "PNG/JPEG pictures only" in refused.stderr


def test_16_bit_colour_is_scaled_and_links_out_of_a_series_folder_are_not_followed(scorer, data_dir, tmp_path):
    from PIL import Image

    rgb = np.asarray(Image.open(data_dir / "idc_mosaic_tail.png").convert("RGB"))[:200, :300]
    ds = pydicom.dcmread(data_dir / "CT_small.dcm")
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = (rgb.astype(np.uint16) * 257).tobytes()  # the same picture on 16 bits
    result = analyze(ds, scorer, grid=(2, 3), progress=False)
    assert np.array_equal(result.image[0], rgb)  # scaled, not wrapped to the low byte
    # a series folder whose third file is a link to a file outside it: two slices are read
    paths = write_series(tmp_path / "outside", slices=3)
    folder = tmp_path / "series"
    folder.mkdir()
    for path in paths[:2]:
        path.rename(folder / path.name)
    (folder / "link.dcm").symlink_to(paths[2])
    assert analyze(folder, scorer, grid=(2, 2), progress=False).heatmap.shape[0] == 2


def test_result_series_are_recognised_as_results():
    """The PACS job never analyses its own results: every description result_series writes reads as one."""
    from dicom_heatmap.writers.common import is_result_description, result_series

    numbered, plain = pydicom.Dataset(), pydicom.Dataset()
    numbered.SeriesNumber, numbered.SeriesDescription = 7, "AX T2 FLAIR WITH A LONG DESCRIPTION OF THE SERIES"
    for kind in ("sc", "pm", "sr", "seg"):
        for reference in (numbered, plain):
            assert is_result_description(result_series(reference, kind)[1])
    assert not is_result_description("AX T2 FLAIR") and not is_result_description("Tumour board (research only) notes")


def test_a_slide_of_known_scale_is_scored_in_the_model_patches(scorer, data_dir, run_cli, tmp_path):
    """The model sees its own field of view (stored in the model file) whatever the grid:
    CMU-1-Small-Region states 0.499 um a pixel, so a 200 um patch is about 400 pixels."""
    import torch

    from dicom_heatmap import TileScorer
    from dicom_heatmap.scorer import DEFAULT_MODEL_PATH

    done = run_cli("analyze", data_dir / "cmu_small_region.svs", "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 0 and "notice" not in done.stderr, done.stderr
    patches = json.loads(next((tmp_path / "out").glob("*/result.json")).read_text())["patches"]
    assert patches["field_of_view_um"] == 200.0
    assert np.all(np.abs(np.diff(patches["row_edges"]) - 200 / 0.499) < 60), patches["row_edges"]
    assert len(patches["scores"]) == len(patches["row_edges"]) - 1
    # a model of a 100 um field of view gets patches half as wide, on the same grid
    state = torch.load(DEFAULT_MODEL_PATH, weights_only=True)
    state["field_of_view_um"] = torch.tensor(100.0)
    torch.save(state, tmp_path / "model_100um.pt")
    narrow = TileScorer.load(tmp_path / "model_100um.pt")
    assert scorer.field_of_view_um == 200.0 and narrow.field_of_view_um == 100.0
    wide, fine = (analyze(data_dir / "cmu_small_region.svs", model, progress=False, tile_size=500) for model in (scorer, narrow))
    assert wide.heatmap.shape == fine.heatmap.shape
    assert fine.patch_scores.shape[0] == pytest.approx(2 * wide.patch_scores.shape[0], abs=1)
    assert fine.identity.folder_name != wide.identity.folder_name

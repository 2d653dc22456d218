"""Files for viewers, read back as a viewer would: GeoJSON (QuPath) with shapely, the score
volume with SimpleITK, the SEG with highdicom; every tile checked against result.json."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import highdicom as hd
import numpy as np
import openslide
import pydicom
import pytest
import SimpleITK as sitk
from shapely.geometry import shape

from conftest import write_series
from dicom_heatmap import analyze
from dicom_heatmap.lesions import lesion_masks


def _tiles(folder):
    result = json.loads((folder / "result.json").read_text())
    return result, {t["number"]: t for t in result["tiles"]}


@pytest.mark.parametrize("sample,options", [("idc_mosaic_tail.png", {}), ("idc_mosaic_tail.png", {"pixel_size_um": 4.0}),
                                            ("cmu_small_region.svs", {"level": 0}), ("pyramid.tif", {"level": 1}),
                                            ("wsi_oblong_pixels.dcm", {})])
def test_geojson_tiles_lie_on_full_resolution_pixels(sample, options, scorer, data_dir, tmp_path):
    if sample == "pyramid.tif":  # levels 4096 and 1024 px: level 1 is 4x coarser than level 0
        from pipelines.evaluation.bench import make_synthetic_slide

        data_dir = tmp_path
        make_synthetic_slide(tmp_path / sample, side=4096, tile=256, smallest=1024)
    if sample == "wsi_oblong_pixels.dcm":  # rows 3/2 as far apart as columns: y must not be scaled by x's spacing
        source = pydicom.dcmread(data_dir / "wsi_lymph_node.dcm")
        source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.045, 0.03]
        data_dir = tmp_path
        source.save_as(tmp_path / sample)
    folder = analyze(data_dir / sample, scorer, progress=False, **options).save(tmp_path / "out")
    result, tiles = _tiles(folder)
    features = json.loads((folder / "heatmap.geojson").read_text())["features"]
    tile_features = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(tile_features) == sum(t["analysed"] for t in tiles.values())
    downsample = 1.0
    if "level" in options:
        with openslide.OpenSlide(str(data_dir / sample)) as slide:
            downsample = slide.level_downsamples[options["level"]]
    for feature in tile_features:
        properties = feature["properties"]
        tile = tiles[properties["measurements"]["tile number"]]
        assert properties["measurements"]["score"] == pytest.approx(tile["score"], abs=1e-6)
        top, left, bottom, right = tile["box"]
        expected = np.array([left, top, right, bottom]) * downsample  # corner-based pixels of level 0
        assert np.allclose(shape(feature["geometry"]).bounds, expected, rtol=0, atol=1e-6 * downsample)
        # the classes say what the score says, not a tissue type
        high = properties["measurements"]["score"] >= result["settings"]["threshold"]
        assert properties["classification"]["name"] == ("Score at or above threshold" if high else "Score below threshold")
    lesions = [f for f in features if f["properties"]["objectType"] == "annotation"]
    assert len(lesions) == len(result["spread"]["lesions"])
    for feature, lesion in zip(lesions, result["spread"]["lesions"]):
        outline = shape(feature["geometry"])
        assert outline.is_valid and feature["properties"]["measurements"]["tiles"] == lesion["tiles"]
        focus = tiles[lesion["focus_tile"]]["box"]
        centre = ((focus[1] + focus[3]) / 2 * downsample, (focus[0] + focus[2]) / 2 * downsample)
        assert outline.buffer(1e-6).contains(shape({"type": "Point", "coordinates": centre}))


def test_ct_score_volume_and_segmentation_land_on_the_source(scorer, tmp_path, dciodvfy):
    paths = write_series(tmp_path / "ct", slices=4, spacing=3.0)
    result = analyze(tmp_path / "ct", scorer, grid=(6, 6), threshold=0.05, progress=False)
    folder = result.save(tmp_path / "out")
    _, tiles = _tiles(folder)
    # the NIfTI resampled onto the source series (nearest): each tile's score on its pixels
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader().GetGDCMSeriesFileNames(str(tmp_path / "ct")))
    source = reader.Execute()
    scores = sitk.ReadImage(str(folder / "scores.nii.gz"))
    analysed = sitk.ReadImage(str(folder / "analysed.nii.gz"))
    resampled = sitk.GetArrayFromImage(sitk.Resample(scores, source, sitk.Transform(), sitk.sitkNearestNeighbor, np.nan))
    mask = sitk.GetArrayFromImage(sitk.Resample(analysed, source, sitk.Transform(), sitk.sitkNearestNeighbor, 255))
    order = np.argsort([float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in reader.GetFileNames()])
    checked = {True: 0, False: 0}
    for tile in tiles.values():
        top, left, bottom, right = tile["box"]
        centre = (tile["slice"], (top + bottom) // 2, (left + right) // 2)
        # not analysed: -1, never a score ITK would take for one (it reads NaN as 0)
        assert resampled[centre] == pytest.approx(tile["score"] if tile["analysed"] else -1.0, abs=1e-6), tile["number"]
        assert mask[centre] == int(tile["analysed"]), tile["number"]
        checked[tile["analysed"]] += 1
    assert min(checked.values()) >= 3 and list(order) == sorted(order)
    # nibabel (RAS) reads the same values and the same placement
    import nibabel

    volume, labels = nibabel.load(folder / "scores.nii.gz"), nibabel.load(folder / "analysed.nii.gz")
    assert np.array_equal(volume.affine, labels.affine) and labels.get_fdata().max() == 1
    values = volume.get_fdata()
    assert set(np.unique(values[labels.get_fdata() == 0])) == {-1.0}
    assert values[labels.get_fdata() == 1].min() >= 0
    # the SEG: one segment per lesion, on the source instances, the dominant lesion's tiles
    seg = hd.seg.segread(folder / "seg.dcm")
    assert dciodvfy(folder / "seg.dcm") == []
    lesions = result.spread.lesions
    assert len(seg.SegmentSequence) == len(lesions) >= 1
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    sources = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1])  # (n, rows, cols, 1)
    dominant = lesion_masks(result.tile_map, result.settings.threshold)[0]
    numbers = result.tile_map.grid.number(*np.nonzero(dominant))
    expected = sum((tiles[n]["box"][2] - tiles[n]["box"][0]) * (tiles[n]["box"][3] - tiles[n]["box"][1]) for n in numbers)
    assert int(mask.sum()) == expected > 0 and len(numbers) == lesions[0]["tiles"]


def test_whole_slide_map_and_segmentation_lie_on_the_slide(scorer, data_dir, tmp_path, dciodvfy):
    """On a DICOM whole-slide image with its own slide coordinates, the PM and the SEG are
    placed on them: three tile centres map to the same slide position through the PM as
    through the source; the SEG covers the source's total pixel matrix."""
    from highdicom.spatial import PixelToReferenceTransformer

    source = pydicom.dcmread(data_dir / "wsi_lymph_node.dcm")
    source.FrameOfReferenceUID = pydicom.uid.generate_uid()  # the sample's is 66 characters, not a valid UID
    origin = pydicom.Dataset()  # the sample has no Total Pixel Matrix Origin: a realistic one, in mm on the glass
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.5, 41.25
    source.TotalPixelMatrixOriginSequence = [origin]
    source.save_as(tmp_path / "wsi.dcm")
    result = analyze(tmp_path / "wsi.dcm", scorer, grid=(5, 8), threshold=0.3, progress=False)
    folder = result.save(tmp_path / "out")
    summary, tiles = _tiles(folder)
    assert dciodvfy(folder / "pm.dcm") == [] and dciodvfy(folder / "seg.dcm") == []
    pm = pydicom.dcmread(folder / "pm.dcm")
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    on_source = PixelToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)
    on_map = PixelToReferenceTransformer.for_image(pm, for_total_pixel_matrix=True)
    origin_px = on_source(np.array([[0, 0]]))[0]
    per_column = on_source(np.array([[1, 0]]))[0] - origin_px
    per_row = on_source(np.array([[0, 1]]))[0] - origin_px
    for number in (1, 20, 40):
        tile = tiles[number]
        top, left, bottom, right = tile["box"]
        centre = origin_px + ((left + right) / 2 - 0.5) * per_column + ((top + bottom) / 2 - 0.5) * per_row
        through_map = on_map(np.array([[tile["col"], tile["row"]]]))[0]
        assert np.allclose(through_map, centre, atol=0.5 * float(np.linalg.norm(per_column))), number  # within half a pixel
    # result.json names its input and gives its positions on the glass, as the source places its pixels
    assert summary["input"]["path"] == str(tmp_path / "wsi.dcm")
    assert summary["input"]["positions"].startswith("DICOM slide coordinates")
    spacing = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing  # (row, column) mm
    for frame_position, on_glass in [(result.spread.focus_position, summary["spread"]["focus_position"]),
                                     *((lesion["focus_position"], moved["focus_position"])
                                       for lesion, moved in zip(result.spread.lesions, summary["spread"]["lesions"]))]:
        column, row = frame_position[0] / spacing[1], frame_position[1] / spacing[0]  # frame: mm from pixel (0, 0)
        expected = origin_px + column * per_column + row * per_row  # highdicom's map, which takes whole pixels only
        assert np.allclose(on_glass[:2], expected[:2], atol=1e-3)
    seg = hd.seg.segread(folder / "seg.dcm")
    assert (int(seg.TotalPixelMatrixRows), int(seg.TotalPixelMatrixColumns)) == (source.TotalPixelMatrixRows,
                                                                                  source.TotalPixelMatrixColumns)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and len(seg.SegmentSequence) == len(result.spread.lesions)
    mask = seg.get_total_pixel_matrix(segment_numbers=[1])[..., 0]
    dominant = lesion_masks(result.tile_map, 0.3)[0]
    numbers = result.tile_map.grid.number(*np.nonzero(dominant))
    assert int(mask.sum()) == sum((tiles[n]["box"][2] - tiles[n]["box"][0]) * (tiles[n]["box"][3] - tiles[n]["box"][1])
                                  for n in numbers) > 0


def test_every_output_renders_in_orthanc_with_its_gdcm_plugin(scorer, data_dir, tmp_path):
    """Orthanc with the distribution's GDCM plugin renders each result's preview and stays up.
    It used to abort on the slide SEG (GDCM asserts that a Segmentation with Pixel Measures
    has a Plane Orientation (Patient)); highdicom's own slide SEG still aborts it."""
    from orthanc import GDCM_PLUGIN, ORTHANC, Orthanc, free_port

    if not (Path(ORTHANC).exists() and GDCM_PLUGIN.exists()):
        pytest.fail("Orthanc or its GDCM plugin is not installed; `make test` installs orthanc and orthanc-gdcm")
    source = pydicom.dcmread(data_dir / "wsi_lymph_node.dcm")
    source.FrameOfReferenceUID = pydicom.uid.generate_uid()
    origin = pydicom.Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.5, 41.25
    source.TotalPixelMatrixOriginSequence = [origin]
    source.save_as(tmp_path / "wsi.dcm")
    slide = analyze(tmp_path / "wsi.dcm", scorer, grid=(5, 8), threshold=0.3, progress=False).save(tmp_path / "out")
    write_series(tmp_path / "ct", slices=3, spacing=3.0)
    ct = analyze(tmp_path / "ct", scorer, grid=(6, 6), threshold=0.05, progress=False).save(tmp_path / "out")
    outputs = sorted([*slide.glob("*.dcm"), *ct.glob("*.dcm")])
    assert {"seg.dcm", "pm.dcm", "sr.dcm"} <= {p.name for p in slide.glob("*.dcm")} and (ct / "seg.dcm").exists()
    server = Orthanc(tmp_path / "orthanc", "HEATMAP", free_port()).start()
    try:
        assert "gdcm" in server.get("/plugins")
        server.upload(*outputs)
        rendered = []
        for instance in server.get("/instances"):
            sop_class = server.get(f"/instances/{instance}/tags?simplify")["SOPClassUID"]
            if sop_class == "1.2.840.10008.5.1.4.1.1.88.34":
                continue  # the SR has no pixels
            try:
                picture = server.raw(f"/instances/{instance}/preview")
            except urllib.error.HTTPError as refused:
                # Orthanc renders no float pixels: it refuses the Parametric Map, and goes on
                assert refused.code == 415 and sop_class == "1.2.840.10008.5.1.4.1.1.30", (sop_class, refused.code)
                continue
            assert picture.startswith(b"\x89PNG"), sop_class
            rendered.append(sop_class)
        assert sorted(rendered).count("1.2.840.10008.5.1.4.1.1.66.4") == 2  # both SEGs, the slide's among them
        assert server.process.poll() is None, "Orthanc went down"
    finally:
        server.stop(kill=True)

"""CT/MR series as volumes in patient space: 3D heatmaps, 3D direction in anatomical words."""

import itertools

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_heatmap import analyze
from dicom_heatmap.errors import InputError
from volumes import ORIENTATIONS, MeanIntensityScorer, lesion_with_tail, write_series

#: direction of the tail in LPS and the words that must be reported (in any order)
TRUTHS = {
    "left-anterior-superior": ((1.0, -1.0, 1.0), {"left", "anterior", "superior"}),
    "inferior-right": ((-0.5, 0.0, -1.0), {"inferior", "right"}),
}


def angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def analysed_series(folder, orientation, truth, reverse=False, scorer=None, slices=32, grid=(16, 16)):
    field = lesion_with_tail(truth, centre=(3, -4, 2), radius=25, tail=70, tail_radius=10)
    write_series(folder, orientation, field, size=128, spacing=1.25, slice_spacing=160 / slices, slices=slices, reverse=reverse)
    return analyze(folder, scorer or MeanIntensityScorer(), progress=False, grid=grid)


@pytest.mark.parametrize("orientation,truth_name,reverse", [
    (o, t, r) for (o, t), r in zip(itertools.product(ORIENTATIONS, TRUTHS), itertools.cycle([False, True]))
])
def test_every_orientation_gives_the_same_anatomical_answer(tmp_path, orientation, truth_name, reverse):
    truth, words = TRUTHS[truth_name]
    result = analysed_series(tmp_path, orientation, truth, reverse)
    assert result.heatmap.shape == (32, 16, 16)
    assert result.spread.directed
    assert angle(result.spread.direction_frame, truth) <= 15
    assert set(result.spread.words.split("-")) == words
    assert result.spread.unit == "mm" and result.spread.extent_area > 0  # a volume in mm^3


def test_stored_order_does_not_matter(tmp_path):
    truth = TRUTHS["left-anterior-superior"][0]
    forward = analysed_series(tmp_path / "a", "sagittal", truth)
    backward = analysed_series(tmp_path / "b", "sagittal", truth, reverse=True)
    np.testing.assert_array_equal(forward.heatmap, backward.heatmap)
    assert forward.spread.direction_frame == backward.spread.direction_frame


def test_tile_numbers_run_slice_by_slice(tmp_path):
    result = analysed_series(tmp_path, "axial", (0, 0, 1))
    numbers = result.tile_numbers
    assert numbers[0, 0, 0] == 1 and numbers[0, 15, 15] == 256 and numbers[1, 0, 0] == 257
    # slices run from inferior to superior whatever the file order: the step is +z here
    assert result.tile_map.tile_affine[2, 0] == pytest.approx(5.0)


def test_outputs_of_a_volume(tmp_path, dciodvfy):
    truth = TRUTHS["left-anterior-superior"][0]
    result = analysed_series(tmp_path / "series", "oblique", truth)
    folder = result.save(tmp_path / "out")
    assert len(list(folder.glob("sc-*.dcm"))) == 32
    for name in ("pm.dcm", "sr.dcm", "sc-0001.dcm", "sc-0016.dcm"):
        assert dciodvfy(folder / name) == [], name
    # the Parametric Map: one frame per slice, mapped back by its position, not its order
    pm = pydicom.dcmread(folder / "pm.dcm")
    frames = pm.pixel_array
    inverse = np.linalg.inv(result.tile_map.tile_affine)
    for frame, group in zip(frames, pm.PerFrameFunctionalGroupsSequence):
        position = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        slice_index, row, col = (inverse @ np.append(position, 1))[:3]
        assert abs(row) < 1e-3 and abs(col) < 1e-3
        np.testing.assert_allclose(frame, result.tile_map.scores[int(round(slice_index))], atol=1e-6)
    # the SR: SCOORD3D focus and lesion ellipsoid inside the series' volume, direction coded
    report = hd.sr.srread(folder / "sr.dcm")
    (volume_group,) = report.content.get_volumetric_roi_measurement_groups()
    focus_group, *lesion_groups = report.content.get_planar_roi_measurement_groups()
    assert len(lesion_groups) == len(result.spread.lesions)  # one group a lesion, after the focus tile's
    surface, focus = volume_group.roi, focus_group.roi
    assert surface.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID and focus.frame_of_reference_uid == pm.FrameOfReferenceUID
    points = np.concatenate([np.asarray(surface.graphic_data), np.asarray(focus.value)])
    corners = np.array([result.meta["affine"] @ (s, r, c, 1) for s in (0, 31) for r in (0, 127) for c in (0, 127)])[:, :3]
    inside = np.linalg.inv(result.meta["affine"]) @ np.c_[points, np.ones(len(points))].T
    assert np.all(inside[:3].T >= -0.51 - 1e-6) and np.all(inside[0] <= 31.51) and np.all(inside[1:3] <= 127.51)
    assert corners.shape == (8, 3)
    caption_words = pydicom.dcmread(folder / "sc-0001.dcm").PatientOrientation
    assert len(caption_words) == 2


def test_real_model_end_to_end_on_a_series(tmp_path, scorer, dciodvfy):
    result = analysed_series(tmp_path / "series", "coronal", TRUTHS["inferior-right"][0], scorer=scorer, slices=12, grid=(8, 8))
    folder = result.save(tmp_path / "out")
    assert np.isfinite(result.heatmap).any()
    for name in ("pm.dcm", "sr.dcm"):
        assert dciodvfy(folder / name) == [], name


@pytest.mark.parametrize("name,frames,frame", [("eCT_Supplemental.dcm", 2, "PATIENT"), ("emri_small.dcm", 10, "IMAGE")])
def test_enhanced_multiframe_objects(tmp_path, scorer, dciodvfy, name, frames, frame):
    result = analyze(get_testdata_file(name), scorer, progress=False)
    assert result.heatmap.shape[0] == frames and result.meta["frame"] == frame
    folder = result.save(tmp_path)
    for path in [folder / "pm.dcm", folder / "sr.dcm", folder / "sc-0001.dcm"]:
        assert dciodvfy(path) == [], path.name
    if frame == "PATIENT":  # slices run along the plane's normal, so eCT's frame 2 comes first
        orientation = np.array(result.meta["source_datasets"][0].SharedFunctionalGroupsSequence[0]
                               .PlaneOrientationSequence[0].ImageOrientationPatient, float)
        assert result.tile_map.tile_affine[:3, 0] @ np.cross(orientation[:3], orientation[3:]) > 0
        sc = pydicom.dcmread(folder / "sc-0001.dcm")
        assert int(sc.SourceImageSequence[0].ReferencedFrameNumber) == 2


def test_uneven_spacing_and_gantry_tilt_are_refused(tmp_path):
    field = lesion_with_tail((1, 0, 0))
    paths = write_series(tmp_path / "uneven", "axial", field, slices=5)
    ds = pydicom.dcmread(paths[-1])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 3.0
    ds.save_as(paths[-1])
    with pytest.raises(InputError, match="not evenly spaced"):
        analyze(tmp_path / "uneven", MeanIntensityScorer(), progress=False)
    paths = write_series(tmp_path / "tilt", "axial", field, slices=5)
    for index, path in enumerate(sorted(paths)):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + index * 1.5  # sheared along y
        ds.save_as(path)
    with pytest.raises(InputError, match="gantry tilt"):
        analyze(tmp_path / "tilt", MeanIntensityScorer(), progress=False)

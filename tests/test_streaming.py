"""Large slide levels are streamed tile by tile, with the same results as reading them whole."""

import numpy as np
import pytest

import transforms.io.slide as slide_io
from dicom_heatmap import analyze
from dicom_heatmap.errors import ConfigurationError
from pipelines.evaluation.bench import make_synthetic_slide
from transforms.io.load import LoadInput
from transforms.io.slide import StreamedSlide


@pytest.fixture
def stream_everything(monkeypatch):
    monkeypatch.setattr(slide_io, "STREAM_ABOVE_PIXELS", 1000)


def test_streamed_slide_gives_the_in_memory_result(scorer, data_dir, tmp_path, dciodvfy, monkeypatch):
    whole = analyze(data_dir / "cmu_small_region.svs", scorer, progress=False, tile_size=128)
    monkeypatch.setattr(slide_io, "STREAM_ABOVE_PIXELS", 1000)
    streamed = analyze(data_dir / "cmu_small_region.svs", scorer, progress=False, tile_size=128)
    assert isinstance(streamed.image, StreamedSlide) and isinstance(whole.image, np.ndarray)
    # the streamed tissue map comes from the slide's thumbnail, a coarser reading of the
    # closed stain mask: a tile or two right at the tissue threshold may flip, no more
    flipped = streamed.tile_map.grid.is_tissue != whole.tile_map.grid.is_tissue
    assert flipped.sum() <= 0.01 * flipped.size
    # the model's patches (this slide states its pixel size) are read alike to 1e-6
    patches = streamed.patch_grid.is_tissue[0] & whole.patch_grid.is_tissue[0]
    assert patches.sum() >= 20
    np.testing.assert_allclose(streamed.patch_scores[patches], whole.patch_scores[patches], atol=1e-6)
    # a tile weights its patches by their tissue share, from the thumbnail when streamed
    both = (streamed.tile_map.grid.is_tissue & whole.tile_map.grid.is_tissue)[0]
    np.testing.assert_allclose(streamed.heatmap[both], whole.heatmap[both], atol=0.02)
    folder = streamed.save(tmp_path)
    for name in ("sc-0001.dcm", "pm.dcm", "sr.dcm"):
        assert dciodvfy(folder / name) == [], name


def test_background_of_a_streamed_slide_is_never_scored(scorer, tmp_path, stream_everything):
    slide = make_synthetic_slide(tmp_path / "slide.tif", 4096)
    result = analyze(slide, scorer, progress=False, level=0, tile_size=256)
    assert isinstance(result.image, StreamedSlide)
    analysed = np.isfinite(result.heatmap)
    cols = analysed.shape[1]
    assert analysed[:, : cols // 2].all() and not analysed[:, cols // 2 :].any()


def test_whole_image_operations_are_refused_on_a_streamed_slide(scorer, data_dir, stream_everything):
    with pytest.raises(ConfigurationError, match="streamed"):
        analyze(data_dir / "cmu_small_region.svs", scorer, progress=False, zoom=0.5)


def test_streamed_tiles_come_from_a_coarser_level_when_that_is_enough(tmp_path, stream_everything):
    slide = make_synthetic_slide(tmp_path / "slide.tif", 4096)
    image, _ = LoadInput(level=0)(slide)
    full = image[0, 0:256, 0:256]
    [coarse] = image.regions([(0, 0, 256, 256)], min_side=48)
    assert full.shape == (256, 256, 3) and coarse.shape == (64, 64, 3)  # level 1 (/4) still gives 64 >= 48 px
    assert image.regions([(0, 0, 256, 256)], min_side=100)[0].shape == (256, 256, 3)  # level 1 would be too small
    # the same picture, only smaller
    shrunk = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(full).resize((64, 64)))
    assert np.abs(shrunk.astype(int) - coarse.astype(int)).mean() < 20


def test_neighbouring_tiles_read_together_are_the_tiles_read_one_by_one(tmp_path, stream_everything):
    slide = make_synthetic_slide(tmp_path / "slide.tif", 4096)
    image, _ = LoadInput(level=0)(slide)
    # a row of tiles (read in one call), a tile of another row, and one out of order
    boxes = [(224, 0, 448, 224), (224, 224, 448, 448), (224, 448, 448, 672), (672, 224, 896, 448), (224, 1120, 448, 1344)]
    for min_side in (48, 100):
        together = image.regions(boxes, min_side)
        one_by_one = [image.regions([box], min_side)[0] for box in boxes]
        for box, joint, single in zip(boxes, together, one_by_one):
            assert joint.shape == single.shape and np.array_equal(joint, single), box


def test_a_slide_with_an_openslide_quickhash_is_identified_by_it_not_by_hashing_the_file(data_dir, scorer):
    import openslide

    from dicom_heatmap import analyze

    slide = data_dir / "cmu_small_region.svs"
    quickhash = openslide.OpenSlide(str(slide)).properties["openslide.quickhash-1"]
    first = analyze(slide, scorer, progress=False)
    assert first.identity.source_key == f"openslide-quickhash-1:{quickhash}"
    assert analyze(slide, scorer, progress=False).identity.folder_name == first.identity.folder_name


def test_a_slide_stating_its_pixel_size_is_read_at_the_model_scale(scorer, tmp_path, stream_everything):
    """Levels of 0.5, 2 and 8 um a pixel: the model (about 4.2 um an input pixel) is given
    the 2 um level, the coarsest not coarser than 1.25 times its own, and scores 200 um
    patches (100 px there) on the tissue half only, whatever the grid."""
    slide = make_synthetic_slide(tmp_path / "slide.tif", 8192, mpp=0.5)
    result = analyze(slide, scorer, progress=False)
    assert isinstance(result.image, StreamedSlide) and result.image.level == 1
    assert result.scale_notice is None
    sides = np.diff(result.patch_grid.col_edges)  # 2048 px split into 20 near-equal patches
    assert np.all(np.abs(sides - 100) <= 3), sides
    analysed = np.isfinite(result.patch_scores)
    cols = analysed.shape[1]
    assert analysed[:, : cols // 2 - 1].all() and not analysed[:, cols // 2 + 1 :].any()
    coarse = analyze(slide, scorer, progress=False, grid=(3, 3))
    np.testing.assert_array_equal(coarse.patch_scores, result.patch_scores)

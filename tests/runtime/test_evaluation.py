"""The evaluation metrics, cases folders and table, torch-free, on hand-made masks and maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from legrad_runtime.errors import CaseFolderError, InputError
from legrad_runtime.evaluation import (
    Case,
    centre_prior,
    format_table,
    iou_at,
    load_cases,
    load_mask,
    load_saved_heatmaps,
    mass_inside,
    pointing_hit,
    pointing_other,
    resize_heatmap,
    save_heatmaps,
    score_cases,
)


def _mask(shape, *pixels):
    m = np.zeros(shape, bool)
    for y, x in pixels:
        m[y, x] = True
    return m


# ---------------------------------------------------------------- metrics


def test_pointing_hits_when_the_single_maximum_is_inside_and_misses_otherwise():
    h = np.zeros((4, 5))
    h[2, 3] = 1.0
    h[0, 0] = 0.9
    assert pointing_hit(h, _mask((4, 5), (2, 3), (2, 4))) == 1.0
    assert pointing_hit(h, _mask((4, 5), (0, 0), (1, 1))) == 0.0


def test_pointing_ties_score_the_share_of_maximal_pixels_inside():
    h = np.zeros((4, 4))
    h[0, 0] = h[3, 3] = h[1, 2] = 5.0  # three maxima, one inside
    assert pointing_hit(h, _mask((4, 4), (3, 3), (2, 2))) == pytest.approx(1 / 3)
    constant = np.full((4, 4), 0.3)  # every pixel ties: chance level, the mask's area share
    assert pointing_hit(constant, _mask((4, 4), (0, 0), (1, 1), (2, 2))) == pytest.approx(3 / 16)


def test_pointing_other_counts_maxima_on_another_object_not_on_the_own_one_or_background():
    own, other = _mask((4, 4), (0, 0), (0, 1)), _mask((4, 4), (3, 3), (3, 2))
    objects = own | other  # the image's objects, the queried one included
    h = np.zeros((4, 4))
    h[3, 3] = 1.0
    assert pointing_other(h, own, objects) == 1.0 and pointing_hit(h, own) == 0.0
    assert pointing_other(h, other, objects) == 0.0  # a hit is not a miss on another object
    h[3, 3], h[2, 0] = 0.0, 1.0  # on background
    assert pointing_other(h, own, objects) == 0.0 and pointing_hit(h, own) == 0.0
    h[0, 0] = h[3, 2] = 1.0  # three maxima: own, other, background
    assert pointing_other(h, own, objects) == pytest.approx(1 / 3)
    assert pointing_hit(h, own) == pytest.approx(1 / 3)
    with pytest.raises(InputError, match=r"other objects' mask shape \(2, 2\) differs"):
        pointing_other(h, own, np.ones((2, 2), bool))


def test_iou_counts_pixels_at_or_above_the_threshold():
    h = np.array([[0.9, 0.5, 0.1], [0.6, 0.49, 0.0], [0.0, 0.2, 1.0]])
    # predicted: (0,0) (0,1) (1,0) (2,2); mask: (0,0) (0,1) (1,1) (2,1) (2,2)
    mask = _mask((3, 3), (0, 0), (0, 1), (1, 1), (2, 1), (2, 2))
    assert iou_at(h, mask) == pytest.approx(3 / 6)  # 3 shared, union 6
    assert iou_at(h, mask, threshold=0.95) == pytest.approx(1 / 5)  # only (2,2)
    assert iou_at(h, mask, threshold=0.0) == pytest.approx(5 / 9)  # everything predicted


def test_iou_min_max_normalises_maps_outside_the_unit_range():
    h = np.array([[-1.0, 0.0], [0.2, 3.0]])  # normalised: 0, 0.25, 0.3, 1
    mask = _mask((2, 2), (1, 1), (1, 0))
    assert iou_at(h, mask, threshold=0.28) == pytest.approx(1.0)
    assert iou_at(h, mask, threshold=0.2) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="threshold"):
        iou_at(h, mask, threshold=1.5)


def test_mass_inside_is_the_share_of_relevance_in_the_mask():
    h = np.array([[1.0, 0.5], [0.5, 0.0]])
    assert mass_inside(h, _mask((2, 2), (0, 0))) == pytest.approx(0.5)
    assert mass_inside(h, _mask((2, 2), (0, 1), (1, 1))) == pytest.approx(0.25)
    assert mass_inside(np.zeros((2, 2)), _mask((2, 2), (0, 0))) == pytest.approx(0.25)  # as uniform
    shifted = np.array([[-2.0, 2.0], [0.0, 0.0]])  # normalised: 0, 1, 0.5, 0.5
    assert mass_inside(shifted, _mask((2, 2), (0, 1))) == pytest.approx(0.5)


@pytest.mark.parametrize("metric", [pointing_hit, iou_at, mass_inside])
def test_metrics_refuse_mismatched_shapes_empty_masks_and_nan(metric):
    with pytest.raises(InputError, match="differs from mask shape"):
        metric(np.zeros((3, 3)), np.ones((3, 4), bool))
    with pytest.raises(InputError, match="mask is empty"):
        metric(np.ones((3, 3)), np.zeros((3, 3), bool))
    with pytest.raises(InputError, match="NaN"):
        metric(np.full((3, 3), np.nan), np.ones((3, 3), bool))


def test_resize_is_bilinear_with_pixel_centres():
    h = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)
    out = resize_heatmap(h, (2, 4))
    # output centres (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 in input pixels (edges clamp)
    np.testing.assert_allclose(out[0], [0.0, 1.0, 3.0, 4.0], atol=1e-5)
    np.testing.assert_allclose(out[1], [8.0, 9.0, 11.0, 12.0], atol=1e-5)


def test_centre_prior_is_a_centred_gaussian():
    prior = centre_prior(5, 9, sigma=0.25)
    assert prior.shape == (5, 9) and prior[2, 4] == pytest.approx(1.0)
    # pixel (0, 1): centre (0.5, 1.5) vs image centre (2.5, 4.5), sigmas 1.25 and 2.25 pixels
    expected = math.exp(-0.5 * ((2 / 1.25) ** 2 + (3 / 2.25) ** 2))
    assert prior[0, 1] == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(prior, prior[::-1, ::-1], atol=1e-7)


# ---------------------------------------------------------------- cases folders


def _write_folder(root, csv_text, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / name)
    (root / "cases.csv").write_text(csv_text, encoding="utf-8")
    return root


def _basic_files():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 255
    return {
        "img/a.png": np.full((6, 8, 3), 100, np.uint8),
        "img/b.png": np.full((6, 8, 3), 50, np.uint8),
        "m/a0.png": mask,
        "m/b0.png": 255 - mask,
    }


def test_cases_csv_is_read_with_relative_paths_and_optional_group(tmp_path):
    folder = _write_folder(
        tmp_path / "c",
        " Image , Prompt ,MASK,group\nimg/a.png,a red circle,m/a0.png,left\nimg/b.png, a cat ,m/b0.png,\n",
        _basic_files(),
    )
    cases = load_cases(folder)
    assert cases == [
        Case(folder / "img/a.png", "a red circle", folder / "m/a0.png", "left"),
        Case(folder / "img/b.png", "a cat", folder / "m/b0.png", None),
    ]
    assert load_mask(cases[0].mask).sum() == 6


def test_cases_csv_without_group_column(tmp_path):
    folder = _write_folder(tmp_path / "c", "image,prompt,mask\nimg/a.png,x,m/a0.png\n", _basic_files())
    assert [c.group for c in load_cases(folder)] == [None]


@pytest.mark.parametrize(
    ("csv_text", "match"),
    [
        ("image,text,mask\nimg/a.png,x,m/a0.png\n", "header image,text,mask; expected image,prompt,mask"),
        ("", "header"),
        ("image,prompt,mask\n", "lists no cases"),
        ("image,prompt,mask\nimg/a.png,x,m/a0.png\nimg/zz.png,y,m/a0.png\n", "row 2: image file .*zz.png"),
        ("image,prompt,mask\nimg/a.png,x,m/nope.png\n", "row 1: mask file .*nope.png does not exist"),
        ("image,prompt,mask\nimg/a.png,,m/a0.png\n", "row 1: empty prompt"),
        ("image,prompt,mask,group\nimg/a.png,x,m/a0.png,All\n", "reserved"),
        ("image,prompt,mask\nimg/a.png,x,m/small.png\n", r"is 4x3 but its image .* is 8x6"),
        ("image,prompt,mask\nimg/a.png,x,m/empty.png\n", "empty"),
        ("image,prompt,mask\nimg/a.png,x,m/text.png\n", "not an image PIL can read"),
    ],
)
def test_bad_cases_folders_raise_case_folder_errors(tmp_path, csv_text, match):
    files = _basic_files() | {
        "m/small.png": np.ones((3, 4), np.uint8),
        "m/empty.png": np.zeros((6, 8), np.uint8),
    }
    folder = _write_folder(tmp_path / "c", csv_text, files)
    (folder / "m/text.png").write_text("not a png")
    with pytest.raises(CaseFolderError, match=match):
        load_cases(folder)


def test_missing_folder_or_csv(tmp_path):
    with pytest.raises(CaseFolderError, match="does not exist"):
        load_cases(tmp_path / "nowhere")
    with pytest.raises(CaseFolderError, match="has no cases.csv"):
        load_cases(tmp_path)


def test_mask_modes_nonzero_colour_is_inside_and_alpha_is_ignored(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere, black
    rgba[1, 2, 0] = 1  # one barely red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgba.png"), _mask((2, 3), (1, 2)))

    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white, index 1 black
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "pal.png")
    expected = np.ones((2, 3), bool)
    expected[0, 0] = False
    np.testing.assert_array_equal(load_mask(tmp_path / "pal.png"), expected)


def test_mask_size_is_checked_against_the_upright_image(tmp_path):
    image = Image.fromarray(np.zeros((2, 4, 3), np.uint8))  # stored 4 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: upright it is 2 wide, 4 high
    (tmp_path / "c").mkdir()
    image.save(tmp_path / "c/img.jpg", exif=exif)
    Image.fromarray(np.ones((4, 2), np.uint8)).save(tmp_path / "c/upright.png")
    Image.fromarray(np.ones((2, 4), np.uint8)).save(tmp_path / "c/stored.png")
    (tmp_path / "c/cases.csv").write_text("image,prompt,mask\nimg.jpg,x,upright.png\n")
    assert len(load_cases(tmp_path / "c")) == 1
    (tmp_path / "c/cases.csv").write_text("image,prompt,mask\nimg.jpg,x,stored.png\n")
    with pytest.raises(CaseFolderError, match="is 4x2 but its image .* is 2x4"):
        load_cases(tmp_path / "c")


def test_saved_heatmaps_round_trip_and_missing_files_are_named(tmp_path):
    maps = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4, 4), np.float32)]
    save_heatmaps(tmp_path / "h", maps)
    loaded = load_saved_heatmaps(tmp_path / "h", 2)
    for a, b in zip(loaded, maps):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CaseFolderError, match=r"lacks 2 of 4 files \(2.npy, 3.npy\)"):
        load_saved_heatmaps(tmp_path / "h", 4)
    np.save(tmp_path / "h/1.npy", np.zeros((2, 2, 2)))
    with pytest.raises(CaseFolderError, match="shape"):
        load_saved_heatmaps(tmp_path / "h", 2)


# ---------------------------------------------------------------- scoring and the table


def _cases_with_masks(tmp_path):
    masks = [_mask((4, 4), (0, 0), (0, 1)), _mask((4, 4), (3, 3)), _mask((4, 4), (2, 0), (3, 0))]
    cases = [
        Case(tmp_path / "a.png", "p0", tmp_path / "m0.png", "g1"),
        Case(tmp_path / "a.png", "p1", tmp_path / "m1.png", "g2"),
        Case(tmp_path / "b.png", "p2", tmp_path / "m2.png", "g1"),
    ]
    for case, mask in zip(cases, masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(case.mask)
    return cases, masks


def test_scores_are_grouped_with_an_all_row(tmp_path):
    cases, _ = _cases_with_masks(tmp_path)
    peak = {(0, 0): np.zeros((4, 4)), (3, 3): np.zeros((4, 4)), (1, 1): np.zeros((4, 4))}
    for (y, x), h in peak.items():
        h[y, x] = 1.0
    good = [peak[0, 0], peak[3, 3], peak[1, 1]]  # hits, hits, misses
    bad = [peak[3, 3], peak[1, 1], peak[1, 1]]  # all miss
    ev = score_cases(cases, {"good": good, "bad": bad})
    assert ev.groups == ("all", "g1", "g2")
    assert ev.row("good").pointing == pytest.approx(2 / 3) and ev.row("good").n == 3
    assert ev.row("good", "g1").pointing == pytest.approx(1 / 2) and ev.row("good", "g1").n == 2
    assert ev.row("good", "g2").pointing == 1.0 and ev.row("bad").pointing == 0.0
    # IoU at 0.5 of a one-pixel prediction: 1/2, 1/1, 0/3
    assert ev.row("good").miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert ev.row("good").mass_inside == pytest.approx(2 / 3)
    assert [s.hit for s in ev.per_case["good"]] == [1.0, 1.0, 0.0]
    # bad: case 0 peaks on case 1's object (same image a.png); cases 1 and 2 peak on background
    assert [s.other for s in ev.per_case["bad"]] == [1.0, 0.0, 0.0]
    assert ev.row("bad").other == pytest.approx(1 / 3) and ev.row("bad", "g2").other == 0.0
    assert ev.row("good").other == 0.0


def test_scoring_normalises_and_resizes_maps(tmp_path):
    cases, masks = _cases_with_masks(tmp_path)
    small = np.zeros((2, 2))
    small[1, 1] = 1.0  # after bilinear resize to 4x4 the peak is pixel (3, 3)
    maps = [np.full((4, 4), 10.0), small, np.eye(4) * 3 + 7]
    ev = score_cases(cases, {"m": maps}, masks=masks)
    first, second, third = ev.per_case["m"]
    assert first.hit == pytest.approx(2 / 16) and first.iou == 0.0  # constant → zeros after min-max
    assert second.hit == 1.0
    assert third.iou == 0.0 and third.mass_inside == 0.0  # the diagonal misses (2, 0) and (3, 0)
    with pytest.raises(InputError, match="has 1 heatmaps for 3 cases"):
        score_cases(cases, {"m": maps[:1]})


def test_table_lists_every_group_and_method_aligned(tmp_path):
    cases, _ = _cases_with_masks(tmp_path)
    h = np.zeros((4, 4))
    h[0, 0] = 1.0
    ev = score_cases(cases, {"legrad": [h, h, h], "centre prior": [np.ones((4, 4))] * 3})
    lines = format_table(ev).splitlines()
    assert lines[0].split()[:6] == ["group", "method", "pointing", "%", "other", "object"]
    assert len(lines) == 2 + 3 * 2
    # the peak (0, 0) is case 0's object: a hit there, a miss on it for case 1 (same image)
    assert lines[2].split() == ["all", "legrad", "33.3", "33.3", "0.167", "0.333", "3"]
    assert lines[4].split() == ["g1", "legrad", "50.0", "0.0", "0.250", "0.500", "2"]
    assert lines[7].split()[:2] == ["centre", "prior"]
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers: equal line lengths

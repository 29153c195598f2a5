"""MMC's prompt-patch segmentation: planted regions, hand-computed sweeps on the patch grid and on the
image's pixels (upsampled maps, prompts of objects too small for a patch, ignored pixels)."""

import numpy as np
import pytest
import torch

from nbsupport.analysis import prompt_patch as pp

# ---------------------------------------------------------------- on the patch grid (the thesis setting)


def test_prompt_patch_segment_recovers_planted_region(grid_with_square):
    f, m = grid_with_square
    yx = pp.sample_prompt_points(m)
    assert m[yx]
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        np.testing.assert_array_equal(pp.prompt_patch_segment(f, yx, t).numpy(), m)
    df = pp.threshold_sweep_miou([f], [m[None]], ts=(0.1, 0.5))
    assert pp.sweep_summary(df) == {0.1: 1.0, 0.5: 1.0, "opt": 1.0}


def test_threshold_sweep_hand_computed():
    """Object A (6 patches, feature e1) and object B (6 patches, cos 0.25 to e1), background e3: a
    prompt in either object also grabs the other for t < 0.25 -> IoU 6/12; for t > 0.25 IoU 1."""
    f = torch.zeros(6, 6, 3)
    f[..., 2] = 1
    f[0:2, 0:3] = torch.tensor([1.0, 0, 0])
    f[3:5, 3:6] = torch.tensor([0.25, np.sqrt(1 - 0.0625), 0])
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 0:2, 0:3] = True
    masks[1, 3:5, 3:6] = True
    df = pp.threshold_sweep_miou(torch.stack([f, f]), [masks, masks[1]], ts=(0.1, 0.2, 0.3, 0.4))
    assert len(df) == 3 and df.attrs["thresholds"] == [0.1, 0.2, 0.3, 0.4]
    assert (df.y[0], df.x[0]) == (0, 0)  # every patch of a 2-row object is 1 from the border: lowest index
    summ = pp.sweep_summary(df)
    assert summ == pytest.approx({0.1: 0.5, 0.2: 0.5, 0.3: 1.0, 0.4: 1.0, "opt": 1.0})
    rnd = pp.threshold_sweep_miou([f], [masks], ts=(0.1, 0.3), mode="random", rng=2)
    assert all(masks[k][y, x] for k, y, x in zip(rnd.object, rnd.y, rnd.x))
    with pytest.raises(ValueError, match="feature grid"):
        pp.threshold_sweep_miou([f], [masks[:, :3]])


def test_prompt_point_is_the_centre():
    m = np.zeros((9, 9), bool)
    m[2:7, 3:8] = True
    assert pp.sample_prompt_points(m) == (4, 5)
    m2 = np.zeros((6, 6), bool)
    m2[0:5, 0:5] = True  # touches the border: the grid edge counts as outside
    assert pp.sample_prompt_points(m2) == (2, 2)
    pts = {pp.sample_prompt_points(m, "random", rng=r) for r in range(20)}
    assert all(m[p] for p in pts) and len(pts) > 5
    with pytest.raises(ValueError, match="empty"):
        pp.sample_prompt_points(np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="mode"):
        pp.sample_prompt_points(m, "corner")


def test_similarity_map(grid_with_square):
    f, m = grid_with_square
    s = pp.similarity_map(f, (3, 4))
    assert s.shape == (8, 8) and torch.allclose(s[torch.from_numpy(m)], torch.ones(int(m.sum())))
    assert torch.allclose(s[torch.from_numpy(~m)], torch.zeros(int((~m).sum())))
    v = pp.similarity_map(f, torch.tensor([0.0, 2.0, 0, 0]))
    assert torch.allclose(v[0, 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="query"):
        pp.similarity_map(f, torch.ones(3))
    with pytest.raises(ValueError, match="outside"):
        pp.similarity_map(f, (8, 0))


# ---------------------------------------------------------------- on the pixels (MMC's setting)


def test_upsample_map_by_hand():
    s = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    near = pp.upsample_map(s, (4, 4), mode="nearest")
    assert near.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # bilinear, half-pixel centres: source x = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped)
    lin = pp.upsample_map(torch.tensor([[0.0, 1.0]]), (1, 4))
    assert lin[0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    # the grid covers the top half only: the bottom rows repeat the last covered row
    cov = pp.upsample_map(s, (4, 2), coverage=(0.5, 1.0), mode="nearest")
    assert cov.tolist() == [[0, 1], [2, 3], [2, 3], [2, 3]]
    with pytest.raises(ValueError, match="mode"):
        pp.upsample_map(s, (4, 4), mode="cubic")
    with pytest.raises(ValueError, match="coverage"):
        pp.upsample_map(s, (4, 4), coverage=(0, 1))


def test_pixel_prompt_point_maps_the_deepest_pixel_into_the_grid():
    m = np.zeros((8, 8), bool)
    m[1:6, 2:7] = True  # centre pixel (3, 4): patch (0, 1) of a 2 x 2 grid of 4-px patches
    assert pp.pixel_prompt_point(m, (2, 2)) == (0, 1)
    one = np.zeros((8, 8), bool)
    one[5, 6] = True  # a one-pixel object owns no patch by majority, yet it gets a prompt
    assert pp.pixel_prompt_point(one, (2, 2)) == (1, 1)
    # a 4 x 8 image resized to an 8 x 8 input (4 x 4 grid of 2-px patches): pixel (1, 5) -> input (3, 5.5)
    wide = np.zeros((4, 8), bool)
    wide[1, 5] = True
    assert pp.pixel_prompt_point(wide, (4, 4), (8, 8), 2) == (1, 2)
    with pytest.raises(ValueError, match="empty"):
        pp.pixel_prompt_point(np.zeros((4, 4), bool), (2, 2))


def test_pixel_sweep_on_a_hand_made_mask():
    """A 2 x 2 grid of 2-px patches: top row e0, bottom row e1. The object is the top two pixel rows plus
    pixel (2, 0): 9 pixels. Prompt (0, 0) -> similarity 1 on the top row, 0 below."""
    f = torch.zeros(2, 2, 2)
    f[0, :, 0] = 1.0
    f[1, :, 1] = 1.0
    obj = np.zeros((4, 4), bool)
    obj[:2] = True
    obj[2, 0] = True
    # nearest: the prediction is the top 8 pixels at every t < 1 -> IoU 8 / 9
    df = pp.pixel_threshold_sweep([f], [obj[None]], ts=(0.1, 0.5), mode="nearest")
    assert (df.y[0], df.x[0]) == (0, 0)
    assert [df.loc[0, 0.1], df.loc[0, 0.5]] == pytest.approx([8 / 9, 8 / 9])
    # bilinear rows: 1, 0.75, 0.25, 0: t = 0.2 takes three rows (IoU 9 / 12), t = 0.5 two (8 / 9)
    df = pp.pixel_threshold_sweep([f], [obj[None]], ts=(0.2, 0.5))
    assert [df.loc[0, 0.2], df.loc[0, 0.5]] == pytest.approx([0.75, 8 / 9])
    # pixel (2, 0) not judged (a crowd / void pixel): the top rows are exactly the object
    valid = np.ones((4, 4), bool)
    valid[2, 0] = False
    df = pp.pixel_threshold_sweep([f], [obj[None]], ts=(0.5,), mode="nearest", valid_list=[valid])
    assert df.loc[0, 0.5] == pytest.approx(1.0)
    # on the patch grid the object is the top row of patches only, and the same prompt scores IoU 1
    grid_mask = np.array([[True, True], [False, False]])
    assert pp.threshold_sweep_miou([f], [grid_mask[None]], ts=(0.5,)).loc[0, 0.5] == 1.0
    assert pp.sweep_summary(pp.pixel_threshold_sweep([f], [obj[None]], ts=(0.2, 0.5))) == pytest.approx(
        {0.2: 0.75, 0.5: 8 / 9, "opt": 8 / 9}
    )


def test_pixel_sweep_scales_with_the_input_and_skips_unjudged_objects():
    """An 8 x 4 image (H x W) resized to an 8 x 8 input of 4-px patches; the planted object is the left
    half of the image = the left column of patches. Bilinear columns of the image: 1, 0.75, 0.25, 0, so
    t = 0.3 recovers the object and t = 0.8 half of it."""
    f = torch.zeros(2, 2, 2)
    f[:, 0, 0] = 1.0
    f[:, 1, 1] = 1.0
    obj = np.zeros((2, 8, 4), bool)
    obj[0, :, :2] = True
    obj[1, 0, 3] = True  # an object on unjudged pixels only: skipped
    valid = np.ones((8, 4), bool)
    valid[0, 3] = False
    df = pp.pixel_threshold_sweep([f], [obj], ts=(0.3, 0.8), input_hw=(8, 8), patch=4, valid_list=[valid])
    assert df.object.tolist() == [0] and (df.y[0], df.x[0]) == (0, 0)
    assert df.loc[0, 0.3] == 1.0 and df.loc[0, 0.8] == 0.5
    with pytest.raises(ValueError, match="valid mask"):
        pp.pixel_threshold_sweep([f], [obj], valid_list=[valid[:4]])


def test_mmc_table_holds_the_published_numbers():
    assert pp.MMC_TABLE1["DINO ViT-B/16"] == {0.1: 33.3, 0.2: 35.1, 0.3: 33.0, 0.4: 28.2, "opt": 35.1}
    assert pp.MMC_TABLE1["random init ViT-B/16"]["opt"] == 16.8
    for row in pp.MMC_TABLE1.values():
        assert row["opt"] == max(v for k, v in row.items() if k != "opt")

"""Ground truth on a patch grid: the majority rule, the resize to the model input, and the semantic and
instance grids of COCO images and label maps, against hand-computed cases and a brute-force loop."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from nbsupport.analysis import grid_truth
from nbsupport.analysis.grid_truth import GridTruth
from nbsupport.data.coco import CocoInstances


def write_coco(root, images):
    """A COCO instances file: ``images`` = [(H, W, [(bool mask, category id[, iscrowd]), ...]), ...], ids 1..n."""
    from pycocotools import mask as mu

    recs, anns = [], []
    for i, (h, w, objs) in enumerate(images, 1):
        recs.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        for m, c, *crowd in objs:
            rle = mu.encode(np.asfortranarray(m.astype(np.uint8)))
            seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            ann = {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": c,
                "segmentation": seg,
                "iscrowd": int(bool(crowd and crowd[0])),
            }
            anns.append(dict(ann, area=float(m.sum()), bbox=[0, 0, 1, 1]))
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 8)]
    p = root / "instances.json"
    p.write_text(json.dumps({"images": recs, "annotations": anns, "categories": cats}))
    return CocoInstances(p)


def test_labels_on_grid_hand_case():
    sem = np.array([[1, 1, 2, 2], [1, 0, 2, 2], [0, 0, 255, 255], [0, 3, 255, 3]])
    assert grid_truth.labels_on_grid(sem, (2, 2)).tolist() == [[1, 2], [0, -1]]
    assert grid_truth.labels_on_grid(sem, (2, 2), min_fraction=0.8).tolist() == [[-1, 2], [-1, -1]]
    assert grid_truth.labels_on_grid(sem, (2, 2), ignore=None).tolist() == [[1, 2], [0, 255]]
    with pytest.raises(ValueError, match="grid_hw"):
        grid_truth.labels_on_grid(sem, (5, 2))


def test_labels_on_grid_matches_loop_on_uneven_grid():
    g = np.random.default_rng(4)
    sem = g.integers(0, 3, size=(13, 11))
    sem[:7, :5] = 2  # a big block so that some cells have a clear majority
    h, w = 4, 3
    got = grid_truth.labels_on_grid(sem, (h, w), min_fraction=0.5)
    for cy in range(h):
        for cx in range(w):
            ys = [y for y in range(13) if y * h // 13 == cy]
            xs = [x for x in range(11) if x * w // 11 == cx]
            cnt = Counter(sem[np.ix_(ys, xs)].ravel().tolist())
            top = max(cnt.values())
            lab = min(k for k, v in cnt.items() if v == top)
            assert got[cy, cx] == (lab if top / (len(ys) * len(xs)) >= 0.5 else -1)
    assert (got != -1).sum() >= 2


def test_instance_and_masks_on_grid():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True  # cell (0, 0) entirely
    masks[1, 1:4, 1:4] = True  # overlaps mask 0 at pixel (1, 1)
    inst = grid_truth.instance_on_grid(masks, (2, 2))
    # id map: mask 1 (id 2) wins the overlap -> cell (0,0) has ids [1,1,1,2] -> 1
    assert inst.tolist() == [[1, 0], [0, 2]]
    on_grid = grid_truth.masks_on_grid(masks, (2, 2))
    assert on_grid[0].tolist() == [[True, False], [False, False]]
    # mask 1 covers cells (0,1): 2/4, (1,0): 2/4, (1,1): 4/4, (0,0): 1/4
    assert on_grid[1].tolist() == [[False, True], [True, True]]
    assert grid_truth.masks_on_grid(masks, (2, 2), min_fraction=0.75)[1].tolist() == [[False, False], [False, True]]


# ---------------------------------------------------------------- the label map at the model input


def test_resize_labels_is_pil_nearest_and_keeps_every_label():
    lab = np.array([[1, 2], [3, 70000]])  # an id above 255 survives (32-bit labels)
    np.testing.assert_array_equal(grid_truth.resize_labels(lab, (4, 4)), np.kron(lab, np.ones((2, 2), int)))
    g = np.random.default_rng(0)
    for (H, W), out in [((13, 11), (4, 3)), ((375, 500), (224, 224)), ((64, 64), (128, 96))]:
        lab = g.integers(-1, 300, (H, W))
        got = grid_truth.resize_labels(lab, out)
        ref = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(out[::-1], Image.NEAREST))
        assert got.dtype == np.int64 and got.shape == out
        np.testing.assert_array_equal(got, ref)
        assert set(np.unique(got)) <= set(np.unique(lab))
    with pytest.raises(ValueError, match="integer label map"):
        grid_truth.resize_labels(np.zeros((4, 4)), (2, 2))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        grid_truth.resize_labels(np.zeros((2, 4, 4), int), (2, 2))


def test_labels_to_grid_hand_case_with_resize_and_crop():
    # a 3 x 3 map resized to a 12 x 13 input (PIL nearest: input column x shows source column
    # floor((x + 0.5) * 3 / 13), so columns 9..12 show source column 2); the grid of 3 x 3 patches of 4 px
    # covers input columns 0..11 only: input column 12 is never seen, patch column 2 is 3/4 label 9
    lab = np.array([[1, 2, 9], [3, 0, 9], [255, 255, 9]])
    big = grid_truth.resize_labels(lab, (12, 13))
    assert (big[:, 9:] == 9).all() and not (big[:, :9] == 9).any()
    got = grid_truth.labels_to_grid(lab, (12, 13), (3, 3), patch=4)
    assert got.tolist() == [[1, 2, 9], [3, 0, 9], [-1, -1, 9]]  # 255 is ignored: no label
    assert grid_truth.labels_to_grid(lab, (12, 13), (3, 3), patch=4, min_fraction=0.8)[:, 2].tolist() == [-1] * 3
    with pytest.raises(ValueError, match="does not fit"):
        grid_truth.labels_to_grid(lab, (12, 12), (4, 4), patch=4)


@pytest.mark.parametrize("H,W,input_hw,grid,patch", [(37, 53, (64, 64), (8, 8), 8), (50, 40, (30, 20), (3, 2), 9)])
def test_labels_to_grid_matches_a_brute_force_loop(H, W, input_hw, grid, patch):
    g = np.random.default_rng(1)
    lab = g.integers(0, 3, size=(H, W))
    lab[: H // 2, : W // 2] = 2  # big blocks: some patches have a clear majority, some not
    lab[H // 2 :, W // 2 :] = 255
    got = grid_truth.labels_to_grid(lab, input_hw, grid, patch)
    big = np.asarray(Image.fromarray(lab.astype(np.int32)).resize(input_hw[::-1], Image.NEAREST))
    for y in range(grid[0]):
        for x in range(grid[1]):
            win = big[y * patch : (y + 1) * patch, x * patch : (x + 1) * patch].ravel().tolist()
            cnt = Counter(win)
            top = max(cnt.values())
            best = min(k for k, v in cnt.items() if v == top)
            want = best if top / len(win) >= 0.5 and best != 255 else -1
            assert got[y, x] == want, (y, x)
    assert (got == -1).any() and (got == 2).any()


# ---------------------------------------------------------------- the ground truth of images


def test_grid_truth_from_coco_hand_case(tmp_path):
    a = np.zeros((8, 8), bool)
    a[:4, :4] = True  # class 3, the top-left quarter
    b = np.zeros((8, 8), bool)
    b[3:8, 3:8] = True  # class 5: larger than a, so a (the smaller) wins the overlapping pixel (3, 3)
    c = np.zeros((6, 4), bool)
    c[:, :2] = True  # a 6 x 4 image: resized to 8 x 8, its left half
    coco = write_coco(tmp_path, [(8, 8, [(a, 3), (b, 5)]), (6, 4, [(c, 7)]), (8, 8, [])])
    truth = GridTruth.from_coco(coco, [1, 2, 3], (16, 16), (4, 4), patch=4)
    assert truth.semantic.shape == truth.instances.shape == (3, 4, 4) and len(truth) == 3
    # image 1 at 16 x 16: a = input rows/cols 0..7, b = rows/cols 6..15 less a. Patch (1, 1) is a; patches
    # (1, 2) and (2, 1) are half b, half background: a tie, won by the smaller label (0)
    assert truth.semantic[0].tolist() == [[3, 3, 0, 0], [3, 3, 0, 0], [0, 0, 5, 5], [0, 0, 5, 5]]
    assert truth.instances[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]
    assert truth.semantic[1].tolist() == [[7, 7, 0, 0]] * 4 and truth.instances[1].max() == 1
    assert (truth.semantic[2] == 0).all() and (truth.instances[2] == 0).all()
    assert [c.tolist() for c in truth.instance_class] == [[0, 3, 5], [0, 7], [0]]
    assert truth.n_objects == 3
    om = truth.object_masks(0)
    assert om.shape == (2, 4, 4) and om[0].sum() == 4 and om[1].sum() == 4 and not (om[0] & om[1]).any()
    assert truth.object_masks(2).shape == (0, 4, 4)


def test_grid_truth_from_coco_crowd_is_ignored_and_the_smaller_object_is_on_top(tmp_path):
    small = np.zeros((8, 8), bool)
    small[4:, 4:] = True  # class 4, listed first: under annotation order the large object would cover it
    crowd = np.zeros((8, 8), bool)
    crowd[:4, 4:] = True  # class 2, a crowd region: no class, no instance
    large = np.zeros((8, 8), bool)
    large[4:, :] = True  # class 3
    coco = write_coco(tmp_path, [(8, 8, [(small, 4), (crowd, 2, True), (large, 3)])])
    truth = GridTruth.from_coco(coco, [1], 8, (2, 2), patch=4)
    assert truth.semantic[0].tolist() == [[0, -1], [3, 4]]
    assert truth.instances[0].tolist() == [[0, -1], [2, 1]]  # objects numbered without the crowd
    assert truth.instance_class[0].tolist() == [0, 4, 3] and truth.n_objects == 2


def test_grid_truth_from_label_maps_voc_style():
    sem = np.zeros((8, 8), np.int64)
    sem[:4, :4] = 15  # person
    sem[4:, 4:] = 8  # cat
    sem[3, :] = 255  # a VOC boundary row, ignored
    inst = np.zeros((8, 8), np.int64)
    inst[:4, :4] = 1
    inst[4:, 4:] = 2
    inst[3, :] = 255
    truth = GridTruth.from_label_maps([sem, sem], 8, (2, 2), [inst, None], patch=4)
    assert truth.semantic[0].tolist() == [[15, 0], [0, 8]]  # the 255 row is a quarter of each top patch
    assert truth.instances[0].tolist() == [[1, 0], [0, 2]]
    assert truth.instance_class[0].tolist() == [0, 15, 8]  # the class under each instance (255 skipped)
    assert (truth.instances[1] == -1).all() and truth.instance_class[1].tolist() == [0]
    strict = GridTruth.from_label_maps([sem], 8, (2, 2), patch=4, min_fraction=0.8)
    assert strict.semantic[0].tolist() == [[-1, -1], [0, 8]]  # 12/16 pixels of a top patch < 0.8
    with pytest.raises(ValueError, match="instance maps"):
        GridTruth.from_label_maps([sem, sem], 8, (2, 2), [inst])

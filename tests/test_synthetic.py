"""The synthetic scene world: determinism, exact ground truth, COCO export, class is not colour."""
import hashlib
import json
import time

import numpy as np
import pytest

from nbsupport.data import CocoCaptions, CocoInstances, synthetic as syn


def test_scene_ground_truth_is_consistent():
    for seed in range(30):
        sc = syn.render_scene(seed, size=96)
        assert sc.image.shape == (96, 96, 3) and sc.image.dtype == np.uint8
        assert sc.instance_masks.sum(0).max() <= 1  # visible parts are disjoint
        expected = np.zeros((96, 96), np.int32)
        for m, c in zip(sc.instance_masks, sc.category_ids):
            expected[m] = c
        np.testing.assert_array_equal(sc.semantic, expected)
        names = {c.id: c for c in syn.CLASSES}
        for c in sc.category_ids:
            assert f"{names[c].texture} {names[c].noun}" in sc.caption
        assert sc.caption.endswith(sc.background) and sc.background in syn.BACKGROUNDS
        for m, (x, y, w, h) in zip(sc.instance_masks, sc.boxes):
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_determinism_and_seed_sensitivity():
    a, b, c = syn.render_scene(5), syn.render_scene(5), syn.render_scene(6)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_overlap_modes():
    touching_boxes = 0
    for seed in range(40):
        sc = syn.render_scene(seed, n_objects=3, overlap="none")
        dil = [np.pad(m, 1) for m in sc.instance_masks]
        for i in range(len(dil)):
            for j in range(i + 1, len(dil)):
                assert not (dil[i] & dil[j]).any()
        sc2 = syn.render_scene(seed, n_objects=4, overlap="allowed", scale=(0.4, 0.6))
        bx = sc2.boxes
        for i in range(len(bx)):
            for j in range(i + 1, len(bx)):
                if bx[i][0] < bx[j][0] + bx[j][2] and bx[j][0] < bx[i][0] + bx[i][2] and \
                        bx[i][1] < bx[j][1] + bx[j][3] and bx[j][1] < bx[i][1] + bx[i][3]:
                    touching_boxes += 1
        assert sc2.instance_masks.sum(0).max() <= 1
    assert touching_boxes > 5
    with pytest.raises(ValueError, match="overlap"):
        syn.render_scene(0, overlap="sometimes")


def test_colour_does_not_tell_the_class():
    means = {}
    for seed in range(80):
        sc = syn.render_scene(seed, n_objects=2)
        for m, c in zip(sc.instance_masks, sc.category_ids):
            means.setdefault(c, []).append(sc.image[m].mean(0))
    spreads = [np.std(np.array(v), axis=0).mean() for v in means.values() if len(v) >= 5]
    assert len(spreads) >= 5 and min(spreads) > 25  # per-class mean colour varies widely (0-255 scale)


def test_render_speed():
    t = time.perf_counter()
    for seed in range(50):
        syn.render_scene(seed, size=128)
    assert (time.perf_counter() - t) / 50 < 0.05


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_make_dataset_coco_roundtrip_and_bytes(tmp_path):
    r1 = syn.make_dataset(tmp_path / "a", 6, seed=3, size=64, split="val")
    r2 = syn.make_dataset(tmp_path / "b", 6, seed=3, size=64, split="val")
    assert _digest(r1) == _digest(r2)
    ds = CocoInstances(r1 / "instances_val.json")
    assert ds.image_ids == list(range(1, 7))
    for k, image_id in enumerate(ds.image_ids):
        sc = syn.render_scene(syn.scene_rng(3, "val", k), size=64)
        np.testing.assert_array_equal(ds.instance_masks(image_id), sc.instance_masks)
        assert ds.category_ids(image_id) == sc.category_ids
        assert np.array_equal(np.asarray(ds.load(image_id)), sc.image)
        assert CocoCaptions(r1 / "captions_val.json").captions(image_id) == [sc.caption]
    raw = json.loads((r1 / "instances_val.json").read_text())
    assert all(isinstance(a["segmentation"]["counts"], str) for a in raw["annotations"])
    assert all(im["width"] == 64 and im["height"] == 64 for im in raw["images"])


def test_cached_dataset_and_split_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(tmp_path))
    v = syn.synthetic_dataset(n_images=3, size=48, split="val")
    t = syn.synthetic_dataset(n_images=3, size=48, split="train")
    assert v != t and v.parent == tmp_path
    mtime = (v / "instances_val.json").stat().st_mtime_ns
    assert syn.synthetic_dataset(n_images=3, size=48, split="val") == v
    assert (v / "instances_val.json").stat().st_mtime_ns == mtime  # cached, not regenerated
    a = np.asarray(CocoInstances(v / "instances_val.json").load(1))
    b = np.asarray(CocoInstances(t / "instances_train.json").load(1))
    assert not np.array_equal(a, b)
    assert not list(tmp_path.glob(".synthetic-*"))  # no temporary folder left behind

"""The synthetic scene world: determinism, exact ground truth, COCO export, class is shape not colour."""

import hashlib
import json
import time

import numpy as np
import pytest

from nbsupport.data import synthetic as syn
from nbsupport.data.coco import CocoCaptions, CocoInstances
from nbsupport.data.synthetic import dataset as syn_dataset
from nbsupport.data.synthetic import render as syn_render

NAMES = {c.id: c for c in syn.CLASSES}


def _boxes_overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_classes_and_backgrounds():
    assert [c.id for c in syn.CLASSES] == list(range(1, len(syn.CLASSES) + 1))
    assert len({c.noun for c in syn.CLASSES}) == len({c.texture for c in syn.CLASSES}) == len(syn.CLASSES) >= 5
    assert all(c.noun.isalpha() and c.noun.islower() for c in syn.CLASSES)  # single-word nouns
    assert [c["name"] for c in syn.categories()] == [c.noun for c in syn.CLASSES]
    assert len(syn.BACKGROUNDS) >= 4


def test_determinism_and_seed_sensitivity():
    a, b, c = syn.render_scene(5), syn.render_scene(5), syn.render_scene(6)
    g = syn.render_scene(np.random.default_rng(5))
    for x in (b, g):
        assert np.array_equal(a.image, x.image) and np.array_equal(a.instance_masks, x.instance_masks)
        assert a.caption == x.caption and a.category_ids == x.category_ids
    assert not np.array_equal(a.image, c.image)
    s1, s2 = syn.scene_rng(0, "train", 3), syn.scene_rng(0, "val", 3)
    assert not np.array_equal(syn.render_scene(s1).image, syn.render_scene(s2).image)


@pytest.mark.parametrize("overlap", ["none", "allowed"])
def test_scene_ground_truth_is_consistent(overlap):
    from pycocotools import mask as mu

    counts = []
    for seed in range(40):
        sc = syn.render_scene(seed, size=96, n_objects=(1, 4), overlap=overlap)
        n = len(sc.category_ids)
        counts.append(n)
        assert sc.image.shape == (96, 96, 3) and sc.image.dtype == np.uint8
        assert sc.instance_masks.shape == (n, 96, 96) and sc.instance_masks.dtype == bool
        assert sc.instance_masks.sum(0).max() <= 1  # visible parts are disjoint
        assert (sc.instance_masks.sum((1, 2)) >= 16).all()
        expected = np.zeros((96, 96), np.int32)
        for m, c in zip(sc.instance_masks, sc.category_ids):
            expected[m] = c
        np.testing.assert_array_equal(sc.semantic, expected)
        for m, box in zip(sc.instance_masks, sc.boxes):  # boxes are pycocotools' boxes of the masks
            np.testing.assert_array_equal(box, mu.toBbox(mu.encode(np.asfortranarray(m.astype(np.uint8)))))
        for m, cen in zip(sc.instance_masks, sc.centroids):
            np.testing.assert_allclose(cen, np.argwhere(m).mean(0))
        for c in sc.category_ids:  # every object named with its texture, the background last
            assert f"{NAMES[c].texture} {NAMES[c].noun}" in sc.caption
        assert sum(sc.caption.count(NAMES[c].name) for c in NAMES) == n
        assert sc.caption.endswith(f" on {sc.background}") and sc.background in syn.BACKGROUNDS
        assert sc.caption == syn.caption_for(sc.category_ids, sc.centroids, sc.background)
    assert min(counts) >= 1 and max(counts) == 4 and len(set(counts)) >= 3


def test_caption_relations():
    # centroids are (y, x); each object is related to the next one
    two = syn.caption_for([1, 2], [(10, 5), (12, 50)], "gravel")
    assert two == "a striped triangle left of a dotted circle on gravel"
    assert syn.caption_for([2, 1], [(12, 50), (10, 5)], "sand") == "a dotted circle right of a striped triangle on sand"
    assert (
        syn.caption_for([3, 4, 6], [(5, 20), (60, 25), (58, 90)], "wood")
        == "a checkered square above a wavy star left of a zigzag cross on wood"
    )
    assert syn.caption_for([5], [(3, 3)], "water") == "a plain ring on water"
    assert syn.caption_for([], [], "grass") == "empty grass"


def test_overlap_none_keeps_objects_apart_and_fits_fewer():
    for seed in range(40):
        sc = syn.render_scene(seed, n_objects=3, overlap="none")
        dil = [np.pad(m, 1) for m in sc.instance_masks]  # a 1 px gap at least between objects
        for i in range(len(dil)):
            grown = dil[i] | np.roll(dil[i], 1, 0) | np.roll(dil[i], -1, 0)
            grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            for j in range(i + 1, len(dil)):
                assert not (grown & dil[j]).any()
        assert len(sc.category_ids) == 3  # small objects always fit
    crowded = [len(syn.render_scene(s, n_objects=6, scale=(0.6, 0.7), max_tries=10).category_ids) for s in range(5)]
    assert max(crowded) < 6 and min(crowded) >= 1  # cannot fit six big objects: fewer, no error


def test_overlap_allowed_occludes_but_labels_stay_disjoint():
    overlapping_boxes = 0
    for seed in range(40):
        sc = syn.render_scene(seed, n_objects=4, overlap="allowed", scale=(0.4, 0.6))
        bx = sc.boxes
        overlapping_boxes += sum(_boxes_overlap(bx[i], bx[j]) for i in range(len(bx)) for j in range(i + 1, len(bx)))
        assert sc.instance_masks.sum(0).max() <= 1
    assert overlapping_boxes > 10
    with pytest.raises(ValueError, match="overlap"):
        syn.render_scene(0, overlap="sometimes")


def test_labels_match_what_is_drawn(monkeypatch):
    """With a black background, red = coverage and blue = an instance code, labels can be read back
    from the pixels: a pixel is labelled with an instance exactly when that instance covers at least
    half of it (after occlusion by later instances)."""
    codes = np.linspace(0.15, 1.0, 12)
    drawn = []

    def fixed_colours(rng):
        b = codes[len(drawn)]
        drawn.append(b)
        return np.array([1.0, 0.0, b]), np.array([1.0, 1.0, b])

    monkeypatch.setattr(syn_render, "_background", lambda rng, kind, size: np.zeros((size, size, 3)))
    monkeypatch.setattr(syn_render, "_colour_pair", fixed_colours)
    occluded = 0
    for seed in range(4):
        drawn.clear()
        sc = syn.render_scene(seed, size=96, n_objects=4, overlap="allowed", scale=(0.3, 0.6), noise=0.0)
        assert len(drawn) == len(sc.category_ids)  # every drawn object is annotated
        red = sc.image[..., 0].astype(int)
        union = sc.instance_masks.any(0)
        labels = np.where(union, sc.instance_masks.argmax(0), -1)
        pad = np.pad(labels, 1, constant_values=-1)
        nb = np.stack([pad[dy : dy + 96, dx : dx + 96] for dy in range(3) for dx in range(3)])  # 3x3 neighbourhoods
        lo, hi = np.where(nb >= 0, nb, 99).min(0), nb.max(0)
        single = (hi < 0) | (lo == hi)  # at most one instance nearby: red is that instance's coverage
        ambiguous = (red == 127) | (red == 128)  # coverage of exactly one half
        assert single.mean() > 0.9
        assert ((red >= 128) == union)[single & ~ambiguous].all()
        interior = (nb == labels).all(0) & union  # no anti-aliased blend in the neighbourhood
        assert interior.sum() > 0.6 * union.sum()
        dist = np.abs(sc.image[..., 2][..., None] / 255.0 - np.array(drawn))
        assert (dist.min(-1)[interior] < 0.006).all()  # shows exactly one instance's code ...
        assert (dist.argmin(-1) == labels)[interior].all()  # ... the labelled one (the one on top)
        bx = sc.boxes
        occluded += sum(_boxes_overlap(bx[i], bx[j]) for i in range(len(bx)) for j in range(i + 1, len(bx)))
    assert occluded >= 2  # the check above did meet overlapping objects


def test_colour_is_not_class_but_shape_is():
    """Mean colour of an instance predicts its class at chance level; a few shape descriptors predict
    it well: classes differ in shape (and texture), colour is random per instance."""
    from skimage.measure import regionprops
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    colour, shape, labels = [], [], []
    for seed in range(150):
        sc = syn.render_scene(seed, n_objects=2)
        for m, c in zip(sc.instance_masks, sc.category_ids):
            ys, xs = np.nonzero(m)
            if ys.min() == 0 or xs.min() == 0 or ys.max() == 127 or xs.max() == 127:
                continue  # clipped by the frame
            p = regionprops(m.astype(np.uint8))[0]
            colour.append(sc.image[m].mean(0))
            shape.append([p.solidity, p.extent, p.euler_number, p.perimeter**2 / p.area, p.eccentricity])
            labels.append(c)
    colour, shape, labels = np.array(colour), np.array(shape), np.array(labels)
    assert len(set(labels)) == len(syn.CLASSES) and len(labels) > 150
    for c in set(labels):  # per-class mean colour varies widely (0-255 scale)
        assert colour[labels == c].std(0).mean() > 25
    rf = RandomForestClassifier(n_estimators=60, random_state=0)
    acc_colour = cross_val_score(KNeighborsClassifier(7), colour, labels, cv=4).mean()
    acc_shape = cross_val_score(rf, shape, labels, cv=4).mean()
    chance = np.bincount(labels).max() / len(labels)
    assert acc_colour < chance + 0.15, (acc_colour, chance)
    assert acc_shape > 0.85, acc_shape


def test_render_speed():
    syn.render_scene(0, size=128)
    t = time.perf_counter()
    for seed in range(50):
        syn.render_scene(seed, size=128)
    per_scene = (time.perf_counter() - t) / 50
    assert per_scene < 0.020, f"{per_scene * 1000:.1f} ms per 128 px scene"


def test_bad_arguments_are_named():
    for kw, msg in [
        ({"n_objects": (3, 1)}, "n_objects"),
        ({"n_objects": "many"}, "n_objects"),
        ({"scale": (0.5, 2)}, "scale"),
        ({"size": 8}, "size"),
        ({"classes": ["cube"]}, "cube"),
        ({"backgrounds": ["lava"]}, "backgrounds"),
        ({"min_visible": 2}, "min_visible"),
    ]:
        with pytest.raises(ValueError, match=msg):
            syn.render_scene(0, **kw)
    with pytest.raises(ValueError, match="split"):
        syn.scene_rng(0, "../x", 0)
    only = {c for s in range(10) for c in syn.render_scene(s, classes=["star", 2]).category_ids}
    assert only == {2, 4}


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_make_dataset_coco_roundtrip_and_bytes(tmp_path):
    from pycocotools.coco import COCO

    r1 = syn.make_dataset(tmp_path / "a", 6, seed=3, size=64, split="val", overlap="allowed")
    r2 = syn.make_dataset(tmp_path / "b", 6, seed=3, size=64, split="val", overlap="allowed")
    r3 = syn.make_dataset(tmp_path / "c", 6, seed=4, size=64, split="val", overlap="allowed")
    assert _digest(r1) == _digest(r2) != _digest(r3)
    assert sorted(p.name for p in r1.iterdir()) == [
        "captions_val.json",
        "images",
        "instances_val.json",
        "manifest.json",
    ]
    ds = CocoInstances(r1 / "instances_val.json")
    assert ds.image_ids == list(range(1, 7)) and ds.categories == {c.id: c.noun for c in syn.CLASSES}
    caps = CocoCaptions(r1 / "captions_val.json")
    n_inst = 0
    for k, image_id in enumerate(ds.image_ids):
        sc = syn.render_scene(syn.scene_rng(3, "val", k), size=64, overlap="allowed")
        np.testing.assert_array_equal(ds.instance_masks(image_id), sc.instance_masks)
        np.testing.assert_array_equal(ds.semantic_mask(image_id), sc.semantic)
        np.testing.assert_array_equal(ds.boxes(image_id), sc.boxes)
        assert ds.category_ids(image_id) == sc.category_ids
        assert np.array_equal(np.asarray(ds.load(image_id)), sc.image)  # PNG is lossless
        assert ds.image_path(image_id).name == f"val_{k:06d}.png"
        assert caps.captions(image_id) == [sc.caption]
        n_inst += len(sc.category_ids)
    raw = json.loads((r1 / "instances_val.json").read_text())
    assert len(raw["annotations"]) == n_inst
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 for a in raw["annotations"])
    for a in raw["annotations"]:  # area from the RLE = pixel count of the mask
        k = ds.coco.getAnnIds(imgIds=[a["image_id"]]).index(a["id"])
        assert a["area"] == ds.instance_masks(a["image_id"])[k].sum() > 0
    assert all(im["width"] == 64 and im["height"] == 64 for im in raw["images"])
    coco = COCO(str(r1 / "instances_val.json"))  # plain pycocotools reads the files too
    assert len(coco.getAnnIds()) == n_inst
    assert len(COCO(str(r1 / "captions_val.json")).getAnnIds()) == 6
    man = json.loads((r1 / "manifest.json").read_text())
    assert man["splits"]["val"]["seed"] == 3 and man["splits"]["val"]["overlap"] == "allowed"
    syn.make_dataset(r1, 2, seed=3, size=64, split="train")  # a second split joins the manifest
    man = json.loads((r1 / "manifest.json").read_text())
    assert set(man["splits"]) == {"train", "val"} and (r1 / "images" / "train_000001.png").is_file()


def test_cached_dataset_and_split_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(tmp_path))
    v = syn.synthetic_dataset(n_images=3, size=48, split="val")
    t = syn.synthetic_dataset(n_images=3, size=48, split="train")
    assert v != t and v.parent == tmp_path and v.name.startswith("synthetic-val-")
    mtime = (v / "instances_val.json").stat().st_mtime_ns
    assert syn.synthetic_dataset(n_images=3, size=48, split="val") == v
    assert (v / "instances_val.json").stat().st_mtime_ns == mtime  # cached, not regenerated
    a = np.asarray(CocoInstances(v / "instances_val.json").load(1))
    b = np.asarray(CocoInstances(t / "instances_train.json").load(1))
    assert not np.array_equal(a, b)  # train and val never share scenes
    assert syn.synthetic_dataset(n_images=4, size=48, split="val") != v  # other parameters, other folder
    # a manifest that does not match (e.g. an older world version) triggers regeneration
    man = json.loads((v / "manifest.json").read_text())
    man["splits"]["val"]["world_version"] = -1
    (v / "manifest.json").write_text(json.dumps(man))
    assert syn.synthetic_dataset(n_images=3, size=48, split="val") == v
    assert json.loads((v / "manifest.json").read_text())["splits"]["val"]["world_version"] == syn.WORLD_VERSION
    assert not list(tmp_path.glob(".synthetic-*"))  # no temporary folder left behind


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(tmp_path))
    real = syn.render_scene
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(syn_dataset, "render_scene", dying)  # the name make_dataset calls
    with pytest.raises(KeyboardInterrupt):
        syn.synthetic_dataset(n_images=5, size=32, split="val")
    assert list(tmp_path.iterdir()) == []  # neither a half dataset nor a temporary folder
    monkeypatch.setattr(syn_dataset, "render_scene", real)
    root = syn.synthetic_dataset(n_images=5, size=32, split="val")
    assert len(CocoInstances(root / "instances_val.json")) == 5


def test_explicit_root_keeps_other_splits_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "world"
    syn.synthetic_dataset(n_images=2, size=32, split="train", root=root)
    syn.synthetic_dataset(n_images=3, size=32, split="val", root=root)
    assert len(CocoInstances(root / "instances_train.json")) == 2
    assert len(CocoInstances(root / "instances_val.json")) == 3
    assert set(json.loads((root / "manifest.json").read_text())["splits"]) == {"train", "val"}
    syn.synthetic_dataset(n_images=1, size=32, split="val", root=root)  # regenerate val only
    assert len(list((root / "images").glob("val_*.png"))) == 1 and len(list((root / "images").glob("train_*.png"))) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        syn.synthetic_dataset(n_images=1, size=32, root=foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_textures_are_told_apart_at_patch_scale():
    """World v3: an 8 x 8 pixel window inside an object shows enough of its texture to name the class
    (fixed pixel scales, one structure per texture). Colour-free descriptor: sorted |FFT| magnitudes of the
    standardised grayscale window (phase- and largely rotation-invariant); 7-NN, 4-fold CV. v2, whose
    patterns scaled with the object and were three kinds of stripes, gives 0.44 here; v3 0.59 (chance 0.28)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X, y = [], []
    for seed in range(200):
        sc = syn.render_scene(seed, size=64, n_objects=1, scale=(0.8, 0.95))
        g = sc.image.astype(float) @ np.array([0.299, 0.587, 0.114])
        for _ in range(10):
            i, j = rng.integers(0, 57, 2)
            lab = sc.semantic[i : i + 8, j : j + 8]
            if (lab == lab[0, 0]).all() and lab[0, 0] > 0:
                w = g[i : i + 8, j : j + 8]
                w = (w - w.mean()) / (w.std() + 0.255)
                X.append(np.sort(np.abs(np.fft.fft2(w)).ravel())[::-1][:24])
                y.append(lab[0, 0])
    X, y = np.array(X), np.array(y)
    assert len(set(y)) >= 5 and len(y) > 300
    chance = np.bincount(y).max() / len(y)
    acc = cross_val_score(KNeighborsClassifier(7), X, y, cv=4).mean()
    assert acc > chance + 0.25, (acc, chance)


def test_appearance_redraws_colours_and_background_not_geometry():
    """``appearance=``: same objects, masks and texture patterns, new background and colours. Inside an
    object the drawn luminance is linear in the pattern, so two renderings correlate (up to sign) there."""
    from scipy import ndimage

    backgrounds = set()
    for seed in range(8):
        a = syn.render_scene(seed, 96, appearance=100 + seed)
        b = syn.render_scene(seed, 96, appearance=200 + seed)
        assert a.category_ids == b.category_ids and np.array_equal(a.instance_masks, b.instance_masks)
        assert np.array_equal(a.semantic, b.semantic) and np.allclose(a.boxes, b.boxes)
        backgrounds.add((a.background, b.background))
        assert np.abs(a.image.astype(float) - b.image).mean() > 15  # visibly different pictures
        lum = np.array([0.299, 0.587, 0.114])
        for m, c in zip(a.instance_masks, a.category_ids):
            inner = ndimage.binary_erosion(m, iterations=2)
            if NAMES[c].texture == "plain" or inner.sum() < 30:
                continue
            r = np.corrcoef(a.image[inner] @ lum, b.image[inner] @ lum)[0, 1]
            assert abs(r) > 0.8, (seed, NAMES[c].name, r)  # the same pattern in other colours
    assert any(x != y for x, y in backgrounds)
    # the appearance stream is its own: same appearance seed, same picture
    assert np.array_equal(syn.render_scene(3, 64, appearance=7).image, syn.render_scene(3, 64, appearance=7).image)

"""DAVIS label propagation and the toolkit's J / F: hand-computed masks, an independent brute-force boundary
matcher, planted features whose propagation is known exactly, and a run on the DAVIS fixture."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from nbsupport.analysis import label_propagation as lp
from nbsupport.data.datasets import davis


def square(n=20, top=5, left=5, side=10):
    m = np.zeros((n, n), bool)
    m[top : top + side, left : left + side] = True
    return m


def test_boundary_map_of_a_square_is_the_toolkit_ring():
    b = lp.boundary_map(square())
    expected = np.zeros((20, 20), bool)
    expected[4:15, 4] = True  # outer left column, with the top-left corner (diagonal neighbour)
    expected[4, 5:15] = True  # outer top row
    expected[5:15, 14] = True  # inner right column
    expected[14, 5:14] = True  # inner bottom row
    assert b.sum() == 40
    assert np.array_equal(b, expected)


def test_j_and_f_hand_computed():
    gt = square()
    assert lp.j_measure(gt, gt) == 1.0 and lp.f_measure(gt, gt) == 1.0
    assert lp.j_measure(square(top=0, left=0, side=3), square(top=15, left=15, side=3)) == 0.0
    assert lp.f_measure(square(top=0, left=0, side=3), square(top=15, left=15, side=3)) == 0.0
    empty = np.zeros_like(gt)
    assert lp.j_measure(empty, empty) == 1.0 and lp.f_measure(empty, empty) == 1.0
    assert lp.j_measure(empty, gt) == 0.0 and lp.f_measure(empty, gt) == 0.0
    # shifted by 1 px: overlap 90, union 110; every boundary pixel within 1 px of the other boundary
    s1 = square(left=6)
    assert lp.j_measure(s1, gt) == pytest.approx(90 / 110)
    assert lp.f_measure(s1, gt, bound_th=1) == 1.0
    # shifted by 3 px: overlap 70, union 130
    assert lp.j_measure(square(left=8), gt) == pytest.approx(70 / 130)
    # a far single-pixel blob adds 4 unmatched predicted boundary pixels: P = 40 / 44, R = 1
    blob = gt.copy()
    blob[1, 18] = True
    assert lp.f_measure(blob, gt, bound_th=1) == pytest.approx(20 / 21)
    # void pixels are ignored by J
    void = np.zeros_like(gt)
    void[:, 15:] = True
    wider = gt.copy()
    wider[5:15, 15:18] = True
    assert lp.j_measure(wider, gt, void) == 1.0 and lp.j_measure(wider, gt) == pytest.approx(100 / 130)


def brute_f(pred, gt, radius):
    bp, bg = np.argwhere(lp.boundary_map(pred)), np.argwhere(lp.boundary_map(gt))
    d = cdist(bp, bg)
    p = np.mean(d.min(1) <= radius)
    r = np.mean(d.min(0) <= radius)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("shift", [2, 3, 5])
def test_f_matches_brute_force_distance_matching(shift):
    gt = square(40, 10, 10, 15)
    pred = square(40, 10 + shift // 2, 10 + shift, 13)
    for th in (1, 2, 0.008, 0.05):
        radius = lp.boundary_radius(gt.shape, th)
        assert lp.f_measure(pred, gt, bound_th=th) == pytest.approx(brute_f(pred, gt, radius))
    assert lp.boundary_radius((480, 854)) == 8 == math.ceil(0.008 * math.hypot(480, 854))


def test_topk_weights_hand_computed():
    cos = torch.tensor([0.9, 0.8, 0.1, 0.5, 0.7, 0.3])
    target = torch.tensor([[[1.0, 0.0]]])
    sources = torch.stack([torch.stack([c, torch.sqrt(1 - c**2)]) for c in cos])[:, None, None]  # [6, 1, 1, 2]
    labels = torch.eye(6)[:, :, None, None]  # each source frame its own class
    out = lp.propagate_step(target, sources, labels, topk=5, temperature=0.1, neighbourhood=0)[:, 0, 0]
    keep = cos != 0.1
    w = torch.where(keep, torch.exp(cos / 0.1), torch.zeros(()))
    assert torch.allclose(out, w / w.sum(), atol=1e-6)
    assert out[2] == 0


def moving_labels(n_frames=5, h=10, w=12):
    labels = []
    for t in range(n_frames):
        lab = torch.zeros(h, w, dtype=torch.long)
        lab[1 + t // 2 : 4 + t // 2, 1 + t : 4 + t] = 1
        lab[6:9, 9 - t // 2 : 12 - t // 2] = 2
        labels.append(lab)
    return torch.stack(labels)


def test_propagation_with_label_copying_features_is_exact():
    labels = moving_labels()
    feats = torch.nn.functional.one_hot(labels, 3).float() + 0.01  # features = the frame's own labels
    soft = lp.propagate_labels(feats, labels[0], n_classes=3)
    assert soft.shape == (5, 3, 10, 12)
    assert torch.equal(soft.argmax(1), labels)
    assert torch.allclose(soft.sum(1), torch.ones(5, 10, 12), atol=1e-5)
    noisy = feats + 0.3 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    ctx = lp.one_hot_grid(labels[0], 3)[None]
    whole = lp.propagate_step(noisy[1], noisy[:1], ctx, neighbourhood=4)
    assert torch.allclose(lp.propagate_step(noisy[1], noisy[:1], ctx, neighbourhood=4, chunk=7), whole, atol=1e-6)


def test_neighbourhood_keeps_look_alike_objects_apart():
    lab = torch.zeros(8, 16, dtype=torch.long)
    lab[2:6, 1:4], lab[2:6, 12:15] = 1, 2
    feats = (lab > 0).float()[..., None] * torch.tensor([1.0, 0.0]) + (lab == 0).float()[..., None] * torch.tensor(
        [0.0, 1.0]
    )
    feats = feats[None].repeat(2, 1, 1, 1)
    local = lp.propagate_labels(feats, lab, neighbourhood=3)[1].argmax(0)
    assert torch.equal(local, lab)
    everywhere = lp.propagate_labels(feats, lab, neighbourhood=0, topk=24)[1]
    assert torch.allclose(everywhere[1][lab > 0], torch.full(((lab > 0).sum(),), 0.5), atol=1e-6)


def test_labels_to_pixels_and_video_scores():
    soft = lp.one_hot_grid(moving_labels()[0], 3)
    ids = lp.labels_to_pixels(soft, patch=4, out_hw=(40, 48))
    assert ids.shape == (40, 48) and ids[8, 8] == 1 and ids[30, 42] == 2 and ids[0, 0] == 0
    gt = [np.kron(m.numpy(), np.ones((4, 4), int)) for m in moving_labels(4)]
    sc = lp.video_scores(gt, gt, 2)
    assert sc["J"].shape == (2, 2) and np.all(sc["J"] == 1) and np.all(sc["F"] == 1)
    bad = [g.copy() for g in gt]
    bad[1][bad[1] == 2] = 0  # object 2 lost in frame 1 (one of the two scored frames)
    tab = lp.summarise({"v": lp.video_scores(bad, gt, 2)})
    assert tab["J-Mean"] == pytest.approx((1 + 0.5) / 2) and tab["F-Mean"] == pytest.approx(0.75)
    assert tab["J&F-Mean"] == pytest.approx(0.75)


def test_davis_input_size_follows_dino():
    assert lp.davis_input_size(480, 854) == (480, 832)
    assert lp.davis_input_size(1080, 1920, 480) == (480, 832)
    assert lp.davis_input_size(48, 32, 64) == (64, 64)


def test_run_on_davis_fixture(tmp_path):
    from nbsupport.models import backbones

    fx = davis.write_fixture(tmp_path)
    ds = davis.Davis2017(fx["root"], "val")
    model = backbones.load("random_tiny8")
    res = lp.run_davis(model, ds, short=64, neighbourhood=4)
    assert set(res["per_video"]) == {"dogs-jump", "bike-packing"}
    assert np.isfinite(res["J&F-Mean"]) and 0 <= res["J-Mean"] <= 1 and 0 <= res["F-Mean"] <= 1
    assert len(res["objects"]) == 4
    for name in ds.videos:
        h, w = fx["sizes"][name]
        assert [p.shape for p in res["predictions"][name]] == [(h, w)] * 4

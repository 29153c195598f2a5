"""The notebooks' explorers, driven through their update methods (no browser): each change redraws the
same figure in place, gives the numbers of the analysis it shows, and answers quickly."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nbsupport.analysis import affinity
from nbsupport.analysis import correspondence_protocols as cp
from nbsupport.analysis import correspondences as cc
from nbsupport.analysis.entropy import GroupViTEntropy
from nbsupport.data.images import image_to_tensor
from nbsupport.models import backbones
from nbsupport.notebook import explorers, viz

SIZE, STRIDE = 64, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return backbones.load("random_tiny8")


def _scene(seed: int) -> Image.Image:
    """A textured square on a smooth background: something for the features to tell apart."""
    rng = np.random.default_rng(seed)
    a = np.full((SIZE, SIZE, 3), 60, np.uint8)
    y, x = rng.integers(8, 28, 2)
    a[y : y + 28, x : x + 28] = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def pair(model):
    imgs = [_scene(0), _scene(1)]
    tensors = [image_to_tensor(im, SIZE) for im in imgs]
    desc = [cc.descriptors(model, t, 2, "key", True, STRIDE) for t in tensors]
    return imgs, tensors, desc


def _bb(model, pair, **kw):
    imgs, tensors, desc = pair
    args = dict(layer=2, facet="key", saliency_thresh=0.05, k=1, foreground="restrict", patch_index=5)
    args.update(kw)
    return explorers.BestBuddyExplorer(
        model, tensors, [(im.height, im.width) for im in imgs], SIZE, STRIDE, 8, descriptors=desc, **args
    )


def test_best_buddy_round_trip_matches_the_protocol(model, pair):
    ex = _bb(model, pair)
    _, _, desc = pair
    for i in (0, 5, 77, 168):
        sim_ab, j, sim_ba, back = ex.round_trip(i)
        ref = cp.round_trip(desc[0], desc[1], i)
        assert j == ref[1] and back == ref[3]
        torch.testing.assert_close(sim_ab, ref[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(sim_ba, ref[2], atol=1e-5, rtol=0)


def test_best_buddy_descriptors_of_other_layers_match_the_reference(model, pair):
    _, tensors, _ = pair
    ex = _bb(model, pair, keep=2)
    for layer, facet in ((0, "key"), (3, "query"), (1, "token")):
        (da, db), sim = ex.descriptors(layer, facet)
        for d, t in zip((da, db), tensors):
            ref = cc.descriptors(model, t, layer, facet, True, STRIDE)
            assert d.grid == ref.grid
            torch.testing.assert_close(d.desc, ref.desc, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(d.saliency, ref.saliency, atol=1e-6, rtol=0)
        assert sim.shape == (225, 225)
    assert list(ex._desc) == [(3, "query"), (1, "token")]  # only the last `keep` are kept


def test_best_buddy_click_picks_the_patch_and_changes_the_image(model, pair):
    ex = _bb(model, pair)
    grid = pair[2][0].grid
    assert grid == (15, 15)
    before = ex.pixels()
    png = ex.png()
    # the centre of patch (row 10, col 3) of image A, in the model-input pixels the axes show
    y, x = 10 * STRIDE + 4, 3 * STRIDE + 4
    px, py = ex.axes_pixel(0, y, x)
    assert ex.click_pixel(px, py)
    assert ex.picked == (10, 3) and ex.patch_index == 10 * 15 + 3
    assert "row 10, col 3" in ex.status
    assert ex.png() != png
    assert np.abs(ex.pixels().astype(int) - before.astype(int)).sum() > 1000
    # the third panel (also A) picks too; a click outside every image picks nothing
    px, py = ex.axes_pixel(1, 2 * STRIDE + 4, 12 * STRIDE + 4)
    assert ex.click_pixel(px, py) and ex.picked == (2, 12)
    assert not ex.click_pixel(1, 1)
    assert ex.mutual == (ex.round_trip(ex.patch_index)[3] == ex.patch_index)


def test_best_buddy_controls_recount_pairs_and_cache_descriptors(model, pair):
    imgs, _, desc = pair
    ex = _bb(model, pair)
    hw = [(im.height, im.width) for im in imgs]
    for k, thr in ((1, 0.05), (3, 0.05), (3, 0.3)):
        ex.set(k=k, saliency=thr)
        ref = cc.match(desc[0], desc[1], hw[0], hw[1], SIZE, STRIDE, 8, 0, thr, k, foreground="restrict")
        assert ex.pair_count() == len(ref.all_pairs)
        assert f"{len(ref.all_pairs)} salient pairs at k={k}" in ex.fig._suptitle.get_text()
    assert ex.pair_count() > 0
    first = ex.set(layer=0)  # new descriptors: one forward pass per image
    ex.set(layer=2)
    again = ex.set(layer=0)  # cached now
    assert ("key", 0) not in ex._desc and (0, "key") in ex._desc
    assert again < first + 0.5
    t0 = time.perf_counter()
    for i in range(5):
        ex.pick(i * 20)
    assert (time.perf_counter() - t0) / 5 < 2.0  # loose: about 0.1 s here, a second on a busy machine
    with pytest.raises(ValueError, match="unknown control"):
        ex.set(colour="red")


def test_similarity_explorer_maps_and_clicks(model):
    imgs = torch.stack([image_to_tensor(_scene(s), SIZE) for s in range(3)])
    ex = explorers.SimilarityExplorer(model, imgs, ["key", "token"], [1, -1], ["cosine", "euclidean"], patch_yx=(2, 5))
    assert ex.grid == (8, 8) and ex.state["layer"] == model.nbs_info["depth"] - 1
    m = ex.maps()
    assert m.shape == (3, 8, 8)
    assert m[0, 2, 5] == pytest.approx(1.0, abs=1e-5) and m.max() <= 1.0 + 1e-5  # a patch vs itself
    grid = ex.grids[("key", ex.state["layer"])]
    ref = affinity.get_measure("cosine").fn(grid[0, 2, 5][None], grid[2].reshape(64, -1)).reshape(8, 8)
    np.testing.assert_allclose(m[2], ref.numpy(), atol=1e-5)
    before = ex.png()
    px, py = ex.axes_pixel(2, 6 * 8 + 4, 1 * 8 + 4)
    assert ex.click_pixel(px, py)
    assert ex.source == 2 and ex.patch_yx == (6, 1) and ex.png() != before
    ex.set(measure="euclidean", facet="token", layer=1)
    m = ex.maps()
    assert m[2, 6, 1] == pytest.approx(0.0, abs=1e-3) and m.min() >= -1e-4  # a distance, 0 to itself
    assert ex._maps[0].get_cmap().name == "viridis_r"
    assert max(ex.timing.history) < 3.0  # loose: no forward pass after construction


def _fake_grouping():
    """Two images, 3 groups on a 4 x 4 grid: group g owns column block g (known answers)."""
    attn = torch.full((2, 3, 16), 0.05)
    cols = torch.arange(16) % 4
    for g, c in enumerate(([0, 1], [2], [3])):
        attn[:, g, torch.isin(cols, torch.tensor(c))] = 0.9
    attn = attn / attn.sum(1, keepdim=True)
    maps = torch.rand(2, 32, 32)
    return GroupViTEntropy(attn, (4, 4), torch.randn(2, 3, 5), maps, maps * 0.5)


def test_group_token_explorer_click_picks_the_owner():
    images = torch.stack([image_to_tensor(_scene(s), 32) for s in range(2)])
    ex = explorers.GroupTokenExplorer(images, {"A": _fake_grouping(), "B": _fake_grouping()})
    assert ex.attention("A", 0).shape == (3, 32, 32)
    for x, owner in ((3.0, 0), (19.0, 1), (29.0, 2)):
        before = ex.png()
        px, py = ex.axes_pixel(0, 16.0, x)
        assert ex.click_pixel(px, py)
        assert ex.state["group"] == owner, x
        assert f"group {owner}" in ex.status
        if owner:
            assert ex.png() != before
    np.testing.assert_allclose(ex._attn.get_array(), ex.attention("A", 0)[2])
    ex.set(image=1, model="B")
    np.testing.assert_allclose(ex._ge.get_array(), ex.results["B"].group[1].numpy())


def test_maskcut_explorer_masks_tau_and_edges(model):
    img = _scene(3)
    ex = explorers.MaskCutExplorer(model, img, SIZE, n_masks=2, tau="median", layer=-1, sizes=[32])
    m = ex.masks()
    assert m.shape == (2, SIZE, SIZE) and m.dtype == bool
    assert m[0].any() and not (m[0] & m[1]).any()  # later masks lose earlier pixels
    f = torch.nn.functional.normalize(ex.feats().reshape(64, -1), dim=1)
    s = f @ f.T
    assert ex.threshold() == pytest.approx(float(s[~torch.eye(64, dtype=torch.bool)].median()), abs=1e-6)
    before = ex.png()
    px, py = ex.axes_pixel(1, 5 * 8 + 4, 2 * 8 + 4)
    assert ex.click_pixel(px, py) and ex.patch_yx == (5, 2)
    edges = ex._edges.get_array()
    assert edges[5, 2] == 1.0 and edges.sum() == int((s[5 * 8 + 2] > ex.threshold()).sum())
    assert ex.png() != before
    ex.set(tau=0.0, N=1)
    assert ex.masks().shape == (1, SIZE, SIZE)
    ex.set(size=32)
    assert ex.feats().shape[:2] == (4, 4) and ex._edges.get_array().shape == (4, 4)
    assert len(ex._feats) == 2  # one forward pass per size
    assert ex.set(size=SIZE, tau="median", N=2) < 3.0  # cached features and masks: a redraw only
    assert ex.masks() is m


def test_widget_and_snapshot(model, pair):
    pytest.importorskip("ipyevents")
    ex = _bb(model, pair)
    box = ex.widget()
    assert "nbs-explorer" in box._dom_classes
    assert ex._image.value == ex.png()
    x, y = ex.axes_pixel(0, 4 * STRIDE + 4, 7 * STRIDE + 4)
    ex._on_dom_click({"type": "click", "dataX": x, "dataY": y})
    assert ex.picked == (4, 7) and ex._image.value == ex.png()
    assert "row 4, col 7" in ex._status.value
    ex._guarded(ex.set, colour="red")  # a failing callback reports in the status line
    assert "ValueError: unknown control colour" in ex._status.value
    bundle = ex._snapshot_bundle()
    assert bundle["text/plain"] == explorers.SNAPSHOT_NOTE
    assert bundle["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature


EXECUTED = """
import numpy as np, torch
from PIL import Image
from nbsupport.data.images import image_to_tensor
from nbsupport.models import backbones
from nbsupport.notebook import explorers
model = backbones.load("random_tiny8")
imgs = torch.stack([image_to_tensor(Image.fromarray(np.full((64, 64, 3), v, np.uint8)), 64) for v in (40, 200)])
ex = explorers.SimilarityExplorer(model, imgs, ["key"], [-1], ["cosine"]).show(interactive=True)
"""


def test_saved_executed_notebook_shows_an_image_not_a_missing_widget(tmp_path):
    """A notebook run with the live explorer and saved: every widget view in it has its model in the saved
    widget state, and the cell also holds the static PNG and the line saying to run it."""
    pytest.importorskip("ipyevents")
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(EXECUTED)])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    saved = json.loads(path.read_text())
    outs = saved["cells"][0]["outputs"]
    assert not [o for o in outs if o["output_type"] == "error"]
    kinds = [sorted(o.get("data", {})) for o in outs]
    view = "application/vnd.jupyter.widget-view+json"
    views = [o["data"][view]["model_id"] for o in outs if view in o.get("data", {})]
    assert len(views) == 1
    state = saved["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert views[0] in state
    assert any("image/png" in k for k in kinds[1:])
    assert any(explorers.SNAPSHOT_NOTE in "".join(o.get("data", {}).get("text/plain", "")) for o in outs)
    png = next(o["data"]["image/png"] for o in outs if "image/png" in o.get("data", {}))
    assert len(png) > 1000


def test_figure_dir_is_not_doubled(tmp_path, monkeypatch):
    monkeypatch.delenv("NBSUPPORT_NOTEBOOK", raising=False)
    monkeypatch.delenv("NBSUPPORT_RUN_DIR", raising=False)
    monkeypatch.setenv("NBSUPPORT_ROOT", str(tmp_path))
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert viz.figure_dir() == tmp_path / "runs" / "interactive" / "figures"
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "runs" / "lab" / "notebooks" / "02_best_buddies.ipynb"))
    assert viz.figure_dir() == tmp_path / "runs" / "interactive" / "figures" / "02_best_buddies"
    monkeypatch.setenv("NBSUPPORT_NOTEBOOK", "05_maskcut")
    assert viz.figure_dir() == tmp_path / "runs" / "interactive" / "figures" / "05_maskcut"

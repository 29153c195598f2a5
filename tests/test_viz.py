"""Figures land in the run folder as PNG + PDF; helpers draw what they promise."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import ConnectionPatch  # noqa: E402
from PIL import Image  # noqa: E402

from nbsupport.data.images import IMAGENET_MEAN, IMAGENET_STD
from nbsupport.notebook import viz


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_save_figure_location_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_NOTEBOOK", "07_demo")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    out = viz.save_figure(fig, "Fig 8: keys / layer 9")
    assert out == {
        "png": tmp_path / "figures" / "07_demo" / "Fig_8_keys_layer_9.png",
        "pdf": tmp_path / "figures" / "07_demo" / "Fig_8_keys_layer_9.pdf",
    }
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"
    assert viz.save_figure(fig, "already.png")["pdf"].name == "already.pdf"  # no "already.png.pdf"
    assert sorted(p.name for p in viz.figure_dir().iterdir()) == [
        "Fig_8_keys_layer_9.pdf",
        "Fig_8_keys_layer_9.png",
        "already.pdf",
        "already.png",
    ]
    with pytest.raises(ValueError, match="no usable characters"):
        viz.save_figure(fig, "///")
    monkeypatch.delenv("NBSUPPORT_NOTEBOOK")
    assert viz.figure_dir() == tmp_path / "figures" / "interactive"


def test_to_rgb_inputs():
    rng = np.random.default_rng(0)
    u8 = (rng.random((4, 5, 3)) * 255).astype(np.uint8)
    np.testing.assert_allclose(viz.to_rgb(u8), u8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(viz.to_rgb(Image.fromarray(u8)), u8 / 255.0, atol=1e-6)
    grey = Image.fromarray(u8).convert("L")  # any PIL mode becomes RGB
    np.testing.assert_allclose(viz.to_rgb(grey), np.repeat(np.asarray(grey)[..., None] / 255.0, 3, -1), atol=1e-6)
    assert viz.to_rgb(np.full((2, 2), 0.5)).shape == (2, 2, 3)
    assert viz.to_rgb(np.array([[[2.0, -1.0, 0.3]]])).tolist() == [[[1.0, 0.0, pytest.approx(0.3)]]]
    # a normalised tensor [3, H, W] comes back as the original [H, W, 3] in [0, 1]
    orig = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    t = (orig - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(viz.to_rgb(t), orig.permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        viz.to_rgb(np.zeros((2, 2, 5)))


def test_overlay_mask_blends_and_upsamples():
    img = np.zeros((4, 4, 3), np.uint8)
    fig, ax = plt.subplots()
    viz.overlay_mask(ax, img, np.array([[1, 0], [0, 0]], bool), color="red", alpha=0.5)  # patch-grid mask
    shown = ax.get_images()[0].get_array()
    np.testing.assert_allclose(shown[:2, :2], [[[0.5, 0, 0]] * 2] * 2)  # upsampled top-left 2x2 block
    assert shown[2:, :].max() == 0 and shown[:, 2:].max() == 0
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0, 0] = masks[1, 3, 3] = True
    fig, ax = plt.subplots()
    viz.overlay_mask(ax, img, torch.from_numpy(masks), alpha=1.0)  # instances: distinct colours
    shown = ax.get_images()[0].get_array()
    np.testing.assert_allclose(shown[0, 0], viz.PALETTE[0], atol=1e-6)
    np.testing.assert_allclose(shown[3, 3], viz.PALETTE[1], atol=1e-6)
    with pytest.raises(ValueError, match="2 colours for 3 masks"):
        viz.overlay_mask(ax, img, np.zeros((3, 4, 4), bool), color=["red", "blue"])


def test_helpers_draw():
    img = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    fig, axes = viz.grid(5, ncols=3)
    assert len(axes) == 5 and len(fig.axes) == 6 and not fig.axes[5].axison  # 2 x 3, spare one hidden
    viz.show_image(axes[0], torch.zeros(3, 40, 60), title="t")
    assert axes[0].get_title() == "t" and axes[0].get_images()[0].get_array().shape == (40, 60, 3)
    im = viz.heatmap(axes[2], np.random.default_rng(1).random((5, 6)), img)
    assert im.get_extent() == [0, 60, 40, 0]  # the 5 x 6 patch map covers the 40 x 60 image
    assert len(axes[2].get_images()) == 2 and len(fig.axes) == 7  # image + map, and a colour bar
    viz.hist_pair(axes[3], np.r_[1.0, 2.0, np.nan], np.r_[3.0])
    texts = [t.get_text() for t in axes[3].get_legend().get_texts()]
    assert texts == ["same (mean 1.500)", "different (mean 3.000)"]
    assert sorted(ln.get_xdata()[0] for ln in axes[3].lines) == [1.5, 3.0]  # mean lines
    im = viz.affinity_matrix(axes[4], torch.eye(4), colorbar=False)
    assert isinstance(im, AxesImage) and im.get_clim() == (-1, 1) and im.get_cmap().name == "RdBu_r"
    sc = viz.points(axes[0], [[1, 2], [3, 4]])
    np.testing.assert_allclose(sc.get_offsets(), [[2, 1], [4, 3]])  # (y, x) -> scatter (x, y)
    cons = viz.match_lines(axes[0], axes[1], [[1, 2]], [[3, 4]], ["red"])
    assert len(cons) == 1 and isinstance(cons[0], ConnectionPatch) and cons[0] in fig.artists
    with pytest.raises(ValueError, match="1 points in ax_a but 2"):
        viz.match_lines(axes[0], axes[1], [[1, 2]], [[3, 4], [5, 6]])
    with pytest.raises(ValueError):
        viz.grid(0)


def test_table_and_style():
    df = pd.DataFrame({"measure": ["cosine", "dot"], "auc": [0.912345, 0.5]})
    fig, ax = plt.subplots()
    out = viz.table(df, ax=ax, precision=2)
    assert out["auc"].tolist() == [0.91, 0.5]
    cells = ax.tables[0].get_celld()
    assert cells[(0, 1)].get_text().get_text() == "auc" and cells[(1, 1)].get_text().get_text() == "0.91"
    with matplotlib.rc_context():  # restores the global style afterwards
        viz.setup_style()
        assert matplotlib.rcParams["axes.grid"] is True  # seaborn whitegrid

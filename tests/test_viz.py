"""Figures land in the run folder as PNG + PDF; helpers draw what they promise."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from nbsupport import viz  # noqa: E402


def test_save_figure_location_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_NOTEBOOK", "07_demo")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    out = viz.save_figure(fig, "Fig 8: keys / layer 9")
    assert out["png"] == tmp_path / "figures" / "07_demo" / "Fig_8_keys_layer_9.png"
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["pdf"].read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError):
        viz.save_figure(fig, "///")
    plt.close(fig)


def test_helpers_draw():
    img = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    fig, axes = viz.grid(5, ncols=3)
    assert len(axes) == 5
    viz.show_image(axes[0], torch.zeros(3, 40, 60), title="t")
    viz.overlay_mask(axes[1], img, np.ones((5, 6), bool))  # patch-grid mask upsampled to the image
    im = viz.heatmap(axes[2], np.random.rand(5, 6), img)
    assert im.get_extent() == [0, 60, 40, 0]
    viz.hist_pair(axes[3], np.r_[1.0, 2.0], np.r_[3.0])
    assert "mean 1.500" in axes[3].get_legend().get_texts()[0].get_text()
    viz.affinity_matrix(axes[4], torch.eye(4))
    viz.points(axes[0], [[1, 2], [3, 4]])
    viz.match_lines(axes[0], axes[1], [[1, 2]], [[3, 4]])
    plt.close(fig)
    rgb = viz.to_rgb(img)
    assert rgb.dtype == np.float32 and rgb.max() <= 1

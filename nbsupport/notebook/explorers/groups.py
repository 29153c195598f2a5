"""Group-token explorer (notebook 03): one final group token's attention over an image beside the GE and
LE maps; a click on the image picks the group that owns the clicked pixel."""

from __future__ import annotations

import numpy as np

from nbsupport.analysis.entropy import max_entropy
from nbsupport.models.groupvit import resize_attn
from nbsupport.notebook.explorers.base import Control, Explorer, image_axes
from nbsupport.notebook.viz import to_rgb


class GroupTokenExplorer(Explorer):
    """``results``: ``{name: GroupViTEntropy}`` of the same ``images [B, 3, H, W]`` (no model is run here:
    every map comes from the results, pixel-resized once per (model, image) and cached). ``group=None``
    starts with the group owning most pixels of the image."""

    def __init__(
        self, images, results: dict, model: str | None = None, image: int = 0, group: int | None = None, names=None
    ):
        super().__init__(figsize=(11.0, 3.2))
        self.images, self.results = images, dict(results)
        self.names = dict(names or {})
        self.size = tuple(images.shape[-2:])
        first = next(iter(self.results.values()))
        self.controls = [
            Control("model", "choice", tuple(self.results)),
            Control("image", "int", (0, len(images) - 1)),
            Control("group", "int", (0, first.n_groups - 1)),
        ]
        self._px: dict = {}
        model = model or next(iter(self.results))
        if group is None:  # the group owning most pixels of the image
            group = int(np.bincount(self.attention(model, image).argmax(0).ravel()).argmax())
        self.state = {"model": model, "image": int(image), "group": int(group)}
        axes = self.fig.subplots(1, 4)
        self.axes = axes
        self.click_axes = [axes[0], axes[1]]
        h, w = self.size
        self._img = [axes[0].imshow(np.zeros((h, w, 3))), axes[1].imshow(np.zeros((h, w, 3)))]
        self._attn = axes[1].imshow(np.zeros((h, w)), cmap="magma", vmin=0, vmax=1, alpha=0.65)
        self._ge = axes[2].imshow(np.zeros((h, w)), cmap="viridis")
        self._le = axes[3].imshow(np.zeros((h, w)), cmap="viridis")
        for ax in axes:
            image_axes(ax)
        self.fig.colorbar(self._attn, ax=axes[1], fraction=0.046, pad=0.04)
        self.fig.colorbar(self._ge, ax=axes[2], fraction=0.046, pad=0.04)
        self.fig.colorbar(self._le, ax=axes[3], fraction=0.046, pad=0.04)
        self._dot = axes[0].scatter([np.nan], [np.nan], s=50, c="red", edgecolors="black")
        self._update(set(self.state))
        self._freeze_layout()
        self._render()

    def attention(self, model: str, image: int):
        """Pixel attention ``[G, H, W]`` of every final group token of one image (cached)."""
        if (model, image) not in self._px:
            r = self.results[model]
            self._px[(model, image)] = resize_attn(r.attn[image], r.grid, self.size).numpy()
        return self._px[(model, image)]

    def on_click(self, ax_index: int, y: float, x: float) -> None:
        h, w = self.size
        yy, xx = int(np.clip(round(y), 0, h - 1)), int(np.clip(round(x), 0, w - 1))
        px = self.attention(self.state["model"], self.state["image"])
        self.state["group"] = int(px[:, yy, xx].argmax())
        self._dot.set_offsets([[xx, yy]])
        self._update({"group"})

    def _update(self, changed: set) -> None:
        s = self.state
        r = self.results[s["model"]]
        g = min(s["group"], r.n_groups - 1)
        px = self.attention(s["model"], s["image"])
        rgb = to_rgb(self.images[s["image"]])
        if changed & {"image", "model"}:
            for im in self._img:
                im.set_data(rgb)
            self._ge.set_data(r.group[s["image"]].numpy())
            self._ge.set_clim(0, max_entropy(r.n_groups))
            self._le.set_data(r.label[s["image"]].numpy())
            self._le.set_clim(0, max_entropy(r.n_labels))
            self.axes[2].set_title(f"GE over {r.n_groups} groups (max log G)", fontsize=9)
            self.axes[3].set_title(f"LE over {r.n_labels} labels (max log K)", fontsize=9)
        self._attn.set_data(px[g])
        self._attn.set_clim(0, max(float(px.max()), 1e-6))  # attention of every group of the image on one scale
        share = float((px.argmax(0) == g).mean())
        self.axes[0].set_title(f"image {s['image']}", fontsize=9)
        self.axes[1].set_title(f"group {g}: attention (owns {share:.0%} of pixels)", fontsize=9)
        name = self.names.get(s["model"], s["model"])
        self.status = f"{name}, image {s['image']}, group {g} · click the image to pick the group owning a pixel"
        self.fig.suptitle(f"Group token {g} of {name}", fontsize=10)

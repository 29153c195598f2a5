"""MaskCut explorer (notebook 05): the masks of one image for a chosen tau, N, input size, facet and
layer, and the graph edges of a clicked patch (its cosine similarity above tau)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.data.images import image_to_tensor
from nbsupport.maskcut import masks_from_features, resolve_tau
from nbsupport.models import features
from nbsupport.notebook.explorers.base import Control, Explorer, image_axes
from nbsupport.notebook.viz import PALETTE, to_rgb

TAUS = ("median", 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def blend_masks(rgb: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``rgb [H, W, 3]`` with each bool mask of ``masks [N, H, W]`` blended in its tab10 colour."""
    out = rgb.copy()
    for k, m in enumerate(masks):
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(PALETTE[k % len(PALETTE)], dtype=np.float32)
    return out


class MaskCutExplorer(Explorer):
    """``image``: a PIL image. Features are computed once per (size, facet, layer), masks once per
    (size, facet, layer, tau, N); a click on either panel picks the patch whose edges are drawn."""

    def __init__(
        self,
        model,
        image,
        size: int,
        n_masks: int = 3,
        tau="auto",
        facet: str = "key",
        layer: int = -1,
        sizes=None,
        facets=("key", "query", "value", "token"),
        title: str = "",
        device=None,
    ):
        super().__init__(figsize=(8.6, 4.2))
        self.model, self.image, self.title = model, image, title
        self.device = device or next(model.parameters()).device
        self.patch = model.nbs_info["patch_size"]
        depth = model.nbs_info["depth"]
        tau = resolve_tau(tau, model)
        sizes = sorted({features.snap_size(int(v), self.patch) for v in (size, *(sizes or (size // 2, 2 * size)))})
        size = features.snap_size(int(size), self.patch)
        taus = tuple(dict.fromkeys([tau, *TAUS]))
        self.controls = [
            Control("tau", "choice", taus),
            Control("N", "int", (1, 5)),
            Control("size", "choice", tuple(sizes)),
            Control("facet", "choice", tuple(facets)),
            Control("layer", "int", (0, depth - 1)),
        ]
        self.state = {"tau": tau, "N": int(n_masks), "size": int(size), "facet": facet, "layer": layer % depth}
        self.rgb = to_rgb(image)
        h, w = self.rgb.shape[:2]
        self._feats: dict = {}
        self._masks: dict = {}
        self.patch_yx = None
        axes = self.fig.subplots(1, 2)
        self.axes = self.click_axes = list(axes)
        self._mask_im = axes[0].imshow(self.rgb)
        axes[1].imshow(self.rgb)
        self._edges = axes[1].imshow(np.zeros((2, 2)), cmap="magma", vmin=0, vmax=1, alpha=0.7, extent=(0, w, h, 0))
        for ax in axes:
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            image_axes(ax)
        self._dot = axes[1].scatter([np.nan], [np.nan], s=50, c="cyan", edgecolors="black")
        self._update(set(self.state))
        self._freeze_layout()
        self._render()

    def feats(self) -> torch.Tensor:
        """Patch features ``[h, w, D]`` of the image at the current (size, facet, layer), cached."""
        s = self.state
        key = (s["size"], s["facet"], s["layer"])
        if key not in self._feats:
            x = image_to_tensor(self.image, s["size"])[None].to(self.device)
            self._feats[key] = features.extract(self.model, x, s["facet"], s["layer"])[0].float().cpu()
        return self._feats[key]

    def masks(self) -> np.ndarray:
        """MaskCut's pixel masks ``[N, H, W]`` (original frame) at the current setting, cached."""
        s = self.state
        key = (s["size"], s["facet"], s["layer"], s["tau"], s["N"])
        if key not in self._masks:
            h, w = self.rgb.shape[:2]
            size = (s["size"], s["size"])
            self._masks[key] = masks_from_features(self.feats()[None], [(h, w)], size, s["N"], s["tau"])[0]
        return self._masks[key]

    def threshold(self) -> float:
        """tau as a number: ``"median"`` is the median off-diagonal cosine of this image's patches."""
        if self.state["tau"] != "median":
            return float(self.state["tau"])
        f = F.normalize(self.feats().reshape(-1, self.feats().shape[-1]), dim=1)
        s = f @ f.T
        off = s[~torch.eye(len(s), dtype=torch.bool)]
        return float(off.median())

    def on_click(self, ax_index: int, y: float, x: float) -> None:
        h, w = self.rgb.shape[:2]
        gh, gw = self.feats().shape[:2]
        self.patch_yx = (int(np.clip(y * gh / h, 0, gh - 1)), int(np.clip(x * gw / w, 0, gw - 1)))
        self._update({"patch"})

    def _update(self, changed: set) -> None:
        s = self.state
        m = self.masks()
        self._mask_im.set_data(blend_masks(self.rgb, m))
        kept = int(sum(bool(v.any()) for v in m))
        f = self.feats()
        gh, gw = f.shape[:2]
        if self.patch_yx is None:
            self.patch_yx = (gh // 2, gw // 2)
        py, px = min(self.patch_yx[0], gh - 1), min(self.patch_yx[1], gw - 1)
        self.patch_yx = (py, px)
        flat = F.normalize(f.reshape(-1, f.shape[-1]), dim=1)
        sim = (flat @ flat[py * gw + px]).reshape(gh, gw)
        t = self.threshold()
        edges = (sim > t).float().numpy()
        self._edges.set_data(edges)
        h, w = self.rgb.shape[:2]
        self._dot.set_offsets([[(px + 0.5) * w / gw, (py + 0.5) * h / gh]])
        self.axes[0].set_title(f"N = {s['N']}: {kept} masks kept", fontsize=9)
        self.axes[1].set_title(
            f"patch ({py}, {px}): {int(edges.sum())} of {gh * gw} linked (cos > {t:.3f})", fontsize=9
        )
        self.status = (
            f"tau {s['tau']} ({t:.3f}), N {s['N']}, {s['size']} px, {s['facet']} layer {s['layer']}: {kept} masks"
            " · click the image to see a patch's graph edges"
        )
        self.fig.suptitle(
            f"MaskCut: {s['facet']}s of layer {s['layer']} at {s['size']} px, tau {s['tau']}"
            + (f" — {self.title}" if self.title else ""),
            fontsize=10,
        )

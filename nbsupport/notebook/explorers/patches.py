"""Patch explorers: the best-buddy round trip between two images (notebook 02) and a patch's similarity
map over several images for a chosen facet, layer and measure (notebook 01)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from nbsupport.analysis import affinity
from nbsupport.analysis import correspondences as cc
from nbsupport.models import features
from nbsupport.notebook.explorers.base import Control, Explorer, image_axes
from nbsupport.notebook.viz import to_rgb

FACETS = ["key", "query", "value", "token"]


def _marker(ax, color, marker="o", size=60):
    return ax.scatter([np.nan], [np.nan], s=size, c=color, marker=marker, edgecolors="black", linewidths=0.8)


def _place(artist, yx) -> None:
    artist.set_offsets(np.asarray(yx, dtype=float).reshape(-1, 2)[:, ::-1])


class BestBuddyExplorer(Explorer):
    """Round trip of one patch of image A: its cosine-similarity map over B, B's nearest patch (+), and
    that patch's map back over A (x); the two are best buddies when the way back returns to the start.
    A click on either view of A picks the patch. One forward pass gives a facet's grids at every layer;
    each (layer, facet) then gets its descriptors and A x B similarity matrix once (the last ``keep``
    are kept), so a new patch is two rows of that matrix; the count of salient relaxed best buddies is
    cached per (layer, facet, k, saliency)."""

    def __init__(
        self,
        model,
        tensors,
        hw,
        image_size: int,
        stride: int,
        patch: int,
        layer: int,
        facet: str = "key",
        log_binning: bool = True,
        saliency_thresh: float = 0.05,
        k: int = 1,
        foreground: str = "restrict",
        patch_index: int = 0,
        descriptors=None,
        title: str = "",
        keep: int = 8,
    ):
        super().__init__(figsize=(11.0, 3.8))
        self.model, self.tensors, self.hw = model, list(tensors[:2]), list(hw[:2])
        self.image_size, self.stride, self.patch, self.bin = image_size, stride, patch, log_binning
        self.foreground, self.title = foreground, title
        depth = model.nbs_info["depth"]
        layer = layer % depth
        self.keep = keep
        self._desc: OrderedDict = OrderedDict()
        self._raw: dict = {}
        self._pairs: dict = {}
        self._saliency = None
        if descriptors is not None:
            self._store(layer, facet, list(descriptors[:2]))
            self._saliency = [d.saliency for d in descriptors[:2]]
        self.controls = [
            Control("layer", "int", (0, depth - 1)),
            Control("facet", "choice", tuple(FACETS)),
            Control("k", "int", (1, 10)),
            Control("saliency", "float", (0.0, 1.0, 0.01)),
        ]
        self.state = {"layer": layer, "facet": facet, "k": int(k), "saliency": float(saliency_thresh)}
        self.patch_index = int(patch_index)
        ta, tb = self.tensors
        axes = self.fig.subplots(1, 3)
        self.click_axes = [axes[0], axes[2]]
        self.axes = axes
        for ax, t in zip(axes, (ta, tb, ta)):
            ax.imshow(to_rgb(t))
            image_axes(ax)
        self._maps = []
        for ax, t in ((axes[1], tb), (axes[2], ta)):
            g = features.grid_size(t.shape[-2], t.shape[-1], patch, stride)
            im = ax.imshow(
                np.zeros(g),
                cmap="inferno",
                alpha=0.65,
                extent=cc.grid_extent(g, stride, patch),
            )
            ax.set_xlim(-0.5, t.shape[-1] - 0.5)
            ax.set_ylim(t.shape[-2] - 0.5, -0.5)
            self.fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            self._maps.append(im)
        self._start = [_marker(axes[0], "red"), _marker(axes[2], "red", size=40)]
        self._nearest = _marker(axes[1], "cyan", "P", 90)
        self._back = _marker(axes[2], "cyan", "X", 90)
        axes[1].set_title("similarity over B; + nearest", fontsize=9)
        axes[2].set_title("nearest's similarity back over A", fontsize=9)
        self._update(set(self.state))
        self._freeze_layout()
        self._render()

    # --------------------------------------------------------------------------------------- compute
    def _store(self, layer, facet, desc) -> None:
        fa, fb = (F.normalize(d.desc.float(), dim=1) for d in desc)
        self._desc[(layer, facet)] = (desc, fa @ fb.T)
        self._desc.move_to_end((layer, facet))
        while len(self._desc) > self.keep:  # descriptors and similarity matrices are large at paper sizes
            self._desc.popitem(last=False)

    def _grids(self, facet: str) -> list[dict]:
        """Per image, every block's ``facet`` grid ``{layer: [h, w, D]}`` from one forward pass (cached)."""
        if facet not in self._raw:
            depth = self.model.nbs_info["depth"]
            requests = [(facet, l) for l in range(depth)]
            per_image = [features.extract_many(self.model, t[None], requests, self.stride) for t in self.tensors]
            self._raw[facet] = [{l: g[(facet, l)][0] for l in range(depth)} for g in per_image]
            while len(self._raw) > 2:
                self._raw.pop(next(iter(self._raw)))
        return self._raw[facet]

    def saliency(self) -> list[torch.Tensor]:
        """CLS saliency ``[h, w]`` of A and B (the last block's, whatever layer and facet are shown)."""
        if self._saliency is None:
            heads = cc.default_saliency_heads(self.model)
            self._saliency = [
                features.cls_saliency(self.model, t[None], -1, heads, self.stride)[0] for t in self.tensors
            ]
        return self._saliency

    def descriptors(self, layer: int, facet: str):
        """``([ImageDescriptors A, B], similarity [n_a, n_b])`` of one (layer, facet): the grids of all
        layers of a facet come from one forward pass, the saliency is computed once."""
        if (layer, facet) not in self._desc:
            desc = []
            for grids, sal in zip(self._grids(facet), self.saliency()):
                d = features.log_bin(grids[layer][None])[0] if self.bin else grids[layer]
                desc.append(cc.ImageDescriptors(d.reshape(-1, d.shape[-1]), sal, tuple(d.shape[:2])))
            self._store(layer, facet, desc)
        self._desc.move_to_end((layer, facet))
        return self._desc[(layer, facet)]

    def pair_count(self) -> int:
        """Salient relaxed best-buddy pairs of A and B at the current (layer, facet, k, saliency)."""
        s = self.state
        key = (s["layer"], s["facet"], s["k"], round(s["saliency"], 4))
        if key not in self._pairs:
            (da, db), _ = self.descriptors(s["layer"], s["facet"])
            hw_a, hw_b = self.hw
            args = (self.image_size, self.stride, self.patch, 0, s["saliency"], s["k"])
            res = cc.match(da, db, hw_a, hw_b, *args, foreground=self.foreground)
            self._pairs[key] = len(res.all_pairs)
        return self._pairs[key]

    def round_trip(self, i: int):
        """``(sim_ab [h_b, w_b], j, sim_ba [h_a, w_a], back)`` of patch ``i`` of A at the current setting."""
        (da, db), sim = self.descriptors(self.state["layer"], self.state["facet"])
        if not 0 <= i < sim.shape[0]:
            raise ValueError(f"patch index {i} is outside A's {sim.shape[0]} patches")
        row = sim[i]
        j = int(row.argmax())
        col = sim[:, j]
        return row.reshape(db.grid), j, col.reshape(da.grid), int(col.argmax())

    # ------------------------------------------------------------------------------------------ draw
    def pick(self, i: int) -> float:
        """Make patch ``i`` of A the start and redraw; returns the seconds it took."""
        self.patch_index = int(i)
        return self._refresh({"patch"})

    def on_click(self, ax_index: int, y: float, x: float) -> None:
        (da, _), _ = self.descriptors(self.state["layer"], self.state["facet"])
        r, c = features.pixel_to_patch((y, x), self.stride, self.patch, da.grid)
        self.patch_index = int(r * da.grid[1] + c)
        self._update({"patch"})

    def _update(self, changed: set) -> None:
        s = self.state
        (da, db), _ = self.descriptors(s["layer"], s["facet"])
        i = min(self.patch_index, da.grid[0] * da.grid[1] - 1)
        sim_ab, j, sim_ba, back = self.round_trip(i)
        for im, sim in zip(self._maps, (sim_ab, sim_ba)):
            v = sim.cpu().numpy()
            im.set_data(v)
            im.set_clim(float(v.min()), float(v.max()) + 1e-6)
        pi, pj, pb = (
            cc.patch_index_to_pixel([x], g, self.stride, self.patch)
            for x, g in ((i, da.grid), (j, db.grid), (back, da.grid))
        )
        for m in self._start:
            _place(m, pi)
        _place(self._nearest, pj)
        _place(self._back, pb)
        self.mutual = back == i
        self.picked = (i // da.grid[1], i % da.grid[1])
        self.axes[0].set_title(f"A: patch (row {self.picked[0]}, col {self.picked[1]})", fontsize=9)
        n = self.pair_count()
        self.status = (
            f"patch (row {self.picked[0]}, col {self.picked[1]}): best buddies {'yes' if self.mutual else 'no'}"
            f" · layer {s['layer']} {s['facet']}: {n} salient pairs at k={s['k']} · click image A to pick a patch"
        )
        self.fig.suptitle(
            f"layer {s['layer']} {s['facet']}: {n} salient pairs at k={s['k']}; patch is a best buddy: {self.mutual}"
            + (f" — {self.title}" if self.title else ""),
            fontsize=10,
        )


class SimilarityExplorer(Explorer):
    """A patch of one image and its similarity (or distance, drawn so that bright = similar) to every
    patch of all shown images, for one facet, layer and measure. A click on any image picks the patch.
    All (facet, layer) grids of the shown images come from one forward pass, made once."""

    def __init__(
        self,
        model,
        images: torch.Tensor,
        facets,
        layers,
        measures,
        facet: str | None = None,
        layer: int | None = None,
        measure: str | None = None,
        source: int = 0,
        patch_yx=None,
        names=None,
        title: str = "",
    ):
        n = len(images)
        super().__init__(figsize=(2.9 * n + 0.8, 3.3))
        depth = model.nbs_info["depth"]
        self.layers = sorted({int(v) % depth for v in layers})
        self.facets, self.measures = list(facets), list(measures)
        self.images, self.title = images, title
        self.patch = model.nbs_info["patch_size"]
        grids = features.extract_many(model, images, [(f, l) for f in self.facets for l in self.layers])
        self.grids = {k: v.float().cpu() for k, v in grids.items()}
        self.grid = tuple(next(iter(self.grids.values())).shape[1:3])
        self.controls = [
            Control("facet", "choice", tuple(self.facets)),
            Control("layer", "choice", tuple(self.layers)),
            Control("measure", "choice", tuple(self.measures)),
        ]
        self.state = {
            "facet": facet or self.facets[0],
            "layer": (layer if layer is not None else self.layers[-1]) % depth,
            "measure": measure or self.measures[0],
        }
        h, w = self.grid
        self.source = int(source)
        self.patch_yx = tuple(patch_yx) if patch_yx is not None else (h // 2, w // 2)
        axes = self.fig.subplots(1, n)
        self.axes = self.click_axes = list(np.atleast_1d(axes))
        self.names = list(names) if names is not None else [f"image {k}" for k in range(n)]
        extent = (0, w * self.patch, h * self.patch, 0)
        self._maps = []
        for ax, img in zip(self.axes, images):
            ax.imshow(to_rgb(img), extent=(0, img.shape[-1], img.shape[-2], 0))
            self._maps.append(ax.imshow(np.zeros(self.grid), cmap="viridis", alpha=0.6, extent=extent))
            image_axes(ax)
        self._bar = self.fig.colorbar(self._maps[-1], ax=self.axes, fraction=0.02, pad=0.02)
        self._dot = _marker(self.axes[0], "red")
        self._update(set(self.state))
        self._freeze_layout()
        self._render()

    def maps(self) -> np.ndarray:
        """``[n, h, w]`` scores of the picked patch against every patch of every image (current setting)."""
        s = self.state
        g = self.grids[(s["facet"], s["layer"])]
        y, x = self.patch_yx
        v = g[self.source, y, x][None]
        m = affinity.get_measure(s["measure"])
        return m.fn(v, g.reshape(-1, g.shape[-1])).reshape(len(g), *self.grid).numpy()

    def pick(self, source: int, y: int, x: int) -> float:
        """Make patch ``(y, x)`` of image ``source`` the picked one and redraw; returns seconds."""
        self.source, self.patch_yx = int(source), (int(y), int(x))
        return self._refresh({"patch"})

    def on_click(self, ax_index: int, y: float, x: float) -> None:
        self.source = ax_index
        self.patch_yx = tuple(
            int(v) for v in np.clip(np.floor(np.array([y, x]) / self.patch), 0, np.array(self.grid) - 1)
        )
        self._update({"patch"})

    def _update(self, changed: set) -> None:
        s = self.state
        v = self.maps()
        similar = affinity.get_measure(s["measure"]).higher_is_similar
        lo, hi = float(v.min()), float(v.max()) + 1e-6
        for im, m in zip(self._maps, v):
            im.set_data(m)
            im.set_cmap("viridis" if similar else "viridis_r")
            im.set_clim(lo, hi)
        self._bar.set_label(s["measure"] + ("" if similar else " (distance: bright = close)"))
        y, x = self.patch_yx
        self._dot.remove()
        self._dot = _marker(self.axes[self.source], "red")
        _place(self._dot, [(y + 0.5) * self.patch, (x + 0.5) * self.patch])
        for k, ax in enumerate(self.axes):
            ax.set_title(self.names[k] + (f": patch ({y}, {x})" if k == self.source else ""), fontsize=9)
        self.status = (
            f"{self.names[self.source]}, patch (row {y}, col {x}) · {s['facet']} layer {s['layer']}, {s['measure']}"
            " · click any image to pick a patch"
        )
        self.fig.suptitle(
            f"{s['measure']} of {s['facet']}s, layer {s['layer']}, to the picked patch"
            + (f" — {self.title}" if self.title else ""),
            fontsize=10,
        )

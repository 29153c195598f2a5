"""Frozen feature grids of a backbone on a set of images, cached on disk in fp16 so repeated probes are cheap.

A *source* turns ImageNet-normalised images ``[B, 3, S, S]`` into patch grids ``[B, h, w, D]``:

- a ViT backbone name or path (:func:`nbsupport.models.backbones.load`): one facet of one block, or several
  blocks concatenated along ``D`` (MMC's layers 6/8/10/12); ``norm_token`` at the last block is the
  final-LayerNorm'ed output HP, STEGO and Leopart probe;
- ``groupvit:<name>``: GroupViT's stage-1 segment tokens ``Ŝ^1`` (thesis Eq 14, one per patch);
- ``groupvit_groups:<name>``: each patch's mixture of the final-stage segment tokens by the chained
  assignment ``Attn = A^2 A^1`` (thesis Eq 32): the final groups seen from the patch grid.

One file per (data, source, facet, layers, resolution) key: ``<root>/<slug>-<hash>.safetensors`` holding the
fp16 grid and the key as metadata. The key includes a fingerprint of the weights, so a random-weight fixture
and the real release of the same name never share a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nbsupport.core import paths
from nbsupport.models import features

GROUPVIT_PREFIXES = ("groupvit:", "groupvit_groups:")


@dataclass
class FeatureSource:
    """A frozen feature extractor: ``fn(images [B, 3, S, S]) -> [B, h, w, D]``; ``patch``: pixels per patch;
    ``description`` for titles and tables; ``fingerprint``: a digest of the weights (cache key)."""

    spec: str
    description: str
    patch: int
    fingerprint: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    facet: str
    layers: tuple[int, ...]
    checkpoint: str


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of a model's weights (the float64 sum and the first values of every tensor)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if torch.is_tensor(v) and v.numel():
                flat = v.detach().reshape(-1)
                h.update(f"{k}:{float(flat.double().sum()):.6e}:{flat[:4].double().tolist()}".encode())
    return h.hexdigest()[:16]


def load_source(
    spec: str, facet: str = "norm_token", layers: Sequence[int] = (-1,), device="cpu", seed: int = 0
) -> FeatureSource:
    """The :class:`FeatureSource` named by ``spec`` (see the module docstring). ViTs: ``facet`` of every
    block in ``layers`` (clipped to the model's depth), concatenated. GroupViT sources ignore facet/layers."""
    layers = tuple(int(x) for x in layers)
    if spec.startswith(GROUPVIT_PREFIXES):
        from nbsupport.models import groupvit as gv

        kind, name = spec.split(":", 1)
        model = gv.load(name, device=device, seed=seed)
        groups = kind == "groupvit_groups"

        @torch.no_grad()
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = model.encode_image(x.to(device))
            h, w = out.grid
            if groups:  # [B, G, N]^T @ [B, G, C]: each patch's expected final segment token
                tok = out.attn.transpose(1, 2) @ out.final_tokens
            else:
                tok = out.segment_tokens[0]
            return tok.reshape(len(x), h, w, -1)

        what = "final groups (Attn-weighted)" if groups else "stage-1 tokens"
        return FeatureSource(
            spec,
            f"{gv.describe(model)} {what}",
            model.cfg.patch_size,
            weights_fingerprint(model),
            fn,
            "groups" if groups else "stage1",
            (),
            name,
        )
    from nbsupport.models import backbones

    model = backbones.load(spec, device=device)
    depth = model.nbs_info["depth"]
    layers = tuple(min(layer, depth - 1) if layer >= 0 else layer for layer in layers)
    requests = [(facet, layer) for layer in layers]

    def fn(x: torch.Tensor) -> torch.Tensor:
        got = features.extract_many(model, x.to(device), requests)
        return torch.cat([got[r] for r in requests], dim=-1)

    return FeatureSource(
        spec,
        backbones.describe(model),
        features.patch_size(model),
        weights_fingerprint(model),
        fn,
        facet,
        layers,
        backbones.OFFICIAL[spec].file.split("/")[-1] if spec in backbones.OFFICIAL else spec,
    )


def cache_root() -> Path:
    """The default cache folder: ``data/generated/probe_features`` (git-ignored)."""
    return paths.generated_dir() / "probe_features"


def cache_path(key: dict, root: str | Path | None = None) -> Path:
    """Where the grid of ``key`` (a JSON-able dict) is stored under ``root``."""
    text = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    data = key.get("data") if isinstance(key.get("data"), dict) else {}
    parts = (data.get("dataset"), data.get("split"), key.get("source"), key.get("facet"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(str(x) for x in parts if x is not None))
    return Path(root or cache_root()) / f"{slug[:80]}-{digest}.safetensors"


def compute_grids(source: FeatureSource, images, batch_size: int = 16) -> torch.Tensor:
    """fp16 CPU grids ``[N, h, w, D]`` of ``images`` (a tensor or ``NormalizedImages``), in batches."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(source.fn(images[i : i + batch_size]).to("cpu", torch.float16))
    return torch.cat(out)


def grids(
    source: FeatureSource,
    images,
    data_key: dict,
    batch_size: int = 16,
    cache: bool | str | Path = True,
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """The fp16 grids of ``images`` by ``source``, read from the cache when the key was computed before
    (no forward pass), else computed and written (atomically). ``data_key``: what identifies the images
    (dataset, split, count, size, seed); ``cache``: True (default folder), a folder, or False (no disk)."""
    key = {
        "data": data_key,
        "source": source.spec,
        "fingerprint": source.fingerprint,
        "facet": source.facet,
        "layers": list(source.layers),
        "size": list(images.shape[-2:]),
        "n": len(images),
    }
    if cache is False:
        return compute_grids(source, images, batch_size)
    path = cache_path(key, None if cache is True else cache)
    if path.is_file():
        from safetensors.torch import load_file

        if log:
            log(f"features from cache: {path.name}")
        return load_file(str(path))["features"]
    out = compute_grids(source, images, batch_size)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({"features": out.contiguous()}, str(tmp), metadata={"key": json.dumps(key, default=str)})
    os.replace(tmp, path)
    if log:
        log(f"features computed and cached: {path.name}")
    return out

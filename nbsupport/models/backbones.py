"""ViT backbones: official DINO and DINOv2 checkpoints, local files, and offline seeded random-init models.

Every backbone is a timm ``VisionTransformer`` (so timm's code runs the forward pass) in eval mode,
carrying ``model.nbs_info`` (name, patch size, width, heads, depth, register tokens, whether it learned
anything, whether it came from a random-weight fixture file, and a one-line description that figure titles
must include). Thesis section 3.2 (DINO) and 1.2 (MaskCut's DINO ViT-B/8 backbone).

DINOv2 (``facebookresearch/dinov2``, ``hub/backbones.py``): patch 14, 518 px (a 37 x 37 position grid),
LayerScale in every block (``blocks.N.ls1.gamma`` / ``ls2.gamma``), a ``mask_token`` used only in training,
and for the ``_reg`` models 4 ``register_tokens`` placed after CLS that get no position embedding. The
official files are converted on load the way timm converts them (:func:`dinov2_to_timm`).

Weights are read with ``torch.load(weights_only=True)`` or safetensors: no pickle code is executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from nbsupport.core import paths
from nbsupport.models.checkpoints import (
    FIXTURE_LABEL,
    CheckpointError,
    WeightsUnavailableError,
    fetch_release,
    fixture_marker,
)

DINO_URL = "https://dl.fbaipublicfiles.com/dino/"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"


@dataclass(frozen=True)
class Arch:
    """A ViT's shape. ``reg_tokens``: register tokens after CLS (DINOv2 ``_reg``: 4); ``layer_scale``: the
    LayerScale init value (None: no LayerScale, as DINO; DINOv2's hub builds with 1.0)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    reg_tokens: int = 0
    layer_scale: float | None = None


@dataclass(frozen=True)
class Official:
    """An official checkpoint: where it lives and what it must look like."""

    arch: Arch
    file: str
    size: int | None  # bytes, where measured; None = not verified by size
    sha256: str | None = None  # pinned when known; else pinned on first download (sidecar file)
    base: str = DINO_URL
    folder: str = "dino"  # the cache subfolder: $NBSUPPORT_CACHE/<folder>/<file name>
    family: str = "DINO"  # first word of the description

    @property
    def url(self) -> str:
        return self.base + self.file


VIT_S = dict(embed_dim=384, depth=12, num_heads=6)


VIT_B = dict(embed_dim=768, depth=12, num_heads=12)


OFFICIAL: dict[str, Official] = {
    "dino_vits16": Official(Arch(16, **VIT_S), "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", None),
    "dino_vits8": Official(Arch(8, **VIT_S), "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", 86_728_949),
    "dino_vitb16": Official(Arch(16, **VIT_B), "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", None),
    "dino_vitb8": Official(Arch(8, **VIT_B), "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", None),
    # the 300-epoch ViT-S/8 that STEGO and HP probe (their S/8 rows), beside the 800-epoch dino_vits8
    "dino_vits8_300ep": Official(
        Arch(8, **VIT_S),
        "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
        None,
        family="DINO (300 epochs)",
    ),
}


def _dinov2(arch: str, reg: bool) -> Official:
    """A DINOv2 release as ``hub/backbones.py`` builds it: 518 px, patch 14, LayerScale 1.0, and for ``_reg``
    4 registers; file ``dinov2_<arch>14/dinov2_<arch>14[_reg4]_pretrain.pth`` under :data:`DINOV2_URL`."""
    shape = VIT_S if arch == "vits" else VIT_B
    a = Arch(14, **shape, img_size=518, reg_tokens=4 if reg else 0, layer_scale=1.0)
    stem = f"dinov2_{arch}14"
    return Official(
        a, f"{stem}/{stem}{'_reg4' if reg else ''}_pretrain.pth", None, None, DINOV2_URL, "dinov2", "DINOv2"
    )


# Official DINOv2 backbones (sizes and hashes not pinned: the hash is recorded on first download).
DINOV2: dict[str, Official] = {
    "dinov2_vits14": _dinov2("vits", False),
    "dinov2_vits14_reg": _dinov2("vits", True),
    "dinov2_vitb14": _dinov2("vitb", False),
    "dinov2_vitb14_reg": _dinov2("vitb", True),
}


# Offline random-init models: (architecture, seed). They learned nothing: they give the floor.
RANDOM: dict[str, tuple[Arch, int]] = {
    "random_vits8": (Arch(8, **VIT_S), 0),
    "random_vits16": (Arch(16, **VIT_S), 0),
    "random_vitb8": (Arch(8, **VIT_B), 0),
    "random_tiny8": (Arch(8, embed_dim=96, depth=4, num_heads=3, img_size=64), 0),
}


# Backbones the project trains itself and ships in data/weights/ (docs/experiments/tiny_dino.md).
SHIPPED: dict[str, str] = {
    "tiny_dino_synth": "weights/tiny_dino_synth.safetensors",
    "tiny_vit_synth_supervised": "weights/tiny_vit_synth_supervised.safetensors",
}

# What each shipped backbone is (the start of its description) and the command that retrains it.
SHIPPED_INFO: dict[str, tuple[str, str]] = {
    "tiny_dino_synth": (
        "tiny DINO (synthetic world)",
        "python -m nbsupport dino train --recipe tiny_dino_synth; docs/experiments/tiny_dino.md",
    ),
    "tiny_vit_synth_supervised": (
        "supervised stand-in (synthetic world)",
        "python -m nbsupport standin train --recipe tiny_vit_synth_supervised; docs/experiments/offline_models.md",
    ),
}


def available() -> list[str]:
    """All registered backbone names."""
    return sorted([*OFFICIAL, *DINOV2, *RANDOM, *SHIPPED])


def release(name: str) -> Official:
    """The official release ``name`` (DINO or DINOv2); ValueError naming the known ones otherwise."""
    off = OFFICIAL.get(name) or DINOV2.get(name)
    if off is None:
        raise ValueError(f"{name!r} is not an official release: use one of {sorted([*OFFICIAL, *DINOV2])}")
    return off


def build(arch: Arch) -> nn.Module:
    """A timm VisionTransformer with DINO's settings (qkv bias, LayerNorm eps 1e-6, no head), any input size
    (``dynamic_img_size``: the position embedding is interpolated to the patch grid).

    With registers it is timm's DINOv2-with-registers layout (``reg_token``, ``no_embed_class``: the position
    embedding covers the patches only, CLS's own position folded into ``cls_token``); with ``layer_scale``
    every block has LayerScale (``ls1.gamma`` / ``ls2.gamma``)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=True,
        init_values=arch.layer_scale,
        reg_tokens=arch.reg_tokens,
        no_embed_class=arch.reg_tokens > 0,
    )


def dinov2_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in the layout of :func:`build`, as timm's ``_convert_dinov2`` maps it:
    ``mask_token`` dropped (masked-image training only); with ``register_tokens``: renamed ``reg_token``,
    CLS's position ``pos_embed[:, 0]`` added to ``cls_token`` and ``pos_embed`` kept for the patches only
    (DINOv2 gives registers no position, so the two layouts compute the same tokens). Other dicts: unchanged."""
    if "mask_token" not in sd and "register_tokens" not in sd:
        return sd
    skip = ("mask_token", "register_tokens", "cls_token", "pos_embed")
    # training checkpoints (block_chunks > 0) nest blocks as blocks.<chunk>.<index>: the index is global
    out = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items() if k not in skip}
    cls, pos = sd.get("cls_token"), sd.get("pos_embed")
    if "register_tokens" in sd:
        if cls is None or pos is None:
            raise CheckpointError("DINOv2 checkpoint with register_tokens but no cls_token / pos_embed")
        out["reg_token"] = sd["register_tokens"]
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    for key, value in (("cls_token", cls), ("pos_embed", pos)):
        if value is not None:
            out[key] = value
    return out


def _attach(
    model: nn.Module, name: str, arch: Arch, pretrained: bool, description: str, device, fixture: bool = False
) -> nn.Module:
    model.nbs_info = {
        "name": name,
        "patch_size": arch.patch_size,
        "embed_dim": arch.embed_dim,
        "num_heads": arch.num_heads,
        "depth": arch.depth,
        "img_size": arch.img_size,
        "num_register_tokens": arch.reg_tokens,
        "layer_scale": arch.layer_scale is not None,
        "pretrained": pretrained,
        "fixture": fixture,
        "description": description,
    }
    return model.to(device).eval()


def _arch_name(arch: Arch) -> str:
    size = {384: "S", 768: "B", 192: "Ti"}.get(arch.embed_dim, f"{arch.depth}x{arch.embed_dim}")
    return f"ViT-{size}/{arch.patch_size}" + (" + registers" if arch.reg_tokens else "")


def describe(model: nn.Module) -> str:
    """One line for figure titles, e.g. ``"random-init ViT-S/8 (seed 0)"`` or ``"DINO ViT-S/8"``."""
    info = getattr(model, "nbs_info", None)
    return info["description"] if info else type(model).__name__


def expected_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the cached official checkpoint ``name`` lives (or must be put by hand when offline): under
    ``cache_dir`` (default :func:`nbsupport.core.paths.cache_dir`), ``dino/<file>`` or ``dinov2/<file>``."""
    off = release(name)
    return Path(cache_dir or paths.cache_dir()) / off.folder / Path(off.file).name


def fetch(name: str, download: bool = True, progress: bool = True) -> Path:
    """The local path of official checkpoint ``name``, downloaded once into the cache and size/hash checked
    on every use (:func:`nbsupport.models.checkpoints.fetch_release`).

    Offline (``download=False`` or ``NBSUPPORT_OFFLINE=1``) and not cached: raises
    :class:`WeightsUnavailableError` naming the URL and the path to put the file at.
    """
    off = release(name)
    return fetch_release(
        off.url,
        expected_path(name),
        what=f"Weights for {name!r}",
        loader="nbsupport.models.backbones.load",
        size=off.size,
        sha256_hex=off.sha256,
        alternatives=sorted(RANDOM),
        download=download,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------
# Reading checkpoints


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file, unwrapped to the
    ViT's own keys, plus the safetensors metadata ({} for .pth).

    Accepts the official backbone-only files, DINO's full training checkpoints (``teacher`` with
    ``module.backbone.`` prefixes) and ``{"model"|"state_dict": ...}`` wrappers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - report which file is bad
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"{path} could not be read with torch.load(weights_only=True): {e}. Only plain tensor "
                "checkpoints are accepted (no pickled objects); convert it to .safetensors."
            ) from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a dict of tensors")
    for key in ("teacher", "model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        k = re.sub(r"^(module\.)?(backbone\.)?", "", k)
        if k.startswith(("head.", "fc_norm.", "dino_head.", "ibot_head.")):
            continue  # DINO / DINOv2 projection heads, classifier: not part of the backbone
        out[k] = v
    return out, meta


def infer_arch(sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Arch:
    """Architecture from tensor shapes: patch size and width from ``patch_embed.proj.weight``, depth from
    the block count, image size from ``pos_embed``, MLP ratio from ``fc1``, registers from ``reg_token``
    (or DINOv2's ``register_tokens``), LayerScale from ``blocks.0.ls1.gamma``. Heads cannot be seen in the
    shapes: taken from the metadata when present, else width // 64 (DINO's and DINOv2's S and B use 64-d
    heads)."""
    meta = meta or {}
    sd = dinov2_to_timm(sd)
    try:
        w = sd["patch_embed.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as e:
        raise CheckpointError(
            f"not a ViT checkpoint: key {e.args[0]!r} missing (found e.g. {sorted(sd)[:5]})"
        ) from None
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError("not a ViT checkpoint: no 'blocks.N.' keys")
    reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    n_patches = int(pos.shape[1]) - (0 if reg else 1)  # with registers: no position for CLS (build())
    side = int(round(n_patches**0.5))
    if side * side != n_patches:
        raise CheckpointError(f"pos_embed has {n_patches} patch positions, not a square grid")
    heads = int(meta["num_heads"]) if "num_heads" in meta else max(1, dim // 64)
    if dim % heads:
        raise CheckpointError(
            f"width {dim} is not divisible by {heads} heads; store 'num_heads' in the safetensors metadata"
        )
    hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in sd else 4 * dim
    scale = 1.0 if "blocks.0.ls1.gamma" in sd else None
    return Arch(patch, dim, depth, heads, side * patch, hidden / dim, reg_tokens=reg, layer_scale=scale)


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load (after :func:`dinov2_to_timm`) with an error that lists what is missing or unexpected."""
    res = model.load_state_dict(dinov2_to_timm(sd), strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the ViT layout: missing {res.missing_keys[:8]}"
            f"{'...' if len(res.missing_keys) > 8 else ''}, unexpected {res.unexpected_keys[:8]}"
            f"{'...' if len(res.unexpected_keys) > 8 else ''}"
        )


def save_safetensors(model: nn.Module, path: str | Path, **metadata: str) -> Path:
    """Write a backbone as safetensors with its architecture in the metadata (so heads are known)."""
    from safetensors.torch import save_file

    info = getattr(model, "nbs_info", {})
    meta = {"num_heads": str(info.get("num_heads", model.blocks[0].attn.num_heads)), "format": "nbsupport-vit"}
    meta.update({k: str(v) for k, v in metadata.items()})
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


def load(name_or_path: str | Path, device: str | torch.device = "cpu", download: bool = True) -> nn.Module:
    """A ViT backbone in eval mode: a registered name (see :func:`available`) or a checkpoint path.

    - ``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8`` (and ``dino_vits8_300ep``, the
      300-epoch ViT-S/8 of STEGO and HP): official DINO weights, downloaded
      once into ``$NBSUPPORT_CACHE/dino`` (default ``~/.cache/nbsupport``), size/hash checked; a random-weight
      fixture there (:mod:`nbsupport.models.fixtures`) loads too, with ``nbs_info["fixture"]`` True,
      ``"pretrained"`` False and "(random weights, fixture)" in the description.
    - ``dinov2_vits14``, ``dinov2_vitb14`` and the ``_reg`` variants (4 register tokens): official DINOv2
      weights, the same way under ``$NBSUPPORT_CACHE/dinov2``. Patch 14: inputs should be multiples of 14
      (see :func:`nbsupport.models.features.snap_size`).
    - ``random_vits8``, ``random_vits16``, ``random_vitb8``, ``random_tiny8``: seeded random init, offline.
    - ``tiny_dino_synth``: the small DINO trained on the synthetic world, shipped in ``data/weights``.
    - ``tiny_vit_synth_supervised``: the same family trained with the synthetic world's labels (a supervised
      stand-in, ``nbsupport.training.standins``), shipped in ``data/weights``.
    - a path to an official ``.pth`` or a ``.safetensors`` file: architecture inferred from the shapes.
    """
    name = str(name_or_path)
    if name in RANDOM:
        arch, seed = RANDOM[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(arch)
        return _attach(model, name, arch, False, f"random-init {_arch_name(arch)} (seed {seed})", device)
    if name in OFFICIAL or name in DINOV2:
        path = fetch(name, download=download)
        sd, _ = read_state_dict(path)
        off = release(name)
        arch = off.arch
        model = build(arch)
        load_state(model, sd, str(path))
        fixture = fixture_marker(path) is not None  # random weights in the official layout: say so
        desc = f"{off.family} {_arch_name(arch)}" + (f" ({FIXTURE_LABEL})" if fixture else "")
        return _attach(model, name, arch, not fixture, desc, device, fixture=fixture)
    if name in SHIPPED:
        path = paths.data_dir() / SHIPPED[name]
        label, retrain = SHIPPED_INFO[name]
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{name!r} is the {label}, shipped in the repository as "
                f"{path}, and that file is missing: restore it (git checkout -- data/weights) or retrain it "
                f"({retrain}). Use 'random_vits8' offline or an official DINO name meanwhile."
            )
        return _load_path(path, device, name=name, label=label)
    p = Path(name).expanduser()
    if p.suffix in (".pth", ".pt", ".safetensors") or p.exists():
        return _load_path(p, device)
    raise ValueError(f"unknown backbone {name!r}: use one of {available()} or a path to a .pth/.safetensors file")


def _load_path(path: Path, device, name: str | None = None, label: str | None = None) -> nn.Module:
    sd, meta = read_state_dict(path)
    arch = infer_arch(sd, meta)
    model = build(arch)
    load_state(model, sd, str(path))
    fixture = fixture_marker(path) is not None
    desc = f"{label or meta.get('description') or path.name} {_arch_name(arch)}" + (
        f" ({FIXTURE_LABEL})" if fixture else ""
    )
    return _attach(model, name or str(path), arch, not fixture, desc, device, fixture=fixture)


def random_like(model: nn.Module, seed: int = 0, device=None) -> nn.Module:
    """A seeded random-init ViT with ``model``'s architecture (registers and LayerScale included, LayerScale
    at DINOv2's hub init 1.0): the floor a learned backbone must beat."""
    info = model.nbs_info
    arch = Arch(
        info["patch_size"],
        info["embed_dim"],
        info["depth"],
        info["num_heads"],
        info.get("img_size", 224),
        reg_tokens=info.get("num_register_tokens", 0),
        layer_scale=1.0 if info.get("layer_scale") else None,  # DINOv2's hub init value
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        floor = build(arch)
    device = device or next(model.parameters()).device
    return _attach(
        floor, f"random_like:{info['name']}", arch, False, f"random-init {_arch_name(arch)} (seed {seed})", device
    )

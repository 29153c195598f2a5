"""Dense ViT descriptors: keys, queries, values, tokens and attention as feature grids.

One extractor for every notebook (the dino-vit-features idea, thesis section 2.3 and 4.1): run a timm
ViT up to a block and read a *facet* of it as a grid ``[B, h, w, D]``. The tokens are ``P`` prefix tokens
(CLS, then the register tokens of DINOv2 ``_reg`` models: ``P = 1 + R``, :func:`num_prefix_tokens`) and
the ``h * w`` patches; every grid holds the patches only. Overlapping patches (``stride < patch``) come
from running the patch-embedding convolution with a smaller stride and interpolating the position
embedding to the new grid, ``h = 1 + (H - patch) // stride``.

Input sizes: pixels beyond the last whole patch (bottom rows, right columns) are not seen, the crop the
DINO reference makes (``covered_size``). At plain stride a side that is not a multiple of the patch
warns, since the grid then covers less than the image (DINOv2, patch 14, at 480 px sees 476 px):
resize to :func:`snap_size` (476 or 490 for 480) so that grid and image line up.

The forward pass is written out here block by block instead of using hooks: nothing is attached to
or changed on the model, so a failing call (bad input, out of memory) leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FACETS = ("key", "query", "value", "token", "norm_token", "attn")


def patch_size(model: nn.Module) -> int:
    return int(model.patch_embed.proj.kernel_size[0])


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches: 1 (CLS) plus the register tokens (DINOv2 ``_reg``: 4)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def covered_size(height: int, width: int, patch: int, stride: int | None = None) -> tuple[int, int]:
    """Pixels ``(H', W')`` the patch grid of an ``H x W`` image covers: ``patch + (h - 1) * stride`` per
    side; the rest (bottom / right) is not seen."""
    stride = stride or patch
    h, w = grid_size(height, width, patch, stride)
    return patch + (h - 1) * stride, patch + (w - 1) * stride


def snap_size(size: int, patch: int) -> int:
    """The multiple of ``patch`` nearest to ``size`` (ties go down; at least one patch): where a square
    resize should go so that the patch grid covers the whole image. ``snap_size(480, 14) == 476``,
    ``snap_size(480, 8) == 480``."""
    if size < 1 or patch < 1:
        raise ValueError(f"size and patch must be positive, got {size}, {patch}")
    down = size // patch * patch
    return max(patch, down if size - down <= down + patch - size else down + patch)


def grid_size(height: int, width: int, patch: int, stride: int | None = None) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of an ``H x W`` image: ``1 + (H - patch) // stride`` per side."""
    stride = stride or patch
    if height < patch or width < patch:
        raise ValueError(f"image {height}x{width} is smaller than one {patch}x{patch} patch")
    return 1 + (height - patch) // stride, 1 + (width - patch) // stride


def patch_to_pixel(yx, stride: int, patch: int):
    """Centre pixel of patch ``(y, x)`` in the (resized) input: ``y * stride + patch // 2``.
    Works on ints, arrays or tensors of shape ``[..., 2]``."""
    return yx * stride + patch // 2


def pixel_to_patch(yx, stride: int, patch: int, grid: tuple[int, int] | None = None):
    """The patch whose centre is nearest to pixel ``(y, x)``; clipped to ``grid`` when given."""
    import numpy as np

    arr = np.asarray(yx, dtype=float)
    out = np.rint((arr - patch // 2) / stride).astype(int)
    out = np.maximum(out, 0)
    if grid is not None:
        out = np.minimum(out, np.asarray(grid) - 1)
    return out


def _check(model: nn.Module, images: torch.Tensor, stride: int | None) -> tuple[torch.Tensor, int]:
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a float tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    p = patch_size(model)
    stride = stride or p
    if not (1 <= stride <= p):
        raise ValueError(f"stride must be between 1 and the patch size {p}, got {stride}")
    height, width = images.shape[-2:]
    if (height, width) != covered_size(height, width, p, stride) and stride == p:  # also raises if < 1 patch
        warnings.warn(
            f"image {height}x{width} is not a multiple of the patch {p}: the last {height % p} rows and "
            f"{width % p} columns are not seen; resize to {snap_size(height, p)}x{snap_size(width, p)} "
            "(features.snap_size) so that the patch grid covers the image",
            stacklevel=2,
        )
    param = next(model.parameters())
    return images.to(device=param.device, dtype=param.dtype), stride


def embed(model: nn.Module, images: torch.Tensor, stride: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering block 0 ``[B, P + h*w, D]`` (CLS, the ``P - 1`` registers, then the patches) and the
    grid ``(h, w)``. Position embeddings as timm adds them: interpolated (bicubic, antialiased) to the grid;
    with ``no_embed_class`` (DINOv2 ``_reg``) on the patches only. That is DINOv2's own rule for the ``_reg``
    models; its models without registers interpolate with scale factor ``(h + 0.1) / 37`` and no
    antialiasing, so off the 518-px grid their features differ slightly from the official code's."""
    from timm.layers import resample_abs_pos_embed

    images, stride = _check(model, images, stride)
    proj = model.patch_embed.proj
    x = F.conv2d(images, proj.weight, proj.bias, stride=stride)  # [B, D, h, w]
    b, d, h, w = x.shape
    x = model.patch_embed.norm(x.flatten(2).transpose(1, 2))
    prefix = [model.cls_token.expand(b, -1, -1)]
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(b, -1, -1))
    own = getattr(model, "no_embed_class", False)  # position embedding for the patches only
    pos = resample_abs_pos_embed(
        model.pos_embed,
        new_size=(h, w),
        old_size=model.patch_embed.grid_size,
        num_prefix_tokens=0 if own else num_prefix_tokens(model),
    )
    x = torch.cat([*prefix, x + pos], dim=1) if own else torch.cat([*prefix, x], dim=1) + pos
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    return x, (h, w)


def _layer_index(model: nn.Module, layer: int) -> int:
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} out of range for a {depth}-block ViT (use 0..{depth - 1} or -1 for the last)")
    return layer % depth


def _qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a block's attention, each ``[B, heads, T, head_dim]``, from its own qkv weights."""
    attn = block.attn
    b, t, d = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attn_probs(block: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def extract_many(
    model: nn.Module,
    images: torch.Tensor,
    requests: Iterable[tuple[str, int]],
    stride: int | None = None,
    include_cls: bool = False,
    no_grad: bool = True,
) -> dict:
    """Several (facet, layer) grids from one forward pass.

    Returns ``{(facet, layer): [B, h, w, D]}`` with the layer keys as given; with ``include_cls`` each
    value is ``(grid [B, h, w, D], cls [B, D])``. The grids hold the patches only (CLS and register tokens
    dropped; registers are returned by no facet). ``key``/``query``/``value`` concatenate the heads
    (head-major, ``D = embed_dim``), ``token`` is the block output, ``norm_token`` the block output after
    the model's final LayerNorm (at the last block: the features HP, STEGO and Leopart probe), ``attn``
    gives each patch's attention row over all ``T = P + h*w`` tokens per head (prefix columns first, so
    rows sum to 1), ``D = heads * T`` (CLS row: see :func:`attention`).
    """
    requests = list(requests)
    if not requests:
        raise ValueError("no (facet, layer) requested")
    wanted: dict[int, list[tuple[str, int]]] = {}
    for facet, layer in requests:
        if facet not in FACETS:
            raise ValueError(f"unknown facet {facet!r}: use one of {FACETS}")
        wanted.setdefault(_layer_index(model, layer), []).append((facet, layer))
    last = max(wanted)
    out = {}
    ctx = torch.no_grad() if no_grad else torch.enable_grad()
    with ctx:
        x, (h, w) = embed(model, images, stride)
        b, n_pre = x.shape[0], num_prefix_tokens(model)
        for i, block in enumerate(model.blocks):
            if i in wanted:
                facets = {f for f, _ in wanted[i]}
                qkv = _qkv(block, x) if facets & {"key", "query", "value", "attn"} else None
                x_out = block(x)
                for facet, layer in wanted[i]:
                    if facet == "token":
                        full = x_out
                    elif facet == "norm_token":  # the model's final LayerNorm on this block's output
                        full = model.norm(x_out)
                    elif facet == "attn":
                        probs = _attn_probs(block, qkv[0], qkv[1])  # [B, heads, T, T]
                        full = probs.permute(0, 2, 1, 3).reshape(b, probs.shape[2], -1)
                    else:
                        t = qkv[{"query": 0, "key": 1, "value": 2}[facet]]
                        full = t.permute(0, 2, 1, 3).reshape(b, t.shape[2], -1)
                    grid = full[:, n_pre:].reshape(b, h, w, -1)
                    out[(facet, layer)] = (grid, full[:, 0]) if include_cls else grid
                x = x_out
            else:
                x = block(x)
            if i == last:
                break
    return out


def extract(
    model: nn.Module,
    images: torch.Tensor,
    facet: str = "key",
    layer: int = -1,
    stride: int | None = None,
    include_cls: bool = False,
    no_grad: bool = True,
):
    """Dense descriptors ``[B, h, w, D]`` of one facet at one block (CLS and register tokens excluded).

    ``images``: ImageNet-normalised float ``[B, 3, H, W]`` (or ``[3, H, W]``). ``layer``: block index,
    0-based, negative from the end (DINO-ViT-S: 0..11; the thesis uses layer 9 keys for
    correspondences and Fig 26, MaskCut the last block's keys). ``include_cls=True`` returns
    ``(grid, cls [B, D])``.
    """
    return extract_many(model, images, [(facet, layer)], stride, include_cls, no_grad)[(facet, layer)]


def attention(model: nn.Module, images: torch.Tensor, layer: int = -1, stride: int | None = None) -> torch.Tensor:
    """Attention probabilities ``[B, heads, T, T]`` of block ``layer``: token 0 is CLS, tokens ``1 .. P-1``
    the registers (:func:`num_prefix_tokens`), then the ``h*w`` patches row-major."""
    images, stride = _check(model, images, stride)
    idx = _layer_index(model, layer)
    with torch.no_grad():
        x, _ = embed(model, images, stride)
        for i, block in enumerate(model.blocks):
            if i == idx:
                q, k, _ = _qkv(block, x)
                return _attn_probs(block, q, k)
            x = block(x)
    raise AssertionError("unreachable")


def cls_attention(
    model: nn.Module,
    images: torch.Tensor,
    layer: int = -1,
    stride: int | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """CLS-to-patch attention ``[B, heads', h, w]`` of block ``layer`` (raw probabilities over the patches
    only: with registers it sums to less than 1, the rest going to CLS and the registers)."""
    a = attention(model, images, layer, stride)[:, :, 0, num_prefix_tokens(model) :]
    h, w = grid_size(images.shape[-2], images.shape[-1], patch_size(model), stride)
    if heads is not None:
        heads = list(heads)
        if not heads or max(heads) >= a.shape[1] or min(heads) < -a.shape[1]:
            raise ValueError(f"heads {heads} out of range for {a.shape[1]} heads")
        a = a[:, heads]
    return a.reshape(a.shape[0], a.shape[1], h, w)


def cls_saliency(
    model: nn.Module,
    images: torch.Tensor,
    layer: int = -1,
    heads: Sequence[int] | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Saliency ``[B, h, w]`` in [0, 1]: CLS attention of block ``layer`` averaged over ``heads`` (all
    when None) and min-max normalised per image. dino-vit-features uses the last block and heads
    [0, 2, 4, 5], tuned for DINO ViT-S/8 only."""
    a = cls_attention(model, images, layer, stride, heads).mean(dim=1)
    lo = a.flatten(1).min(dim=1).values[:, None, None]
    hi = a.flatten(1).max(dim=1).values[:, None, None]
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def attention_mass_mask(attn: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's attention threshold: per image, the smallest set of highest-attention patches whose
    attention sums to at least ``mass`` of the total. ``attn``: non-negative ``[B, h, w]`` (or
    ``[B, heads, h, w]``, thresholded per head). Returns bool of the same shape."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if attn.dim() < 3:
        raise ValueError(f"attn must be [B, h, w] or [B, heads, h, w], got {tuple(attn.shape)}")
    flat = attn.flatten(-2).clamp_min(0)
    vals, idx = flat.sort(dim=-1, descending=True)
    cum = vals.cumsum(-1) / vals.sum(-1, keepdim=True).clamp_min(1e-12)
    # keep a patch when the mass *before* it is still short of the target
    keep_sorted = (cum - vals / vals.sum(-1, keepdim=True).clamp_min(1e-12)) < mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.reshape(attn.shape)


def log_bin(desc: torch.Tensor, hierarchy: int = 2) -> torch.Tensor:
    """Log-binned descriptors (dino-vit-features, thesis section 2.3): ``[B, h, w, D] -> [B, h, w, (1 +
    8 * hierarchy) * D]``.

    Level ``k`` averages ``3^k x 3^k`` windows (borders not counted) and samples the 3x3 neighbourhood
    at offsets ``{-3^k, 0, 3^k}`` (rows outer, columns inner; the centre only at level 0), positions
    outside the grid clamped to the border. Hierarchy 2 gives 17 bins. Vectorised: one pooling and
    nine shifted slices per level.
    """
    if desc.dim() != 4:
        raise ValueError(f"desc must be [B, h, w, D], got {tuple(desc.shape)}")
    if hierarchy < 1:
        raise ValueError("hierarchy must be >= 1")
    b, h, w, d = desc.shape
    x = desc.permute(0, 3, 1, 2)
    parts = []
    for k in range(hierarchy):
        s = 3**k
        pooled = x if s == 1 else F.avg_pool2d(x, s, stride=1, padding=s // 2, count_include_pad=False)
        padded = F.pad(pooled, (s, s, s, s), mode="replicate")
        for dy in (-s, 0, s):
            for dx in (-s, 0, s):
                if k and dy == 0 and dx == 0:
                    continue
                parts.append(padded[:, :, s + dy : s + dy + h, s + dx : s + dx + w])
    return torch.cat(parts, dim=1).permute(0, 2, 3, 1).contiguous()

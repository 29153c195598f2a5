"""Training augmentations of the image batch (thesis 4.3: colour jitter and random erasing, as GroupViT's
timm pipeline: ``color_jitter 0.4``, ``re_prob 0.25, re_mode pixel, re_count 1``), applied on the device to
the ImageNet-normalised batch after it is loaded, each image with its own draws from one generator, so a
step's augmentation follows from ``(seed, step, rank)`` and a resumed run redraws the same ones.
"""

from __future__ import annotations

import math

import torch

from nbsupport.data.images import IMAGENET_MEAN, IMAGENET_STD

#: Luma weights of the grey image that contrast and saturation blend towards (ITU-R 601, as torchvision).
GREY = (0.299, 0.587, 0.114)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> grey ``[B, 1, H, W]``."""
    w = torch.tensor(GREY, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x * w).sum(1, keepdim=True)


def _u(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of each image of ``x [B, 3, H, W]`` (pixels in [0, 1]) scaled by
    factors drawn uniformly from ``[1 - strength, 1 + strength]``, in a random order per image, clamped to
    [0, 1] after each (torchvision's ``ColorJitter(s, s, s)``, what timm builds from ``color_jitter=s``):
    brightness ``f x``, contrast ``f x + (1 - f) mean(grey(x))``, saturation ``f x + (1 - f) grey(x)``."""
    if strength <= 0:
        return x
    b, dev = len(x), x.device
    lo = max(0.0, 1 - strength)
    factors = torch.stack([_u(b, lo, 1 + strength, g, dev) for _ in range(3)], 1)  # [B, 3]
    order = torch.stack([torch.randperm(3, generator=g, device=dev) for _ in range(b)])  # [B, 3]
    for slot in range(3):
        op = order[:, slot]
        f = factors.gather(1, op[:, None])[:, 0][:, None, None, None]
        grey = _grey(x)
        target = torch.where(
            (op == 0)[:, None, None, None],
            torch.zeros_like(x),
            torch.where((op == 1)[:, None, None, None], grey.mean((2, 3), keepdim=True), grey),
        )
        x = (f * x + (1 - f) * target).clamp(0, 1)
    return x


def random_erase(
    x: torch.Tensor,
    prob: float,
    g: torch.Generator,
    area=(0.02, 1 / 3),
    ratio=(0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """With probability ``prob`` per image, one rectangle of ``x [B, C, H, W]`` (normalised) is replaced by
    per-pixel standard-normal noise (timm's ``RandomErasing(mode="pixel", max_count=1)``): its area a
    uniform fraction of the image in ``area``, its aspect ratio log-uniform in ``ratio``, up to ``attempts``
    draws until it fits, placed uniformly."""
    if prob <= 0:
        return x
    x = x.clone()
    b, c, h, w = x.shape
    dev = x.device
    for i in range(b):
        if float(torch.rand((), generator=g, device=dev)) >= prob:
            continue
        for _ in range(attempts):
            a = float(_u(1, *area, g, dev)) * h * w
            r = math.exp(float(_u(1, math.log(ratio[0]), math.log(ratio[1]), g, dev)))
            eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < eh < h and 0 < ew < w:
                y0 = int(torch.randint(0, h - eh + 1, (), generator=g, device=dev))
                x0 = int(torch.randint(0, w - ew + 1, (), generator=g, device=dev))
                noise = torch.randn(c, eh, ew, generator=g, device=dev, dtype=x.dtype)
                x[i, :, y0 : y0 + eh, x0 : x0 + ew] = noise
                break
    return x


def augment_batch(
    images: torch.Tensor, color: float = 0.0, erase: float = 0.0, g: torch.Generator | None = None
) -> torch.Tensor:
    """The training augmentation of an ImageNet-normalised batch: colour jitter of strength ``color`` on the
    pixels (denormalised, jittered, normalised again), then random erasing with probability ``erase`` on
    the normalised batch (as timm orders them). Both 0: ``images`` itself, no random draw."""
    if color <= 0 and erase <= 0:
        return images
    if g is None:
        g = torch.Generator(device=images.device).manual_seed(0)
    if color > 0:
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)[None, :, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)[None, :, None, None]
        images = (color_jitter((images * std + mean).clamp(0, 1), color, g) - mean) / std
    return random_erase(images, erase, g)


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The generator of one step's augmentation: seeded from ``(seed, step, rank)``."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) * 1009 + int(rank))
    return g

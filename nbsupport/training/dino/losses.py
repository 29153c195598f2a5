"""DINO's losses (thesis Eq 11): centred and sharpened cross-entropy over views for the CLS token and for
patches at matching image locations, Sinkhorn-Knopp targets, KoLeo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nbsupport.core.distributed import all_reduce_mean

# --------------------------------------------------------------------------------------------------
# Losses


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (DINOv2; Sablayrolles et al. 2019): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over
    the L2-normalised rows of ``x [N, D]``. Minimising it spreads the batch over the sphere, a direct push
    against the collapse of every image to one output."""
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 rows, got {x.shape[0]}")
    z = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():  # nearest neighbour by the largest dot product, oneself excluded
        dots = z @ z.T
        dots.fill_diagonal_(-float("inf"))
        nn_idx = dots.argmax(1)
    return -torch.log((z - z[nn_idx]).norm(dim=-1) + eps).mean()


#: Teacher-target schemes of the CLS and patch terms: EMA centre + sharpen (DINO), or Sinkhorn-Knopp (DINOv2).
CENTERINGS = ("center", "sinkhorn")


def check_centering(centering: str) -> None:
    """Raise ``ValueError`` unless ``centering`` is one of :data:`CENTERINGS`."""
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Balanced teacher targets ``[N, K]`` (SwAV / DINOv2 "Sinkhorn-Knopp centering"): rows of
    ``exp(logits / temp)`` are rescaled alternately so that every prototype receives ``1/K`` of the batch's
    mass and every sample ``1/N``; each returned row sums to 1. An alternative to centre + sharpen that
    cannot collapse to one prototype nor to the uniform distribution. DDP: sums over all processes."""
    q = logits.float() / temp
    q = torch.exp(q - q.max()).t()  # [K, N]
    n = torch.tensor(float(q.shape[1]), device=q.device)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist:
        torch.distributed.all_reduce(n)
    k = q.shape[0]

    def total(x):
        if dist:
            torch.distributed.all_reduce(x)
        return x

    q /= total(q.sum())
    for _ in range(iters):
        q /= total(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


class DINOLoss(nn.Module):
    """Eq 11: cross-entropy between centred, sharpened teacher outputs and student outputs over all pairs
    of different views. ``center`` is an EMA of the teacher's batch mean,
    ``c <- m c + (1 - m) mean(teacher_out)`` (``m = center_momentum``), updated after the loss."""

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
    ):
        super().__init__()
        check_centering(centering)
        self.n_crops, self.student_temp, self.center_momentum = n_crops, student_temp, center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher distributions ``softmax((t - c) / tau_t)`` (or Sinkhorn-Knopp)."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_out, teacher_temp)
        return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        teacher_temp: float,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``student_out``: ``[n_crops * B, K]``; ``teacher_out``: ``[2 * B, K]`` (view-major); ``targets``:
        ``self.targets(teacher_out, teacher_temp)`` when the caller already has them."""
        s = (student_out / self.student_temp).chunk(self.n_crops)
        t = (self.targets(teacher_out, teacher_temp) if targets is None else targets).chunk(2)
        total, n = 0.0, 0
        for it, q in enumerate(t):
            for iv, p in enumerate(s):
                if iv == it:
                    continue  # the same view is never its own target
                total = total + torch.sum(-q * F.log_softmax(p, dim=-1), dim=-1).mean()
                n += 1
        self.update_center(teacher_out)
        return total / n

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        mean = all_reduce_mean(teacher_out.reshape(-1, teacher_out.shape[-1]).mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


def _rot_forward(u: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised crop coordinates ``(u, v)`` (x, y in [0, 1]) before -> after ``torch.rot90(crop, k)``
    (``dims=(-2, -1)``, counter-clockwise): one quarter turn maps ``(u, v) -> (v, 1 - u)``."""
    for _ in range(3):
        turn = k > 0.5
        u, v = torch.where(turn, v, u), torch.where(turn, 1 - u, v)
        k = k - 1
    return u, v


def _rot_inverse(u: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_rot_forward`: undoing ``k`` quarter turns is ``(4 - k) mod 4`` more of them."""
    return _rot_forward(u, v, torch.remainder(4 - k, 4))


def patch_centres(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Source-image coordinates ``(y, x)`` of the patch centres of crops on an ``h x w`` grid: ``[B, h, w, 2]``.

    ``boxes``: ``[B, 5]`` = (top, left, height, width, flipped) of each crop in its source image as
    :class:`MultiCrop` records them (continuous pixel coordinates: a crop covers ``[top, top + height)``),
    or ``[B, 6]`` with the number of counter-clockwise quarter turns applied after the flip."""
    dev = boxes.device
    B = boxes.shape[0]
    v = ((torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h)[None, :, None].expand(B, h, w)
    u = ((torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w)[None, None, :].expand(B, h, w)
    top, left, bh, bw, flip = boxes.float()[:, :5].unbind(-1)
    if boxes.shape[-1] > 5:
        u, v = _rot_inverse(u, v, boxes.float()[:, 5].view(B, 1, 1))
    u = torch.where(flip.view(B, 1, 1) > 0.5, 1 - u, u)
    y = top.view(B, 1, 1) + v * bh.view(B, 1, 1)
    x = left.view(B, 1, 1) + u * bw.view(B, 1, 1)
    return torch.stack([y, x], dim=-1)


def locate_in_crop(points: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where source-image points ``[B, ..., 2]`` (y, x) fall in crops ``boxes [B, 5 or 6]``: ``grid_sample``
    coordinates ``[B, ..., 2]`` (x, y in [-1, 1], align_corners=False) and a bool ``[B, ...]`` inside mask."""
    top, left, bh, bw, flip = boxes.float()[:, :5].unbind(-1)
    shape = (-1,) + (1,) * (points.dim() - 2)
    v = (points[..., 0] - top.view(shape)) / bh.view(shape)
    u = (points[..., 1] - left.view(shape)) / bw.view(shape)
    u = torch.where(flip.view(shape) > 0.5, 1 - u, u)
    if boxes.shape[-1] > 5:
        u, v = _rot_forward(u, v, boxes.float()[:, 5].view(shape))
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return torch.stack([2 * u - 1, 2 * v - 1], dim=-1), inside


class DensePatchLoss(nn.Module):
    """Patch-level DINO term (optional, iBOT-like). For each teacher global view ``t`` and student view
    ``v``: if ``v != t``, every student patch whose centre lies inside crop ``t`` predicts the teacher's
    patch distribution bilinearly sampled at that image location; if ``v == t``, only the student's
    *masked* patches count, predicting the teacher's patch at the same position (masked image modelling).
    Teacher patch outputs are centred by their own EMA centre and sharpened like the CLS term.

    ``image_center=True`` also subtracts, before sharpening, each teacher view's mean patch output
    (per image): the targets then say how a patch differs from the rest of its image, so a feature
    shared by every patch of an image (background, palette: an image "fingerprint", which satisfies the
    plain dense term and is what a tiny model learns first on the synthetic world) no longer helps."""

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        image_center: bool = False,
    ):
        super().__init__()
        check_centering(centering)
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.image_center = image_center
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _image_centred(self, teacher_patches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher outputs the targets are made of: minus each image's mean patch output if ``image_center``."""
        if not self.image_center:
            return teacher_patches
        return [t - t.mean((1, 2), keepdim=True) for t in teacher_patches]

    def targets(self, teacher_patches: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """Per view ``[B, h, w, K]`` target distributions (centre + sharpen, or Sinkhorn-Knopp over all
        patches of both views)."""
        return self._sharpen(self._image_centred(teacher_patches), teacher_temp)

    def _sharpen(self, teacher_patches: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        if self.centering == "sinkhorn":
            flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_patches])
            q = sinkhorn_knopp(flat, teacher_temp).split([t[..., 0].numel() for t in teacher_patches])
            return [x.reshape(t.shape) for x, t in zip(q, teacher_patches)]
        return [F.softmax((t - self.center) / teacher_temp, dim=-1).detach() for t in teacher_patches]

    def forward(
        self,
        student_patches: list[torch.Tensor],
        teacher_patches: list[torch.Tensor],
        boxes: list[torch.Tensor],
        teacher_temp: float,
        masks: list | None = None,
    ) -> torch.Tensor:
        """``student_patches``: V x ``[B, h_v, w_v, K]``; ``teacher_patches``: 2 x ``[B, h, w, K]``;
        ``boxes``: V x ``[B, 5]``; ``masks``: V x (bool ``[B, h_v, w_v]`` or None)."""
        masks = masks or [None] * len(student_patches)
        total, n = student_patches[0].new_zeros(()), 0
        teacher_patches = self._image_centred(teacher_patches)
        for it, q in enumerate(self._sharpen(teacher_patches, teacher_temp)):  # q: [B, h, w, K]
            q_chw = q.permute(0, 3, 1, 2)
            for iv, sp in enumerate(student_patches):
                if iv == it:
                    if masks[iv] is None or not masks[iv].any():
                        continue
                    valid, qs = masks[iv], q
                else:
                    grid, valid = locate_in_crop(patch_centres(boxes[iv], sp.shape[1], sp.shape[2]), boxes[it])
                    if not valid.any():
                        continue
                    qs = F.grid_sample(
                        q_chw, grid.to(q_chw.dtype), mode="bilinear", padding_mode="border", align_corners=False
                    ).permute(0, 2, 3, 1)  # [B, h_v, w_v, K]
                ce = torch.sum(-qs * F.log_softmax(sp / self.student_temp, dim=-1), dim=-1)
                total = total + ce[valid].mean()
                n += 1
        self.update_center(torch.cat([t.reshape(-1, t.shape[-1]) for t in teacher_patches]))
        return total / max(n, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        mean = all_reduce_mean(teacher_out.mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)

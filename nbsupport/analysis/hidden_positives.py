"""Hidden Positives (HP, Seong et al., CVPR'23) on frozen DINO features: the reference pool, the anchor
criterion, global and local hidden positives, and the small segmentation head trained with HP's
contrastive objective.

- **Reference pool** ``Q^ag`` (section 3.2): ``M`` frozen patch features, one random patch per image
  (2048 for COCO-Stuff and Cityscapes, 1024 for Potsdam), fixed for the run (:func:`build_reference_pool`).
- **Anchor criterion** (Eq. 2): ``c_i = max_q cos(q, f_i)`` (:func:`anchor_criterion`).
- **Global hidden positives** (Eq. 3): ``j`` is a positive of ``i`` when ``cos(f_i, f_j) > c_i`` or
  ``> c_j``, over every patch of the mini-batch; the "or" makes the relation symmetric
  (:func:`hidden_positive_mask`). The task-specific set (Eq. 4) is the same rule on the EMA head's outputs
  ``s'`` with a pool of ``s'`` renewed periodically.
- **Local hidden positives** (Eqs. 7-9): in the 3x3 neighbourhood of an anchor (itself included), the
  patches whose last-layer attention from the anchor exceeds the mean of the anchor's attention row; their
  head features are mixed as ``s_mix = 1/|I| sum sigma t_j s_j`` (:func:`local_hidden_positives`,
  :func:`mix_local`).
- **Loss** (Eqs. 5, 6, 10): ``L^cont(z, P, N) = -1/|P| sum_p log(exp(cos(z, z_p)/tau) / sum_{n in N u P}
  exp(cos(z, z_n)/tau))`` with ``N`` a random ``rho = 2 %`` of the non-positives, for ``z = Z(S(f))``
  (Phi) and ``z_mix = Z(s_mix)`` (Psi); ``L = Phi^ag + Psi^ag + lambda (Phi^sp + Psi^sp)``, lambda
  ramping from 0 to 1 (:func:`hp_loss`, :func:`train_hp_head`).

Where HP's code differs from the paper (as the reference digest records it; its code is not copied here):
features are the final-LayerNorm'ed last-block tokens (:func:`hp_features`); the attention is
head-averaged, clamped to its 10-90 % quantiles and row-softmaxed before thresholding (``attention="code"``)
and multiplied by ``sigma = 28``; the head is a linear map plus a 2-layer MLP, summed, with Dropout2d 0.1
(``HPHead(kind="code")``; the paper: STEGO's 2-layer ReLU MLP, ``kind="paper"``); the EMA momentum is 0.99
(COCO) and the task-specific pool is renewed every 20 iterations (paper: 100); and the loss builds one
weighted positive mask inside one softmax with shared negatives (``variant="code"``: weight 1 for global
positives, ``local_weight`` for the 3x3 local positives, averaged with those weights) instead of the
paper's separate Phi / Psi terms. The consistency term ``0.05 R`` between two augmentations and the final
CRF are not implemented (the head trains on fixed frozen features).

The positive masks are ``[N, N]`` for the ``N`` patches of a batch: memory grows as ``N^2``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

POOL_SIZE = {"cocostuff": 2048, "cityscapes": 2048, "potsdam": 1024}
TAU = {"cocostuff": 0.8, "cityscapes": 0.6, "potsdam": 0.4}
RHO = 0.02
SIGMA = 28.0
EMA = 0.99
POOL_REFRESH = {"paper": 100, "code": 20}


# -- features


def hp_features(model, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """HP's frozen inputs: the last block's tokens through the final LayerNorm ``[B, h, w, C]`` and its
    patch-to-patch attention averaged over heads ``[B, h*w, h*w]`` (prefix columns dropped)."""
    from nbsupport.models.features import extract_many, num_prefix_tokens

    feats, attns = [], []
    n_pre = num_prefix_tokens(model)
    heads = model.blocks[-1].attn.num_heads
    for i in range(0, images.shape[0], batch_size):
        out = extract_many(model, images[i : i + batch_size], [("token", -1), ("attn", -1)])
        tok, att = out[("token", -1)], out[("attn", -1)]
        with torch.no_grad():
            tok = model.norm(tok) if hasattr(model, "norm") else tok
        b, h, w, _ = att.shape
        att = att.reshape(b, h * w, heads, -1)[..., n_pre:].mean(2)
        feats.append(tok.cpu())
        attns.append(att.cpu())
    return torch.cat(feats), torch.cat(attns)


# -- global hidden positives


def build_reference_pool(
    feats, m: int | None = None, generator: torch.Generator | None = None, return_index: bool = False
):
    """The task-agnostic reference pool ``[M, C]``: one random patch of each of ``m`` random images (all when
    ``m`` is None or exceeds the images). ``feats``: ``[N, h, w, C]`` or an iterable of such batches. With
    ``return_index`` also ``[M, 3]`` (image, y, x) of every pool entry (HP Fig. 5 shows the reference)."""
    grids = [feats] if torch.is_tensor(feats) else list(feats)
    if not grids:
        raise ValueError("no features to build a reference pool from")
    sizes = [g.shape[0] for g in grids]
    total = sum(sizes)
    picks = torch.arange(total) if m is None or m >= total else torch.randperm(total, generator=generator)[:m]
    picks = picks.sort().values
    h, w = grids[0].shape[1:3]
    flat = torch.randint(0, h * w, (len(picks),), generator=generator)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    pool, index = [], []
    for img, pos in zip(picks.tolist(), flat.tolist()):
        g = int(torch.searchsorted(offsets, img, right=True)) - 1
        y, x = divmod(pos, grids[g].shape[2])
        pool.append(grids[g][img - int(offsets[g]), y, x])
        index.append((img, y, x))
    pool = torch.stack(pool)
    return (pool, torch.tensor(index)) if return_index else pool


def anchor_criterion(f: torch.Tensor, pool: torch.Tensor, chunk: int = 8192, return_index: bool = False):
    """Eq. 2: ``c_i = max_m cos(q_m, f_i)`` ``[N]`` for features ``[N, C]`` against the pool ``[M, C]``;
    with ``return_index`` also the index of the closest pool entry."""
    p = F.normalize(pool.float(), dim=-1)
    vals, idx = [], []
    for part in F.normalize(f.float(), dim=-1).split(chunk):
        v, i = (part @ p.T).max(dim=1)
        vals.append(v)
        idx.append(i)
    c = torch.cat(vals)
    return (c, torch.cat(idx)) if return_index else c


def hidden_positive_mask(f: torch.Tensor, c: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Eq. 3: ``[N, N]`` bool, ``j`` a positive of anchor ``i`` when ``cos(f_i, f_j) > c_i`` (or ``> c_j``
    when ``symmetric``: HP's rule, so that the relation is mutual). The diagonal is False."""
    fn = F.normalize(f.float(), dim=-1)
    sim = fn @ fn.T
    pos = sim > c[:, None]
    if symmetric:
        pos = pos | (sim > c[None, :])
    pos.fill_diagonal_(False)
    return pos


def global_hidden_positives(f: torch.Tensor, pool: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Eqs. 2-3 in one call: ``hidden_positive_mask(f, anchor_criterion(f, pool))``."""
    return hidden_positive_mask(f, anchor_criterion(f, pool), symmetric)


# -- local hidden positives


def neighbour_index(h: int, w: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[h*w, k*k]`` of every patch's ``k x k`` neighbourhood (row-major, itself in the middle) and
    whether each lies inside the grid (outside ones point at the patch itself)."""
    r = k // 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten()[:, None], xs.flatten()[:, None]
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    ny, nx = ys + dy.flatten()[None], xs + dx.flatten()[None]
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    idx = torch.where(valid, ny * w + nx, ys * w + xs)
    return idx, valid


def normalise_attention(attn: torch.Tensor, mode: str = "paper", quantiles=(0.1, 0.9)) -> torch.Tensor:
    """The attention rows ``T~_i`` used for local positives, ``[B, N, N]``: ``"paper"`` as given
    (head-averaged probabilities); ``"code"`` clamped to each row's ``quantiles`` and row-softmaxed."""
    if mode == "paper":
        return attn.float()
    if mode != "code":
        raise ValueError(f"attention mode must be 'paper' or 'code', got {mode!r}")
    a = attn.float()
    lo = torch.quantile(a, quantiles[0], dim=-1, keepdim=True)
    hi = torch.quantile(a, quantiles[1], dim=-1, keepdim=True)
    return torch.softmax(torch.maximum(torch.minimum(a, hi), lo), dim=-1)


def local_hidden_positives(
    attn: torch.Tensor, grid: tuple[int, int], k: int = 3, mode: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 7: for attention ``[B, h*w, h*w]`` (row ``i`` = anchor ``i``'s attention over the patches),
    returns ``idx [h*w, k*k]`` (:func:`neighbour_index`), ``mask [B, h*w, k*k]`` (the neighbour is inside
    the grid and ``t_j > mean(T~_i)``) and ``t [B, h*w, k*k]`` (the neighbours' attention, for Eq. 9)."""
    h, w = grid
    if attn.shape[-1] != h * w or attn.shape[-2] != h * w:
        raise ValueError(f"attention {tuple(attn.shape)} does not match a {h}x{w} grid")
    a = normalise_attention(attn, mode)
    idx, valid = neighbour_index(h, w, k)
    t = torch.gather(a, 2, idx[None].expand(a.shape[0], -1, -1))
    mask = valid[None] & (t > a.mean(dim=-1, keepdim=True))
    return idx, mask, t


def mix_local(
    s: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, sigma: float = SIGMA
) -> torch.Tensor:
    """Eq. 9: ``s_mix_i = 1/|I_i| sum_{j in I_i} sigma t_j s_j`` for head features ``s [B, h*w, K]``; an anchor
    without local positives keeps its own ``s_i``."""
    b, n, k = s.shape
    nb = s[:, idx.reshape(-1)].reshape(b, n, idx.shape[1], k)
    wgt = (mask.float() * t.float() * sigma)[..., None]
    count = mask.sum(-1, keepdim=True)
    mixed = (nb * wgt).sum(2) / count.clamp_min(1)
    return torch.where(count > 0, mixed, s)


def anchor_positives(
    feats: torch.Tensor,
    pool: torch.Tensor,
    anchor: tuple[int, int, int],
    attn: torch.Tensor | None = None,
    symmetric: bool = True,
    k: int = 3,
    mode: str = "paper",
) -> dict:
    """For one anchor patch ``(image, y, x)`` of ``feats [B, h, w, C]`` (HP Fig. 5): ``reference`` (index of
    its closest pool entry), ``criterion`` (``c_i``), ``similarity [B, h, w]`` (cosine to the anchor),
    ``global [B, h, w]`` (its global hidden positives across the batch, Eq. 3) and, with ``attn [B, h*w,
    h*w]``, ``local [h, w]`` (its local hidden positives in its own image, Eq. 7)."""
    b, h, w, c_dim = feats.shape
    bi, y, x = anchor
    i = (bi * h + y) * w + x
    f = feats.reshape(-1, c_dim)
    c, ref = anchor_criterion(f, pool, return_index=True)
    fn = F.normalize(f.float(), dim=-1)
    sim = fn @ fn[i]
    pos = sim > c[i]
    if symmetric:
        pos = pos | (sim > c)
    pos[i] = False
    out = {
        "reference": int(ref[i]),
        "criterion": float(c[i]),
        "similarity": sim.reshape(b, h, w),
        "global": pos.reshape(b, h, w),
    }
    if attn is not None:
        idx, mask, _ = local_hidden_positives(attn[bi : bi + 1], (h, w), k, mode)
        local = torch.zeros(h * w, dtype=torch.bool)
        local[idx[y * w + x][mask[0, y * w + x]]] = True
        out["local"] = local.reshape(h, w)
    return out


# -- loss


def sample_negatives(pos: torch.Tensor, rho: float = RHO, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, N]`` bool: each non-positive, non-self pair kept with probability ``rho`` (HP's ``rho = 2 %``
    of the remaining patches per anchor)."""
    u = torch.rand(pos.shape, generator=generator).to(pos.device)
    neg = (u < rho) & ~pos
    neg.fill_diagonal_(False)
    return neg


def contrastive_loss(
    z_anchor: torch.Tensor, z: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float
) -> torch.Tensor:
    """Eq. 5 averaged over the anchors that have a positive: ``-1/|P_i| sum_{p in P_i} log softmax`` of
    ``cos(z_anchor_i, z_j) / tau`` over ``j in N_i u P_i``. ``z_anchor`` is ``z`` (Phi) or ``z_mix`` (Psi)."""
    logits = F.normalize(z_anchor, dim=-1) @ F.normalize(z, dim=-1).T / tau
    allowed = pos | neg
    logits = logits.masked_fill(~allowed, -float("inf"))
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0.0
    per = -(logp.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per.mean()


def weighted_contrastive_loss(z: torch.Tensor, weights: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """The code's form: one softmax per anchor over positives (``weights > 0``) and shared negatives, the
    log-probabilities of the positives averaged with ``weights`` (``sum_j w_ij log p_ij / sum_j w_ij``)."""
    zn = F.normalize(z, dim=-1)
    logits = (zn @ zn.T / tau).masked_fill(~((weights > 0) | neg), -float("inf"))
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    wsum = weights.sum(1)
    has = wsum > 0
    if not has.any():
        return z.sum() * 0.0
    per = -(logp.masked_fill(weights <= 0, 0.0) * weights).sum(1)[has] / wsum[has]
    return per.mean()


class HPHead(nn.Module):
    """Segmentation head ``S`` and projection ``Z`` on frozen features ``[B, h, w, C]``.

    ``kind="code"``: ``S(f) = Linear(f) + MLP(f)`` (2-layer ReLU MLP), Dropout2d 0.1 on the input;
    ``kind="paper"``: STEGO's 2-layer ReLU MLP. ``Z``: a linear layer followed by L2 normalisation."""

    def __init__(self, in_dim: int, dim: int = 512, kind: str = "code", dropout: float = 0.1):
        super().__init__()
        if kind not in ("code", "paper"):
            raise ValueError(f"kind must be 'code' or 'paper', got {kind!r}")
        self.kind = kind
        self.drop = nn.Dropout2d(dropout) if kind == "code" and dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_dim, dim) if kind == "code" else None
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``s = S(f)`` ``[B, h, w, K]``."""
        x = self.drop(feats.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        s = self.mlp(x)
        return s + self.linear(x) if self.linear is not None else s

    def project(self, s: torch.Tensor) -> torch.Tensor:
        """``z = Z(s)``, L2-normalised along the last axis."""
        return F.normalize(self.proj(s), dim=-1)


def hp_loss(
    head: nn.Module,
    feats: torch.Tensor,
    local: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pool: torch.Tensor,
    tau: float = TAU["cocostuff"],
    rho: float = RHO,
    sigma: float = SIGMA,
    ema_head: nn.Module | None = None,
    pool_sp: torch.Tensor | None = None,
    lam: float = 0.0,
    variant: str = "paper",
    local_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """HP's objective on one batch of frozen features ``[B, h, w, C]`` with local positives ``local = (idx,
    mask, t)`` (:func:`local_hidden_positives`) and the task-agnostic pool ``pool``. With ``ema_head`` and
    ``pool_sp`` the task-specific positives (Eq. 4, on ``s'``) enter with weight ``lam``.

    ``variant="paper"``: ``Phi^ag + Psi^ag + lam (Phi^sp + Psi^sp)`` (Eqs. 5, 6, 10), separate negatives
    per positive set. ``variant="code"``: :func:`weighted_contrastive_loss` with weight 1 on the
    task-agnostic positives, ``lam`` on the task-specific ones and ``local_weight`` on the local positives.
    Returns the loss and ``stats`` (mean positives per anchor)."""
    b, h, w, c_dim = feats.shape
    module = head.module if hasattr(head, "module") else head
    idx, mask, t = local
    f = feats.reshape(-1, c_dim)
    pos_ag = global_hidden_positives(f, pool)
    s = head(feats).reshape(b, h * w, -1)
    z = module.project(s).reshape(b * h * w, -1)
    pos_sp = None
    if ema_head is not None and pool_sp is not None and lam > 0:
        with torch.no_grad():
            s_ema = ema_head(feats).reshape(b * h * w, -1)
        pos_sp = global_hidden_positives(s_ema, pool_sp)
    stats = {"positives": float(pos_ag.sum(1).float().mean())}
    if variant == "code":
        wts = pos_ag.float()
        if pos_sp is not None:
            wts = torch.maximum(wts, lam * pos_sp.float())
        n = b * h * w
        rows = (torch.arange(b)[:, None, None] * h * w + torch.arange(h * w)[None, :, None]).expand_as(mask)
        cols = torch.arange(b)[:, None, None] * h * w + idx[None].expand_as(mask)
        loc = torch.zeros(n, n, dtype=torch.bool, device=feats.device)
        loc[rows[mask], cols[mask]] = True
        loc.fill_diagonal_(False)
        wts = torch.where(loc, torch.maximum(wts, torch.full_like(wts, local_weight)), wts)
        neg = sample_negatives(wts > 0, rho, generator)
        return weighted_contrastive_loss(z, wts, neg, tau), stats
    if variant != "paper":
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    z_mix = module.project(mix_local(s, idx, mask, t, sigma)).reshape(b * h * w, -1)
    neg = sample_negatives(pos_ag, rho, generator)
    loss = contrastive_loss(z, z, pos_ag, neg, tau) + contrastive_loss(z_mix, z, pos_ag, neg, tau)
    if pos_sp is not None:
        neg_sp = sample_negatives(pos_sp, rho, generator)
        loss = loss + lam * (
            contrastive_loss(z, z, pos_sp, neg_sp, tau) + contrastive_loss(z_mix, z, pos_sp, neg_sp, tau)
        )
        stats["positives_sp"] = float(pos_sp.sum(1).float().mean())
    return loss, stats


# -- training


def _ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(momentum).add_(pm.detach(), alpha=1 - momentum)


def train_hp_head(
    feats: torch.Tensor,
    attn: torch.Tensor,
    dim: int = 64,
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    tau: float = TAU["cocostuff"],
    rho: float = RHO,
    sigma: float = SIGMA,
    pool_size: int = POOL_SIZE["cocostuff"],
    ema: float = EMA,
    pool_refresh: int = POOL_REFRESH["code"],
    task_specific: bool = True,
    variant: str = "paper",
    kind: str = "code",
    attention: str = "paper",
    seed: int = 0,
    device: str = "auto",
    log: Iterable | None = None,
) -> tuple[HPHead, list[dict]]:
    """Train an :class:`HPHead` on frozen features ``[N, h, w, C]`` and their attention ``[N, h*w, h*w]``
    (:func:`hp_features`) with AdamW (HP: lr 5e-4, wd 0.1). Each step draws ``batch_size`` images; the
    task-agnostic pool is built once from all images; with ``task_specific`` an EMA copy of the head
    (momentum ``ema``) gives the task-specific positives, its pool rebuilt every ``pool_refresh`` steps, and
    ``lambda`` ramps linearly from 0 to 1 over the run.

    Under ``torchrun`` every rank uses the same seed (same pool, same image order) and takes its share
    ``rank::world`` of each batch; the head is wrapped in DDP so gradients are averaged
    (:mod:`nbsupport.core.distributed`); the logged loss is the mean over ranks. ``log``: an optional list
    to append the history to as it runs. Returns the head (on CPU, eval mode) and the history
    ``[{"step", "loss", "lambda", "positives"}]``."""
    from nbsupport.core import distributed as dist

    ctx = dist.setup(device)
    gen = torch.Generator().manual_seed(seed)  # the same on every rank: pool and batches agree
    neg_gen = torch.Generator().manual_seed(seed + 7919 * (ctx.rank + 1))  # negatives: per rank
    torch.manual_seed(seed)
    n_img, h, w, c_dim = feats.shape
    if attn.shape != (n_img, h * w, h * w):
        raise ValueError(f"attention must be [{n_img}, {h * w}, {h * w}], got {tuple(attn.shape)}")
    if ctx.world > batch_size:
        raise ValueError(f"batch_size {batch_size} is smaller than the {ctx.world} ranks")
    idx, mask, t = local_hidden_positives(attn, (h, w), 3, attention)
    pool = build_reference_pool(feats, pool_size, gen).to(ctx.device)
    head = HPHead(c_dim, dim, kind).to(ctx.device)
    ema_head = copy.deepcopy(head).eval() if task_specific else None
    model = dist.wrap_ddp(head, ctx)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    history = [] if log is None else log
    pool_sp = None
    for step in range(steps):
        lam = step / max(1, steps - 1) if task_specific else 0.0
        if ema_head is not None and step % pool_refresh == 0:
            with torch.no_grad():
                pool_sp = build_reference_pool(ema_head(feats.to(ctx.device)), pool_size, gen)
        batch = torch.randperm(n_img, generator=gen)[:batch_size]
        mine = batch[ctx.rank :: ctx.world]
        model.train()
        loss, stats = hp_loss(
            model,
            feats[mine].to(ctx.device),
            (idx.to(ctx.device), mask[mine].to(ctx.device), t[mine].to(ctx.device)),
            pool,
            tau,
            rho,
            sigma,
            ema_head,
            pool_sp,
            lam,
            variant,
            generator=neg_gen,
        )
        if not dist.all_true(bool(torch.isfinite(loss)), ctx.device):
            opt.zero_grad(set_to_none=True)
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema_head is not None:
            _ema_update(ema_head, head, ema)
        value = dist.all_reduce_mean(loss.detach().clone())
        history.append({"step": step, "loss": float(value), "lambda": lam, "positives": stats["positives"]})
    head = head.cpu().eval()
    return head, history


def segment_features(head: HPHead, feats: torch.Tensor) -> torch.Tensor:
    """Inference features ``s = S(f)`` ``[B, h, w, K]`` (HP uses ``s``, not ``z``, for the probes)."""
    was = head.training
    head.eval()
    with torch.no_grad():
        out = head(feats)
    head.train(was)
    return out

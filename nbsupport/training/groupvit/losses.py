"""GroupViT's losses (thesis Eq 21-26, 37, 41, 44, 52): image-text and multi-label contrastive (with
``<PAD>`` labels and the non-noisy variant of 5.10), entropy regularisers, DINO affinity distillation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nbsupport.analysis import entropy as ent


# ============================================================================================== losses
def contrastive_from_logits(logits: torch.Tensor, positives: torch.Tensor, valid: torch.Tensor | None = None):
    """``-log(sum_pos exp(l) / sum_all exp(l))`` per row of ``logits [R, M]`` with boolean ``positives [R, M]``;
    columns where ``valid [M]`` (or ``[R, M]``) is False are dropped from both sums. Returns ``[R]``."""
    if valid is not None:
        valid = valid.expand_as(logits)
        logits = logits.masked_fill(~valid, float("-inf"))
        positives = positives & valid
    pos = logits.masked_fill(~positives, float("-inf"))
    return torch.logsumexp(logits, -1) - torch.logsumexp(pos, -1)


def image_text_contrastive(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float, texts: list | None = None
) -> torch.Tensor:
    """Eq 21-23: ``L_{I->T} + L_{T->I}`` for L2-normalised ``img [B, P]``, ``txt [B, P]`` (pair ``i`` is positive)
    and ``scale = 1 / tau``. With ``texts`` (the caption strings) identical captions in the batch also count
    as positives (the non-noisy idea of section 5.10 applied to captions)."""
    logits = scale * img @ txt.T  # [B, B]
    b = len(img)
    pos = torch.eye(b, dtype=torch.bool, device=img.device)
    if texts is not None:
        if len(texts) != b:
            raise ValueError(f"texts has {len(texts)} strings for a batch of {b}")
        pos = pos | torch.tensor([[a == c for c in texts] for a in texts], device=img.device)
    return contrastive_from_logits(logits, pos).mean() + contrastive_from_logits(logits.T, pos.T).mean()


def multi_label_contrastive(
    img: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
    pad: torch.Tensor | None = None,
    label_strings: list | None = None,
) -> torch.Tensor:
    """Eq 24-26: image ``i`` against the ``K`` labels of every image, ``img [B, P]``, ``labels [B, K, P]``
    (L2-normalised), ``scale = 1 / tau``.

    ``L_{I->{T_k}} = -1/B sum_i log(sum_k e^{s Z_i.T_ik} / sum_{j,k} e^{s Z_i.T_jk})`` and
    ``L_{{T_k}->I} = -1/(KB) sum_{i,k} log(e^{s T_ik.Z_i} / sum_j e^{s T_ik.Z_j})``.

    ``pad [B, K]`` (True = ``<PAD>``, section 5.7): those labels' embeddings are nulled and they leave
    every sum (neither positives nor negatives; their text->image terms are not averaged).
    ``label_strings`` (``B`` lists of ``K`` raw label strings): the non-noisy loss of section 5.10 - a label of
    image ``j`` equal to one of image ``i``'s is a positive for ``i`` too. Without repeats it equals the plain loss."""
    b, k, _ = labels.shape
    flat, pad = _null_pads(labels, pad)
    return _label_contrastive(scale * img @ flat.T, b, k, pad, label_strings)  # logits [B, B*K]


def _null_pads(labels: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels [B, K, P]`` flattened to ``[B*K, P]`` with the ``<PAD>`` embeddings nulled (section 5.7), and
    ``pad [B, K]`` as a bool tensor on their device (all False when ``None``)."""
    b, k, p = labels.shape
    pad = torch.zeros(b, k, dtype=torch.bool) if pad is None else pad
    pad = pad.to(labels.device).bool()
    return labels.masked_fill(pad[..., None], 0.0).reshape(b * k, p), pad


def _label_contrastive(logits: torch.Tensor, b: int, k: int, pad: torch.Tensor, label_strings=None) -> torch.Tensor:
    """Both directions of Eq 24-26 from image-label ``logits [B, B*K]`` (label ``j*K + k`` is image ``j``'s
    ``k``-th); ``pad`` and ``label_strings`` as in :func:`multi_label_contrastive`."""
    dev = logits.device
    pad = pad.to(dev).bool()
    owner = torch.arange(b, device=dev).repeat_interleave(k)  # image of each label
    pos = owner[None, :] == torch.arange(b, device=dev)[:, None]  # [B, B*K]
    if label_strings is not None:
        if len(label_strings) != b or any(len(s) != k for s in label_strings):
            raise ValueError(f"label_strings must be {b} lists of {k} strings")
        flat_s = [s for row in label_strings for s in row]
        sets = [set(s for s, m in zip(row, pm) if not m) for row, pm in zip(label_strings, pad.tolist())]
        pos = pos | torch.tensor([[s in sets[i] for s in flat_s] for i in range(b)], device=dev)
    valid = ~pad.reshape(-1)
    has = (pos & valid).any(1)  # images with at least one real label
    i2t = contrastive_from_logits(logits[has], pos[has], valid).mean() if has.any() else logits.sum() * 0
    t_logits = logits.T[valid]  # [L, B] real labels
    t_pos = pos.T[valid]
    t2i = contrastive_from_logits(t_logits, t_pos).mean() if len(t_logits) else logits.sum() * 0
    return i2t + t2i


def group_label_contrastive(
    group_embeds: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
    pad: torch.Tensor | None = None,
    label_strings: list | None = None,
) -> torch.Tensor:
    """The multi-label loss (Eq 24-26) with each image represented, for each label, by its best-matching
    final group: ``logit(i, label) = scale * max_g Z_ig . T_label`` for ``group_embeds [B, G, P]`` and
    ``labels [B, K, P]`` (L2-normalised; ``pad`` / ``label_strings`` as in :func:`multi_label_contrastive`).
    Not in the thesis: the image-level loss is satisfied by the mean of the groups, so nothing asks a group
    to stand for one label; here a label is found only if one group alone matches it, which is what
    zero-shot segmentation reads (each group takes the label it matches best)."""
    b, k, _ = labels.shape
    flat, pad = _null_pads(labels, pad)
    sims = torch.einsum("igp,lp->igl", group_embeds, flat)  # [B, G, B*K]
    return _label_contrastive(scale * sims.max(1).values, b, k, pad, label_strings)


def affinity_logits(group_embeds: torch.Tensor, label_embeds: torch.Tensor, scale: torch.Tensor | float):
    """Eq 28 per image: ``A_ST = scale K^I Z^T``, ``[B, G, P] x [B, K, P] -> [B, G, K]``."""
    return scale * group_embeds @ label_embeds.transpose(-1, -2)


def ge_loss(attn: torch.Tensor) -> torch.Tensor:
    """Eq 37, GE: mean entropy of every patch over the final groups, ``attn [B, G, N]`` (Eq 32)."""
    return ent.group_entropy_loss(attn)


def group_balance_loss(soft: list) -> torch.Tensor:
    """Group usage balance, an addition that is not in the thesis: per image and grouping stage,
    ``1 - H(u) / log G`` of the mean soft assignment ``u = mean_j soft[:, :, j]`` over the stage's ``G``
    groups; 0 when the groups take equal shares, 1 when one group takes every segment. ``soft``: the stages'
    ``[B, G, N]`` assignments (``ImageOutput.soft``).

    Why: a small GroupViT trained from scratch keeps its soft assignments flat, so during training the
    Gumbel noise groups at random and at inference the argmax puts everything in one group; sharpening them
    with GE (Eq 37) alone makes the last stage collapse onto one group. GE sharpens each patch's assignment,
    this term spreads the patches over the groups (measured in docs/experiments/tiny_groupvit.md)."""
    terms = []
    for a in soft:
        g = a.shape[1]
        if g < 2:
            continue
        terms.append(1 - ent.entropy(a.float().mean(-1), -1) / math.log(g))  # [B]
    if not terms:
        return soft[0].sum() * 0 if soft else torch.zeros(())
    return torch.stack(terms).mean()


def le_loss(attn: torch.Tensor, a_st: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Eq 39-41, LE: mean entropy of every patch over the image's labels; ``a_st [B, G, K]`` logits, ``<PAD>``
    labels (``pad [B, K]``) removed from the softmax. Images without real labels are skipped."""
    if pad is None:
        return ent.label_entropy_loss(attn, a_st)
    keep = ~pad.all(1)
    if not keep.any():
        return a_st.sum() * 0
    a = a_st[keep].masked_fill(pad[keep][:, None, :], float("-inf"))
    return ent.label_entropy_loss(attn[keep], a)


def se_loss(a_st: torch.Tensor, pad: torch.Tensor | None = None, w_groups: float = 0.2, w_labels: float = 0.1):
    """Eq 42-44, SE: ``0.2 * mean_i H(row i over labels) + 0.1 * mean_j H(column j over groups)`` of ``a_st
    [B, G, K]``; ``<PAD>`` columns are left out of both terms."""
    if pad is None:
        return ent.segment_affinity_entropy(a_st, w_groups, w_labels)
    keep = ~pad.all(1)
    if not keep.any():
        return a_st.sum() * 0
    a, m = a_st[keep], pad[keep]
    rows = ent.entropy(F.softmax(a.masked_fill(m[:, None, :], float("-inf")), -1), -1).mean(-1)  # [B']
    cols = ent.entropy(F.softmax(a, -2), -2)  # [B', K]
    real = (~m).float()
    cols = (cols * real).sum(-1) / real.sum(-1)
    return (w_groups * rows + w_labels * cols).mean()


def dino_similarity(feats: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Cosine similarity of DINO patch features ``[B, N, D]`` (or ``[B, h, w, D]``) -> ``DINOsim [B, N, N]``.
    ``center``: subtract each image's mean feature first, for backbones whose patch features share a large
    common component (the tiny DINO's keys: every raw cosine near 1, so a softmax target would be flat)."""
    f = feats.reshape(feats.shape[0], -1, feats.shape[-1]).float()
    if center:
        f = f - f.mean(1, keepdim=True)
    f = F.normalize(f, dim=-1)
    return f @ f.transpose(1, 2)


def dino_distillation_loss(
    attn: torch.Tensor,
    dino_sim: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "sum",
    eps: float = 1e-8,
    row_normalize: bool = False,
) -> torch.Tensor:
    """Eq 52: ``-sum_ij softmax(DINOsim / t)_ij log((Attn^T Attn)_ij)`` with ``attn [B, G, N]`` (soft chained
    attention, Eq 32) and ``dino_sim [B, N, N]`` (row-wise softmax, teacher). ``reduction="sum"`` (default) is
    Eq 52 as written, summed over the ``N x N`` pairs of an image (then the batch mean); ``"mean"`` divides
    that by ``N`` (the mean cross-entropy per row).

    As written, Eq 52 has a trivial minimum: with every patch in one group ``Attn^T Attn`` is all ones and
    the loss is 0 whatever the target (entries are <= 1, so no grouping scores better). ``row_normalize``
    (not in the thesis) divides each row of ``Attn^T Attn`` by its sum, making it a distribution, so the
    loss is a proper cross-entropy: the one-group collapse then scores ``log N`` and a grouping that follows
    DINO's affinity scores lower."""
    if attn.shape[-1] != dino_sim.shape[-1] or dino_sim.shape[-1] != dino_sim.shape[-2]:
        raise ValueError(f"attn {tuple(attn.shape)} and dino_sim {tuple(dino_sim.shape)} disagree on the patches")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    target = F.softmax(dino_sim.float() / temperature, dim=-1)
    student = attn.transpose(1, 2) @ attn  # [B, N, N], entries in [0, 1]
    if row_normalize:
        student = student / student.sum(-1, keepdim=True).clamp_min(eps)
    ce = -(target * torch.log(student.clamp_min(eps))).sum((-1, -2))
    if reduction == "mean":
        ce = ce / attn.shape[-1]
    return ce.mean()

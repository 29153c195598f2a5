"""Zero-shot semantic segmentation scored against ground truth (thesis 4.6): GroupViT's inference over a set
of class names, one confusion matrix, mIoU in percent. :func:`zero_shot_miou` scores square batches at the
model's input size (the trainer's per-epoch validation); :func:`protocol_miou` is GroupViT's evaluation
protocol (short side resized, sliding window, background threshold) scored at every image's original
resolution, on a :class:`~nbsupport.data.segmentation.SegmentationSet`. A whole benchmark in its official
layout (resumable, over ``torchrun`` ranks, results files) is :mod:`nbsupport.analysis.segmentation_eval`.
"""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.analysis import metrics
from nbsupport.data import caption_labels as textmod
from nbsupport.data.segmentation import SegmentationSet
from nbsupport.models import groupvit as gv


def to_labels(pred: torch.Tensor, n_obj: int, bg_thresh: float | None) -> torch.Tensor:
    """Argmax channels of :func:`~nbsupport.models.groupvit.inference.segment_logits` -> labels ``0..n_obj``
    (0 = background): with ``bg_thresh`` channel 0 is the background, ``1..n_obj`` the objects and later
    channels background names (-> 0); without it channels ``0..n_obj - 1`` are the objects (-> ``+1``) and
    later ones background names (-> 0)."""
    if bg_thresh is None:
        return torch.where(pred < n_obj, pred + 1, torch.zeros_like(pred))
    return torch.where(pred <= n_obj, pred, torch.zeros_like(pred))


def _scores(conf: np.ndarray) -> dict:
    return {"miou": metrics.miou(conf), "iou": (metrics.iou_per_class(conf) * 100).tolist(), "conf": conf}


@torch.no_grad()
def zero_shot_miou(
    model: gv.GroupViT,
    images: torch.Tensor,
    semantic: torch.Tensor,
    class_names,
    background_names=(),
    templates=textmod.TEMPLATES,
    bg_thresh: float | None = None,
    batch_size: int = 32,
) -> dict:
    """Zero-shot segmentation mIoU (thesis section 4.6) with :func:`nbsupport.models.groupvit.inference.segment_logits`:
    object classes ``1..C`` = ``class_names``; ``background_names`` are scored as classes too and map to 0;
    ``bg_thresh`` adds GroupViT's background threshold. Returns ``{"miou", "iou" (per class incl. 0),
    "conf"}`` (percent)."""
    was = model.training
    model.eval()
    names = list(class_names) + list(background_names)
    te = gv.text_embeddings(model, names, templates)
    dev = next(model.parameters()).device
    n_obj = len(class_names)
    conf = np.zeros((n_obj + 1, n_obj + 1), np.int64)
    for s in range(0, len(images), batch_size):
        lg = gv.segment_logits(model, images[s : s + batch_size].to(dev), te, topk=5, bg_thresh=bg_thresh)
        pred = to_labels(lg.argmax(1).cpu(), n_obj, bg_thresh)
        conf += metrics.confusion_matrix(pred.numpy(), semantic[s : s + batch_size].numpy(), n_obj + 1)
    model.train(was)
    return _scores(conf)


@torch.no_grad()
def protocol_miou(
    model: gv.GroupViT,
    data: SegmentationSet,
    short_side: int | None = 448,
    window: int | None = 448,
    stride: int = 224,
    bg_thresh: float | None = 0.95,
    templates=gv.TEMPLATES["simple"],
    background_names=None,
) -> dict:
    """Zero-shot mIoU as GroupViT evaluates a benchmark (thesis 4.6, 5.3): every image of ``data`` at its
    original resolution (:meth:`~nbsupport.data.segmentation.SegmentationSet.full_resolution`)
    goes through :func:`~nbsupport.models.groupvit.inference.segment` (short side resized to ``short_side``,
    ``window`` crops every ``stride`` px, top-5 classes, background threshold ``bg_thresh``: VOC 0.95,
    :data:`~nbsupport.models.groupvit.inference.BG_THRESH`), prompted with ``data.class_names`` (and
    ``background_names``, default ``data.background_names``, scored as background), and is scored against
    the original-resolution ground truth. ``short_side=None`` / ``window=None``: the image as it is, in one window. Returns ``{"miou",
    "iou" (per label incl. 0), "conf"}`` (percent)."""
    was = model.training
    model.eval()
    n_obj = len(data.class_names)
    bgs = data.background_names if background_names is None else background_names
    te = gv.text_embeddings(model, list(data.class_names) + list(bgs), templates)
    dev = next(model.parameters()).device
    conf = np.zeros((n_obj + 1, n_obj + 1), np.int64)
    try:
        for i in range(len(data)):
            image, gt = data.full_resolution(i)
            pred = gv.segment(
                model,
                image.to(dev),
                text_embeds=te,
                short_side=short_side,
                window=window,
                stride=stride,
                bg_thresh=bg_thresh,
            )
            pred = to_labels(pred.cpu(), n_obj, bg_thresh)
            conf += metrics.confusion_matrix(pred.numpy(), gt.numpy(), n_obj + 1)
    finally:
        model.train(was)
    return _scores(conf)

"""Zero-shot semantic segmentation scored against ground truth (thesis 4.6): GroupViT's inference over a set
of class names, one confusion matrix, mIoU in percent.
"""

from __future__ import annotations

import numpy as np
import torch

from nbsupport.data import caption_labels as textmod
from nbsupport.models import groupvit as gv


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
    from nbsupport.analysis import metrics

    was = model.training
    model.eval()
    names = list(class_names) + list(background_names)
    te = gv.text_embeddings(model, names, templates)
    dev = next(model.parameters()).device
    n_obj = len(class_names)
    conf = np.zeros((n_obj + 1, n_obj + 1), np.int64)
    for s in range(0, len(images), batch_size):
        lg = gv.segment_logits(model, images[s : s + batch_size].to(dev), te, topk=5, bg_thresh=bg_thresh)
        pred = lg.argmax(1).cpu()
        if bg_thresh is None:
            pred = torch.where(pred < n_obj, pred + 1, torch.zeros_like(pred))
        else:  # channel 0 = background, 1..C objects, then background names
            pred = torch.where(pred <= n_obj, pred, torch.zeros_like(pred))
        conf += metrics.confusion_matrix(pred.numpy(), semantic[s : s + batch_size].numpy(), n_obj + 1)
    model.train(was)
    return {"miou": metrics.miou(conf), "iou": (metrics.iou_per_class(conf) * 100).tolist(), "conf": conf}

"""CutLER's detector on torchvision: class-agnostic Cascade Mask R-CNN (or Mask R-CNN) R50-FPN with the
reference settings and DropLoss (CutLER eq. 2); the heads are :mod:`~nbsupport.training.cutler.heads`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nbsupport.training.cutler.heads import (
    CASCADE_IOUS,
    CASCADE_WEIGHTS,
    CascadePredictor,
    CascadeRoIHeads,
    DropLossRoIHeads,
    RoIAlignV2Pooler,
    droploss_fastrcnn_loss,
)

__all__ = ["build_model", "droploss_fastrcnn_loss", "load_backbone_weights", "masks_to_boxes", "set_drop_loss"]

REFERENCE_MIN_SIZES = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)


ARCHS = ("resnet50", "resnet50_v2", "resnet18", "resnet34")
#: RoI heads: CutLER's headline Cascade Mask R-CNN or the plain Mask R-CNN of its second release.
HEADS = ("cascade", "mask_rcnn")


# --------------------------------------------------------------------------------------------------
# Boxes


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``[N, 4]`` (x0, y0, x1, y1) of masks ``[N, H, W]`` in the pixel-edge convention (a one-pixel
    mask at column x spans x..x+1, so no box has zero width). Empty masks give all-zero boxes."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    m = masks.bool()
    rows, cols = m.any(2), m.any(1)  # [N, H], [N, W]
    H, W = m.shape[1:]
    ar_h = torch.arange(H, device=m.device)
    ar_w = torch.arange(W, device=m.device)
    y0 = torch.where(rows, ar_h, H).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, W).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0
    return boxes


# --------------------------------------------------------------------------------------------------
# Model


def _transform_cls():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class MultiScaleTransform(GeneralizedRCNNTransform):
        """Random short side from ``min_size`` in training (as torchvision), ``min_size_test`` at inference
        (torchvision would use the last training size)."""

        def __init__(self, min_size, max_size, mean, std, min_size_test):
            super().__init__(min_size, max_size, mean, std)
            self.min_size_test = int(min_size_test)

        def resize(self, image, target=None):
            if self.training:
                return super().resize(image, target)
            saved = self.min_size
            self.min_size = (self.min_size_test,)
            try:
                return super().resize(image, target)
            finally:
                self.min_size = saved

    return MultiScaleTransform


def _strip(sd: dict) -> dict:
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for pre in ("module.", "backbone.body.", "backbone.", "body."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if not k.startswith("fc."):
            out[k] = v
    return out


def read_backbone_state(path) -> dict:
    """ResNet-body weights (torchvision names) from a file: a torchvision / DINO ResNet state dict
    (``dino_resnet50_pretrain.pth``; prefixes ``module.`` / ``backbone.`` and wrappers ``state_dict`` /
    ``model`` / ``teacher`` stripped, ``fc.*`` ignored) or a detectron2-format one (CutLER's
    ``dino_RN50_pretrain_d2_format.pkl``: ``stem.*`` / ``res2.*`` ... numpy arrays, or a whole detectron2 model).
    Read with the restricted reader of :func:`~nbsupport.training.cutler.d2format.read_detectron2`."""
    from nbsupport.training.cutler import d2format

    obj = d2format.read_detectron2(path)
    inner = obj
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(inner.get(key), dict):
            inner = inner[key]
    arrays = {k: v for k, v in inner.items() if isinstance(k, str) and hasattr(v, "shape")}
    sd = d2format.as_tensors(arrays, str(path))
    d2 = d2format.backbone_state(sd)
    return d2 if d2 else _strip(sd)


def load_backbone_weights(model, path) -> dict:
    """Load ResNet weights (:func:`read_backbone_state`: DINO ResNet-50 ``dino_resnet50_pretrain.pth``, a
    torchvision ResNet state dict, or CutLER's detectron2-format ``dino_RN50_pretrain_d2_format.pkl``) into
    ``model.backbone.body``. Raises when no tensor matches (wrong file). Returns ``{"loaded", "missing",
    "unexpected"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights {path} not found (give a ResNet state dict, e.g. DINO "
            "ResNet-50 dino_resnet50_pretrain.pth, or weights=None for random init)"
        )
    sd = read_backbone_state(path)
    body = model.backbone.body
    own = body.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"backbone weights {path}: no tensor matches the ResNet body (first keys: {list(sd)[:5]})")
    missing, unexpected = body.load_state_dict(usable, strict=False)
    bad = sorted(set(sd) - set(usable))
    return {"loaded": len(usable), "missing": list(missing), "unexpected": bad + list(unexpected)}


def build_model(
    arch: str = "resnet50",
    weights=None,
    num_classes: int = 2,
    min_size=REFERENCE_MIN_SIZES,
    max_size: int = 1333,
    min_size_test: int = 800,
    drop_loss: bool = True,
    drop_iou: float = 0.01,
    score_thresh: float = 0.0,
    detections_per_img: int = 100,
    rpn_post_nms_top_n_train: int = 4000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.65,
    box_batch_size_per_image: int = 512,
    trainable_layers: int = 5,
    representation_size: int = 1024,
    head: str = "cascade",
    cascade_ious=CASCADE_IOUS,
    cascade_weights=CASCADE_WEIGHTS,
    fpn_norm: bool = True,
    aligned_roi: bool = True,
) -> nn.Module:
    """Class-agnostic CutLER detector with the reference settings (see the package docstring).

    ``arch``: ``resnet50`` (ResNet-50 FPN, torchvision's ``maskrcnn_resnet50_fpn`` layout), ``resnet50_v2``
    (torchvision's ``..._fpn_v2``: its own conv box head and normalised FPN), ``resnet18`` / ``resnet34`` (small
    FPN models for tests). ``weights``: path of ResNet backbone weights or ``None`` (random init; nothing is
    downloaded). BatchNorm layers are trainable ``nn.BatchNorm2d`` (the reference trains SyncBN with
    FREEZE_AT 0); ``trainable_layers`` 0..5 freezes early stages. ``representation_size``: width of the
    two-FC box head(s) (1024 as torchvision and detectron2; smaller only for fast CPU tests).

    As CutLER's configs: ``head`` ``"cascade"`` (three class-agnostic stages at ``cascade_ious`` with the box
    coders ``cascade_weights``, :class:`~nbsupport.training.cutler.heads.CascadeRoIHeads`) or ``"mask_rcnn"``
    (torchvision's head with DropLoss); ``fpn_norm``: BatchNorm after every FPN conv (CutLER's FPN NORM
    SyncBN; False: torchvision's plain FPN); ``aligned_roi``: detectron2's ROIAlignV2 pooler for box and mask
    RoIs (False: torchvision's). A misspelt keyword is a ``TypeError`` (it would otherwise leave a setting
    silently at its default).
    """
    import torchvision.models.detection as D
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not 0 <= int(trainable_layers) <= 5:
        raise ValueError(f"trainable_layers must be 0..5, got {trainable_layers}")
    min_size = tuple(int(s) for s in (min_size if isinstance(min_size, (list, tuple)) else [min_size]))
    kw = dict(
        num_classes=num_classes,
        min_size=min_size,
        max_size=int(max_size),
        box_score_thresh=score_thresh,
        box_detections_per_img=int(detections_per_img),
        rpn_post_nms_top_n_train=int(rpn_post_nms_top_n_train),
        rpn_post_nms_top_n_test=int(rpn_post_nms_top_n_test),
        rpn_pre_nms_top_n_train=int(rpn_pre_nms_top_n_train),
        rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n_test),
        rpn_nms_thresh=float(rpn_nms_thresh),
        box_batch_size_per_image=int(box_batch_size_per_image),
    )
    rep = int(representation_size)
    if arch == "resnet50_v2":
        model = D.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kw)
    else:
        body = getattr(resnet, arch)(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 5, norm_layer=nn.BatchNorm2d if fpn_norm else None)
        model = D.MaskRCNN(backbone, **kw)
        if rep != 1024:
            model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * 7 * 7, rep)
            model.roi_heads.box_predictor = FastRCNNPredictor(rep, num_classes)
    if aligned_roi:
        model.roi_heads.box_roi_pool = RoIAlignV2Pooler(output_size=7)
        model.roi_heads.mask_roi_pool = RoIAlignV2Pooler(output_size=14)
    if weights is not None:
        model.nbs_weights = load_backbone_weights(model, weights)
    # freeze early stages when asked (torchvision's rule: train the last `trainable_layers` of layer4..conv1;
    # the stem's bn1 trains only with all 5)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: int(trainable_layers)]
    if int(trainable_layers) < 5:
        for name, p in model.backbone.body.named_parameters():
            if not any(name.startswith(s) for s in stages):
                p.requires_grad_(False)
    model.transform = _transform_cls()(
        min_size, int(max_size), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], min_size_test
    )
    if head == "cascade":
        C = model.backbone.out_channels
        if arch == "resnet50_v2":
            heads = [FastRCNNConvFCHead((C, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d) for _ in cascade_ious]
            rep = 1024
        else:
            heads = [TwoMLPHead(C * 7 * 7, rep) for _ in cascade_ious]
        preds = [CascadePredictor(rep, num_classes) for _ in cascade_ious]
        model.roi_heads = CascadeRoIHeads.from_roi_heads(
            model.roi_heads, heads, preds, cascade_ious, cascade_weights, drop_loss, drop_iou
        )
    else:
        model.roi_heads = DropLossRoIHeads.from_roi_heads(model.roi_heads, drop_loss, drop_iou)
    model.nbs_arch, model.nbs_head = arch, head
    return model


def set_drop_loss(model, enabled: bool) -> None:
    """Switch DropLoss on a (possibly DDP-wrapped) model."""
    getattr(model, "module", model).roi_heads.drop_loss = bool(enabled)

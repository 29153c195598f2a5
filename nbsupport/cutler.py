"""CutLER on torchvision: a class-agnostic Mask R-CNN trained on MaskCut pseudo-masks (thesis 1.2, 3.3, 5;
Tables 1-2).

The reference (facebookresearch/CutLER, a detectron2 fork) is rebuilt on ``torchvision.models.detection``:

* :func:`build_model` - Mask R-CNN R50-FPN (v1 or v2) with the reference settings: one foreground class,
  test score threshold 0, 100 detections, RPN post-NMS top-k 4000 (train) and NMS 0.65, multi-scale
  training short side, all backbone layers trainable, BatchNorm trained (SyncBN only with > 1 process).
  torchvision has no Cascade head, so there is none here (COCO AP50 21.1 vs 21.9 in the CutLER paper).
* :class:`DropLossRoIHeads` - DropLoss: the classification loss of a sampled RoI counts only when its
  *predicted* box has max IoU > 0.01 with some pseudo ground-truth box; mean over all RoIs, not
  renormalised; box and mask losses unchanged. ``drop_loss=False`` gives torchvision's loss exactly.
* :func:`copy_paste` - donor = the reversed batch, 1..n-1 donor instances, donor rescaled by U(0.3, 1),
  placed at a random offset; occluded target masks lose the pasted pixels, fully hidden ones are dropped,
  boxes recomputed from masks. Runs on the tensors' device (GPU in training).
* :class:`PseudoMaskDataset` - COCO-format pseudo-masks (MaskCut JSON) with bad-input handling.
* training engine, prediction, self-training and the thesis experiment sets / evaluation splits live in
  :mod:`nbsupport.cutler_engine` and are re-exported here.

Images are float ``[3, H, W]`` in 0..1 (the model normalises); targets are dicts with ``boxes`` float
``[N, 4]`` (x0, y0, x1, y1, pixel-edge convention), ``labels`` int64 ``[N]`` (all 1), ``masks`` uint8
``[N, H, W]``.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_MIN_SIZES = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)
ARCHS = ("resnet50", "resnet50_v2", "resnet18", "resnet34")


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
# DropLoss


def droploss_fastrcnn_loss(class_logits, box_regression, labels, regression_targets, proposals, gt_boxes,
                           box_coder, drop_iou: float = 0.01, enabled: bool = True):
    """Fast R-CNN losses with DropLoss (CutLER eq. 2).

    ``class_logits`` ``[R, C]``, ``box_regression`` ``[R, 4C]`` for all sampled RoIs of the batch;
    ``labels`` / ``regression_targets`` / ``proposals`` per image (lists, ``[R_i]``, ``[R_i, 4]``,
    ``[R_i, 4]``); ``gt_boxes`` per image ``[G_i, 4]``. The predicted box of a RoI is its proposal decoded
    with the deltas of its highest-scoring foreground class (class 1 when class-agnostic). Weight
    ``w = max IoU(pred, GT) > drop_iou``; ``loss_cls = sum(w * CE) / R``. The box loss is torchvision's.
    Returns ``(loss_cls, loss_box, keep bool [R] or None)``.
    """
    from torchvision.models.detection.roi_heads import fastrcnn_loss
    from torchvision.ops import box_iou

    loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    if not enabled:
        return loss_cls, loss_box, None
    R, C = class_logits.shape
    with torch.no_grad():
        reg = box_regression.reshape(R, -1, 4).float()
        if reg.shape[1] == 1:
            deltas = reg[:, 0]
        else:
            cls = class_logits[:, 1:].float().argmax(1) + 1 if C > 2 else torch.ones(R, dtype=torch.long, device=reg.device)
            deltas = reg[torch.arange(R, device=reg.device), cls]
        pred = box_coder.decode(deltas, [p.float() for p in proposals]).reshape(R, 4)
        keep = torch.zeros(R, dtype=torch.bool, device=reg.device)
        start = 0
        for p, g in zip(proposals, gt_boxes):
            n = p.shape[0]
            if n and g.numel():
                keep[start:start + n] = box_iou(pred[start:start + n], g.float()).max(1).values > drop_iou
            start += n
    ce = F.cross_entropy(class_logits, torch.cat(labels), reduction="none")
    loss_cls = (ce * keep.to(ce.dtype)).sum() / max(R, 1)
    return loss_cls, loss_box, keep


def _roi_heads_base():
    from torchvision.models.detection.roi_heads import RoIHeads

    return RoIHeads


class DropLossRoIHeads(_roi_heads_base()):
    """torchvision ``RoIHeads`` whose training forward uses :func:`droploss_fastrcnn_loss`.

    ``drop_loss`` (bool) switches DropLoss (off in self-training); ``drop_iou`` is the threshold (0.01).
    The last batch's keep mask is stored in ``last_keep`` (for tests and logging). Inference is
    torchvision's unchanged.
    """

    drop_loss: bool = True
    drop_iou: float = 0.01

    @classmethod
    def from_roi_heads(cls, rh, drop_loss: bool = True, drop_iou: float = 0.01) -> "DropLossRoIHeads":
        new = cls(rh.box_roi_pool, rh.box_head, rh.box_predictor, rh.proposal_matcher.high_threshold,
                  rh.proposal_matcher.low_threshold, rh.fg_bg_sampler.batch_size_per_image,
                  rh.fg_bg_sampler.positive_fraction, rh.box_coder.weights, rh.score_thresh, rh.nms_thresh,
                  rh.detections_per_img, rh.mask_roi_pool, rh.mask_head, rh.mask_predictor)
        new.drop_loss, new.drop_iou = bool(drop_loss), float(drop_iou)
        new.last_keep = None
        return new

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        from torchvision.models.detection.roi_heads import maskrcnn_loss

        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_cls, loss_box, keep = droploss_fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets, proposals, [t["boxes"] for t in targets],
            self.box_coder, self.drop_iou, self.drop_loss)
        self.last_keep = keep
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if self.has_mask():
            mask_proposals, pos_idx = [], []
            for p, lab, mi in zip(proposals, labels, matched_idxs):
                pos = torch.where(lab > 0)[0]
                mask_proposals.append(p[pos])
                pos_idx.append(mi[pos])
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets], pos_idx)
        return [], losses


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
                k = k[len(pre):]
        if not k.startswith("fc."):
            out[k] = v
    return out


def load_backbone_weights(model, path) -> dict:
    """Load ResNet weights (e.g. DINO ResNet-50 ``dino_resnet50_pretrain.pth`` or a torchvision ResNet state
    dict) into ``model.backbone.body`` with ``torch.load(weights_only=True)``. Prefixes ``module.``,
    ``backbone.`` and wrappers ``state_dict``/``model``/``teacher`` are stripped, ``fc.*`` ignored.
    Raises when no tensor matches (wrong file). Returns ``{"loaded", "missing", "unexpected"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found (give a ResNet state dict, e.g. DINO "
                                "ResNet-50 dino_resnet50_pretrain.pth, or weights=None for random init)")
    sd = _strip(torch.load(path, map_location="cpu", weights_only=True))
    body = model.backbone.body
    own = body.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"backbone weights {path}: no tensor matches the ResNet body "
                         f"(first keys: {list(sd)[:5]})")
    missing, unexpected = body.load_state_dict(usable, strict=False)
    bad = sorted(set(sd) - set(usable))
    return {"loaded": len(usable), "missing": list(missing), "unexpected": bad + list(unexpected)}


def build_model(arch: str = "resnet50", weights=None, num_classes: int = 2, min_size=REFERENCE_MIN_SIZES,
                max_size: int = 1333, min_size_test: int = 800, drop_loss: bool = True, drop_iou: float = 0.01,
                score_thresh: float = 0.0, detections_per_img: int = 100, rpn_post_nms_top_n_train: int = 4000,
                rpn_post_nms_top_n_test: int = 1000, rpn_pre_nms_top_n_train: int = 2000,
                rpn_pre_nms_top_n_test: int = 1000, rpn_nms_thresh: float = 0.65, box_batch_size_per_image: int = 512,
                trainable_layers: int = 5, representation_size: int = 1024, **_ignored) -> nn.Module:
    """Class-agnostic Mask R-CNN with the CutLER settings (see module docstring).

    ``arch``: ``resnet50`` (torchvision ``maskrcnn_resnet50_fpn``), ``resnet50_v2`` (``..._fpn_v2``),
    ``resnet18`` / ``resnet34`` (small FPN models for tests). ``weights``: path of ResNet backbone weights
    or ``None`` (random init; nothing is downloaded). BatchNorm layers are trainable ``nn.BatchNorm2d``
    (the reference trains SyncBN with FREEZE_AT 0); ``trainable_layers`` 0..5 freezes early stages.
    ``representation_size``: width of the two-FC box head (1024 as torchvision and detectron2; smaller only
    for fast CPU tests; ``resnet50_v2`` keeps its own conv head).
    """
    import torchvision.models.detection as D
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models import resnet

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if not 0 <= int(trainable_layers) <= 5:
        raise ValueError(f"trainable_layers must be 0..5, got {trainable_layers}")
    min_size = tuple(int(s) for s in (min_size if isinstance(min_size, (list, tuple)) else [min_size]))
    kw = dict(num_classes=num_classes, min_size=min_size, max_size=int(max_size), box_score_thresh=score_thresh,
              box_detections_per_img=int(detections_per_img), rpn_post_nms_top_n_train=int(rpn_post_nms_top_n_train),
              rpn_post_nms_top_n_test=int(rpn_post_nms_top_n_test), rpn_pre_nms_top_n_train=int(rpn_pre_nms_top_n_train),
              rpn_pre_nms_top_n_test=int(rpn_pre_nms_top_n_test), rpn_nms_thresh=float(rpn_nms_thresh),
              box_batch_size_per_image=int(box_batch_size_per_image))
    if arch == "resnet50":
        model = D.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kw)
    elif arch == "resnet50_v2":
        model = D.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kw)
    else:
        body = getattr(resnet, arch)(weights=None, norm_layer=nn.BatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 5)
        model = D.MaskRCNN(backbone, **kw)
    if arch != "resnet50_v2" and int(representation_size) != 1024:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * 7 * 7, int(representation_size))
        model.roi_heads.box_predictor = FastRCNNPredictor(int(representation_size), num_classes)
    if weights is not None:
        model.nbs_weights = load_backbone_weights(model, weights)
    # freeze early stages when asked (torchvision's rule: train the last `trainable_layers` of layer4..conv1;
    # the stem's bn1 trains only with all 5)
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:int(trainable_layers)]
    if int(trainable_layers) < 5:
        for name, p in model.backbone.body.named_parameters():
            if not any(name.startswith(s) for s in stages):
                p.requires_grad_(False)
    model.transform = _transform_cls()(min_size, int(max_size), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                       min_size_test)
    model.roi_heads = DropLossRoIHeads.from_roi_heads(model.roi_heads, drop_loss, drop_iou)
    model.nbs_arch = arch
    return model


def set_drop_loss(model, enabled: bool) -> None:
    """Switch DropLoss on a (possibly DDP-wrapped) model."""
    getattr(model, "module", model).roi_heads.drop_loss = bool(enabled)


# --------------------------------------------------------------------------------------------------
# Augmentations (on the batch's device)


def _rand(gen, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of an image ``[3, H, W]`` and its masks; boxes recomputed from the masks."""
    t = dict(target)
    t["masks"] = target["masks"].flip(-1)
    t["boxes"] = masks_to_boxes(t["masks"])
    return image.flip(-1), t


def copy_paste(images: list, targets: list, scale=(0.3, 1.0), generator: torch.Generator | None = None,
               min_area: int = 1, max_cover: float | None = 0.5) -> tuple[list, list]:
    """Copy-paste augmentation as CutLER does it (thesis 3.3).

    Image ``i`` receives instances of donor ``B-1-i`` (the reversed batch; an odd batch's middle image is
    its own donor): ``k ~ U{1..max(1, n-1)}`` of the donor's ``n`` instances, chosen at random; the whole
    donor image and masks are rescaled by ``s ~ U(scale)`` and placed at a random offset (cropped at the
    border). Pasted pixels replace the target's pixels; existing masks lose them and instances left with
    fewer than ``min_area`` pixels are dropped; pasted instances empty after cropping are dropped; all
    boxes are recomputed from the masks. As in the reference, a pasted instance that would hide at least
    ``max_cover`` of an existing instance's pixels (intersection over the existing mask's area) is not
    pasted, and when none is left the image is returned unchanged (``max_cover=None``: paste them all).
    Works on the tensors' device; randomness from ``generator`` (a CPU ``torch.Generator``). Returns new
    lists (inputs are not modified).
    """
    gen = generator if generator is not None else torch.default_generator
    B = len(images)
    out_imgs, out_tgts = [], []
    for i in range(B):
        img, tgt = images[i], targets[i]
        j = B - 1 - i
        dimg, dm = images[j], targets[j]["masks"]
        n = dm.shape[0]
        if n == 0:
            out_imgs.append(img)
            out_tgts.append(dict(tgt))
            continue
        k = _randint(gen, 1, max(1, n - 1))
        pick = torch.randperm(n, generator=gen)[:k].to(dm.device)
        s = _rand(gen, *scale)
        Hd, Wd = dimg.shape[-2:]
        H, W = img.shape[-2:]
        h, w = max(1, round(Hd * s)), max(1, round(Wd * s))
        y0 = _randint(gen, 0, max(0, H - h))
        x0 = _randint(gen, 0, max(0, W - w))
        ph, pw = min(h, H - y0), min(w, W - x0)
        simg = F.interpolate(dimg[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        smask = F.interpolate(dm[pick][None].float(), size=(h, w), mode="nearest")[0] > 0.5
        pasted = torch.zeros((k, H, W), dtype=torch.bool, device=img.device)
        pasted[:, y0:y0 + ph, x0:x0 + pw] = smask[:, :ph, :pw]
        pasted = pasted[pasted.flatten(1).sum(1) >= min_area]
        if max_cover is not None and len(tgt["masks"]) and len(pasted):
            old_f = tgt["masks"].bool().flatten(1).float()
            cover = (pasted.flatten(1).float() @ old_f.T) / old_f.sum(1).clamp(min=1)[None]
            pasted = pasted[cover.max(1).values < max_cover]
        if len(pasted) == 0:
            out_imgs.append(img)
            out_tgts.append(dict(tgt))
            continue
        union = pasted.any(0)
        new_img = img.clone()
        canvas = torch.zeros_like(img)
        canvas[:, y0:y0 + ph, x0:x0 + pw] = simg[:, :ph, :pw].to(img.dtype)
        new_img = torch.where(union[None], canvas, new_img)
        old = tgt["masks"].bool() & ~union[None]
        old_keep = old.flatten(1).sum(1) >= min_area
        masks = torch.cat([old[old_keep], pasted]).to(torch.uint8)
        labels = torch.cat([tgt["labels"][old_keep], torch.ones(len(pasted), dtype=tgt["labels"].dtype,
                                                                 device=tgt["labels"].device)])
        t = {k2: v for k2, v in tgt.items() if k2 not in ("masks", "boxes", "labels")}
        t.update(masks=masks, labels=labels, boxes=masks_to_boxes(masks))
        out_imgs.append(new_img)
        out_tgts.append(t)
    return out_imgs, out_tgts


def augment_batch(images, targets, generator, flip: bool = True, do_copy_paste: bool = True, scale=(0.3, 1.0),
                  max_cover: float | None = 0.5):
    """Training augmentations on the device: random horizontal flip (p = 0.5) then copy-paste."""
    if flip:
        pairs = [hflip(im, t) if _rand(generator) < 0.5 else (im, t) for im, t in zip(images, targets)]
        images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    if do_copy_paste:
        images, targets = copy_paste(images, targets, scale, generator, max_cover=max_cover)
    return list(images), list(targets)


# --------------------------------------------------------------------------------------------------
# Data


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def read_coco_json(path) -> dict:
    """A COCO instances dict from ``path`` with a clear error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"annotation file {path} is empty (0 bytes): expected a COCO instances JSON "
                         "(MaskCut writes one with `python -m nbsupport maskcut`)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"annotation file {path} is not a COCO instances file (no 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [{"id": 1, "name": "fg", "supercategory": "fg"}])
    return data


class PseudoMaskDataset(torch.utils.data.Dataset):
    """COCO-format (pseudo-)instances for training and prediction.

    Bad input never stops a run: images without annotations are skipped in training (``train=True``,
    as detectron2 does) and kept for prediction; annotations without a segmentation, with an RLE whose size
    differs from the image, or whose mask is empty inside the image (e.g. a polygon entirely outside it)
    are dropped; zero-width/height boxes are replaced by the box of the mask; a corrupt or unreadable image
    makes ``__getitem__`` return ``None`` (dropped by :func:`collate`). Each problem is warned about once
    with the file and counted in ``problems``. Items: ``(image float [3, H, W] in 0..1, target)``.
    """

    def __init__(self, ann_file, image_root=None, train: bool = True, data: dict | None = None):
        self.ann_file = Path(ann_file) if ann_file is not None else None
        self.data = data if data is not None else read_coco_json(ann_file)
        self.image_root = Path(image_root) if image_root is not None else (
            self.ann_file.parent / "images" if self.ann_file else Path("."))
        self.train = train
        self.problems = Counter()
        by_img: dict[int, list] = {}
        for a in self.data["annotations"]:
            if a.get("iscrowd", 0):
                continue
            if "segmentation" not in a or not a["segmentation"]:
                self._problem("annotation without segmentation", f"annotation {a.get('id')}")
                continue
            by_img.setdefault(a.get("image_id"), []).append(a)
        if not self.data["annotations"]:
            _warn(f"{self.ann_file}: no annotations at all" + (" - nothing to train on" if train else ""))
        self.records = []
        for im in self.data["images"]:
            anns = by_img.get(im["id"], [])
            if train and not anns:
                self.problems["image without annotations"] += 1
                continue
            self.records.append((im, anns))
        if self.problems["image without annotations"]:
            _warn(f"{self.ann_file}: skipped {self.problems['image without annotations']} images without "
                  "annotations")
        if train and not self.records:
            raise ValueError(f"{self.ann_file}: no image with annotations to train on "
                             f"({len(self.data['images'])} images, {len(self.data['annotations'])} annotations)")

    def _problem(self, kind: str, where: str) -> None:
        if self.problems[kind] == 0:
            _warn(f"{self.ann_file}: {kind} ({where}); such items are skipped/fixed and counted in .problems")
        self.problems[kind] += 1

    def __len__(self):
        return len(self.records)

    def image_ids(self) -> list[int]:
        return [im["id"] for im, _ in self.records]

    def decode_masks(self, info: dict, anns: list) -> tuple[np.ndarray, list]:
        """uint8 ``[N, H, W]`` masks of the usable annotations and the annotations kept."""
        H, W = int(info["height"]), int(info["width"])
        masks, kept = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2 copy= notice
            for a in anns:
                self._decode_one(a, H, W, masks, kept)
        arr = np.stack(masks) if masks else np.zeros((0, H, W), np.uint8)
        return arr, kept

    def _decode_one(self, a, H, W, masks, kept):
        from pycocotools import mask as mu

        seg = a["segmentation"]
        try:
            if isinstance(seg, list):
                polys = [p for p in seg if len(p) >= 6]
                if not polys:
                    raise ValueError("polygon with < 3 points")
                m = mu.decode(mu.merge(mu.frPyObjects(polys, H, W)))
            else:
                rle = seg
                if list(rle.get("size", [])) != [H, W]:
                    self._problem("RLE size differs from the image size", f"annotation {a.get('id')}, "
                                  f"RLE {rle.get('size')} vs image {[H, W]}")
                    return
                if isinstance(rle.get("counts"), list):
                    rle = mu.frPyObjects(rle, H, W)
                m = mu.decode(rle)
        except Exception as e:  # noqa: BLE001 - a broken annotation must not stop training
            self._problem("undecodable segmentation", f"annotation {a.get('id')}: {e}")
            return
        if not m.any():
            self._problem("empty mask (outside the image?)", f"annotation {a.get('id')}")
            return
        bw, bh = (a.get("bbox") or [0, 0, 0, 0])[2:4]
        if bw <= 0 or bh <= 0:
            self._problem("degenerate box (zero width/height), replaced by the mask's box", f"annotation {a.get('id')}")
        masks.append(m)
        kept.append(a)

    def __getitem__(self, i):
        from nbsupport.data import ImageLoadError, load_image

        info, anns = self.records[i]
        path = self.image_root / info["file_name"]
        try:
            img = load_image(path)
        except (ImageLoadError, OSError, ValueError) as e:
            self._problem("unreadable image", str(path))
            _warn(f"skipping unreadable image {path}: {e}")
            return None
        if (img.height, img.width) != (int(info["height"]), int(info["width"])):
            self._problem("image size differs from the JSON", f"{path}: file {img.height}x{img.width}, "
                          f"JSON {info['height']}x{info['width']}")
            return None
        masks, _ = self.decode_masks(info, anns)
        if self.train and len(masks) == 0:
            return None
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        m = torch.from_numpy(masks)
        target = {"masks": m, "boxes": masks_to_boxes(m), "labels": torch.ones(len(m), dtype=torch.int64),
                  "image_id": int(info["id"])}
        return image, target


def collate(batch):
    """List collate that drops ``None`` items (unreadable images): ``(images, targets)`` lists."""
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], [b[1] for b in batch]


class StreamSampler(torch.utils.data.Sampler):
    """Infinite, resumable stream of dataset indices for iteration-based training.

    Epoch ``e`` is a ``DistributedSampler(shuffle=True, seed=seed)`` permutation with ``set_epoch(e)``
    (this rank's shard); the stream starts at position ``start`` (= iteration x per-rank batch), so a run
    resumed at iteration ``k`` sees exactly the images it would have seen without the interruption.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world_size, start
        self.per_rank = math.ceil(n / world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        from torch.utils.data.distributed import DistributedSampler

        ds = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.seed)
        ds.set_epoch(epoch)
        return list(ds)

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self):  # effectively infinite
        return 2 ** 62


def aspect_groups(dataset) -> list[int]:
    """Aspect-ratio group per dataset item (0: width >= height, 1: portrait), from the COCO ``width`` /
    ``height`` of each record (items without them go to group 0)."""
    out = []
    for im, _ in dataset.records:
        w, h = im.get("width"), im.get("height")
        out.append(int(bool(w and h and h > w)))
    return out


class GroupedStreamBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices from an infinite index stream, each batch from one aspect-ratio
    group (as detectron2's ``AspectRatioGroupedDataset`` / torchvision's ``GroupedBatchSampler``): the
    stream is read in order, each index goes to its group's buffer, a full buffer is emitted. Images of a
    batch then share an orientation and the padded batch tensor wastes less memory.

    Resumable: batches are a deterministic function of the stream, so ``skip`` batches are regenerated
    (indices only, no image is loaded) and dropped; a run resumed at iteration ``k`` (``skip=k``) sees the
    same batches as one never interrupted.
    """

    def __init__(self, stream, groups, batch_size: int, skip: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream, self.groups, self.batch_size, self.skip = stream, list(groups), batch_size, skip

    def __iter__(self):
        buffers: dict[int, list[int]] = {}
        emitted = 0
        for i in self.stream:
            buf = buffers.setdefault(self.groups[i], [])
            buf.append(i)
            if len(buf) == self.batch_size:
                if emitted >= self.skip:
                    yield list(buf)
                emitted += 1
                buf.clear()

    def __len__(self):  # effectively infinite
        return 2 ** 62


# --------------------------------------------------------------------------------------------------
# Engine (training, prediction, self-training, experiments, CLI): nbsupport.cutler_engine, re-exported
# lazily (module __getattr__) so that either module can be imported first.

_ENGINE = ("CONFIG_DIR", "add_cli", "build_training_set", "evaluate", "evaluate_splits", "load_config",
           "load_trained", "main", "maskcut_filter", "overlap_flags", "predict", "read_metrics",
           "selftrain_annotations", "split_by_overlap", "train")


def __getattr__(name):
    if name in _ENGINE:
        from nbsupport import cutler_engine

        return getattr(cutler_engine, name)
    raise AttributeError(f"module 'nbsupport.cutler' has no attribute {name!r}")


__all__ = [
    "REFERENCE_MIN_SIZES", "ARCHS", "masks_to_boxes", "droploss_fastrcnn_loss", "DropLossRoIHeads",
    "load_backbone_weights", "build_model", "set_drop_loss", "hflip", "copy_paste", "augment_batch",
    "read_coco_json", "PseudoMaskDataset", "collate", "StreamSampler", *_ENGINE,
]

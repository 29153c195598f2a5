"""CutLER's RoI heads on torchvision: DropLoss (CutLER eq. 2) on the plain Mask R-CNN head, a Cascade Mask
R-CNN head with DropLoss in every stage (CutLER's ``CustomCascadeROIHeads``), and detectron2's RoI pooler
(``ROIAlignV2``) that the released CutLER models were trained with.

The cascade follows detectron2's ``CascadeROIHeads`` as CutLER configures it: three class-agnostic box stages
matched at IoU 0.5 / 0.6 / 0.7 with box-delta weights (10, 10, 5, 5) / (20, 20, 10, 10) / (30, 30, 15, 15);
stage 1 trains on the sampled RPN proposals (512 per image, 25 % foreground, ground truth appended), stage
``k > 1`` on the boxes stage ``k - 1`` predicted for them (detached, clipped, empty ones dropped, no
resampling); the pooled features' gradient is scaled by 1 / stages (the stage losses add up); the mask head
trains on stage 1's foreground proposals. At inference every stage rescores the previous stage's boxes, the
class scores are averaged over the stages and the last stage's boxes are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align

#: CutLER's cascade (detectron2's ``ROI_BOX_CASCADE_HEAD`` defaults): match IoU and box-delta weights per stage.
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))

# --------------------------------------------------------------------------------------------------
# DropLoss


def droploss_fastrcnn_loss(
    class_logits,
    box_regression,
    labels,
    regression_targets,
    proposals,
    gt_boxes,
    box_coder,
    drop_iou: float = 0.01,
    enabled: bool = True,
):
    """Fast R-CNN losses with DropLoss (CutLER eq. 2).

    ``class_logits`` ``[R, C]``, ``box_regression`` ``[R, 4C]`` (class-specific, torchvision's head) or
    ``[R, 4]`` (class-agnostic, a cascade stage) for all sampled RoIs of the batch; ``labels`` /
    ``regression_targets`` / ``proposals`` per image (lists, ``[R_i]``, ``[R_i, 4]``, ``[R_i, 4]``);
    ``gt_boxes`` per image ``[G_i, 4]``. The predicted box of a RoI is its proposal decoded with the deltas of
    its highest-scoring foreground class (class 1 when class-agnostic). Weight ``w = max IoU(pred, GT) >
    drop_iou``; ``loss_cls = sum(w * CE) / R``. The box loss is torchvision's (smooth L1, beta 1/9, summed
    over foreground RoIs, divided by R) for both layouts. Returns ``(loss_cls, loss_box, keep bool [R] or
    None)``.
    """
    R, C = class_logits.shape
    reg = box_regression.reshape(R, -1, 4)
    if reg.shape[1] > 1:
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
    else:  # class-agnostic deltas: the same losses with the one set of deltas for every class
        lab, tgt = torch.cat(labels), torch.cat(regression_targets)
        pos = torch.where(lab > 0)[0]
        loss_cls = F.cross_entropy(class_logits, lab)
        loss_box = F.smooth_l1_loss(reg[pos, 0], tgt[pos], beta=1 / 9, reduction="sum") / max(lab.numel(), 1)
    if not enabled:
        return loss_cls, loss_box, None
    with torch.no_grad():
        regf = reg.float()
        if regf.shape[1] == 1:
            deltas = regf[:, 0]
        else:
            cls = (
                class_logits[:, 1:].float().argmax(1) + 1
                if C > 2
                else torch.ones(R, dtype=torch.long, device=reg.device)
            )
            deltas = regf[torch.arange(R, device=reg.device), cls]
        pred = box_coder.decode(deltas, [p.float() for p in proposals]).reshape(R, 4)
        keep = torch.zeros(R, dtype=torch.bool, device=reg.device)
        start = 0
        for p, g in zip(proposals, gt_boxes):
            n = p.shape[0]
            if n and g.numel():
                keep[start : start + n] = box_iou(pred[start : start + n], g.float()).max(1).values > drop_iou
            start += n
    ce = F.cross_entropy(class_logits, torch.cat(labels), reduction="none")
    loss_cls = (ce * keep.to(ce.dtype)).sum() / max(R, 1)
    return loss_cls, loss_box, keep


class DropLossRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose training forward uses :func:`droploss_fastrcnn_loss`.

    ``drop_loss`` (bool) switches DropLoss (off in self-training); ``drop_iou`` is the threshold (0.01).
    The last batch's keep mask is stored in ``last_keep`` (for tests and logging). Inference is
    torchvision's unchanged.
    """

    drop_loss: bool = True
    drop_iou: float = 0.01

    @classmethod
    def from_roi_heads(cls, rh, drop_loss: bool = True, drop_iou: float = 0.01) -> "DropLossRoIHeads":
        new = cls(
            rh.box_roi_pool,
            rh.box_head,
            rh.box_predictor,
            rh.proposal_matcher.high_threshold,
            rh.proposal_matcher.low_threshold,
            rh.fg_bg_sampler.batch_size_per_image,
            rh.fg_bg_sampler.positive_fraction,
            rh.box_coder.weights,
            rh.score_thresh,
            rh.nms_thresh,
            rh.detections_per_img,
            rh.mask_roi_pool,
            rh.mask_head,
            rh.mask_predictor,
        )
        new.drop_loss, new.drop_iou = bool(drop_loss), float(drop_iou)
        new.last_keep = None
        return new

    def _mask_loss(self, features, proposals, labels, matched_idxs, image_shapes, targets) -> dict:
        """torchvision's mask loss on the foreground RoIs of ``proposals`` (empty dict without a mask head)."""
        if not self.has_mask():
            return {}
        mask_proposals, pos_idx = [], []
        for p, lab, mi in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            mask_proposals.append(p[pos])
            pos_idx.append(mi[pos])
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        loss = maskrcnn_loss(
            mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets], pos_idx
        )
        return {"loss_mask": loss}

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_cls, loss_box, keep = droploss_fastrcnn_loss(
            class_logits,
            box_regression,
            labels,
            regression_targets,
            proposals,
            [t["boxes"] for t in targets],
            self.box_coder,
            self.drop_iou,
            self.drop_loss,
        )
        self.last_keep = keep
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        losses.update(self._mask_loss(features, proposals, labels, matched_idxs, image_shapes, targets))
        return [], losses


# --------------------------------------------------------------------------------------------------
# detectron2's RoI pooler


class RoIAlignV2Pooler(nn.Module):
    """Multi-level RoIAlign as detectron2's ``ROIPooler(pooler_type="ROIAlignV2", sampling_ratio=0)``: each box
    goes to FPN level ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to the levels present, and is pooled
    with the half-pixel correction (``aligned=True``) and an adaptive number of samples per bin. torchvision's
    ``MultiScaleRoIAlign`` uses ``aligned=False`` and 2 samples; the released CutLER weights expect this one.
    Called as torchvision's pooler: ``(features dict, boxes per image, image sizes)``."""

    def __init__(self, featmap_names=("0", "1", "2", "3"), output_size: int = 7, strides=(4, 8, 16, 32)):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(math.log2(strides[0])))
        self.max_level = self.min_level + len(strides) - 1

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """The index (0 = finest) of the FPN level each box ``[K, 4]`` is pooled from."""
        size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8))
        return (lvl.clamp(self.min_level, self.max_level) - self.min_level).to(torch.int64)

    def forward(self, x: dict, boxes: list, image_shapes=None) -> torch.Tensor:
        feats = [x[n] for n in self.featmap_names]
        all_boxes = torch.cat(boxes)
        ids = torch.cat([torch.full((len(b), 1), i, dtype=all_boxes.dtype, device=all_boxes.device)
                         for i, b in enumerate(boxes)])  # fmt: skip
        rois = torch.cat([ids, all_boxes], 1)
        C = feats[0].shape[1]
        out = feats[0].new_zeros((len(rois), C, *self.output_size))
        if len(rois) == 0:
            return out
        lvl = self.levels(all_boxes)
        for k, (f, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(lvl == k)[0]
            if len(idx):
                pooled = roi_align(f, rois[idx], self.output_size, scale, 0, aligned=True)
                out.index_copy_(0, idx, pooled.to(out.dtype))
        return out


# --------------------------------------------------------------------------------------------------
# Cascade


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward (detectron2 scales the pooled features' gradient
    by 1 / stages so that summing the stage losses does not multiply the backbone's gradient)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class CascadePredictor(nn.Module):
    """A cascade stage's class-agnostic box predictor: ``cls_score`` (background + ``num_classes - 1``
    foreground, torchvision's order: background first) and ``bbox_pred`` (4 deltas shared by every class), with
    detectron2's initialisation (normal std 0.01 / 0.001, zero biases)."""

    def __init__(self, in_channels: int, num_classes: int = 2):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def stage_targets(proposals, targets, iou: float, box_coder: BoxCoder):
    """Labels and box targets of a later cascade stage: each proposal (per image ``[R_i, 4]``) takes the label of
    its best-overlapping ground-truth box if that IoU is ``>= iou`` and is background (0) otherwise (detectron2's
    ``Matcher([iou], [0, 1])``, no low-quality matches); regression targets are encoded against the matched box
    with the stage's ``box_coder``. Returns ``(labels [R_i] int64, matched gt index [R_i], targets [R_i, 4])``
    lists (an image without ground truth: all background, zero targets)."""
    labels, matched, regs = [], [], []
    for p, t in zip(proposals, targets):
        g = t["boxes"].to(p.dtype)
        if g.numel() == 0:
            labels.append(torch.zeros(len(p), dtype=torch.int64, device=p.device))
            matched.append(torch.zeros(len(p), dtype=torch.int64, device=p.device))
            regs.append(torch.zeros_like(p))
            continue
        best, idx = box_iou(g, p).max(0)
        lab = t["labels"][idx].to(torch.int64)
        lab = torch.where(best >= iou, lab, torch.zeros_like(lab))
        labels.append(lab)
        matched.append(idx)
        regs.append(box_coder.encode_single(g[idx], p))
    return labels, matched, regs


class CascadeRoIHeads(DropLossRoIHeads):
    """Cascade Mask R-CNN RoI heads (see the module docstring) on torchvision's ``RoIHeads``: ``box_head`` and
    ``box_predictor`` are ``ModuleList`` s of one head and one :class:`CascadePredictor` per stage,
    ``stage_ious`` / ``stage_coders`` the match IoU and box coder of each. DropLoss (``drop_loss``,
    ``drop_iou``) weights every stage's classification loss by its own predicted boxes. Training losses:
    ``loss_classifier_stage<k>``, ``loss_box_reg_stage<k>`` (k = 0, 1, 2) and ``loss_mask``; ``last_keep``
    holds each stage's DropLoss keep mask."""

    @classmethod
    def from_roi_heads(
        cls, rh, box_heads, box_predictors, ious=CASCADE_IOUS, weights=CASCADE_WEIGHTS,
        drop_loss: bool = True, drop_iou: float = 0.01,
    ) -> "CascadeRoIHeads":  # fmt: skip
        ious, weights = [float(i) for i in ious], [tuple(float(v) for v in w) for w in weights]
        if not (len(ious) == len(weights) == len(box_heads) == len(box_predictors) >= 1):
            raise ValueError(
                f"a cascade needs one IoU, one weight 4-tuple, one head and one predictor per stage: got "
                f"{len(ious)} IoUs, {len(weights)} weights, {len(box_heads)} heads, {len(box_predictors)} predictors"
            )
        if any(len(w) != 4 for w in weights):
            raise ValueError(f"cascade box-delta weights must be 4-tuples (wx, wy, ww, wh), got {weights}")
        new = cls(
            rh.box_roi_pool,
            nn.ModuleList(box_heads),
            nn.ModuleList(box_predictors),
            ious[0],
            ious[0],
            rh.fg_bg_sampler.batch_size_per_image,
            rh.fg_bg_sampler.positive_fraction,
            weights[0],
            rh.score_thresh,
            rh.nms_thresh,
            rh.detections_per_img,
            rh.mask_roi_pool,
            rh.mask_head,
            rh.mask_predictor,
        )
        new.stage_ious = ious
        new.stage_coders = [BoxCoder(w) for w in weights]
        new.drop_loss, new.drop_iou = bool(drop_loss), float(drop_iou)
        new.last_keep = None
        return new

    @property
    def num_stages(self) -> int:
        return len(self.box_predictor)

    def _run_stage(self, k, features, proposals, image_shapes):
        x = self.box_roi_pool(features, proposals, image_shapes)
        if self.training and self.num_stages > 1:
            x = _ScaleGradient.apply(x, 1.0 / self.num_stages)
        return self.box_predictor[k](self.box_head[k](x))

    def _stage_boxes(self, k, deltas, proposals, image_shapes, drop_empty: bool):
        """Stage ``k``'s predicted boxes per image (detached, clipped; empty ones dropped in training)."""
        boxes = self.stage_coders[k].decode(deltas.detach().float(), [p.float() for p in proposals]).reshape(-1, 4)
        out = []
        for b, shape in zip(boxes.split([len(p) for p in proposals]), image_shapes):
            b = clip_boxes_to_image(b, shape)
            if drop_empty:
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            out.append(b)
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return self._inference(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("targets are required in training mode")
        gt_boxes = [t["boxes"] for t in targets]
        props0, matched0, labels0, regs0 = self.select_training_samples(proposals, targets)
        props, labels, regs = props0, labels0, regs0
        losses, keeps, deltas = {}, [], None
        for k in range(self.num_stages):
            if k > 0:
                props = self._stage_boxes(k - 1, deltas, props, image_shapes, drop_empty=True)
                labels, _, regs = stage_targets(props, targets, self.stage_ious[k], self.stage_coders[k])
            logits, deltas = self._run_stage(k, features, props, image_shapes)
            loss_cls, loss_box, keep = droploss_fastrcnn_loss(
                logits, deltas, labels, regs, props, gt_boxes, self.stage_coders[k], self.drop_iou, self.drop_loss
            )
            losses[f"loss_classifier_stage{k}"] = loss_cls
            losses[f"loss_box_reg_stage{k}"] = loss_box
            keeps.append(keep)
        self.last_keep = keeps
        losses.update(self._mask_loss(features, props0, labels0, matched0, image_shapes, targets))
        return [], losses

    @torch.no_grad()
    def _inference(self, features, proposals, image_shapes) -> list[dict]:
        props, probs, deltas = proposals, None, None
        for k in range(self.num_stages):
            if k > 0:
                props = self._stage_boxes(k - 1, deltas, props, image_shapes, drop_empty=False)
            logits, deltas = self._run_stage(k, features, props, image_shapes)
            p = F.softmax(logits.float(), -1)
            probs = p if probs is None else probs + p
        probs = probs / self.num_stages
        boxes = self._stage_boxes(self.num_stages - 1, deltas, props, image_shapes, drop_empty=False)
        result = []
        for b, s in zip(boxes, probs.split([len(p) for p in props])):
            n_fg = s.shape[1] - 1
            scores = s[:, 1:].reshape(-1)
            lab = torch.arange(1, n_fg + 1, device=s.device).repeat(len(b))
            bx = b.repeat_interleave(n_fg, 0) if n_fg > 1 else b
            keep = torch.where(scores > self.score_thresh)[0]
            bx, scores, lab = bx[keep], scores[keep], lab[keep]
            keep = remove_small_boxes(bx, min_size=1e-2)
            bx, scores, lab = bx[keep], scores[keep], lab[keep]
            keep = batched_nms(bx, scores, lab, self.nms_thresh)[: self.detections_per_img]
            result.append({"boxes": bx[keep], "scores": scores[keep], "labels": lab[keep]})
        if self.has_mask():
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes))
            )
            for m, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = m
        return result

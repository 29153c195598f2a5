"""detectron2 checkpoints as CutLER releases them: reading them without running code from them, and their key
layout mapped onto this package's torchvision model.

Facts (facebookresearch/detectron2, CutLER's ``model_zoo/configs/CutLER-ImageNet/*.yaml``):

- a checkpoint is a pickled dict whose ``model`` maps detectron2 names to arrays: numpy arrays in model-zoo
  style files (a plain pickle, or ``torch.save`` of numpy arrays), tensors in ``torch.save`` ones;
- backbone ``backbone.bottom_up.stem.conv1`` (+ ``.norm``), ``backbone.bottom_up.res{2..5}.<i>.conv{1,2,3}``
  (+ ``.norm``) and ``.shortcut`` (+ ``.norm``); CutLER's ResNet has ``STRIDE_IN_1X1: False`` (the stride in
  the 3x3 conv, as torchvision's) and SyncBN everywhere, FPN included: ``backbone.fpn_lateral{2..5}`` /
  ``backbone.fpn_output{2..5}`` are bias-free convs with a ``.norm``;
- ``proposal_generator.rpn_head.{conv, objectness_logits, anchor_deltas}`` (3 anchors per location in the
  same order as torchvision's: aspect ratios 0.5, 1, 2 of one size per level);
- ``roi_heads.box_head.fc{1,2}`` and ``roi_heads.box_predictor.{cls_score, bbox_pred}`` (Mask R-CNN), or
  ``roi_heads.box_head.<k>.fc{1,2}`` / ``roi_heads.box_predictor.<k>.*`` for the cascade's stages k = 0, 1, 2;
  ``cls_score`` puts background *last* (torchvision: first); ``bbox_pred`` is class-agnostic (4 rows) in
  the cascade and has 4 rows per foreground class otherwise (torchvision: also 4 for background);
- ``roi_heads.mask_head.mask_fcn{1..4}``, ``.deconv``, ``.predictor`` (one mask per foreground class);
- input: CutLER trains on **RGB** with ``PIXEL_MEAN`` [123.675, 116.28, 103.53] and ``PIXEL_STD`` [58.395,
  57.12, 57.375] on 0..255 pixels: exactly torchvision's ImageNet normalisation of 0..1 RGB, so the first
  conv is taken as it is. detectron2's own default is BGR (``input_format="BGR"`` flips the first conv's
  input channels); a file that stores ``pixel_mean`` tells its order itself.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from nbsupport.models import checkpoints

#: CutLER's pixel mean (RGB, 0..255); detectron2's BGR default is the same reversed.
RGB_MEAN = (123.675, 116.28, 103.53)

# --------------------------------------------------------------------------------------------------
# Reading


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, allowed only for latin-1."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"checkpoint asks for _codecs.encode with {encoding!r}: refused")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict:
    """The numpy (and helper) globals an array pickle names, by (module, name): numpy 1's and 2's names."""
    core = getattr(np, "_core", None) or np.core
    out = {("_codecs", "encode"): _latin1_encode, ("collections", "OrderedDict"): collections.OrderedDict}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        out[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        out[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    return out


_NUMPY = _numpy_globals()


class _Placeholder:
    """Stands in for any other class a checkpoint names (optimiser or scheduler state): keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _PickleReader(pickle.Unpickler):
    """A plain pickle allowing only numpy arrays and plain containers; anything else is a placeholder."""

    def find_class(self, module, name):
        return _NUMPY.get((module, name), _Placeholder)


class _ZipReader(checkpoints._RestrictedUnpickler):
    """The project's restricted reader of ``torch.save`` archives, also accepting numpy arrays (``torch.save``
    of a dict of numpy arrays pickles them inline)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY:
            return _NUMPY[(module, name)]
        return super().find_class(module, name)


def read_detectron2(path) -> dict:
    """The top-level dict of a detectron2 checkpoint (``torch.save`` zip archive or plain pickle), read without
    executing anything from it: only tensors, numpy arrays and plain containers are rebuilt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detectron2 checkpoint {path} not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if not pkl:
                raise checkpoints.CheckpointError(f"{path}: a zip without data.pkl is not a torch checkpoint")
            prefix = pkl[0][: -len("/data.pkl")]
            obj = _ZipReader(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
    else:
        with open(path, "rb") as f:
            try:
                obj = _PickleReader(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
                raise checkpoints.CheckpointError(f"{path}: not a readable checkpoint pickle ({e})") from e
    if not isinstance(obj, dict):
        raise checkpoints.CheckpointError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict")
    return obj


def as_tensors(state: dict, where="checkpoint") -> dict[str, torch.Tensor]:
    """``state`` (numpy arrays or tensors) as tensors; anything else is an error naming the key."""
    out = {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise checkpoints.CheckpointError(f"{where}: {k} is an object array, not weights")
            v = torch.from_numpy(v if v.flags.c_contiguous else v.copy(order="C"))
        elif isinstance(v, np.generic):
            v = torch.tensor(v.item())
        if not torch.is_tensor(v):
            raise checkpoints.CheckpointError(f"{where}: {k} is a {type(v).__name__}, not an array")
        out[k] = v
    return out


def model_state(obj: dict, where="checkpoint") -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict as tensors: its ``model`` entry (detectron2), ``blobs`` (Detectron1 /
    Caffe2 files, named so that :func:`describe` can say what they are), or the dict itself."""
    state = next((obj[k] for k in ("model", "blobs") if isinstance(obj.get(k), dict)), obj)
    return as_tensors({k: v for k, v in state.items() if not k.startswith("__")}, where)


# --------------------------------------------------------------------------------------------------
# Key layout

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: detectron2 keys that hold no weights of the model (non-persistent buffers some files still carry).
IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*)$")
C2_HINT = re.compile(r"(_w|_b|_bn_s|_bn_b|_bn_rm|_bn_riv)$|branch2[abc]")


def backbone_key(k: str) -> str | None:
    """torchvision's ResNet-body name of a detectron2 backbone key without its ``backbone.bottom_up.`` prefix
    (``stem.conv1.norm.weight`` -> ``bn1.weight``, ``res3.0.shortcut.norm.bias`` -> ``layer2.0.downsample.1.bias``),
    or None when it is not one."""
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", k)
    if m:
        return "conv1.weight" if m.group(2) is None else f"bn1.{m.group(2)}"
    m = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(weight|norm\.(\w+))", k)
    if not m:
        return None
    stage, block, layer, _, norm = m.groups()
    pre = f"layer{int(stage) - 1}.{block}."
    if layer == "shortcut":
        return pre + ("downsample.0.weight" if norm is None else f"downsample.1.{norm}")
    j = layer[-1]
    return pre + (f"conv{j}.weight" if norm is None else f"bn{j}.{norm}")


def _fpn_key(kind: str, level: str, rest: str) -> str:
    blocks = "inner_blocks" if kind == "lateral" else "layer_blocks"
    i = int(level) - 2
    if rest.startswith("norm."):
        return f"backbone.fpn.{blocks}.{i}.1.{rest[5:]}"
    return f"backbone.fpn.{blocks}.{i}.0.{rest}"


def torchvision_key(k: str) -> str | None:
    """The key of this package's model (:func:`~nbsupport.training.cutler.model.build_model`) that detectron2
    key ``k`` of a CutLER checkpoint fills, or None for a key that has no place (the caller reports it)."""
    if k.startswith("backbone.bottom_up."):
        b = backbone_key(k[len("backbone.bottom_up.") :])
        return None if b is None else f"backbone.body.{b}"
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)([2-5])\.(.+)", k)
    if m:
        return _fpn_key(*m.groups())
    m = re.fullmatch(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)", k)
    if m:
        name = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}[m.group(1)]
        return f"rpn.head.{name}.{m.group(2)}"
    m = re.fullmatch(r"roi_heads\.box_head\.(?:(\d+)\.)?fc([12])\.(weight|bias)", k)
    if m:
        stage = "" if m.group(1) is None else f"{m.group(1)}."
        return f"roi_heads.box_head.{stage}fc{5 + int(m.group(2))}.{m.group(3)}"
    m = re.fullmatch(r"roi_heads\.box_predictor\.(?:(\d+)\.)?(cls_score|bbox_pred)\.(weight|bias)", k)
    if m:
        stage = "" if m.group(1) is None else f"{m.group(1)}."
        return f"roi_heads.box_predictor.{stage}{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"roi_heads\.mask_head\.(mask_fcn([1-4])|deconv|predictor)\.(weight|bias)", k)
    if m:
        if m.group(2):
            return f"roi_heads.mask_head.{int(m.group(2)) - 1}.0.{m.group(3)}"
        name = "conv5_mask" if m.group(1) == "deconv" else "mask_fcn_logits"
        return f"roi_heads.mask_predictor.{name}.{m.group(3)}"
    return None


def describe(state: dict) -> dict:
    """What a CutLER detectron2 state dict is: ``build_model`` keywords (``arch``, ``head``, ``fpn_norm``,
    ``representation_size``, ``num_classes``, ``cascade_stages``) read from its keys and shapes. Raises a
    :class:`~nbsupport.models.checkpoints.CheckpointError` naming what does not fit (not a detectron2 R-CNN,
    Caffe2-style names, a depth other than 50)."""
    keys = set(state)
    if not any(k.startswith("backbone.bottom_up.") for k in keys):
        hint = " (Caffe2 / Detectron1 names: not a detectron2 model)" if any(C2_HINT.search(k) for k in keys) else ""
        raise checkpoints.CheckpointError(
            f"not a detectron2 R-CNN checkpoint: no backbone.bottom_up.* key{hint} (first keys: {sorted(keys)[:4]})"
        )
    blocks = [len({k.split(".")[3] for k in keys if k.startswith(f"backbone.bottom_up.res{s}.")}) for s in range(2, 6)]
    if blocks != [3, 4, 6, 3]:
        raise checkpoints.CheckpointError(f"ResNet blocks per stage {blocks}: only ResNet-50 ([3, 4, 6, 3]) converts")
    stages = sorted({int(m.group(1)) for k in keys if (m := re.match(r"roi_heads\.box_predictor\.(\d+)\.", k))})
    cascade = bool(stages)
    cls = state["roi_heads.box_predictor.0.cls_score.weight" if cascade else "roi_heads.box_predictor.cls_score.weight"]
    fc1 = state["roi_heads.box_head.0.fc1.weight" if cascade else "roi_heads.box_head.fc1.weight"]
    return {
        "arch": "resnet50",
        "head": "cascade" if cascade else "mask_rcnn",
        "cascade_stages": len(stages),
        "fpn_norm": "backbone.fpn_lateral2.norm.weight" in keys,
        "representation_size": int(fc1.shape[0]),
        "num_classes": int(cls.shape[0]),  # foreground classes + background, as torchvision counts
    }


def _bg_first(w: torch.Tensor) -> torch.Tensor:
    """Classifier rows from detectron2's order (foreground classes, then background) to torchvision's."""
    return torch.cat([w[-1:], w[:-1]])


def _with_background(w: torch.Tensor, per: int, n_fg: int) -> torch.Tensor:
    """Rows of one output per foreground class (``per`` rows each; a class-agnostic one repeated) with zero rows
    for torchvision's background class in front (never used: torchvision drops background predictions)."""
    if w.shape[0] == per and n_fg > 1:
        w = w.repeat(n_fg, *([1] * (w.dim() - 1)))
    return torch.cat([torch.zeros_like(w[:per]), w])


def convert(state: dict, target: dict, input_format: str = "RGB") -> tuple[dict, dict]:
    """Map a detectron2 state dict onto ``target`` (the torchvision model's ``state_dict()``): every key renamed
    (:func:`torchvision_key`), classifier rows reordered to background-first, class-specific box / mask outputs
    given torchvision's (unused) background rows, the first conv's input channels flipped when the file is
    BGR (``input_format``, or its own ``pixel_mean``). Returns ``(state dict for load_state_dict(strict=True),
    report)``; the report lists ``unexpected`` detectron2 keys (no place here), ``missing`` model keys (not in
    the file) and ``shape`` mismatches, and ``filled`` BatchNorm counters the file did not have (set to 0)."""
    if input_format not in ("RGB", "BGR"):
        raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
    mean = state.get("pixel_mean")
    if mean is not None:
        m = mean.flatten().tolist()
        input_format = "BGR" if np.allclose(m, RGB_MEAN[::-1], atol=0.5) else input_format
    n_fg = None
    out, unexpected, shape = {}, [], []
    for k, v in state.items():
        if IGNORED.match(k):
            continue
        tk = torchvision_key(k)
        if tk is None or tk not in target:
            unexpected.append(k)
            continue
        v = v.detach() if torch.is_tensor(v) else torch.as_tensor(v)
        if tk.endswith("cls_score.weight") or tk.endswith("cls_score.bias"):
            v = _bg_first(v)
            n_fg = v.shape[0] - 1
        out[tk] = v
    n_fg = n_fg or 1
    for tk, v in list(out.items()):
        want = target[tk].shape
        if tk.startswith("roi_heads.box_predictor.bbox_pred") and v.shape[0] == want[0] - 4:
            out[tk] = _with_background(v, 4, n_fg)
        elif tk.startswith("roi_heads.mask_predictor.mask_fcn_logits") and v.shape[0] == want[0] - 1:
            out[tk] = _with_background(v, 1, n_fg)
        if tuple(out[tk].shape) != tuple(want):
            shape.append(f"{tk}: file {tuple(out[tk].shape)}, model {tuple(want)}")
        out[tk] = out[tk].to(target[tk].dtype)
    if input_format == "BGR" and "backbone.body.conv1.weight" in out:
        out["backbone.body.conv1.weight"] = out["backbone.body.conv1.weight"].flip(1)
    filled = []
    for tk, v in target.items():
        if tk not in out and tk.endswith("num_batches_tracked"):
            out[tk] = torch.zeros_like(v)
            filled.append(tk)
    missing = sorted(k for k in target if k not in out)
    return out, {"unexpected": sorted(unexpected), "missing": missing, "shape": shape, "filled": filled,
                 "input_format": input_format}  # fmt: skip


def backbone_state(state: dict) -> dict:
    """The ResNet-body weights (torchvision names) of a detectron2-format file: a whole detectron2 model
    (``backbone.bottom_up.*``) or a backbone alone as CutLER's ``dino_RN50_pretrain_d2_format.pkl`` stores it
    (``stem.*``, ``res2.*`` ...). Keys that are not the backbone's are left out."""
    out = {}
    for k, v in state.items():
        name = k[len("backbone.bottom_up.") :] if k.startswith("backbone.bottom_up.") else k
        tk = backbone_key(name)
        if tk is not None:
            out[tk] = v
    return out


# --------------------------------------------------------------------------------------------------
# The layout itself (for fixtures)


def layout(head: str = "cascade", stages: int = 3, num_classes: int = 1, fpn_norm: bool = True) -> list:
    """``(key, shape, kind)`` of every tensor of a CutLER R50-FPN release in detectron2's names, as detectron2
    builds it from CutLER's config (``kind``: ``conv`` / ``linear`` / ``bias`` / ``bn_weight`` / ``bn_bias`` /
    ``bn_mean`` / ``bn_var`` / ``count``: how a fixture draws it). ``num_classes``: foreground classes (1)."""
    specs = []

    def norm(prefix, c, residual_end=False):
        specs.extend([(f"{prefix}.norm.weight", (c,), "bn_last" if residual_end else "bn_weight"),
                      (f"{prefix}.norm.bias", (c,), "bn_bias"), (f"{prefix}.norm.running_mean", (c,), "bn_mean"),
                      (f"{prefix}.norm.running_var", (c,), "bn_var"),
                      (f"{prefix}.norm.num_batches_tracked", (), "count")])  # fmt: skip

    bu = "backbone.bottom_up"
    specs.append((f"{bu}.stem.conv1.weight", (64, 3, 7, 7), "conv"))
    norm(f"{bu}.stem.conv1", 64)
    cin = 64
    for s, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=2):
        cout = width * 4
        for i in range(n):
            p = f"{bu}.res{s}.{i}"
            if i == 0:
                specs.append((f"{p}.shortcut.weight", (cout, cin, 1, 1), "conv"))
                norm(f"{p}.shortcut", cout)
            for j, shp in enumerate(((width, cin, 1, 1), (width, width, 3, 3), (cout, width, 1, 1)), start=1):
                specs.append((f"{p}.conv{j}.weight", shp, "conv"))
                norm(f"{p}.conv{j}", shp[0], residual_end=j == 3)
            cin = cout
    for lvl, c in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        for kind, shp in (("lateral", (256, c, 1, 1)), ("output", (256, 256, 3, 3))):
            p = f"backbone.fpn_{kind}{lvl}"
            specs.append((f"{p}.weight", shp, "conv"))
            if fpn_norm:
                norm(p, 256)
            else:
                specs.append((f"{p}.bias", (256,), "bias"))
    r = "proposal_generator.rpn_head"
    specs += [(f"{r}.conv.weight", (256, 256, 3, 3), "conv"), (f"{r}.conv.bias", (256,), "bias"),
              (f"{r}.objectness_logits.weight", (3, 256, 1, 1), "linear"), (f"{r}.objectness_logits.bias", (3,), "bias"),
              (f"{r}.anchor_deltas.weight", (12, 256, 1, 1), "linear"), (f"{r}.anchor_deltas.bias", (12,), "bias")]  # fmt: skip
    cascade = head == "cascade"
    for k in range(stages if cascade else 1):
        st = f"{k}." if cascade else ""
        specs += [(f"roi_heads.box_head.{st}fc1.weight", (1024, 256 * 7 * 7), "linear"),
                  (f"roi_heads.box_head.{st}fc1.bias", (1024,), "bias"),
                  (f"roi_heads.box_head.{st}fc2.weight", (1024, 1024), "linear"),
                  (f"roi_heads.box_head.{st}fc2.bias", (1024,), "bias"),
                  (f"roi_heads.box_predictor.{st}cls_score.weight", (num_classes + 1, 1024), "linear"),
                  (f"roi_heads.box_predictor.{st}cls_score.bias", (num_classes + 1,), "bias")]  # fmt: skip
        n_box = 4 if cascade else 4 * num_classes
        specs += [(f"roi_heads.box_predictor.{st}bbox_pred.weight", (n_box, 1024), "delta"),
                  (f"roi_heads.box_predictor.{st}bbox_pred.bias", (n_box,), "bias")]  # fmt: skip
    for i in range(1, 5):
        specs += [(f"roi_heads.mask_head.mask_fcn{i}.weight", (256, 256, 3, 3), "conv"),
                  (f"roi_heads.mask_head.mask_fcn{i}.bias", (256,), "bias")]  # fmt: skip
    specs += [("roi_heads.mask_head.deconv.weight", (256, 256, 2, 2), "conv"),
              ("roi_heads.mask_head.deconv.bias", (256,), "bias"),
              ("roi_heads.mask_head.predictor.weight", (num_classes, 256, 1, 1), "linear"),
              ("roi_heads.mask_head.predictor.bias", (num_classes,), "bias")]  # fmt: skip
    return specs

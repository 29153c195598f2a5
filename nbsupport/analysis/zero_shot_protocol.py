"""The facts of GroupViT's zero-shot evaluation protocol (thesis 4.6, 5.3) per dataset, and the published
numbers it is compared with: background thresholds and where they come from, the inference settings, the
reference mIoU of the official models, and which of our settings differ from the reference run.

Sources (facts only): NVlabs/GroupViT ``segmentation/configs/_base_/datasets/{pascal_voc12,pascal_context,
coco}.py`` (``test_cfg``: ``bg_thresh``, ``mode='slide'``, ``crop_size=(448, 448)``, ``stride=(224, 224)``;
``img_scale=(2048, 448)`` with ``keep_ratio``: the short side becomes 448 unless the long side would pass
2048), ``segmentation/evaluation/builder.py`` (a dataset has a background class when its first class is
``"background"``; only then is the threshold applied), GroupViT's README (reference mIoU), issue #32 (the
per-class VOC IoU of ``group_vit_gcc_yfcc_30e``, whose mean is 52.29), issues #31 / #56 (the released models'
thresholds differ from the paper text: the configs are what the released numbers used), OVSegmentor
(Jazzcharles/OVSegmentor ``segmentation/configs/_base_/datasets/ade20k.py``: ``bg_thresh=.95``, the value the
thesis adopts for ADE20K), thesis section 5.3 and Table 5 ("Original" row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nbsupport.models.groupvit.weights import HF_REPOS

SIMPLE_TEMPLATE = ("a photo of a {}.",)


@dataclass(frozen=True)
class DatasetProtocol:
    """Per-dataset facts: ``bg_thresh`` (GroupViT's config value; None where no source gives one),
    ``bg_source`` (where it comes from), ``thesis_bg_thresh`` (what thesis 5.3 states, where it differs or
    the config has none), ``full_split`` (images of the official evaluation split), ``note``."""

    bg_thresh: float | None
    bg_source: str
    thesis_bg_thresh: float | None
    full_split: dict
    note: str = ""


GROUPVIT_CFG = "NVlabs/GroupViT segmentation/configs/_base_/datasets/"

PROTOCOLS: dict[str, DatasetProtocol] = {
    "voc": DatasetProtocol(0.95, GROUPVIT_CFG + "pascal_voc12.py", 0.95, {"val": 1449}),
    "context": DatasetProtocol(
        0.35,
        GROUPVIT_CFG + "pascal_context.py",
        0.35,
        {"val": 5105},
        "GroupViT's 60 classes (background + 59); thesis 5.1.3 names PC-59 but its 22.39 is this setting",
    ),
    "coco_object": DatasetProtocol(
        0.95,
        GROUPVIT_CFG + "coco.py",
        0.9,
        {"val": 5000},
        "thesis 5.3 writes 0.9; GroupViT's config (which produced the reference 24.3 that thesis Table 5 "
        "repeats) has 0.95",
    ),
    "ade20k": DatasetProtocol(
        0.95,
        "Jazzcharles/OVSegmentor segmentation/configs/_base_/datasets/ade20k.py (thesis 5.3)",
        0.95,
        {"val": 2000},
        "ADE20K-150 has no background class, so the threshold is never applied (GroupViT's builder)",
    ),
    "context59": DatasetProtocol(None, "no background class: no threshold", None, {"val": 5105}),
}

#: Published zero-shot mIoU (percent): ``model -> dataset -> (value, source)``.
REFERENCE_MIOU: dict[str, dict[str, tuple[float, str]]] = {
    "group_vit_gcc_yfcc_30e": {
        "voc": (52.3, "GroupViT README"),
        "context": (22.4, "GroupViT README"),
        "coco_object": (24.3, "GroupViT README"),
    },
    "group_vit_gcc_redcap_30e": {
        "voc": (50.8, "GroupViT README"),
        "context": (23.7, "GroupViT README"),
        "coco_object": (27.5, "GroupViT README"),
    },
}

#: Thesis Table 5, "Original" row (the released GCC+YFCC model evaluated with the settings of 5.3).
THESIS_MIOU = {"coco_object": 24.3, "voc": 52.29, "context": 22.39, "ade20k": 8.59}

#: Per-class VOC val IoU of ``group_vit_gcc_yfcc_30e`` posted by GroupViT's author (issue #32), VOC order.
VOC_CLASS_IOU_GCC_YFCC = (
    80.63, 38.08, 31.41, 51.6, 32.7, 63.46, 78.83, 65.07, 79.22, 18.75, 73.4,
    31.63, 76.42, 59.41, 55.31, 43.96, 40.92, 66.57, 31.52, 49.47, 29.74,
)  # fmt: skip

#: Other names of the official releases: HF conversions of the same checkpoints (repo -> release).
ALIASES = dict(HF_REPOS)


@dataclass(frozen=True)
class EvalSettings:
    """How images are segmented (thesis 5.3; GroupViT's ``test_cfg`` and test pipeline).

    ``short_side`` / ``max_long``: the image is rescaled keeping its aspect so the short side is
    ``short_side`` unless the long side would pass ``max_long`` (mmcv's ``img_scale=(2048, 448)``; None:
    kept as it is); ``window`` / ``stride``: the sliding window (None: one pass over the whole image);
    ``bg_thresh``: the background threshold (None: the dataset's :data:`PROTOCOLS` value; ignored for a
    dataset without a background class); ``topk``: image-level classes kept (Eq 31); ``templates``: prompts,
    averaged per class (4.6.1)."""

    short_side: int | None = 448
    max_long: int | None = 2048
    window: int | None = 448
    stride: int = 224
    bg_thresh: float | None = None
    topk: int = 5
    templates: tuple[str, ...] = SIMPLE_TEMPLATE

    def __post_init__(self):
        for k in ("short_side", "max_long", "window"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise ValueError(f"{k} must be a positive number of pixels or None, got {v!r}")
        if int(self.stride) < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride!r}")
        if self.window is not None and self.stride > self.window:
            raise ValueError(f"stride {self.stride} is larger than the window {self.window}: pixels would be skipped")
        if self.bg_thresh is not None and not 0.0 <= float(self.bg_thresh) <= 1.0:
            raise ValueError(f"bg_thresh must lie in [0, 1], got {self.bg_thresh!r}")
        if int(self.topk) < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk!r}")
        t = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        if not t or any("{}" not in s for s in t):
            raise ValueError(f"every template must hold '{{}}' for the class name, got {t!r}")
        object.__setattr__(self, "templates", t)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["templates"] = list(self.templates)
        return d


PROTOCOL_DEFAULTS = EvalSettings()


def has_background(classes) -> bool:
    """GroupViT's rule (``builder.py``): a dataset has a background class when its first class is
    ``"background"``; then it is predicted by threshold, never prompted."""
    return bool(classes) and str(classes[0]) == "background"


@dataclass(frozen=True)
class ResolvedProtocol:
    """The settings of one evaluation with the dataset's facts filled in."""

    settings: EvalSettings
    with_background: bool
    bg_thresh: float | None  # applied threshold (None without a background class)
    bg_source: str
    notes: list = field(default_factory=list)


def resolve(dataset_name: str, classes, settings: EvalSettings | None = None) -> ResolvedProtocol:
    """Fill the background threshold of ``dataset_name`` (:data:`PROTOCOLS`) into ``settings``; a dataset
    with a background class and no known threshold needs an explicit ``bg_thresh`` (error otherwise)."""
    s = settings or EvalSettings()
    with_bg = has_background(classes)
    proto = PROTOCOLS.get(dataset_name)
    notes = [proto.note] if proto and proto.note else []
    if not with_bg:
        src = "no background class: threshold not applied"
        if s.bg_thresh is not None:
            notes.append(f"bg_thresh {s.bg_thresh} given but {dataset_name} has no background class: not applied")
        return ResolvedProtocol(s, False, None, src, notes)
    if s.bg_thresh is not None:
        src = "given"
        if proto and proto.bg_thresh is not None and float(s.bg_thresh) != proto.bg_thresh:
            src = f"given (protocol: {proto.bg_thresh} from {proto.bg_source})"
        return ResolvedProtocol(s, True, float(s.bg_thresh), src, notes)
    if proto is None or proto.bg_thresh is None:
        raise ValueError(
            f"dataset {dataset_name!r} has a background class but no known background threshold: pass bg_thresh "
            f"(known: {', '.join(f'{k} {v.bg_thresh}' for k, v in PROTOCOLS.items() if v.bg_thresh is not None)})"
        )
    return ResolvedProtocol(
        dataclasses.replace(s, bg_thresh=proto.bg_thresh), True, proto.bg_thresh, proto.bg_source, notes
    )


def release_of(model_name: str | None) -> str | None:
    """The official release a model name refers to (``group_vit_gcc_yfcc_30e``, a file named after it, an HF
    alias), or None."""
    if not model_name:
        return None
    name = str(model_name)
    if name in ALIASES:
        return ALIASES[name]
    base = name.rsplit("/", 1)[-1]
    for rel in REFERENCE_MIOU:
        if base == rel or base.startswith(rel + "-") or base.startswith(rel + "."):
            return rel
    return None


def references(model_name: str | None, dataset_name: str) -> list[dict]:
    """Published mIoU to print beside ours: ``[{"miou", "source", "model"}]`` (README value of the release,
    thesis Table 5 for the GCC+YFCC release); empty for other models or datasets."""
    rel = release_of(model_name)
    out = []
    if rel and dataset_name in REFERENCE_MIOU[rel]:
        v, src = REFERENCE_MIOU[rel][dataset_name]
        out.append({"miou": v, "source": src, "model": rel})
    if rel == "group_vit_gcc_yfcc_30e" and dataset_name in THESIS_MIOU:
        out.append({"miou": THESIS_MIOU[dataset_name], "source": "thesis Table 5 (Original)", "model": rel})
    return out


def class_references(model_name: str | None, dataset_name: str) -> list[float] | None:
    """Published per-class IoU (VOC, GCC+YFCC: issue #32), or None."""
    if release_of(model_name) == "group_vit_gcc_yfcc_30e" and dataset_name == "voc":
        return list(VOC_CLASS_IOU_GCC_YFCC)
    return None


def differences(
    resolved: ResolvedProtocol, dataset_name: str, split: str, n_images: int, fixture: bool = False
) -> list[str]:
    """What differs from the run behind the reference numbers: settings other than the protocol's, a subset
    of the split, random-weight fixtures; one readable line each (printed beside the table)."""
    s, ref = resolved.settings, PROTOCOL_DEFAULTS
    out = []
    for k in ("short_side", "max_long", "window", "stride", "topk", "templates"):
        if getattr(s, k) != getattr(ref, k):
            out.append(f"{k} {getattr(s, k)!r} (protocol {getattr(ref, k)!r})")
    proto = PROTOCOLS.get(dataset_name)
    if resolved.with_background and proto and proto.bg_thresh is not None and resolved.bg_thresh != proto.bg_thresh:
        out.append(f"bg_thresh {resolved.bg_thresh} (GroupViT config {proto.bg_thresh})")
    if proto and proto.thesis_bg_thresh is not None and resolved.bg_thresh not in (None, proto.thesis_bg_thresh):
        out.append(f"thesis 5.3 states bg_thresh {proto.thesis_bg_thresh} for {dataset_name}")
    full = proto.full_split.get(split) if proto else None
    if full is not None and n_images != full:
        out.append(f"{n_images} of the {full} images of {split}")
    if fixture:
        out.append("random-weight fixture: the reference numbers are not comparable")
    return out

"""The probe tables in the papers' layout, with the published DINO numbers beside ours and the settings in
which they differ (resolution, facet, checkpoint, CRF, cluster estimator, matching).

Published rows (``/`` = not reported):

- HP Table 1 (its DINO rows are STEGO's): COCO-Stuff-27 S/8 28.7 / 11.3 / 68.6 / 33.9, S/16 22.0 / 8.0 /
  50.3 / 18.1; Cityscapes-27 S/8 34.5 / 10.9 / 84.6 / 22.8, B/8 43.6 / 11.8 / 84.2 / 23.0; Potsdam-3 B/8
  unsupervised accuracy 53.0. STEGO evaluates at 320 px with a learned cluster probe, count matching and a
  CRF, on the final-LayerNorm'ed last-block tokens; its S/8 is the 300-epoch checkpoint.
- CrOC Table 1: PVOC12 with a COCO-pretrained DINO S/16 (not public): linear mIoU 47.2, K-means mIoU 5.2
  (5 seeds, IoU matching).
- MMC Table (d): VOC-aug linear mIoU of DINO B/16, layers 6/8/10/12, 512 px crops: 73.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STEGO = {
    "resolution": 320,
    "facet": "norm_token (last block)",
    "crf": True,
    "estimator": "learned",
    "matching": "count",
}


@dataclass(frozen=True)
class Published:
    """One published row: ``dataset`` and ``arch`` ("S/8" ...), the four numbers (None = not reported),
    where it comes from and its settings."""

    dataset: str
    arch: str
    unsup_acc: float | None
    unsup_miou: float | None
    linear_acc: float | None
    linear_miou: float | None
    source: str
    settings: dict = field(default_factory=dict)


def _stego(dataset, arch, ckpt, *nums):
    return Published(dataset, arch, *nums, "STEGO, as HP Table 1", dict(STEGO, checkpoint=ckpt))


PUBLISHED: tuple[Published, ...] = (
    _stego("cocostuff27", "S/8", "dino_deitsmall8_300ep_pretrain.pth", 28.7, 11.3, 68.6, 33.9),
    _stego("cocostuff27", "S/16", "dino_deitsmall16_pretrain.pth", 22.0, 8.0, 50.3, 18.1),
    _stego("cityscapes27", "S/8", "dino_deitsmall8_300ep_pretrain.pth", 34.5, 10.9, 84.6, 22.8),
    _stego("cityscapes27", "B/8", "dino_vitbase8_pretrain.pth", 43.6, 11.8, 84.2, 23.0),
    _stego("potsdam3", "B/8", "dino_vitbase8_pretrain.pth", 53.0, None, None, None),
    Published(
        "voc",
        "S/16",
        None,
        5.2,
        None,
        47.2,
        "CrOC Table 1 (COCO-pretrained DINO, not public)",
        {
            "resolution": "/",
            "facet": "last blocks (count not given)",
            "checkpoint": "DINO trained on COCO",
            "crf": False,
            "estimator": "kmeans",
            "matching": "iou",
        },
    ),
    Published(
        "voc",
        "B/16",
        None,
        None,
        None,
        73.5,
        "MMC (frozen linear, VOC-aug)",
        {
            "resolution": 512,
            "facet": "token, layers 6/8/10/12",
            "checkpoint": "dino_vitbase16_pretrain.pth",
            "crf": False,
            "estimator": "/",
            "matching": "/",
        },
    ),
)

#: our backbone names -> the architecture the papers' rows name
ARCH = {
    "dino_vits8": "S/8",
    "dino_vits8_300ep": "S/8",
    "dino_vits16": "S/16",
    "dino_vitb8": "B/8",
    "dino_vitb16": "B/16",
}


def published(dataset: str, backbone: str) -> Published | None:
    """The published DINO row for ``dataset`` and the architecture of ``backbone``, or None."""
    arch = ARCH.get(backbone)
    for p in PUBLISHED:
        if p.dataset == dataset and p.arch == arch:
            return p
    return None


def _fmt(mean, std=None) -> str:
    if mean is None or mean != mean:
        return "/"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _ours_settings(report, dataset: str, backbone: str, estimator: str, criterion: str) -> str:
    s, src = report.settings, report.sources.get(backbone, {})
    layers = ",".join(str(x) for x in src.get("layers", [])) or "-"
    return (
        f"{s.get('resolution', {}).get(dataset, '?')} px, {src.get('facet', '?')} L{layers}, "
        f"{src.get('checkpoint', backbone)}, CRF {'on' if s.get('crf') else 'off'}, "
        f"{estimator}/{criterion}, linear {s.get('recipe', '?')}"
    )


def _paper_settings(p: Published) -> str:
    t = p.settings
    return (
        f"{t.get('resolution', '/')} px, {t.get('facet', '/')}, {t.get('checkpoint', '/')}, "
        f"CRF {'on' if t.get('crf') else 'off'}, {t.get('estimator', '/')}/{t.get('matching', '/')}"
    )


def paper_table(report, estimator: str = "learned", criterion: str = "count"):
    """HP's layout: per (dataset, backbone) unsupervised accuracy / mIoU (the cluster probe by ``estimator``
    and ``criterion``, mean ± std over seeds) and linear accuracy / mIoU, each beside the published DINO
    number, then our settings and the paper's. A pandas DataFrame of strings."""
    import pandas as pd

    cl = report.cluster_table()
    lin = report.linear_table()
    rows = []
    for _, lr in lin.iterrows():
        ds, bb = lr["dataset"], lr["backbone"]
        m = cl[(cl.dataset == ds) & (cl.backbone == bb) & (cl.estimator == estimator) & (cl.criterion == criterion)]
        c = m.iloc[0] if len(m) else None
        p = published(ds, bb)
        rows.append(
            {
                "dataset": ds,
                "backbone": report.sources.get(bb, {}).get("description", bb),
                "Unsup Acc": _fmt(c.accuracy, c.accuracy_std) if c is not None else "/",
                "Unsup Acc (paper)": _fmt(p.unsup_acc if p else None),
                "Unsup mIoU": _fmt(c.miou, c.miou_std) if c is not None else "/",
                "Unsup mIoU (paper)": _fmt(p.unsup_miou if p else None),
                "Linear Acc": _fmt(lr["accuracy"]),
                "Linear Acc (paper)": _fmt(p.linear_acc if p else None),
                "Linear mIoU": _fmt(lr["miou"]),
                "Linear mIoU (paper)": _fmt(p.linear_miou if p else None),
                "ours": _ours_settings(report, ds, bb, estimator, criterion),
                "paper": f"{p.source}: {_paper_settings(p)}" if p else "/",
            }
        )
    return pd.DataFrame(rows)


def cluster_table(report):
    """Every cluster-probe estimator and matching criterion side by side (mean ± std over seeds): columns
    ``<estimator>/<criterion> Acc`` and ``... mIoU`` per (dataset, backbone). Criteria differ on the same
    clustering, so the gap between ``count`` and ``iou`` columns is the matching alone."""
    import pandas as pd

    cl = report.cluster_table()
    rows = {}
    for _, r in cl.iterrows():
        key = (r.dataset, report.sources.get(r.backbone, {}).get("description", r.backbone))
        row = rows.setdefault(key, {"dataset": key[0], "backbone": key[1]})
        tag = f"{r.estimator}/{r.criterion}"
        row[f"{tag} Acc"] = _fmt(r.accuracy, r.accuracy_std)
        row[f"{tag} mIoU"] = _fmt(r.miou, r.miou_std)
        row["seeds"] = int(r.seeds)
    return pd.DataFrame(list(rows.values()))

"""Thesis Tables 1-2 as the thesis lays them out, beside the numbers it and CutLER published.

Table 1 (box) and Table 2 (segm): one row per evaluation split of COCO val2017 (all instances, images without
overlapping instances, images with some), one column per training set of the detector (all MaskCut masks on
ImageNet, without overlapping instances, MaskCut-filter), each cell "AP, AP50", for detectors trained 90K
iterations on ImageNet. :func:`thesis_tables` builds them from :func:`~nbsupport.training.cutler.experiments.
evaluate_models`' table, with the thesis's own numbers below; :func:`reference_table` lists the published
references (MaskCut alone, the CutLER model zoo).
"""

from __future__ import annotations

import math

#: Training sets (columns) and evaluation splits (rows) of Tables 1-2: our names -> the thesis's labels.
TRAIN_SETS = {"all": "Imagenet-all", "no-overlap": "Imagenet-wo-ol", "maskcut-filter": "Imagenet-maskcut-filter"}
EVAL_SPLITS = {
    "all": "Coco Eval",
    "without_overlap": "Coco Eval w/o overlapping inst.",
    "only_overlap": "Coco Eval only overlapping inst.",
}
#: The thesis's Tables 1 (box) and 2 (segm), cells as printed: (kind, training set, split) -> "AP, AP50".
THESIS_CELLS = {
    ("box", "all", "all"): "10.35, 19.15",
    ("box", "no-overlap", "all"): "11.52, 20.67",
    ("box", "maskcut-filter", "all"): "11.44, 21.31",
    ("box", "all", "without_overlap"): "23.45, 38.11",
    ("box", "no-overlap", "without_overlap"): "24.77, 39.46",
    ("box", "maskcut-filter", "without_overlap"): "24.64, 40.64",
    ("box", "all", "only_overlap"): "7.25, 15.11",
    ("box", "no-overlap", "only_overlap"): "8.52, 16.8",
    ("box", "maskcut-filter", "only_overlap"): "8.32, 17.28",
    ("segm", "all", "all"): "7.87, 16.05",
    ("segm", "no-overlap", "all"): "8.80, 17.47",
    ("segm", "maskcut-filter", "all"): "9.1, 18.15",
    ("segm", "all", "without_overlap"): "19.19, 35.19",
    ("segm", "no-overlap", "without_overlap"): "20.13, 36.36",
    ("segm", "maskcut-filter", "without_overlap"): "21.15, 38.31",
    ("segm", "all", "only_overlap"): "5.12, 11.55",
    ("segm", "no-overlap", "only_overlap"): "6.18, 13.27",
    ("segm", "maskcut-filter", "only_overlap"): "9.78, 18.92",
}
#: The same as numbers: (kind, training set, split) -> (AP, AP50).
THESIS = {k: tuple(float(x) for x in v.split(", ")) for k, v in THESIS_CELLS.items()}
TITLES = {
    "box": "Table 1: AP and AP50 of evaluation(box) on COCO Eval datasets on models trained on imagenet for 90K iterations",
    "segm": "Table 2: AP and AP50 of evaluation(segm) on COCO Eval datasets on models trained on imagenet for 90K iterations",
}

#: Published class-agnostic references on COCO val2017 (percent; None: not published). ``AR`` is AR@100.
REFERENCES = [
    {"model": "MaskCut alone (ViT-B/8, N = 3)", "source": "CutLER paper",
     "box AP": None, "box AP50": None, "segm AP": 2.2, "segm AP50": None, "AR": None},
    {"model": "CutLER Cascade Mask R-CNN (cutler_cascade_final)", "source": "CutLER model zoo",
     "box AP": None, "box AP50": 21.9, "segm AP": None, "segm AP50": None, "AR": 32.7},
    {"model": "CutLER Mask R-CNN (cutler_mrcnn_final)", "source": "CutLER model zoo",
     "box AP": None, "box AP50": 21.1, "segm AP": None, "segm AP50": None, "AR": 29.6},
    {"model": "CutLER Cascade Mask R-CNN (cutler_cascade_final)", "source": "third-party re-evaluation",
     "box AP": 12.33, "box AP50": 21.98, "segm AP": 9.78, "segm AP50": 18.92, "AR": None},
]  # fmt: skip


def _cell(ap: float, ap50: float) -> str:
    if ap is None or ap50 is None or (isinstance(ap, float) and math.isnan(ap)):
        return "-"
    return f"{ap:.2f}, {ap50:.2f}"


def thesis_layout(values: dict, kind: str = "box"):
    """A pandas DataFrame in the thesis's layout: index = evaluation splits ("Coco Eval", ...), columns =
    training sets ("Imagenet-all", ...), cells "AP, AP50" from ``values[(training set, split)]``: an
    ``(AP, AP50)`` pair (printed with 2 decimals) or a string ("-" where there is none, e.g. a training set
    that was not run)."""
    import pandas as pd

    if kind not in ("box", "segm"):
        raise ValueError(f"kind must be 'box' or 'segm', got {kind!r}")

    def cell(v):
        return v if isinstance(v, str) else _cell(*v)

    rows = {
        label: {TRAIN_SETS[t]: cell(values.get((t, split), (None, None))) for t in TRAIN_SETS}
        for split, label in EVAL_SPLITS.items()
    }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "Eval dataset"
    return df


def published(kind: str = "box"):
    """The thesis's Table 1 (``kind="box"``) or Table 2 (``"segm"``) in :func:`thesis_layout`."""
    return thesis_layout({(t, s): v for (k, t, s), v in THESIS_CELLS.items() if k == kind}, kind)


def measured(ap_table, kind: str = "box", model_label: str = "CutLER ({})"):
    """Our numbers in the thesis's layout: ``ap_table`` is :func:`~nbsupport.training.cutler.experiments.
    evaluate_models`' DataFrame (columns ``model``, ``split``, ``box AP`` ...); the detector trained on set
    ``t`` is the row whose model is ``model_label.format(t)``."""
    values = {}
    for t in TRAIN_SETS:
        rows = ap_table[ap_table["model"] == model_label.format(t)]
        for _, r in rows.iterrows():
            values[(t, r["split"])] = (float(r[f"{kind} AP"]), float(r[f"{kind} AP50"]))
    return thesis_layout(values, kind)


def thesis_tables(ap_table, label: str = "this run") -> dict:
    """Tables 1 and 2 as the thesis prints them, ours above the thesis's: ``{title: DataFrame}`` with a
    two-level index (``label`` / ``"thesis"``, evaluation split), columns = training sets."""
    import pandas as pd

    out = {}
    for kind, title in TITLES.items():
        out[title] = pd.concat({label: measured(ap_table, kind), "thesis": published(kind)})
    return out


def reference_table(ap_table=None, baseline: str = "MaskCut alone", extra: dict | None = None):
    """The published references (:data:`REFERENCES`) as a DataFrame, and below them, from ``ap_table`` (all
    instances split), this run's ``baseline`` row (MaskCut alone) and the rows of ``extra`` ``{label: model
    name in ap_table}`` (e.g. a released detector evaluated here)."""
    import pandas as pd

    rows = [dict(r) for r in REFERENCES]
    if ap_table is not None and len(ap_table):
        wanted = {baseline: baseline, **(extra or {})}
        for label, name in wanted.items():
            sel = ap_table[(ap_table["model"] == name) & (ap_table["split"] == "all")]
            for _, r in sel.iterrows():
                rows.append({"model": label, "source": "this run",
                             **{k: float(r[k]) for k in ("box AP", "box AP50", "segm AP", "segm AP50")}, "AR": None})  # fmt: skip
    return pd.DataFrame(rows)

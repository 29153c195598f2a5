"""Sweep files of the thesis's GroupViT tables (Tables 5-16) and their results as the thesis lays them out.

A sweep file (``sweeps/tableNN.yaml``) names a base recipe, the thesis table's rows (each a recipe diff:
``set`` overrides of :class:`~nbsupport.training.groupvit.config.TrainConfig`, with the row labels the
thesis prints), the seeds, the validation datasets (the table's columns), the published numbers and the
thesis's settings. :func:`variant_config` turns a (row, seed) into a run's configuration,
:func:`results_table` reads the finished runs into the table (mean +- sample standard deviation over the
seeds, the thesis's numbers beside ours, the settings that differ from the thesis under it).
:mod:`.sweep_cli` runs the sweeps (``python -m nbsupport groupvit-sweep``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nbsupport.core.config import ConfigError, load_config, parse_override, read_recipe
from nbsupport.data.datasets.registry import DATASETS
from nbsupport.training.groupvit.config import RECIPE_DIR, TrainConfig

#: The sweep files shipped with the package (``groupvit-sweep table11`` finds ``sweeps/table11.yaml``).
SWEEP_DIR = Path(__file__).parent / "sweeps"
#: A run folder holding this file is finished: the driver skips it and reads its numbers.
RESULT_FILE = "result.json"
#: The thesis's column names of the validation datasets.
HEADERS = {"coco_object": "COCO", "voc": "PVOC", "context": "PContext", "ade20k": "ADE20K", "synthetic": "synthetic"}
#: The global batch (all processes): set in a sweep instead of ``batch_size``, divided by ``--nproc``.
GLOBAL_BATCH = "global_batch_size"
#: Evaluation settings every table shares (thesis 5.3): full validation splits, GroupViT's protocol.
THESIS_EVAL = {"val_limit": 0, "val_short_side": 448, "val_window": 448, "val_stride": 224}

_SWEEP_KEYS = {
    "table": "the thesis's table number",
    "title": "its caption, shortened",
    "recipe": "base recipe (a name in recipes/ or a path)",
    "base": "overrides every row shares",
    "seeds": "seeds of every row (a row's own seeds win)",
    "datasets": "validation datasets = the table's columns",
    "label_columns": "the thesis's row-label columns",
    "variants": "the rows",
    "thesis_settings": "the thesis's settings, compared with each run's",
    "notes": "readings of the thesis, printed under the table",
    "model_from": "'<sweep>/<row>': start every row from that sweep's final weights",
    "requires": "keys that must be given (e.g. data)",
}
_VARIANT_KEYS = {
    "row": "row labels (one per label column)",
    "set": "TrainConfig overrides",
    "train": "false: evaluation only",
    "thesis": "published numbers per dataset",
    "seeds": "this row's seeds",
    "thesis_settings": "this row's thesis settings",
}


@dataclass
class Variant:
    """One row of a thesis table: its labels, its recipe diff, whether it trains, the published numbers."""

    row: tuple
    set: dict = field(default_factory=dict)
    train: bool = True
    thesis: dict = field(default_factory=dict)
    seeds: list | None = None
    thesis_settings: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " | ".join(str(r) for r in self.row)

    @property
    def slug(self) -> str:
        """The row's run folder name: its labels in lower case, other characters as ``_``."""
        return re.sub(r"[^a-z0-9]+", "_", "_".join(str(r) for r in self.row).lower()).strip("_") or "row"


@dataclass
class Sweep:
    """A parsed sweep file (:func:`read_sweep`)."""

    name: str
    path: Path
    table: str
    title: str
    variants: list
    datasets: list
    label_columns: list
    recipe: str | None = None
    base: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [123])
    thesis_settings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    model_from: str | None = None
    requires: list = field(default_factory=list)

    def seeds_of(self, variant: Variant, seeds=None) -> list:
        """The seeds a row runs: ``seeds`` (the command line's) or its own or the sweep's."""
        return list(seeds if seeds else variant.seeds or self.seeds)

    def variant(self, name: str) -> Variant:
        """The row named ``name``: its label (``"GroupViT | GE"``), its slug, its labels joined by spaces, or
        its last label alone when no other row shares it (``"GE"``)."""
        exact = [v for v in self.variants if name in (v.label, v.slug, " ".join(v.row))]
        last = [v for v in self.variants if v.row[-1] == name]
        found = exact or (last if len(last) == 1 else [])
        if not found:
            raise KeyError(f"{self.path}: no row {name!r} (rows: {', '.join(v.label for v in self.variants)})")
        return found[0]


def _check_keys(data: dict, known: dict, where: str) -> None:
    bad = sorted(set(data) - set(known))
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")


def _check_setting_keys(keys, where: str) -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(k for k in keys if k not in fields and k != GLOBAL_BATCH)
    if bad:
        raise ConfigError(f"{where}: unknown GroupViT config key {bad[0]!r}")


def find_sweep(name) -> Path:
    """A sweep file: a path, or a name in :data:`SWEEP_DIR` (``table11``)."""
    p = Path(str(name))
    if p.suffix in (".yaml", ".yml") or "/" in str(name):
        if not p.is_file():
            raise FileNotFoundError(f"sweep file {p} does not exist")
        return p
    q = SWEEP_DIR / f"{name}.yaml"
    if not q.is_file():
        names = ", ".join(sorted(x.stem for x in SWEEP_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"sweep {name!r} not found (shipped: {names}; or give a YAML path)")
    return q


def read_sweep(name) -> Sweep:
    """Parse and check a sweep file (by name or path): unknown keys, rows whose labels do not fill the label
    columns, repeated rows, datasets no loader knows, published numbers for datasets the sweep does not
    validate on, and setting keys :class:`TrainConfig` does not have all fail naming the file."""
    path = find_sweep(name)
    data = read_recipe(path)
    where = f"sweep {path}"
    _check_keys(data, _SWEEP_KEYS, where)
    for k in ("table", "variants", "datasets", "label_columns"):
        if k not in data:
            raise ConfigError(f"{where}: missing {k!r}")
    datasets = list(data["datasets"])
    bad = [d for d in datasets if d != "synthetic" and d not in DATASETS]
    if bad:
        raise ConfigError(f"{where}: unknown dataset {bad[0]!r} (known: synthetic, {', '.join(sorted(DATASETS))})")
    cols = [str(c) for c in data["label_columns"]]
    variants = []
    for i, v in enumerate(data["variants"]):
        vw = f"{where}, row {i + 1}"
        if not isinstance(v, dict):
            raise ConfigError(f"{vw}: a row is a mapping ({', '.join(_VARIANT_KEYS)})")
        _check_keys(v, _VARIANT_KEYS, vw)
        row = v.get("row")
        row = tuple(row) if isinstance(row, (list, tuple)) else (row,)
        if len(row) != len(cols) or any(r is None for r in row):
            raise ConfigError(f"{vw}: row {list(row)} does not fill the label columns {cols}")
        thesis = dict(v.get("thesis") or {})
        if set(thesis) - set(datasets):
            raise ConfigError(f"{vw}: thesis numbers for {sorted(set(thesis) - set(datasets))}, not in datasets")
        _check_setting_keys(v.get("set") or {}, vw)
        _check_setting_keys(v.get("thesis_settings") or {}, vw)
        variants.append(
            Variant(
                tuple(str(r) for r in row),
                dict(v.get("set") or {}),
                bool(v.get("train", True)),
                thesis,
                [int(s) for s in v["seeds"]] if v.get("seeds") else None,
                dict(v.get("thesis_settings") or {}),
            )
        )
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"{where}: two rows share a run folder ({sorted(s for s in slugs if slugs.count(s) > 1)[0]})")
    _check_setting_keys(data.get("base") or {}, where)
    _check_setting_keys(data.get("thesis_settings") or {}, where)
    if data.get("model_from") and "/" not in str(data["model_from"]):
        raise ConfigError(f"{where}: model_from must read '<sweep>/<row>', got {data['model_from']!r}")
    return Sweep(
        name=path.stem,
        path=path,
        table=str(data["table"]),
        title=str(data.get("title", "")),
        variants=variants,
        datasets=datasets,
        label_columns=cols,
        recipe=data.get("recipe"),
        base=dict(data.get("base") or {}),
        seeds=[int(s) for s in data.get("seeds") or [123]],
        thesis_settings=dict(data.get("thesis_settings") or {}),
        notes=[str(n) for n in data.get("notes") or []],
        model_from=data.get("model_from"),
        requires=list(data.get("requires") or []),
    )


# ============================================================================================== configs
def run_dir(out_root, sweep: Sweep, variant: Variant, seed: int) -> Path:
    """``<out_root>/<sweep>/<row>/seed<seed>``: one run's folder (the trainer's ``out_dir``)."""
    return Path(out_root) / sweep.name / variant.slug / f"seed{seed}"


def _parse_overrides(overrides) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for text in overrides or ():
        key, value, _ = parse_override(text)
        out[key] = value
    return out


def variant_config(sweep: Sweep, variant: Variant, seed: int, out_root, nproc: int = 1, overrides=()) -> TrainConfig:
    """The configuration of one run: the sweep's recipe < its ``base`` < the row's ``set`` < ``overrides``
    (``-o key=value`` of the command line) < seed and run folder; ``val_datasets`` = the sweep's datasets;
    ``global_batch_size`` becomes ``batch_size = global / nproc``; ``model_from`` points ``model`` at that
    sweep row's ``final.safetensors`` of the same seed. Unknown keys and bad values fail naming the key."""
    over = {**sweep.base, **variant.set, **_parse_overrides(overrides)}
    global_batch = over.pop(GLOBAL_BATCH, None)
    if global_batch is not None:
        if "batch_size" in _parse_overrides(overrides):
            global_batch = None  # an explicit per-process batch wins
        elif int(global_batch) % nproc:
            raise ConfigError(f"{sweep.path}: global batch {global_batch} does not split over {nproc} processes")
        else:
            over["batch_size"] = int(global_batch) // nproc
    over.setdefault("val_datasets", list(sweep.datasets))
    if sweep.model_from and "model" not in _parse_overrides(overrides):
        other_name, row = str(sweep.model_from).split("/", 1)
        other = read_sweep(other_name)
        over["model"] = str(run_dir(out_root, other, other.variant(row), seed) / "final.safetensors")
    over.update(seed=int(seed), out_dir=str(run_dir(out_root, sweep, variant, seed)))
    recipe = sweep.recipe
    if recipe and not Path(str(recipe)).is_absolute() and "/" in str(recipe):
        recipe = str((sweep.path.parent / str(recipe)).resolve())
    return load_config(TrainConfig, recipe, RECIPE_DIR, overrides=over)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def differences(sweep: Sweep, configs: dict, nproc: int = 1) -> list[str]:
    """The settings of the runs (``{(row slug, seed): TrainConfig}``) that differ from the thesis's (the
    sweep's ``thesis_settings``, a row's own, and :data:`THESIS_EVAL`), one line per difference with the rows
    it concerns; evaluation-only rows are compared on the evaluation settings (``val_*``) only."""
    found: dict[str, list[str]] = {}
    rows = {v.slug: v for v in sweep.variants}
    for (slug, _seed), cfg in configs.items():
        v = rows[slug]
        want = {**THESIS_EVAL, **sweep.thesis_settings, **v.thesis_settings}
        for key, value in want.items():
            if not v.train and not key.startswith("val_") and key not in v.thesis_settings:
                continue
            have = cfg.batch_size * nproc if key == GLOBAL_BATCH else getattr(cfg, key)
            if not _same(have, value):
                found.setdefault(f"{key}: {have!r} here, {value!r} in the thesis", [])
                if v.label not in found[f"{key}: {have!r} here, {value!r} in the thesis"]:
                    found[f"{key}: {have!r} here, {value!r} in the thesis"].append(v.label)
    lines = []
    for msg, labels in found.items():
        every = len(labels) == len(sweep.variants)
        lines.append(f"{msg} ({'every row' if every else 'rows: ' + '; '.join(labels)})")
    return lines


# ============================================================================================== table
def read_result(folder) -> dict | None:
    """A finished run's ``result.json`` (None while it is not finished)."""
    p = Path(folder) / RESULT_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def mean_std(values) -> str:
    """``"m ± s"`` (two decimals, sample standard deviation) of several values, ``"m"`` of one, ``"—"`` of none."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return "—"
    m = statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {statistics.stdev(values):.2f}"


def results_table(sweep: Sweep, out_root, seeds=None) -> list[dict]:
    """The table in the thesis's layout: per row its label columns, then for each dataset ours (mean +- std
    over the finished seeds, with ``(n/N)`` while seeds are missing) and the thesis's number."""
    rows = []
    for v in sweep.variants:
        want = sweep.seeds_of(v, seeds)
        results = [r for s in want if (r := read_result(run_dir(out_root, sweep, v, s))) is not None]
        row = dict(zip(sweep.label_columns, v.row))
        for d in sweep.datasets:
            h = HEADERS.get(d, d)
            cell = mean_std(r["miou"].get(d) for r in results)
            if results and len(results) < len(want):
                cell += f" ({len(results)}/{len(want)})"
            row[h] = cell
            row[f"{h} (thesis)"] = "" if d not in v.thesis else str(v.thesis[d])
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """A list of equal-keyed dicts as a Markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def table_text(sweep: Sweep, rows: list[dict], diffs: list[str], seeds_line: str = "") -> str:
    """The table with its title and, under it, what the numbers are, the settings that differ from the
    thesis and the sweep's notes."""
    out = [f"Table {sweep.table}: {sweep.title}".rstrip(": "), "", to_markdown(rows), ""]
    out.append(
        "Zero-shot mIoU (%); ours: mean ± sample standard deviation over the seeds"
        + (f" ({seeds_line})" if seeds_line else "")
        + f"; thesis: its Table {sweep.table} as published."
    )
    if diffs:
        out += ["", "Settings that differ from the thesis:"] + [f"- {d}" for d in diffs]
    if sweep.notes:
        out += ["", "Notes (readings of the thesis):"] + [f"- {n}" for n in sweep.notes]
    return "\n".join(out) + "\n"

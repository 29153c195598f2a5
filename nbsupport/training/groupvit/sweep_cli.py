"""``python -m nbsupport groupvit-sweep SWEEP``: run a thesis table's fine-tuning runs and print the table.

Every (row, seed) of the sweep file runs in its own folder ``<out>/<sweep>/<row>/seed<seed>``: in this
process with ``--nproc 1``, else under ``torchrun --nproc_per_node N`` (the row's merged configuration as a
recipe file beside it); evaluation-only rows (``train: false``) are scored without training. A folder holding
``result.json`` is finished and skipped, a killed run resumes from its ``last.pt``. The table (ours as mean
+- std over seeds beside the thesis's numbers, the settings that differ from the thesis under it) is printed
and written as ``table.md`` / ``table.csv`` with every run's numbers in ``runs.csv``.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import yaml

from nbsupport.core.config import ConfigError, add_overrides_option, config_to_dict
from nbsupport.core.io import atomic_write_text
from nbsupport.training.common import read_metrics
from nbsupport.training.groupvit.sweep import (
    RESULT_FILE,
    SWEEP_DIR,
    differences,
    read_result,
    read_sweep,
    results_table,
    run_dir,
    table_text,
    variant_config,
)

log = logging.getLogger(__name__)


def torchrun_command(recipe: Path, nproc: int) -> list[str]:
    """The command that trains one row under torchrun from its recipe file."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "nbsupport",
        "groupvit-train",
        "--recipe",
        str(recipe),
    ]


def recipe_of(cfg) -> dict:
    """The top-level fields where ``cfg`` differs from the defaults, values as plain data: a recipe that
    ``groupvit-train --recipe`` reads back to ``cfg`` (mapping fields such as ``val_roots`` stay whole)."""
    here, default = config_to_dict(cfg), config_to_dict(type(cfg)())
    return {k: v for k, v in here.items() if v != default[k]}


def last_val(folder) -> dict | None:
    """The last validation record of a run folder's ``metrics.jsonl``."""
    p = Path(folder) / "metrics.jsonl"
    recs = [r for r in read_metrics(p) if r.get("type") == "val"] if p.is_file() else []
    return recs[-1] if recs else None


def _mious(rec: dict, datasets) -> dict:
    """Per-dataset mIoU of a validation record (``miou_<name>``; a single dataset may be plain ``miou``)."""
    out = {d: rec.get(f"miou_{d}") for d in datasets}
    if len(datasets) == 1 and out[datasets[0]] is None:
        out[datasets[0]] = rec.get("miou")
    return out


def run_one(sweep, variant, seed, cfg, nproc=1, train_fn=None, eval_fn=None, launcher=None) -> dict:
    """Run one (row, seed) into ``cfg.out_dir`` and write its ``result.json``; returns the result."""
    folder = Path(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not variant.train:
        from nbsupport.training.groupvit.validation import evaluate

        rec = (eval_fn or evaluate)(cfg)
    elif nproc == 1:
        from nbsupport.training.groupvit.loop import train

        rec = (train_fn or train)(cfg)["val"]
    else:
        recipe = folder / "sweep_recipe.yaml"
        header = f"# {sweep.path.name}: row {variant.label!r}, seed {seed} (written by groupvit-sweep)\n"
        atomic_write_text(recipe, header + yaml.safe_dump(recipe_of(cfg), sort_keys=False))
        cmd = torchrun_command(recipe, nproc)
        log.info("groupvit-sweep: %s", " ".join(cmd))
        rc = (launcher or subprocess.call)(cmd)
        if rc:
            raise RuntimeError(f"torchrun exited with {rc}")
        rec = last_val(folder)
    if rec is None:
        raise RuntimeError(f"{folder}: the run recorded no validation (val_datasets empty?)")
    result = {
        "sweep": sweep.name,
        "row": list(variant.row),
        "seed": int(seed),
        "train": variant.train,
        "miou": _mious(rec, sweep.datasets),
        "epoch": rec.get("epoch"),
        "step": rec.get("step"),
        "minutes": (time.time() - t0) / 60,
        "nproc": nproc,
    }
    atomic_write_text(folder / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    return result


def _missing_inputs(sweep, cfg) -> list[str]:
    """What a real run of this configuration still needs from the command line."""
    out = []
    if sweep.model_from and not Path(cfg.model).exists():
        out.append(f"the weights {cfg.model} (run {sweep.model_from.split('/')[0]} first, or -o model=FILE)")
    if "data" in sweep.requires and cfg.data == "synthetic":
        out.append("-o data=<COCO captions JSON>")
    for d in cfg.val_datasets:
        root = cfg.val_roots.get(d)
        if d != "synthetic" and (root is None or not Path(root).is_dir()):
            out.append(f"-o val_roots={{{d}: <root>}}" + (f" ({root} is not a folder)" if root else ""))
    return out


def run_sweep(
    sweep,
    out_root="runs/sweeps",
    seeds=None,
    nproc: int = 1,
    overrides=(),
    dry_run: bool = False,
    only=(),
    train_fn=None,
    eval_fn=None,
    launcher=None,
    echo=print,
) -> str:
    """Run (or with ``dry_run`` only list) every (row, seed) of ``sweep`` (a name, path or
    :class:`~nbsupport.training.groupvit.sweep.Sweep`), skipping finished ones, then write and return the
    table text. ``only``: row labels or slugs to run (the table shows every row). ``train_fn`` / ``eval_fn`` /
    ``launcher`` replace the trainer, the evaluation and ``subprocess.call`` (tests)."""
    if isinstance(sweep, (str, Path)):
        sweep = read_sweep(sweep)
    chosen = [sweep.variant(o) for o in only] if only else sweep.variants
    configs = {}
    for v in sweep.variants:
        for s in sweep.seeds_of(v, seeds):
            configs[(v.slug, s)] = variant_config(sweep, v, s, out_root, nproc, overrides)
    plan = [(v, s) for v in chosen for s in sweep.seeds_of(v, seeds)]
    missing = sorted({m for v, s in plan for m in _missing_inputs(sweep, configs[(v.slug, s)])})
    if missing and any(read_result(run_dir(out_root, sweep, v, s)) is None for v, s in plan):
        if not dry_run:
            raise ConfigError(f"{sweep.path}: give {' '.join(missing)} (or run with --dry-run)")
        echo(f"a real run needs: {' '.join(missing)}")
    failed = []
    for v, s in plan:
        cfg = configs[(v.slug, s)]
        folder = Path(cfg.out_dir)
        done = read_result(folder) is not None
        state = "done" if done else ("resumes" if (folder / "last.pt").is_file() else "to run")
        what = "evaluate" if not v.train else f"train {cfg.epochs} epochs"
        echo(f"[{state}] {v.label} seed {s}: {what} -> {folder}")
        if dry_run:
            if v.train and nproc > 1:
                echo("    " + " ".join(torchrun_command(folder / "sweep_recipe.yaml", nproc)))
            diff = {k: x for k, x in recipe_of(cfg).items() if k not in ("out_dir",)}
            echo(f"    {json.dumps(diff, default=str)}")
            continue
        if done:
            continue
        try:
            run_one(sweep, v, s, cfg, nproc, train_fn, eval_fn, launcher)
        except Exception as e:  # noqa: BLE001 - one failing run does not stop the sweep
            log.exception("groupvit-sweep: %s seed %s failed", v.label, s)
            failed.append(f"{v.label} seed {s}: {type(e).__name__}: {e}")
    used = sorted({s for v in sweep.variants for s in sweep.seeds_of(v, seeds)})
    text = table_text(sweep, results_table(sweep, out_root, seeds), differences(sweep, configs, nproc), f"seeds {used}")
    if failed:
        text += "\nFailed runs:\n" + "".join(f"- {f}\n" for f in failed)
    if not dry_run:
        write_tables(sweep, out_root, seeds, text)
    echo(text)
    return text


def write_tables(sweep, out_root, seeds, text: str) -> Path:
    """``table.md`` (the text), ``table.csv`` (the table) and ``runs.csv`` (one line per finished run) in
    ``<out_root>/<sweep>/``."""
    folder = Path(out_root) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "table.md", text)
    rows = results_table(sweep, out_root, seeds)
    with open(folder / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(folder / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", *sweep.datasets, "minutes"])
        for v in sweep.variants:
            for s in sweep.seeds_of(v, seeds):
                r = read_result(run_dir(out_root, sweep, v, s))
                if r is not None:
                    w.writerow([v.label, s, *(r["miou"].get(d) for d in sweep.datasets), round(r["minutes"], 2)])
    return folder


# ============================================================================================== CLI
def _int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def add_cli(subparsers):
    """Registers ``python -m nbsupport groupvit-sweep``."""
    names = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
    p = subparsers.add_parser(
        "groupvit-sweep",
        help="run a thesis GroupViT table (Tables 5-16) and print it beside the thesis's numbers",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("sweep", help=f"a sweep file: a name in nbsupport/training/groupvit/sweeps ({names}) or a path")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and settings; run nothing")
    p.add_argument(
        "--seeds", type=_int_list, default=None, help="seeds for every row, e.g. 0,1,2 (default: the file's)"
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per run: 1 in this process, > 1 under torchrun")
    p.add_argument("--out", default="runs/sweeps", help="root of the run folders (default: runs/sweeps)")
    p.add_argument("--only", action="append", default=[], metavar="ROW", help="run only this row (label or slug)")
    add_overrides_option(
        p,
        "override for every run, value as YAML (e.g. -o data=.../captions_train2017.json, "
        "-o val_roots='{voc: /data/VOCdevkit/VOC2012}', -o epochs=1)",
    )
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.nproc < 1:
        raise SystemExit("error: --nproc must be >= 1")
    try:
        text = run_sweep(args.sweep, args.out, args.seeds, args.nproc, args.overrides, args.dry_run, args.only)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    return 1 if "Failed runs:" in text else 0

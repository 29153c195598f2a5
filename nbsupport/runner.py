"""Headless notebook runs: ``python -m nbsupport run [NOTEBOOK ...] --profile smoke|demo|paper [-p k=v]``.

A *profile* is a parameter set per notebook, all kept in one file (``nbsupport/profiles.yaml``):
``{profile: {"*": {shared defaults}, "<notebook stem>": {its parameters}}}``. The runner checks every
name against the notebook's ``parameters`` cell before anything executes, runs each notebook with
papermill (continuing past failures), and writes a run folder::

    runs/<YYYYmmdd-HHMMSS>-<profile>/
        notebooks/<stem>.ipynb     executed copies
        figures/<stem>/*.png|pdf   written by nbsupport.viz.save_figure inside the kernel
        summary.md, summary.json   status, time and figures of each notebook
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import paths

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


class RunError(ValueError):
    """A bad request (profile, notebook or parameter): nothing was executed."""


def profiles_file() -> Path:
    return Path(os.environ.get("NBSUPPORT_PROFILES", PROFILES_FILE))


def load_profiles(path=None) -> dict:
    path = Path(path) if path else profiles_file()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RunError(f"{path}: expected a mapping profile -> {{notebook stem or '*': {{param: value}}}}")
    return data


def notebooks_dir() -> Path:
    return paths.project_root() / "notebooks"


def find_notebooks(names=None) -> list[Path]:
    """Notebook paths from paths or stems; all ``notebooks/[0-9]*.ipynb`` when ``names`` is empty."""
    available = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
    if not names:
        if not available:
            raise RunError(f"no notebooks found in {notebooks_dir()}")
        return available
    out = []
    for n in names:
        p = Path(n)
        if p.suffix == ".ipynb" and p.is_file():
            out.append(p.resolve())
            continue
        match = [a for a in available if a.stem == Path(n).stem]
        if not match:
            raise RunError(f"unknown notebook {n!r}; available: {', '.join(a.stem for a in available) or 'none'}")
        out.append(match[0])
    return out


def parse_value(text: str):
    """``-p`` values as YAML scalars/lists: ``3`` -> int, ``0.1`` -> float, ``true``, ``[1, 2]``, else str."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise RunError(f"parameter {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def declared_parameters(nb_path: Path) -> dict:
    """Names and defaults of the notebook's ``parameters`` cell (papermill's inspection)."""
    import nbformat
    import papermill as pm

    nb = nbformat.read(nb_path, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise RunError(f"{nb_path.name} has no cell tagged 'parameters'")
    return pm.inspect_notebook(str(nb_path))


def resolve_parameters(nb_path: Path, profile: str, profiles: dict, overrides: dict) -> dict:
    """profile['*'] (only the names this notebook declares) + profile[stem] + overrides."""
    if profile not in profiles:
        raise RunError(f"unknown profile {profile!r}; profiles: {', '.join(profiles)}")
    declared = declared_parameters(nb_path)
    prof = profiles[profile] or {}
    params = {k: v for k, v in (prof.get("*") or {}).items() if k in declared}
    specific = prof.get(nb_path.stem) or {}
    unknown = sorted(set(specific) - set(declared))
    if unknown:
        raise RunError(f"profile {profile!r} sets {unknown} for {nb_path.stem}, which declares only "
                       f"{sorted(declared)} (fix {profiles_file()})")
    params.update(specific)
    params.update({k: v for k, v in overrides.items() if k in declared})
    if "profile" in declared:
        params["profile"] = profile
    return params


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise RunError(f"no 'python3' Jupyter kernel; install one with: {sys.executable} -m ipykernel install "
                       "--sys-prefix") from None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=paths.project_root(),
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[-1][:300] if text.strip() else type(exc).__name__


def run(notebooks=None, profile: str = "smoke", overrides: dict | None = None, out=None, timeout: int | None = None,
        log=None) -> dict:
    """Execute notebooks and write the run folder; returns the summary dict (``ok`` false if any failed)."""
    import papermill as pm

    overrides = overrides or {}
    log = log or (lambda msg: print(msg, flush=True))
    profiles = load_profiles()
    if profile not in profiles:
        raise RunError(f"unknown profile {profile!r}; profiles: {', '.join(profiles)}")
    nbs = find_notebooks(notebooks)
    plan = [(nb, resolve_parameters(nb, profile, profiles, overrides)) for nb in nbs]
    declared_any = set().union(*(declared_parameters(nb) for nb in nbs))
    unknown = sorted(set(overrides) - declared_any)
    if unknown:
        raise RunError(f"parameter(s) {unknown} not declared by any selected notebook; declared: {sorted(declared_any)}")
    _check_kernel()

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out) if out else paths.project_root() / "runs" / f"{stamp}-{profile}"
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    results = []
    for i, (nb, params) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {nb.stem} ...")
        out_nb = run_dir / "notebooks" / nb.name
        t0 = time.time()
        status, error = "ok", ""
        with _env(NBSUPPORT_RUN_DIR=run_dir, NBSUPPORT_NOTEBOOK=nb.stem, NBSUPPORT_PROFILE=profile,
                  MPLBACKEND="Agg", NBSUPPORT_ROOT=paths.project_root()):
            try:
                pm.execute_notebook(str(nb), str(out_nb), parameters=params, kernel_name="python3",
                                    cwd=str(nb.parent), progress_bar=sys.stderr.isatty(),
                                    request_save_on_cell_execute=True, execution_timeout=timeout)
            except Exception as e:  # noqa: BLE001 - record and continue with the next notebook
                status, error = "failed", _error_text(e)
        dt = time.time() - t0
        figs = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "figures" / nb.stem).glob("*.png"))
        results.append({"notebook": nb.stem, "status": status, "seconds": round(dt, 1), "figures": figs,
                        "parameters": params, "error": error})
        msg = f"    {status} ({dt:.1f} s, {len(figs)} figures)" + (f": {error}" if error else "")
        log(msg)
    summary = {"profile": profile, "date": stamp, "commit": _git_commit(), "overrides": overrides,
               "run_dir": str(run_dir), "ok": all(r["status"] == "ok" for r in results), "notebooks": results}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "summary.md").write_text(_markdown(summary))
    log(f"run folder: {run_dir}  ({sum(r['status'] == 'ok' for r in results)}/{len(results)} ok)")
    return summary


def _markdown(s: dict) -> str:
    lines = [f"# Run {s['date']} — profile `{s['profile']}`", "",
             f"- commit: `{s['commit'] or 'unknown'}`", f"- overrides: `{s['overrides'] or {}}`",
             f"- result: {'all notebooks ok' if s['ok'] else 'SOME NOTEBOOKS FAILED'}", "",
             "| notebook | status | time (s) | figures | error |", "|---|---|---|---|---|"]
    for r in s["notebooks"]:
        figs = " ".join(f"[{Path(f).stem}]({f})" for f in r["figures"]) or "—"
        err = r["error"].replace("|", "\\|") if r["error"] else ""
        lines.append(f"| [{r['notebook']}](notebooks/{r['notebook']}.ipynb) | {r['status']} | {r['seconds']} | {figs} | {err} |")
    return "\n".join(lines) + "\n"


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("run", help="execute notebooks headless with a parameter profile",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", help="paths or stems (default: every notebooks/[0-9]*.ipynb)")
    p.add_argument("--profile", default="smoke", help="parameter set from nbsupport/profiles.yaml (smoke|demo|paper)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter (YAML value: 3, 0.1, true, [1,2], text)")
    p.add_argument("--out", help="run folder (default runs/<timestamp>-<profile>)")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        summary = run(args.notebooks, args.profile, parse_overrides(args.param), args.out, args.timeout)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbsupport")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)

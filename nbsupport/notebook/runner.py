"""Headless notebook runs: ``python -m nbsupport run [NOTEBOOK ...] --profile smoke|demo|paper [-p k=v]``.

A *profile* is a parameter set per notebook, all kept in one file (``nbsupport/notebook/profiles.yaml``):
``{profile: {"*": {shared defaults}, "<notebook stem>": {its parameters}, "_settings": {...}}}``. A notebook
receives ``profile["*"]`` (only the names its ``parameters`` cell declares) + ``profile[stem]`` + ``-p``
overrides, and ``profile=<name>`` when it declares ``profile``. Every name is checked against the notebooks'
``parameters`` cells before anything executes. A value ``{required: "<what is expected>"}`` must be given
with ``-p`` (the ``paper`` profile's dataset roots): without it the run stops before anything executes,
naming the parameter and the expected layout. ``_settings: {fixtures: true}`` (the ``fixture`` profile)
builds the offline fixtures first (:mod:`nbsupport.notebook.fixtures`: tiny datasets in their official
layouts and official-layout checkpoints with random weights), replaces ``{fixtures}`` in parameter values
by their folder, points the weight cache there (offline) and notes "random weights, fixture data" on every
figure. Each notebook runs with papermill in the venv's
``python3`` kernel (a failure is recorded and the next notebook runs), and the run folder holds::

    runs/<YYYYmmdd-HHMMSS>-<profile>/
        notebooks/<stem>.ipynb     executed copies (figures inline)
        figures/<stem>/*.png|pdf   written by nbsupport.notebook.viz.save_figure inside the kernel
        summary.md, summary.json   status, time, figures and parameters of each notebook
        run.log                    progress lines and full tracebacks of failures

Exit code: 0 all notebooks ok, 1 some failed, 2 bad request (nothing executed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from nbsupport.core import paths

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
SETTINGS = "_settings"  # a profile's own settings (not a notebook)
KNOWN_SETTINGS = {"fixtures": False}
FIGURE_NOTE = "random weights, fixture data"


KERNEL = "python3"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunError(ValueError):
    """A bad request (profile, notebook, parameter, kernel): nothing was executed."""


# ----------------------------------------------------------------------------------------------- profiles
def profiles_file() -> Path:
    """The profiles file: ``$NBSUPPORT_PROFILES`` if set, else the packaged ``nbsupport/notebook/profiles.yaml``."""
    return Path(os.environ.get("NBSUPPORT_PROFILES") or PROFILES_FILE)


def load_profiles(path=None) -> dict:
    """``{profile: {"*" | stem: {param: value}}}`` from the YAML profiles file."""
    path = Path(path) if path else profiles_file()
    if not path.is_file():
        raise RunError(f"profiles file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunError(f"profiles file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a mapping profile -> {{notebook stem or '*': {{param: value}}}}")
    for name, prof in data.items():
        if prof is None:
            data[name] = prof = {}
        if not isinstance(prof, dict) or not all(isinstance(v, dict) or v is None for v in prof.values()):
            raise RunError(f"{path}: profile {name!r} must map notebook stems or '*' to {{param: value}}")
        unknown = sorted(set(prof.get(SETTINGS) or {}) - set(KNOWN_SETTINGS))
        if unknown:
            raise RunError(f"{path}: profile {name!r} has unknown settings {unknown}; known: {list(KNOWN_SETTINGS)}")
    return data


def profile_settings(profiles: dict, profile: str) -> dict:
    """The ``_settings`` of a profile with their defaults (``fixtures``: False)."""
    return {**KNOWN_SETTINGS, **((profiles.get(profile) or {}).get(SETTINGS) or {})}


def _required(value) -> str | None:
    """The description of a required parameter (``{required: "..."}``), else None."""
    if isinstance(value, dict) and set(value) == {"required"}:
        return str(value["required"])
    return None


def _substitute(value, mapping: dict[str, str]):
    """``value`` with ``{name}`` placeholders of ``mapping`` replaced in every string (lists and dicts too)."""
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    return value


def parse_value(text: str):
    """A ``-p`` value as a YAML scalar or list: ``3`` -> int, ``0.1`` -> float, ``true`` -> bool,
    ``null`` -> None, ``[1, 2]`` -> list; anything else (or unparsable YAML) stays the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items) -> dict:
    """``["k=v", ...]`` -> ``{k: parse_value(v)}``; the last of repeated keys wins."""
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise RunError(f"parameter {item!r} must look like key=value")
        out[k.strip()] = parse_value(v)
    return out


# ---------------------------------------------------------------------------------------------- notebooks
def notebooks_dir() -> Path:
    return paths.project_root() / "notebooks"


def available_notebooks() -> list[Path]:
    """Every ``notebooks/[0-9]*.ipynb`` under the project root, sorted."""
    return sorted(notebooks_dir().glob("[0-9]*.ipynb"))


def find_notebooks(names=None) -> list[Path]:
    """Notebook paths from paths or stems (``01_feature_affinity``); all available ones when empty."""
    available = available_notebooks()
    listing = ", ".join(a.stem for a in available) or f"none in {notebooks_dir()}"
    if not names:
        if not available:
            raise RunError(f"no notebooks found in {notebooks_dir()}")
        return available
    out: list[Path] = []
    for n in names:
        p = Path(n)
        if p.suffix == ".ipynb" and p.is_file():
            hit = p.resolve()
        else:
            match = [a for a in available if a.stem == p.stem]
            if not match:
                raise RunError(f"unknown notebook {n!r}; available: {listing}")
            hit = match[0]
        if hit not in out:
            out.append(hit)
    return out


def declared_parameters(nb_path: Path) -> dict:
    """Names (-> papermill's inspection: default, help) of the notebook's ``parameters`` cell."""
    import nbformat
    import papermill as pm

    try:
        nb = nbformat.read(nb_path, as_version=4)
    except Exception as e:  # noqa: BLE001 - any unreadable notebook is a bad request
        raise RunError(f"cannot read notebook {nb_path}: {e}") from None
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise RunError(f"{nb_path.name} has no cell tagged 'parameters' (papermill injects values after it)")
    return pm.inspect_notebook(str(nb_path))


def resolve_parameters(
    nb_path: Path, profile: str, profiles: dict, overrides: dict, declared: dict | None = None
) -> dict:
    """profile['*'] (only the names this notebook declares) + profile[stem] + overrides it declares,
    and ``profile=<name>`` when declared. Names in profile[stem] the notebook does not declare are errors."""
    if profile not in profiles:
        raise RunError(f"unknown profile {profile!r}; profiles: {', '.join(profiles)}")
    declared = declared_parameters(nb_path) if declared is None else declared
    prof = profiles[profile] or {}
    params = {k: v for k, v in (prof.get("*") or {}).items() if k in declared}
    specific = prof.get(nb_path.stem) or {}
    unknown = sorted(set(specific) - set(declared))
    if unknown:
        raise RunError(
            f"profile {profile!r} sets {', '.join(unknown)} for {nb_path.stem}, whose parameters cell "
            f"declares only: {', '.join(declared)} (fix {profiles_file()})"
        )
    params.update(specific)
    params.update({k: v for k, v in overrides.items() if k in declared})
    missing = [(k, _required(v)) for k, v in params.items() if _required(v) is not None]
    if missing:
        k, what = missing[0]
        raise RunError(f"profile {profile!r}: {nb_path.stem} needs -p {k}=... ({what})")
    if profile_settings(profiles, profile)["fixtures"]:
        params = {k: _substitute(v, {"fixtures": str(fixtures_root())}) for k, v in params.items()}
    if "profile" in declared:
        params["profile"] = profile
    return params


def fixtures_root() -> Path:
    """Where the ``fixture`` profile's fixtures live: ``data/generated/fixtures`` (built once, reused)."""
    return paths.generated_dir() / "fixtures"


def plan_run(
    notebooks=None, profile: str = "smoke", overrides: dict | None = None, profiles: dict | None = None
) -> list[tuple[Path, dict]]:
    """Validate the whole request and return ``[(notebook, parameters)]``; raises :class:`RunError`
    (profile, notebook, parameter) before anything executes."""
    overrides = overrides or {}
    profiles = load_profiles() if profiles is None else profiles
    if profile not in profiles:
        raise RunError(f"unknown profile {profile!r}; profiles: {', '.join(profiles)}")
    nbs = find_notebooks(notebooks)
    declared = {nb: declared_parameters(nb) for nb in nbs}
    names = set().union(*declared.values())
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise RunError(
            f"parameter {', '.join(unknown)} is not declared by any selected notebook "
            f"({', '.join(nb.stem for nb in nbs)}); declared: {', '.join(sorted(names))}"
        )
    return [(nb, resolve_parameters(nb, profile, profiles, overrides, declared[nb])) for nb in nbs]


# ----------------------------------------------------------------------------------------------- the kernel
def _same_interpreter(cmd0: str) -> bool:
    if cmd0 in {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}:
        return True  # jupyter_client substitutes sys.executable for these names
    if os.path.abspath(cmd0) == os.path.abspath(sys.executable):
        return True
    try:  # a different path may still be this environment (e.g. bin/python3 vs bin/python)
        out = subprocess.run(
            [cmd0, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out) and os.path.realpath(out) == os.path.realpath(sys.prefix)


def check_kernel() -> str:
    """The ``python3`` kernelspec exists and runs this interpreter (the venv); returns the interpreter.
    Inside a virtual environment a kernel of another interpreter is an error (the notebooks would not
    see this environment's packages)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"{sys.executable} -m ipykernel install --sys-prefix"
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise RunError(f"no '{KERNEL}' Jupyter kernel; install this environment's with: {fix}") from None
    cmd0 = spec.argv[0] if spec.argv else ""
    if not _same_interpreter(cmd0):
        msg = (
            f"the '{KERNEL}' kernel ({spec.resource_dir}) runs {cmd0!r}, not this interpreter {sys.executable}; "
            f"install this environment's kernel with: {fix}"
        )
        if sys.prefix != sys.base_prefix:
            raise RunError(msg)
        print(f"warning: {msg}", file=sys.stderr)
        return cmd0
    return sys.executable


# ----------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _env(**values):
    """Set environment variables (inherited by the kernel) and restore them afterwards."""
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


def _kernel_mpl_backend() -> str:
    """Headless backend for the kernel: matplotlib-inline (figures embedded in the executed copy, closed
    after each cell), else Agg."""
    try:
        import matplotlib_inline  # noqa: F401

        return "module://matplotlib_inline.backend_inline"
    except ImportError:
        return "Agg"


def _git_commit() -> str:
    root = paths.project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}{' (modified)' if sha and dirty else ''}"


def error_summary(exc: BaseException) -> str:
    """One line for the summary: the failing cell's ``ename: evalue`` (papermill), else the exception."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    name, text = (ename, evalue) if ename else (type(exc).__name__, str(exc))
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip(" -=")]
    line = f"{name}: {lines[0]}" if lines else str(name)
    return line if len(line) <= 300 else line[:297] + "..."


def _new_run_dir(profile: str) -> tuple[Path, str]:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = paths.project_root() / "runs" / f"{stamp}-{profile}"
    d, k = base, 2
    while d.exists():
        d, k = base.with_name(f"{base.name}-{k}"), k + 1
    return d, stamp


def run(
    notebooks=None,
    profile: str = "smoke",
    overrides: dict | None = None,
    out=None,
    timeout: int | None = None,
    log=None,
    progress_bar: bool | None = None,
) -> dict:
    """Execute notebooks and write the run folder; returns the summary dict (``ok`` false if any failed).

    Raises :class:`RunError` for a bad request before anything executes."""
    import papermill as pm

    overrides = overrides or {}
    profiles = load_profiles()
    plan = plan_run(notebooks, profile, overrides, profiles)
    kernel_python = check_kernel()
    env = {}
    if profile_settings(profiles, profile)["fixtures"]:
        from nbsupport.notebook.fixtures import build_fixtures

        root = build_fixtures(fixtures_root(), log=log)
        env = {"NBSUPPORT_CACHE": root / "cache", "NBSUPPORT_OFFLINE": "1", "NBSUPPORT_FIGURE_NOTE": FIGURE_NOTE}
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()

    if out:
        run_dir, stamp = Path(out).resolve(), _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        run_dir, stamp = _new_run_dir(profile)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    logfile = open(run_dir / "run.log", "a", encoding="utf-8")

    def say(msg: str, detail: str = "") -> None:
        (log or (lambda m: print(m, flush=True)))(msg)
        logfile.write(msg + "\n" + (detail + "\n" if detail else ""))
        logfile.flush()

    summary = {
        "profile": profile,
        "date": stamp,
        "commit": _git_commit(),
        "overrides": overrides,
        "kernel": kernel_python,
        "run_dir": str(run_dir),
        "ok": False,
        "notebooks": [],
    }
    results = summary["notebooks"]
    n = len(plan)
    say(f"run folder {run_dir} (profile {profile}, {n} notebook{'' if n == 1 else 's'}, kernel {kernel_python})")
    try:
        for i, (nb, params) in enumerate(plan, 1):
            say(f"[{i}/{n}] {nb.stem} ... running", "    parameters: " + json.dumps(params, default=str))
            t0 = time.time()
            rec = {
                "notebook": nb.stem,
                "status": "running",
                "seconds": 0.0,
                "figures": [],
                "parameters": params,
                "error": "",
            }
            results.append(rec)
            detail = ""
            with _env(
                NBSUPPORT_RUN_DIR=run_dir,
                NBSUPPORT_NOTEBOOK=nb.stem,
                NBSUPPORT_PROFILE=profile,
                NBSUPPORT_ROOT=paths.project_root(),
                MPLBACKEND=_kernel_mpl_backend(),
                **env,
            ):
                try:
                    pm.execute_notebook(
                        str(nb),
                        str(run_dir / "notebooks" / f"{nb.stem}.ipynb"),
                        parameters=params,
                        kernel_name=KERNEL,
                        cwd=str(nb.parent),
                        progress_bar=progress_bar,
                        request_save_on_cell_execute=True,
                        execution_timeout=timeout,
                        extra_arguments=["--IPKernelApp.log_level=ERROR"],
                    )  # no TCP warning
                    rec["status"] = "ok"
                except KeyboardInterrupt:
                    rec["status"], rec["error"] = "interrupted", "KeyboardInterrupt"
                    raise
                except Exception as e:  # noqa: BLE001 - record it and go on with the next notebook
                    rec["status"], rec["error"] = "failed", error_summary(e)
                    detail = _ANSI.sub("", str(e)).rstrip()
                finally:
                    rec["seconds"] = round(time.time() - t0, 1)
                    fig_dir = run_dir / "figures" / nb.stem
                    rec["figures"] = sorted(
                        str(p.relative_to(run_dir)) for p in fig_dir.glob("*.png") if p.stat().st_mtime >= t0 - 1
                    )
            k = len(rec["figures"])
            say(
                f"[{i}/{n}] {nb.stem} ... {rec['status']} ({rec['seconds']:.1f} s, {k} figure{'' if k == 1 else 's'})"
                + (f": {rec['error']}" if rec["error"] else ""),
                detail,
            )
            _write_summary(run_dir, summary)
    finally:
        _write_summary(run_dir, summary)
        n_ok = sum(r["status"] == "ok" for r in results)
        say(f"{n_ok}/{n} notebooks ok; summary: {run_dir / 'summary.md'}")
        logfile.close()
    return summary


def _write_summary(run_dir: Path, summary: dict) -> None:
    summary["ok"] = bool(summary["notebooks"]) and all(r["status"] == "ok" for r in summary["notebooks"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (run_dir / "summary.md").write_text(summary_markdown(summary))


def summary_markdown(s: dict) -> str:
    """The run's ``summary.md``: header, one table row per notebook, then each notebook's parameters."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    overrides = " ".join(f"`{k}={json.dumps(v, default=str)}`" for k, v in s["overrides"].items()) or "none"
    n_ok = sum(r["status"] == "ok" for r in s["notebooks"])
    lines = [
        f"# Run {s['date']} — profile `{s['profile']}`",
        "",
        f"- commit: `{s['commit'] or 'unknown'}`",
        f"- overrides (`-p`): {overrides}",
        f"- kernel: `{s.get('kernel', '')}`",
        f"- result: {n_ok}/{len(s['notebooks'])} notebooks ok" + ("" if s["ok"] else " — SOME FAILED"),
        "",
        "| notebook | status | time (s) | figures | error |",
        "|---|---|---|---|---|",
    ]
    for r in s["notebooks"]:
        figs = "<br>".join(f"[{Path(f).stem}]({f})" for f in r["figures"]) or "—"
        lines.append(
            f"| [{r['notebook']}](notebooks/{r['notebook']}.ipynb) | {r['status']} | {r['seconds']:.1f} | "
            f"{figs} | {cell(r['error'])} |"
        )
    lines += ["", "## Parameters", ""]
    for r in s["notebooks"]:
        ps = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in r["parameters"].items())
        lines.append(f"- `{r['notebook']}`: `{ps}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line
def add_cli(subparsers) -> None:
    """Register ``run`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "run",
        help="execute notebooks headless with a parameter profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "notebooks",
        nargs="*",
        metavar="NOTEBOOK",
        help="paths or stems, e.g. 01_feature_affinity (default: every notebooks/[0-9]*.ipynb)",
    )
    p.add_argument(
        "--profile",
        default="smoke",
        help="parameter set in nbsupport/notebook/profiles.yaml: smoke | demo | paper (default smoke)",
    )
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter; the value is read as YAML (3, 0.1, true, null, [1,2], text); repeatable",
    )
    p.add_argument("--out", help="run folder (default runs/<YYYYmmdd-HHMMSS>-<profile>)")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds (default none)")
    p.add_argument("--profiles", help=argparse.SUPPRESS)  # another profiles file (tests); or $NBSUPPORT_PROFILES
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    env = {"NBSUPPORT_PROFILES": str(Path(args.profiles).resolve())} if args.profiles else {}
    try:
        with _env(**env):
            summary = run(args.notebooks, args.profile, parse_overrides(args.param), args.out, args.timeout)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["ok"] else 1


def main(argv=None) -> int:
    """``run`` alone (tests): ``main(["run", "01_x", "--profile", "smoke"])``."""
    parser = argparse.ArgumentParser(prog="nbsupport")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)

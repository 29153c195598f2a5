"""The papermill runner: parameters reach the kernel, run folder and summary, failures, bad requests.

Real notebook executions cost ~3 s each: only ``test_run_good_and_failing_notebooks`` executes (two)."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from nbsupport import __main__ as nbmain
from nbsupport.notebook import runner

GOOD_BODY = """\
import json, os, sys
import matplotlib.pyplot as plt
from nbsupport.notebook import viz
fig, ax = plt.subplots()
ax.plot([1, 2], [alpha, alpha])
viz.save_figure(fig, 'line plot')
seen = {'alpha': alpha, 'name': name, 'sizes': sizes, 'profile': profile, 'cwd': os.getcwd(),
        'python': sys.executable, 'env': {k: os.environ.get(k) for k in
        ('NBSUPPORT_NOTEBOOK', 'NBSUPPORT_PROFILE', 'NBSUPPORT_RUN_DIR')}}
json.dump(seen, open(os.path.join(os.environ['NBSUPPORT_RUN_DIR'], 'seen.json'), 'w'))
"""


def make_nb(path, params_src, body_src, tagged=True):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"] if tagged else []
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A throw-away project root: three notebooks and a profiles file."""
    (tmp_path / "nbsupport").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    make_nb(nbs / "01_good.ipynb", 'profile = "interactive"\nalpha = 1\nname = "x"\nsizes = [1]\n', GOOD_BODY)
    make_nb(nbs / "02_bad.ipynb", "beta = 2\n", "x = 1\nraise ZeroDivisionError('planted failure')\n")
    make_nb(nbs / "03_noparams.ipynb", "gamma = 3\n", "pass\n", tagged=False)
    (nbs / "notes.ipynb").write_text("{}")  # not [0-9]*: never selected by default
    prof = tmp_path / "profiles.yaml"
    prof.write_text(
        "smoke:\n  '*': {alpha: 5, unused_elsewhere: 1}\n  01_good: {name: smoky}\ntypo:\n  01_good: {alpah: 1}\n"
    )
    monkeypatch.setenv("NBSUPPORT_ROOT", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_PROFILES", str(prof))
    for k in ("NBSUPPORT_RUN_DIR", "NBSUPPORT_NOTEBOOK", "NBSUPPORT_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def test_parse_values():
    assert runner.parse_overrides(
        [
            "a=3",
            "b=0.1",
            "c=true",
            "d=[1, 2]",
            "e=hello world",
            "f=none",
            "g=null",
            "h=x=y",
            "i=1e-3",
            "j=[a, 0.5]",
            "k={",
        ]
    ) == {
        "a": 3,
        "b": 0.1,
        "c": True,
        "d": [1, 2],
        "e": "hello world",
        "f": "none",
        "g": None,
        "h": "x=y",
        "i": "1e-3",
        "j": ["a", 0.5],
        "k": "{",
    }  # YAML 1.1: 1e-3 (no dot) stays text
    assert runner.parse_overrides(["a=1", "a=2"]) == {"a": 2}
    for bad in (["novalue"], ["=3"]):
        with pytest.raises(runner.RunError, match="key=value"):
            runner.parse_overrides(bad)


def test_notebook_selection_and_parameter_resolution(project):
    nbs = project / "notebooks"
    assert [p.name for p in runner.find_notebooks()] == ["01_good.ipynb", "02_bad.ipynb", "03_noparams.ipynb"]
    assert runner.find_notebooks(["02_bad", str(nbs / "01_good.ipynb"), "02_bad.ipynb"]) == [
        nbs / "02_bad.ipynb",
        nbs / "01_good.ipynb",
    ]  # stems and paths, duplicates dropped
    profiles = runner.load_profiles()
    # "*" only where declared (unused_elsewhere dropped), then the notebook entry, then -p; profile injected
    plan = runner.plan_run(["01_good", "02_bad"], "smoke", {"sizes": [3], "beta": 7}, profiles)
    assert plan == [
        (nbs / "01_good.ipynb", {"alpha": 5, "name": "smoky", "sizes": [3], "profile": "smoke"}),
        (nbs / "02_bad.ipynb", {"beta": 7}),
    ]
    assert runner.plan_run(["01_good"], "smoke", {"alpha": 0.5}, profiles)[0][1]["alpha"] == 0.5


def test_bad_requests_execute_nothing(project, capsys):
    out = project / "runs" / "bad"
    other = project / "other.yaml"
    other.write_text("fast: {}\n")
    for argv, msgs in [
        (["run", "--profile", "nope"], ["unknown profile 'nope'; profiles: smoke, typo"]),
        (["run", "--profile", "smoke", "--profiles", str(other)], ["unknown profile 'smoke'; profiles: fast"]),
        (["run", "01_good", "-p", "alhpa=3"], ["alhpa", "declared: alpha, name, profile, sizes"]),
        (["run", "01_good", "-p", "beta=3"], ["beta"]),  # declared by 02_bad only, which is not selected
        (["run", "04_missing"], ["unknown notebook '04_missing'", "available: 01_good, 02_bad, 03_noparams"]),
        (["run", "03_noparams"], ["03_noparams.ipynb has no cell tagged 'parameters'"]),
        (["run", "01_good", "--profile", "typo"], ["alpah", "01_good", "declares only: profile, alpha, name, sizes"]),
        (["run", "-p", "alpha"], ["must look like key=value"]),
    ]:
        assert nbmain.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        for msg in msgs:
            assert msg in err, (argv, err)
    assert not out.exists() and not (project / "runs").exists()


def test_kernel_check(monkeypatch):
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel

    assert runner.check_kernel() == sys.executable  # the venv's own kernel on this machine

    def missing(self, name):
        raise NoSuchKernel(name)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)
    with pytest.raises(runner.RunError, match=re.escape(f"{sys.executable} -m ipykernel install --sys-prefix")):
        runner.check_kernel()
    alien = KernelSpec(argv=["/nonexistent/bin/python", "-m", "ipykernel_launcher"], resource_dir="/x")
    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", lambda self, name: alien)
    monkeypatch.setattr(sys, "base_prefix", "/somewhere/else")  # as inside a virtual environment
    with pytest.raises(runner.RunError, match="runs '/nonexistent/bin/python', not this interpreter"):
        runner.check_kernel()


def test_run_good_and_failing_notebooks(project, capsys):
    out = project / "runs" / "r1"
    code = nbmain.main(
        [
            "run",
            str(project / "notebooks" / "01_good.ipynb"),
            "02_bad",
            "--profile",
            "smoke",
            "-p",
            "sizes=[3, 4]",
            "-p",
            "alpha=2.5",
            "--out",
            str(out),
        ]
    )
    assert code == 1  # one notebook failed, the other still ran
    stdout = capsys.readouterr().out
    assert re.search(r"^\[1/2\] 01_good \.\.\. ok \(\d+\.\d s, 1 figure\)$", stdout, re.M), stdout
    assert re.search(
        r"^\[2/2\] 02_bad \.\.\. failed \(\d+\.\d s, 0 figures\): ZeroDivisionError: planted failure$", stdout, re.M
    ), stdout

    # injected values, environment and interpreter as the kernel saw them
    seen = json.loads((out / "seen.json").read_text())
    assert seen == {
        "alpha": 2.5,
        "name": "smoky",
        "sizes": [3, 4],
        "profile": "smoke",
        "cwd": str(project / "notebooks"),
        "python": sys.executable,
        "env": {"NBSUPPORT_NOTEBOOK": "01_good", "NBSUPPORT_PROFILE": "smoke", "NBSUPPORT_RUN_DIR": str(out)},
    }
    assert "NBSUPPORT_NOTEBOOK" not in os.environ  # restored after the run

    # executed copies (with the figure inline), figures as PNG + PDF
    executed = nbformat.read(out / "notebooks" / "01_good.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert any("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    assert (out / "notebooks" / "02_bad.ipynb").is_file()
    assert (out / "figures" / "01_good" / "line_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figures" / "01_good" / "line_plot.pdf").read_bytes()[:4] == b"%PDF"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == "smoke" and summary["ok"] is False
    assert summary["overrides"] == {"sizes": [3, 4], "alpha": 2.5}
    st = {r["notebook"]: r for r in summary["notebooks"]}
    assert list(st) == ["01_good", "02_bad"]
    assert st["01_good"]["status"] == "ok" and st["01_good"]["figures"] == ["figures/01_good/line_plot.png"]
    assert st["01_good"]["parameters"] == {"alpha": 2.5, "name": "smoky", "sizes": [3, 4], "profile": "smoke"}
    assert 0 < st["01_good"]["seconds"] < 120
    assert st["02_bad"]["status"] == "failed" and st["02_bad"]["error"] == "ZeroDivisionError: planted failure"

    md = (out / "summary.md").read_text()
    assert "profile `smoke`" in md and "`sizes=[3, 4]`" in md and "1/2 notebooks ok" in md
    assert re.search(
        r"\| \[01_good\]\(notebooks/01_good\.ipynb\) \| ok \| \d+\.\d \| "
        r"\[line_plot\]\(figures/01_good/line_plot\.png\) \|  \|",
        md,
    ), md
    assert "| failed |" in md and "ZeroDivisionError: planted failure" in md

    log = (out / "run.log").read_text()
    assert "[2/2] 02_bad ... failed" in log and "raise ZeroDivisionError('planted failure')" in log  # traceback


def test_module_entry_point(project, monkeypatch, capsys):
    assert nbmain.main([]) == 0 and "run" in capsys.readouterr().out  # no command: help
    # a missing optional module is skipped; a missing dependency inside a module propagates
    monkeypatch.setattr(nbmain, "CLI_MODULES", ("notebook.runner", "no_such_module"))
    assert "run" in nbmain.build_parser().format_help()

    real_import = nbmain.importlib.import_module

    def broken(name):
        if name == "nbsupport.no_such_module":
            raise ModuleNotFoundError("No module named 'somedep'", name="somedep")
        return real_import(name)

    monkeypatch.setattr(nbmain.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedep"):
        nbmain.build_parser()
    # the real `python -m nbsupport` propagates the exit code
    proc = subprocess.run(
        [sys.executable, "-m", "nbsupport", "run", "--profile", "nope"],
        capture_output=True,
        text=True,
        cwd=Path(runner.__file__).parents[2],
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown profile 'nope'" in proc.stderr


def test_error_summary_lines():
    from nbclient.exceptions import CellTimeoutError
    from papermill.exceptions import PapermillExecutionError

    e = PapermillExecutionError(1, 1, "x = 1/0", "ZeroDivisionError", "\x1b[31mdivision by zero\x1b[0m\nmore", [])
    assert runner.error_summary(e) == "ZeroDivisionError: division by zero"
    msg = "-----\nA cell timed out while it was being executed, after 1 seconds.\n-----\nsleep(5)"
    assert runner.error_summary(CellTimeoutError(msg)) == (
        "CellTimeoutError: A cell timed out while it was being executed, after 1 seconds."
    )
    assert runner.error_summary(RuntimeError("x" * 500)).endswith("...")


def test_default_run_folder_and_interrupt(project, monkeypatch):
    """Without executing: runs/<YYYYmmdd-HHMMSS>-<profile>/ (never reused), and Ctrl-C still writes a summary."""
    import papermill

    calls = []

    def fake_execute(src, dst, **kw):
        calls.append((Path(src).stem, kw["parameters"], kw["kernel_name"], kw["cwd"]))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    first = runner.run(["01_good"], "smoke", log=lambda m: None)
    run_dir = Path(first["run_dir"])
    assert re.fullmatch(r"\d{8}-\d{6}-smoke", run_dir.name) and run_dir.parent == project / "runs"
    assert first["ok"] and calls[0] == (
        "01_good",
        {"alpha": 5, "name": "smoky", "profile": "smoke"},
        "python3",
        str(project / "notebooks"),
    )
    with pytest.raises(KeyboardInterrupt):
        runner.run(["01_good", "02_bad"], "smoke", out=run_dir, log=lambda m: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["status"] for r in summary["notebooks"]] == ["interrupted"] and summary["ok"] is False
    frozen = datetime.datetime(2030, 1, 2, 3, 4, 5)
    monkeypatch.setattr(runner, "_dt", SimpleNamespace(datetime=SimpleNamespace(now=lambda: frozen)))
    a, b = runner.run(["02_bad"], "smoke", log=lambda m: None), runner.run(["02_bad"], "smoke", log=lambda m: None)
    assert [Path(a["run_dir"]).name, Path(b["run_dir"]).name] == ["20300102-030405-smoke", "20300102-030405-smoke-2"]


def test_required_parameters_stop_the_run_before_anything_executes(project, capsys):
    prof = project / "profiles.yaml"
    prof.write_text(
        "paper:\n  01_good: {name: {required: 'a PASCAL VOC root (VOCdevkit/VOC2012 with JPEGImages/)'}}\n"
        "  02_bad: {beta: 3}\n"
    )
    out = project / "runs" / "p"
    assert nbmain.main(["run", "01_good", "02_bad", "--profile", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: profile 'paper': 01_good needs -p name=... (a PASCAL VOC root (VOCdevkit/VOC2012 with JPEGImages/))"
    )
    assert not out.exists()
    # given with -p, the requirement is met (plan only: nothing executes here)
    plan = runner.plan_run(["01_good"], "paper", {"name": "/data/VOC2012"}, runner.load_profiles())
    assert plan[0][1]["name"] == "/data/VOC2012"
    # a notebook that does not need it is unaffected
    assert runner.plan_run(["02_bad"], "paper", {}, runner.load_profiles())[0][1] == {"beta": 3}


def test_fixture_settings_substitute_the_fixture_folder(project, monkeypatch):
    prof = project / "profiles.yaml"
    prof.write_text(
        "fixture:\n  _settings: {fixtures: true}\n  01_good: {name: '{fixtures}/VOCdevkit/VOC2012', sizes: ['{fixtures}/a', 2]}\n"
        "wrong:\n  _settings: {fixturez: true}\n"
    )
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(project / "gen"))
    with pytest.raises(runner.RunError, match=r"unknown settings \['fixturez'\]; known: \['fixtures'\]"):
        runner.load_profiles()
    prof.write_text(prof.read_text().split("wrong:")[0])
    profiles = runner.load_profiles()
    assert runner.profile_settings(profiles, "fixture") == {"fixtures": True}
    params = runner.plan_run(["01_good"], "fixture", {}, profiles)[0][1]
    root = str(project / "gen" / "fixtures")
    assert params["name"] == f"{root}/VOCdevkit/VOC2012" and params["sizes"] == [f"{root}/a", 2]


def test_figure_note_marks_fixture_figures(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nbsupport.notebook import viz

    monkeypatch.setenv("NBSUPPORT_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_NOTEBOOK", "nb")
    fig, _ = plt.subplots()
    viz.save_figure(fig, "plain")
    assert [t.get_text() for t in fig.texts] == []
    monkeypatch.setenv("NBSUPPORT_FIGURE_NOTE", runner.FIGURE_NOTE)
    viz.save_figure(fig, "noted")
    viz.save_figure(fig, "noted again")  # the note is written once
    assert [t.get_text() for t in fig.texts] == ["random weights, fixture data"]
    plt.close(fig)


def test_the_paper_profile_never_runs_a_notebook_without_its_data(capsys):
    """Every notebook of the real profiles: `paper` without -p stops before anything executes, naming the
    parameter; the `fixture` profile gives every required parameter a fixture path."""
    profiles = runner.load_profiles(runner.PROFILES_FILE)
    for nb in runner.available_notebooks():
        with pytest.raises(runner.RunError, match=rf"profile 'paper': {nb.stem} needs -p \w+=\.\.\. \(.+\)"):
            runner.plan_run([nb.stem], "paper", {}, profiles)
        required = [k for k, v in profiles["paper"][nb.stem].items() if runner._required(v)]
        fixture = profiles["fixture"][nb.stem]
        assert all(str(fixture.get(k, "")).startswith("{fixtures}") or k == "weights" for k in required), nb.stem
    code = subprocess.run(
        [sys.executable, "-m", "nbsupport", "run", "--profile", "paper", "04_group_token_embeddings"],
        capture_output=True,
        text=True,
        cwd=Path(runner.__file__).parents[2],
        timeout=120,
    )
    assert code.returncode == 2 and "needs -p dataset_root=... (voc:" in code.stderr and code.stdout == ""

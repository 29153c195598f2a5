"""The papermill runner: run folder, summary, failures, bad requests (nothing executed)."""
import json

import nbformat
import pytest

from nbsupport import runner
from nbsupport.__main__ import main as cli_main


def make_nb(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    p = nbformat.v4.new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "nbsupport").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    make_nb(nbs / "01_good.ipynb", 'profile = "interactive"\nalpha = 1\nname = "x"\nsizes = [1]\n',
            "import json, os\nimport matplotlib.pyplot as plt\nfrom nbsupport import viz\n"
            "fig, ax = plt.subplots()\nax.plot([1, 2], [alpha, alpha])\nviz.save_figure(fig, 'line plot')\n"
            "json.dump({'alpha': alpha, 'name': name, 'sizes': sizes, 'profile': profile, 'cwd': os.getcwd()},"
            " open(os.path.join(os.environ['NBSUPPORT_RUN_DIR'], 'seen.json'), 'w'))\n")
    make_nb(nbs / "02_bad.ipynb", "beta = 2\n", "raise ZeroDivisionError('planted failure')\n")
    make_nb(nbs / "03_noparams.ipynb", "gamma = 3\n", "pass\n")
    nb = nbformat.read(nbs / "03_noparams.ipynb", as_version=4)
    nb.cells[0].metadata["tags"] = []
    nbformat.write(nb, nbs / "03_noparams.ipynb")
    prof = tmp_path / "profiles.yaml"
    prof.write_text("smoke:\n  '*': {alpha: 5, unused_elsewhere: 1}\n  01_good: {name: smoky}\n"
                    "typo:\n  01_good: {alpah: 1}\n")
    monkeypatch.setenv("NBSUPPORT_ROOT", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_PROFILES", str(prof))
    return tmp_path


def test_parse_values():
    assert runner.parse_overrides(["a=3", "b=0.1", "c=true", "d=[1, 2]", "e=hello world", "f=none"]) == {
        "a": 3, "b": 0.1, "c": True, "d": [1, 2], "e": "hello world", "f": "none"}
    with pytest.raises(runner.RunError, match="key=value"):
        runner.parse_overrides(["novalue"])


def test_run_good_and_failing_notebooks(project):
    out = project / "runs" / "r1"
    code = cli_main(["run", "01_good", "02_bad", "--profile", "smoke", "-p", "sizes=[3, 4]", "--out", str(out)])
    assert code == 1  # one notebook failed, the other still ran
    seen = json.loads((out / "seen.json").read_text())
    assert seen == {"alpha": 5, "name": "smoky", "sizes": [3, 4], "profile": "smoke",
                    "cwd": str(project / "notebooks")}
    assert (out / "notebooks" / "01_good.ipynb").is_file() and (out / "notebooks" / "02_bad.ipynb").is_file()
    assert (out / "figures" / "01_good" / "line_plot.png").is_file()
    assert (out / "figures" / "01_good" / "line_plot.pdf").is_file()
    summary = json.loads((out / "summary.json").read_text())
    st = {r["notebook"]: r for r in summary["notebooks"]}
    assert st["01_good"]["status"] == "ok" and st["01_good"]["figures"] == ["figures/01_good/line_plot.png"]
    assert st["02_bad"]["status"] == "failed" and "planted failure" in st["02_bad"]["error"]
    md = (out / "summary.md").read_text()
    assert "| [01_good](notebooks/01_good.ipynb) | ok |" in md and "ZeroDivisionError" in md


def test_bad_requests_execute_nothing(project, capsys):
    out = project / "runs" / "bad"
    for argv, msg in [
        (["run", "--profile", "nope"], "unknown profile 'nope'; profiles: smoke, typo"),
        (["run", "01_good", "-p", "alhpa=3"], "alhpa"),
        (["run", "04_missing"], "unknown notebook '04_missing'"),
        (["run", "03_noparams"], "no cell tagged 'parameters'"),
        (["run", "01_good", "--profile", "typo"], "alpah"),
    ]:
        assert cli_main([*argv, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()

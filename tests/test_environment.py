"""environment.yml (conda users) lists exactly the pinned packages of requirements.txt."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_requirements():
    reqs = {
        l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")
    }
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p for p in pip if p != "-e ."} == reqs
    assert "python=3.11" in env["dependencies"]

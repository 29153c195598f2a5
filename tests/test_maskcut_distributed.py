"""MaskCut under torchrun (2 CPU processes, gloo): the merged output equals a single-process run, and a run
killed part-way resumes rank by rank without recomputing the finished images."""

import json
import os
import socket
import subprocess
import sys

import pytest

from nbsupport.data import synthetic
from nbsupport.maskcut import cli

COMMON = ["--backbone", "random_tiny8", "--size", "64", "--tau", "median", "--batch-size", "3", "--n-masks", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "nbsupport", "maskcut", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = synthetic.make_dataset(tmp_path_factory.mktemp("syn"), 7, seed=1, size=64, split="val")
    (root / "images" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n garbage")
    return root / "images"


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    """The output of an uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("single") / "ann.json"
    assert cli.main(["maskcut", "--images", str(images), "--out", str(out), "--device", "cpu", *COMMON]) == 0
    return json.loads(out.read_text())


def test_torchrun_merge_equals_single_process(images, single, tmp_path):
    out = tmp_path / "ann.json"
    r = torchrun(["--images", str(images), "--out", str(out), *COMMON])
    assert r.returncode == 0, r.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert [im["id"] for im in merged["images"]] == list(range(1, 8))  # 8 files, the corrupt one is id 8
    assert merged == single  # same ids, file names, RLEs, annotation ids
    report = json.loads((tmp_path / "ann.report.json").read_text())
    assert report["world"] == 2 and report["images"] == 8 and report["computed"] == 8 and report["resumed"] == 0
    assert [f["file"] for f in report["failed"]] == ["zz_corrupt.png"]
    assert [r["shard"] for r in report["ranks"]] == ["0/2", "1/2"] and [r["images"] for r in report["ranks"]] == [4, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.json", "ann.report.json"]  # shard files removed


def test_torchrun_kill_and_resume(images, single, tmp_path):
    out = tmp_path / "ann.json"
    args = ["--images", str(images), "--out", str(out), *COMMON]
    r = torchrun(args, {"NBSUPPORT_MASKCUT_FAIL_AFTER": "2"})  # every rank dies after 2 of its 4 images
    assert r.returncode != 0 and "simulated crash" in r.stderr
    assert not out.exists()
    partials = [tmp_path / f"ann.rank{k}of2.json.partial.jsonl" for k in range(2)]
    kept = [len(p.read_text().splitlines()) if p.exists() else 0 for p in partials]
    assert 2 in kept and all(0 <= n <= 2 for n in kept)  # the sibling may be stopped before its 2nd record
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    for k, n in enumerate(kept):
        assert f"4 images in shard {k}/2, {n} already done" in r.stdout
    assert json.loads(out.read_text()) == single
    report = json.loads((tmp_path / "ann.report.json").read_text())
    assert [x["resumed"] for x in report["ranks"]] == kept  # finished images were not recomputed
    assert [x["computed"] for x in report["ranks"]] == [4 - n for n in kept]
    assert report["resumed"] + report["computed"] == 8 and report["images"] == 8
    assert not any(p.exists() for p in partials)


def test_torchrun_reuses_an_interrupted_single_process_run(images, single, tmp_path, monkeypatch):
    out = tmp_path / "ann.json"
    args = ["--images", str(images), "--out", str(out), *COMMON]
    monkeypatch.setenv("NBSUPPORT_MASKCUT_FAIL_AFTER", "3")
    with pytest.raises(SystemExit, match="simulated crash after 3 images"):
        cli.main(["maskcut", *args, "--device", "cpu"])
    monkeypatch.delenv("NBSUPPORT_MASKCUT_FAIL_AFTER")
    (tmp_path / "ann.rank0of3.json.partial.jsonl").write_text("")  # another world size, nothing done
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text()) == single
    report = json.loads((tmp_path / "ann.report.json").read_text())
    # images 1-3 were done: ids 1, 3 belong to rank 0 and id 2 to rank 1
    assert [x["resumed"] for x in report["ranks"]] == [2, 1] and report["computed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.json", "ann.report.json"]

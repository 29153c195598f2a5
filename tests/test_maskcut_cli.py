"""MaskCut command line: resume after a crash without duplicates or losses, shards + merge, bad images."""

import json
import os
import subprocess
import sys

import pytest

from nbsupport.data import synthetic


def run_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "nbsupport", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = synthetic.make_dataset(tmp_path_factory.mktemp("syn"), 7, seed=1, size=64, split="val")
    (root / "images" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n garbage")
    return root / "images"


COMMON = ["--backbone", "random_tiny8", "--size", "64", "--tau", "median", "--batch-size", "3", "--n-masks", "2"]


def test_resume_after_crash(images, tmp_path):
    out = tmp_path / "ann.json"
    r = run_cli(["maskcut", "--images", str(images), "--out", str(out), *COMMON], {"NBSUPPORT_MASKCUT_FAIL_AFTER": "4"})
    assert r.returncode != 0 and "simulated crash" in r.stderr
    partial = tmp_path / "ann.json.partial.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 4 and not out.exists()
    with open(partial, "a") as fh:
        fh.write('{"key": "torn li')  # a line cut by the kill
    r = run_cli(["maskcut", "--images", str(images), "--out", str(out), *COMMON])
    assert r.returncode == 0, r.stderr
    assert "4 already done" in r.stdout
    data = json.loads(out.read_text())
    ids = [im["id"] for im in data["images"]]
    assert ids == sorted(set(ids)) and len(ids) == 7  # 7 good images, none twice, none lost
    report = json.loads((tmp_path / "ann.report.json").read_text())
    assert [f["file"] for f in report["failed"]] == ["zz_corrupt.png"]
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) > 0
    assert all(a["image_id"] in ids for a in data["annotations"])
    assert not partial.exists()


def test_shards_merge_to_the_single_run(images, tmp_path):
    single = tmp_path / "single.json"
    assert run_cli(["maskcut", "--images", str(images), "--out", str(single), *COMMON]).returncode == 0
    shards = []
    for i in range(2):
        s = tmp_path / f"shard{i}.json"
        assert (
            run_cli(["maskcut", "--images", str(images), "--out", str(s), "--shard", f"{i}/2", *COMMON]).returncode == 0
        )
        shards.append(str(s))
    merged = tmp_path / "merged.json"
    assert run_cli(["maskcut-merge", *shards, "--out", str(merged)]).returncode == 0
    a, b = json.loads(single.read_text()), json.loads(merged.read_text())
    assert a["images"] == b["images"]
    strip = lambda anns: [{k: v for k, v in x.items() if k != "id"} for x in anns]  # noqa: E731
    assert strip(a["annotations"]) == strip(b["annotations"])
    bad = run_cli(["maskcut", "--images", str(images), "--out", str(tmp_path / "x.json"), "--shard", "2/2", *COMMON])
    assert bad.returncode == 2 and "--shard" in bad.stderr


def test_failing_image_is_recorded_and_the_run_goes_on(images, tmp_path, monkeypatch):
    import torch

    from nbsupport.maskcut import cli

    args = ["maskcut", "--images", str(images), "--device", "cpu", *COMMON]
    assert cli.main([*args, "--out", str(tmp_path / "ref.json")]) == 0
    real, singles, message = cli.image_masks, [], "CUDA out of memory. Tried to allocate 2.00 GiB"

    def out_of_memory(model, ims, *a, **k):  # every batch runs out of memory, and so does the 2nd image alone
        if len(ims) == 1:
            singles.append(1)
        if len(ims) > 1 or len(singles) == 2:
            raise torch.cuda.OutOfMemoryError(message)
        return real(model, ims, *a, **k)

    monkeypatch.setattr(cli, "image_masks", out_of_memory)
    assert cli.main([*args, "--out", str(tmp_path / "oom.json")]) == 0
    assert len(singles) == 7  # batches of 3, 3, 1: the first two retried image by image
    report = json.loads((tmp_path / "oom.report.json").read_text())
    oom_err, load_err = report["failed"]
    assert oom_err == {"file": "val_000001.png", "image_id": 2, "error": "OutOfMemoryError: " + message}
    assert (load_err["file"], load_err["image_id"]) == ("zz_corrupt.png", 8) and "corrupt" in load_err["error"]
    ref, oom = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "oom.json").read_text())
    assert [im["id"] for im in oom["images"]] == [1, 3, 4, 5, 6, 7]
    rles = lambda d: [(a["image_id"], a["segmentation"]) for a in d["annotations"] if a["image_id"] != 2]  # noqa: E731
    assert rles(oom) == rles(ref) and len(rles(ref)) > 0


def test_torchrun_environment_refuses_shard(images, tmp_path, monkeypatch):
    from nbsupport.maskcut import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["maskcut", "--images", str(images), "--out", str(tmp_path / "a.json"), "--shard", "0/2", *COMMON]
    assert cli.main(args) == 2 and not (tmp_path / "a.json").exists()

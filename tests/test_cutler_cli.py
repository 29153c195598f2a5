"""`python -m nbsupport cutler train|predict|eval|selftrain` end to end on the smoke recipe (CPU, 64 px)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from nbsupport.__main__ import main as nbmain
from nbsupport.core.config import read_config
from nbsupport.data.synthetic import make_dataset
from nbsupport.training import cutler as C

torch.set_num_threads(1)


def run_cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "nbsupport", "cutler", *args], capture_output=True, text=True, env=env, timeout=300
    )


SMALL = [
    "-o",
    "min_size=[64]",
    "-o",
    "max_size=64",
    "-o",
    "min_size_test=64",
    "-o",
    "max_iter=2",
    "-o",
    "checkpoint_period=1",
    "--no-progress",
]
SMALL_VALUES = {"min_size": [64], "max_size": 64, "min_size_test": 64, "max_iter": 2, "checkpoint_period": 1}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("syn"), 4, seed=4, size=64, split="train")
    (root / "images" / "zz.png").write_bytes(b"not a png")  # a corrupt image listed in the JSON
    data = json.loads((root / "instances_train.json").read_text())
    data["images"].append({"id": 999, "file_name": "zz.png", "height": 64, "width": 64})
    data["annotations"].append({**data["annotations"][0], "id": 9999, "image_id": 999})
    (root / "instances_train.json").write_text(json.dumps(data))
    return root / "instances_train.json"


def test_cli_train_predict_eval_selftrain(syn, tmp_path, capsys):
    r = run_cli(["train", "--config", "smoke", "--train-json", str(syn), "--out", str(tmp_path / "r0"), *SMALL])
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["iteration"] == 2 and summary["problems"].get("unreadable image", 0) >= 0
    assert (tmp_path / "r0" / "model_final.pth").is_file() and (tmp_path / "r0" / "metrics.jsonl").is_file()
    assert len((tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()) == 2
    # the merged config is in the run folder (recipe smoke < -o < --train-json) and in the checkpoint
    run_cfg = read_config(C.CutlerConfig, tmp_path / "r0")
    assert (run_cfg.arch, run_cfg.min_size, run_cfg.max_iter, run_cfg.train_json) == ("resnet18", [64], 2, str(syn))
    assert run_cfg == C.load_config("smoke", {**SMALL_VALUES, "train_json": str(syn)})
    restored = C.load_trained(tmp_path / "r0" / "model_final.pth")
    assert restored.transform.min_size == (64,) and restored.roi_heads.box_head[0].fc6.out_features == 256

    preds = tmp_path / "preds.json"
    # the other actions in-process (same parser, no interpreter start-up)
    with pytest.warns(RuntimeWarning, match="zz.png"):
        assert (
            nbmain(
                [
                    "cutler",
                    "predict",
                    "--checkpoint",
                    str(tmp_path / "r0" / "model_final.pth"),
                    "--json",
                    str(syn),
                    "--out",
                    str(preds),
                    "--detections",
                    "30",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    dets = json.loads(preds.read_text())
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert dets and max(per_image.values()) <= 30 and 999 not in per_image  # corrupt image skipped

    capsys.readouterr()
    assert nbmain(["cutler", "eval", "--gt", str(syn), "--pred", str(preds), "--out", str(tmp_path / "t.csv")]) == 0
    printed = capsys.readouterr().out
    assert "without_overlap" in printed and "only_overlap" in printed
    assert (tmp_path / "t.csv").read_text().startswith("split,images,box AP")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert (
            nbmain(
                [
                    "cutler",
                    "selftrain",
                    "--config",
                    "smoke",
                    "--train-json",
                    str(syn),
                    "--init",
                    str(tmp_path / "r0" / "model_final.pth"),
                    "--round",
                    "1",
                    "--out",
                    str(tmp_path / "st"),
                    "-o",
                    "selftrain={max_iter: 1, steps: [], lr: 0.001, warmup_iters: 1}",
                    *SMALL,
                ]
            )
            == 0
        )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["score_thresh"] == 0.7 and out["iteration"] == 1
    pseudo = json.loads((tmp_path / "st" / "pseudo_round1.json").read_text())
    assert len(pseudo["images"]) == 5 and all(a["category_id"] == 1 for a in pseudo["annotations"])
    ck = torch.load(tmp_path / "st" / "train" / "model_final.pth", weights_only=True)
    assert ck["config"]["drop_loss"] is False and ck["config"]["copy_paste_scale"] == [0.5, 1.0]

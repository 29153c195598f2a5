"""`torchrun --nproc_per_node 2` on CPU (gloo): DDP training runs, ranks share one metrics log and checkpoint,
and each rank reads its own DistributedSampler shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbsupport.data.synthetic import make_dataset
from nbsupport.training import cutler as C
from nbsupport.training.common import read_metrics


def test_torchrun_two_processes_cpu(tmp_path):
    root = make_dataset(tmp_path / "syn", 4, seed=0, size=64, split="train")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside the interpreter")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "nbsupport",
            "cutler",
            "train",
            "--config",
            "smoke",
            "--train-json",
            str(root / "instances_train.json"),
            "--out",
            str(tmp_path / "out"),
            "-o",
            "min_size=[64]",
            "-o",
            "max_size=64",
            "-o",
            "max_iter=2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 2 and all(s["world_size"] == 2 and s["iteration"] == 2 for s in summaries)
    assert [rec["iter"] for rec in read_metrics(tmp_path / "out")] == [1, 2]  # rank 0 logs once per iteration
    assert (tmp_path / "out" / "model_final.pth").is_file()
    # the two ranks' shards of every epoch partition the dataset (batch 2 = 1 image per rank)
    s0, s1 = C.StreamSampler(4, 0, 0, 2), C.StreamSampler(4, 0, 1, 2)
    assert sorted(s0.epoch_indices(0) + s1.epoch_indices(0)) == [0, 1, 2, 3]

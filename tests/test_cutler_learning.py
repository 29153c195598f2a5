"""CutLER learns: overfitting two synthetic images drives the training loss down (a real optimisation check)."""

import numpy as np
import pytest
import torch

from nbsupport.data.synthetic import make_dataset
from nbsupport.training import cutler as C
from nbsupport.training.common import read_metrics

torch.set_num_threads(1)

TINY = {
    "arch": "resnet18",
    "min_size": [64],
    "max_size": 64,
    "min_size_test": 64,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "box_batch_size_per_image": 32,
    "representation_size": 256,
    "batch_size": 2,
    "num_workers": 0,
    "device": "cpu",
    "log_period": 1,
}


@pytest.mark.parametrize("head, ratio", [("mask_rcnn", 0.6), ("cascade", 0.72)])
def test_training_reduces_the_loss(tmp_path, head, ratio):
    """Overfitting 2 images for 14 steps (copy-paste off) must bring the total loss well below its start,
    with either head (the cascade sums three stages' losses, the later ones on few positives at IoU 0.6 /
    0.7, and falls more slowly: measured 0.66 of its start, against 0.5 for the plain head)."""
    root = make_dataset(tmp_path / "two", 2, seed=7, size=64, split="train")
    cfg = C.load_config(
        "smoke",
        dict(
            TINY,
            train_json=str(root / "instances_train.json"),
            head=head,
            max_iter=14,
            steps=[],
            warmup_iters=3,
            lr=0.01,
            copy_paste=False,
            checkpoint_period=100,
        ),
    )
    C.train(cfg, tmp_path / "o", progress=False)
    loss = [r["loss"] for r in read_metrics(tmp_path / "o")]
    assert len(loss) == 14 and np.mean(loss[-3:]) < ratio * np.mean(loss[:2]), loss

"""The supervised stand-ins: their recipes train (the loss falls on tiny inputs) and the shipped weights load
by name, say what they are, and beat their random-init floors on synthetic validation scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbsupport.training.common import read_metrics
from nbsupport.training.standins import cli
from nbsupport.training.standins.data import cell_majority, crop_batch, scene_pool


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("NBSUPPORT_GENERATED", str(tmp_path / "generated"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_cell_majority_and_crops():
    lab = np.zeros((16, 16), np.int64)
    lab[:8, :8] = 3  # one whole cell
    lab[8:13, 8:16] = 2  # 40 of 64 pixels: the majority
    lab[0:3, 8:16] = 1  # 24, 24 and 16 pixels: no label covers half the cell
    lab[3:6, 8:16] = 2
    assert cell_majority(lab, 8, 4).tolist() == [[3, -1], [0, 2]]
    pool = scene_pool(2, 32, split="val", cache=False)
    b = crop_batch(pool.batch(torch.arange(2)), 16, 8, torch.Generator().manual_seed(0))
    assert b["images"].shape == (2, 3, 16, 16) and b["semantic"].shape == (2, 2, 2)
    present = (b["semantic"][..., None] == torch.arange(1, 7)).flatten(1, 2).any(1)
    assert torch.equal(b["classes"].bool(), present)


def test_vit_recipe_trains(tmp_path):
    over = ["n_train=4", "image_size=32", "crop_size=0", "batch_size=4", "steps=8", "lr=2e-3", "warmup_steps=2"]
    over += ["max_minutes=0", "val_images=0", "log_every=1", "flip=false", "channel_shuffle=false"]
    cfg = cli.config_for("tiny_vit_synth_supervised", over, {"out": str(tmp_path / "vit")})
    assert cfg.kind == "vit" and (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (8, 128, 4, 4)
    r = cli.run(cfg, "test")
    loss = _losses(tmp_path / "vit")
    assert r["steps"] == 8 and len(loss) == 8
    assert np.mean(loss[-3:]) < 0.8 * loss[0]
    from nbsupport.models import backbones

    m = backbones.load(tmp_path / "vit" / "final.safetensors")
    assert m.nbs_info["num_heads"] == 4 and "supervised stand-in (synthetic world)" in backbones.describe(m)


def test_groupvit_recipe_trains(tmp_path):
    over = [
        "n_train=4",
        "image_size=32",
        "batch_size=4",
        "steps=8",
        "lr=2e-3",
        "warmup_steps=2",
        "init_vit=",
        "mix_size=0",
    ]
    over += ["max_minutes=0", "val_images=0", "log_every=1"]
    cfg = cli.config_for("tiny_groupvit_synth_supervised", over, {"out": str(tmp_path / "gv")})
    assert cfg.kind == "groupvit"
    cli.run(cfg, "test")
    loss = _losses(tmp_path / "gv")
    assert len(loss) == 8 and np.mean(loss[-3:]) < 0.8 * loss[0]
    from nbsupport.models import groupvit as gv

    m = gv.load(tmp_path / "gv" / "final.safetensors")  # fp16 on disk, fp32 in memory
    assert m.cfg.embed_dim == 128 and next(m.parameters()).dtype == torch.float32


def test_shipped_vit_beats_its_random_init():
    from nbsupport.models import backbones
    from nbsupport.training.standins import vit

    model = backbones.load("tiny_vit_synth_supervised")
    assert "supervised stand-in (synthetic world)" in backbones.describe(model)
    assert "tiny_vit_synth_supervised" in backbones.available()
    heads = vit.load_heads(backbones.paths.data_dir() / backbones.SHIPPED["tiny_vit_synth_supervised"])
    val = scene_pool(16, 128, split="val", cache=False)
    trained = vit.patch_accuracy(model, heads.patch, val)["objects"]
    floor = vit.patch_accuracy(backbones.random_like(model), heads.patch, val)["objects"]
    assert trained > 0.6 and trained > floor + 0.3, (trained, floor)


def test_unshipped_groupvit_says_how_to_train_it():
    """The GroupViT stand-in is registered but not shipped (its zero-shot mIoU stays below all-background):
    loading it names the recipe, and a fallback loads a random init that says so."""
    from nbsupport.models import groupvit as gv
    from nbsupport.models.checkpoints import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="standin train --recipe tiny_groupvit_synth_supervised"):
        gv.load("tiny_groupvit_synth_supervised")
    m = gv.load("tiny_groupvit_synth_supervised", fallback="random:small")
    assert m.nbs_info["fallback_for"] == "tiny_groupvit_synth_supervised" and "random-init" in gv.describe(m)

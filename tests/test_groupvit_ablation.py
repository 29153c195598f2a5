"""Table 11 fine-tuning runs (nbsupport.training.groupvit.ablation): regulariser names, the schedule by hand,
one run per row from the same weights, each equal to a plain train() call with that configuration."""

import copy

import pytest
import torch

from nbsupport.models import groupvit as gv
from nbsupport.training.groupvit import ablation as ab
from nbsupport.training.groupvit.loop import train

TINY = dict(n_train=16, image_size=32, batch_size=8, context_length=24, val_images=4, val_size=32, tagger="lexicon")


def test_regulariser_names():
    assert ab.regularisers("none") == () == ab.regularisers("")
    assert ab.regularisers("GE+LE") == ("GE", "LE") and ab.regularisers("SE") == ("SE",)
    with pytest.raises(ValueError, match="unknown regulariser 'XE'"):
        ab.regularisers("GE+XE")


def test_finetune_config_schedule_by_hand(tmp_path):
    c = ab.finetune_config(tmp_path / "a", epochs=3, lr=2e-4, regs=("GE", "SE"), seed=4, n_train=8)
    assert (c.epochs, c.lr, c.min_lr, c.warmup_lr, c.warmup_epochs) == (3, 2e-4, 2e-6, 2e-6, 1.0)
    assert (c.w_ge, c.w_le, c.w_se) == (1.0, 0.0, 1.0) and c.resume is False
    assert (c.seed, c.n_train, c.out_dir) == (4, 8, str(tmp_path / "a"))
    c1 = ab.finetune_config(tmp_path, epochs=1, lr=1e-3)
    assert c1.warmup_epochs == 0.5 and c1.min_lr == pytest.approx(1e-5) and (c1.w_ge, c1.w_le, c1.w_se) == (0, 0, 0)
    with pytest.raises(ValueError, match="w_ge"):
        ab.finetune_config(tmp_path, epochs=1, lr=1e-3, w_ge=2.0)
    with pytest.raises(ValueError, match="unknown regulariser"):
        ab.finetune_config(tmp_path, epochs=1, lr=1e-3, regs=("XE",))


def test_ablation_rows_are_independent_runs_from_the_same_weights(tmp_path, monkeypatch):
    base = gv.build("small", seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    seen = []

    def spy(cfg, model=None, progress=None):
        seen.append(cfg)
        return train(cfg, model=model, progress=progress)

    monkeypatch.setattr(ab, "train", spy)
    cfg = ab.finetune_config(tmp_path / "main", epochs=2, lr=1e-3, threads=1, **TINY)
    rows, models = ab.regulariser_ablation(base, cfg, ["none", "GE"], tmp_path, epochs=1, before=1.5)
    assert [r["Method"] for r in rows] == ["Original", "Fine-tuned", "GE"] and rows[0]["synthetic val mIoU"] == 1.5
    for k, v in base.state_dict().items():  # the starting weights are untouched
        assert torch.equal(v, before[k]), k
    assert [c.out_dir for c in seen] == [str(tmp_path / "ablation_none"), str(tmp_path / "ablation_GE")]
    assert [(c.epochs, c.warmup_epochs, c.w_ge, c.w_le, c.w_se, c.resume) for c in seen] == [
        (1, 0.5, 0.0, 0.0, 0.0, False),
        (1, 0.5, 1.0, 0.0, 0.0, False),
    ]
    assert all((tmp_path / t / "metrics.jsonl").is_file() for t in ("ablation_none", "ablation_GE"))
    # the "none" row is exactly a plain train() of its configuration from a copy of the same weights
    ref_cfg = ab.finetune_config(tmp_path / "ref", epochs=1, lr=1e-3, threads=1, **TINY)
    torch.manual_seed(123)  # finetune seeds the global RNG itself: what came before does not matter
    ref = train(ref_cfg, model=copy.deepcopy(base))
    assert rows[1]["synthetic val mIoU"] == ref["val"]["miou"]
    for (k, a), b in zip(models["none"].state_dict().items(), ref["model"].state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(models["GE"].state_dict()["img_encoder.pos_embed"], before["img_encoder.pos_embed"])
    with pytest.raises(ValueError, match="unknown regulariser"):  # checked before any run starts
        ab.regulariser_ablation(base, cfg, ["none", "XE"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_label_examples_by_hand(tmp_path):
    cfg = ab.finetune_config(tmp_path, epochs=1, lr=1e-3, num_labels=3, label_kind="np+nouns", tagger="lexicon")
    rows, tagger = ab.label_examples(["empty sand"], cfg)
    assert [r["pad mode"] for r in rows] == ["repeat", "pad"]
    assert rows[0]["labels"] == ["empty sand", "sand", "empty sand"] and rows[0]["pad mask"] == [False] * 3
    assert rows[1]["labels"] == ["empty sand", "sand", "<PAD>"] and rows[1]["pad mask"] == [False, False, True]
    assert rows[0]["nouns"] == ["sand"] and rows[0]["noun phrases"] == ["empty sand"]
    assert isinstance(tagger, str) and tagger

"""Table 11 fine-tuning runs (nbsupport.training.groupvit.ablation): regulariser names, the schedule by hand,
one run per row from the same weights, each equal to a plain train() call with that configuration; the
validation (synthetic world as the trainer scores it, or VOC val by GroupViT's protocol after each run on the
COCO captions fixture) and the captions shown."""

import copy
import json

import pytest
import torch

from nbsupport.analysis import zero_shot
from nbsupport.data import caption_labels as textmod
from nbsupport.data import scenes
from nbsupport.data.datasets import coco_object, voc
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

    def spy(cfg, model=None, progress=None, validate=None):
        seen.append(cfg)
        assert validate is None  # synthetic: the trainer's own per-epoch validation
        return train(cfg, model=model, progress=progress, validate=validate)

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
    gb = "img_encoder.layers.0.downsample.assign.q_proj.weight"
    assert not torch.equal(models["GE"].state_dict()[gb], before[gb])
    assert not torch.equal(models["GE"].state_dict()[gb], models["none"].state_dict()[gb])
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


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return voc.write_fixture(base), coco_object.write_fixture(base)


def test_synthetic_validation_is_the_trainers(tmp_path):
    """The synthetic Validation scores what the trainer's per-epoch validation scores (same scenes, names and
    background names) and hands the trainer those scenes."""
    model = gv.build("small", seed=0)
    val = ab.validation(None, n_images=4, size=32, seed=0)
    assert val.synthetic and val.name == "synthetic val" and val.trainer_fields() == {"val_images": 4, "val_size": 32}
    assert val.templates == textmod.TEMPLATES
    images, semantic = scenes.synthetic_scenes(4, 0, 32)
    names, bgs = scenes.synthetic_class_names("name")
    assert val(model)["miou"] == zero_shot.zero_shot_miou(model, images, semantic, names, bgs)["miou"]
    cfg = ab.finetune_config(tmp_path / "s", epochs=1, lr=1e-3, threads=1, **{**TINY, **val.trainer_fields()})
    res = ab.finetune(model, cfg, validate=val)  # the trainer validated: nothing added
    assert [h["type"] for h in res["history"]].count("val") == 1 and "data" not in res["val"]


def test_real_validation_after_each_run_on_coco_captions(tmp_path, trees):
    """Fine-tuning on the official COCO captions layout, validated on VOC val by the protocol after the run
    (the trainer scores nothing): the recorded mIoU is protocol_miou of the fine-tuned model with the
    dataset's class names; Table 11's column names the data."""
    voc_tree, coco_tree = trees
    val = ab.validation("voc", voc_tree["root"]["voc"], "val", 2, 32, 0, 0.95, short_side=32, window=32, stride=16)
    assert not val.synthetic and val.name == "voc val" and val.trainer_fields() == {"val_images": 0}
    assert len(val.data) == 2 and val.data.class_names == list(voc.VOC_CLASSES[1:])
    fields = dict(TINY, batch_size=2, **val.trainer_fields())
    fields.pop("val_size")
    root = coco_tree["root"]
    cfg = ab.finetune_config(
        tmp_path / "main",
        epochs=1,
        lr=1e-3,
        threads=1,
        data=str(root / "annotations/captions_train2017.json"),
        **fields,
    )
    base = gv.build("small", seed=0)
    res = ab.finetune(base, cfg, validate=val)
    assert val.templates == ("a photo of a {}.",)  # GroupViT's evaluation prompt
    ref = zero_shot.protocol_miou(res["model"], val.data, 32, 32, 16, 0.95, val.templates)
    assert res["val"]["miou"] == ref["miou"] and res["val"]["data"] == "voc val"
    assert (res["val"]["epoch"], res["val"]["step"]) == (1, 1)  # 3 captioned images, batch 2: one step
    assert res["history"][-1] is res["val"] and [h["type"] for h in res["history"]].count("val") == 1
    rows, models = ab.regulariser_ablation(base, cfg, ["GE"], tmp_path, before=12.5, validate=val)
    assert list(rows[0]) == ["Model", "Method", "voc val mIoU"] and rows[0]["voc val mIoU"] == 12.5
    ge = zero_shot.protocol_miou(models["GE"], val.data, 32, 32, 16, 0.95, ("a photo of a {}.",))["miou"]
    assert rows[1] == {"Model": "GroupViT", "Method": "GE", "voc val mIoU": ge}
    # the captions shown: the first of each of the file's first images; the synthetic world's examples
    data = json.loads((root / "annotations/captions_train2017.json").read_text())
    first = [next(a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]) for im in data["images"]]
    assert ab.example_captions(cfg, 2) == first[:2] == [coco_tree["captions"][i][0] for i in (9, 25)]
    assert ab.training_data(cfg) == "captions_train2017.json"
    syn = ab.finetune_config(tmp_path / "syn", epochs=1, lr=1e-3)
    assert ab.example_captions(syn) == list(ab.EXAMPLE_CAPTIONS) and ab.training_data(syn) == "synthetic captions"


def test_notebook_table11_rows_leave_the_non_noisy_loss_off():
    """Notebook 08's Table 11 rows follow the thesis: the non-noisy loss (5.10) comes only in Table 13, so the
    parameter is off by default and no profile turns it on."""
    import ast

    import yaml

    from nbsupport.core import paths

    nb = json.loads((paths.project_root() / "notebooks/08_groupvit_finetuning.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    values = {
        t.targets[0].id: ast.literal_eval(t.value)
        for t in ast.parse("".join(params["source"])).body
        if isinstance(t, ast.Assign)
    }
    assert values["non_noisy"] is False
    profiles = yaml.safe_load((paths.project_root() / "nbsupport/notebook/profiles.yaml").read_text())
    assert all(p.get("08_groupvit_finetuning", {}).get("non_noisy", False) is False for p in profiles.values())


def test_real_validation_after_every_epoch(tmp_path, trees):
    """A real dataset's Validation scores the model after each epoch (the Fig 27 curve on the real data), by
    the protocol, with the dataset named in each record."""
    voc_tree, coco_tree = trees
    val = ab.validation("voc", voc_tree["root"]["voc"], "val", 2, 32, 0, 0.95, short_side=32, window=32, stride=16)
    fields = dict(TINY, batch_size=2, **val.trainer_fields())
    fields.pop("val_size")
    data = str(coco_tree["root"] / "annotations/captions_train2017.json")
    cfg = ab.finetune_config(tmp_path / "m", epochs=2, lr=1e-3, threads=1, data=data, **fields)
    seen = []

    def spy(model):
        seen.append(copy.deepcopy(model.state_dict()["img_encoder.layers.0.downsample.assign.q_proj.weight"]))
        return val(model)

    spy.synthetic, spy.name = False, val.name
    res = ab.finetune(gv.build("small", seed=0), cfg, validate=spy)
    recs = [h for h in res["history"] if h["type"] == "val"]
    assert [(r["epoch"], r["step"], r["data"]) for r in recs] == [(1, 1, "voc val"), (2, 2, "voc val")]
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])  # two different models: one per epoch
    ref = zero_shot.protocol_miou(res["model"], val.data, 32, 32, 16, 0.95, val.templates)
    assert recs[-1]["miou"] == ref["miou"] and res["val"] is recs[-1]

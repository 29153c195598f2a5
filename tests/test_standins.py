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
        "freeze_vit=false",
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


def test_shipped_groupvit_groups_and_names_objects():
    """The shipped GroupViT stand-in segments synthetic validation scenes zero-shot (CLIP's 7 templates, the
    notebooks' 128 px) far above all-background and its random init, and its groups are sharp inside
    segments: 47.1 mIoU on 200 scenes when trained, 49.0 on these 48."""
    from nbsupport.analysis import metrics
    from nbsupport.analysis.zero_shot import zero_shot_miou
    from nbsupport.data.scenes import synthetic_class_names, synthetic_scenes
    from nbsupport.models import groupvit as gv
    from nbsupport.training.standins.groupvit import group_stats

    model = gv.load("tiny_groupvit_synth_supervised")
    assert "supervised stand-in (synthetic world)" in gv.describe(model) and model.cfg.img_size == 128
    names, bgs = synthetic_class_names("name")
    imgs, sem = synthetic_scenes(48, 0, 128)
    trained = zero_shot_miou(model, imgs, sem, names, bgs)["miou"]
    floor = zero_shot_miou(gv.load("random:small128"), imgs, sem, names, bgs)["miou"]
    all_bg = metrics.miou(metrics.confusion_matrix(np.zeros_like(sem.numpy()), sem.numpy(), len(names) + 1))
    assert trained > 35 and trained > all_bg + 20 and trained > floor + 30, (trained, all_bg, floor)
    ent = group_stats(model, 16, 128)  # nats; log 4 = 1.39 for a random init everywhere
    assert ent["background"] < 0.1 and ent["objects"] < 0.5, ent


def test_segment_weights_give_every_segment_the_same_weight():
    from nbsupport.training.standins.groupvit import segment_weights

    seg = torch.tensor([[0, 0, 0, 1, -1, 2]])
    w = segment_weights(seg)
    assert torch.allclose(w, torch.tensor([[1 / 9, 1 / 9, 1 / 9, 1 / 3, 0.0, 1 / 3]]))
    assert torch.allclose(segment_weights(seg, balance=False), torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.0, 0.2]]))
    assert torch.equal(segment_weights(torch.full((1, 3), -1)), torch.zeros(1, 3))  # nothing labelled


def test_dense_loss_by_hand():
    """Two patches, each wholly in one group, the groups' embeddings on two of three prompts: the loss is the
    mean of -log softmax(scale * cos) at each patch's label, weighted as given."""
    from types import SimpleNamespace

    from nbsupport.training.standins.groupvit import N_CLASSES, dense_loss

    text = torch.eye(3)[None]  # [T=1, K=3, P=3]
    groups = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.2, 0.0], [0.0, 1.0, 0.0]]]), dim=-1)
    out = SimpleNamespace(attn=torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), group_embeds=groups)  # [B, G, N]
    batch = {"semantic": torch.tensor([[1, 2]]), "background": torch.tensor([0])}
    assert N_CLASSES >= 2
    w = torch.tensor([[0.25, 0.75]])
    logp = (10.0 * groups[0] @ text[0].T).log_softmax(-1)
    want = -(0.25 * logp[0, 0] + 0.75 * logp[1, 1])
    assert torch.allclose(dense_loss(out, text, 10.0, batch, w), want)


def test_text_targets_add_the_template_ensemble():
    from nbsupport.models import groupvit as gv
    from nbsupport.training.standins import groupvit as S
    from nbsupport.training.standins.config import GroupvitConfig

    model = gv.build("small")
    with torch.no_grad():
        z = S.text_targets(model, GroupvitConfig(templates="all"))
        simple = S.text_targets(model, GroupvitConfig(templates="simple"))
        names, bgs = S.synthetic_class_names("name")
        ref = gv.text_embeddings(model, [*names, *bgs], S.CLIP_TEMPLATES)  # what inference prompts with
    assert z.shape == (1 + len(S.CLIP_TEMPLATES) + 1, len(names) + len(bgs), model.cfg.proj_dim)
    assert torch.allclose(z[0], simple[0], atol=1e-6)
    assert torch.allclose(z[-1], ref, atol=1e-5)
    with pytest.raises(ValueError, match="templates"):
        S.templates(GroupvitConfig(templates="clip"))


def test_running_stats_keep_batchnorm_fixed():
    """The stand-in trains with its BatchNorms on running statistics (as inference runs them): inside the
    context they are used and left untouched, and the modes come back after."""
    from nbsupport.models import groupvit as gv
    from nbsupport.training.standins import groupvit as S

    model = gv.build("small").train()
    bn = model.img_projector.linear_hidden[1]
    before = bn.running_mean.clone()
    feat = torch.randn(4, model.cfg.embed_dim) * 3 + 1
    with torch.no_grad():
        with S.running_stats(model):
            inside = model.img_projector(feat)
        assert torch.equal(bn.running_mean, before) and bn.training and model.training
        ref = model.img_projector.eval()(feat)
        batch_stats = model.img_projector.train()(feat)  # batch statistics
    assert torch.allclose(inside, ref, atol=1e-6) and not torch.allclose(inside, batch_stats, atol=1e-3)


def test_content_first_init_makes_groups_the_mean_of_their_segments():
    """With the shared context at 0, a grouping block's new token before its MLP is its hard-assigned
    segments' (normalised) mean times ``n / (n + 1)`` (Eq 17 with assign_eps 1)."""
    from nbsupport.models import groupvit as gv
    from nbsupport.training.standins.groupvit import content_first_init

    model = content_first_init(gv.build("small"), context_scale=0.0)
    blk = model.img_encoder.layers[0].downsample
    seg, grp = torch.randn(1, 64, 96), torch.randn(1, 16, 96)
    with torch.no_grad():
        x = blk.norm_x(seg)
        groups = blk.pre_assign_attn(blk.norm_post_tokens(blk.mlp_inter(blk.norm_tokens(grp))), x)
        new, _, hard = blk.assign(groups, x)
        n = hard.sum(-1, keepdim=True)
        assert torch.allclose(groups, torch.zeros_like(groups), atol=1e-6)
        assert torch.allclose(new, hard @ x / (n + 1), atol=1e-5)


def test_any_background_folds_the_background_prompts():
    from nbsupport.training.standins.groupvit import N_CLASSES, any_background

    logits = torch.arange(N_CLASSES + 3, dtype=torch.float32)[None]
    folded = any_background(logits)
    assert folded.shape == (1, N_CLASSES + 1) and torch.equal(folded[0, :N_CLASSES], logits[0, :N_CLASSES])
    assert torch.allclose(folded[0, -1], torch.logsumexp(logits[0, N_CLASSES:], 0))
    p = logits.softmax(-1)
    assert torch.allclose(any_background(p, log=False).sum(-1), torch.ones(1))


def test_freeze_vit_keeps_the_first_stage_of_the_vit_stand_in():
    """``freeze_vit``: the patch embedding, position embedding and first-stage blocks come from the ViT and
    take no gradient; without ``init_vit`` it refuses."""
    from nbsupport.models import backbones
    from nbsupport.training.standins import groupvit as S
    from nbsupport.training.standins.config import GroupvitConfig

    cfg = GroupvitConfig(init_vit="tiny_vit_synth_supervised", freeze_vit=True, assign_init="content", image_size=128)
    model = S.build_model(cfg)
    frozen = {id(p) for p in S.frozen_parameters(model)}
    assert frozen and all(not p.requires_grad for p in S.frozen_parameters(model))
    assert all(p.requires_grad for p in model.parameters() if id(p) not in frozen)
    vit = backbones.load("tiny_vit_synth_supervised")
    blk = model.img_encoder.layers[0].blocks[1]
    assert torch.equal(blk.attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    assert torch.allclose(model.img_encoder.pos_embed, vit.pos_embed[:, 1:])  # 128 px: the same 16 x 16 grid
    with pytest.raises(ValueError, match="init_vit"):
        S.build_model(GroupvitConfig(freeze_vit=True))

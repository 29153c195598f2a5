"""The thesis's fine-tuning options in nbsupport.training.groupvit (sections 4.3, 5.3, 5.9, 5.10, 5.13,
5.14.2; Eq 28, 52): the non-noisy pool per process, the annealing cycles, colour jitter and random erasing,
the resized position embedding, 1 and 3 grouping blocks from 2, DINO features in stage 2, A_ST's scale,
per-epoch validation through ``validate=`` and on real datasets, evaluation without training."""

import dataclasses
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from nbsupport.analysis import segmentation_eval, zero_shot
from nbsupport.analysis.zero_shot_protocol import EvalSettings, resolve
from nbsupport.core.config import read_recipe
from nbsupport.data import scenes
from nbsupport.data.datasets import voc
from nbsupport.data.datasets.registry import segmentation_dataset
from nbsupport.models import backbones, features
from nbsupport.models import groupvit as gv
from nbsupport.training import groupvit as gt
from nbsupport.training.common import read_metrics, warmup_cosine_lr
from nbsupport.training.groupvit import architecture as arch
from nbsupport.training.groupvit import augment as aug
from nbsupport.training.groupvit import validation as gval
from nbsupport.training.groupvit.loop import label_pool, lr_at

torch.set_num_threads(1)
TINY = dict(n_train=16, image_size=32, batch_size=8, epochs=1, context_length=24, val_images=0, val_size=32)
TINY.update(tagger="lexicon", threads=1, log_every=1, resume=False)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------------- 5.10
def _pool_worker(rank, world, port, img, lab, raw, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = len(img) // world
    mine = slice(rank * b, (rank + 1) * b)
    out = {}
    for kind in ("local", "global"):
        cfg = gt.TrainConfig(non_noisy=True, non_noisy_pool=kind)
        pool, strings = label_pool(cfg, raw[mine])
        out[kind] = gt.multi_label_contrastive(pool(img[mine]), pool(lab[mine]), 4.0, None, strings).item()
    q.put((rank, out))
    dist.destroy_process_group()


def test_non_noisy_negatives_come_from_each_process_mini_batch():
    """Two gloo processes, 'dog' in an image of each: the local pool (thesis 5.10) is the loss of each rank's
    own two images with their own strings, so the other rank's 'dog' is neither a positive nor a negative;
    the global pool is the full batch's loss. Without non_noisy the labels are all-gathered, as GroupViT."""
    import torch.multiprocessing as mp

    img, lab = _unit(4, 6, seed=1), _unit(4, 2, 6, seed=2)
    raw = [["dog", "park"], ["cat", "sofa"], ["dog", "road"], ["bus", "tree"]]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + random.Random(os.getpid() + 7).randint(4001, 6000)
    procs = [ctx.Process(target=_pool_worker, args=(r, 2, port, img, lab, raw, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(30)
    full = gt.multi_label_contrastive(img, lab, 4.0, None, raw).item()
    for r in (0, 1):
        own = gt.multi_label_contrastive(
            img[2 * r : 2 * r + 2], lab[2 * r : 2 * r + 2], 4.0, None, raw[2 * r : 2 * r + 2]
        )
        assert res[r]["local"] == pytest.approx(own.item(), rel=1e-6)
        assert res[r]["global"] == pytest.approx(full, rel=1e-6)
        assert abs(res[r]["local"] - res[r]["global"]) > 1e-3
    plain = gt.TrainConfig()
    assert plain.non_noisy is False and plain.non_noisy_pool == "local" and label_pool(plain, raw)[1] is None


# ---------------------------------------------------------------------------------------------- 5.3
def test_two_annealing_cycles_of_twelve_epochs():
    """decay_epochs 12, 2 cycles (thesis 5.3) with 10 steps an epoch: warm-up over epoch 1, cosine restarts
    at step 120 (GroupViT's timm scheduler counts its cycles from step 0), min_lr after step 240."""
    cfg = gt.TrainConfig(epochs=30, lr=1e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=1.0, cycles=2, decay_epochs=12)
    assert lr_at(0, 10, cfg) == pytest.approx(1e-6)
    assert lr_at(5, 10, cfg) == pytest.approx((1e-6 + 1e-4) / 2)
    assert lr_at(10, 10, cfg) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6) * (1 + math.cos(math.pi * 10 / 120)))
    assert lr_at(60, 10, cfg) == pytest.approx((1e-4 + 1e-6) / 2)
    assert lr_at(119, 10, cfg) < 2e-6 and lr_at(120, 10, cfg) == pytest.approx(1e-4)
    assert lr_at(180, 10, cfg) == pytest.approx((1e-4 + 1e-6) / 2)
    assert lr_at(240, 10, cfg) == lr_at(299, 10, cfg) == 1e-6
    # decay_epochs 0 (the default): the shared schedule, cycles spread over the steps after the warm-up
    same = dataclasses.replace(cfg, decay_epochs=0.0)
    assert [lr_at(s, 10, same) for s in (0, 7, 100, 155, 299)] == [
        warmup_cosine_lr(s, 300, 10, 1e-4, 1e-6, 1e-6, 2) for s in (0, 7, 100, 155, 299)
    ]
    recipe = read_recipe(gt.RECIPE_DIR / "thesis_finetune.yaml")
    assert (recipe["cycles"], recipe["decay_epochs"], recipe["warmup_epochs"]) == (2, 12.0, 1.0)


# ---------------------------------------------------------------------------------------------- 4.3
def test_color_jitter_by_hand():
    g = torch.Generator().manual_seed(3)
    grey = torch.full((2, 3, 4, 4), 0.5)
    grey[1] = 0.8
    out = aug.color_jitter(grey, 0.4, g)
    # a flat grey image keeps its contrast and saturation: only brightness acts, f x with f ~ U[0.6, 1.4]
    f = 0.6 + 0.8 * torch.rand(2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, (f[:, None, None, None] * grey).clamp(0, 1), atol=1e-6)
    colour = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    jit = aug.color_jitter(colour, 0.4, torch.Generator().manual_seed(5))
    assert jit.min() >= 0 and jit.max() <= 1 and not torch.allclose(jit, colour, atol=1e-3)
    assert torch.equal(jit, aug.color_jitter(colour, 0.4, torch.Generator().manual_seed(5)))  # reproducible
    assert aug.color_jitter(colour, 0.0, g) is colour
    # through the normalised batch: a vanishing strength gives the image back
    x = (colour - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
    assert torch.allclose(aug.augment_batch(x, 1e-9, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-5)
    assert aug.augment_batch(x) is x


def test_random_erasing_one_rectangle_of_noise():
    x = torch.zeros(6, 3, 20, 24)
    out = aug.random_erase(x, 1.0, torch.Generator().manual_seed(0))
    for img in out:
        changed = (img != 0).any(0)
        ys, xs = changed.nonzero(as_tuple=True)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert changed.sum() == h * w  # one filled axis-aligned rectangle
        assert 0.02 * 480 * 0.6 <= h * w <= 480 / 3 * 1.4  # its area, up to rounding of its sides
        assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3
    assert torch.equal(aug.random_erase(x, 0.0, torch.Generator()), x)
    never = aug.random_erase(torch.zeros(200, 1, 8, 8), 0.25, torch.Generator().manual_seed(1))
    assert 25 <= int((never != 0).flatten(1).any(1).sum()) <= 75  # ~ 50 of 200 images erased


# ---------------------------------------------------------------------------------------------- 5.9
def test_position_embedding_resized_once_and_trained(tmp_path):
    model = gv.build("small", 0)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    before = model.encode_image(x).image_embeds
    old = model.img_encoder.pos_embed.detach().clone()
    assert arch.resize_pos_embed(model, 48) and not arch.resize_pos_embed(model, 48)
    assert model.img_encoder.pos_embed.shape == (1, 36, 96) and model.cfg.img_size == 48
    assert torch.equal(model.img_encoder.pos_embed.detach(), gv.interpolate_pos_embed(old, (6, 6)))
    assert torch.allclose(model.encode_image(x).image_embeds, before, atol=1e-6)  # the same forward at 48 px
    # trained at 48 px with the pos_embed component: the resized 6 x 6 embedding is the parameter that moves
    cfg = gt.TrainConfig(
        out_dir=str(tmp_path / "a"), **{**TINY, "image_size": 48}, trainable="grouping_blocks+pos_embed"
    )
    res = gt.train(cfg, model=gv.build("small", 0))
    pe = res["model"].img_encoder.pos_embed.detach()
    assert pe.shape == (1, 36, 96) and not torch.allclose(pe, gv.interpolate_pos_embed(old, (6, 6)))
    assert "img_encoder.pos_embed" in res["trainable"]
    frozen = gt.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), trainable="grouping_blocks"))
    assert torch.equal(frozen["model"].img_encoder.pos_embed.detach(), gv.interpolate_pos_embed(old, (6, 6)))
    kept = gt.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "c"), pos_embed="interpolate"))
    assert kept["model"].img_encoder.pos_embed.shape == (1, 64, 96)  # interpolated on every forward instead


# ---------------------------------------------------------------------------------------------- 5.13
def test_regrouped_architectures_of_table_15():
    c1, c3 = arch.regrouped_config(gv.Config(), 1), arch.regrouped_config(gv.Config(), 3)
    assert (c1.depths, c1.num_group_tokens, c1.num_output_groups) == ((6, 6), (64, 0), (64,))
    assert (c3.depths, c3.num_group_tokens, c3.num_output_groups) == ((4, 2, 3, 3), (64, 64, 8, 0), (64, 64, 8))
    c34 = arch.regrouped_config(gv.Config(), 3, 4)
    assert c34.num_group_tokens == (64, 64, 4, 0) and sum(c34.depths) == 12
    with pytest.raises(ValueError, match="final_group_tokens"):
        arch.regrouped_config(gv.Config(), 3, 16)


def test_one_grouping_block_keeps_stage_one_and_moves_the_blocks():
    old = gv.build("small", 0)  # depths (2, 1, 1), groups (16, 4, 0)
    new, unmapped = arch.regroup(old, 1)
    o, n = old.state_dict(), new.state_dict()
    assert new.cfg.depths == (2, 2) and new.cfg.num_group_tokens == (16, 0) and unmapped == []
    pairs = {
        "img_encoder.layers.1.blocks.0.attn.qkv.weight": "img_encoder.layers.1.blocks.0.attn.qkv.weight",
        "img_encoder.layers.1.blocks.1.mlp.fc2.bias": "img_encoder.layers.2.blocks.0.mlp.fc2.bias",
        "img_encoder.layers.0.downsample.assign.k_proj.weight": "img_encoder.layers.0.downsample.assign.k_proj.weight",
        "img_encoder.layers.0.group_token": "img_encoder.layers.0.group_token",
        "img_encoder.norm.weight": "img_encoder.norm.weight",
        "text_projector.linear_out.weight": "text_projector.linear_out.weight",
    }
    for a, b in pairs.items():
        assert torch.equal(n[a], o[b]), a
    assert not any("layers.1.downsample" in k or "layers.1.group_token" in k for k in n)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = old.encode_image(x), new.encode_image(x)
    assert torch.equal(a.soft[0], b.soft[0])  # stage 1 is the pretrained one
    assert b.attn.shape == (2, 16, 64) and torch.allclose(b.attn.sum(1), torch.ones(2, 64), atol=1e-5)


def test_three_grouping_blocks_from_two():
    old = gv.build("small", 0)
    new, unmapped = arch.regroup(old, 3, final_groups=2, seed=0)
    o, n = old.state_dict(), new.state_dict()
    assert new.cfg.depths == (1, 1, 1, 1) and new.cfg.num_group_tokens == (16, 16, 2, 0)
    assert unmapped and all(k.startswith("img_encoder.layers.1.group_projector.") for k in unmapped)
    for a, b in {
        "img_encoder.layers.0.blocks.0.attn.proj.weight": "img_encoder.layers.0.blocks.0.attn.proj.weight",
        "img_encoder.layers.1.blocks.0.attn.proj.weight": "img_encoder.layers.0.blocks.1.attn.proj.weight",
        "img_encoder.layers.2.blocks.0.attn.proj.weight": "img_encoder.layers.1.blocks.0.attn.proj.weight",
        "img_encoder.layers.3.blocks.0.attn.proj.weight": "img_encoder.layers.2.blocks.0.attn.proj.weight",
        "img_encoder.layers.1.group_token": "img_encoder.layers.0.group_token",
        "img_encoder.layers.1.downsample.assign.q_proj.weight": "img_encoder.layers.0.downsample.assign.q_proj.weight",
        "img_encoder.layers.2.downsample.assign.q_proj.weight": "img_encoder.layers.1.downsample.assign.q_proj.weight",
    }.items():
        assert torch.equal(n[a], o[b]), a
    # the last grouping stage takes the first 2 of the pretrained 4 group tokens and their MLP rows
    assert torch.equal(n["img_encoder.layers.2.group_token"], o["img_encoder.layers.1.group_token"][:, :2])
    for k in ("downsample.mlp_inter.fc2.weight", "downsample.mlp_inter.fc1.weight", "group_projector.1.fc2.weight"):
        want = o[f"img_encoder.layers.1.{k}"]
        want = want[:, :2] if k.endswith("fc1.weight") else want[:2]
        assert torch.equal(n[f"img_encoder.layers.2.{k}"], want), k
    # the inserted stage starts with exactly stage 1's group tokens: its projector adds zero
    assert not n["img_encoder.layers.1.group_projector.1.fc2.weight"].any()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = new.encode_image(x)
    assert out.attn.shape == (2, 2, 64) and torch.allclose(out.attn.sum(1), torch.ones(2, 64), atol=1e-5)
    assert "3 grouping blocks" in gv.describe(new)
    same, none = arch.regroup(old, 2)
    assert same is old and none == []


# ---------------------------------------------------------------------------------------------- 5.14.2
def test_dino_features_are_what_stage_two_groups():
    base = gv.build("small", 0)
    dino = backbones.load("random_tiny8")  # width 96 = small's
    model = arch.DinoStage2GroupViT(base, dino, "key", 3).eval()
    assert set(model.state_dict()) == set(base.state_dict())  # DINO is not saved with the weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.encode_image(x)
        d_f = features.extract(dino, x, "key", 3).reshape(2, 64, 96)
        enc = model.img_encoder
        p = enc.patch_embed.norm(enc.patch_embed.proj(x).flatten(2).transpose(1, 2)) + enc.pos_embed
        _, g1, _ = enc.layers[0](p, None)
        _, _, o2 = enc.layers[1](d_f, g1)
    assert out.attn.shape == (2, 4, 64) and torch.allclose(out.attn, o2["soft"], atol=1e-6)
    with torch.no_grad():  # stage 1's grouping does not matter any more; DINO's features do
        enc.layers[0].downsample.assign.q_proj.weight.mul_(3.0)
        assert torch.allclose(model.encode_image(x).attn, out.attn, atol=1e-6)
        dino.blocks[3].attn.qkv.weight.mul_(-1.0)
        assert not torch.allclose(model.encode_image(x).attn, out.attn, atol=1e-3)
    with pytest.raises(ValueError, match="width"):
        arch.DinoStage2GroupViT(gv.build("small128", 0), dino, "key", 3).encode_image(x)


# ---------------------------------------------------------------------------------------------- Eq 28
def test_a_st_logit_scale_option(tmp_path):
    """LE / SE on A_ST = K^I Z^T (Eq 28) or on A_ST x 1/tau: the same when 1/tau = 1, apart otherwise."""
    model = gv.build("small", 0).eval()
    caps = ["a striped triangle on gravel", "a dotted circle left of a wavy star on grass"]
    from nbsupport.data import caption_labels as text

    t = text.BuiltinLexiconTagger()
    labels = [text.extract_labels(c, 3, "np+nouns", "pad", t, rng=random.Random(i)) for i, c in enumerate(caps)]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = gt.TrainConfig(w_le=1.0, w_se=1.0, context_length=24)
    eq28 = dataclasses.replace(base, a_st_scale="none")

    def terms(cfg):
        torch.manual_seed(0)
        with torch.no_grad():
            r = gt.compute_losses(model, images, caps, labels, cfg)
        return float(r["le"]), float(r["se"])

    with torch.no_grad():
        model.logit_scale.fill_(0.0)  # 1/tau = 1
    assert terms(base) == terms(eq28)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    (le, se), (le28, se28) = terms(base), terms(eq28)
    assert le < le28 and se < se28  # the sharper softmax of the scaled metric has lower entropies
    with pytest.raises(ValueError, match="a_st_scale"):
        dataclasses.replace(base, a_st_scale="tau").validate()


# ---------------------------------------------------------------------------------------------- validation
class _Stub:
    name = "stub val"

    def __init__(self):
        self.calls = []

    def __call__(self, m):
        self.calls.append(m)
        return {"miou": 40.0 + len(self.calls), "conf": "dropped"}


def test_train_validates_with_the_given_callable_every_n_epochs(tmp_path):
    stub = _Stub()
    cfg = gt.TrainConfig(out_dir=str(tmp_path / "r"), **{**TINY, "epochs": 3}, val_every=2)
    res = gt.train(cfg, validate=stub)
    recs = [r for r in read_metrics(tmp_path / "r") if r["type"] == "val"]
    assert [(r["epoch"], r["miou"], r["data"]) for r in recs] == [(2, 41.0, "stub val"), (3, 42.0, "stub val")]
    assert "conf" not in recs[0] and res["val"]["miou"] == 42.0 and stub.calls[-1] is res["model"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return voc.write_fixture(tmp_path_factory.mktemp("voc"))["root"]["voc"]


def test_dataset_validation_per_epoch_on_voc(tmp_path, voc_root):
    """val_datasets [voc, synthetic]: each epoch's record holds GroupViT's protocol mIoU on the VOC fixture
    (background threshold 0.95, thesis 5.3) by the evaluator of groupvit-eval and the synthetic scenes' mIoU; a missing root stops the run at
    once."""
    fields = dict(TINY, epochs=2, val_short_side=32, val_window=32, val_stride=16, val_images=4)
    roots = {"voc": str(voc_root)}
    cfg = gt.TrainConfig(out_dir=str(tmp_path / "v"), val_datasets=["voc", "synthetic"], val_roots=roots, **fields)
    res = gt.train(cfg)
    recs = [r for r in read_metrics(tmp_path / "v") if r["type"] == "val"]
    assert [r["epoch"] for r in recs] == [1, 2] and recs[0]["data"] == "voc val + synthetic"
    # the trainer's number is groupvit-eval's number: the one evaluator, the VOC protocol (threshold 0.95)
    ds = segmentation_dataset("voc", voc_root, "val")
    want = segmentation_eval.validate(res["model"], ds, settings=EvalSettings(short_side=32, window=32, stride=16))
    assert recs[-1]["miou_voc"] == pytest.approx(want["miou"]) and recs[-1]["miou"] == recs[-1]["miou_voc"]
    assert resolve("voc", ds.classes, EvalSettings()).bg_thresh == 0.95
    images, sem = scenes.synthetic_scenes(4, 0, 32)
    names, bgs = scenes.synthetic_class_names()
    assert recs[-1]["miou_synthetic"] == zero_shot.zero_shot_miou(res["model"], images, sem, names, bgs)["miou"]
    with pytest.raises(ValueError, match="val_roots"):
        gt.TrainConfig(val_datasets=["ade20k"]).validate()
    with pytest.raises(FileNotFoundError):
        gval.DatasetValidation(["voc"], {"voc": str(tmp_path / "nowhere")})


def test_evaluate_without_training(tmp_path):
    cfg = gt.TrainConfig(out_dir=str(tmp_path / "e"), val_datasets=["synthetic"], val_images=4, val_size=32)
    rec = gval.evaluate(cfg, model=gv.build("small", 0))
    images, sem = scenes.synthetic_scenes(4, 0, 32)
    names, bgs = scenes.synthetic_class_names()
    want = zero_shot.zero_shot_miou(gv.build("small", 0), images, sem, names, bgs)["miou"]
    assert rec["miou_synthetic"] == want and (rec["epoch"], rec["step"]) == (0, 0)
    (logged,) = read_metrics(tmp_path / "e")
    assert (
        logged["miou"] == rec["miou"] and logged["data"] == "synthetic" and (tmp_path / "e" / "config.yaml").is_file()
    )

"""GroupViT training losses and loop (nbsupport.training.groupvit; thesis Eq 21-26, 36-44, 52)."""

import dataclasses
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from nbsupport.analysis import entropy as ent
from nbsupport.analysis import zero_shot
from nbsupport.core import distributed
from nbsupport.data import caption_labels as text
from nbsupport.data import scenes
from nbsupport.models import groupvit as gv
from nbsupport.training import groupvit as gt
from nbsupport.training.common import load_checkpoint, read_metrics, warmup_cosine_lr

torch.set_num_threads(1)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------------------------------------- references
def ref_itc(img, txt, s):
    """Eq 21 + Eq 22 with explicit sums."""
    b = len(img)
    i2t = (
        -sum(
            math.log(math.exp(s * img[i] @ txt[i]) / sum(math.exp(s * img[i] @ txt[j]) for j in range(b)))
            for i in range(b)
        )
        / b
    )
    t2i = (
        -sum(
            math.log(math.exp(s * txt[i] @ img[i]) / sum(math.exp(s * txt[i] @ img[j]) for j in range(b)))
            for i in range(b)
        )
        / b
    )
    return i2t + t2i


def ref_mlc(img, lab, s, keep=None):
    """Eq 24 + Eq 25 with explicit sums over the kept labels ``keep[i]`` (default all)."""
    b, k = lab.shape[:2]
    keep = keep or [list(range(k))] * b
    e = lambda i, j, kk: math.exp(s * float(img[i] @ lab[j, kk]))  # noqa: E731
    i2t = (
        -sum(
            math.log(sum(e(i, i, kk) for kk in keep[i]) / sum(e(i, j, kk) for j in range(b) for kk in keep[j]))
            for i in range(b)
        )
        / b
    )
    terms = [math.log(e(i, i, kk) / sum(e(j, i, kk) for j in range(b))) for i in range(b) for kk in keep[i]]
    return i2t - sum(terms) / len(terms)


# ---------------------------------------------------------------------------------------------- losses
def test_image_text_contrastive_matches_eq_21_23():
    img, txt = _unit(4, 5, seed=1), _unit(4, 5, seed=2)
    got = gt.image_text_contrastive(img, txt, 3.0)
    assert got.item() == pytest.approx(ref_itc(img, txt, 3.0), rel=1e-10)
    # two-pair hand case: orthogonal, perfectly aligned pairs
    e = torch.eye(2, dtype=torch.float64)
    want = 2 * math.log(1 + math.exp(-1.0))  # each direction: -log(e^1 / (e^1 + e^0))
    assert gt.image_text_contrastive(e, e, 1.0).item() == pytest.approx(want)
    # identical captions are positives with texts=: pairs 0 and 1 share a caption
    got2 = gt.image_text_contrastive(e, e, 1.0, texts=["a", "a"])
    assert got2.item() == pytest.approx(0.0, abs=1e-12)


def test_multi_label_matches_eq_24_26():
    img, lab = _unit(3, 4, seed=3), _unit(3, 2, 4, seed=4)
    got = gt.multi_label_contrastive(img, lab, 5.0)
    assert got.item() == pytest.approx(ref_mlc(img, lab, 5.0), rel=1e-10)
    # K = 1 reduces to the image-text loss
    assert gt.multi_label_contrastive(img, lab[:, :1], 5.0).item() == pytest.approx(
        gt.image_text_contrastive(img, lab[:, 0], 5.0).item(), rel=1e-10
    )


def test_pad_labels_leave_every_sum():
    img, lab = _unit(3, 4, seed=5), _unit(3, 3, 4, seed=6)
    pad = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    got = gt.multi_label_contrastive(img, lab, 4.0, pad)
    want = ref_mlc(img, lab, 4.0, keep=[[0], [0, 1], [0, 1, 2]])
    assert got.item() == pytest.approx(want, rel=1e-10)
    # whatever the pad embeddings hold, the loss is the same (they are nulled and masked)
    lab2 = lab.clone()
    lab2[0, 1:] = _unit(2, 4, seed=9)
    assert gt.multi_label_contrastive(img, lab2, 4.0, pad).item() == pytest.approx(got.item(), rel=1e-12)


def test_non_noisy_equals_plain_without_repeats_and_differs_with():
    img, lab = _unit(3, 4, seed=7), _unit(3, 2, 4, seed=8)
    strings = [["dog", "park"], ["cat", "sofa"], ["car", "road"]]
    plain = gt.multi_label_contrastive(img, lab, 5.0)
    assert gt.multi_label_contrastive(img, lab, 5.0, label_strings=strings).item() == pytest.approx(
        plain.item(), rel=1e-12
    )
    rep = [["dog", "park"], ["dog", "sofa"], ["car", "road"]]  # 'dog' in images 0 and 1
    got = gt.multi_label_contrastive(img, lab, 5.0, label_strings=rep)
    s = 5.0
    e = lambda i, j, k: math.exp(s * float(img[i] @ lab[j, k]))  # noqa: E731
    allk = [(j, k) for j in range(3) for k in range(2)]
    pos = {0: [(0, 0), (0, 1), (1, 0)], 1: [(1, 0), (1, 1), (0, 0)], 2: [(2, 0), (2, 1)]}
    i2t = -sum(math.log(sum(e(i, *p) for p in pos[i]) / sum(e(i, *q) for q in allk)) for i in range(3)) / 3
    tpos = {(0, 0): [0, 1], (1, 0): [0, 1]}  # 'dog' labels: positives 0 and 1
    t2i = (
        -sum(
            math.log(sum(e(j, i, k) for j in tpos.get((i, k), [i])) / sum(e(j, i, k) for j in range(3)))
            for i, k in allk
        )
        / 6
    )
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-10)
    assert got.item() < plain.item()


def test_entropy_regularisers():
    b, g, n, k = 2, 4, 6, 3
    uniform = torch.full((b, g, n), 1 / g)
    assert gt.ge_loss(uniform).item() == pytest.approx(math.log(g))
    onehot = F.one_hot(torch.arange(n) % g, g).T.float().expand(b, g, n)
    assert gt.ge_loss(onehot).item() == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(0)
    a_st = torch.randn(b, g, k, dtype=torch.float64)
    attn = torch.randn(b, g, n, dtype=torch.float64).softmax(1)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    # LE with a pad = LE of image 0 on its 2 real labels and of image 1 on 3, averaged over the images
    le0 = ent.label_entropy(attn[0], a_st[0, :, :2]).mean()
    le1 = ent.label_entropy(attn[1], a_st[1]).mean()
    assert gt.le_loss(attn, a_st, pad).item() == pytest.approx(((le0 + le1) / 2).item(), rel=1e-10)
    se0 = ent.segment_affinity_entropy(a_st[0, :, :2])
    se1 = ent.segment_affinity_entropy(a_st[1])
    assert gt.se_loss(a_st, pad).item() == pytest.approx(((se0 + se1) / 2).item(), rel=1e-10)
    assert gt.se_loss(a_st).item() == pytest.approx(ent.segment_affinity_entropy(a_st).item(), rel=1e-12)
    # SE of a constant metric: 0.2 log K + 0.1 log G
    assert gt.se_loss(torch.zeros(1, g, k)).item() == pytest.approx(0.2 * math.log(k) + 0.1 * math.log(g))
    # all-pad images are skipped
    assert gt.le_loss(attn, a_st, torch.ones(b, k, dtype=torch.bool)).item() == 0.0


def test_dino_distillation_hand_case():
    # 2 groups, 3 patches: patches 0, 1 in group 0 (certain), patch 2 split 0.5 / 0.5
    attn = torch.tensor([[[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]]])
    student = attn[0].T @ attn[0]  # [[1,1,.5],[1,1,.5],[.5,.5,.5]]
    sim = torch.tensor([[[1.0, 0.8, -0.2], [0.8, 1.0, 0.0], [-0.2, 0.0, 1.0]]])
    t = sim[0].softmax(-1)
    want = -(t * student.log()).sum()
    # Eq 52 as written (the default): summed over the 3 x 3 pairs; "mean" divides by N = 3
    assert gt.dino_distillation_loss(attn, sim).item() == pytest.approx(want.item(), rel=1e-6)
    assert gt.dino_distillation_loss(attn, sim, reduction="mean").item() == pytest.approx(want.item() / 3, rel=1e-6)
    assert gt.TrainConfig().dino_reduction == "sum"
    # a grouping that agrees with DINO scores lower than one that disagrees
    good = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    bad = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    assert gt.dino_distillation_loss(good, sim) < gt.dino_distillation_loss(bad, sim)
    f = torch.randn(1, 2, 2, 5)
    s = gt.dino_similarity(f)
    assert s.shape == (1, 4, 4) and torch.allclose(s.diagonal(dim1=1, dim2=2), torch.ones(1, 4), atol=1e-6)
    with pytest.raises(ValueError, match="patches"):
        gt.dino_distillation_loss(attn, torch.zeros(1, 4, 4))


def test_dino_distillation_collapse_and_row_normalised_variant():
    sim = torch.tensor([[[1.0, 0.9, -0.5], [0.9, 1.0, -0.5], [-0.5, -0.5, 1.0]]])  # patches 0, 1 vs 2
    one_group = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    good = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    # Eq 52 as written: putting every patch in one group costs nothing, whatever DINO says
    assert gt.dino_distillation_loss(one_group, sim).item() == pytest.approx(0.0, abs=1e-6)
    assert gt.dino_distillation_loss(good, sim) > gt.dino_distillation_loss(one_group, sim)
    # row-normalised: the collapse scores log N (uniform rows), the grouping that follows DINO scores lower
    rn = dict(row_normalize=True, reduction="mean")
    assert gt.dino_distillation_loss(one_group, sim, **rn).item() == pytest.approx(math.log(3), rel=1e-6)
    soft = torch.tensor([[[0.9, 0.9, 0.1], [0.1, 0.1, 0.9]]])  # mostly patches 0, 1 vs patch 2
    assert gt.dino_distillation_loss(soft, sim, **rn) < gt.dino_distillation_loss(one_group, sim, **rn)
    # hand case: S = A^T A, rows divided by their sums, CE averaged over rows
    S = soft[0].T @ soft[0]
    want = -(sim[0].softmax(-1) * (S / S.sum(-1, keepdim=True)).log()).sum() / 3
    got = gt.dino_distillation_loss(soft, sim, **rn)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert gt.dino_distillation_loss(soft, sim, row_normalize=True).item() == pytest.approx(3 * want.item(), rel=1e-6)
    # centring: a shared component hides the structure from raw cosines, not from centred ones
    base = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    f = base * 0.1 + torch.tensor([10.0, 10.0])
    raw, centred = gt.dino_similarity(f), gt.dino_similarity(f, center=True)
    assert raw.min() > 0.99
    assert centred[0, 0, 1] == pytest.approx(1.0, abs=1e-5) and centred[0, 0, 2] == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ValueError, match="dino_variant"):
        gt.TrainConfig(dino_variant="other").validate()


# ---------------------------------------------------------------------------------------------- model side
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gv.build("small", seed=0)


def _labels(caps, k=3, pad="pad"):
    t = text.BuiltinLexiconTagger()
    return [text.extract_labels(c, k, "np+nouns", pad, t, rng=random.Random(i)) for i, c in enumerate(caps)]


def test_gradients_flow_and_components(model):
    cfg = gt.TrainConfig(w_ge=1.0, w_le=1.0, w_se=1.0, context_length=24)
    caps = ["a striped triangle on gravel", "empty sand", "a dotted circle left of a wavy star on grass"]
    images = torch.randn(3, 3, 32, 32)
    model.train()
    names = gt.set_trainable(model, "all")
    losses = gt.compute_losses(model, images, caps, _labels(caps), cfg)
    assert set(losses) == {"itc", "mlc", "ge", "le", "se", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for name in [
        "img_encoder.layers.0.downsample.assign.q_proj.weight",
        "img_encoder.patch_embed.proj.weight",
        "text_encoder.token_embedding.weight",
        "img_projector.linear_out.weight",
        "text_projector.linear_out.weight",
        "logit_scale",
        "multi_label_logit_scale",
    ]:
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    # Table 5: only the grouping blocks train
    names = gt.set_trainable(model, "grouping_blocks")
    assert names and all(".downsample." in n for n in names)
    assert gt.set_trainable(model, "grouping_block2+img_projector")[0].startswith("img_encoder.layers.1.downsample")
    with pytest.raises(ValueError, match="grouping_blocks"):
        gt.set_trainable(model, "encoder")
    gt.set_trainable(model, "all")
    model.eval()


def test_lr_schedule():
    kw = dict(total=110, warmup=10, base=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert warmup_cosine_lr(5, **kw) == pytest.approx((1e-6 + 1e-3) / 2)
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert warmup_cosine_lr(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert warmup_cosine_lr(110, **kw) == pytest.approx(1e-5)
    # two cycles: back at the top half-way
    assert warmup_cosine_lr(60, cycles=2, **kw) == pytest.approx(1e-3)
    assert warmup_cosine_lr(35, cycles=2, **kw) == pytest.approx((1e-3 + 1e-5) / 2)


def test_train_checkpoint_resume_metrics(tmp_path):
    out = tmp_path / "run"
    cfg = gt.TrainConfig(
        out_dir=str(out),
        n_train=16,
        image_size=32,
        batch_size=8,
        epochs=1,
        context_length=24,
        val_images=4,
        val_size=32,
        log_every=1,
        tagger="lexicon",
        threads=1,
        w_ge=0.1,
        min_label_count=2,
        pad="repeat",
    )
    res = gt.train(cfg)
    recs = read_metrics(out)
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2]
    val = [r for r in recs if r["type"] == "val"]
    assert len(val) == 1 and 0 <= val[0]["miou"] <= 100
    st = load_checkpoint(out / "last.pt")  # weights_only=True
    assert st["epoch"] == 1 and st["step"] == 2 and json.loads(st["config"])["n_train"] == 16
    w1 = st["model"]["img_encoder.pos_embed"].clone()
    # resume: a second epoch continues at step 2 -> 4 and changes the weights
    cfg.epochs = 2
    gt.train(cfg)
    st2 = load_checkpoint(out / "last.pt")
    assert st2["epoch"] == 2 and st2["step"] == 4
    assert not torch.equal(st2["model"]["img_encoder.pos_embed"], w1)
    assert [r["step"] for r in read_metrics(out) if r["type"] == "train"] == [1, 2, 3, 4]
    from nbsupport.core.config import read_config

    assert read_config(gt.TrainConfig, out) == cfg  # the run folder's config.yaml is the merged config
    # exported weights load through groupvit.load
    m = gv.load(str(out / "final.safetensors"))
    sd = res["model"].state_dict()
    # trained at 32 px: the 8 x 8 position embedding of "small" was resized once to 4 x 4 (thesis 5.9)
    assert m.cfg == dataclasses.replace(gv.CONFIGS["small"], img_size=32) and w1.shape == (1, 16, 96)
    assert torch.equal(m.state_dict()["logit_scale"], st2["model"]["logit_scale"]) and len(sd) == len(m.state_dict())
    assert not (out / "last.pt.tmp").exists()


def test_zero_shot_miou_counts_every_pixel(model):
    images, sem = scenes.synthetic_scenes(3, seed=0, size=32)
    names, bgs = scenes.synthetic_class_names()
    r = zero_shot.zero_shot_miou(model, images, sem, names, bgs)
    assert r["conf"].sum() == 3 * 32 * 32 and r["conf"].shape == (7, 7)
    # the rows are the ground truth classes present
    assert set(r["conf"].sum(1).nonzero()[0]) == set(sem.unique().tolist())


def _ddp_worker(rank, world, port, img, lab, pad, q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = len(img) // world
    mine = img[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = gt.multi_label_contrastive(
        distributed.all_gather(mine),
        distributed.all_gather(lab[rank * b : (rank + 1) * b]),
        4.0,
        distributed.all_gather(pad[rank * b : (rank + 1) * b]),
    )
    loss.backward()
    q.put((rank, loss.item(), (mine.grad / world).tolist()))  # DDP averages gradients over the processes
    dist.destroy_process_group()


def test_all_gather_loss_equals_full_batch():
    import torch.multiprocessing as mp

    img, lab = _unit(4, 3, seed=11).float(), _unit(4, 2, 3, seed=12).float()
    pad = torch.tensor([[False, True], [False, False], [False, False], [False, True]])
    full_img = img.clone().requires_grad_(True)
    full = gt.multi_label_contrastive(full_img, lab, 4.0, pad)
    full.backward()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + random.Random(os.getpid()).randint(0, 2000)
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, img, lab, pad, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=60) for _ in procs)
    res = [(r, l, torch.tensor(g)) for r, l, g in res]
    for p in procs:
        p.join(30)
    for rank, loss, grad in res:
        assert loss == pytest.approx(full.item(), rel=1e-5)
        # summed over ranks by all_gather's backward, then averaged by DDP: the full-batch gradient
        assert torch.allclose(grad, full_img.grad[rank * 2 : (rank + 1) * 2], atol=1e-5)


def test_cli_recipe_and_overrides():
    from nbsupport.__main__ import build_parser
    from nbsupport.core.config import read_recipe, recipe_diff

    args = build_parser().parse_args(
        ["groupvit-train", "--recipe", "tiny_groupvit_synth", "--epochs", "3", "--non-noisy", "false", "--w-ge", "0.5"]
    )
    cfg = gt.config_from_args(args)
    recipe = read_recipe(gt.RECIPE_DIR / "tiny_groupvit_synth.yaml")
    assert cfg.epochs == 3 and cfg.w_ge == 0.5 and cfg.n_train == recipe["n_train"] == 1000
    assert cfg.non_noisy is False  # explicit options win over the recipe
    assert args.export.endswith("data/weights/tiny_groupvit_synth.safetensors")
    plain = gt.config_from_args(build_parser().parse_args(["groupvit-train", "--label-kind", "np"]))
    assert plain.label_kind == "np" and plain.n_train == gt.TrainConfig().n_train and plain.epochs == 2
    # the YAML recipe is the run the Python RECIPES dict described (values copied from it)
    shipped = dict(
        out_dir="runs/tiny_groupvit_synth",
        model="small",
        seed=0,
        n_train=1000,
        image_size=64,
        batch_size=32,
        epochs=100,
        lr=5e-4,
        min_lr=1e-5,
        warmup_epochs=2.0,
        label_kind="np+nouns",
        num_labels=3,
        pad="pad",
        non_noisy=True,
        context_length=24,
        val_images=64,
        val_size=64,
        threads=1,
        log_every=25,
        max_minutes=48.0,
    )
    bare = gt.config_from_args(build_parser().parse_args(["groupvit-train", "--recipe", "tiny_groupvit_synth"]))
    assert bare == gt.TrainConfig(**shipped) and set(recipe) == set(recipe_diff(bare))
    # -o sits between the recipe and explicit options
    over = build_parser().parse_args(
        ["groupvit-train", "--recipe", "tiny_groupvit_synth", "-o", "epochs=7", "-o", "lr=1e-4", "--lr", "2e-4"]
    )
    cfg = gt.config_from_args(over)
    assert (cfg.epochs, cfg.lr, cfg.n_train) == (7, 2e-4, 1000)


@pytest.mark.parametrize("cmd", [["groupvit-train", "--non-noisy"], ["dino", "train", "--dense-image-center"]])
def test_cli_bool_options_are_strict(cmd, capsys):
    """Boolean options take yes/no words in any case; a typo stops the command instead of meaning False."""
    from nbsupport.__main__ import build_parser
    from nbsupport.core.cli import cli_bool

    assert [cli_bool(s) for s in ("TRUE", "on", "1", "No", "off", "0")] == [True] * 3 + [False] * 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(cmd + ["flase"])
    assert "expected a boolean" in capsys.readouterr().err


def test_shipped_tiny_model_name():
    from nbsupport.core import paths

    path = paths.data_dir() / "weights" / "tiny_groupvit_synth.safetensors"
    if not path.is_file():
        with pytest.raises(FileNotFoundError, match="tiny_groupvit_synth.safetensors"):
            gv.load("tiny_groupvit_synth")
        return
    m = gv.load("tiny_groupvit_synth")
    assert m.cfg == gv.CONFIGS["small"] and m.nbs_info["pretrained"] and "tiny" in gv.describe(m)


def test_floors_refuse_a_random_model(model):
    ok, why = gt.beats_floors(model, gt.TrainConfig(val_size=32), n_images=4)
    assert ok is False and "all-background" in why
    r = gt.init_like(model, 0)
    assert r.cfg == model.cfg and all(
        torch.equal(a, b) for a, b in zip(r.state_dict().values(), gv.build("small", 0).state_dict().values())
    )


_DDP_TRAIN = """
import os, sys, torch
from nbsupport.training import groupvit as gt
torch.set_num_threads(1)
out = sys.argv[1]
cfg = gt.TrainConfig(out_dir=out, n_train=16, image_size=32, batch_size=4, epochs=1, val_images=0, context_length=24,
                     log_every=1, w_ge=0.1, non_noisy=True, resume=False, tagger="lexicon")
res = gt.train(cfg)
torch.save(res["model"].state_dict(), os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_ddp_keeps_ranks_in_sync(tmp_path):
    """Two CPU processes (gloo): the loss step goes through DDP, so both ranks end with identical weights."""
    import subprocess
    import sys

    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_TRAIN)
    port = str(29500 + random.Random(os.getpid() + 1).randint(2001, 4000))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(script),
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / "run" / f"rank{i}.pt") for i in (0, 1))
    init = gv.build("small", 0).state_dict()
    # parameters agree exactly (BatchNorm running statistics are per process between DDP's buffer broadcasts)
    assert all(torch.equal(a[k], b[k]) for k in a if "running_" not in k and "num_batches" not in k)
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["type"] == "train"] == [1, 2]


def test_training_scenes_take_an_object_scale(tmp_path, monkeypatch):
    """``min/max_object_scale`` reaches the renderer: larger objects cover more of the frame, and the default
    scale keeps the cache key of the plain world."""
    monkeypatch.setenv("NBSUPPORT_ROOT", str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "nbsupport").mkdir()

    def coverage(ann):
        d = json.loads((ann.parent / "instances_train.json").read_text())
        return sum(a["area"] for a in d["annotations"]) / (len(d["images"]) * 48 * 48)

    plain = scenes.synthetic_captions(24, 0, 48, "train", (1, 1))
    assert plain == scenes.synthetic_captions(24, 0, 48, "train", (1, 1), [0.2, 0.45])
    big = scenes.synthetic_captions(24, 0, 48, "train", (1, 1), (0.5, 0.8))
    assert big != plain and coverage(big) > 2.5 * coverage(plain)


def test_group_balance_loss_hand_cases():
    """0 when the groups share the patches equally, 1 when one group takes them all, log-scaled in between;
    stages with one group are skipped and gradients reach the assignment logits."""
    b, g, n = 2, 4, 6
    even = torch.zeros(b, g, n)
    even[:, torch.arange(n) % g, torch.arange(n)] = 1.0  # 6 patches over 4 groups: 2, 2, 1, 1
    one = torch.zeros(b, g, n)
    one[:, 0] = 1.0
    assert gt.group_balance_loss([torch.full((b, g, n), 1 / g)]).item() == pytest.approx(0.0, abs=1e-6)
    assert gt.group_balance_loss([one]).item() == pytest.approx(1.0)
    u = torch.tensor([2, 2, 1, 1]) / 6
    assert gt.group_balance_loss([even]).item() == pytest.approx(1 + (u * u.log()).sum().item() / math.log(4))
    assert gt.group_balance_loss([one, torch.ones(b, 1, g)]).item() == pytest.approx(1.0)
    logits = torch.randn(b, g, n, requires_grad=True)
    gt.group_balance_loss([logits.softmax(1)]).backward()
    assert logits.grad.abs().sum() > 0


def test_image_encoder_starts_from_a_vit():
    """init_image_encoder copies the tiny DINO's patch projection, patch position embeddings and blocks, so
    GroupViT's blocks compute exactly what the ViT's blocks compute; a ViT of another width is refused."""
    from nbsupport.models import backbones

    vit = backbones.load("tiny_dino_synth")
    model = gv.load("random:small128")
    before = model.state_dict()["img_encoder.layers.0.group_token"].clone()
    copied = gt.init_image_encoder(model, vit)
    enc = model.img_encoder
    assert "img_encoder.pos_embed" in copied and len(copied) == 3 + 4 * 12
    assert "img_encoder.layers.2.blocks.0.mlp.fc2.bias" in copied and set(copied) <= set(model.state_dict())
    assert torch.equal(enc.pos_embed, vit.pos_embed[:, 1:])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(enc.patch_embed.proj(x), vit.patch_embed.proj(x))
    tokens = torch.randn(2, 64 + 16, 128, generator=torch.Generator().manual_seed(1))
    blocks = [b for st in enc.layers for b in st.blocks]
    with torch.no_grad():
        for mine, theirs in zip(blocks, vit.blocks):
            assert torch.allclose(mine(tokens), theirs(tokens), atol=1e-5)
    assert torch.equal(model.state_dict()["img_encoder.layers.0.group_token"], before)  # groups keep their init
    with pytest.raises(ValueError, match="small128"):
        gt.init_image_encoder(gv.load("random:small"), vit)


def test_group_label_contrastive_takes_the_best_group_per_label():
    img, lab = _unit(4, 8, seed=3), _unit(4, 3, 8, seed=4)
    pad = torch.tensor([[False, False, True], [False, True, True], [False, False, False], [True, True, True]])
    strings = [["a", "b", "x"], ["a", "y", "z"], ["c", "d", "e"], ["p", "q", "r"]]
    plain = gt.multi_label_contrastive(img, lab, 10.0, pad, strings)
    # one group: the plain multi-label loss
    assert torch.allclose(gt.group_label_contrastive(img[:, None], lab, 10.0, pad, strings), plain)
    # a copy of the group changes nothing (a max, not a mean) ...
    assert torch.allclose(gt.group_label_contrastive(torch.stack([img, img], 1), lab, 10.0, pad, strings), plain)
    # ... a group equal to each label makes the loss drop: image i holds its own labels exactly
    exact = lab.clone()  # [B, K, P] as K groups
    l_exact = gt.group_label_contrastive(exact, lab, 10.0, pad, strings)
    assert float(l_exact) < float(plain)
    # hand case: B=2, K=1, two groups; logits are the max over groups
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, -0.6]]], dtype=torch.float64)
    t = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0], [0.8, 0.8]]) * 2.0  # max_g over both labels: [i, label]
    ce = lambda row, j: float(torch.logsumexp(row, 0) - row[j])  # noqa: E731
    want = (ce(m[0], 0) + ce(m[1], 1)) / 2 + (ce(m[:, 0], 0) + ce(m[:, 1], 1)) / 2
    assert math.isclose(float(gt.group_label_contrastive(g, t, 2.0)), want, rel_tol=1e-6)

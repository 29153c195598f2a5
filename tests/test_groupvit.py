"""GroupViT: shapes and invariants of the exposed intermediates, the safe checkpoint reader, position
embedding interpolation, the CLIP tokenizer, the paper inference on planted groups, section 5.4 helpers."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbsupport.analysis import group_tokens
from nbsupport.models import checkpoints
from nbsupport.models import groupvit as gv


@pytest.fixture(scope="module")
def model():
    return gv.build("small", seed=0)


def test_intermediates_shapes_and_distributions(model):
    torch.manual_seed(0)
    out = model.encode_image(torch.randn(2, 3, 64, 64))
    assert out.grid == (8, 8)
    assert [tuple(a.shape) for a in out.soft] == [(2, 16, 64), (2, 4, 16)]
    # soft assignments are distributions over groups (Eq 15), hard ones are one-hot (Eq 16)
    for a, h in zip(out.soft, out.hard):
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], a.shape[2]))
        assert set(h.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(h.argmax(1), a.argmax(1)) and torch.equal(h.sum(1), torch.ones_like(h.sum(1)))
    # Attn = A^2 A^1 (Eq 32) is again a distribution over the final groups
    torch.testing.assert_close(out.attn, out.soft[1] @ out.soft[0])
    torch.testing.assert_close(out.attn.sum(1), torch.ones(2, 64))
    assert [tuple(s.shape) for s in out.segment_tokens] == [(2, 64, 96), (2, 16, 96), (2, 4, 96)]
    assert [tuple(g.shape) for g in out.group_tokens] == [(2, 16, 96), (2, 4, 96)]
    assert out.final_tokens.shape == (2, 4, 96) and out.attn_maps().shape == (2, 4, 8, 8)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.group_embeds.norm(dim=-1), torch.ones(2, 4))
    # the image embedding is the projected mean of the final tokens (Eq 19)
    torch.testing.assert_close(out.image_feat, out.final_tokens.mean(1))


def test_hard_assignment_merges_assigned_patches(model):
    """Eq 17 in eval mode: each new segment is proj(sum of its hard-assigned patches' values / (count + 1))."""
    torch.manual_seed(1)
    assign = model.img_encoder.layers[0].downsample.assign
    groups, segs = torch.randn(1, 5, 96), torch.randn(1, 12, 96)
    out, soft, hard = assign(groups, segs)
    logits = (assign.q_proj(groups) @ assign.k_proj(segs).transpose(1, 2)) / math.sqrt(96)
    torch.testing.assert_close(soft, logits.softmax(1))
    owner = logits.argmax(1)[0]
    v = assign.v_proj(segs)[0]
    for g in range(5):
        members = owner == g
        ref = assign.proj(v[members].sum(0) / (members.sum() + 1.0))
        torch.testing.assert_close(out[0, g], ref, atol=1e-5, rtol=1e-4)


def test_text_encoder_is_causal_and_pools_end_token(model):
    tok = gv.tokenizer()
    ids = tok(["a photo of a cat.", "a photo of a cat. and more words here"])
    z = model.encode_text(ids)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    # causal: tokens after the end token cannot change the pooled end-token feature
    ids2 = ids[:1].clone()
    ids2[0, 10:] = 500
    ids2[0, ids[0].argmax() + 1 :] = 0
    ids2[0, 12] = 700  # a token after <|endoftext|> (still a lower id than it)
    torch.testing.assert_close(model.encode_text(ids2), z[:1])
    assert not torch.allclose(z[0], z[1])


def test_position_embedding_interpolation(model):
    pos = model.img_encoder.pos_embed
    assert gv.interpolate_pos_embed(pos, (8, 8)) is pos
    up = gv.interpolate_pos_embed(pos, (16, 16))
    assert up.shape == (1, 256, 96)
    # a constant embedding stays constant; a ramp along x stays a ramp along x (row-major token order)
    torch.testing.assert_close(gv.interpolate_pos_embed(torch.ones(1, 64, 2), (12, 16)), torch.ones(1, 192, 2))
    ramp = torch.arange(8.0).repeat(8, 1).reshape(1, 64, 1)
    r = gv.interpolate_pos_embed(ramp, (16, 16)).reshape(16, 16)
    assert (r.diff(dim=1) > 0).all() and r.diff(dim=0).abs().max() < 1e-5
    assert abs(r[0, 7:9].mean().item() - 3.5) < 1e-4  # symmetric around the centre
    out = model.encode_image(torch.randn(1, 3, 96, 128))
    assert out.grid == (12, 16) and out.attn.shape == (1, 4, 192)
    # a permanently resized model gives the same output as on-the-fly interpolation
    m2 = gv.from_state_dict(model.state_dict(), model.cfg, img_size=128)
    x = torch.randn(1, 3, 128, 128)
    torch.testing.assert_close(m2.encode_image(x).attn, model.encode_image(x).attn, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.encode_image(torch.randn(1, 3, 60, 64))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_checkpoint_reader_never_runs_code(tmp_path, model):
    target = str(tmp_path / "pwned")
    ckpt = tmp_path / "ckpt.pth"
    sd = model.state_dict()
    torch.save({"model": sd, "config": _Evil(target), "epoch": 30, "nested": [1, {"a": 2.5}]}, ckpt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)  # what the official file also does
    obj = checkpoints.read_checkpoint(ckpt)
    assert not os.path.exists(target)
    assert obj["epoch"] == 30 and obj["nested"][1]["a"] == 2.5
    for k, v in sd.items():
        assert torch.equal(obj["model"][k], v), k
    m = gv.load(ckpt)
    assert m.cfg == model.cfg
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(m.encode_image(x).attn, model.encode_image(x).attn)
    with pytest.raises(FileNotFoundError, match="neither a file"):
        gv.load(tmp_path / "missing.pth")
    (tmp_path / "plain.pkl").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="zip"):
        checkpoints.read_checkpoint(tmp_path / "plain.pkl")


def test_tokenizer_known_ids():
    tok = gv.tokenizer()
    assert tok.vocab_size == 49408 and (tok.sot, tok.eot) == (49406, 49407)
    ids = tok("A photo of a cat.")
    assert ids.shape == (1, 77)
    # CLIP's ids for these words (same vocabulary as OpenAI CLIP and GroupViT)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert tok("a photo of a dog")[0, 5].item() == 1929
    assert tok.decode(tok.encode("hello   World!")) == "hello world !"
    long = tok("word " * 100)
    assert long.shape == (1, 77) and long[0, -1].item() == 49407
    with pytest.raises(ValueError, match="context length"):
        tok("word " * 100, truncate=False)


def _planted(n_classes=3, P=8):
    """2 groups: left half -> group 0, right half -> group 1; group i embeds like class i+1."""
    t = F.normalize(torch.eye(n_classes, P), dim=-1)
    attn = torch.zeros(2, 4, 6)
    attn[0, :, :3], attn[1, :, 3:] = 0.9, 0.9
    attn[0, :, 3:], attn[1, :, :3] = 0.1, 0.1
    groups = t[[1, 2]]
    image = F.normalize(t[1] + t[2], dim=-1)
    return attn, groups, image, t


def test_label_logits_planted_groups():
    attn, groups, image, t = _planted()
    logits = gv.label_logits(attn, groups, image, t, scale=100.0, bg_thresh=0.5)
    pred = logits.argmax(0)
    assert logits.shape == (4, 4, 6)
    assert (pred[:, :3] == 2).all() and (pred[:, 3:] == 3).all()  # class i -> label i+1 (0 = background)
    # background refinement (Eq 35): group 1 only half-confident -> its pixels become background
    weak = F.normalize(t[1] + t[0], dim=-1)  # torn between classes 0 and 1
    pred2 = gv.label_logits(attn, torch.stack([weak, groups[1]]), image, t, 100.0, bg_thresh=0.95).argmax(0)
    assert (pred2[:, :3] == 0).all() and (pred2[:, 3:] == 3).all()
    # without background: labels are the plain class indices
    assert (gv.label_logits(attn, groups, image, t, 100.0, bg_thresh=None).argmax(0)[:, :3] == 1).all()


def test_top5_selection():
    """A class outside the image-level top-5 (Eq 31) is never predicted, even if a group matches it best."""
    P, N = 16, 8
    t = F.normalize(torch.eye(N, P), dim=-1)
    image = F.normalize(t[:5].sum(0) + 0.01 * t[5:].sum(0), dim=-1)  # classes 0-4 are the image's top-5
    groups = torch.stack([t[7], t[2]])
    attn = torch.zeros(2, 2, 2)
    attn[0, :, 0] = attn[1, :, 1] = 1
    pred = gv.label_logits(attn, groups, image, t, 100.0, topk=5, bg_thresh=None).argmax(0)
    assert (pred[:, 1] == 2).all() and not (pred == 7).any()
    pred_all = gv.label_logits(attn, groups, image, t, 100.0, topk=N, bg_thresh=None).argmax(0)
    assert (pred_all[:, 0] == 7).all()


def test_segment_end_to_end_and_windows(model):
    torch.manual_seed(0)
    img = torch.randn(3, 64, 96)
    names = ["cat", "dog", "car"]
    pred, logits = gv.segment(model, img, names, short_side=None, window=None, return_logits=True)
    assert pred.shape == (64, 96) and logits.shape == (4, 64, 96) and pred.max() <= 3
    # windows covering the image exactly once give the whole-image result on each window
    t = gv.text_embeddings(model, names)
    p2, l2 = gv.segment(model, img, text_embeds=t, short_side=None, window=64, stride=32, return_logits=True)
    left = gv.segment_logits(model, img[None, :, :, :64], t)[0]
    torch.testing.assert_close(l2[:, :, :32], left[:, :, :32])
    pr, _ = gv.segment(model, img, text_embeds=t, short_side=32, window=None, return_logits=True)
    assert pr.shape == (64, 96)
    with pytest.raises(ValueError, match="class_names"):
        gv.segment(model, img)


def test_section_5_4_helpers():
    groups = np.array([[0, 0, 1], [1, 1, 2]])
    gt = np.array([[3, 3, 1], [1, 2, 255]])
    s = group_tokens.soft_labels(groups, gt, n_groups=3, n_classes=4)
    np.testing.assert_allclose(s, [[0, 0, 0, 1], [0, 2 / 3, 1 / 3, 0], [0, 0, 0, 0]])
    g = np.random.default_rng(0)
    train = np.concatenate([g.normal(0, 0.1, (20, 4)) + 3 * np.eye(4)[i] for i in range(3)])
    soft = np.repeat(np.eye(3), 20, axis=0)
    q = 3 * np.eye(4)[[2, 0, 1]] + g.normal(0, 0.1, (3, 4))
    assert group_tokens.knn_labels(train, soft, q, k=5, metric="euclidean").tolist() == [2, 0, 1]
    assert len(group_tokens.balanced_subset(soft, max_per_class=7)) == 21
    la = np.zeros((3, 2, 3))
    la[2, :, :2] = 1.0  # region of gt class 1 (two pixels) mostly scores class 2
    la[0, :, 2] = 1.0
    gt2 = np.array([[1, 1, 0], [1, 1, 255]])
    assert group_tokens.gt_group_labels(la, gt2).tolist() == [[2, 2, 0], [2, 2, 255]]
    attn = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert gv.group_segmentation(attn, (1, 2), (2, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_load_names():
    m = gv.load("random:small", seed=3)
    assert "random-init" in gv.describe(m) and "seed 3" in gv.describe(m)
    assert gv.weights_path("group_vit_gcc_yfcc_30e").name == "group_vit_gcc_yfcc_30e-879422e0.pth"
    with pytest.raises(ValueError, match="unknown config"):
        gv.build("huge")


def test_official_name_offline_and_from_cache(tmp_path, monkeypatch, model):
    """Offline, an official name fails with the URL and the exact cache path; a file put there (official
    layout, nested under 'model' with non-tensor objects beside it) then loads by name."""
    import urllib.error

    from nbsupport.models.checkpoints import WeightsUnavailableError

    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    name = "group_vit_gcc_yfcc_30e"
    with pytest.raises(WeightsUnavailableError) as e:
        gv.load(name, download=False)
    assert gv.URLS[name] in str(e.value) and str(gv.weights_path(name)) in str(e.value)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match="download failed"):
        gv.load(name)
    assert not gv.weights_path(name).exists()
    # the small config stands in for the official one: put a file in the cache and load it by name
    monkeypatch.setitem(gv.CONFIGS, name, model.cfg)
    gv.weights_path(name).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 30}, gv.weights_path(name))
    m = gv.load(name)
    assert m.nbs_info["pretrained"] and name in gv.describe(m)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(m.encode_image(x).image_embeds, model.encode_image(x).image_embeds)


@pytest.fixture
def release(tmp_path, monkeypatch, model):
    """The official yfcc name served by a fake torch.hub: the small model's checkpoint in the official
    layout, with the small config standing in for the official one. Returns the list of URLs fetched."""
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)
    monkeypatch.setitem(gv.CONFIGS, "group_vit_gcc_yfcc_30e", model.cfg)
    src = tmp_path / "served.pth"
    torch.save({"model": model.state_dict(), "epoch": 30}, src)
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        import shutil

        shutil.copy(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return calls


def test_official_release_honours_nbsupport_offline(release, monkeypatch):
    """NBSUPPORT_OFFLINE=1: no download is attempted, the error names the URL and the exact cache path."""
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    name = "group_vit_gcc_yfcc_30e"
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        gv.load(name)
    assert release == [] and not gv.weights_path(name).exists()
    msg = str(e.value)
    assert f"Download\n  {gv.URLS[name]}\nand put the file at\n  {gv.weights_path(name)}\n" in msg
    assert "groupvit/group_vit_gcc_yfcc_30e-879422e0.pth" in msg and "random:small" in msg


def test_official_release_pins_its_hash_and_refuses_a_changed_file(release, model):
    """The first download records the file's SHA-256 beside it; later loads use the cache and check it, so
    a file corrupted after download is refused with an error naming the file and the release URL."""
    import hashlib

    name = "group_vit_gcc_yfcc_30e"
    m1 = gv.load(name)
    m2 = gv.load(name)
    path = gv.weights_path(name)
    assert release == [gv.URLS[name]]  # downloaded once
    recorded = path.with_name(path.name + ".sha256").read_text().strip()
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(m1.encode_image(x).image_embeds, model.encode_image(x).image_embeds)
    torch.testing.assert_close(m2.encode_image(x).image_embeds, model.encode_image(x).image_embeds)
    with open(path, "r+b") as f:  # flip bytes inside the file: same size, other content
        f.seek(-64, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(checkpoints.CheckpointError, match=r"sha256 .*differs") as e:
        gv.load(name)
    assert str(path) in str(e.value) and gv.URLS[name] in str(e.value)
    assert release == [gv.URLS[name]]  # refused, not silently re-downloaded


def test_missing_shipped_model_points_at_its_recipe_and_falls_back(monkeypatch, tmp_path):
    """A shipped name whose file is absent: a clear error with the training command; with ``fallback`` the
    fallback model (seeded as asked) is returned and records what it stands in for. A path that does not
    exist is an error even with a fallback."""
    monkeypatch.setitem(
        gv.SHIPPED, "tiny_groupvit_synth", ("definitely_missing.safetensors", gv.SHIPPED["tiny_groupvit_synth"][1])
    )
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        gv.load("tiny_groupvit_synth")
    assert "definitely_missing.safetensors" in str(e.value)
    assert "python -m nbsupport groupvit-train --recipe tiny_groupvit_synth" in str(e.value)
    m = gv.load("tiny_groupvit_synth", seed=2, fallback="small")
    ref = gv.build("small", seed=2)
    assert m.nbs_info["fallback_for"] == "tiny_groupvit_synth" and gv.describe(m) == gv.describe(ref)
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="neither a file"):
        gv.load(str(tmp_path / "nope.safetensors"), fallback="small")

"""DINOv2 backbones: official names, URLs and cache paths, official-layout fixtures loaded offline into timm's
ViT, parity with timm's own DINOv2 models and with a forward written from the official code, patch grids
without CLS and register tokens, and MaskCut / best-buddy descriptors on patch 14."""

import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nbsupport.models import backbones, checkpoints, features
from nbsupport.models import fixtures as fx

SMALL = ["dinov2_vits14", "dinov2_vits14_reg"]
TIMM_NAME = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
}
URLS = {  # facebookresearch/dinov2 hub/backbones.py: _DINOV2_BASE_URL/<base name>/<full name>_pretrain.pth
    "dinov2_vits14": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2_vits14_reg": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vitb14_reg": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The two ViT-S/14 releases as official-layout random-weight fixtures (about 3 s, 180 MB)."""
    root = tmp_path_factory.mktemp("dinov2")
    fx.write_official_weights(root, names=SMALL)
    return root


@pytest.fixture
def offline(cache, monkeypatch, no_network):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(cache))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def models(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBSUPPORT_CACHE", str(cache))
        mp.setenv("NBSUPPORT_OFFLINE", "1")
        return {name: backbones.load(name) for name in SMALL}


def raw(cache, name):
    return torch.load(fx.target_path(name, cache), map_location="cpu", weights_only=True)


def images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- registry
def test_names_urls_and_cache_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    assert set(backbones.DINOV2) == set(URLS) and set(URLS) <= set(backbones.available())
    for name, url in URLS.items():
        assert backbones.release(name).url == url
        assert backbones.expected_path(name) == tmp_path / "dinov2" / url.rsplit("/", 1)[1]
        arch = backbones.DINOV2[name].arch
        assert (arch.patch_size, arch.img_size, arch.depth) == (14, 518, 12)
        assert (arch.embed_dim, arch.num_heads) == ((384, 6) if "vits" in name else (768, 12))
        assert arch.reg_tokens == (4 if name.endswith("_reg") else 0) and arch.layer_scale == 1.0
    assert not set(backbones.DINOV2) & set(backbones.OFFICIAL)  # OFFICIAL stays the DINO releases
    with pytest.raises(ValueError, match="not an official release.*dinov2_vits14_reg"):
        backbones.release("dinov2_vitl14")


def test_offline_errors_name_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.delenv("NBSUPPORT_OFFLINE", raising=False)

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(checkpoints.WeightsUnavailableError) as e:
        backbones.load("dinov2_vitb14_reg")
    msg = str(e.value)
    assert URLS["dinov2_vitb14_reg"] in msg and str(tmp_path / "dinov2" / "dinov2_vitb14_reg4_pretrain.pth") in msg
    assert "dinov2/dinov2_vitb14_reg4_pretrain.pth" in msg and "random_vits8" in msg
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(checkpoints.WeightsUnavailableError, match="dinov2_vits14_pretrain.pth"):
        backbones.load("dinov2_vits14")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("name", SMALL)
def test_fixture_has_the_official_key_layout(cache, name):
    sd = raw(cache, name)
    reg = name.endswith("_reg")
    head = ["cls_token", "pos_embed"] + ["register_tokens"] * reg + ["mask_token", "patch_embed.proj.weight"]
    assert list(sd)[: len(head)] == head  # DinoVisionTransformer's own parameters first, in order
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384) and sd["mask_token"].shape == (1, 384)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 14, 14)
    assert (sd["register_tokens"].shape == (1, 4, 384)) if reg else "register_tokens" not in sd
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight"]
    block += ["attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias"]
    block += ["mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]
    assert [k for k in sd if k.startswith("blocks.3.")] == ["blocks.3." + b for b in block]
    assert len(sd) == len(head) + 1 + 12 * 14 + 2 and list(sd)[-2:] == ["norm.weight", "norm.bias"]
    assert not any(k.startswith(("reg_token", "head", "blocks.0.0")) for k in sd)  # not timm's layout
    gamma = sd["blocks.0.ls1.gamma"]
    assert (
        0.05 < gamma.std() < 0.15 and abs(gamma.mean() - 1) < 0.02 and not torch.equal(gamma, sd["blocks.0.ls2.gamma"])
    )
    mark = checkpoints.fixture_marker(fx.target_path(name, cache))
    assert mark["name"] == name and mark["release_url"] == URLS[name]


def test_fixture_loads_offline_strictly_converted_as_timm_does(offline):
    for name in SMALL:
        sd = raw(offline, name)
        model = backbones.load(name)
        info = model.nbs_info
        reg = 4 if name.endswith("_reg") else 0
        want = "DINOv2 ViT-S/14" + (" + registers" if reg else "") + " (random weights, fixture)"
        assert info["description"] == want and info["fixture"] and not info["pretrained"]
        assert (info["patch_size"], info["embed_dim"], info["num_heads"], info["depth"]) == (14, 384, 6, 12)
        assert (info["num_register_tokens"], info["layer_scale"], info["img_size"]) == (reg, True, 518)
        assert model.num_prefix_tokens == 1 + reg and model.no_embed_class == bool(reg)
        msd = model.state_dict()
        assert set(msd) == set(sd) - {"mask_token", "register_tokens"} | ({"reg_token"} if reg else set())
        for k in sd:
            if k.startswith(("blocks.", "patch_embed.", "norm.")):
                assert torch.equal(msd[k], sd[k]), k
        if reg:  # registers get no position: CLS's position folded into cls_token, patches keep theirs
            assert torch.equal(msd["reg_token"], sd["register_tokens"])
            assert torch.equal(msd["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
            assert torch.equal(msd["pos_embed"], sd["pos_embed"][:, 1:])
        else:
            assert torch.equal(msd["cls_token"], sd["cls_token"]) and torch.equal(msd["pos_embed"], sd["pos_embed"])


# ---------------------------------------------------------------------------------------------- parity
def timm_model(name, sd):
    """timm's own DINOv2 definition with ``sd`` (official layout) put through timm's checkpoint filter."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    m = timm.create_model(TIMM_NAME[name], pretrained=False, img_size=518, num_classes=0, dynamic_img_size=True)
    m.load_state_dict(checkpoint_filter_fn(dict(sd), m))
    return m.eval()


@pytest.mark.parametrize("name", SMALL)
def test_parity_with_timms_dinov2_models(cache, models, name):
    ours, ref = models[name], timm_model(name, raw(cache, name))
    assert isinstance(ref.blocks[0].ls1.gamma, torch.nn.Parameter) and ref.num_prefix_tokens == ours.num_prefix_tokens
    p = ours.num_prefix_tokens
    for shape in [(2, 3, 224, 224), (1, 3, 182, 252)]:
        x = images(*shape)
        with torch.no_grad():
            want = ref.forward_features(x)  # [B, P + h*w, D], final norm applied
            tokens = ours.norm(features.extract(ours, x, "token", -1))
        h, w = shape[2] // 14, shape[3] // 14
        assert tokens.shape == (shape[0], h, w, 384)
        torch.testing.assert_close(tokens.reshape(shape[0], h * w, 384), want[:, p:], rtol=1e-5, atol=1e-5)
        grid, cls = features.extract(ours, x, "token", -1, include_cls=True)
        torch.testing.assert_close(ours.norm(cls), want[:, 0], rtol=1e-5, atol=1e-5)
    # keys of block 7 by hand from timm's forward, prefix tokens dropped
    x = images(2, 3, 224, 196, seed=1)
    with torch.no_grad():
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        for blk in ref.blocks[:7]:
            t = blk(t)
        k = ref.blocks[7].attn.qkv(ref.blocks[7].norm1(t))[..., 384:768]
    keys = features.extract(ours, x, "key", 7)
    assert keys.shape == (2, 16, 14, 384)
    torch.testing.assert_close(keys.reshape(2, -1, 384), k[:, p:], rtol=1e-5, atol=1e-5)


def official_forward(sd, x, n_reg, interpolate_offset, antialias, heads=6):
    """DINOv2's forward written from facebookresearch/dinov2 (``prepare_tokens_with_masks``,
    ``interpolate_pos_encoding``, ``Block``, ``Attention``) on the official state dict, without timm:
    CLS + patches + interpolated positions, then the registers inserted after CLS; blocks
    ``x + ls1 * attn(norm1 x)``, ``x + ls2 * mlp(norm2 x)``; final norm. Returns (cls, registers, patches)."""
    b, _, height, width = x.shape
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    pos = sd["pos_embed"]
    n, side, h0, w0 = pos.shape[1] - 1, math.isqrt(pos.shape[1] - 1), height // 14, width // 14
    if not (t.shape[1] - 1 == n and height == width):
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        if interpolate_offset:
            kw = {"scale_factor": ((h0 + interpolate_offset) / side, (w0 + interpolate_offset) / side)}
        else:
            kw = {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    t = t + pos
    if n_reg:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."

        def ln(z, key):
            return F.layer_norm(z, (dim,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)

        qkv = F.linear(ln(t, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, t.shape[1], 3, heads, dim // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = F.linear(
            a.transpose(1, 2).reshape(b, t.shape[1], dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        t = t + sd[p + "ls1.gamma"] * a
        m = F.gelu(F.linear(ln(t, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + sd[p + "ls2.gamma"] * F.linear(m, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return t[:, 0], t[:, 1 : 1 + n_reg], t[:, 1 + n_reg :]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("dinov2_vits14", (1, 3, 518, 518)),  # native grid: no interpolation
        ("dinov2_vits14_reg", (1, 3, 518, 518)),
        ("dinov2_vits14_reg", (2, 3, 224, 280)),  # _reg: size-based antialiased bicubic, as timm resamples
    ],
)
def test_matches_a_forward_written_from_the_official_code(cache, models, name, shape):
    sd, ours = raw(cache, name), models[name]
    n_reg = 4 if name.endswith("_reg") else 0
    offset, antialias = (0.0, True) if n_reg else (0.1, False)  # hub/backbones.py settings
    x = images(*shape, seed=2)
    with torch.no_grad():
        cls, regs, patches = official_forward(sd, x, n_reg, offset, antialias)
        full = ours.forward_features(x)
    grid, our_cls = features.extract(ours, x, "token", -1, include_cls=True)
    h, w = shape[2] // 14, shape[3] // 14
    torch.testing.assert_close(ours.norm(grid).reshape(shape[0], h * w, -1), patches, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.norm(our_cls), cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full[:, 1 : 1 + n_reg], regs, rtol=1e-4, atol=1e-4)  # registers: not in any grid
    assert patches.std() > 0.5  # normalised tokens of random weights: not degenerate


# ---------------------------------------------------------------------------------------------- grids
def test_every_facet_drops_cls_and_registers(models):
    model = models["dinov2_vits14_reg"]
    x = images(2, 3, 112, 140, seed=3)
    p, (h, w), layer = 5, (8, 10), 4
    got = features.extract_many(model, x, [(f, layer) for f in features.FACETS])
    tokens, _ = features.embed(model, x)
    assert tokens.shape == (2, p + h * w, 384)
    with torch.no_grad():
        t = tokens
        for blk in model.blocks[:layer]:
            t = blk(t)
        blk = model.blocks[layer]
        qkv = blk.attn.qkv(blk.norm1(t))
        out = blk(t)
    for facet, ref in (
        ("query", qkv[..., :384]),
        ("key", qkv[..., 384:768]),
        ("value", qkv[..., 768:]),
        ("token", out),
    ):
        assert got[(facet, layer)].shape == (2, h, w, 384), facet
        torch.testing.assert_close(got[(facet, layer)].reshape(2, h * w, 384), ref[:, p:], rtol=1e-5, atol=1e-5)
    attn = features.attention(model, x, layer)
    assert attn.shape == (2, 6, p + h * w, p + h * w)
    grid = got[("attn", layer)]
    assert grid.shape == (2, h, w, 6 * (p + h * w))
    torch.testing.assert_close(grid[:, 0, 0].reshape(2, 6, -1), attn[:, :, p])  # patch (0, 0) is token P
    torch.testing.assert_close(grid[:, -1, -1].reshape(2, 6, -1), attn[:, :, -1])
    torch.testing.assert_close(grid.reshape(2, h, w, 6, -1).sum(-1), torch.ones(2, h, w, 6))


def test_cls_attention_and_saliency_cover_patches_only(models):
    model = models["dinov2_vits14_reg"]
    x = images(2, 3, 98, 126, seed=4)
    a = features.attention(model, x, -1)
    cls = features.cls_attention(model, x)
    assert cls.shape == (2, 6, 7, 9)
    torch.testing.assert_close(cls.flatten(2), a[:, :, 0, 5:])
    # CLS attends to itself and the 4 registers too: its patch attention sums to what is left over
    torch.testing.assert_close(cls.flatten(2).sum(-1), 1 - a[:, :, 0, :5].sum(-1))
    assert (a[:, :, 0, 1:5].sum(-1) > 1e-3).all()
    sal = features.cls_saliency(model, x, heads=[1, 3])
    ref = cls[:, [1, 3]].mean(1)
    lo, hi = ref.flatten(1).min(1).values, ref.flatten(1).max(1).values
    torch.testing.assert_close(sal, (ref - lo[:, None, None]) / (hi - lo)[:, None, None])


def test_other_input_sizes_interpolate_positions(models):
    for model in models.values():
        for size in [(70, 70), (168, 126)]:
            g = features.extract(model, images(1, 3, *size), "key", -1)
            assert g.shape == (1, size[0] // 14, size[1] // 14, 384) and torch.isfinite(g).all()
        g7 = features.extract(model, images(1, 3, 70, 70), "token", 2, stride=7)
        assert g7.shape == (1, 9, 9, 384)


def test_480_px_is_cropped_to_476_with_a_warning(models):
    """Patch 14 does not divide 480: the grid is 34 x 34, exactly the features of the top-left 476 px, and the
    call warns naming the sizes that fit (476 or 490)."""
    model = models["dinov2_vits14_reg"]
    x = images(1, 3, 480, 480, seed=5)
    with pytest.warns(UserWarning, match=r"480x480 is not a multiple of the patch 14.*476x476"):
        g = features.extract(model, x, "key", -1)
    assert g.shape == (1, 34, 34, 384) and features.covered_size(480, 480, 14) == (476, 476)
    torch.testing.assert_close(g, features.extract(model, x[..., :476, :476], "key", -1))
    assert features.snap_size(480, 14) == 476 and features.snap_size(486, 14) == 490


def test_random_twin_and_safetensors_roundtrip(models, tmp_path):
    model = models["dinov2_vits14_reg"]
    twin = backbones.random_like(model)
    assert backbones.describe(twin) == "random-init ViT-S/14 + registers (seed 0)"
    assert twin.num_prefix_tokens == 5 and twin.nbs_info["layer_scale"] and not twin.nbs_info["pretrained"]
    assert torch.equal(twin.blocks[0].ls1.gamma, torch.ones(384))  # LayerScale at the hub's init value
    assert not torch.allclose(twin.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    path = backbones.save_safetensors(model, tmp_path / "v2reg.safetensors")
    back = backbones.load(path)
    assert (back.nbs_info["num_register_tokens"], back.nbs_info["layer_scale"], back.nbs_info["img_size"]) == (
        4,
        True,
        518,
    )
    x = images(1, 3, 84, 84, seed=6)
    torch.testing.assert_close(features.extract(back, x, "attn", 3), features.extract(model, x, "attn", 3))


def test_official_file_by_path_and_training_checkpoint(cache, models, tmp_path):
    """An official file given by path infers registers and LayerScale; a DINOv2 training checkpoint (teacher,
    ``backbone.`` prefix, blocks in chunks ``blocks.<chunk>.<i>``, heads) loads to the same backbone."""
    x = images(1, 3, 56, 70, seed=7)
    for name in SMALL:
        by_path = backbones.load(fx.target_path(name, cache))
        assert by_path.nbs_info["num_register_tokens"] == models[name].nbs_info["num_register_tokens"]
        assert by_path.nbs_info["fixture"] and by_path.nbs_info["img_size"] == 518
        torch.testing.assert_close(features.extract(by_path, x), features.extract(models[name], x))
    sd = raw(cache, "dinov2_vits14_reg")
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        chunked["backbone." + k] = v
    chunked["dino_head.mlp.0.weight"] = torch.zeros(8, 384)
    chunked["ibot_head.mlp.0.weight"] = torch.zeros(8, 384)
    torch.save({"teacher": chunked, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    teacher = backbones.load(tmp_path / "teacher_checkpoint.pth")
    torch.testing.assert_close(features.extract(teacher, x), features.extract(models["dinov2_vits14_reg"], x))


# ---------------------------------------------------------------------------------------------- consumers
def pil(seed, size=(150, 120)):
    """A PIL image with a bright square on a dark textured background."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 60).astype(np.uint8)
    arr[30:90, 40:110] = 220
    return Image.fromarray(arr)


def test_maskcut_pipeline_runs_on_dinov2(models):
    from nbsupport.maskcut.pipeline import image_masks

    model = models["dinov2_vits14_reg"]
    imgs = [pil(0), pil(1, (97, 131))]
    masks = image_masks(model, imgs, size=224, n_masks=2, tau="median")
    assert [m.shape for m in masks] == [(2, 120, 150), (2, 131, 97)]
    assert all(m.dtype == bool and m[0].any() for m in masks)
    # 480 px (the reference size) is not a multiple of 14: it runs on the 476-px crop, and says so
    with pytest.warns(UserWarning, match="not a multiple of the patch 14"):
        at480 = image_masks(model, imgs[:1], size=480, n_masks=1, tau="median")
    assert at480[0].shape == (1, 120, 150)


def test_best_buddy_descriptors_on_dinov2(models):
    from nbsupport.analysis.correspondences import descriptors, find_correspondences
    from nbsupport.data.images import image_to_tensor

    model = models["dinov2_vits14"]
    x = image_to_tensor(pil(2), 224)
    d = descriptors(model, x, layer=9, facet="key", bin=True, stride=7)
    assert d.grid == (31, 31) == features.grid_size(224, 224, 14, 7)
    assert d.desc.shape == (31 * 31, 17 * 384) and d.saliency.shape == (31, 31)
    assert d.saliency.min() == 0 and d.saliency.max() == 1
    res = find_correspondences(model, pil(2), pil(3), n_pairs=3, size=224, stride=14, bin=False)
    assert res.patch == 14 and res.grid_a == (16, 16) and len(res.points_a) == 3
    assert ((res.points_a - 7) % 14 == 0).all() and (res.points_a <= 7 + 15 * 14).all()  # centres y * 14 + 7


# ---------------------------------------------------------------------------------------------- ViT-B
@pytest.mark.slow
def test_vitb14_fixtures_load_and_match_timm(tmp_path, monkeypatch):
    names = ["dinov2_vitb14", "dinov2_vitb14_reg"]
    fx.write_official_weights(tmp_path, names=names)
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    x = images(1, 3, 112, 112, seed=8)
    for name in names:
        sd = torch.load(fx.target_path(name, tmp_path), weights_only=True)
        assert sd["pos_embed"].shape == (1, 1370, 768) and sd["blocks.11.ls2.gamma"].shape == (768,)
        model = backbones.load(name)
        info = model.nbs_info
        assert (info["embed_dim"], info["num_heads"], info["num_register_tokens"]) == (
            768,
            12,
            4 * name.endswith("_reg"),
        )
        assert info["description"].startswith("DINOv2 ViT-B/14")
        ref = timm_model(name, sd)
        with torch.no_grad():
            want = ref.forward_features(x)[:, model.num_prefix_tokens :]
        got = model.norm(features.extract(model, x, "token", -1)).reshape(1, 64, 768)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

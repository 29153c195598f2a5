"""Feature extractor: facets against a manual computation, stride, log-binning, saliency, coordinates."""

import numpy as np
import pytest
import torch

from nbsupport.models import backbones, features


@pytest.fixture(scope="module")
def tiny():
    return backbones.load("random_tiny8")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g)


def manual_qkv(model, images, layer):
    """q, k, v of block ``layer`` recomputed from the block's qkv weights with timm's own forward."""
    x = model.patch_embed(images)  # dynamic_img_size: [B, h, w, D]
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:layer]:
        x = blk(x)
    blk = model.blocks[layer]
    xn = blk.norm1(x)
    W, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
    d = x.shape[-1]
    q = xn @ W[:d].T + bias[:d]
    k = xn @ W[d : 2 * d].T + bias[d : 2 * d]
    v = xn @ W[2 * d :].T + bias[2 * d :]
    return x, q, k, v


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_qkv_match_manual(tiny, images, layer):
    with torch.no_grad():
        _, q, k, v = manual_qkv(tiny, images, layer)
    got = features.extract_many(tiny, images, [("query", layer), ("key", layer), ("value", layer)])
    for name, ref in (("query", q), ("key", k), ("value", v)):
        grid = got[(name, layer)]
        assert grid.shape == (2, 8, 8, 96)
        torch.testing.assert_close(grid.reshape(2, 64, 96), ref[:, 1:], rtol=1e-5, atol=1e-5)


def test_cls_returned_separately(tiny, images):
    with torch.no_grad():
        _, _, k, _ = manual_qkv(tiny, images, 1)
    grid, cls = features.extract(tiny, images, "key", 1, include_cls=True)
    torch.testing.assert_close(cls, k[:, 0], rtol=1e-5, atol=1e-5)
    assert grid.shape == (2, 8, 8, 96)


def test_token_last_layer_equals_timm_forward(tiny, images):
    grid = features.extract(tiny, images, "token", -1)
    with torch.no_grad():
        ref = tiny.forward_features(images)  # final norm applied by timm
    torch.testing.assert_close(tiny.norm(grid).reshape(2, 64, -1), ref[:, 1:], rtol=1e-5, atol=1e-5)


def test_attn_rows_are_probabilities_and_match_manual(tiny, images):
    layer = 2
    a = features.attention(tiny, images, layer)
    assert a.shape == (2, 3, 65, 65)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 65))
    with torch.no_grad():
        _, q, k, _ = manual_qkv(tiny, images, layer)
    hd = 32
    qh = q.reshape(2, 65, 3, hd).transpose(1, 2)
    kh = k.reshape(2, 65, 3, hd).transpose(1, 2)
    ref = (qh @ kh.transpose(-1, -2) / hd**0.5).softmax(-1)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    grid = features.extract(tiny, images, "attn", layer)
    assert grid.shape == (2, 8, 8, 3 * 65)
    torch.testing.assert_close(grid[0, 0, 0].reshape(3, 65), a[0, :, 1])


def test_stride_equal_patch_is_plain_forward(tiny, images):
    a = features.extract(tiny, images, "key", -1)
    b = features.extract(tiny, images, "key", -1, stride=8)
    torch.testing.assert_close(a, b)


def test_overlapping_stride_grid_and_positions(tiny, images):
    g = features.extract(tiny, images, "token", 1, stride=4)
    assert g.shape[1:3] == features.grid_size(64, 64, 8, 4) == (15, 15)
    # every other overlapping patch sits exactly on a plain patch: the patch embeddings agree there
    x4, _ = features.embed(tiny, images, stride=4)
    x8, _ = features.embed(tiny, images, stride=8)
    pe = tiny.patch_embed.proj
    with torch.no_grad():
        conv4 = torch.nn.functional.conv2d(images, pe.weight, pe.bias, stride=4)[:, :, ::2, ::2]
        conv8 = pe(images)
    torch.testing.assert_close(conv4, conv8)
    assert x4.shape == (2, 1 + 15 * 15, 96) and x8.shape == (2, 65, 96)


def test_non_square_and_other_sizes(tiny):
    x = torch.randn(1, 3, 48, 80)
    assert features.extract(tiny, x, "key").shape == (1, 6, 10, 96)


def test_bad_inputs(tiny, images):
    with pytest.raises(ValueError, match="facet"):
        features.extract(tiny, images, "keys")
    with pytest.raises(ValueError, match="layer 4 out of range"):
        features.extract(tiny, images, "key", 4)
    with pytest.raises(ValueError, match="stride"):
        features.extract(tiny, images, "key", stride=9)
    with pytest.raises(ValueError, match="smaller than one"):
        features.extract(tiny, torch.randn(1, 3, 4, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        features.extract(tiny, torch.randn(1, 1, 64, 64))


def test_model_untouched_after_failure(tiny, monkeypatch):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules())

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(tiny.blocks[1].mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        features.extract(tiny, torch.randn(1, 3, 64, 64), "key", -1, stride=4)
    monkeypatch.undo()
    assert tiny.patch_embed.proj.stride == (8, 8)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules()) == hooks_before
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k])


def slow_log_bin(desc, hierarchy=2):
    """Loop reference: for every patch, the 3x3 neighbourhood of 3^k-averaged cells, clamped at borders."""
    b, h, w, d = desc.shape
    x = desc.permute(0, 3, 1, 2).numpy().astype(np.float64)
    pools = []
    for k in range(hierarchy):
        s = 3**k
        p = np.zeros_like(x)
        for y in range(h):
            for xx in range(w):
                y0, y1 = max(0, y - s // 2), min(h, y + s // 2 + 1)
                x0, x1 = max(0, xx - s // 2), min(w, xx + s // 2 + 1)
                p[:, :, y, xx] = x[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
        pools.append(p)
    n_bins = 1 + 8 * hierarchy
    out = np.zeros((b, h, w, n_bins * d))
    for y in range(h):
        for xx in range(w):
            part = 0
            for k in range(hierarchy):
                s = 3**k
                for i in range(y - s, y + s + 1, s):
                    for j in range(xx - s, xx + s + 1, s):
                        if k and i == y and j == xx:
                            continue
                        ii, jj = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                        out[:, y, xx, part * d : (part + 1) * d] = pools[k][:, :, ii, jj]
                        part += 1
    return out


@pytest.mark.parametrize("shape,hier", [((2, 7, 9, 5), 2), ((1, 2, 3, 4), 2), ((1, 11, 10, 3), 3)])
def test_log_bin_equals_loop(shape, hier):
    desc = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = features.log_bin(desc, hier)
    assert got.shape == (*shape[:3], (1 + 8 * hier) * shape[3])
    np.testing.assert_allclose(got.numpy(), slow_log_bin(desc, hier), rtol=1e-12, atol=1e-12)


def test_cls_saliency_and_heads(tiny, images):
    sal = features.cls_saliency(tiny, images)
    assert sal.shape == (2, 8, 8)
    assert torch.allclose(sal.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(sal.flatten(1).max(1).values, torch.ones(2))
    a = features.cls_attention(tiny, images, heads=[0, 2])
    full = features.attention(tiny, images)[:, :, 0, 1:].reshape(2, 3, 8, 8)
    torch.testing.assert_close(a, full[:, [0, 2]])
    with pytest.raises(ValueError, match="heads"):
        features.cls_attention(tiny, images, heads=[5])


def test_attention_mass_mask_hand_case():
    attn = torch.tensor([[[0.5, 0.1], [0.3, 0.1]]])
    # sorted 0.5, 0.3, 0.1, 0.1: mass 0.6 needs 0.5 + 0.3 -> two patches
    m = features.attention_mass_mask(attn, 0.6)
    assert m.tolist() == [[[True, False], [True, False]]]
    assert features.attention_mass_mask(attn, 0.5).sum() == 1
    assert features.attention_mass_mask(attn, 1.0).all()
    with pytest.raises(ValueError):
        features.attention_mass_mask(attn, 0.0)


def test_patch_pixel_roundtrip():
    yx = np.array([[0, 0], [3, 5], [54, 54]])
    pix = features.patch_to_pixel(yx, stride=4, patch=8)
    assert pix.tolist() == [[4, 4], [16, 24], [220, 220]]
    np.testing.assert_array_equal(features.pixel_to_patch(pix, 4, 8), yx)
    assert features.pixel_to_patch([[500, -3]], 4, 8, grid=(55, 55)).tolist() == [[54, 0]]


@pytest.fixture(scope="module")
def tiny_reg():
    """A small DINOv2-style ViT (patch 14, 2 registers, LayerScale) with random weights."""
    arch = backbones.Arch(14, embed_dim=48, depth=3, num_heads=3, img_size=56, reg_tokens=2, layer_scale=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = backbones.build(arch).eval()
        for p in model.parameters():  # timm zero-inits biases and 1e-6 tokens: make every parameter matter
            p.data.normal_(0, 0.1).add_(1.0 if p.dim() == 1 and p.shape[0] == 48 else 0.0)
    return model


def test_prefix_tokens_counted_for_registers(tiny, tiny_reg):
    assert features.num_prefix_tokens(tiny) == 1 and features.num_prefix_tokens(tiny_reg) == 3
    x = torch.randn(2, 3, 42, 70, generator=torch.Generator().manual_seed(2))
    tokens, grid = features.embed(tiny_reg, x)
    with torch.no_grad():
        ref = tiny_reg.norm_pre(tiny_reg._pos_embed(tiny_reg.patch_embed(x)))  # timm's own token assembly
    assert grid == (3, 5) and tokens.shape == (2, 3 + 15, 48)
    torch.testing.assert_close(tokens, ref)
    got = features.extract_many(tiny_reg, x, [("key", 1), ("token", 2), ("attn", 0)], include_cls=True)
    with torch.no_grad():
        t = tiny_reg.blocks[0](ref)
        k = tiny_reg.blocks[1].attn.qkv(tiny_reg.blocks[1].norm1(t))[..., 48:96]
        out = tiny_reg.forward_features(x)
    keys, cls_key = got[("key", 1)]
    torch.testing.assert_close(keys.reshape(2, 15, 48), k[:, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_key, k[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_reg.norm(got[("token", 2)][0]).reshape(2, 15, 48), out[:, 3:], rtol=1e-5, atol=1e-5)
    attn, _ = got[("attn", 0)]
    assert attn.shape == (2, 3, 5, 3 * 18)
    a = features.attention(tiny_reg, x, 0)
    torch.testing.assert_close(attn[:, 1, 2].reshape(2, 3, 18), a[:, :, 3 + 1 * 5 + 2])
    c = features.cls_attention(tiny_reg, x, 0)
    torch.testing.assert_close(c.flatten(2), a[:, :, 0, 3:])
    # CLS's attention to itself and the registers is left out
    torch.testing.assert_close(c.flatten(2).sum(-1), 1 - a[:, :, 0, :3].sum(-1))
    assert a[:, :, 0, :3].sum(-1).mean() > 0.05


def test_sizes_that_are_not_multiples_of_the_patch(tiny_reg, recwarn):
    assert features.covered_size(480, 480, 14) == (476, 476) and features.covered_size(224, 224, 14, 4) == (222, 222)
    assert [features.snap_size(s, 14) for s in (480, 483, 484, 7, 14)] == [476, 476, 490, 14, 14]
    assert features.snap_size(480, 8) == 480 and features.snap_size(480, 16) == 480
    with pytest.raises(ValueError, match="positive"):
        features.snap_size(0, 14)
    x = torch.randn(1, 3, 45, 60, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match=r"45x60 is not a multiple of the patch 14: the last 3 rows and 4 columns"):
        g = features.extract(tiny_reg, x, "value", 1)
    torch.testing.assert_close(g, features.extract(tiny_reg, x[..., :42, :56], "value", 1))  # the crop, exactly
    recwarn.clear()
    features.extract(tiny_reg, x[..., :42, :56], "key", 1)
    features.extract(tiny_reg, x, "key", 1, stride=7)  # overlapping patches: the grid formula is the contract
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]

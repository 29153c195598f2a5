"""Hidden Positives: planted features whose global and local positives are known, the symmetric rule, the
contrastive loss by hand, and the head's training on a planted problem."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from nbsupport.analysis import hidden_positives as hp

D = 64


def planted_batch():
    """3 images of 4x4 patches: group A (feature e0) and group B (e1) recur across images, every other
    patch has its own direction e2, e3, ...; the pool holds 0.9 e0 + .., 0.9 e1 + .. and e63."""
    groups = torch.full((3, 4, 4), -1)
    groups[0, 0, :3] = 0
    groups[1, 2, 1:] = 0
    groups[2, 3, 3] = 0
    groups[0, 3, :2] = 1
    groups[2, :2, 0] = 1
    feats = torch.zeros(3, 4, 4, D)
    nxt = 2
    for b, y, x in np.ndindex(3, 4, 4):
        g = int(groups[b, y, x])
        if g >= 0:
            feats[b, y, x, g] = 1.0
        else:
            feats[b, y, x, nxt] = 1.0
            nxt += 1
    side = float(np.sqrt(1 - 0.9**2))
    pool = torch.zeros(3, D)
    pool[0, 0], pool[0, 63] = 0.9, side
    pool[1, 1], pool[1, 63] = 0.9, side
    pool[2, 63] = 1.0
    return feats, groups, pool


def test_planted_global_positives_are_exactly_the_groups():
    feats, groups, pool = planted_batch()
    f = feats.reshape(-1, D)
    c = hp.anchor_criterion(f, pool)
    g = groups.flatten()
    assert torch.allclose(c[g == 0], torch.full(((g == 0).sum(),), 0.9)) and torch.all(c[g < 0] == 0)
    pos = hp.global_hidden_positives(f, pool)
    expected = (g[:, None] == g[None]) & (g[:, None] >= 0)
    expected.fill_diagonal_(False)
    assert torch.equal(pos, expected)
    assert pos.sum() == 7 * 6 + 4 * 3  # 7 patches in A, 4 in B, across three images
    # Fig. 5 helper: the same positives for one anchor, and its closest reference
    out = hp.anchor_positives(feats, pool, (1, 2, 1))
    assert out["reference"] == 0 and out["criterion"] == pytest.approx(0.9)
    expected_anchor = groups == 0
    expected_anchor[1, 2, 1] = False  # the anchor itself
    assert torch.equal(out["global"], expected_anchor)


def test_symmetric_rule():
    f = torch.tensor([[1.0, 0.0], [0.5, np.sqrt(0.75)]])  # cos = 0.5
    c = torch.tensor([0.4, 0.6])
    one_way = hp.hidden_positive_mask(f, c, symmetric=False)
    assert one_way.tolist() == [[False, True], [False, False]]
    assert hp.hidden_positive_mask(f, c).tolist() == [[False, True], [True, False]]
    g = torch.Generator().manual_seed(0)
    x, pool = torch.randn(80, 8, generator=g), torch.randn(20, 8, generator=g)
    sym = hp.global_hidden_positives(x, pool)
    asym = hp.global_hidden_positives(x, pool, symmetric=False)
    assert torch.equal(sym, sym.T) and torch.equal(sym, asym | asym.T) and not torch.equal(asym, asym.T)


def test_anchor_criterion_matches_scipy():
    g = torch.Generator().manual_seed(1)
    x, pool = torch.randn(50, 12, generator=g), torch.randn(30, 12, generator=g)
    c, idx = hp.anchor_criterion(x, pool, chunk=7, return_index=True)
    sim = 1 - cdist(x.numpy(), pool.numpy(), "cosine")
    assert np.allclose(c.numpy(), sim.max(1), atol=1e-6) and np.array_equal(idx.numpy(), sim.argmax(1))


def test_reference_pool_one_patch_per_image():
    feats = torch.arange(10 * 3 * 4, dtype=torch.float32).reshape(10, 3, 4, 1).repeat(1, 1, 1, 2)
    pool, index = hp.build_reference_pool(feats, m=6, generator=torch.Generator().manual_seed(0), return_index=True)
    assert pool.shape == (6, 2) and len(set(index[:, 0].tolist())) == 6
    for q, (b, y, x) in zip(pool, index.tolist()):
        assert torch.equal(q, feats[b, y, x])
    batches = [feats[:4], feats[4:]]
    whole = hp.build_reference_pool(batches, generator=torch.Generator().manual_seed(0), return_index=True)[1]
    assert whole[:, 0].tolist() == list(range(10))


def test_local_positives_from_planted_attention():
    h = w = 4
    attn = torch.full((1, 16, 16), 0.01)
    anchor = 1 * w + 1
    for j in (anchor, 0 * w + 1, 1 * w + 2):  # itself, above, right
        attn[0, anchor, j] = 0.3
    idx, mask, t = hp.local_hidden_positives(attn, (h, w))
    chosen = sorted(idx[anchor][mask[0, anchor]].tolist())
    assert chosen == [1, 5, 6]
    assert torch.allclose(t[0, anchor][mask[0, anchor]], torch.full((3,), 0.3))
    # a corner anchor never selects a neighbour outside the grid
    attn2 = torch.ones(1, 16, 16)
    attn2[0, 0, 0] = 5.0
    idx2, mask2, _ = hp.local_hidden_positives(attn2, (h, w))
    assert mask2[0, 0].sum() == 1 and idx2[0][mask2[0, 0]].tolist() == [0]
    # Eq. 9 by hand: s_mix = (sigma * 0.3 * (s_5 + s_1 + s_6)) / 3
    s = torch.arange(16.0)[None, :, None].repeat(1, 1, 2)
    mixed = hp.mix_local(s, idx, mask, t, sigma=2.0)
    assert torch.allclose(mixed[0, anchor], torch.full((2,), 2.0 * 0.3 * (5 + 1 + 6) / 3))
    out = hp.anchor_positives(torch.randn(1, 4, 4, 3), torch.randn(2, 3), (0, 1, 1), attn=attn)
    assert out["local"].nonzero().tolist() == [[0, 1], [1, 1], [1, 2]]
    coded = hp.normalise_attention(attn, "code")
    assert torch.allclose(coded.sum(-1), torch.ones(1, 16))


def test_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    pos = torch.zeros(4, 4, dtype=torch.bool)
    neg = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 2], neg[0, 1], neg[0, 3] = True, True, True
    tau = 0.5
    s2 = 1 / np.sqrt(2)
    expected = -np.log(np.exp(s2 / tau) / (np.exp(s2 / tau) + np.exp(0) + np.exp(-1 / tau)))
    assert hp.contrastive_loss(z, z, pos, neg, tau).item() == pytest.approx(expected, rel=1e-6)
    w = pos.float() * 2.0
    assert hp.weighted_contrastive_loss(z, w, neg, tau).item() == pytest.approx(expected, rel=1e-6)


def planted_training_set(seed=0, n=8, h=4, w=4, c=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, h, w), generator=g)
    protos = torch.randn(3, c, generator=g)
    feats = protos[labels] + 0.6 * torch.randn(n, h, w, c, generator=g)
    same = (labels.reshape(n, -1, 1) == labels.reshape(n, 1, -1)).float()
    attn = (same + 0.1) / (same + 0.1).sum(-1, keepdim=True)
    return feats, attn, labels


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_head_training_lowers_the_loss(variant):
    feats, attn, labels = planted_training_set()
    local = hp.local_hidden_positives(attn, (4, 4))
    pool = hp.build_reference_pool(feats, generator=torch.Generator().manual_seed(3))

    def loss_of(head):
        head.eval()
        with torch.no_grad():
            return hp.hp_loss(
                head, feats, local, pool, tau=0.4, rho=0.5, variant=variant, generator=torch.Generator().manual_seed(5)
            )[0].item()

    torch.manual_seed(0)
    start = loss_of(hp.HPHead(16, 16))
    head, hist = hp.train_hp_head(
        feats,
        attn,
        dim=16,
        steps=60,
        batch_size=8,
        lr=5e-3,
        tau=0.4,
        rho=0.5,
        pool_size=8,
        pool_refresh=20,
        variant=variant,
        device="cpu",
    )
    assert len(hist) == 60 and hist[-1]["lambda"] == pytest.approx(1.0)
    end = loss_of(head)
    assert end < start - 0.3  # paper: 7.91 -> 7.31 (floor about 6.3); code: 3.98 -> 3.62 (floor about 3.1)
    s = hp.segment_features(head, feats)
    assert s.shape == (8, 4, 4, 16)

    def gap(h):  # mean cosine of same-label minus different-label patch pairs of z
        with torch.no_grad():
            z = h.eval().project(h(feats)).reshape(-1, 16)
        cs, lab = z @ z.T, labels.flatten()
        same = lab[:, None] == lab[None]
        return (cs[same].mean() - cs[~same].mean()).item()

    torch.manual_seed(0)
    assert gap(hp.HPHead(16, 16)) < 0.5 and gap(head) > 1.0


def test_hp_features_on_random_backbone():
    from nbsupport.models import backbones

    model = backbones.load("random_tiny8")
    feats, attn = hp.hp_features(model, torch.randn(3, 3, 64, 64), batch_size=2)
    assert feats.shape == (3, 8, 8, 96) and attn.shape == (3, 64, 64)
    assert torch.all(attn.sum(-1) <= 1 + 1e-5) and torch.all(attn >= 0)
    from nbsupport.models.features import attention, extract

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f2, a2 = hp.hp_features(model, x)
    with torch.no_grad():
        assert torch.allclose(f2, model.norm(extract(model, x, "token", -1)), atol=1e-5)
    assert torch.allclose(a2, attention(model, x)[:, :, 1:, 1:].mean(1), atol=1e-6)

"""Entropy maps and regularisers (thesis Eq 36-44): uniform -> log n, one-hot -> 0, hand cases, gradients."""

import math

import pytest
import torch

from nbsupport.analysis import entropy as E


def test_uniform_and_one_hot_group_entropy():
    G, P = 8, 12
    uniform = torch.full((G, P), 1 / G)
    assert torch.allclose(E.group_entropy(uniform), torch.full((P,), math.log(G)))
    one_hot = torch.nn.functional.one_hot(torch.arange(P) % G, G).T.float()
    assert torch.allclose(E.group_entropy(one_hot), torch.zeros(P))
    assert E.group_entropy_loss(torch.stack([uniform, one_hot])).item() == pytest.approx(math.log(G) / 2)


def test_hand_computed_case():
    attn = torch.tensor([[0.5, 0.9], [0.5, 0.1]])  # 2 groups x 2 patches
    h = E.group_entropy(attn)
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_label_entropy_through_groups():
    # patch 0 sits fully in group 0, whose label logits are very peaked -> ~0; patch 1 in group 1 (flat) -> log K
    attn = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a_st = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = E.label_affinity(attn, a_st)
    assert torch.allclose(t.sum(-1), torch.ones(2))
    le = E.label_entropy(attn, a_st)
    assert le[0].item() == pytest.approx(0.0, abs=1e-6) and le[1].item() == pytest.approx(math.log(3))
    assert E.label_entropy_loss(attn, a_st).item() == pytest.approx(math.log(3) / 2, abs=1e-6)


def test_pixel_label_entropy():
    l_aff = torch.tensor([[[2.0, 2.0], [1.0, 0.0]]])
    h = E.pixel_label_entropy(l_aff)
    assert torch.allclose(h, torch.tensor([[math.log(2), 0.0]]))


def test_segment_affinity_entropy_weights():
    G, K = 4, 5
    flat = torch.zeros(G, K)  # uniform both ways
    assert E.segment_affinity_entropy(flat).item() == pytest.approx(0.2 * math.log(K) + 0.1 * math.log(G))
    peaked = torch.eye(G, K) * 100
    # rows are one-hot; column 4 (no group prefers it) is uniform over groups
    expected = 0.1 * (math.log(G) / K)
    assert E.segment_affinity_entropy(peaked).item() == pytest.approx(expected, abs=1e-5)


def test_gradients_flow_and_reduce_entropy():
    logits = torch.zeros(8, 16, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    torch.manual_seed(0)
    noise = torch.randn(8, 16)
    start = None
    for _ in range(100):
        loss = E.group_entropy_loss(torch.softmax(logits + noise, dim=0))
        start = start if start is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logits.grad is not None and loss.item() < 0.5 * start


def test_maps():
    vals = torch.arange(6.0)
    pm, px = E.to_maps(vals, (2, 3), (4, 6))
    assert pm.tolist() == [[0, 1, 2], [3, 4, 5]] and px.shape == (4, 6)
    assert px.min() >= 0 and px.max() <= 5
    with pytest.raises(ValueError, match="grid"):
        E.to_maps(vals, (2, 2))


def test_entropy_maps_and_se_terms():
    # 2 groups over a 2x2 grid: left column certain, right column uniform
    attn = torch.tensor([[1.0, 0.5, 1.0, 0.5], [0.0, 0.5, 0.0, 0.5]])
    a_st = torch.tensor([[30.0, 0.0], [0.0, 30.0]])
    maps = E.entropy_maps(attn, (2, 2), (4, 4), a_st)
    g_patch, g_px = maps["group"]
    assert torch.allclose(g_patch, torch.tensor([[0.0, math.log(2)], [0.0, math.log(2)]]), atol=1e-6)
    assert (
        g_px.shape == (4, 4)
        and g_px[:, 0].abs().max() < 1e-6
        and torch.allclose(g_px[:, 3], torch.full((4,), math.log(2)))
    )
    l_patch, _ = maps["label"]  # right column mixes two confident groups -> ~log 2 over labels too
    assert l_patch[0, 0].item() == pytest.approx(0.0, abs=1e-6) and l_patch[0, 1].item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    h_g, h_l = E.segment_affinity_terms(torch.tensor([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]))
    assert h_g.tolist() == pytest.approx([math.log(3), 0.0], abs=1e-6)
    assert h_l.tolist() == pytest.approx([0.0, math.log(2), math.log(2)], abs=1e-6)


def test_groupvit_entropy_matches_an_independent_numpy_computation():
    """groupvit_entropy on a small GroupViT: A_ST (Eq 28) from the model's own embeddings, GE / LE per patch
    (Eq 36, 39-40) and the scores (Eq 37, 41, 44) recomputed in float64 numpy; the pixel maps are the patch
    maps resized; the model's train/eval mode is restored and does not change the numbers."""
    import numpy as np

    from nbsupport.models import groupvit as gv

    model = gv.build("small", seed=0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    names = ["striped triangle", "dotted circle", "grass"]
    model.train()
    r = E.groupvit_entropy(model, x, names)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        out = model.encode_image(x)
        text = gv.text_embeddings(model, names)
        scale = float(model.scale)
    assert r.grid == (8, 8) and r.attn.shape == (2, 4, 64) and r.a_st.shape == (2, 4, 3)
    assert (r.n_groups, r.n_labels) == (4, 3) and r.group.shape == r.label.shape == (2, 64, 64)
    a_st = scale * out.group_embeds.double().numpy() @ text.double().numpy().T
    np.testing.assert_allclose(r.a_st.numpy(), a_st, rtol=1e-4, atol=1e-4)
    attn = out.attn.double().numpy()  # [B, G, P]
    ge = -(attn * np.log(np.clip(attn, 1e-12, None))).sum(1)  # [B, P]
    sm = np.exp(a_st - a_st.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    t_aff = attn.transpose(0, 2, 1) @ sm  # [B, P, K]
    le = -(t_aff * np.log(np.clip(t_aff, 1e-12, None))).sum(-1)
    col = np.exp(a_st - a_st.max(-2, keepdims=True))
    col /= col.sum(-2, keepdims=True)
    h_rows = -(sm * np.log(sm)).sum(-1).mean(-1)  # Eq 42
    h_cols = -(col * np.log(col)).sum(-2).mean(-1)  # Eq 43
    want = {"GE (Eq 37)": ge.mean(), "LE (Eq 41)": le.mean(), "SE (Eq 44)": (0.2 * h_rows + 0.1 * h_cols).mean()}
    got = r.scores()
    assert list(got) == list(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    up = torch.nn.functional.interpolate(
        torch.from_numpy(ge).float().reshape(2, 1, 8, 8), size=(64, 64), mode="bilinear"
    )
    torch.testing.assert_close(r.group, up[:, 0], atol=1e-4, rtol=0)
    assert float(r.group.max()) <= math.log(4) + 1e-5 and float(r.label.max()) <= math.log(3) + 1e-5
    again = E.groupvit_entropy(model, x, names)  # eval mode: same numbers as from train mode
    torch.testing.assert_close(again.a_st, r.a_st)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        E.groupvit_entropy(model, x[0], names)

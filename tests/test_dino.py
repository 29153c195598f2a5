"""DINO trainer: centering and EMA formulas, schedules, frozen teacher, loss decreases, exact resume."""
import json
import math

import numpy as np
import pytest
import torch

from nbsupport import backbones, dino


def test_center_update_formula():
    loss = dino.DINOLoss(out_dim=4, n_crops=3, center_momentum=0.9)
    t = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    s = torch.randn(6, 4)
    loss(s, t, teacher_temp=0.04)
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[2.0, 2, 2, 2]]))
    loss(s, t, teacher_temp=0.04)
    assert torch.allclose(loss.center, 0.9 * 0.2 + 0.1 * torch.tensor([[2.0, 2, 2, 2]]))


def test_loss_hand_case_and_view_pairs():
    # 2 global + 1 local crop, batch 1, K = 2; teacher centre 0, sharp temperature -> one-hot targets
    loss = dino.DINOLoss(out_dim=2, n_crops=3, student_temp=1.0)
    t = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    got = loss(s, t, teacher_temp=0.01).item()
    ls = torch.log_softmax(s, -1)
    # pairs (teacher view, student view): (0,1), (0,2), (1,0), (1,2)
    expected = -(ls[1, 0] + ls[2, 0] + ls[0, 1] + ls[2, 1]) / 4
    assert got == pytest.approx(expected.item(), abs=1e-5)


def test_ema_and_schedules():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    dino.ema_update(a, b, 0.99)
    assert torch.allclose(a.weight, 0.99 * wa + 0.01 * wb)
    s = dino.cosine_schedule(1.0, 0.0, 110, warmup_steps=10)
    assert len(s) == 110 and s[0] == 0.0 and s[10] == pytest.approx(1.0)
    assert s[60] == pytest.approx(0.5) and s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    m = dino.cosine_schedule(0.996, 1.0, 100)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) >= 0)


def test_head_last_layer_is_weight_normalised():
    head = dino.DINOHead(16, out_dim=32, hidden=24, bottleneck=8)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(32), atol=1e-5)


def tiny_cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), patch_size=8, embed_dim=32, depth=2, num_heads=2, image_size=32,
                local_size=16, n_local=2, out_dim=64, steps=40, batch_size=8, lr=2e-3, warmup_steps=5,
                warmup_teacher_steps=10, checkpoint_every=10, seed=0, device="cpu")
    base.update(kw)
    return dino.Config(**base)


def test_teacher_gets_no_gradient_and_follows_the_student(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=6, checkpoint_every=100)
    student, teacher, _ = dino.build_networks(cfg)
    assert all(not p.requires_grad for p in teacher.parameters())
    dino.train(cfg, resume=False, log=lambda *_: None)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    s, t = state["student"], state["teacher"]
    key = "backbone.blocks.0.attn.qkv.weight"
    init = student.state_dict()[key]
    # the student moved; the teacher moved only a little towards it (momentum 0.996)
    assert (s[key] - init).norm() > 10 * (t[key] - init).norm() > 0
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)


def test_resume_continues_identically(tmp_path):
    a = tiny_cfg(tmp_path, out=str(tmp_path / "a"), steps=20)
    b = tiny_cfg(tmp_path, out=str(tmp_path / "b"), steps=20)
    full = dino.train(a, resume=False, log=lambda *_: None)
    dino.train(b, resume=False, log=lambda *_: None, max_steps=10)  # "killed" after the step-10 checkpoint
    resumed = dino.train(b, resume=True, log=lambda *_: None)
    assert resumed["step"] == full["step"] == 20
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-4)
    out = dino.export_teacher(tmp_path / "b" / "checkpoint.pth", tmp_path / "t.safetensors")
    model = backbones.load(out)
    assert model.nbs_info["num_heads"] == 2 and model.nbs_info["depth"] == 2

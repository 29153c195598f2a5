"""Shared training infrastructure: schedules on hand-computed values, the JSON-lines log (torn last line vs a
corrupt middle line, truncation for resume), atomic writes that fail cleanly, checkpoints, the step logger,
single-process distributed helpers."""

import json
import math
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nbsupport.core import distributed
from nbsupport.core.io import append_jsonl, atomic_torch_save, atomic_write_text, read_jsonl, truncate_jsonl
from nbsupport.training import common
from nbsupport.training.common import (
    MetricsLog,
    StepLogger,
    cosine_schedule,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    warmup_cosine_lr,
    warmup_multistep_lr,
)

# ------------------------------------------------------------------------------------------------ schedules


def test_cosine_schedule_hand_values():
    s = cosine_schedule(1.0, 0.0, 8, warmup_steps=4, start=0.2)
    # warm-up 0.2 -> 1 in 4 steps (endpoint excluded), then (1 + cos(pi t / 4)) / 2 for t = 0..3
    want = [0.2, 0.4, 0.6, 0.8, 1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert np.allclose(s, want)
    assert np.allclose(cosine_schedule(0.04, 0.4, 3), [0.04, 0.04 + 0.36 * 0.25, 0.04 + 0.36 * 0.75])
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)


def test_warmup_cosine_with_restarts_hand_values():
    kw = dict(total=110, warmup=10, base=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    assert warmup_cosine_lr(2, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.2)
    # a quarter into the cosine: min + (base - min) (1 + cos(pi / 4)) / 2
    assert warmup_cosine_lr(35, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.sqrt(0.5)))
    # two cycles: a quarter of the span is half of the first cycle; the restart is back at the top
    assert warmup_cosine_lr(35, cycles=2, **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert warmup_cosine_lr(60, cycles=2, **kw) == pytest.approx(1e-3)
    assert warmup_cosine_lr(500, cycles=2, **kw) == pytest.approx(1e-5)  # past the end: min_lr


def test_warmup_multistep_hand_values():
    lr = [warmup_multistep_lr(i, 0.01, [3, 5], 0.1, 2, 0.001) for i in range(7)]
    assert lr == pytest.approx([1e-5, 0.01 * 0.5005, 0.01, 0.001, 0.001, 1e-4, 1e-4])


# ------------------------------------------------------------------------------------------------ JSON lines


def test_torn_last_line_is_dropped_but_a_corrupt_middle_line_raises(tmp_path):
    p = tmp_path / "m.jsonl"
    for i in range(1, 4):
        append_jsonl(p, {"step": i})
    with open(p, "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3}]
    p.write_text('{"step": 1}\n\n{"step": 2}\n')  # blank lines are skipped
    assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    p.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: corrupt JSON line"):
        read_jsonl(p)
    p.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: expected a JSON object"):
        read_jsonl(p)
    p.write_bytes(b'{"step": 1}\n{"s": "\xc3')  # a torn multi-byte character at the end
    assert read_jsonl(p) == [{"step": 1}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_truncate_for_an_exact_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    for i in range(1, 6):
        append_jsonl(p, {"iter": i, "loss": 1.0 / i})
    with open(p, "a") as f:
        f.write('{"iter": 6')
    assert truncate_jsonl(p, lambda r: r["iter"] <= 3) == 3
    assert p.read_text() == "".join(json.dumps({"iter": i, "loss": 1.0 / i}) + "\n" for i in (1, 2, 3))
    append_jsonl(p, {"iter": 4, "loss": 0.25})  # the resumed run continues the log without duplicates
    assert [r["iter"] for r in read_jsonl(p)] == [1, 2, 3, 4]
    assert truncate_jsonl(tmp_path / "none.jsonl", lambda r: True) == 0 and not (tmp_path / "none.jsonl").exists()
    # MetricsLog: a fresh start deletes, a resume truncates, a disabled (non-main) log writes nothing
    log = MetricsLog(tmp_path)
    log.start(resume_keep=lambda r: r["iter"] <= 2)
    assert [r["iter"] for r in log.read()] == [1, 2]
    MetricsLog(tmp_path, enabled=False).append({"iter": 99})
    MetricsLog(tmp_path, enabled=False).start(None)
    assert [r["iter"] for r in common.read_metrics(tmp_path)] == [1, 2]
    log.start(resume_keep=None)
    assert not p.exists() and log.read() == []


# ------------------------------------------------------------------------------------------------ atomic writes


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_leaves_no_partial_file_when_the_write_fails(tmp_path):
    ck = tmp_path / "checkpoint.pth"
    save_checkpoint(ck, {"w": torch.arange(3.0), "step": 1})
    before = ck.read_bytes()
    big = {"w": torch.zeros(100_000), "bad": _Unpicklable()}  # fails after the tensor part is written
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(ck, big)
    assert ck.read_bytes() == before and not (tmp_path / "checkpoint.pth.tmp").exists()
    assert list(tmp_path.iterdir()) == [ck]
    with pytest.raises(RuntimeError):
        atomic_torch_save(big, tmp_path / "new.pth")
    assert not (tmp_path / "new.pth").exists() and not (tmp_path / "new.pth.tmp").exists()
    state = load_checkpoint(ck)
    assert torch.equal(state["w"], torch.arange(3.0)) and state["step"] == 1
    atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello" and not (tmp_path / "sub" / "a.txt.tmp").exists()


class _Code:
    pass


def test_checkpoints_load_with_weights_only(tmp_path):
    torch.save({"obj": _Code()}, tmp_path / "code.pth")  # not through save_checkpoint: holds a class instance
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "code.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_seed_everything_shifts_python_and_numpy_by_rank_not_torch():
    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5, rank=1)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert a[0] != b[0] and a[1] != b[1] and a[2] == b[2]


# ------------------------------------------------------------------------------------------------ step logger


def test_step_logger_records_every_log_every_steps_with_images_per_second(tmp_path, monkeypatch):
    clock = iter([0.0, 2.0, 4.0])  # construction, step 2, step 5
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: next(clock, 0.0)))
    log = MetricsLog(tmp_path)
    logger = StepLogger(log, total=5, log_every=2, always=(5,), show=False)
    assert [logger.due(s) for s in range(1, 6)] == [False, True, False, True, True]
    written = []
    for step in range(1, 6):
        rec = None if step == 4 else {"step": step}  # step 4: skipped (e.g. a NaN loss), nothing logged
        written.append(logger.step(step, images=10, record=rec))
    assert [w is not None for w in written] == [False, True, False, False, True]
    recs = log.read()
    assert [r["step"] for r in recs] == [2, 5]
    # images since the previous record over the time since it: 20 / 2 s, then 30 / 2 s
    assert [r["images_per_s"] for r in recs] == [10.0, 15.0]
    quiet = StepLogger(MetricsLog(tmp_path / "q", enabled=False), total=3, main=False)
    assert not quiet.due(1) and quiet.step(1, 4, {"step": 1}) is None and not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="log_every"):
        StepLogger(log, total=3, log_every=0)


# ------------------------------------------------------------------------------------------------ distributed


def test_single_process_distributed_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.device.type, ctx.is_main, ctx.ddp) == (0, 1, 0, "cpu", True, False)
    x = torch.arange(4.0, requires_grad=True)
    assert distributed.all_gather(x) is x and distributed.all_gather_objects(["a"]) == [["a"]]
    assert distributed.all_true(True) and not distributed.all_true(False)
    y = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_reduce_mean(y), torch.tensor([2.0, 4.0]))
    m = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(m, ctx) is m
    distributed.barrier()
    with pytest.raises(ValueError, match="device must be one of"):
        distributed.setup("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            distributed.setup("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        distributed.setup("cpu")

"""Fine-tuning experiments on GroupViT (thesis 5.5-5.8, notebook 08): one seeded fine-tuning run from given
starting weights, and the Table 11 ablation, one such run per set of entropy regularisers (GE Eq 37, LE
Eq 39-41, SE Eq 42-44), every run from the same weights with the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from nbsupport.data import caption_labels as textmod
from nbsupport.models.groupvit.model import GroupViT
from nbsupport.training.groupvit.config import TrainConfig
from nbsupport.training.groupvit.loop import train

#: The entropy regularisers of thesis section 5.8 and their :class:`TrainConfig` weight fields.
REGULARISERS = {"GE": "w_ge", "LE": "w_le", "SE": "w_se"}


def regularisers(spec: str) -> tuple[str, ...]:
    """A Table 11 row name -> its regularisers: ``"none"`` / ``""`` -> ``()``, ``"GE+LE"`` -> ``("GE", "LE")``."""
    if spec in ("none", ""):
        return ()
    regs = tuple(r.strip() for r in spec.split("+"))
    bad = [r for r in regs if r not in REGULARISERS]
    if bad:
        raise ValueError(f"unknown regulariser {bad[0]!r} in {spec!r}: join {sorted(REGULARISERS)} with '+', or 'none'")
    return regs


def _schedule(epochs: int, lr: float, regs=()) -> dict:
    """Notebook 08's schedule and penalties: warm-up from ``lr / 100`` over ``min(1, epochs / 2)`` epochs,
    cosine down to ``lr / 100``; each named regulariser with weight 1, the others 0."""
    return dict(
        epochs=epochs,
        lr=lr,
        min_lr=lr / 100,
        warmup_lr=lr / 100,
        warmup_epochs=min(1.0, epochs / 2),
        **{w: 1.0 if r in regs else 0.0 for r, w in REGULARISERS.items()},
    )


def finetune_config(out_dir, epochs: int, lr: float, regs=(), **fields) -> TrainConfig:
    """A fine-tuning run's :class:`TrainConfig`: notebook 08's schedule (:func:`_schedule`), never resumed
    (each run starts from the weights it is given), ``fields`` for everything else (``model``, ``data``,
    ``n_train``, ``image_size``, ``batch_size``, ``trainable`` ...)."""
    clash = sorted(set(fields) & ({"min_lr", "warmup_lr", "warmup_epochs", "resume"} | set(REGULARISERS.values())))
    if clash:
        raise ValueError(f"{clash} follow from epochs, lr and regs here; do not pass them")
    regularisers("+".join(regs))  # validates the names
    return TrainConfig(out_dir=str(out_dir), resume=False, **_schedule(epochs, lr, regs), **fields)


def finetune(base: GroupViT, cfg: TrainConfig, progress=None) -> dict:
    """Fine-tune a copy of ``base`` (left untouched) with ``cfg``, the global RNG seeded with ``cfg.seed``
    first so every run starts alike; returns :func:`~nbsupport.training.groupvit.loop.train`'s result."""
    torch.manual_seed(cfg.seed)
    return train(cfg, model=copy.deepcopy(base), progress=progress)


def regulariser_ablation(
    base: GroupViT, cfg: TrainConfig, specs, out_root, epochs: int | None = None, before: float | None = None
) -> tuple[list[dict], dict[str, GroupViT]]:
    """Thesis Table 11: for every row name in ``specs`` (``"none"``, ``"GE"``, ``"GE+LE"`` ...) fine-tune
    ``base`` with ``cfg`` for ``epochs`` (default ``cfg.epochs``; the warm-up follows them), only the named
    regularisers on (weight 1), into ``out_root/ablation_<names>``. Returns the table rows ``{"Model",
    "Method", "synthetic val mIoU"}`` (first ``"Original"`` = ``before`` when given; the mIoU after the last
    epoch) and the fine-tuned models by row name."""
    specs = list(specs)
    parsed = [regularisers(s) for s in specs]  # every name is checked before the first run starts
    epochs = cfg.epochs if epochs is None else int(epochs)
    rows = [] if before is None else [{"Model": "GroupViT", "Method": "Original", "synthetic val mIoU": before}]
    models = {}
    for spec, regs in zip(specs, parsed):
        tag = "ablation_" + ("_".join(regs) if regs else "none")
        run_cfg = dataclasses.replace(cfg, out_dir=str(Path(out_root) / tag), **_schedule(epochs, cfg.lr, regs))
        res = finetune(base, run_cfg)
        models[spec] = res["model"]
        miou = res["val"]["miou"] if res["val"] else float("nan")
        rows.append(
            {"Model": "GroupViT", "Method": " + ".join(regs) if regs else "Fine-tuned", "synthetic val mIoU": miou}
        )
    return rows, models


def label_examples(captions, cfg: TrainConfig, modes=("repeat", "pad")) -> tuple[list[dict], str]:
    """The labels a run with ``cfg`` draws from each caption (thesis 4.3, 5.6-5.7): nouns, noun phrases and
    the ``cfg.num_labels`` labels of kind ``cfg.label_kind`` with their ``<PAD>`` mask, per pad mode. Returns
    the rows and the name of the tagger used (``cfg.tagger``: NLTK's perceptron, WordNet or built-in)."""
    tagger = textmod.get_tagger(cfg.tagger)
    rows = []
    for c in captions:
        for mode in modes:
            lab = textmod.extract_labels(c, cfg.num_labels, cfg.label_kind, mode, tagger)
            rows.append(
                {
                    "caption": c,
                    "pad mode": mode,
                    "nouns": textmod.extract_nouns(c, tagger),
                    "noun phrases": textmod.extract_noun_phrases(c, tagger),
                    "labels": lab.raw,
                    "pad mask": lab.pad,
                }
            )
    return rows, tagger.name

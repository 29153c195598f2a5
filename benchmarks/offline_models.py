"""What the offline models know, in the measures the notebooks report: the self-supervised tiny DINO, the
supervised stand-ins and their random-init floors, on synthetic validation scenes.

ViT backbones (``tiny_dino_synth``, ``tiny_vit_synth_supervised``, ``random_tiny8``), at 128 px:

- class AUC of last-block keys: same- vs different-class cosine similarity of object patches (ROC AUC,
  20000 seeded pairs of each kind; the measure of ``backbone_quality.py`` and notebook 01);
- median key cosine: the median cosine similarity of two object patches' keys (near 1 = parallel keys);
- probe accuracy: a ridge-regression linear probe on the normed last-block patch tokens, fit on train scenes
  and scored on the object patches of the validation scenes (the same probe for every backbone);
- head accuracy: the stand-in's own patch head on the same patches.

GroupViTs (random-init ``small`` as the smoke profile uses it, random-init ``small128``, ``tiny_groupvit_synth_supervised``):

- zero-shot mIoU at 64 px (and 128 px), :func:`nbsupport.analysis.zero_shot.zero_shot_miou` with the class
  names as prompts and the background names scored as background; the all-background prediction's mIoU;
- group entropy of ``Attn`` at 128 px on patches inside objects, inside the background and on borders (nats; log 4 =
  1.39 is uniform over the 4 final groups);
- kNN purity of the final group tokens at 128 px (k = 10, in token space): the share of each owned token's nearest
  tokens with its majority label.

    python benchmarks/offline_models.py                  # 200 scenes; rewrites the table in docs/experiments/offline_models.md
    python benchmarks/offline_models.py --images 48 --no-write
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "offline_models.md"
START, END = "<!-- offline-models-table:start -->", "<!-- offline-models-table:end -->"


def vit_rows(n_images: int, n_probe: int, size: int = 128) -> list[dict]:
    from nbsupport.analysis import affinity
    from nbsupport.models import backbones
    from nbsupport.training.standins import vit
    from nbsupport.training.standins.data import scene_pool

    val = scene_pool(n_images, size, 0, "val")
    train = scene_pool(n_probe, size, 0, "train")
    sem = np.asarray(val.semantic)
    rows = []
    for name in ("random_tiny8", "tiny_dino_synth", "tiny_vit_synth_supervised"):
        model = backbones.load(name)

        def run(pool, m=model):
            with torch.no_grad():
                outs = [vit.forward(m, pool.images[s : s + 16]) for s in range(0, len(pool), 16)]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

        keys, tok = run(val)
        intra, inter = affinity.patch_pairs(keys, sem, "cosine", 20000, 0)
        auc = affinity.separability(intra, inter)["auc"]
        median_cos = float(np.median(np.concatenate([intra, inter])))
        _, tok_train = run(train)
        probe = ridge_probe(tok_train, train.semantic, tok, val.semantic)
        row = {"model": name, "description": backbones.describe(model), "key AUC": auc, "median key cos": median_cos}
        row["probe acc"] = probe
        if name == "tiny_vit_synth_supervised":
            path = backbones.paths.data_dir() / backbones.SHIPPED[name]
            row["head acc"] = vit.patch_accuracy(model, vit.load_heads(path).patch, val)["objects"]
        rows.append(row)
    return rows


def ridge_probe(x_train, y_train, x_val, y_val, lam: float = 1.0) -> float:
    """Object-patch accuracy of a ridge-regression one-hot probe (``lam``) fit on labelled train patches."""
    xt, yt = x_train.flatten(0, 2).double(), y_train.flatten()
    keep = yt >= 0
    xt, yt = xt[keep], yt[keep]
    xt = torch.cat([xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1)
    y1 = torch.nn.functional.one_hot(yt, 7).double()
    w = torch.linalg.solve(xt.T @ xt + lam * torch.eye(xt.shape[1], dtype=xt.dtype), xt.T @ y1)
    xv, yv = x_val.flatten(0, 2).double(), y_val.flatten()
    pred = (torch.cat([xv, torch.ones(len(xv), 1, dtype=xv.dtype)], 1) @ w).argmax(1)
    obj = yv > 0
    return float((pred[obj] == yv[obj]).double().mean())


def groupvit_rows(n_images: int, sizes=(64, 128), extra=()) -> list[dict]:
    from nbsupport.analysis import embedding, metrics
    from nbsupport.analysis.group_tokens import collect_tokens
    from nbsupport.analysis.zero_shot import zero_shot_miou
    from nbsupport.data.scenes import synthetic_class_names, synthetic_scenes
    from nbsupport.models import groupvit as gv
    from nbsupport.models.checkpoints import WeightsUnavailableError
    from nbsupport.training.standins.groupvit import group_stats

    names, bgs = synthetic_class_names("name")
    data = {s: synthetic_scenes(n_images, 0, s) for s in sizes}
    rows = []
    for name in ("random:small", "random:small128", "tiny_groupvit_synth_supervised", *extra):
        try:
            model = gv.load(name)
        except WeightsUnavailableError as e:  # not shipped: say so in the table
            rows.append({"model": name, "description": f"not available: {str(e)[:60]}"})
            continue
        row = {"model": name, "description": gv.describe(model)}
        for s, (imgs, sem) in data.items():
            row[f"mIoU {s}px"] = zero_shot_miou(model, imgs, sem, names, bgs)["miou"]
        row.update({f"entropy {k}": v for k, v in group_stats(model, min(n_images, 64), sizes[-1]).items()})
        imgs, sem = data[sizes[-1]]
        feats, soft = collect_tokens(model, imgs, sem, len(names) + 1).owned()
        row["token kNN purity"] = embedding.knn_purity(feats, soft.argmax(-1), k=10)
        rows.append(row)
    bg = {"model": "all background", "description": "every pixel background"}
    for s, (_, sem) in data.items():
        conf = metrics.confusion_matrix(np.zeros_like(sem.numpy()), sem.numpy(), len(names) + 1)
        bg[f"mIoU {s}px"] = metrics.miou(conf)
    return [*rows, bg]


def table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table; mIoU columns (percent) with one decimal, the others with three."""

    def f(c, v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.1f}" if c.startswith("mIoU") else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(["model", *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([f"`{r['model']}`", *(f(c, r.get(c)) for c in cols)]) + " |" for r in rows]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    """Put ``text`` between the table markers of :data:`DOC` (appended when the markers are missing)."""
    doc = DOC.read_text() if DOC.is_file() else "# Offline models\n"
    block = f"{START}\n{text}\n{END}"
    if START in doc and END in doc:
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="validation scenes")
    ap.add_argument("--probe-images", type=int, default=200, help="train scenes the linear probe is fit on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave the doc alone")
    ap.add_argument("--groupvit", nargs="*", default=[], help="more GroupViT weights (paths) to measure")
    ap.add_argument("--skip-groupvit", action="store_true", help="the ViT rows only (implies --no-write)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vr = vit_rows(args.images, args.probe_images)
    gr = [] if args.skip_groupvit else groupvit_rows(args.images, extra=args.groupvit)
    text = (
        f"ViT backbones, {args.images} validation scenes at 128 px (probe fit on {args.probe_images} train scenes):\n\n"
        + table(vr, ["key AUC", "median key cos", "probe acc", "head acc"])
        + f"\n\nGroupViTs, {args.images} validation scenes (entropy and kNN purity at 128 px, the notebooks' size):\n\n"
        + table(
            gr,
            ["mIoU 64px", "mIoU 128px", "entropy objects", "entropy background", "entropy borders", "token kNN purity"],
        )
        + f"\n\n(`python benchmarks/offline_models.py --images {args.images}`, {(time.time() - t0) / 60:.1f} min.)"
    )
    print(text)
    if not (args.no_write or args.skip_groupvit):
        write_doc(text)


if __name__ == "__main__":
    main()

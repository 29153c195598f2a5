"""MaskCut: several object masks per image from normalised cuts on a ViT patch graph (thesis 1.2, 3.3).

The reference (CutLER's ``maskcut.py``) is followed step by step:

1. patch features (DINO last-block keys) are L2-normalised; ``A = cos > tau`` binarised, zeros replaced
   by ``eps`` so the graph stays connected, diagonal kept; ``D = diag(row sums)``;
2. the second-smallest generalised eigenvector ``x`` of ``(D - A) x = lambda D x`` (the Ncut relaxation);
3. bipartition ``x > mean(x)``; if >= 3 of the 4 corner patches are foreground, flip (this rule first);
   otherwise flip when the seed ``argmax |x|`` is background; the seed is then ``argmax`` of the
   (possibly flipped) vector; keep the seed's 4-connected component;
4. next pass: zero the *features* of every patch already taken and rebuild the graph (taken nodes stay,
   nearly disconnected); a pass whose mask has IoU > 0.5 with the previous pass's mask or covers <= 1% of
   the patches is rejected (an empty mask).

Rejection quirk, kept on purpose: a rejected pass adds nothing to the taken set, so the next pass solves
the same graph again and is compared with the *empty* previous mask; the reference behaves this way and
we match it (``after_reject="reference"``). ``after_reject="stop"`` leaves every later pass empty instead.

Solver. The eigenvector is computed exactly, not approximated: with ``M = D^-1/2 A D^-1/2`` the wanted
vector is ``x = D^-1/2 y`` where ``y`` is the top eigenvector of ``M`` orthogonal to the known top one
``D^1/2 1``. ``solver="lobpcg"`` (default, CPU) runs scipy's LOBPCG with that constraint and a block of 4
vectors, and checks the residual; when it does not converge to 1e-6 the dense solve is used (counted
in ``SolverStats``). ``solver="torch"`` uses a batched ``torch.linalg.eigh`` of ``M`` in float64 on the
features' device (GPU). ``solver="dense"`` is the reference ``scipy.linalg.eigh(D - A, D)``. The sign of
an eigenvector is arbitrary and the corner/seed rules make the result sign-invariant; when lambda2 and
lambda3 nearly coincide different exact solvers may legitimately return different vectors (CutLER
issue #71): tests compare solvers where the spectral gap is clear.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass
class SolverStats:
    calls: int = 0
    fallbacks: int = 0
    seconds: float = 0.0
    gaps: list = field(default_factory=list)  # lambda3 - lambda2 of the generalised problem, per call


STATS = SolverStats()
BLOCK = 2  # LOBPCG block size: 2 vectors converge fast even when lambda2 and lambda3 are close


def cosine_matrix(feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, N]`` (float32) of features ``[N, D]``; all-zero rows give 0."""
    f = F.normalize(feats.float(), dim=1)
    return f @ f.T


def affinity(feats_or_cos: torch.Tensor, tau: float, eps: float = 1e-5, is_cos: bool = False) -> np.ndarray:
    """Binarised cosine affinity ``[N, N]`` (float64): 1 where cos > tau, else eps (diagonal kept).
    Pass features ``[N, D]`` or, with ``is_cos``, a cosine matrix."""
    s = feats_or_cos if is_cos else cosine_matrix(feats_or_cos)
    one = torch.ones((), dtype=torch.float64, device=s.device)
    return torch.where(s > tau, one, torch.full((), eps, dtype=torch.float64, device=s.device)).cpu().numpy()


def _dense_reference(A: np.ndarray) -> tuple[np.ndarray, float]:
    import scipy.linalg

    d = A.sum(1)
    vals, vecs = scipy.linalg.eigh(np.diag(d) - A, np.diag(d), subset_by_index=[1, 2])
    return vecs[:, 0], float(vals[1] - vals[0])


def second_eigenvector(A, solver: str = "lobpcg", tol: float = 1e-6, seed: int = 0) -> np.ndarray:
    """The second-smallest generalised eigenvector ``x`` of ``(D - A) x = lambda D x`` for a symmetric
    affinity ``A [N, N]`` (numpy or torch), float64, up to sign and scale."""
    t0 = time.perf_counter()
    STATS.calls += 1
    A_t = torch.as_tensor(A, dtype=torch.float64)
    if solver == "dense":
        x, gap = _dense_reference(A_t.cpu().numpy())
        STATS.gaps.append(gap)
        STATS.seconds += time.perf_counter() - t0
        return x
    d = A_t.sum(1)
    dis = d.rsqrt()
    y1 = d.sqrt()
    y1 = y1 / y1.norm()
    if solver == "torch":
        vals, vecs = torch.linalg.eigh(dis[:, None] * A_t * dis[None, :])
        y = vecs[:, -2]
        STATS.gaps.append(float(vals[-2] - vals[-3]) if len(vals) > 2 else float("nan"))
        x = (dis * y).cpu().numpy()
    elif solver == "lobpcg":
        import warnings

        from scipy.sparse.linalg import LinearOperator, lobpcg

        An = A_t.cpu().numpy()
        dn = dis.cpu().numpy()
        n = An.shape[0]
        op = LinearOperator((n, n), matvec=lambda v: dn * (An @ (dn * v.ravel())),
                            matmat=lambda X: dn[:, None] * (An @ (dn[:, None] * X)), dtype=np.float64)
        vals = None
        if n >= 12:
            X = np.random.default_rng(seed).standard_normal((n, BLOCK))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    vals, vecs = lobpcg(op, X, Y=y1.cpu().numpy()[:, None], largest=True, tol=1e-8, maxiter=300)
                except Exception:  # noqa: BLE001 - fall back to the dense solve below
                    vals = None
        ok = False
        if vals is not None:
            order = np.argsort(-vals)
            vals, vecs = vals[order], vecs[:, order]
            y = vecs[:, 0] / np.linalg.norm(vecs[:, 0])
            my = op.matvec(y)
            lam = float(y @ my)
            res = np.linalg.norm(my - lam * y)
            ok = res < tol
        if ok:
            STATS.gaps.append(float(vals[0] - vals[1]) if len(vals) > 1 else float("nan"))
            x = dn * y
        else:
            STATS.fallbacks += 1
            w, v = np.linalg.eigh(dn[:, None] * An * dn[None, :])
            STATS.gaps.append(float(w[-2] - w[-3]) if n > 2 else float("nan"))
            x = dn * v[:, -2]
    else:
        raise ValueError(f"unknown solver {solver!r}: use 'lobpcg', 'torch' or 'dense'")
    STATS.seconds += time.perf_counter() - t0
    return np.asarray(x)


def bipartition(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """MaskCut's bipartition of eigenvector ``x`` on an ``(h, w)`` grid: mean threshold, corner rule then
    seed rule, and the seed's 4-connected component. Invariant to the sign of ``x``."""
    h, w = grid
    v = np.asarray(x, dtype=np.float64).reshape(h, w)
    fg = v > v.mean()
    seed = np.unravel_index(int(np.argmax(np.abs(v))), v.shape)
    corners = int(fg[0, 0]) + int(fg[0, -1]) + int(fg[-1, 0]) + int(fg[-1, -1])
    flip = corners >= 3 or not fg[seed]
    if flip:
        v, fg = -v, ~fg
    seed = np.unravel_index(int(np.argmax(v)), v.shape)
    labels, _ = ndimage.label(fg)  # default structure: 4-connectivity
    if labels[seed] == 0:
        return np.zeros((h, w), bool)
    return labels == labels[seed]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def _resolve_tau(f: torch.Tensor, tau) -> float:
    if isinstance(tau, str):
        if tau != "median":
            raise ValueError(f"tau must be a number or 'median', got {tau!r}")
        fn = F.normalize(f.double(), dim=1)
        s = fn @ fn.T
        off = s[~torch.eye(len(s), dtype=torch.bool, device=s.device)]
        return float(off.median())
    return float(tau)


def maskcut_single(feats: torch.Tensor, n_masks: int = 3, tau=0.15, eps: float = 1e-5, solver: str = "lobpcg",
                   after_reject: str = "reference", min_area: float = 0.01, max_iou: float = 0.5) -> np.ndarray:
    """MaskCut on one grid ``[h, w, D]`` -> bool patch masks ``[n_masks, h, w]`` (empty where rejected)."""
    if feats.dim() != 3:
        raise ValueError(f"features must be [h, w, D], got {tuple(feats.shape)}")
    if after_reject not in ("reference", "stop"):
        raise ValueError(f"after_reject must be 'reference' or 'stop', got {after_reject!r}")
    h, w, d = feats.shape
    f = feats.reshape(h * w, d).detach()
    tau_v = _resolve_tau(f, tau)
    cos = cosine_matrix(f)  # zeroing a patch's features later == zeroing its row and column here
    masks = np.zeros((n_masks, h, w), bool)
    taken = np.zeros(h * w, bool)
    prev = None
    stopped = False
    for i in range(n_masks):
        if stopped:
            break
        if taken.any():
            t = torch.from_numpy(taken).to(cos.device)
            cos[t] = 0
            cos[:, t] = 0
        A = affinity(cos, tau_v, eps, is_cos=True)
        x = second_eigenvector(A, solver)
        m = bipartition(x, (h, w))
        if i > 0 and (_iou(m, prev) > max_iou or m.sum() <= min_area * h * w):
            m = np.zeros_like(m)
            stopped = after_reject == "stop"
        masks[i] = m
        taken |= m.reshape(-1)
        prev = m
    return masks


def maskcut(features: torch.Tensor, n_masks: int = 3, tau=0.15, eps: float = 1e-5, solver: str = "auto",
            after_reject: str = "reference", progress: bool = False) -> torch.Tensor:
    """MaskCut pseudo-masks on the patch grid.

    ``features``: ``[h, w, D]`` or ``[B, h, w, D]`` (DINO last-block keys in the reference). ``tau``: the
    affinity threshold (0.15 made the released pseudo-masks) or ``"median"`` (the median pairwise cosine
    of the image: for models whose similarities are all near 1, e.g. random init). ``solver``: ``auto`` =
    ``torch`` on CUDA, ``lobpcg`` on CPU. Returns bool ``[(B,) n_masks, h, w]``.
    """
    single = features.dim() == 3
    feats = features[None] if single else features
    if feats.dim() != 4:
        raise ValueError(f"features must be [h, w, D] or [B, h, w, D], got {tuple(features.shape)}")
    if solver == "auto":
        solver = "torch" if feats.is_cuda else "lobpcg"
    it = range(feats.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="maskcut", unit="img")
    out = torch.from_numpy(np.stack([maskcut_single(feats[b], n_masks, tau, eps, solver, after_reject) for b in it]))
    return out[0] if single else out


def auto_tau(model):
    """The threshold ``tau="auto"`` means for ``model`` (a :func:`nbsupport.backbones.load` result): the
    reference 0.15 for official DINO weights (a registered official name or an official ``.pth``), for which
    it was tuned; ``"median"`` for everything else. Random-init keys are often nearly parallel, and those of
    the tiny DINO trained here share a large common component (every pairwise cosine above 0.3, median
    0.999): with a fixed threshold their graph is complete and the cut follows position, not objects."""
    from . import backbones

    info = getattr(model, "nbs_info", {})
    name = str(info.get("name", ""))
    official = name in backbones.OFFICIAL or (info.get("pretrained") and name.endswith((".pth", ".pt")))
    return 0.15 if official else "median"


def resolve_tau(tau, model):
    """The threshold a ``tau`` parameter (CLI string or notebook value) means for ``model``: ``"auto"`` ->
    :func:`auto_tau`, ``"median"`` stays, anything else is a number (``float(tau)``)."""
    if tau == "auto":
        return auto_tau(model)
    return tau if tau == "median" else float(tau)


# --------------------------------------------------------------------------------------------------
# Pixel masks and COCO export


def crf_refine(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense-CRF refinement with the reference parameters (Gaussian sxy 3 compat 7; bilateral sxy 50,
    srgb 5, compat 10; 10 iterations) then hole filling. Needs the optional ``pydensecrf2`` package."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as e:
        raise ImportError("the CRF step needs the optional package pydensecrf2: "
                          "`pip install pydensecrf2` (or `pip install -e .[crf]`)") from e
    h, w = mask.shape
    m = torch.from_numpy(mask.astype(np.float32))
    prob = torch.stack([1 - m, m])  # [2, H, W] logits as the reference builds them
    prob = torch.softmax(prob, dim=0).numpy()
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))
    crf.addPairwiseGaussian(sxy=3, compat=7)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image.astype(np.uint8)), compat=10)
    q = np.array(crf.inference(10)).reshape(2, h, w)
    return ndimage.binary_fill_holes(q.argmax(0) == 1)


def pixel_masks(patch_masks, image_hw: tuple[int, int], input_hw: tuple[int, int] | None = None, image=None,
                crf: bool = False, crf_min_iou: float = 0.5) -> np.ndarray:
    """Patch masks ``[n, h, w]`` -> pixel masks ``[n, H, W]`` of the original image.

    Upsampled (nearest) to the model input ``input_hw`` (the reference's 480 x 480), optionally refined
    with a CRF on the resized ``image`` (dropped when IoU(coarse, CRF) < ``crf_min_iou``), resized to
    ``image_hw`` (threshold at half the maximum), and each mask loses the pixels of earlier masks.
    """
    pm = torch.as_tensor(np.asarray(patch_masks), dtype=torch.float32)
    if pm.dim() != 3:
        raise ValueError(f"patch masks must be [n, h, w], got {tuple(pm.shape)}")
    input_hw = input_hw or image_hw
    up = F.interpolate(pm[None], size=input_hw, mode="nearest")[0].numpy() > 0.5
    if crf:
        if image is None:
            raise ValueError("crf=True needs the image resized to input_hw")
        img = np.asarray(image)
        for k in range(len(up)):
            if up[k].any():
                refined = crf_refine(img, up[k])
                up[k] = refined if _iou(refined, up[k]) >= crf_min_iou else np.zeros_like(up[k])
    out = F.interpolate(torch.from_numpy(up.astype(np.float32))[None], size=image_hw, mode="bilinear",
                        align_corners=False)[0].numpy()
    masks = np.zeros(out.shape, bool)
    for k in range(len(out)):
        mx = out[k].max()
        masks[k] = out[k] >= mx / 2 if mx > 0 else False
    taken = np.zeros(image_hw, bool)
    for k in range(len(masks)):
        masks[k] &= ~taken
        taken |= masks[k]
    return masks


def coco_annotations(masks: np.ndarray, image_id: int, start_id: int = 1, category_id: int = 1) -> list[dict]:
    """COCO annotations of non-empty pixel masks ``[n, H, W]``: RLE with ASCII counts, bbox and area from the
    RLE, score 1.0 (MaskCut gives no score; the order is the pass order)."""
    from pycocotools import mask as mask_utils

    anns = []
    for m in masks:
        if not m.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"id": start_id + len(anns), "image_id": int(image_id), "category_id": category_id,
                     "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                     "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "iscrowd": 0, "score": 1.0})
    return anns


CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]


def coco_json(images: list[dict], annotations: list[dict]) -> dict:
    """A COCO instances dict with the single class-agnostic category ``fg``; annotation ids renumbered."""
    anns = [dict(a, id=k + 1) for k, a in enumerate(annotations)]
    return {"info": {"description": "MaskCut pseudo-masks (nbsupport)"}, "images": images,
            "annotations": anns, "categories": CATEGORIES}


# --------------------------------------------------------------------------------------------------
# Command line: python -m nbsupport maskcut / maskcut-merge


def _list_inputs(spec: str) -> list[tuple[str, Path]]:
    """``(key, path)`` of the images to process, in a fixed order: a folder, or a COCO JSON's images."""
    p = Path(spec)
    if p.is_dir():
        from .data import list_images

        return [(str(q.relative_to(p)), q) for q in list_images(p)]
    if p.suffix == ".json" and p.is_file():
        data = json.loads(p.read_text())
        root = p.parent / "images"
        return [(im["file_name"], root / im["file_name"]) for im in sorted(data["images"], key=lambda r: r["id"])]
    raise FileNotFoundError(f"--images {spec}: not a folder of images nor a COCO JSON file")


def _read_partial(path: Path, repair: bool = False) -> dict[str, dict]:
    """Records already written by an interrupted run. A line torn by a kill is ignored and, with
    ``repair``, removed from the file so that new records start on a clean line."""
    done, good = {}, []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["key"]] = rec
            good.append(line)
        if repair:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in good))
            os.replace(tmp, path)
    return done


def run_cli(args) -> int:
    from .backbones import load
    from .data import ImageLoadError, image_to_tensor, load_image
    from .features import extract

    items = _list_inputs(args.images)
    shard_i, shard_n = 0, 1
    if args.shard:
        try:
            shard_i, shard_n = (int(v) for v in args.shard.split("/"))
            assert 0 <= shard_i < shard_n
        except (ValueError, AssertionError):
            print(f"error: --shard must look like i/n with 0 <= i < n, got {args.shard!r}", file=sys.stderr)
            return 2
    # image ids come from the position in the full ordered list, so shards merge without collisions
    todo = [(k + 1, key, p) for k, (key, p) in enumerate(items) if k % shard_n == shard_i]
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial.jsonl")
    done = _read_partial(partial, repair=True)
    remaining = [t for t in todo if t[1] not in done]
    print(f"maskcut: {len(todo)} images in shard {shard_i}/{shard_n}, {len(todo) - len(remaining)} already done",
          flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load(args.backbone, device=device)
    patch = model.nbs_info["patch_size"]
    tau = resolve_tau(args.tau, model)
    fail_after = int(os.environ.get("NBSUPPORT_MASKCUT_FAIL_AFTER", "0"))  # test hook: simulate a crash
    from tqdm.auto import tqdm

    bar = tqdm(total=len(remaining), desc="maskcut", unit="img")
    written = 0
    with open(partial, "a") as fh:
        for s in range(0, len(remaining), args.batch_size):
            chunk = remaining[s:s + args.batch_size]
            tensors, ok, records = [], [], []
            for image_id, key, p in chunk:
                try:
                    im = load_image(p, min_size=patch)
                    tensors.append(image_to_tensor(im, args.size))
                    ok.append((image_id, key, p, im))
                except ImageLoadError as e:
                    records.append({"key": key, "image_id": image_id, "error": str(e)})
            if tensors:
                feats = extract(model, torch.stack(tensors).to(device), "key", -1)
                pm = maskcut(feats, args.n_masks, tau, solver="auto").cpu().numpy()
                for (image_id, key, p, im), m in zip(ok, pm):
                    resized = np.asarray(im.resize((args.size, args.size))) if args.crf else None
                    masks = pixel_masks(m, (im.height, im.width), (args.size, args.size), resized, crf=args.crf)
                    records.append({"key": key, "image_id": image_id,
                                    "image": {"id": image_id, "file_name": key, "height": im.height, "width": im.width},
                                    "annotations": coco_annotations(masks, image_id)})
            for rec in sorted(records, key=lambda r: r["image_id"]):
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                written += 1
                if fail_after and written >= fail_after:
                    raise SystemExit(f"simulated crash after {written} images")
            bar.update(len(chunk))
            bar.set_postfix(img_per_s=f"{bar.n / max(bar.format_dict['elapsed'], 1e-9):.2f}")
    bar.close()
    done = _read_partial(partial)
    recs = sorted((done[k] for _, k, _ in todo if k in done), key=lambda r: r["image_id"])
    failures = [{"file": r["key"], "error": r["error"]} for r in recs if "error" in r]
    result = coco_json([r["image"] for r in recs if "image" in r],
                       [a for r in recs if "image" in r for a in r["annotations"]])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    report = out.with_name(out.stem + ".report.json")
    report.write_text(json.dumps({"images": len(recs), "failed": failures, "shard": f"{shard_i}/{shard_n}"}, indent=1))
    partial.unlink()
    print(f"wrote {out}: {len(result['images'])} images, {len(result['annotations'])} masks; "
          f"{len(failures)} unreadable (see {report.name})")
    return 0


def merge(paths, out) -> dict:
    """Join shard outputs: images by id (no duplicates allowed), annotations renumbered."""
    images, anns, seen = [], [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        for im in d["images"]:
            if im["id"] in seen:
                raise ValueError(f"image id {im['id']} appears in more than one shard ({p})")
            seen.add(im["id"])
            images.append(im)
        anns.extend(d["annotations"])
    images.sort(key=lambda r: r["id"])
    anns.sort(key=lambda a: (a["image_id"], a["id"]))
    result = coco_json(images, anns)
    Path(out).write_text(json.dumps(result))
    return result


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("maskcut", help="MaskCut pseudo-masks for a folder or COCO JSON -> COCO JSON")
    p.add_argument("--images", required=True, help="folder of images or a COCO JSON (images/ beside it)")
    p.add_argument("--out", required=True, help="output COCO instances JSON")
    p.add_argument("--backbone", default="dino_vitb8", help="backbone name or checkpoint path (reference: dino_vitb8)")
    p.add_argument("--n-masks", type=int, default=3)
    p.add_argument("--tau", default="auto", help="affinity threshold, 'median', or 'auto' (auto_tau: 0.15 for "
                   "official DINO weights, as the reference; 'median' otherwise)")
    p.add_argument("--size", type=int, default=480, help="square input size (reference: 480)")
    p.add_argument("--crf", action="store_true", help="CRF refinement (needs pydensecrf2)")
    p.add_argument("--shard", help="i/n: process every n-th image starting at i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_cli)
    m = subparsers.add_parser("maskcut-merge", help="merge MaskCut shard outputs into one COCO JSON")
    m.add_argument("shards", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=lambda a: (merge(a.shards, a.out), 0)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nbsupport")
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)

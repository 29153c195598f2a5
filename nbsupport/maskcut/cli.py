"""``python -m nbsupport maskcut`` / ``maskcut-merge``: pseudo-masks for an image folder or COCO JSON,
resumable image by image, shardable across processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from nbsupport.core.io import atomic_write_json, read_jsonl, truncate_jsonl
from nbsupport.maskcut.coco import coco_annotations, coco_json, merge
from nbsupport.maskcut.cut import resolve_tau
from nbsupport.maskcut.pipeline import image_masks

# --------------------------------------------------------------------------------------------------
# Command line: python -m nbsupport maskcut / maskcut-merge


def _list_inputs(spec: str) -> list[tuple[str, Path]]:
    """``(key, path)`` of the images to process, in a fixed order: a folder, or a COCO JSON's images."""
    p = Path(spec)
    if p.is_dir():
        from nbsupport.data.images import list_images

        return [(str(q.relative_to(p)), q) for q in list_images(p)]
    if p.suffix == ".json" and p.is_file():
        data = json.loads(p.read_text())
        root = p.parent / "images"
        return [(im["file_name"], root / im["file_name"]) for im in sorted(data["images"], key=lambda r: r["id"])]
    raise FileNotFoundError(f"--images {spec}: not a folder of images nor a COCO JSON file")


def _read_partial(path: Path, repair: bool = False) -> dict[str, dict]:
    """Records already written by an interrupted run, by image key. A last line torn by a kill is ignored
    and, with ``repair``, removed from the file so that new records start on a clean line; a corrupt line
    in the middle is an error naming the file and line (:func:`nbsupport.core.io.read_jsonl`)."""
    done = {rec["key"]: rec for rec in read_jsonl(path)}
    if repair:
        truncate_jsonl(path, lambda rec: True)
    return done


def run_cli(args) -> int:
    from nbsupport.data.images import ImageLoadError, load_image
    from nbsupport.models.backbones import load

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
    print(
        f"maskcut: {len(todo)} images in shard {shard_i}/{shard_n}, {len(todo) - len(remaining)} already done",
        flush=True,
    )
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
            chunk = remaining[s : s + args.batch_size]
            ok, records = [], []
            for image_id, key, p in chunk:
                try:
                    ok.append((image_id, key, load_image(p, min_size=patch)))
                except ImageLoadError as e:
                    records.append({"key": key, "image_id": image_id, "error": str(e)})
            masks = image_masks(model, [im for _, _, im in ok], args.size, args.n_masks, tau, args.crf, device)
            for (image_id, key, im), m in zip(ok, masks):
                records.append(
                    {
                        "key": key,
                        "image_id": image_id,
                        "image": {"id": image_id, "file_name": key, "height": im.height, "width": im.width},
                        "annotations": coco_annotations(m, image_id),
                    }
                )
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
    result = coco_json(
        [r["image"] for r in recs if "image" in r], [a for r in recs if "image" in r for a in r["annotations"]]
    )
    atomic_write_json(out, result)
    report = out.with_name(out.stem + ".report.json")
    atomic_write_json(report, {"images": len(recs), "failed": failures, "shard": f"{shard_i}/{shard_n}"}, indent=1)
    partial.unlink()
    print(
        f"wrote {out}: {len(result['images'])} images, {len(result['annotations'])} masks; "
        f"{len(failures)} unreadable (see {report.name})"
    )
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("maskcut", help="MaskCut pseudo-masks for a folder or COCO JSON -> COCO JSON")
    p.add_argument("--images", required=True, help="folder of images or a COCO JSON (images/ beside it)")
    p.add_argument("--out", required=True, help="output COCO instances JSON")
    p.add_argument("--backbone", default="dino_vitb8", help="backbone name or checkpoint path (reference: dino_vitb8)")
    p.add_argument("--n-masks", type=int, default=3)
    p.add_argument(
        "--tau",
        default="auto",
        help="affinity threshold, 'median', or 'auto' (auto_tau: 0.15 for "
        "official DINO weights, as the reference; 'median' otherwise)",
    )
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

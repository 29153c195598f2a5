"""``python -m nbsupport maskcut`` / ``maskcut-merge``: pseudo-masks for an image folder or COCO JSON,
resumable image by image, shardable across processes (``--shard i/n``, or ``torchrun``: one shard per rank,
merged by rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch

from nbsupport.core.io import atomic_write_json, read_jsonl, truncate_jsonl
from nbsupport.maskcut.coco import coco_annotations, coco_json, merge
from nbsupport.maskcut.cut import resolve_tau
from nbsupport.maskcut.pipeline import image_masks

# how long a finished rank waits for the others (ranks resumed at different points can differ by hours)
RANK_WAIT = timedelta(days=3)

# --------------------------------------------------------------------------------------------------
# Inputs, partial records, failures


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


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _free_cuda(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _masks_or_errors(model, loaded, args, tau, device) -> list:
    """``(masks, None)`` or ``(None, error)`` per loaded image: the batch at once, and image by image when the
    batch fails (CUDA out of memory, a failing solve), so one bad image costs only itself."""
    try:
        masks = image_masks(model, [im for *_, im in loaded], args.size, args.n_masks, tau, args.crf, device)
        return [(m, None) for m in masks]
    except (RuntimeError, ValueError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        _free_cuda(device)
        if len(loaded) == 1:
            return [(None, e)]
        return [r for item in loaded for r in _masks_or_errors(model, [item], args, tau, device)]


def _chunk_records(model, chunk, args, patch, tau, device) -> list[dict]:
    """One record per image of ``chunk``: its COCO image and annotations, or the error that stopped it."""
    from nbsupport.data.images import ImageLoadError, load_image

    loaded, records = [], []
    for image_id, key, p in chunk:
        try:
            loaded.append((image_id, key, load_image(p, min_size=patch)))
        except (ImageLoadError, OSError) as e:
            records.append({"key": key, "image_id": image_id, "error": str(e)})
    for (image_id, key, im), (m, err) in zip(
        loaded, _masks_or_errors(model, loaded, args, tau, device) if loaded else []
    ):
        if err is not None:
            print(f"maskcut: {key}: {_error_text(err)} (recorded, going on)", file=sys.stderr, flush=True)
            records.append({"key": key, "image_id": image_id, "error": _error_text(err)})
            continue
        records.append(
            {
                "key": key,
                "image_id": image_id,
                "image": {"id": image_id, "file_name": key, "height": im.height, "width": im.width},
                "annotations": coco_annotations(m, image_id),
            }
        )
    return sorted(records, key=lambda r: r["image_id"])


# --------------------------------------------------------------------------------------------------
# One shard: compute what is missing, write the shard's COCO JSON and report


def _run_shard(args, items, shard_i: int, shard_n: int, out: Path, device, sync=None, keep_partial=False) -> dict:
    """Masks for every ``shard_n``-th image from ``shard_i``, resuming from ``<out>.partial.jsonl``; writes
    ``out`` and ``<out stem>.report.json`` and returns the report. ``sync``: a callable run by every rank
    around the model load (rank 0 loads, and downloads, first)."""
    from nbsupport.models.backbones import load

    # image ids come from the position in the full ordered list, so shards merge without collisions
    todo = [(k + 1, key, p) for k, (key, p) in enumerate(items) if k % shard_n == shard_i]
    partial = out.with_name(out.name + ".partial.jsonl")
    done = _read_partial(partial, repair=True)
    remaining = [t for t in todo if t[1] not in done]
    print(
        f"maskcut: {len(todo)} images in shard {shard_i}/{shard_n}, {len(todo) - len(remaining)} already done",
        flush=True,
    )
    if sync and shard_i != 0:
        sync()
    model = load(args.backbone, device=device) if remaining else None
    if sync and shard_i == 0:
        sync()
    fail_after = int(os.environ.get("NBSUPPORT_MASKCUT_FAIL_AFTER", "0"))  # test hook: simulate a crash
    written = 0
    if remaining:
        from tqdm.auto import tqdm

        patch = model.nbs_info["patch_size"]
        tau = resolve_tau(args.tau, model)
        bar = tqdm(total=len(remaining), desc=f"maskcut {shard_i}/{shard_n}", unit="img")
        with open(partial, "a") as fh:
            for s in range(0, len(remaining), args.batch_size):
                chunk = remaining[s : s + args.batch_size]
                for rec in _chunk_records(model, chunk, args, patch, tau, device):
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
    failures = [{"file": r["key"], "image_id": r["image_id"], "error": r["error"]} for r in recs if "error" in r]
    result = coco_json(
        [r["image"] for r in recs if "image" in r], [a for r in recs if "image" in r for a in r["annotations"]]
    )
    atomic_write_json(out, result)
    report = {
        "images": len(recs),
        "failed": failures,
        "shard": f"{shard_i}/{shard_n}",
        "resumed": len(todo) - len(remaining),
        "computed": written,
    }
    atomic_write_json(_report_path(out), report, indent=1)
    if not keep_partial:
        partial.unlink()
    print(
        f"wrote {out}: {len(result['images'])} images, {len(result['annotations'])} masks; "
        f"{len(failures)} failed (see {_report_path(out).name})",
        flush=True,
    )
    return report


def _report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def _rank_out(out: Path, rank: int, world: int) -> Path:
    """The shard output of one ``torchrun`` rank, beside ``out``."""
    return out.with_name(f"{out.stem}.rank{rank}of{world}{out.suffix}")


# --------------------------------------------------------------------------------------------------
# torchrun: every rank writes its shard, rank 0 merges once all are done


def _foreign_partials(out: Path, world: int) -> list[Path]:
    """Partial files of interrupted runs of the same ``out`` with one process or another world size."""
    pattern = re.compile(rf"{re.escape(out.stem)}\.rank\d+of(\d+){re.escape(out.suffix)}\.partial\.jsonl")
    matches = [(p, pattern.fullmatch(p.name)) for p in out.parent.glob(f"{out.stem}.rank*.partial.jsonl")]
    found = [p for p, m in matches if m and int(m.group(1)) != world]
    single = out.with_name(out.name + ".partial.jsonl")
    return sorted(found + ([single] if single.is_file() else []))


def _adopt(foreign: list[Path], shard_out: Path, items, rank: int, world: int) -> int:
    """Append to this rank's partial file the records of its images found in ``foreign`` partial files (ids
    are positions in the full list, the same for every world size); returns how many were added."""
    ids = {key: k + 1 for k, (key, _) in enumerate(items) if k % world == rank}
    own = shard_out.with_name(shard_out.name + ".partial.jsonl")
    have = _read_partial(own, repair=True)
    new = {}
    for f in foreign:
        for key, rec in _read_partial(f).items():
            if ids.get(key) == rec.get("image_id") and key not in have:
                new[key] = rec
    if new:
        with open(own, "a") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in sorted(new.values(), key=lambda r: r["image_id"]))
            fh.flush()
            os.fsync(fh.fileno())
    return len(new)


def _run_ranks(args, items, out: Path) -> int:
    """One shard per rank (the same ids and masks as ``--shard rank/world``), each resumable from its own
    partial file (and from those of an interrupted run with one process or another world size); after a
    barrier rank 0 merges the shards into ``out`` and one report, then the shard files are removed.
    Multi-node runs need ``--out`` on a filesystem all nodes share."""
    from nbsupport.core import distributed as dist

    ctx = dist.setup(args.device or "auto")
    group = torch.distributed.new_group(backend="gloo", timeout=RANK_WAIT)  # long waits, off the GPU

    def sync():
        torch.distributed.barrier(group=group)

    try:
        shard_out = _rank_out(out, ctx.rank, ctx.world)
        foreign = _foreign_partials(out, ctx.world)
        adopted = _adopt(foreign, shard_out, items, ctx.rank, ctx.world)
        if adopted:
            print(f"maskcut: rank {ctx.rank} reuses {adopted} records of {[f.name for f in foreign]}", flush=True)
        _run_shard(args, items, ctx.rank, ctx.world, shard_out, ctx.device, sync=sync, keep_partial=True)
        sync()  # every shard written
        if ctx.is_main:
            shards = [_rank_out(out, r, ctx.world) for r in range(ctx.world)]
            result = merge(shards, out)
            reports = [json.loads(_report_path(s).read_text()) for s in shards]
            failed = sorted((f for r in reports for f in r["failed"]), key=lambda f: f["image_id"])
            report = {
                "images": sum(r["images"] for r in reports),
                "failed": failed,
                "world": ctx.world,
                "resumed": sum(r["resumed"] for r in reports),
                "computed": sum(r["computed"] for r in reports),
                "ranks": reports,
            }
            atomic_write_json(_report_path(out), report, indent=1)
            print(
                f"merged {ctx.world} shards into {out}: {len(result['images'])} images, "
                f"{len(result['annotations'])} masks; {len(failed)} failed (see {_report_path(out).name})",
                flush=True,
            )
        sync()  # merged: the shard files are no longer needed
        if ctx.is_main:
            for f in foreign:
                f.unlink(missing_ok=True)
        shard_out.with_name(shard_out.name + ".partial.jsonl").unlink(missing_ok=True)
        shard_out.unlink(missing_ok=True)
        _report_path(shard_out).unlink(missing_ok=True)
    finally:
        dist.cleanup()
    return 0


def run_cli(args) -> int:
    items = _list_inputs(args.images)
    out = Path(args.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if args.shard:
            print("error: --shard cannot be combined with torchrun (each rank is a shard)", file=sys.stderr)
            return 2
        return _run_ranks(args, items, out)
    shard_i, shard_n = 0, 1
    if args.shard:
        try:
            shard_i, shard_n = (int(v) for v in args.shard.split("/"))
            assert 0 <= shard_i < shard_n
        except (ValueError, AssertionError):
            print(f"error: --shard must look like i/n with 0 <= i < n, got {args.shard!r}", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _run_shard(args, items, shard_i, shard_n, out, device)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "maskcut",
        help="MaskCut pseudo-masks for a folder or COCO JSON -> COCO JSON (torchrun: one shard per rank)",
    )
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
    p.add_argument("--shard", help="i/n: process every n-th image starting at i (not with torchrun)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: CUDA when available (torchrun: cuda:LOCAL_RANK)")
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

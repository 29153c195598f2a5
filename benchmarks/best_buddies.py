"""Relaxed best buddies on ViT-S/8-sized descriptors: chunked vs dense, time and peak memory.

Cases (random Gaussian descriptors, seeded):
- 14,000 x 384: ViT-S/8 keys at stride 4 on 480 px images (the issue's 8 GB target);
- 3,025 x 6,528: log-binned ViT-S/8 keys at stride 4 on 224 px (dino-vit-features' default).

Memory is the peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, Linux: KiB) of a
fresh subprocess per case, minus the peak of a subprocess that only builds the same descriptors:
``tracemalloc`` does not see torch's CPU allocations. Dense runs are skipped (with a message) when the
estimated need, two ``N x N`` float32 matrices plus their top-k scratch, exceeds half the available RAM.

    python benchmarks/best_buddies.py [--k 1 5] [--chunk 512 1024 2048] [--threads 2] [--cases 14000x384 3025x6528]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = ["14000x384", "3025x6528"]


def one(n: int, d: int, k: int, chunk: int | None, only_setup: bool, threads: int) -> dict:
    import resource

    import torch

    from nbsupport.analysis.correspondences import relaxed_best_buddies

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    out = {"n": n, "d": d, "k": k, "chunk": chunk}
    if not only_setup:
        t = time.perf_counter()
        pairs, _ = relaxed_best_buddies(a, b, k, chunk)
        out.update(seconds=time.perf_counter() - t, pairs=len(pairs))
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--chunk", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=CASES, help="N x D, e.g. 14000x384")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense runs")
    ap.add_argument("--_one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        n, d, k, chunk, setup = args._one
        chunk = None if chunk == "dense" else int(chunk)
        print(json.dumps(one(int(n), int(d), int(k), chunk, setup == "1", args.threads)))
        return

    def run(n, d, k, chunk, setup=False):
        cmd = [
            sys.executable,
            __file__,
            "--threads",
            str(args.threads),
            "--_one",
            str(n),
            str(d),
            str(k),
            str(chunk),
            "1" if setup else "0",
        ]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads; memory = peak RSS (getrusage ru_maxrss) minus a "
        f"setup-only process; available RAM {available_mb():.0f} MB"
    )
    print(f"{'N x D':>13} {'k':>3} {'mode':>11} {'time (s)':>9} {'peak extra MB':>14} {'pairs':>7}")
    for case in args.cases:
        n, d = (int(v) for v in case.lower().split("x"))
        base = run(n, d, 1, args.chunk[0], setup=True)["max_rss_mb"]
        for k in args.k:
            for mode in [*args.chunk, "dense"]:
                label = "dense" if mode == "dense" else f"chunk {mode}"
                if mode == "dense":
                    need = 2 * n * n * 4 / 2**20 * 1.5
                    if args.no_dense or need > available_mb() / 2:
                        why = "--no-dense" if args.no_dense else f"needs ~{need:.0f} MB > half the available RAM"
                        print(f"{n:>6} x {d:<5} {k:>3} {label:>11}   skipped ({why})")
                        continue
                r = run(n, d, k, mode)
                print(
                    f"{n:>6} x {d:<5} {k:>3} {label:>11} {r['seconds']:>9.2f} {r['max_rss_mb'] - base:>14.0f} "
                    f"{r['pairs']:>7}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

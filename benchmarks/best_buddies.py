"""Relaxed best buddies on ViT-S/8-sized descriptors: chunked vs dense, time and peak memory.

Cases: 14,000 x 384 (ViT-S/8 keys at stride 4 on 480 px) and 3,025 x 6,528 (log-binned keys at stride 4
on 224 px, the reference default). Each case runs in its own subprocess so the peak resident memory
(``ru_maxrss``) belongs to that case alone; the baseline RSS of a process that only built the
descriptors is subtracted.

    python benchmarks/best_buddies.py [--k 1 3] [--chunk 2048] [--skip-dense-above 20000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = [(14000, 384), (3025, 6528)]


def one(n: int, d: int, k: int, chunk: int | None, only_setup: bool) -> dict:
    import resource

    import torch

    from nbsupport.correspondences import relaxed_best_buddies

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    out = {"n": n, "d": d, "k": k, "chunk": chunk}
    if not only_setup:
        t = time.perf_counter()
        pairs, _ = relaxed_best_buddies(a, b, k, chunk)
        out.update(seconds=time.perf_counter() - t, pairs=len(pairs))
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--skip-dense-above", type=int, default=20000, help="skip dense when N exceeds this")
    ap.add_argument("--_one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        n, d, k, chunk, setup = args._one
        print(json.dumps(one(int(n), int(d), int(k), None if chunk == "dense" else int(chunk), setup == "1")))
        return

    def run(n, d, k, chunk, setup=False):
        cmd = [sys.executable, __file__, "--_one", str(n), str(d), str(k), str(chunk), "1" if setup else "0"]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    print(f"{'N x D':>14} {'k':>2} {'mode':>11} {'time (s)':>9} {'peak extra MB':>14} {'pairs':>7}")
    for n, d in CASES:
        base = run(n, d, 1, args.chunk, setup=True)["max_rss_mb"]
        for k in args.k:
            for mode in (args.chunk, "dense"):
                if mode == "dense" and n > args.skip_dense_above:
                    print(f"{n:>7} x {d:<5} {k:>2} {'dense':>11}   skipped (N > {args.skip_dense_above})")
                    continue
                r = run(n, d, k, mode)
                label = "dense" if mode == "dense" else f"chunk {mode}"
                print(f"{n:>7} x {d:<5} {k:>2} {label:>11} {r['seconds']:>9.2f} {r['max_rss_mb'] - base:>14.0f} {r['pairs']:>7}")


if __name__ == "__main__":
    main()

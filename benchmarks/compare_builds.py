#!/usr/bin/env python
"""Times ral-cpu from several source trees on the main job's problem: is a kernel change faster?

    git worktree add /tmp/base HEAD                  # the baseline, and each variant, built in place:
    (cd /tmp/base && RAL_SKIP_CUDA_BUILD=1 python setup.py build_ext --inplace)
    python benchmarks/compare_builds.py /tmp/base . --mode fwd --threads 1 2 --rounds 6

Every TREE is a checkout whose ``ral/_C`` is built in place; the first is the baseline (naming it
twice shows the spread of no change at all). For each
thread count and round, each tree runs in a fresh process (``PYTHONPATH=TREE``; the worker refuses a
tree whose ``ral`` it did not import) that times `--mode` of ral-cpu at S = `--seq` (B=1, H=Hkv=8,
D=64, jsd, heads="mean", causal, the main job's problem; ``--dtype``) with
``providers.time_interleaved``: one warm-up call, then the median of `--calls` calls. The trees
run in an order rotated each round, so that a drift of the machine lands on all of them; a VM's
round-to-round spread is often larger than the change, so each round's ratio to the baseline is
reported, with their median and how many rounds were below 1.

Prints a table per thread count and writes <out>/compare_builds.json (default benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import providers as P  # noqa: E402  (a worker imports ral from its tree: PYTHONPATH comes first)


def run_worker(job: dict) -> dict:
    """One tree's timing, in this process (whose PYTHONPATH names the tree)."""
    import torch
    import ral

    tree = os.path.realpath(job["tree"])
    if not os.path.realpath(ral.__file__).startswith(tree + os.sep):
        raise RuntimeError(f"imported ral from {ral.__file__}, not from {tree}: is ral/_C built there in place?")
    torch.set_num_threads(job["threads"])
    cfg = P.Config(dtype=job["dtype"])
    timed = P.time_interleaved(["ral-cpu"], job["mode"], job["seq"], cfg, repeats=job["calls"],
                               min_time=0.0, min_repeats=job["calls"])["ral-cpu"]
    if timed["status"] != "ok":
        raise RuntimeError(f"ral-cpu failed: {timed.get('note', timed['status'])}")
    return dict(time_s=timed["time_s"], times=timed["times"], threads=torch.get_num_threads())


def summarize(trees: list, rounds: list) -> list:
    """Per tree: the median of its round times, each round's ratio to the baseline (trees[0]), the
    median ratio and the rounds below 1. `rounds`: per round, each tree's seconds (None: failed)."""
    rows = []
    for i, tree in enumerate(trees):
        times = [r[i] for r in rounds if r[i] is not None]
        ratios = [r[i] / r[0] for r in rounds if r[i] is not None and r[0] is not None]
        rows.append(dict(tree=tree, median_s=statistics.median(times) if times else None, ratios=ratios,
                         median_ratio=statistics.median(ratios) if ratios else None,
                         below_1=sum(x < 1 for x in ratios)))
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", help="source trees with ral/_C built in place; the first is the baseline")
    ap.add_argument("--mode", choices=P.MODES, default="fwd")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per process (their median)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker and not args.trees:
        ap.error("name at least one source tree")
    if args.rounds < 1 or args.calls < 1 or args.seq < 1 or min(args.threads) < 1:
        ap.error("--rounds, --calls, --seq and --threads must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    from tqdm import tqdm
    trees = [os.path.realpath(t) for t in args.trees]
    for tree in trees:
        if not os.path.isdir(os.path.join(tree, "ral")):
            raise SystemExit(f"{tree} has no ral/ package: not a ral source tree")
    result = dict(mode=args.mode, seq=args.seq, dtype=args.dtype, calls=args.calls, trees=trees, threads={},
                  errors=[])
    bar = tqdm(total=len(args.threads) * args.rounds * len(trees), disable=args.no_progress, desc="processes")
    for threads in args.threads:
        rounds = []
        for i in range(args.rounds):
            got = [None] * len(trees)
            for k in range(len(trees)):  # rotated order
                j = (i + k) % len(trees)
                job = dict(tree=trees[j], threads=threads, mode=args.mode, seq=args.seq, dtype=args.dtype,
                           calls=args.calls)
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([trees[j], os.environ.get("PYTHONPATH", "")]))
                res = P.spawn_json_worker(__file__, job, args.timeout, env=env)
                if "error" in res:
                    result["errors"].append(dict(job, error=res["error"]))
                else:
                    got[j] = res["time_s"]
                bar.update()
            rounds.append(got)
        result["threads"][str(threads)] = dict(rounds=rounds, summary=summarize(trees, rounds))
    bar.close()

    for threads, data in result["threads"].items():
        print(f"\n{args.mode}, S = {args.seq}, {args.dtype}, {threads} thread(s), {args.rounds} rounds:")
        print(f"| tree | median | ratio to {os.path.basename(trees[0]) or trees[0]}, each round | median ratio | below 1 |")
        print("|---|---:|---|---:|---:|")
        for row in data["summary"]:
            med = "-" if row["median_s"] is None else f"{row['median_s'] * 1e3:.1f} ms"
            mr = "-" if row["median_ratio"] is None else f"{row['median_ratio']:.3f}"
            print(f"| {row['tree']} | {med} | {' '.join(f'{x:.3f}' for x in row['ratios'])} | {mr} | "
                  f"{row['below_1']}/{len(row['ratios'])} |")
    for err in result["errors"]:
        print(f"error: {err['tree']} ({err['threads']} threads): {err['error']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compare_builds.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

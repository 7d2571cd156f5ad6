"""vlkit search backends: build time, query latency and FAISS recall@10 against exact search.

    .venv/bin/python benchmarks/bench_search.py                      # 100k and 1M x 512-d, random + clustered
    .venv/bin/python benchmarks/bench_search.py --sizes 100000 --data random --out search.json

Embeddings are L2-normalised float32, 512-d: ``random`` (i.i.d. Gaussian directions: the worst case
for any approximate index, nothing is clustered) and ``clustered`` (points around 1,000 random
centres, closer to real image embeddings). Queries are other points of the same distribution.
Exact = :func:`vlkit.search.exact_search` (chunked matrix product + top-k, torch); FAISS =
:func:`vlkit.search.build_faiss` (IVF-Flat, inner product, nlist = sqrt(N)) at several nprobe.
Latency per query is reported for one query at a time (median of ``--single`` queries) and for a
batch of ``--batch`` queries (time / batch). Recall@10 = |FAISS top-10 ∩ exact top-10| / 10.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from vlkit.search import build_faiss, exact_search


def make_data(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return F.normalize(torch.randn(n, d, generator=g), dim=-1)
    centres = F.normalize(torch.randn(1000, d, generator=g), dim=-1)
    which = torch.randint(0, 1000, (n,), generator=g)
    return F.normalize(centres[which] + 0.04 * torch.randn(n, d, generator=g), dim=-1)  # ~0.9 cosine to centre


def latency(search, queries: torch.Tensor, single: int) -> tuple[float, float]:
    """(median ms for one query, ms per query in one batch)."""
    times = []
    for q in queries[:single]:
        t = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    search(queries)
    return 1e3 * statistics.median(times), 1e3 * (time.perf_counter() - t) / len(queries)


def bench(kind: str, n: int, args) -> list[dict]:
    db = make_data(kind, n + args.batch, args.dim, seed=n)
    db, queries = db[:n].contiguous(), db[n:].contiguous()
    _, truth = exact_search(db, queries, 10)
    rows = [{"data": kind, "n": n, "backend": "exact (torch)", "build_s": 0.0,
             **dict(zip(("single_ms", "batched_ms"), latency(lambda q: exact_search(db, q, 10), queries, args.single))),
             "recall@10": 1.0}]
    t = time.perf_counter()
    index = build_faiss(db)
    build = time.perf_counter() - t
    for nprobe in args.nprobe:
        index.nprobe = nprobe
        _, got = index.search(queries.numpy(), 10)
        recall = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), truth.tolist())) / truth.numel()
        single, batched = latency(lambda q: index.search(q.numpy(), 10), queries, args.single)
        rows.append({"data": kind, "n": n, "backend": f"FAISS IVF-Flat nlist={index.nlist} nprobe={nprobe}",
                     "build_s": build, "single_ms": single, "batched_ms": batched, "recall@10": recall})
    return rows  # db and the index (GBs at 1M) are freed here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--data", default="random,clustered")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--nprobe", default="8,32,128")
    p.add_argument("--batch", type=int, default=100, help="queries in the batched measurement (and for recall)")
    p.add_argument("--single", type=int, default=20, help="one-at-a-time queries timed")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    import faiss

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{args.dim}-d float32, {args.batch} queries\n")
    print("| data | N | backend | build s | 1 query ms | batched ms/query | recall@10 |\n|---|---|---|---|---|---|---|")
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for kind in args.data.split(","):
            for r in bench(kind, n, args):
                rows.append(r)
                print(f"| {r['data']} | {r['n']:,} | {r['backend']} | {r['build_s']:.1f} | {r['single_ms']:.2f} | "
                      f"{r['batched_ms']:.3f} | {r['recall@10']:.3f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

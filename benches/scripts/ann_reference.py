#!/usr/bin/env python3
"""hnswlib and faiss (IndexHNSWFlat) on the vectors ragway's ann-bench wrote, same run.

usage: ann_reference.py --base F --queries F --gt F --dim D [--M 16] [--ef-construction 200]
                        [--efs 16,32,64] [--build-threads 2]
Files are raw little-endian float32 (base, queries) and int64 (gt: k ids per query).
Cosine on normalized vectors = inner product. Search is single-threaded, one batch of all
queries per call; QPS is the median of --reps. Prints one JSON line.
"""
import argparse
import json
import statistics
import time

import numpy as np


def timed(fn, reps):
    ts, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def recall(found, gt):
    k = gt.shape[1]
    return float(np.mean([len(set(f[:k]) & set(g)) / k for f, g in zip(found, gt)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--efs", default="16,32,64,128,256")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    base = np.fromfile(args.base, dtype=np.float32).reshape(-1, args.dim)
    queries = np.fromfile(args.queries, dtype=np.float32).reshape(-1, args.dim)
    gt = np.fromfile(args.gt, dtype=np.int64).reshape(len(queries), -1)[:, : args.k]
    efs = [int(e) for e in args.efs.split(",")]
    out = {}
    import hnswlib

    idx = hnswlib.Index(space="ip", dim=args.dim)
    idx.init_index(max_elements=len(base), ef_construction=args.ef_construction, M=args.M, random_seed=0)
    t0 = time.perf_counter()
    idx.add_items(base, np.arange(len(base)), num_threads=args.build_threads)
    r = {"build_s": round(time.perf_counter() - t0, 3), "by_ef": []}
    idx.set_num_threads(1)
    for ef in efs:
        idx.set_ef(max(ef, args.k))
        t, (labels, _) = timed(lambda: idx.knn_query(queries, k=args.k, num_threads=1), args.reps)
        r["by_ef"].append({"ef": ef, "recall": round(recall(labels, gt), 4), "qps": round(len(queries) / t, 1)})
    out["hnswlib"] = r
    import faiss

    faiss.omp_set_num_threads(args.build_threads)
    fidx = faiss.IndexHNSWFlat(args.dim, args.M, faiss.METRIC_INNER_PRODUCT)
    fidx.hnsw.efConstruction = args.ef_construction
    t0 = time.perf_counter()
    fidx.add(base)
    r = {"build_s": round(time.perf_counter() - t0, 3), "by_ef": []}
    faiss.omp_set_num_threads(1)
    for ef in efs:
        fidx.hnsw.efSearch = max(ef, args.k)
        t, (_, labels) = timed(lambda: fidx.search(queries, args.k), args.reps)
        r["by_ef"].append({"ef": ef, "recall": round(recall(labels, gt), 4), "qps": round(len(queries) / t, 1)})
    out["faiss"] = r
    print(json.dumps(out))


if __name__ == "__main__":
    main()

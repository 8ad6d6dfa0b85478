#!/usr/bin/env python3
"""Recomputes nDCG@10 and recall@100 of ragway's TREC run files with pytrec_eval itself.

usage: pytrec_check.py QRELS.tsv RUNS_DIR   (prints one line per run file)
"""
import os
import sys

import pytrec_eval


def main():
    qrels_path, runs_dir = sys.argv[1], sys.argv[2]
    qrels = {}
    with open(qrels_path) as f:
        next(f)
        for line in f:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    for name in sorted(os.listdir(runs_dir)):
        run = {}
        with open(os.path.join(runs_dir, name)) as f:
            for line in f:
                q, _, d, _, s, _ = line.split()
                run.setdefault(q, {})[d] = float(s)
        scores = evaluator.evaluate(run)
        n = len(scores)
        ndcg = sum(v["ndcg_cut_10"] for v in scores.values()) / n
        rec = sum(v["recall_100"] for v in scores.values()) / n
        print(f"pytrec_eval {name:<50} nDCG@10 {ndcg:.4f}  recall@100 {rec:.4f}  ({n} queries)")


if __name__ == "__main__":
    main()

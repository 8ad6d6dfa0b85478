"""Writes pytrec_reference.json: a small qrels/run pair and what pytrec_eval computes for it.

Run once (with pytrec_eval installed) and commit the output; the Rust test compares ragway's
metrics against these values. Ties in scores and a query without results are included on
purpose.
"""
import json
import random

import pytrec_eval

random.seed(20261122)
docs = [f"d{i:02d}" for i in range(40)]
qrels, run = {}, {}
for q in range(12):
    qid = f"q{q}"
    judged = random.sample(docs, 8)
    qrels[qid] = {d: random.choice([0, 1, 1, 2, 3]) for d in judged}
    if q == 5:
        qrels[qid] = {d: 0 for d in judged}  # judged but nothing relevant
    if q == 7:
        continue  # judged, never retrieved
    ranked = random.sample(docs, 25)
    # Coarse scores make ties, which trec_eval breaks by document id, descending.
    run[qid] = {d: float(random.randint(0, 12)) / 4.0 for d in ranked}
ks = [1, 3, 5, 10, 100]
measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"map_cut.{','.join(map(str, ks))}",
            f"recall.{','.join(map(str, ks))}", f"P.{','.join(map(str, ks))}", "recip_rank"}
ev = pytrec_eval.RelevanceEvaluator(qrels, measures)
res = ev.evaluate(run)
out = {"qrels": qrels, "run": run, "pytrec_eval": res, "pytrec_eval_version": getattr(pytrec_eval, "__version__", "?")}
with open("pytrec_reference.json", "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
print(f"{len(res)} queries evaluated")

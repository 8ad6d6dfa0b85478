"""RAG quality on HaluEval QA against a running ragway (`RAGWAY_URL`, default
http://127.0.0.1:8080), Python standard library only.

1. Ingests the `knowledge` of every item of `dev.jsonl` as the corpus (collection
   `halueval`, one document per item, `halu-<i>`).
2. Asks the first `--n` (200) questions through `POST /v1/rag` with the default models and
   template; reports retrieval hit rate@5 (the item's own document among the five
   retrieved), exact match and token F1 against `right_answer` (the SQuAD v1.1 script's
   normalization and definitions, per question), the share of answers flagged ungrounded,
   and the share answered "don't know".
3. Calibration on items `--calibrate-from` (200) onward: the relevance cut (how many
   answerable questions it refuses vs how many questions whose document is missing it
   refuses) and the grounding threshold (right vs hallucinated answers graded with
   `answer`, balanced accuracy per threshold).

Usage: python3 benches/scripts/rag_halueval.py --data ../shared/data/halueval_qa/dev.jsonl
"""
import argparse
import collections
import json
import os
import re
import statistics
import string
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("RAGWAY_URL", "http://127.0.0.1:8080")


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --- SQuAD v1.1 evaluation script definitions -------------------------------------------
def normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def strip_citations(text):
    return re.sub(r"\s*\[\d+(?:\s*[,;-]\s*\d+)*\]", "", text).strip()


def progress(label, i, n, t0):
    rate = (i + 1) / max(time.time() - t0, 1e-9)
    sys.stderr.write(f"\r{label}: {i + 1}/{n} ({rate:.1f}/s, ETA {(n - i - 1) / rate:.0f} s)   ")
    if i + 1 == n:
        sys.stderr.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/halueval_qa/dev.jsonl")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--calibrate-from", type=int, default=200)
    ap.add_argument("--calibrate-n", type=int, default=400)
    ap.add_argument("--collection", default="halueval")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    items = [json.loads(l) for l in open(args.data)]

    st, _ = call("GET", f"/v1/collections/{args.collection}")
    if st == 404:
        st, b = call("POST", "/v1/collections", {"name": args.collection})
        assert st == 201, b
    for i in range(0, len(items), 200):
        docs = [{"id": f"halu-{j}", "text": it["knowledge"]} for j, it in enumerate(items[i : i + 200], start=i)]
        st, b = call("POST", f"/v1/collections/{args.collection}/documents", {"documents": docs})
        assert st == 200, b

    rows = []
    t0 = time.time()
    for i, it in enumerate(items[: args.n]):
        st, b = call("POST", "/v1/rag", {"collection": args.collection, "query": it["question"], "top_k": 5})
        assert st == 200, b
        passages = b["citations"] + b["uncited"]
        # Hit@5 on what retrieval returned (before the relevance cut): ask the search API.
        st, s = call("POST", f"/v1/collections/{args.collection}/search", {"query": it["question"], "top_k": 5})
        assert st == 200, s
        hit = any(h["document_id"] == f"halu-{i}" for h in s["results"])
        pred = strip_citations(b["answer"])
        rows.append({
            "i": i,
            "hit5": hit,
            "em": float(exact_match_score(pred, it["right_answer"])),
            "f1": f1_score(pred, it["right_answer"]),
            "flagged": b["grounding"]["flagged"],
            "dont_know": b["dont_know"] or b["grounding"]["abstained"],
            "score": b["grounding"]["score"],
            "cited_own": any(p["document_id"] == f"halu-{i}" for p in b["citations"]),
            "offered_own": any(p["document_id"] == f"halu-{i}" for p in passages),
            "answer": b["answer"],
            "gold": it["right_answer"],
            "latency_s": None,
        })
        progress("rag", i, args.n, t0)
    n = len(rows)
    mean = lambda k: sum(float(r[k]) for r in rows) / n
    report = {
        "items": n,
        "hit_rate_at_5": mean("hit5"),
        "exact_match": mean("em"),
        "token_f1": mean("f1"),
        "flagged_share": mean("flagged"),
        "dont_know_share": mean("dont_know"),
        "cited_own_document": mean("cited_own"),
        "seconds": time.time() - t0,
    }

    # Calibration: grounding of right vs hallucinated answers, graded with `answer`.
    cal = items[args.calibrate_from : args.calibrate_from + args.calibrate_n]
    right, wrong = [], []
    t0 = time.time()
    for k, it in enumerate(cal):
        for ans, bucket in ((it["right_answer"], right), (it["hallucinated_answer"], wrong)):
            st, b = call("POST", "/v1/rag", {"collection": args.collection, "query": it["question"], "answer": ans, "top_k": 5})
            assert st == 200, b
            if not b["dont_know"]:
                bucket.append(b["grounding"]["score"])
        progress("calibration", k, len(cal), t0)
    grid = []
    for t in [x / 20 for x in range(4, 19)]:
        tpr = sum(s < t for s in wrong) / max(len(wrong), 1)  # hallucinated flagged
        tnr = sum(s >= t for s in right) / max(len(right), 1)  # right not flagged
        grid.append({"threshold": t, "hallucinated_flagged": tpr, "right_passed": tnr, "balanced_accuracy": (tpr + tnr) / 2})
    best = max(grid, key=lambda g: g["balanced_accuracy"])
    report["calibration"] = {
        "items": len(cal),
        "right_median_score": statistics.median(right) if right else None,
        "hallucinated_median_score": statistics.median(wrong) if wrong else None,
        "best": best,
        "grid": grid,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "calibration"}, indent=2))
    print("calibration best:", json.dumps(best), "medians right/hallucinated:",
          report["calibration"]["right_median_score"], report["calibration"]["hallucinated_median_score"])
    for g in grid:
        print(f"  threshold {g['threshold']:.2f}: hallucinated flagged {g['hallucinated_flagged']:.3f}, right passed {g['right_passed']:.3f}, balanced {g['balanced_accuracy']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"report": report, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

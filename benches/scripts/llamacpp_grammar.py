#!/usr/bin/env python3
"""What llama.cpp's grammar sampling costs: decode tokens/s of one stream with and without a
JSON Schema (llama-cpp-python's `LlamaGrammar.from_json_schema`, the GBNF llama.cpp's server
builds for `response_format`), same GGUF, same threads, greedy, EOS forbidden so that both
runs decode `--gen-tokens` tokens. The prompt's own evaluation (timed with max_tokens=1) is
taken off each run. Prints one JSON line with medians over --runs after one warm-up."""
import argparse
import json
import statistics
import time

import llama_cpp
from llama_cpp import Llama, LlamaGrammar


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--schema", required=True, help="JSON Schema file")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False, seed=0)
    schema = open(args.schema).read()
    t0 = time.perf_counter()
    grammar = LlamaGrammar.from_json_schema(schema, verbose=False)
    build_s = time.perf_counter() - t0
    no_eos = {llm.token_eos(): -1e9}

    def timed(max_tokens, g):
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(args.prompt, max_tokens=max_tokens, temperature=0.0, grammar=g,
                                    logit_bias=no_eos)
        return time.perf_counter() - t, out["usage"]["completion_tokens"], out["choices"][0]["text"]

    rates = {"free": [], "schema": []}
    sample = ""
    for r in range(args.runs + 1):
        prefill, _, _ = timed(1, None)
        for name, g in (("free", None), ("schema", grammar)):
            secs, n, text = timed(args.gen_tokens, g)
            if r > 0:
                rates[name].append((n - 1) / max(secs - prefill, 1e-9))
            if name == "schema":
                sample = text
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["schema"])
    print(json.dumps({
        "bench": "llamacpp_grammar", "threads": args.threads, "gen_tokens": args.gen_tokens,
        "free_tok_s_median": round(free, 2), "schema_tok_s_median": round(constrained, 2),
        "schema_cost": round(1 - constrained / free, 4), "grammar_build_s": round(build_s, 4),
        "sample": sample[:200], "llama_cpp_python": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()

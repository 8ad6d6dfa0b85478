#!/usr/bin/env python3
"""llama.cpp's outputs on a GGUF file, in the format of the engine's fixtures
(engine/tests/data/gemma3_270m.json): per prompt the prompt ids, 32 greedy ids (argmax of
llama.cpp's logits, one token at a time, EOS not stopping), each step's top-1/top-2 margin,
the top 5 at the first generated position, and all first-position logits as float32 .npy.

Same method as ../shared/fixtures: llama-cpp-python (scripts/setup-reference.sh
--with-llamacpp), 2 threads, n_ctx 2048, tokenize(add_bos=True, special=True).

    llamacpp_fixture.py --model FILE --prompts-from engine/tests/data/gemma3_270m.json \
        --names capital,primes,long --out engine/tests/data/gemma3_q5.json \
        --logits-dir engine/tests/data/gemma3_q5_logits
"""
import argparse
import hashlib
import json
import os

import numpy as np
import llama_cpp
from llama_cpp import Llama

STEPS = 32


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def last_logits(llm):
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32).copy()


def run_prompt(llm, name, text, logits_dir):
    prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(prompt_ids)
    logits = last_logits(llm)
    np.save(os.path.join(logits_dir, f"{name}.npy"), logits)
    order = np.argsort(-logits)[:5]
    top5 = [{"id": int(i), "logit": float(logits[i]), "piece": llm.detokenize([int(i)]).decode("utf-8", "replace")}
            for i in order]
    generated, steps = [], []
    for _ in range(STEPS):
        first, second = np.partition(-logits, 1)[:2]
        t = int(np.argmax(logits))
        steps.append({"id": t, "margin": float(second - first)})
        generated.append(t)
        llm.eval([t])
        logits = last_logits(llm)
    return {
        "name": name,
        "prompt": text,
        "prompt_ids": prompt_ids,
        "generated_ids": generated,
        "text": llm.detokenize(generated).decode("utf-8", "replace"),
        "steps": steps,
        "min_margin": min(s["margin"] for s in steps),
        "first_logits_npy": f"{os.path.basename(logits_dir)}/{name}.npy",
        "top5_first_position": top5,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts-from", required=True, help="a fixture whose prompts (name, prompt) to reuse")
    ap.add_argument("--names", required=True, help="comma-separated prompt names")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logits-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    source = json.load(open(args.prompts_from))
    wanted = args.names.split(",")
    prompts = [p for p in source["prompts"] if p["name"] in wanted]
    assert len(prompts) == len(wanted), f"prompts found: {[p['name'] for p in prompts]}"
    os.makedirs(args.logits_dir, exist_ok=True)
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False)
    out = {
        "model": os.path.basename(args.model),
        "sha256": sha256(args.model),
        "method": f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, n_ctx 2048, greedy argmax "
                  f"one token at a time, {STEPS} steps, tokenize(add_bos=True, special=True)",
        "system_info": llama_cpp.llama_print_system_info().decode(),
        "n_vocab": llm.n_vocab(),
        "prompts": [run_prompt(llm, p["name"], p["prompt"], args.logits_dir) for p in prompts],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for p in out["prompts"]:
        print(p["name"], len(p["prompt_ids"]), "prompt tokens; min margin", round(p["min_margin"], 3), repr(p["text"][:60]))


if __name__ == "__main__":
    main()

"""The GPU reference for gpu-bench: PyTorch + transformers running the same GGUF decoder in
bf16 (transformers dequantizes GGUF weights through the `gguf` package), and
sentence-transformers encoding with all-MiniLM-L6-v2, on the same GPU. Prints one JSON line.

    python3 gpu_reference.py --gguf models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --minilm models/all-MiniLM-L6-v2 [--concurrency 1,8,32,128] [--prefill 512,4096]

Decode is timed as users run it: `generate` with greedy decoding and a fixed number of new
tokens; decode tokens/s = new tokens after the first / (total time - time to first token).
"""

import argparse
import json
import os
import statistics
import time

import torch

TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines were "
    "programmed by rewiring panels; later, stored programs allowed instructions to live in memory beside data. "
)


def prompt_ids(tok, n, salt):
    text = f"Document {salt}. "
    while True:
        ids = tok(text, return_tensors="pt").input_ids[0]
        if len(ids) >= n:
            return ids[:n]
        text += TEXT


def timed_generate(model, ids, new_tokens):
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - t


def decoder(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16).cuda().eval()
    load_s = time.perf_counter() - t
    out = {"load_s": load_s, "prefill": [], "aggregate": []}
    single = None
    for n in [int(x) for x in args.prefill.split(",")]:
        ttft, dec = [], []
        for r in range(args.runs + 1):
            ids = prompt_ids(tok, n, r).unsqueeze(0).cuda()
            first = timed_generate(model, ids, 1)
            total = timed_generate(model, ids, args.gen_tokens + 1)
            if r == 0:
                continue
            ttft.append(first)
            dec.append(args.gen_tokens / max(total - first, 1e-9))
        row = {
            "prompt_tokens": n,
            "ttft_s_median": statistics.median(ttft),
            "prefill_tok_s": n / statistics.median(ttft),
            "decode_tok_s_median": statistics.median(dec),
        }
        out["prefill"].append(row)
        if single is None:
            single = row["decode_tok_s_median"]
    out["single_stream_decode_tok_s"] = single
    for c in [int(x) for x in args.concurrency.split(",")]:
        agg = []
        for r in range(args.runs):
            ids = torch.stack([prompt_ids(tok, 32, 1000 + r * 1000 + i) for i in range(c)]).cuda()
            first = timed_generate(model, ids, 1)
            total = timed_generate(model, ids, args.gen_tokens)
            agg.append(c * (args.gen_tokens - 1) / max(total - first, 1e-9))
        out["aggregate"].append({"streams": c, "decode_tok_s_median": statistics.median(agg), "all": agg})
    return out


def embedder(args):
    passages = [f"Passage {i}. " + TEXT * (1 + i % 4) for i in range(args.passages)]
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(args.minilm, device="cuda")
        encode = lambda: model.encode(passages, batch_size=64, normalize_embeddings=True)  # noqa: E731
        impl = "sentence-transformers"
    except Exception as e:  # the same computation when the package cannot be imported here
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.minilm)
        model = AutoModel.from_pretrained(args.minilm).cuda().eval()

        def encode():
            with torch.no_grad():
                for i in range(0, len(passages), 64):
                    b = tok(passages[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt").to("cuda")
                    h = model(**b).last_hidden_state
                    m = b.attention_mask.unsqueeze(-1).to(h.dtype)
                    torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu()

        impl = f"transformers mean pooling (sentence-transformers: {e})"
    encode()
    secs = []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        encode()
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    return {"implementation": impl, "passages": len(passages), "passages_per_s": len(passages) / statistics.median(secs)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--minilm", required=True)
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--prefill", default="512,4096")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--passages", type=int, default=2048)
    args = p.parse_args()
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    out["decoder"] = decoder(args)
    out["embedder"] = embedder(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

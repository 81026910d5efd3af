#!/usr/bin/env python3
"""PyTorch eager on the CPU, the peer of `kiln bench --output json`.

Prints one JSON object with the same keys kiln's bench prints, for the same
workloads: a causal LM's prefill of B x T tokens (last-position logits only,
`logits_to_keep=1`) and greedy decode of N tokens with the cache after it; an
encoder's forward of B x T (sequences/s). Medians over --reps after one
warm-up; 2 intra-op threads unless --threads says otherwise. For a causal LM,
"first_tokens" is row 0's first 8 greedy tokens (the prefill's argmax, then
each decode step's), to check tokens against the other runtimes.

  python3 benches/peer_torch.py target/bench-models/llama_768 --prompt-len 128 --decode 64
"""

import argparse
import json
import resource
import statistics
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    cfg = transformers.AutoConfig.from_pretrained(a.model)
    causal = cfg.model_type in ("llama", "gpt2")
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(a.model, attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - started
    vocab = cfg.vocab_size
    ids = torch.tensor([[(i * 7 + r * 13 + 3) % vocab for i in range(a.prompt_len)] for r in range(a.batch)])
    out = {"backend": "torch", "threads": a.threads, "compile_s": load_s}
    with torch.inference_mode():
        if not causal:
            times = []
            for rep in range(a.reps + 1):
                t = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                if rep:
                    times.append(time.perf_counter() - t)
            out["forward_seq_s"] = a.batch / statistics.median(times)
        else:
            pre, dec = [], []
            for rep in range(a.reps + 1):
                t = time.perf_counter()
                r = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                p = time.perf_counter() - t
                cache, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
                toks = [nxt]
                t = time.perf_counter()
                for _ in range(a.decode):
                    r = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
                    toks.append(nxt)
                d = time.perf_counter() - t
                if rep:
                    pre.append(p)
                    dec.append(d)
            out["prefill_tok_s"] = a.batch * a.prompt_len / statistics.median(pre)
            if a.decode:
                out["decode_tok_s"] = a.batch * a.decode / statistics.median(dec)
            out["first_tokens"] = [int(x[0, 0]) for x in toks[:8]]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()

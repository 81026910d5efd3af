#!/usr/bin/env python3
"""The CUDA benchmarks of issue 11, on the GPU machine, interleaved:

  models: llama_768 (LLaMA-shaped, 124.7M, f32; benches/make_models.py) and
          gpt2_small (GPT-2-small-shaped: 12 layers, d 768, 12 heads, vocab 50257)
  work:   prefill of B=8 x T=512 (last-position logits) and greedy decode of
          128 tokens at B=1 after a 16-token prompt, with the KV cache
  peers:  kiln --backend cuda, PyTorch eager (sdpa), and
          torch.compile(mode="reduce-overhead") (CUDA graphs, static cache)

Decode is also reported as a fraction of the bandwidth bound: weight bytes
per token / 4.8 TB/s (the H200's HBM3e). Writes results.json and the
RESULTS.md rows to --out."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BW = 4.8e12


def make_models(root):
    import torch
    import transformers

    os.makedirs(root, exist_ok=True)
    subprocess.run([sys.executable, os.path.join(HERE, "..", "make_models.py"), "--out", root, "--only", "llama_768"], check=True)
    g = os.path.join(root, "gpt2_small")
    if not os.path.exists(os.path.join(g, "model.safetensors")):
        cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        torch.manual_seed(2026)
        transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(g, safe_serialization=True)
    return {"llama_768": os.path.join(root, "llama_768"), "gpt2_small": g}


def kiln_bench(kiln, model, batch, prompt, decode, reps, graphs=True):
    cmd = [kiln, "bench", model, "--backend", "cuda", "--batch", str(batch), "--prompt-len", str(prompt),
           "--decode", str(decode), "--reps", str(reps), "--output", "json"]
    env = dict(os.environ, KILN_CUDA_GRAPHS="1" if graphs else "0")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-800:]}
    return json.loads(p.stdout)


def torch_bench(model_dir, batch, prompt, decode, reps, compiled):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").cuda().eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7 + r * 13 + 3) % vocab for i in range(prompt)] for r in range(batch)], device="cuda")
    out = {}
    with torch.inference_mode():
        if decode == 0:
            fwd = torch.compile(model.forward, mode="reduce-overhead") if compiled else model.forward
            times = []
            for rep in range(reps + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                fwd(input_ids=ids, logits_to_keep=1)
                torch.cuda.synchronize()
                if rep >= 2:
                    times.append(time.perf_counter() - t)
            out["prefill_tok_s"] = batch * prompt / statistics.median(times)
        else:
            kw = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False, pad_token_id=0)
            if compiled:
                kw.update(cache_implementation="static", compile_config=transformers.CompileConfig(mode="reduce-overhead"))
            times = []
            for rep in range(reps + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                g = model.generate(ids, **kw)
                torch.cuda.synchronize()
                total = time.perf_counter() - t
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(ids, **dict(kw, max_new_tokens=1, min_new_tokens=1))
                torch.cuda.synchronize()
                first = time.perf_counter() - t
                if rep >= 2:
                    times.append(max(total - first, 1e-9))
            out["decode_tok_s"] = batch * (decode - 1) / statistics.median(times)
            out["first_tokens"] = g[0, prompt:prompt + 8].tolist()
    return out


def weight_bytes(model_dir):
    from safetensors import safe_open

    n = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            shape = t.get_shape()
            size = 1
            for s in shape:
                size *= s
            n += size * 4
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    models = make_models(a.models)
    rows = []
    for name, path in models.items():
        for work, (b, t, n) in {"prefill 8x512": (8, 512, 0), "decode 128 @B=1": (1, 16, 128)}.items():
            r = {"model": name, "work": work}
            peers = ("kiln", "kiln no graphs", "torch", "torch.compile") if n else ("kiln", "torch", "torch.compile")
            for peer in peers:
                try:
                    if peer.startswith("kiln"):
                        res = kiln_bench(a.kiln, path, b, t, n, a.reps, graphs=peer == "kiln")
                    else:
                        res = torch_bench(path, b, t, n, a.reps, peer == "torch.compile")
                except Exception as e:
                    res = {"error": str(e)[-800:]}
                r[peer] = res
                print(name, work, peer, json.dumps(res), flush=True)
            if n:
                r["bound_tok_s"] = BW / weight_bytes(path)
            rows.append(r)
    json.dump(rows, open(os.path.join(a.out, "results.json"), "w"), indent=1)
    key = lambda w: "decode_tok_s" if "decode" in w else "prefill_tok_s"
    lines = ["| model | work | kiln | kiln, no graphs | torch eager | torch.compile | kiln / compile | kiln / bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = key(r["work"])
        v = [r.get(p, {}).get(k) for p in ("kiln", "torch", "torch.compile", "kiln no graphs")]
        ratio = v[0] / v[2] if v[0] and v[2] else None
        bound = v[0] / r["bound_tok_s"] if v[0] and r.get("bound_tok_s") else None
        f = lambda x: "-" if x is None else f"{x:,.0f}"
        lines.append(f"| {r['model']} | {r['work']} | {f(v[0])} | {f(v[3])} | {f(v[1])} | {f(v[2])} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {'-' if bound is None else f'{bound:.0%}'} |")
    open(os.path.join(a.out, "RESULTS.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

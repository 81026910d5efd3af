#!/usr/bin/env python3
"""llama.cpp on the CPU (through llama-cpp-python), a peer of `kiln bench --output json`.

Causal LMs only. Mirrors benches/peer_torch.py: the same command line, the
same token ids, the same workload and JSON keys, with "backend": "llama.cpp".
The prefill evaluates the B x T prompt tokens in one llama_decode (n_batch =
n_ubatch >= T, logits of the last position only: logits_all=False); the decode
then evaluates N greedy tokens one at a time against the KV cache, each the
argmax of the previous step's logits. Medians over --reps after one warm-up
(the KV cache is cleared before each repetition). n_threads = n_threads_batch
= --threads (default 2). Flash attention is on (--flash-attn off turns it
off): llama.cpp's own default (LLAMA_FLASH_ATTN_TYPE_AUTO, as llama-cli and
llama-bench use it) turns it on for the CPU backend, while llama-cpp-python
would pass "disabled"; on the 2-core bench machine it made the T=128 prefill
about 1.4x and decode about 1.1x faster, with the same tokens. "first_tokens"
is the first 8 greedy tokens (the prefill's argmax, then each decode step's),
to check against the other runtimes; compile_s is the model + context load
time (the GGUF is mmapped, so its pages are read in during the warm-up).

The model is the f32 GGUF that benches/setup_peers.sh converts from the HF
folder, by default `<folder's parent>/gguf/<folder name>-f32.gguf`
(target/bench-models/gguf/llama_768-f32.gguf for target/bench-models/llama_768);
--gguf names another. The bench folders have no tokenizer, so that GGUF has
none either ("no_vocab", see benches/gguf_convert.py) and token ids are fed
directly. Only --batch 1 is supported (llama-cpp-python's Llama evaluates
one sequence).

Needs llama-cpp-python built from source (benches/setup_peers.sh):

  V/bin/python benches/peer_llamacpp.py target/bench-models/llama_768 --prompt-len 128 --decode 64
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

FIRST_TOKENS = 8


def default_gguf(model):
    model = os.path.normpath(os.path.abspath(model))
    return os.path.join(os.path.dirname(model), "gguf", os.path.basename(model) + "-f32.gguf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="the HF model folder (its config.json gives the vocabulary size)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", help="the GGUF file (default: <parent>/gguf/<name>-f32.gguf)")
    ap.add_argument("--flash-attn", choices=["on", "off"], default="on",
                    help="llama.cpp's flash attention (default on: llama.cpp's own default, auto, turns it"
                         " on for the CPU; llama-cpp-python's default is off)")
    a = ap.parse_args()
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") not in ("llama",):
        raise SystemExit(f"peer_llamacpp: causal LLaMA models only (got model_type {cfg.get('model_type')!r})")
    if a.batch != 1:
        raise SystemExit("peer_llamacpp: only --batch 1 is supported")
    path = a.gguf or default_gguf(a.model)
    if not os.path.exists(path):
        raise SystemExit(f"peer_llamacpp: {path} is missing; make it with benches/setup_peers.sh gguf")

    import llama_cpp

    vocab = cfg["vocab_size"]
    ids = [(i * 7 + 0 * 13 + 3) % vocab for i in range(a.prompt_len)]  # row 0 of peer_torch.py's ids
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=a.prompt_len + a.decode + 1,
        n_batch=max(a.prompt_len, 1),
        n_ubatch=max(a.prompt_len, 1),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        logits_all=False,
        flash_attn=a.flash_attn == "on",
        verbose=False,
    )
    load_s = time.perf_counter() - started
    if llm.n_vocab() != vocab:
        raise SystemExit(f"peer_llamacpp: the GGUF has {llm.n_vocab()} tokens, config.json {vocab}")
    ctx = llm.ctx

    def last_argmax():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    out = {"backend": "llama.cpp", "threads": a.threads, "compile_s": load_s,
           "note": f"llama-cpp-python {llama_cpp.__version__}, f32 GGUF {os.path.basename(path)}, "
                   f"flash_attn={a.flash_attn}"}
    pre, dec = [], []
    for rep in range(a.reps + 1):
        llm.reset()  # n_tokens = 0: the next eval overwrites the KV cache from position 0
        t = time.perf_counter()
        llm.eval(ids)
        p = time.perf_counter() - t
        nxt = last_argmax()
        toks = [nxt]
        t = time.perf_counter()
        for _ in range(a.decode):
            llm.eval([nxt])
            nxt = last_argmax()
            toks.append(nxt)
        d = time.perf_counter() - t
        if rep:
            pre.append(p)
            dec.append(d)
    out["prefill_tok_s"] = a.batch * a.prompt_len / statistics.median(pre)
    if a.decode:
        out["decode_tok_s"] = a.batch * a.decode / statistics.median(dec)
    out["first_tokens"] = toks[:FIRST_TOKENS]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.flush()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

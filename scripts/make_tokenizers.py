"""Writes a tiny WordPiece tokenizer (101 tokens, the vocabulary size of the
test models) into tests/data/hf/{gpt2,llama,bert,bert_mlm} and records what
transformers does with it: `tokenizer(text)` ids, greedy generation from a
text prompt (`model.generate`, do_sample=False) and `tokenizer.decode(new_ids)`.

The Rust side (`kiln run|generate --prompt`) must reproduce
tests/data/hf/<name>/tokenizer_reference.json exactly.

Run from the repository root with a Python that has torch, transformers and
tokenizers (versions are written into the reference):

    /work/venv-bench/bin/python scripts/make_tokenizers.py
"""

import json
import platform
from pathlib import Path

import torch

HF_DIR = Path("tests/data/hf")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
WORDS = [
    "the", "of", "and", "is", "paris", "capital", "france", "cat", "sat", "on", "mat",
    "a", "dog", "runs", "fast", "hello", "world", "kiln", "compiles", "models",
]
PUNCT = [".", ",", "!", "?", "'", "-"]


def vocab():
    v = SPECIAL + LETTERS + ["##" + c for c in LETTERS] + [str(d) for d in range(10)] + PUNCT
    for w in WORDS:
        if w not in v:
            v.append(w)
    assert len(v) <= 101, len(v)
    n = 0
    while len(v) < 101:
        v.append(f"##{n}x")
        n += 1
    return {t: i for i, t in enumerate(v)}


def build(with_template):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(vocab(), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if with_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    return tok


PROMPTS = ["Hello world, kiln compiles models!", "The cat sat on the mat."]
# A batch of prompts of unequal lengths (7, 4 and 10 tokens).
RAGGED = ["Hello world, kiln compiles models!", "The cat?", "Paris is the capital of France, a dog runs."]

# A chat template in the style of the hub's (a loop over messages, a Python
# string method, the generation prompt), over this vocabulary: [CLS] opens
# the chat, [SEP] ends each turn (the end-of-turn token generation stops at).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'].strip() }} "
    "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}a : {% endif %}"
)
CHATS = [
    [{"role": "user", "content": "  Hello world!  "}],
    [{"role": "system", "content": "Kiln compiles models."}, {"role": "user", "content": "The cat?"}],
]
NEW_TOKENS = 8


def main():
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

    torch.manual_seed(0)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    for name, encoder in [("gpt2", False), ("llama", False), ("bert", True), ("bert_mlm", True)]:
        d = HF_DIR / name
        extra = {} if encoder else {"bos_token": "[CLS]", "eos_token": "[SEP]"}
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build(encoder),
            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", clean_up_tokenization_spaces=True, **extra,
        )
        if not encoder:
            fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        rec = {"versions": versions, "prompts": PROMPTS, "encode": [tok(p)["input_ids"] for p in PROMPTS]}
        if not encoder:
            model = AutoModelForCausalLM.from_pretrained(d).eval()
            rows = []
            for p in PROMPTS:
                ids = torch.tensor([tok(p)["input_ids"]])
                with torch.no_grad():
                    out = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                        do_sample=False, eos_token_id=None, pad_token_id=0,
                    )
                new = out[0, ids.shape[1]:].tolist()
                rows.append({"new_ids": new, "text": tok.decode(new)})
            rec["generate"] = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "rows": rows}
            # Prompts of unequal lengths in one batch, left-padded as
            # transformers pads a decoder's batch for generation.
            tok.padding_side = "left"
            batch = tok(RAGGED, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                    pad_token_id=tok.pad_token_id,
                )
            width = batch["input_ids"].shape[1]
            rec["generate_ragged"] = {
                "prompts": RAGGED,
                "max_new_tokens": NEW_TOKENS,
                "ignore_eos": True,
                "rows": [{"new_ids": r[width:], "text": tok.decode(r[width:])} for r in out.tolist()],
            }
            tok.padding_side = "right"
            # A chat stops at the model's end-of-sequence ids and the
            # template's end of turn (the tokenizer's eos_token).
            eos = model.generation_config.eos_token_id
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            stops = sorted(set(eos) | {tok.eos_token_id})
            chats = []
            for messages in CHATS:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                t = torch.tensor([list(ids)])
                with torch.no_grad():
                    out = model.generate(
                        t, attention_mask=torch.ones_like(t), max_new_tokens=16, do_sample=False,
                        eos_token_id=stops, pad_token_id=0,
                    )
                new = out[0, t.shape[1]:].tolist()
                chats.append({"messages": messages, "text": text, "ids": list(ids), "new_ids": new,
                              "new_text": tok.decode(new)})
            rec["chat"] = {"max_new_tokens": 16, "stops_at": stops, "cases": chats}
        if name == "bert_mlm":
            from transformers import pipeline

            fill = pipeline("fill-mask", model=str(d), tokenizer=str(d), top_k=5)
            rec["fill_mask"] = [
                {"prompt": p, "top_k": 5, "result": fill(p)}
                for p in ["Paris is the [MASK] of France.", "The cat sat on the [MASK]."]
            ]
        # Decoding edge cases: specials kept (transformers' default), punctuation cleanup.
        samples = [[2, 20, 33, 70, 3], [74, 73, 72, 21, 71, 22], list(range(0, 101, 7))]
        rec["decode"] = [{"ids": s, "text": tok.decode(s)} for s in samples]
        (d / "tokenizer_reference.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(name, rec["encode"], rec.get("generate", {}).get("rows"))


if __name__ == "__main__":
    main()

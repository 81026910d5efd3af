#!/usr/bin/env python3
"""Runs llama.cpp's convert_hf_to_gguf.py on a LLaMA folder that has no tokenizer.

The benchmark folders of benches/make_models.py hold config.json and
model.safetensors only. The converter's LLaMA vocabulary step tries
tokenizer.model (SentencePiece), then the HF tokenizer files, and fails when
there are none. This wrapper runs the converter unchanged except for that
step: when the folder has no tokenizer file, it writes
`tokenizer.ggml.model = "no_vocab"` (gguf-py's NoVocab), with the vocabulary
size already in `llama.vocab_size`. llama.cpp loads such a GGUF with
LLAMA_VOCAB_TYPE_NONE and that many dummy tokens, and the model runs on token
ids (llama_cpp.Llama.eval takes ids); only text tokenization is unavailable.
Folders with a tokenizer are converted exactly as upstream does.

LLAMA_CPP_SRC names the llama.cpp source folder (the sdist of llama-cpp-python
vendors it as vendor/llama.cpp/, with gguf-py/ inside); the other arguments
are convert_hf_to_gguf.py's:

  LLAMA_CPP_SRC=target/peer-src/llama_cpp_python-0.3.36/vendor/llama.cpp \\
      V/bin/python benches/gguf_convert.py target/bench-models/llama_768 \\
      --outtype f32 --outfile target/bench-models/gguf/llama_768-f32.gguf
"""

import os
import sys

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "tekken.json")


def main():
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src or not os.path.exists(os.path.join(src, "convert_hf_to_gguf.py")):
        raise SystemExit("set LLAMA_CPP_SRC to a llama.cpp source folder (with convert_hf_to_gguf.py)")
    sys.path[:0] = [src, os.path.join(src, "gguf-py")]  # the vendored gguf-py, matching the converter
    sys.argv[0] = os.path.join(src, "convert_hf_to_gguf.py")

    import convert_hf_to_gguf
    from conversion.llama import LlamaModel

    upstream = LlamaModel.set_vocab

    def set_vocab(self):
        if any((self.dir_model / f).is_file() for f in TOKENIZER_FILES):
            return upstream(self)
        print(f"gguf_convert: {self.dir_model} has no tokenizer; writing a no_vocab GGUF"
              f" ({self.hparams['vocab_size']} dummy tokens)", file=sys.stderr)
        self.gguf_writer.add_tokenizer_model("no_vocab")

    LlamaModel.set_vocab = set_vocab
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

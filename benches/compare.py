#!/usr/bin/env python3
"""Runs kiln and its peers interleaved on the same folders and prints the
ratios as a markdown table (kiln / peer; above 1 means kiln is faster).

Peers set up so far: PyTorch eager (benches/peer_torch.py). ONNX Runtime,
llama.cpp and candle are the issue's other peers and are not set up yet.

  python3 benches/compare.py --kiln target/release/kiln --models target/bench-models --rounds 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKLOADS = [
    # name, folder, kiln args, peer args, metrics
    ("llama prefill T=128 + decode 64", "llama_768",
     ["--prompt-len", "128", "--decode", "64"], ["--prompt-len", "128", "--decode", "64"],
     ["prefill_tok_s", "decode_tok_s"]),
    ("BERT-base 8 x 128", "bert_base",
     ["--batch", "8", "--prompt-len", "128"], ["--batch", "8", "--prompt-len", "128"],
     ["forward_seq_s"]),
]


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--models", default="target/bench-models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", default="3")
    a = ap.parse_args()
    py = sys.executable
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for name, folder, kargs, pargs, metrics in WORKLOADS:
        path = os.path.join(a.models, folder)
        kiln, torch = [], []
        for _ in range(a.rounds):
            kiln.append(run([a.kiln, "bench", path, "--output", "json", "--reps", a.reps] + kargs))
            torch.append(run([py, os.path.join(here, "peer_torch.py"), path, "--reps", a.reps] + pargs))
        for m in metrics:
            k = statistics.median(r[m] for r in kiln)
            t = statistics.median(r[m] for r in torch)
            rows.append((name, m, k, t, k / t))
        rows.append((name, "peak_rss_mb", statistics.median(r["peak_rss_mb"] for r in kiln),
                     statistics.median(r["peak_rss_mb"] for r in torch), None))
    print("| workload | metric | kiln cpu | PyTorch | kiln / PyTorch |")
    print("|---|---|---|---|---|")
    for name, m, k, t, ratio in rows:
        r = "" if ratio is None else f"{ratio:.2f}x"
        print(f"| {name} | {m} | {k:.1f} | {t:.1f} | {r} |")


if __name__ == "__main__":
    main()

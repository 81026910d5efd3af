#!/usr/bin/env python3
"""Runs kiln and its peers interleaved on the same folders and prints the
ratios as a markdown table (kiln / peer; above 1 means kiln is faster).

Peers set up so far: PyTorch eager (benches/peer_torch.py) and ONNX Runtime
(benches/peer_ort.py; it exports each folder to ONNX once, into
<models>/onnx/<name>/, on its first run). llama.cpp and candle are the
issue's other peers and are not set up yet. Each round runs kiln, then each
peer, on one workload; the table shows the medians over the rounds, and a
metric a runtime did not report is left blank. Where two or more runtimes
report "first_tokens" (row 0's first greedy tokens), a line after the table
says whether they agree.

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

# key, script, column title, ratio column title
PEERS = [
    ("torch", "peer_torch.py", "PyTorch", "kiln / torch"),
    ("ort", "peer_ort.py", "ONNX Runtime", "kiln / ort"),
]


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def median(results, metric):
    values = [r[metric] for r in results if r.get(metric) is not None]
    return statistics.median(values) if values else None


def fmt(v):
    return "" if v is None else f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--models", default="target/bench-models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", default="3")
    ap.add_argument("--peers", default=",".join(p[0] for p in PEERS),
                    help="comma-separated peers to run (default: all of %(default)s)")
    a = ap.parse_args()
    wanted = a.peers.split(",")
    unknown = set(wanted) - {p[0] for p in PEERS}
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(sorted(unknown))} (known: {', '.join(p[0] for p in PEERS)})")
    peers = [p for p in PEERS if p[0] in wanted]
    py = sys.executable
    here = os.path.dirname(os.path.abspath(__file__))
    rows, notes = [], []
    for name, folder, kargs, pargs, metrics in WORKLOADS:
        path = os.path.join(a.models, folder)
        results = {"kiln": []}
        results.update({key: [] for key, *_ in peers})
        for _ in range(a.rounds):
            results["kiln"].append(run([a.kiln, "bench", path, "--output", "json", "--reps", a.reps] + kargs))
            for key, script, *_ in peers:
                results[key].append(run([py, os.path.join(here, script), path, "--reps", a.reps] + pargs))
        for m in metrics + ["peak_rss_mb"]:
            k = median(results["kiln"], m)
            vals = [median(results[key], m) for key, *_ in peers]
            if m == "peak_rss_mb":
                ratios = [None] * len(peers)
            else:
                ratios = [None if k is None or not v else k / v for v in vals]
            rows.append((name, m, k, vals, ratios))
        # Greedy tokens are deterministic per runtime: compare the first round's.
        toks = [(title, results[key][0].get("first_tokens"))
                for key, title in [("kiln", "kiln")] + [(p[0], p[2]) for p in peers]]
        toks = [(title, t) for title, t in toks if t is not None]
        if len(toks) >= 2:
            who = ", ".join(title for title, _ in toks)
            if all(t == toks[0][1] for _, t in toks):
                notes.append(f"{name}: first_tokens agree ({who}): {toks[0][1]}")
            else:
                notes.append(f"{name}: first_tokens DIFFER: " + "; ".join(f"{title} {t}" for title, t in toks))
    head = ["workload", "metric", "kiln cpu"] + [p[2] for p in peers] + [p[3] for p in peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, m, k, vals, ratios in rows:
        cells = [name, m, fmt(k)] + [fmt(v) for v in vals] + ["" if r is None else f"{r:.2f}x" for r in ratios]
        print("| " + " | ".join(cells) + " |")
    if notes:
        print()
        for n in notes:
            print(n)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Runs kiln and its peers interleaved on the same folders and prints the
ratios as a markdown table (kiln / peer; above 1 means kiln is faster).

Peers: PyTorch eager (benches/peer_torch.py), ONNX Runtime
(benches/peer_ort.py; it exports each folder to ONNX once, into
<models>/onnx/<name>/, on its first run), llama.cpp through llama-cpp-python
(benches/peer_llamacpp.py, causal LMs only, on the f32 GGUF in
<models>/gguf/) and candle (benches/peer_candle, a Rust binary: --candle).
benches/setup_peers.sh installs llama-cpp-python, converts the GGUF and
builds the candle binary. Each round runs kiln, then each peer, on one
workload (odd rounds in the reverse order); the table shows the medians over
the rounds, and a metric a runtime did not report (or a peer that does not run
that model) is left blank. With two rounds or more, lines after the table give
kiln's ratio to each peer round by round (the shared machine moves a figure by
±10-30% from one run to the next: the spread says how far to trust a median
ratio). Where
two or more runtimes report "first_tokens" (row 0's first greedy tokens), a
line after the table says whether they agree.

The last workload times whole processes: `kiln generate <llama folder>
--tokens <16 ids> --max-new-tokens 64` against candle's `generate` mode, which
does the same (load, prefill of 16, 64 greedy tokens with the KV cache), as
wall-clock seconds around the subprocess (after one untimed run of each, so
the weights are in the page cache for both) and the child's peak RSS. For such
time rows the ratio is peer / kiln, so it too reads "above 1 means kiln is
faster". A line after the table says whether the generated tokens agree.

The last lines check the issue's targets in this run: each throughput
against the strongest peer of its row (the smallest kiln / peer ratio of the
table; with two rounds or more, the paired rounds' median and minimum against
that peer as well), the whole generate process >= 1.5x candle, kiln's compile
of each model under a second, and kiln's peak RSS within the weight files'
size + 25%; each says "met" or "MISSED".

Every runtime gets --threads (default 2).

  python3 benches/compare.py --kiln target/release/kiln --models target/bench-models --rounds 2
  python3 benches/compare.py --peers torch,llamacpp,candle --candle target/peer-candle/release/peer_candle
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# name, folder, kind (causal / encoder), kiln args, peer args, metrics
WORKLOADS = [
    ("llama prefill T=128 + decode 64", "llama_768", "causal",
     ["--prompt-len", "128", "--decode", "64"], ["--prompt-len", "128", "--decode", "64"],
     ["prefill_tok_s", "decode_tok_s"]),
    ("BERT-base 8 x 128", "bert_base", "encoder",
     ["--batch", "8", "--prompt-len", "128"], ["--batch", "8", "--prompt-len", "128"],
     ["forward_seq_s"]),
]

# The whole-process workload: folder, prompt length, new tokens.
GENERATE = ("llama_768", 16, 64)

# key, runner, column title, ratio column title, model kinds it runs.
# runner: a script in benches/ (run with this Python), or "candle" (the --candle binary).
PEERS = [
    ("torch", "peer_torch.py", "PyTorch", "kiln / torch", {"causal", "encoder"}),
    ("ort", "peer_ort.py", "ONNX Runtime", "kiln / ort", {"causal", "encoder"}),
    ("llamacpp", "peer_llamacpp.py", "llama.cpp", "kiln / llama.cpp", {"causal"}),
    ("candle", "candle", "candle", "kiln / candle", {"causal", "encoder"}),
]
GENERATE_PEERS = {"candle"}  # peers with a whole-process generate mode

LOWER_IS_BETTER = {"process_s"}  # time rows: the ratio is peer / kiln
# The targets: each throughput against the strongest peer of the same
# run (the smallest kiln / peer ratio of its row), the whole generate process
# against candle; the compile of each model under a second and peak RSS within
# the weights + 25%.
TARGETS = {"prefill_tok_s": 1.0, "decode_tok_s": 1.0, "forward_seq_s": 1.0, "process_s": 1.5}
COMPILE_S = 1.0
RSS_OVER_WEIGHTS = 1.25


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_timed(cmd, env=None):
    """Runs cmd; returns (wall seconds, the child's peak RSS in MiB, its last stdout line as JSON)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode:
            sys.stderr.write(err.read().decode(errors="replace"))
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
        lines = out.read().decode().strip().splitlines()
    return wall, usage.ru_maxrss / 1024, json.loads(lines[-1])


def median(results, metric):
    values = [r[metric] for r in results if r.get(metric) is not None]
    return statistics.median(values) if values else None


def fmt(v, metric):
    if v is None:
        return ""
    return f"{v:.2f}" if metric in LOWER_IS_BETTER else f"{v:.1f}"


def ratio(metric, k, v):
    if k is None or not v:
        return None
    return v / k if metric in LOWER_IS_BETTER else k / v


def paired(name, metric, results, peers, rounds=None):
    """Lines with the ratio of each round (kiln against each peer measured in
    the same round): the spread the medians of the table hide. `rounds`, when
    given, gets each peer's list under its title."""
    lines = []
    for key, _, title, *_ in peers:
        pairs = [ratio(metric, k.get(metric), v.get(metric))
                 for k, v in zip(results["kiln"], results.get(key, []))]
        pairs = [p for p in pairs if p is not None]
        if rounds is not None:
            rounds[title] = pairs
        if pairs:
            lines.append(f"{name}: {metric} kiln / {title} per round: "
                         + ", ".join(f"{p:.2f}" for p in pairs)
                         + f" (median {statistics.median(pairs):.2f}, min {min(pairs):.2f})")
    return lines


def weights_mib(path):
    """MiB of the weight files in a model folder."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors")) / 2**20


def verdicts(rows, peers, per_round, compiles, peaks):
    """One line per target of the issue: the ratio against the strongest
    peer of the run by the table (and the paired rounds' median and minimum
    against that peer), met or missed."""
    lines = []
    for name, m, k, vals, ratios in rows:
        if m not in TARGETS:
            continue
        measured = [(r, p[2]) for r, p in zip(ratios, peers) if r is not None]
        if not measured:
            continue
        r, title = min(measured)
        want = TARGETS[m]
        pairs = per_round.get((name, m), {}).get(title) or []
        spread = (f" (paired rounds: median {statistics.median(pairs):.2f}, min {min(pairs):.2f})"
                  if pairs else "")
        lines.append(f"target {name} {m} >= {want:.1f}x the strongest peer, {title}: "
                     f"{r:.2f}x by the table{spread}: {'met' if r >= want else 'MISSED'}")
    for name, secs in compiles:
        lines.append(f"target {name} compile < {COMPILE_S:.0f} s: {secs:.2f} s: "
                     f"{'met' if secs < COMPILE_S else 'MISSED'}")
    for name, peak, weights in peaks:
        lines.append(f"target {name} peak RSS <= weights + {RSS_OVER_WEIGHTS * 100 - 100:.0f}%: "
                     f"{peak:.1f} MiB for {weights:.1f} MiB of weights ({peak / weights * 100 - 100:+.0f}%): "
                     f"{'met' if peak <= weights * RSS_OVER_WEIGHTS else 'MISSED'}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--candle", default="target/peer-candle/release/peer_candle",
                    help="the peer_candle binary (benches/setup_peers.sh candle)")
    ap.add_argument("--models", default="target/bench-models")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", default="3")
    ap.add_argument("--threads", default="2", help="threads of every runtime (default %(default)s)")
    ap.add_argument("--peers", default=",".join(p[0] for p in PEERS),
                    help="comma-separated peers to run (default: all of %(default)s)")
    ap.add_argument("--no-generate", action="store_true", help="skip the whole-process generate workload")
    a = ap.parse_args()
    wanted = a.peers.split(",")
    unknown = set(wanted) - {p[0] for p in PEERS}
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(sorted(unknown))} (known: {', '.join(p[0] for p in PEERS)})")
    peers = [p for p in PEERS if p[0] in wanted]
    if any(p[1] == "candle" for p in peers) and not os.access(a.candle, os.X_OK):
        raise SystemExit(f"{a.candle}: no candle peer binary (benches/setup_peers.sh candle, or --candle PATH)")
    py = sys.executable
    here = os.path.dirname(os.path.abspath(__file__))
    # candle's CPU kernels read RAYON_NUM_THREADS; peer_candle sets it from --threads when unset.
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}

    def peer_cmd(runner, path, args):
        if runner == "candle":
            return [a.candle, "bench", path, "--reps", a.reps, "--threads", a.threads] + args
        return [py, os.path.join(here, runner), path, "--reps", a.reps, "--threads", a.threads] + args

    rows, notes, per_round, compiles, peaks = [], [], {}, [], []
    for name, folder, kind, kargs, pargs, metrics in WORKLOADS:
        path = os.path.join(a.models, folder)
        active = [p for p in peers if kind in p[4]]
        results = {"kiln": []}
        results.update({key: [] for key, *_ in active})
        cmds = [("kiln", [a.kiln, "bench", path, "--output", "json", "--reps", a.reps,
                          "--threads", a.threads] + kargs, None)]
        cmds += [(key, peer_cmd(runner, path, pargs), env) for key, runner, *_ in active]
        for r in range(a.rounds):
            # Odd rounds run in the reverse order, so that no runtime always
            # runs first (or right after the same neighbour).
            for key, cmd, e in (cmds if r % 2 == 0 else cmds[::-1]):
                results[key].append(run(cmd, env=e))
        for m in metrics + ["peak_rss_mb"]:
            k = median(results["kiln"], m)
            vals = [median(results[key], m) if key in results else None for key, *_ in peers]
            ratios = [None if m == "peak_rss_mb" else ratio(m, k, v) for v in vals]
            rows.append((name, m, k, vals, ratios))
            if m == "peak_rss_mb" and k is not None:
                peaks.append((name, k, weights_mib(path)))
            if m != "peak_rss_mb" and a.rounds > 1:
                notes.extend(paired(name, m, results, active, per_round.setdefault((name, m), {})))
        c = median(results["kiln"], "compile_s")
        if c is not None:
            compiles.append((name, c))
        # Greedy tokens are deterministic per runtime: compare the first round's.
        toks = [(title, results[key][0].get("first_tokens"))
                for key, title in [("kiln", "kiln")] + [(p[0], p[2]) for p in active]]
        toks = [(title, t) for title, t in toks if t is not None]
        if len(toks) >= 2:
            who = ", ".join(title for title, _ in toks)
            if all(t == toks[0][1] for _, t in toks):
                notes.append(f"{name}: first_tokens agree ({who}): {toks[0][1]}")
            else:
                notes.append(f"{name}: first_tokens DIFFER: " + "; ".join(f"{title} {t}" for title, t in toks))

    gen_peers = [p for p in peers if p[0] in GENERATE_PEERS]
    if gen_peers and not a.no_generate:
        folder, prompt_len, new_tokens = GENERATE
        path = os.path.join(a.models, folder)
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        ids = ",".join(str((i * 7 + 3) % vocab) for i in range(prompt_len))  # row 0 of the bench ids
        name = f"whole `generate` {prompt_len} + {new_tokens} tokens"
        cmds = {"kiln": [a.kiln, "generate", path, "--tokens", ids, "--max-new-tokens", str(new_tokens),
                         "--threads", a.threads, "--output", "json"]}
        for key, runner, *_ in gen_peers:
            cmds[key] = [a.candle, "generate", path, "--tokens", ids, "--max-new-tokens", str(new_tokens),
                         "--threads", a.threads]
        results = {key: [] for key in cmds}
        for key, cmd in cmds.items():
            run_timed(cmd, env=env)  # warm-up: the weights into the page cache, untimed
        for r in range(a.rounds):
            order = list(cmds.items())
            for key, cmd in (order if r % 2 == 0 else order[::-1]):
                wall, rss, out = run_timed(cmd, env=env)
                results[key].append({"process_s": wall, "peak_rss_mb": rss, "tokens": out.get("tokens")})
        for m in ["process_s", "peak_rss_mb"]:
            k = median(results["kiln"], m)
            vals = [median(results[key], m) if key in results else None for key, *_ in peers]
            ratios = [None if m == "peak_rss_mb" else ratio(m, k, v) for v in vals]
            rows.append((name, m, k, vals, ratios))
            if m != "peak_rss_mb" and a.rounds > 1:
                notes.extend(paired(name, m, results, gen_peers, per_round.setdefault((name, m), {})))
        toks = [(title, results[key][0]["tokens"]) for key, title in
                [("kiln", "kiln")] + [(p[0], p[2]) for p in gen_peers]]
        if all(t == toks[0][1] for _, t in toks):
            notes.append(f"{name}: the {len(toks[0][1])} new tokens agree ({', '.join(t for t, _ in toks)})")
        else:
            notes.append(f"{name}: new tokens DIFFER: " + "; ".join(f"{title} {t}" for title, t in toks))

    head = ["workload", "metric", "kiln cpu"] + [p[2] for p in peers] + [p[3] for p in peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, m, k, vals, ratios in rows:
        cells = [name, m, fmt(k, m)] + [fmt(v, m) for v in vals] + ["" if r is None else f"{r:.2f}x" for r in ratios]
        print("| " + " | ".join(cells) + " |")
    if notes:
        print()
        for n in notes:
            print(n)
    targets = verdicts(rows, peers, per_round, compiles, peaks)
    if targets:
        print()
        for t in targets:
            print(t)


if __name__ == "__main__":
    main()

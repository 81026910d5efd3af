#!/usr/bin/env python3
"""kiln --backend cuda against the interpreter and the CPU backend on every
test family (tests/data/hf/*): the outputs of `kiln run` on each family's
reference inputs within 1e-4 relative (f32, the kernels' own sums), and
greedy generation identical with and without the KV cache. Prints one line
per check and writes them all as JSON; exits 1 if any fails."""

import argparse
import json
import os
import subprocess
import sys

HF = "tests/data/hf"
TOL = 1e-4


def run(kiln, args):
    p = subprocess.run([kiln] + args, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip()[-600:])
    return json.loads(p.stdout)


def flat(v):
    if isinstance(v, list):
        for x in v:
            yield from flat(x)
    else:
        yield float(v)


def rel_err(a, b):
    a, b = list(flat(a)), list(flat(b))
    if len(a) != len(b):
        return float("inf")
    scale = max(max((abs(x) for x in b), default=0.0), 1e-30)
    worst = 0.0
    for x, y in zip(a, b):
        if x != x or y != y or abs(x) == float("inf"):
            return float("inf")
        worst = max(worst, abs(x - y) / scale)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="cuda", help="cuda, or cuda-emu to try the script without a GPU")
    a = ap.parse_args()
    results, failed = [], False
    for name in sorted(os.listdir(HF)):
        d = os.path.join(HF, name)
        ref = os.path.join(d, "reference.json")
        if not os.path.exists(ref):
            continue
        r = json.load(open(ref))
        inp = r["inputs"]
        args = []
        for row in inp["input_ids"]:
            args += ["--tokens", ",".join(map(str, row))]
        for row in inp.get("attention_mask") or []:
            args += ["--attention-mask", ",".join(map(str, row))]
        for row in inp.get("token_type_ids") or []:
            args += ["--token-type-ids", ",".join(map(str, row))]
        for row in inp.get("decoder_input_ids") or []:
            args += ["--decoder-tokens", ",".join(map(str, row))]
        model = [d]
        if not os.path.exists(os.path.join(d, "config.json")):
            # A PEFT adapter folder: its base family with the adapter applied.
            model = [os.path.join(HF, name.split("_lora")[0]), "--adapter", d]
        rec = {"family": name}
        try:
            outs = {b: run(a.kiln, ["run"] + model + args + ["--backend", b, "--output", "json"]) for b in ("interp", "cpu", a.backend)}
            rec["vs_interp"] = max(rel_err(outs[a.backend][k], outs["interp"][k]) for k in outs["interp"])
            rec["vs_cpu"] = max(rel_err(outs[a.backend][k], outs["cpu"][k]) for k in outs["cpu"])
            ok = rec["vs_interp"] <= TOL and rec["vs_cpu"] <= TOL
            if "greedy" in r and "prompt" in r["greedy"]:
                g = ["generate"] + model + ["--tokens", ",".join(map(str, r["greedy"]["prompt"])), "--max-new-tokens", "8", "--ignore-eos", "--output", "json"]
                want = run(a.kiln, g + ["--backend", "interp"])["tokens"]
                for extra in ([], ["--no-kv-cache"]):
                    got = run(a.kiln, g + ["--backend", a.backend] + extra)["tokens"]
                    rec["greedy" + ("" if not extra else "_no_cache")] = got == want
                    ok = ok and got == want
            rec["ok"] = ok
        except Exception as e:  # a failure is a result, not the end of the run
            rec["ok"], rec["error"] = False, str(e)
        failed = failed or not rec["ok"]
        results.append(rec)
        print(json.dumps(rec), flush=True)
    json.dump(results, open(a.out, "w"), indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

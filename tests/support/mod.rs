//! Shared helpers of the end-to-end tests: the Hugging Face test models, sample
//! inputs per family, the one comparison of outputs with references (which
//! fails on NaN and infinities), property tests that count their skipped cases,
//! and the differential check every pass must pass (the interpreter's outputs
//! before and after the pass agree).

#![allow(dead_code, unused_imports)]

pub mod compare;
pub mod property;
pub mod random_graph;

pub use compare::{
    assert_close, check_finite, check_outputs_finite, deviation, named, outputs_deviation, Compare,
    Deviation, Mismatch, NonFinite, Side, Tolerance,
};
pub use property::{check_property, run_property, Case, Tally};

use std::path::Path;

use kiln::{Model, PassManager, RunInputs, Tensor};

/// Runs the `kiln` binary from the repository root: (exit code, -1 when killed
/// by a signal; stdout; stderr).
pub fn kiln(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the kiln binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A scratch copy of the test model folder `tests/data/hf/<name>`
/// (`config.json` and `model.safetensors`), to break in one way.
pub fn scratch_copy(name: &str, tag: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name);
    let dst = std::env::temp_dir().join(format!("kiln-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// An empty scratch folder `kiln-<tag>-<pid>` in the temporary directory
/// (whatever an earlier run left there is removed).
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A scratch copy of every file of `tests/data/hf/<name>` (tokenizer and
/// sentence-transformers files too), where [`scratch_copy`] takes only the
/// config and the weights.
pub fn scratch_folder(name: &str, tag: &str) -> std::path::PathBuf {
    let dst = scratch_copy(name, tag);
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name);
    for e in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Every backend, the oracle first: parity and differential tests run on each
/// (a new backend joins with one line here).
pub const BACKENDS: [kiln::Target; 3] = [
    kiln::Target::Interp,
    kiln::Target::Reference,
    kiln::Target::Cpu { threads: 0 },
];

/// How far a backend may be from the interpreter, relative: 0 where it
/// computes exactly what the graph says (the same f64 sums, the same rounding
/// per op); the CPU backend's matrix products accumulate in f32 in the GEMM
/// library's blocked order (measured up to about 1e-6).
pub fn tolerance_vs_oracle(target: kiln::Target) -> f64 {
    match target {
        kiln::Target::Cpu { .. } => 1e-5,
        _ => 0.0,
    }
}

/// Whether the tests run in CI (`.ci/run` exports `CI=true`), where a test may
/// not skip for want of its data.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Every model family with a test folder under `tests/data/hf/`.
pub const FAMILIES: [&str; 11] = [
    "gpt2",
    "llama",
    "llama_tied",
    "mixtral",
    "bloom",
    "bert",
    "bert_mlm",
    "bart",
    "marian",
    "t5",
    "t5_v11",
];

/// The families that generate: every family of [`FAMILIES`] but the
/// encoders (causal LMs and encoder–decoders).
pub const GENERATIVE: [&str; 9] = [
    "gpt2",
    "llama",
    "llama_tied",
    "mixtral",
    "bloom",
    "bart",
    "marian",
    "t5",
    "t5_v11",
];

/// Each PEFT LoRA test adapter (its name) applied, unmerged, to its base
/// model.
pub fn unmerged_loras() -> Vec<(&'static str, Model)> {
    [("gpt2", "gpt2_lora"), ("llama", "llama_lora")]
        .into_iter()
        .map(|(base, lora)| {
            let model = hf_model(base)
                .with_adapter(hf_dir(lora))
                .unwrap_or_else(|e| panic!("{lora}: {e}"));
            (lora, model)
        })
        .collect()
}

/// The folder `tests/data/hf/<name>` (a test model or a PEFT adapter).
pub fn hf_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

/// The test model `tests/data/hf/<name>`.
pub fn hf_model(name: &str) -> Model {
    Model::load(hf_dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Two rows of five tokens, with a padded row and a two-token decoder prefix
/// where the family takes them.
pub fn family_inputs(model: &Model) -> RunInputs {
    let mut inputs = RunInputs::tokens(vec![vec![5, 17, 42, 99, 3], vec![88, 12, 7, 51, 100]]);
    match model.info().map(|i| i.family) {
        Some(kiln::Family::Bert) => {
            inputs.attention_mask = Some(vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0]]);
        }
        Some(kiln::Family::Bart | kiln::Family::Marian) => {
            inputs.attention_mask = Some(vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0]]);
            inputs.decoder_tokens = Some(vec![vec![2, 0, 14], vec![2, 0, 60]]);
        }
        Some(kiln::Family::T5) => {
            inputs.attention_mask = Some(vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0]]);
            inputs.decoder_tokens = Some(vec![vec![0, 14, 9], vec![0, 60, 3]]);
        }
        _ => {}
    }
    inputs
}

/// Largest |a - b| relative to the largest |a| over every output; panics at
/// the first NaN or infinity on either side, naming the output and the element.
pub fn max_relative_error(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    outputs_deviation(b, a, &|_| NonFinite::Reject)
        .unwrap_or_else(|e| panic!("{e}"))
        .relative()
}

/// Every number of a recorded reference (nested arrays), in order; anything
/// else becomes NaN, which every comparison rejects.
pub fn reference_values(v: &serde_json::Value) -> Vec<f64> {
    fn push(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(items) => items.iter().for_each(|i| push(i, out)),
            serde_json::Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN)),
            _ => out.push(f64::NAN),
        }
    }
    let mut out = Vec::new();
    push(v, &mut out);
    out
}

/// A row of token ids of a recorded reference.
pub fn reference_ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

/// Rows of token ids of a recorded reference.
pub fn reference_rows(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(reference_ids)
        .collect()
}

/// Runs `passes` on `model` and checks that the interpreter gives the same
/// outputs before and after, within `rel_tol`; returns the optimized model.
pub fn check_preserves(
    model: &Model,
    passes: &PassManager,
    inputs: &RunInputs,
    rel_tol: f64,
) -> Model {
    let before = model
        .run(inputs)
        .unwrap_or_else(|e| panic!("{}: before: {e}", model.origin()));
    let (after_model, _) = model
        .apply_passes(passes)
        .unwrap_or_else(|e| panic!("{}: passes {:?}: {e}", model.origin(), passes.names()));
    let after = after_model.run(inputs).unwrap_or_else(|e| {
        panic!(
            "{}: after {:?}: {e}\n{}",
            model.origin(),
            passes.names(),
            after_model.to_text()
        )
    });
    outputs_deviation(&after, &before, &|_| NonFinite::Reject)
        .and_then(|d| d.within(Tolerance::Relative(rel_tol)))
        .unwrap_or_else(|e| {
            panic!(
                "{}: passes {:?} changed the outputs: {e}",
                model.origin(),
                passes.names()
            )
        });
    after_model
}

/// Seeded inputs for every input of `graph` with `B = batch`, `T = len`: floats
/// in [-1, 1), integers in [0, 50) (valid ids of the random graphs' tables).
pub fn random_inputs(graph: &kiln::ir::Graph, batch: i64, len: i64, seed: u64) -> Vec<Tensor> {
    seeded_inputs(
        graph,
        &[("B", batch), ("T", len)],
        |u| (u * 50.0) as i64,
        seed,
    )
}

/// Seeded inputs for every input of `graph`, its run-time symbols bound by
/// `sizes`: floats in [-1, 1), integers `int(u)` of a uniform `u` in [0, 1).
pub fn seeded_inputs(
    graph: &kiln::ir::Graph,
    sizes: &[(&str, i64)],
    int: fn(f64) -> i64,
    seed: u64,
) -> Vec<Tensor> {
    let mut cx = kiln::ir::ShapeCx::new();
    for (n, v) in sizes {
        cx.bind(n, &kiln::ir::Dim::constant(*v))
            .expect("bind a run-time symbol");
    }
    for (n, d) in graph.bindings() {
        cx.bind(n, d).expect("binding");
    }
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    graph
        .inputs()
        .iter()
        .map(|&v| {
            let ty = graph.ty(v);
            let shape: Vec<usize> = ty
                .shape
                .iter()
                .map(|d| {
                    cx.eval(d)
                        .ok()
                        .and_then(|x| x.as_const())
                        .expect("concrete input dim") as usize
                })
                .collect();
            let n: usize = shape.iter().product();
            match ty.dtype {
                kiln::ir::DType::I64 => Tensor::i64(shape, (0..n).map(|_| int(next())).collect()),
                kiln::ir::DType::I32 => {
                    Tensor::i32(shape, (0..n).map(|_| int(next()) as i32).collect())
                }
                kiln::ir::DType::Bool => {
                    Tensor::bool(shape, (0..n).map(|_| next() < 0.5).collect())
                }
                _ => Tensor::f32(shape, (0..n).map(|_| (next() * 2.0 - 1.0) as f32).collect()),
            }
            .expect("input tensor")
        })
        .collect()
}

/// The artifact's section table: (name, offset, length, first checksum).
pub fn artifact_sections(bytes: &[u8]) -> Vec<(String, usize, usize, usize)> {
    let n = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    (0..n)
        .map(|i| {
            let e = &bytes[40 + 48 * i..40 + 48 * (i + 1)];
            let name = String::from_utf8_lossy(&e[..16])
                .trim_end_matches('\0')
                .to_string();
            let off = u64::from_le_bytes(e[16..24].try_into().unwrap()) as usize;
            let len = u64::from_le_bytes(e[24..32].try_into().unwrap()) as usize;
            let first = u32::from_le_bytes(e[32..36].try_into().unwrap()) as usize;
            (name, off, len, first)
        })
        .collect()
}

/// Recomputes every checksum after an edit (a forger's artifact: what the
/// manifest checks must still catch).
pub fn reseal_artifact(bytes: &mut [u8]) {
    let secs = artifact_sections(bytes);
    let n = secs.len();
    let crcs = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let base = 40 + 48 * n;
    for (_, off, len, first) in &secs {
        for c in 0..len.div_ceil(1 << 20) {
            let from = off + c * (1 << 20);
            let to = (from + (1 << 20)).min(off + len);
            let crc = crc32fast::hash(&bytes[from..to]);
            let at = base + 4 * (first + c);
            bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let meta = crc32fast::hash(&bytes[40..base + 4 * crcs]);
    bytes[20..24].copy_from_slice(&meta.to_le_bytes());
    let h = crc32fast::hash(&bytes[..36]);
    bytes[36..40].copy_from_slice(&h.to_le_bytes());
}

/// A copy of the test folder `name` whose float weights are stored as
/// `dtype` (a folder of this process's own: test binaries run at once).
pub fn sixteen_bit_copy(name: &str, dtype: safetensors::Dtype) -> std::path::PathBuf {
    use safetensors::{Dtype, SafeTensors};
    use std::path::Path;
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name);
    let dst = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}_{dtype:?}_{}", std::process::id()));
    std::fs::create_dir_all(&dst).expect("temp folder");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    match dtype {
                        Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                        _ => half::bf16::from_f32(x).to_le_bytes(),
                    }
                })
                .collect(),
            _ => view.data().to_vec(),
        };
        tensors.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(dtype, shape.clone(), data).expect("view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).expect("write");
    dst
}

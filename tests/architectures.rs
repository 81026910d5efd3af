//! The architectures beyond the classic four: properties the parity tests
//! cannot show. MoE runs sparsely (an expert no token chooses is never
//! read), routing matches the recorded Mixtral router decisions, computed
//! tables are checked against a checkpoint's copy, and bad configurations
//! fail naming the key.

mod support;

use kiln_backends::{Tensor, Weights};
use support::{kiln, scratch_copy, BACKENDS};

/// A one-layer MoE over four experts of width 3 on d = 2, top-1.
const MOE: &str = "func @moe(%x: f32[N, d]) -> (y: f32[N, d]) where d = 2, f = 3, E = 4 {
  param @router: f32[E, d]
  param @w1: f32[E, f, d]
  param @w3: f32[E, f, d]
  param @w2: f32[E, d, f]
  %y = moe(%x, @router, @w1, @w3, @w2) top_k=1 : f32[N, d]
  return %y
}";

fn moe_weights(poison_last: bool) -> Weights {
    let mut w = Weights::new();
    // Expert 3 scores -10·(x0 + x1): for the positive inputs below, never chosen.
    let router = vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, -10.0, -10.0];
    w.insert("router".into(), Tensor::f32(vec![4, 2], router).unwrap());
    let ramp = |n: usize, s: f32| {
        (0..n)
            .map(|i| s * (i as f32 - 3.0) / 7.0)
            .collect::<Vec<_>>()
    };
    let mut w1 = ramp(24, 1.0);
    let mut w3 = ramp(24, -0.7);
    let mut w2 = ramp(24, 0.9);
    if poison_last {
        for v in [&mut w1, &mut w3, &mut w2] {
            v[18..].fill(f32::NAN);
        }
    }
    w.insert("w1".into(), Tensor::f32(vec![4, 3, 2], w1).unwrap());
    w.insert("w3".into(), Tensor::f32(vec![4, 3, 2], w3).unwrap());
    w.insert("w2".into(), Tensor::f32(vec![4, 2, 3], w2).unwrap());
    w
}

#[test]
fn moe_never_reads_an_expert_no_token_chooses() {
    let graph = kiln_ir::parse_graph(MOE).unwrap();
    let x = Tensor::f32(vec![3, 2], vec![1.0, 0.2, 0.1, 2.0, 0.7, 0.8]).unwrap();
    for backend in BACKENDS {
        let run = |poison| {
            let mut exe = backend
                .backend()
                .compile(&graph, &moe_weights(poison))
                .unwrap();
            let out = exe.run(std::slice::from_ref(&x)).unwrap();
            out[0].as_f32().unwrap().to_vec()
        };
        let clean = run(false);
        let poisoned = run(true);
        // Dense evaluation with masking would turn 0 · NaN into NaN.
        assert!(
            poisoned.iter().all(|v| v.is_finite()),
            "{}: an unchosen expert's NaN weights reached the output: {poisoned:?}",
            backend.name()
        );
        assert_eq!(clean, poisoned, "{}", backend.name());
        assert!(clean.iter().any(|&v| v != 0.0));
    }
}

#[test]
fn routing_matches_the_recorded_mixtral_router() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hf/mixtral/reference.json"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rec = &r["routing_layer0"];
    let flat = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().clone())
            .collect()
    };
    let (logits, idx, weights) = (
        flat(&rec["router_logits"]),
        flat(&rec["top2_indices"]),
        flat(&rec["top2_weights"]),
    );
    let mut checked = 0;
    for (t, row) in logits.iter().enumerate() {
        let l: Vec<f64> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = kiln_backends::routing::route(&l, 2);
        for (j, (e, w)) in got.iter().enumerate() {
            assert_eq!(
                *e as u64,
                idx[t][j].as_u64().unwrap(),
                "token {t} choice {j}"
            );
            let ww = weights[t][j].as_f64().unwrap();
            assert!(
                (w - ww).abs() <= 1e-6 * ww.abs().max(1.0),
                "token {t}: weight {w} vs {ww}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} tokens recorded");
}

/// A scratch copy of `name` whose config has `key` set to `value`.
fn with_config(name: &str, tag: &str, key: &str, value: serde_json::Value) -> std::path::PathBuf {
    let dir = scratch_copy(name, tag);
    let cfg = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&cfg, c.to_string()).unwrap();
    dir
}

#[test]
fn more_experts_per_token_than_experts_names_both_keys() {
    let dir = with_config(
        "mixtral",
        "moe-k",
        "num_experts_per_tok",
        serde_json::json!(5),
    );
    let (code, _, err) = kiln(&["check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("num_experts_per_tok = 5"), "{err}");
    assert!(err.contains("num_local_experts = 4"), "{err}");
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn a_router_of_the_wrong_width_names_the_tensor() {
    // hidden_size 32 → 16 makes every width wrong; the router is among them.
    let dir = with_config("mixtral", "moe-width", "hidden_size", serde_json::json!(16));
    let (code, _, err) = kiln(&["run", dir.to_str().unwrap(), "--tokens", "1,2"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("model.layers.0.block_sparse_moe.gate.weight` has shape [4, 32] but the model expects [4, 16]"),
        "{err}"
    );
}

/// Writes `tensors` (name → (shape, values)) into `dir/model.safetensors`
/// next to the file's own tensors.
fn add_tensors(dir: &std::path::Path, extra: &[(&str, Vec<usize>, Vec<f32>)]) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (n, shape, vals) in extra {
        owned.push((
            n.to_string(),
            shape.clone(),
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_checkpoint_copy_of_the_sinusoidal_table_is_checked() {
    let table = kiln_frontends::bart::sinusoidal_table(64, 32);
    let dir = scratch_copy("marian", "marian-table");
    add_tensors(
        &dir,
        &[
            (
                "model.encoder.embed_positions.weight",
                vec![64, 32],
                table.clone(),
            ),
            (
                "model.decoder.embed_positions.weight",
                vec![64, 32],
                table.clone(),
            ),
        ],
    );
    let (code, out, err) = kiln(&[
        "run",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17",
        "--decoder-tokens",
        "1,14",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("logits"), "{out}");

    let mut wrong = table.clone();
    wrong[3 * 32 + 5] += 0.01;
    let dir = scratch_copy("marian", "marian-table-bad");
    add_tensors(
        &dir,
        &[("model.decoder.embed_positions.weight", vec![64, 32], wrong)],
    );
    let (code, _, err) = kiln(&[
        "run",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17",
        "--decoder-tokens",
        "1,14",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("tensor `model.decoder.embed_positions.weight` is computed from the config, and the file's copy disagrees: element 101"),
        "{err}"
    );
}

#[test]
fn sinusoidal_table_layout_is_sines_then_cosines() {
    let t = kiln_frontends::bart::sinusoidal_table(5, 6);
    // Row 0: sin 0 = 0 in the first half, cos 0 = 1 in the second.
    assert_eq!(&t[..6], &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    // Row 3, column 1: sin(3 / 10000^(2/6)); column 4: cos of the same angle.
    let a = 3.0 / 10000f64.powf(2.0 / 6.0);
    assert_eq!(t[3 * 6 + 1], a.sin() as f32);
    assert_eq!(t[3 * 6 + 4], a.cos() as f32);
}

#[test]
fn t5_buckets_match_transformers() {
    // transformers' `_relative_position_bucket` over key − query in
    // −160..=160, for the test models' 8 buckets / distance 20 and the real
    // checkpoints' 32 / 128, both directions.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hf/t5/reference.json"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let table = &r["position_bias_layer0"]["bucket_table"];
    let rel: Vec<i64> = table["relative_positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let mut checked = 0;
    for key in ["config", "default_32_128"] {
        let t = &table[key];
        for (dir, bidirectional) in [("bidirectional", true), ("unidirectional", false)] {
            let b = kiln_ir::RelativeBias {
                buckets: t["num_buckets"].as_u64().unwrap() as usize,
                max_distance: t["max_distance"].as_u64().unwrap() as usize,
                bidirectional,
            };
            for (d, want) in rel.iter().zip(t[dir].as_array().unwrap()) {
                assert_eq!(
                    b.bucket(*d) as u64,
                    want.as_u64().unwrap(),
                    "{key} {dir} distance {d}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 321);
}

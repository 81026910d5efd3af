//! KV-cache insertion: `decode(prefill(x) caches, next)` equals the full forward
//! on `x ++ next` at the new positions, the split IR is snapshot-tested, and
//! generation with the cache equals generation without it.

mod support;

use kiln::backends::{Backend, Interpreter};
use kiln::ir::Module;
use kiln::passes::PassContext;
use kiln::{Model, PassManager, RunInputs, Tensor};

/// A two-layer causal decoder written directly with fused `attention` ops.
const TINY_DECODER: &str = "func @tiny(%tokens: i64[B, T]) -> (logits: f32[B, T, V])
    where V = 11, P = 32, d = 8, h = 2, dh = d / h {
  param @wte: f32[V, d]
  param @wpe: f32[P, d]
  param @l0.wq: f32[d, d]
  param @l0.wk: f32[d, d]
  param @l0.wv: f32[d, d]
  param @l1.wq: f32[d, d]
  param @l1.wk: f32[d, d]
  param @l1.wv: f32[d, d]
  %tok = gather(@wte, %tokens) : f32[B, T, d]
  %pos = arange() start=0 len=T dtype=i64 : i64[T]
  %pe = gather(@wpe, %pos) : f32[T, d]
  %x0 = add(%tok, %pe) : f32[B, T, d]
  %q0 = matmul(%x0, @l0.wq) : f32[B, T, d]
  %k0 = matmul(%x0, @l0.wk) : f32[B, T, d]
  %v0 = matmul(%x0, @l0.wv) : f32[B, T, d]
  %qh0 = reshape(%q0) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %kh0 = reshape(%k0) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %vh0 = reshape(%v0) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %qt0 = permute(%qh0) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %kt0 = permute(%kh0) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %vt0 = permute(%vh0) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %a0 = attention(%qt0, %kt0, %vt0) causal=true scale=0.5 : f32[B, h, T, dh]
  %m0 = permute(%a0) perm=[0, 2, 1, 3] : f32[B, T, h, dh]
  %o0 = reshape(%m0) shape=[B, T, d] : f32[B, T, d]
  %x1 = add(%x0, %o0) : f32[B, T, d]
  %q1 = matmul(%x1, @l1.wq) : f32[B, T, d]
  %k1 = matmul(%x1, @l1.wk) : f32[B, T, d]
  %v1 = matmul(%x1, @l1.wv) : f32[B, T, d]
  %qh1 = reshape(%q1) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %kh1 = reshape(%k1) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %vh1 = reshape(%v1) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %qt1 = permute(%qh1) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %kt1 = permute(%kh1) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %vt1 = permute(%vh1) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %a1 = attention(%qt1, %kt1, %vt1) causal=true scale=0.5 : f32[B, h, T, dh]
  %m1 = permute(%a1) perm=[0, 2, 1, 3] : f32[B, T, h, dh]
  %o1 = reshape(%m1) shape=[B, T, d] : f32[B, T, d]
  %x2 = add(%x1, %o1) : f32[B, T, d]
  %logits = matmul(%x2, @wte) transpose_b=true : f32[B, T, V]
  return %logits
}
";

/// Splits `graph` (with `weights`) and checks, for prompt `rows` and one next
/// token per row, that prefill + decode reproduce the full forward exactly
/// (within float tolerance) at every new position.
fn check_kv_equivalence(
    graph: kiln::ir::Graph,
    mut weights: kiln::Weights,
    rows: &[Vec<i64>],
    next: &[i64],
    tol: f64,
) -> Module {
    let mut full = Interpreter.compile(&graph, &weights).unwrap();
    let mut module = Module { funcs: vec![graph] };
    PassManager::from_names(&["kv-cache"])
        .unwrap()
        .run(&mut module, &mut PassContext::new(Some(&mut weights)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut prefill = Interpreter.compile(&module.funcs[0], &weights).unwrap();
    let mut decode = Interpreter.compile(&module.funcs[1], &weights).unwrap();

    let prompt = Tensor::from_tokens(rows).unwrap();
    let out = prefill.run(std::slice::from_ref(&prompt)).unwrap();
    let reference = full.run(&[prompt]).unwrap();
    // Prefill returns the logits of the last position only (all that
    // generation reads): they equal the original forward's there.
    let (b, t) = (rows.len(), rows[0].len());
    let vocab = reference[0].shape()[2];
    let want_last: Vec<f32> = (0..b)
        .flat_map(|r| {
            reference[0].as_f32().unwrap()[(r * t + t - 1) * vocab..(r * t + t) * vocab].to_vec()
        })
        .collect();
    assert_eq!(out[0].shape(), &[b, 1, vocab]);
    assert_eq!(
        out[0].as_f32().unwrap(),
        &want_last[..],
        "prefill logits equal the original forward at the last position"
    );
    let steps: Vec<Tensor> = out;
    let longer: Vec<Vec<i64>> = rows
        .iter()
        .zip(next)
        .map(|(r, n)| r.iter().copied().chain([*n]).collect())
        .collect();
    let want = full.run(&[Tensor::from_tokens(&longer).unwrap()]).unwrap();
    let step = decode
        .run(&[
            Tensor::from_tokens(&next.iter().map(|t| vec![*t]).collect::<Vec<_>>()).unwrap(),
            steps[1].clone(),
            steps[2].clone(),
        ])
        .unwrap();
    let (b, t, v) = (rows.len(), rows[0].len() + 1, want[0].shape()[2]);
    assert_eq!(step[0].shape(), &[b, 1, v]);
    let got = step[0].as_f32().unwrap();
    let all = want[0].as_f32().unwrap();
    for r in 0..b {
        let last = &all[(r * t + t - 1) * v..(r * t + t) * v];
        support::assert_close(
            &format!("row {r}: decode logits against the full forward's"),
            &got[r * v..(r + 1) * v],
            last,
            support::Tolerance::Absolute(tol),
        );
    }
    assert_eq!(step[1].shape()[3], t, "the key cache grew by one");
    module
}

#[test]
fn decode_after_prefill_equals_the_full_forward() {
    let graph = kiln::ir::parse_graph(TINY_DECODER).unwrap();
    let weights = kiln::frontends::gpt2::random_weights(&graph, 11).unwrap();
    let module = check_kv_equivalence(
        graph,
        weights,
        &[vec![1, 5, 9, 2], vec![3, 3, 7, 10]],
        &[4, 6],
        1e-5,
    );
    insta::assert_snapshot!("tiny_decoder_split", kiln::ir::print_module(&module));
}

#[test]
fn families_decode_with_the_cache_like_without() {
    for family in ["gpt2", "llama", "llama_tied"] {
        let model = support::hf_model(family);
        let (fused, _) = model
            .apply_passes(&PassManager::from_names(&["attention-fusion", "dce"]).unwrap())
            .unwrap();
        let graph = fused.main().unwrap().clone();
        let weights = fused.weights().unwrap().clone();
        check_kv_equivalence(
            graph,
            weights,
            &[vec![5, 17, 42, 99, 3], vec![88, 12, 7, 51, 100]],
            &[9, 33],
            1e-4,
        );
    }
}

#[test]
fn kv_cache_needs_a_fused_causal_decoder() {
    let model = support::hf_model("bert");
    let err = model
        .apply_passes(&PassManager::from_names(&["attention-fusion", "kv-cache"]).unwrap())
        .expect_err("bert has no causal attention");
    assert!(
        err.to_string().contains("no causal `attention` op found"),
        "{err}"
    );
    let model = Model::from_text(TINY_DECODER, "tiny").unwrap();
    let err = model
        .apply_passes(&PassManager::from_names(&["kv-cache", "kv-cache"]).unwrap())
        .expect_err("split twice");
    assert!(err.to_string().contains("already split?"), "{err}");
    let _ = RunInputs::default();
}

#[test]
fn the_encoder_runs_once_in_prefill_not_in_every_decode_step() {
    let model = support::hf_model("bart");
    let (split, cx) = model
        .apply_passes(&PassManager::from_names(&["attention-fusion", "dce", "kv-cache"]).unwrap())
        .unwrap();
    let decode = split.function("decode").unwrap();
    let names: Vec<String> = decode
        .inputs()
        .iter()
        .map(|v| match &decode.node(*v).kind {
            kiln::ir::NodeKind::Input { name } => name.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(names[..3], ["decoder_tokens", "past_keys", "past_values"]);
    assert!(
        !names.iter().any(|n| n == "tokens" || n == "attention_mask"),
        "{names:?}"
    );
    // Only the decoder's parameters remain in decode.
    assert!(decode
        .param_by_name("model.encoder.layers.0.fc1.weight")
        .is_none());
    assert!(cx.log.iter().any(|r| r
        .notes
        .iter()
        .any(|n| n.contains("computed once by @prefill"))));
    // Greedy decoding with the cache equals decoding without it.
    let prompt = RunInputs::tokens(vec![vec![11, 73, 4, 58, 90], vec![5, 6, 7, 8, 9]]);
    let run = |kv_cache| {
        model
            .generate(
                &prompt,
                &kiln::GenerateOptions {
                    max_new_tokens: 6,
                    sampling: kiln::Sampling::Greedy,
                    stop_at_eos: false,
                    kv_cache,
                    backend: kiln::Target::Interp,
                },
            )
            .unwrap()
    };
    assert_eq!(run(true), run(false));
}

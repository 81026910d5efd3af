//! Regression tests for pass bugs found in review: each case once produced a
//! wrong result or a failure on a valid graph.

mod support;

use kiln::backends::{Backend, Interpreter};
use kiln::ir::{parse_graph, Module};
use kiln::passes::PassContext;
use kiln::{PassManager, Tensor};

/// Runs `src` with seeded weights and inputs before and after `passes`; the
/// outputs (or the run-time error) must be the same.
fn check_same_after(src: &str, passes: &[&str], batch: i64, len: i64) {
    let graph = parse_graph(src).unwrap();
    let mut weights = kiln::frontends::gpt2::random_weights(&graph, 5).unwrap();
    let inputs = support::random_inputs(&graph, batch, len, 9);
    let before = Interpreter
        .compile(&graph, &weights)
        .and_then(|mut e| e.run(&inputs));
    let mut module = Module { funcs: vec![graph] };
    PassManager::from_names(passes)
        .unwrap()
        .run(&mut module, &mut PassContext::new(Some(&mut weights)))
        .unwrap_or_else(|e| panic!("{passes:?}: {e}"));
    let after = Interpreter
        .compile(&module.funcs[0], &weights)
        .and_then(|mut e| e.run(&inputs));
    match (before, after) {
        (Ok(a), Ok(b)) => {
            let graph = &module.funcs[0];
            support::outputs_deviation(
                &support::named(graph, b),
                &support::named(graph, a),
                &|_| support::NonFinite::Reject,
            )
            .and_then(|d| d.within(support::Tolerance::Absolute(1e-5)))
            .unwrap_or_else(|e| panic!("{passes:?} changed an output: {e}"));
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("{passes:?}: before {a:?}, after {b:?}"),
    }
}

#[test]
fn lora_merge_keeps_a_weight_that_is_also_an_output() {
    let src = "func @f(%x: f32[B, 3]) -> (y: f32[B, 2], w: f32[2, 3]) {
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  %y = lora_linear(%x, @w, @a, @b) alpha=2.0 layout=out_in : f32[B, 2]
  return %y, @w
}";
    check_same_after(src, &["lora-merge", "dce"], 2, 1);
}

#[test]
fn lora_merge_keeps_a_weight_that_is_also_the_input() {
    let src = "func @f() -> (y: f32[2, 2]) {
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  %y = lora_linear(@w, @w, @a, @b) alpha=2.0 layout=out_in : f32[2, 2]
  return %y
}";
    check_same_after(src, &["lora-merge", "dce"], 1, 1);
}

#[test]
fn lora_merge_leaves_a_rank_one_input_unmerged() {
    let src = "func @f(%x: f32[3]) -> (y: f32[2]) {
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  %y = lora_linear(%x, @w, @a, @b) alpha=2.0 layout=out_in : f32[2]
  return %y
}";
    check_same_after(src, &["lora-merge", "dce"], 1, 1);
}

#[test]
fn constant_folding_keeps_a_slice_checked_at_run_time() {
    let src = "func @f(%x: f32[B, T]) -> (y: f32[B, T]) {
  %c = constant() value=2.0 dtype=f32 shape=[4] : f32[4]
  %s = slice(%c) axis=0 start=0 end=T : f32[T]
  %y = mul(%x, %s) : f32[B, T]
  return %y
}";
    check_same_after(src, &["constant-folding", "dce"], 1, 6);
    check_same_after(src, &["constant-folding", "dce"], 1, 3);
}

#[test]
fn kv_cache_refuses_graphs_it_cannot_split_exactly() {
    let cases = [
        (
            "func @f(%x: f32[B, T, d]) -> (y: f32[B, T, d]) where d = 4, P = 16 {
  param @pos: f32[P, d]
  %pe = slice(@pos) axis=0 start=0 end=T : f32[T, d]
  %h = add(%x, %pe) : f32[B, T, d]
  %h4 = reshape(%h) shape=[B, 1, T, d] : f32[B, 1, T, d]
  %a = attention(%h4, %h4, %h4) causal=true scale=1.0 : f32[B, 1, T, d]
  %y = reshape(%a) shape=[B, T, d] : f32[B, T, d]
  return %y
}",
            "%pe = slice(@pos) is a slice along or sized by the sequence",
        ),
        (
            "func @f(%x: f32[B, T, d]) -> (y: f32[B, T, d]) where d = 4 {
  %x4 = reshape(%x) shape=[B, 1, T, d] : f32[B, 1, T, d]
  %a = attention(%x4, %x4, %x4) causal=true scale=1.0 : f32[B, 1, T, d]
  %c = causal_mask() queries=T keys=T : bool[T, T]
  %fill = constant() value=-1e9 dtype=f32 shape=[] : f32[]
  %s = matmul(%a, %a) transpose_b=true : f32[B, 1, T, T]
  %w = where(%c, %s, %fill) : f32[B, 1, T, T]
  %p = softmax(%w) axis=-1 : f32[B, 1, T, T]
  %o = matmul(%p, %a) : f32[B, 1, T, d]
  %y = reshape(%o) shape=[B, T, d] : f32[B, T, d]
  return %y
}",
            "is a causal mask used outside a fused attention",
        ),
    ];
    for (src, needle) in cases {
        let model = kiln::Model::from_text(src, "case").unwrap();
        let err = model
            .apply_passes(
                &PassManager::from_names(&["attention-fusion", "dce", "kv-cache"]).unwrap(),
            )
            .expect_err("the kv-cache pass must refuse");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let _ = Tensor::from_tokens(&[[1i64]]);
}

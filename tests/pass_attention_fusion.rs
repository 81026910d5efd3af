//! The `attention-fusion` pass: one `attention` op per attention layer of every
//! family, interpreter outputs unchanged, GQA/cross-attention/mask variants
//! written as text IR, and the chains it must leave alone.

mod support;

use std::path::Path;

use kiln::backends::{Backend, Interpreter};
use kiln::ir::{Graph, NodeKind};
use kiln::{Model, OptLevel, PassManager, Tensor, Weights};
use support::{check_preserves, family_inputs, hf_model, max_relative_error, FAMILIES};

/// How many op nodes of `graph` are the op called `name`.
fn count_ops(graph: &Graph, name: &str) -> usize {
    graph
        .node_ids()
        .into_iter()
        .filter(|&v| matches!(&graph.node(v).kind, NodeKind::Op { op, .. } if op.name() == name))
        .count()
}

fn fusion_then_dce() -> PassManager {
    PassManager::from_names(&["attention-fusion", "dce"]).unwrap()
}

/// Attention layers per test model: gpt2/llama/bert have 2 layers; bart has 2
/// encoder self-, 2 decoder self- and 2 cross-attention layers.
fn expected_attention_layers(family: &str) -> usize {
    match family {
        "bart" | "marian" | "t5" | "t5_v11" => 6,
        _ => 2,
    }
}

#[test]
fn o2_leaves_one_attention_op_per_layer_and_no_softmax() {
    for family in FAMILIES {
        let model = hf_model(family).optimize(OptLevel::O2).unwrap();
        let graph = &model.module().funcs[0];
        assert_eq!(
            count_ops(graph, "attention"),
            expected_attention_layers(family),
            "{family}:\n{}",
            model.to_text()
        );
        assert_eq!(
            count_ops(graph, "softmax"),
            0,
            "{family}:\n{}",
            model.to_text()
        );
    }
}

#[test]
fn fusion_preserves_every_family() {
    for family in FAMILIES {
        let model = hf_model(family);
        let inputs = family_inputs(&model);
        let fused = check_preserves(&model, &fusion_then_dce(), &inputs, 1e-5);
        let graph = &fused.module().funcs[0];
        assert_eq!(
            count_ops(graph, "attention"),
            expected_attention_layers(family),
            "{family}"
        );
        // The repeat of GQA keys and values disappears with the fusion.
        assert_eq!(count_ops(graph, "expand"), 0, "{family}");
        let rel = max_relative_error(&model.run(&inputs).unwrap(), &fused.run(&inputs).unwrap());
        println!("{family}: max relative error after attention-fusion,dce {rel:.3e}");
    }
}

#[test]
fn llama_ir_after_fusion() {
    let (fused, cx) = hf_model("llama").apply_passes(&fusion_then_dce()).unwrap();
    assert_eq!(
        cx.log[0].notes,
        vec!["fused 2 attention patterns".to_string()]
    );
    insta::assert_snapshot!("llama_after_attention_fusion_dce", fused.to_text());
}

/// The interpreter's named outputs of `graph`.
fn run_graph(graph: &Graph, weights: &Weights, inputs: &[Tensor]) -> Vec<(String, Tensor)> {
    let mut exe = Interpreter.compile(graph, weights).unwrap();
    support::named(graph, exe.run(inputs).unwrap())
}

/// Runs `attention-fusion,dce` on `model`, checks that it fused exactly `fused`
/// chains and that the interpreter agrees before and after (bit for bit when
/// nothing was fused); returns the optimized model.
fn check_fusion(model: &Model, weights: &Weights, sizes: &[(&str, i64)], fused: usize) -> Model {
    let (after, cx) = model.apply_passes(&fusion_then_dce()).unwrap();
    let (g0, g1) = (&model.module().funcs[0], &after.module().funcs[0]);
    assert_eq!(
        count_ops(g1, "attention") - count_ops(g0, "attention"),
        fused,
        "{}:\n{}",
        model.origin(),
        after.to_text()
    );
    let notes = if fused == 0 {
        vec![]
    } else {
        vec![format!("fused {fused} attention patterns")]
    };
    assert_eq!(cx.log[0].notes, notes, "{}", model.origin());
    for seed in [1, 2, 3] {
        // Integer inputs are 0/1 masks, about a quarter zeros.
        let inputs = support::seeded_inputs(g0, sizes, |u| i64::from(u >= 0.25), seed);
        let before = run_graph(g0, weights, &inputs);
        let rel = max_relative_error(&before, &run_graph(g1, weights, &inputs));
        let tol = if fused == 0 { 0.0 } else { 1e-5 };
        assert!(rel <= tol, "{}: relative error {rel:.3e}", model.origin());
    }
    after
}

/// Causal self-attention over `[B, h, T, dh]` inputs, with the scores,
/// softmax and fill lines given by the caller.
fn self_attention(softmax_axis: i64, fill: &str, extra_output: bool) -> String {
    let (sig, ret) = if extra_output {
        (", scores: f32[B, h, T, T]", ", %scores")
    } else {
        ("", "")
    };
    format!(
        "func @attn(%q: f32[B, h, T, dh], %k: f32[B, h, T, dh], %v: f32[B, h, T, dh]) -> (out: f32[B, h, T, dh]{sig})
    where h = 2, dh = 4 {{
  %scores = matmul(%q, %k) transpose_b=true : f32[B, h, T, T]
  %scale = constant() value=0.5 dtype=f32 shape=[] : f32[]
  %scaled = mul(%scores, %scale) : f32[B, h, T, T]
  %causal = causal_mask() queries=T keys=T : bool[T, T]
  %fill = constant() value={fill} dtype=f32 shape=[] : f32[]
  %masked = where(%causal, %scaled, %fill) : f32[B, h, T, T]
  %probs = softmax(%masked) axis={softmax_axis} : f32[B, h, T, T]
  %out = matmul(%probs, %v) : f32[B, h, T, dh]
  return %out{ret}
}}"
    )
}

const SELF_SIZES: [(&str, i64); 2] = [("B", 2), ("T", 5)];

#[test]
fn plain_causal_self_attention_from_text_is_fused() {
    let model = Model::from_text(&self_attention(-1, "-inf", false), "causal").unwrap();
    let after = check_fusion(&model, &Weights::new(), &SELF_SIZES, 1);
    insta::assert_snapshot!(after.to_text(), @r"
    func @attn(%q: f32[B, h, T, dh], %k: f32[B, h, T, dh], %v: f32[B, h, T, dh]) -> (out: f32[B, h, T, dh])
        where h = 2, dh = 4 {
      %out = attention(%q, %k, %v) causal=true scale=0.5 : f32[B, h, T, dh]
      return %out
    }
    ");
}

#[test]
fn softmax_on_a_non_last_axis_is_not_fused() {
    let model = Model::from_text(&self_attention(2, "-inf", false), "axis").unwrap();
    check_fusion(&model, &Weights::new(), &SELF_SIZES, 0);
}

#[test]
fn scores_with_a_second_user_are_not_fused() {
    let model = Model::from_text(&self_attention(-1, "-inf", true), "scores").unwrap();
    let after = check_fusion(&model, &Weights::new(), &SELF_SIZES, 0);
    assert_eq!(after.to_text(), model.to_text());
}

#[test]
fn where_filling_zero_is_not_fused() {
    let model = Model::from_text(&self_attention(-1, "0.0", false), "zero fill").unwrap();
    check_fusion(&model, &Weights::new(), &SELF_SIZES, 0);
}

#[test]
fn finite_fill_is_fused_only_where_no_row_is_fully_masked() {
    // f32::MIN under the T x T causal mask: every query sees its own key.
    let min = "-3.4028234663852886e38";
    let model = Model::from_text(&self_attention(-1, min, false), "f32 min").unwrap();
    check_fusion(&model, &Weights::new(), &SELF_SIZES, 1);
    // Under a padding mask a row can be fully masked: uniform with a finite
    // fill, zeros in `attention`, so the chain stays.
    let padded = "func @attn(%q: f32[B, h, T, dh], %k: f32[B, h, T, dh], %v: f32[B, h, T, dh], %m: i64[B, T]) -> (out: f32[B, h, T, dh])
    where h = 2, dh = 4 {
  %scores = matmul(%q, %k) transpose_b=true : f32[B, h, T, T]
  %pad = padding_mask(%m) : bool[B, 1, 1, T]
  %fill = constant() value=-1e30 dtype=f32 shape=[] : f32[]
  %masked = where(%pad, %scores, %fill) : f32[B, h, T, T]
  %probs = softmax(%masked) axis=-1 : f32[B, h, T, T]
  %out = matmul(%probs, %v) : f32[B, h, T, dh]
  return %out
}";
    let model = Model::from_text(padded, "finite fill, padding").unwrap();
    check_fusion(&model, &Weights::new(), &SELF_SIZES, 0);
}

#[test]
fn gqa_with_causal_and_padding_mask_and_scales_on_q_is_fused() {
    // The repeat of k and v, the scale split between q (div) and the scores
    // (constant on the left), causal and padding masks combined with `and`.
    let src = "func @gqa(%q: f32[B, h, T, dh], %k: f32[B, hk, T, dh], %v: f32[B, hk, T, dh], %m: i64[B, T]) -> (out: f32[B, h, T, dh])
    where h = 4, hk = 2, rep = h / hk, dh = 4 {
  %two = constant() value=2.0 dtype=f32 shape=[] : f32[]
  %q_half = div(%q, %two) : f32[B, h, T, dh]
  %k5 = reshape(%k) shape=[B, hk, 1, T, dh] : f32[B, hk, 1, T, dh]
  %k_rep = expand(%k5) shape=[B, hk, rep, T, dh] : f32[B, hk, rep, T, dh]
  %k_full = reshape(%k_rep) shape=[B, hk * rep, T, dh] : f32[B, hk * rep, T, dh]
  %v5 = reshape(%v) shape=[B, hk, 1, T, dh] : f32[B, hk, 1, T, dh]
  %v_rep = expand(%v5) shape=[B, hk, rep, T, dh] : f32[B, hk, rep, T, dh]
  %v_full = reshape(%v_rep) shape=[B, hk * rep, T, dh] : f32[B, hk * rep, T, dh]
  %scores = matmul(%q_half, %k_full) transpose_b=true : f32[B, h, T, T]
  %quarter = constant() value=0.25 dtype=f32 shape=[] : f32[]
  %scaled = mul(%quarter, %scores) : f32[B, h, T, T]
  %causal = causal_mask() queries=T keys=T : bool[T, T]
  %pad = padding_mask(%m) : bool[B, 1, 1, T]
  %visible = and(%causal, %pad) : bool[B, 1, T, T]
  %neg_inf = constant() value=-inf dtype=f32 shape=[] : f32[]
  %masked = where(%visible, %scaled, %neg_inf) : f32[B, h, T, T]
  %probs = softmax(%masked) axis=-1 : f32[B, h, T, T]
  %ctx = matmul(%probs, %v_full) : f32[B, h, T, dh]
  return %ctx
}";
    let model = Model::from_text(src, "gqa").unwrap();
    let after = check_fusion(&model, &Weights::new(), &SELF_SIZES, 1);
    insta::assert_snapshot!(after.to_text(), @r"
    func @gqa(%q: f32[B, h, T, dh], %k: f32[B, hk, T, dh], %v: f32[B, hk, T, dh], %m: i64[B, T]) -> (out: f32[B, h, T, dh])
        where h = 4, hk = 2, rep = h / hk, dh = 4 {
      %pad = padding_mask(%m) : bool[B, 1, 1, T]
      %ctx = attention(%q, %k, %v, %pad) causal=true scale=0.125 : f32[B, h, T, dh]
      return %ctx
    }
    ");
}

#[test]
fn cross_attention_of_the_encoder_decoder_example_is_fused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/encoder_decoder_block.kir");
    let model = Model::load(&path).unwrap();
    let weights = kiln::frontends::gpt2::random_weights(&model.module().funcs[0], 7).unwrap();
    let sizes = [("B", 2), ("T", 3), ("S", 6)];
    let after = check_fusion(&model, &weights, &sizes, 1);
    let graph = &after.module().funcs[0];
    assert_eq!(count_ops(graph, "attention"), 2);
    assert_eq!(count_ops(graph, "softmax"), 0);
    let text = after.to_text();
    assert!(
        text.contains(
            "%ca_context = attention(%ca_q_heads, %ca_k_heads, %ca_v_heads, %encoder_mask) scale=0.125 : f32[B, h, T, dh]"
        ),
        "{text}"
    );
}

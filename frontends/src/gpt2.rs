//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LN blocks, fused `c_attn`
//! stored `[in, out]` (`Conv1D`), tanh-GELU MLP, LM head tied to `wte`.
//!
//! The graph is the decomposed form a frontend emits (matmuls, softmax, masks);
//! fusing it into `attention` ops is the passes' job.

use kiln_ir::{
    BinaryOp, DType, Dim, Graph, GraphBuilder, IrError, Op, TensorType, UnaryOp, ValueId,
};

use serde_json::json;

use crate::blocks::activation;
use crate::config::HfConfig;
use crate::FrontendError;

/// The fields of a GPT-2 `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `n_positions`: the longest sequence the position table covers.
    pub n_positions: i64,
    /// `n_embd`: model width.
    pub n_embd: i64,
    /// `n_layer`.
    pub n_layer: usize,
    /// `n_head`.
    pub n_head: i64,
    /// `n_inner`: MLP width (`4 * n_embd` when absent).
    pub n_inner: Option<i64>,
    /// `layer_norm_epsilon`.
    pub layer_norm_epsilon: f64,
    /// `activation_function` of the MLP.
    pub activation: UnaryOp,
}

impl Gpt2Config {
    /// The built-in demo model: GPT-2 layout, small enough to run on the interpreter.
    pub fn demo() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 512,
            n_positions: 1024,
            n_embd: 128,
            n_layer: 2,
            n_head: 4,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation: UnaryOp::GeluTanh,
        }
    }

    /// Reads the fields from `config.json`, rejecting semantics kiln lacks.
    pub fn from_hf(c: &HfConfig) -> Result<Gpt2Config, FrontendError> {
        c.require(
            "scale_attn_weights",
            &json!(true),
            "unscaled attention scores",
        )?;
        c.require(
            "scale_attn_by_inverse_layer_idx",
            &json!(false),
            "per-layer score scaling",
        )?;
        c.require(
            "add_cross_attention",
            &json!(false),
            "cross-attention layers",
        )?;
        let act = c.string_or("activation_function", "gelu_new")?;
        let activation = activation(&act).ok_or_else(|| {
            c.unsupported(
                "activation_function",
                &format!("= {act:?} is not a supported activation"),
            )
        })?;
        if !c.bool_or("tie_word_embeddings", true)? {
            return Err(c.unsupported(
                "tie_word_embeddings",
                "is false; GPT2LMHeadModel ties its head to wte",
            ));
        }
        Ok(Gpt2Config {
            vocab_size: c.int("vocab_size")?,
            n_positions: c.int("n_positions")?,
            n_embd: c.int("n_embd")?,
            n_layer: c.layers("n_layer")?,
            n_head: c.int("n_head")?,
            n_inner: c.opt_int("n_inner")?,
            layer_norm_epsilon: c.non_negative_or("layer_norm_epsilon", 1e-5)?,
            activation,
        })
    }
}

fn f32_ty(dims: &[&str]) -> TensorType {
    TensorType::new(DType::F32, dims.iter().map(|d| Dim::sym(d)).collect())
}

fn s(name: &str) -> Dim {
    Dim::sym(name)
}

/// `k * name` as a dim.
fn times(k: i64, name: &str) -> Result<Dim, IrError> {
    Dim::constant(k)
        .mul(&Dim::sym(name))
        .map_err(|e| IrError::Build(format!("{k} * {name}: {e}")))
}

/// Builds the GPT-2 graph `@gpt2(%tokens: i64[B, T]) -> (logits: f32[B, T, V])`.
pub fn build_gpt2(cfg: &Gpt2Config) -> Result<Graph, FrontendError> {
    if cfg.n_layer == 0 {
        return Err(FrontendError::Config("n_layer must be at least 1".into()));
    }
    let mut b = GraphBuilder::new("gpt2");
    b.bind("V", cfg.vocab_size)?;
    b.bind("P", cfg.n_positions)?;
    b.bind("d", cfg.n_embd)?;
    b.bind("h", cfg.n_head)?;
    b.bind(
        "dh",
        s("d")
            .div(&s("h"))
            .map_err(|e| FrontendError::Config(format!("n_embd / n_head: {e}")))?,
    )?;
    match cfg.n_inner {
        Some(f) => b.bind("f", f)?,
        None => b.bind("f", times(4, "d")?)?,
    };
    let tokens = b.input("tokens", TensorType::new(DType::I64, vec![s("B"), s("T")]));
    let wte = b.param("transformer.wte.weight", f32_ty(&["V", "d"]));
    let wpe = b.param("transformer.wpe.weight", f32_ty(&["P", "d"]));
    let tok_emb = b.named("tok_emb", Op::Gather, &[wte, tokens])?;
    let pos = crate::blocks::positions(&mut b, "positions", 0, "T")?;
    let pos_emb = b.named("pos_emb", Op::Gather, &[wpe, pos])?;
    let mut x = b.named("embed", Op::Binary(BinaryOp::Add), &[tok_emb, pos_emb])?;
    let mask = b.named(
        "causal",
        Op::CausalMask {
            queries: s("T"),
            keys: s("T"),
        },
        &[],
    )?;
    let scale = crate::blocks::attention_scale(&mut b, "attn_scale", "dh")?;
    let neg_inf = crate::blocks::scalar(&mut b, "neg_inf", f64::NEG_INFINITY)?;
    for i in 0..cfg.n_layer {
        x = block(&mut b, cfg, i, x, mask, scale, neg_inf)?;
    }
    let lnf_w = b.param("transformer.ln_f.weight", f32_ty(&["d"]));
    let lnf_b = b.param("transformer.ln_f.bias", f32_ty(&["d"]));
    let eps = cfg.layer_norm_epsilon;
    let hf = b.named("ln_f", Op::LayerNorm { eps }, &[x, lnf_w, lnf_b])?;
    let logits = b.named(
        "logits",
        Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        },
        &[hf, wte],
    )?;
    Ok(b.finish(&[("logits", logits)])?)
}

/// `x @ w + bias` for a `Conv1D` weight `[in, out]`; the sum is named `name`.
fn linear(
    b: &mut GraphBuilder,
    x: ValueId,
    w: ValueId,
    bias: ValueId,
    name: &str,
) -> Result<ValueId, IrError> {
    let y = b.matmul(x, w)?;
    b.named(name, Op::Binary(BinaryOp::Add), &[y, bias])
}

fn heads(b: &mut GraphBuilder, x: ValueId) -> Result<ValueId, IrError> {
    let r = b.reshape(x, vec![s("B"), s("T"), s("h"), s("dh")])?;
    b.permute(r, &[0, 2, 1, 3])
}

fn block(
    b: &mut GraphBuilder,
    cfg: &Gpt2Config,
    i: usize,
    x: ValueId,
    mask: ValueId,
    scale: ValueId,
    neg_inf: ValueId,
) -> Result<ValueId, IrError> {
    let p = |n: &str| format!("transformer.h.{i}.{n}");
    let eps = cfg.layer_norm_epsilon;
    let ln1_w = b.param(&p("ln_1.weight"), f32_ty(&["d"]));
    let ln1_b = b.param(&p("ln_1.bias"), f32_ty(&["d"]));
    let attn_w = b.param(
        &p("attn.c_attn.weight"),
        TensorType::new(DType::F32, vec![s("d"), times(3, "d")?]),
    );
    let attn_b = b.param(
        &p("attn.c_attn.bias"),
        TensorType::new(DType::F32, vec![times(3, "d")?]),
    );
    let proj_w = b.param(&p("attn.c_proj.weight"), f32_ty(&["d", "d"]));
    let proj_b = b.param(&p("attn.c_proj.bias"), f32_ty(&["d"]));
    let ln2_w = b.param(&p("ln_2.weight"), f32_ty(&["d"]));
    let ln2_b = b.param(&p("ln_2.bias"), f32_ty(&["d"]));
    let fc_w = b.param(&p("mlp.c_fc.weight"), f32_ty(&["d", "f"]));
    let fc_b = b.param(&p("mlp.c_fc.bias"), f32_ty(&["f"]));
    let mp_w = b.param(&p("mlp.c_proj.weight"), f32_ty(&["f", "d"]));
    let mp_b = b.param(&p("mlp.c_proj.bias"), f32_ty(&["d"]));

    let n = |v: &str| format!("h{i}.{v}");
    let h1 = b.named(&n("ln_1"), Op::LayerNorm { eps }, &[x, ln1_w, ln1_b])?;
    let qkv = linear(b, h1, attn_w, attn_b, &n("qkv"))?;
    let d = s("d");
    let two_d = times(2, "d")?;
    let three_d = times(3, "d")?;
    let slice = |start: Dim, end: Dim| Op::Slice {
        axis: -1,
        start,
        end,
    };
    let q = b.named(&n("q"), slice(Dim::constant(0), d.clone()), &[qkv])?;
    let k = b.named(&n("k"), slice(d.clone(), two_d.clone()), &[qkv])?;
    let v = b.named(&n("v"), slice(two_d, three_d), &[qkv])?;
    let (q, k, v) = (heads(b, q)?, heads(b, k)?, heads(b, v)?);
    let scores = b.named(
        &n("scores"),
        Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        },
        &[q, k],
    )?;
    let scores = b.named(&n("scaled"), Op::Binary(BinaryOp::Mul), &[scores, scale])?;
    let scores = b.named(&n("masked"), Op::Where, &[mask, scores, neg_inf])?;
    let probs = b.named(&n("probs"), Op::Softmax { axis: -1 }, &[scores])?;
    let ctx = b.named(
        &n("ctx"),
        Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        },
        &[probs, v],
    )?;
    let ctx = b.permute(ctx, &[0, 2, 1, 3])?;
    let ctx = b.reshape(ctx, vec![s("B"), s("T"), s("d")])?;
    let attn = linear(b, ctx, proj_w, proj_b, &n("attn"))?;
    let x = b.named(&n("resid_attn"), Op::Binary(BinaryOp::Add), &[x, attn])?;

    let h2 = b.named(&n("ln_2"), Op::LayerNorm { eps }, &[x, ln2_w, ln2_b])?;
    let up = linear(b, h2, fc_w, fc_b, &n("fc"))?;
    let act = b.named(&n("gelu"), Op::Unary(cfg.activation), &[up])?;
    let down = linear(b, act, mp_w, mp_b, &n("mlp"))?;
    b.named(&n("out"), Op::Binary(BinaryOp::Add), &[x, down])
}

/// Seeded random weights for every parameter of `graph` (the demo model has no
/// checkpoint): norms get weight 1 and bias 0, other tensors draw from
/// `U(-0.08, 0.08)` (std ≈ 0.046) with a xorshift generator seeded by `seed`.
pub fn random_weights(
    graph: &Graph,
    seed: u64,
) -> Result<std::collections::BTreeMap<String, kiln_ir::Tensor>, FrontendError> {
    let cx = kiln_ir::verify(graph).map_err(|e| FrontendError::Ir(e.into()))?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64) as f32
    };
    let mut out = std::collections::BTreeMap::new();
    for &p in graph.params() {
        let kiln_ir::NodeKind::Param { name } = &graph.node(p).kind else {
            continue;
        };
        let mut shape = Vec::new();
        for d in &graph.ty(p).shape {
            let v = cx
                .eval(d)
                .ok()
                .and_then(|v| v.as_const())
                .filter(|v| *v >= 0);
            let v = v.ok_or_else(|| {
                FrontendError::Config(format!(
                    "parameter {name} has a size that is not a known constant"
                ))
            })?;
            shape.push(v as usize);
        }
        let n: usize = shape.iter().product();
        let is_norm = name.contains("ln_") || name.contains("norm") || name.contains("LayerNorm");
        let values: Vec<f32> = if is_norm && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (next() - 0.5) * 0.16).collect()
        };
        let t = kiln_ir::Tensor::f32(shape, values)
            .map_err(|e| FrontendError::Config(format!("{name}: {e}")))?;
        out.insert(name.clone(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_model_verifies_and_round_trips() {
        let g = build_gpt2(&Gpt2Config::demo()).unwrap();
        let text = kiln_ir::print_graph(&g);
        let back = kiln_ir::parse_graph(&text).unwrap();
        assert_eq!(g, back);
        kiln_ir::verify(&back).unwrap();
        assert_eq!(g.params().len(), 4 + 12 * 2);
    }

    #[test]
    fn heads_that_do_not_divide_the_width_are_a_contract_violation() {
        let cfg = Gpt2Config {
            n_embd: 130,
            ..Gpt2Config::demo()
        };
        let err = build_gpt2(&cfg).unwrap_err().to_string();
        assert!(err.contains("130 is not divisible by 4"), "{err}");
    }
}

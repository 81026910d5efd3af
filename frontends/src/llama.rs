//! LLaMA (`LlamaForCausalLM`): RMSNorm, rotary positions (rotate-half, `rope_theta`),
//! SwiGLU MLP, grouped-query attention (`num_key_value_heads`), `nn.Linear`
//! weights `[out, in]` without biases, LM head tied or separate.
//!
//! Mixtral (`MixtralForCausalLM`) is the same decoder with a sparse mixture of
//! SwiGLU experts in place of the MLP: one `moe` op per layer over the experts'
//! weights stacked `[E, f, d]` (the checkpoint stores them one expert at a
//! time; [`expert_stacks`] says which tensors make each stack).

use kiln_ir::{BinaryOp, DType, Graph, GraphBuilder, Op, TensorType, UnaryOp, WeightLayout};
use serde_json::json;

use crate::blocks::{
    attention, attention_scale, f32_of, f32_syms, linear, merge_heads, positions, repeat_kv,
    scalar, split_heads, sym,
};
use crate::config::HfConfig;
use crate::FrontendError;

/// The fields of a LLaMA `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `hidden_size`.
    pub hidden_size: i64,
    /// `intermediate_size`.
    pub intermediate_size: i64,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: i64,
    /// `num_key_value_heads` (defaults to the query heads).
    pub num_key_value_heads: i64,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: Option<i64>,
    /// `max_position_embeddings`.
    pub max_position_embeddings: i64,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` (or `rope_parameters.rope_theta`).
    pub rope_theta: f64,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// Mixtral's experts, `None` for a dense MLP.
    pub moe: Option<MoeConfig>,
}

/// A sparse mixture of experts (Mixtral).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// `num_local_experts`.
    pub experts: i64,
    /// `num_experts_per_tok`.
    pub top_k: i64,
}

/// Which checkpoint tensors make each stacked expert parameter of a Mixtral
/// graph: `model.layers.L.block_sparse_moe.experts.w1` is `experts.0.w1.weight`,
/// `experts.1.w1.weight`, … stacked along a new first axis.
pub fn expert_stacks(cfg: &LlamaConfig) -> Vec<(String, Vec<String>)> {
    let Some(moe) = cfg.moe else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        for w in ["w1", "w3", "w2"] {
            let p = format!("model.layers.{i}.block_sparse_moe.experts");
            let parts = (0..moe.experts)
                .map(|e| format!("{p}.{e}.{w}.weight"))
                .collect();
            out.push((format!("{p}.{w}"), parts));
        }
    }
    out
}

impl LlamaConfig {
    /// Reads the fields from `config.json`, rejecting semantics kiln lacks.
    pub fn from_hf(c: &HfConfig) -> Result<LlamaConfig, FrontendError> {
        c.require("hidden_act", &json!("silu"), "the SwiGLU gate activation")?;
        c.require("attention_bias", &json!(false), "q/k/v/o projection biases")?;
        c.require("mlp_bias", &json!(false), "MLP biases")?;
        c.require(
            "pretraining_tp",
            &json!(1),
            "tensor-parallel slicing of the projections",
        )?;
        if c.get("rope_scaling").is_some() {
            return Err(c.unsupported(
                "rope_scaling",
                "is set; only unscaled rotary embeddings are supported",
            ));
        }
        let mut rope_theta = c.float_or("rope_theta", 10000.0)?;
        if let Some(p) = c.get("rope_parameters") {
            let kind = p
                .get("rope_type")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(c.unsupported(
                    "rope_parameters",
                    &format!("has rope_type {kind:?}; only \"default\" is supported"),
                ));
            }
            if let Some(t) = p.get("rope_theta") {
                rope_theta = t.as_f64().ok_or_else(|| {
                    c.unsupported("rope_parameters", "has a non-numeric rope_theta")
                })?;
            }
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(FrontendError::Config(format!(
                "rope_theta must be a positive number, got {rope_theta}"
            )));
        }
        let heads = c.int("num_attention_heads")?;
        Ok(LlamaConfig {
            vocab_size: c.int("vocab_size")?,
            hidden_size: c.int("hidden_size")?,
            intermediate_size: c.int("intermediate_size")?,
            num_hidden_layers: c.layers("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: c.opt_int("num_key_value_heads")?.unwrap_or(heads),
            head_dim: c.opt_int("head_dim")?,
            max_position_embeddings: c.int("max_position_embeddings")?,
            rms_norm_eps: c.non_negative_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            moe: None,
        })
    }

    /// Reads a Mixtral `config.json`: LLaMA's fields plus the experts.
    pub fn from_mixtral(c: &HfConfig) -> Result<LlamaConfig, FrontendError> {
        let mut cfg = LlamaConfig::from_hf(c)?;
        if let Some(w) = c.opt_int("sliding_window")? {
            if w < cfg.max_position_embeddings {
                return Err(c.unsupported(
                    "sliding_window",
                    &format!(
                        "= {w} is shorter than max_position_embeddings = {}; sliding-window attention is not supported",
                        cfg.max_position_embeddings
                    ),
                ));
            }
        }
        let experts_key = if c.get("num_local_experts").is_some() {
            "num_local_experts"
        } else {
            "num_experts"
        };
        let experts = c.int(experts_key)?;
        let top_k = c.int("num_experts_per_tok")?;
        if top_k > experts {
            return Err(FrontendError::ConfigContract(format!(
                "{}: num_experts_per_tok = {top_k} chooses more experts than {experts_key} = {experts}",
                c.path().display()
            )));
        }
        cfg.moe = Some(MoeConfig { experts, top_k });
        Ok(cfg)
    }
}

/// Builds `@llama(%tokens: i64[B, T]) -> (logits: f32[B, T, V])`.
pub fn build_llama(cfg: &LlamaConfig) -> Result<Graph, FrontendError> {
    let mut b = GraphBuilder::new(if cfg.moe.is_some() {
        "mixtral"
    } else {
        "llama"
    });
    b.bind("V", cfg.vocab_size)?;
    b.bind("d", cfg.hidden_size)?;
    b.bind("f", cfg.intermediate_size)?;
    b.bind("h", cfg.num_attention_heads)?;
    b.bind("hk", cfg.num_key_value_heads)?;
    if let Some(moe) = cfg.moe {
        b.bind("E", moe.experts)?;
    }
    match cfg.head_dim {
        Some(dh) => b.bind("dh", dh)?,
        None => b.bind(
            "dh",
            sym("d")
                .div(&sym("h"))
                .map_err(|e| FrontendError::Config(e.to_string()))?,
        )?,
    };
    b.bind(
        "rep",
        sym("h")
            .div(&sym("hk"))
            .map_err(|e| FrontendError::Config(e.to_string()))?,
    )?;
    let q_width = sym("h")
        .mul(&sym("dh"))
        .map_err(|e| FrontendError::Config(e.to_string()))?;
    let kv_width = sym("hk")
        .mul(&sym("dh"))
        .map_err(|e| FrontendError::Config(e.to_string()))?;

    let tokens = b.input(
        "tokens",
        TensorType::new(DType::I64, vec![sym("B"), sym("T")]),
    );
    let embed = b.param("model.embed_tokens.weight", f32_syms(&["V", "d"]));
    let mut x = b.named("embed", Op::Gather, &[embed, tokens])?;
    let pos = positions(&mut b, "positions", 0, "T")?;
    let mask = b.named(
        "causal",
        Op::CausalMask {
            queries: sym("T"),
            keys: sym("T"),
        },
        &[],
    )?;
    let scale = attention_scale(&mut b, "attn_scale", "dh")?;
    let neg_inf = scalar(&mut b, "neg_inf", f64::NEG_INFINITY)?;
    let eps = cfg.rms_norm_eps;
    let theta = cfg.rope_theta;
    let out_in = WeightLayout::OutIn;
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let n = |v: &str| format!("l{i}.{v}");
        let ln1 = b.param(&p("input_layernorm.weight"), f32_syms(&["d"]));
        let wq = b.param(
            &p("self_attn.q_proj.weight"),
            f32_of(vec![q_width.clone(), sym("d")]),
        );
        let wk = b.param(
            &p("self_attn.k_proj.weight"),
            f32_of(vec![kv_width.clone(), sym("d")]),
        );
        let wv = b.param(
            &p("self_attn.v_proj.weight"),
            f32_of(vec![kv_width.clone(), sym("d")]),
        );
        let wo = b.param(
            &p("self_attn.o_proj.weight"),
            f32_of(vec![sym("d"), q_width.clone()]),
        );
        let ln2 = b.param(&p("post_attention_layernorm.weight"), f32_syms(&["d"]));

        let hn = b.named(&n("input_norm"), Op::RmsNorm { eps }, &[x, ln1])?;
        let q = linear(&mut b, hn, wq, None, out_in, &n("q"))?;
        let k = linear(&mut b, hn, wk, None, out_in, &n("k"))?;
        let v = linear(&mut b, hn, wv, None, out_in, &n("v"))?;
        let q = split_heads(&mut b, q, "T", "h", "dh")?;
        let k = split_heads(&mut b, k, "T", "hk", "dh")?;
        let v = split_heads(&mut b, v, "T", "hk", "dh")?;
        let q = b.named(&n("q_rope"), Op::Rope { theta }, &[q, pos])?;
        let k = b.named(&n("k_rope"), Op::Rope { theta }, &[k, pos])?;
        let (k, v) = if cfg.num_key_value_heads != cfg.num_attention_heads {
            (
                repeat_kv(&mut b, k, "hk", "rep", "T", "dh")?,
                repeat_kv(&mut b, v, "hk", "rep", "T", "dh")?,
            )
        } else {
            (k, v)
        };
        let ctx = attention(&mut b, &n("attn"), q, k, v, Some(mask), scale, neg_inf)?;
        let ctx = merge_heads(&mut b, ctx, "T", q_width.clone())?;
        let o = linear(&mut b, ctx, wo, None, out_in, &n("o"))?;
        x = b.named(&n("resid_attn"), Op::Binary(BinaryOp::Add), &[x, o])?;

        let hn = b.named(&n("post_norm"), Op::RmsNorm { eps }, &[x, ln2])?;
        if let Some(moe) = cfg.moe {
            let e = |b: &mut GraphBuilder, w: &str, dims: &[&str]| {
                b.param(&p(&format!("block_sparse_moe.experts.{w}")), f32_syms(dims))
            };
            let router = b.param(&p("block_sparse_moe.gate.weight"), f32_syms(&["E", "d"]));
            let w1 = e(&mut b, "w1", &["E", "f", "d"]);
            let w3 = e(&mut b, "w3", &["E", "f", "d"]);
            let w2 = e(&mut b, "w2", &["E", "d", "f"]);
            let top_k = moe.top_k as usize;
            let y = b.named(&n("moe"), Op::Moe { top_k }, &[hn, router, w1, w3, w2])?;
            x = b.named(&n("out"), Op::Binary(BinaryOp::Add), &[x, y])?;
            continue;
        }
        let wg = b.param(&p("mlp.gate_proj.weight"), f32_syms(&["f", "d"]));
        let wu = b.param(&p("mlp.up_proj.weight"), f32_syms(&["f", "d"]));
        let wd = b.param(&p("mlp.down_proj.weight"), f32_syms(&["d", "f"]));
        let g = linear(&mut b, hn, wg, None, out_in, &n("gate"))?;
        let u = linear(&mut b, hn, wu, None, out_in, &n("up"))?;
        let g = b.named(&n("silu"), Op::Unary(UnaryOp::Silu), &[g])?;
        let gu = b.named(&n("swiglu"), Op::Binary(BinaryOp::Mul), &[g, u])?;
        let down = linear(&mut b, gu, wd, None, out_in, &n("down"))?;
        x = b.named(&n("out"), Op::Binary(BinaryOp::Add), &[x, down])?;
    }
    let norm = b.param("model.norm.weight", f32_syms(&["d"]));
    let x = b.named("norm", Op::RmsNorm { eps }, &[x, norm])?;
    let head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.param("lm_head.weight", f32_syms(&["V", "d"]))
    };
    let logits = linear(&mut b, x, head, None, out_in, "logits")?;
    Ok(b.finish(&[("logits", logits)])?)
}

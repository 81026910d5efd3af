//! BLOOM (`BloomForCausalLM`): ALiBi instead of position embeddings (a
//! per-head linear bias on the attention scores), a layer norm on the word
//! embeddings, pre-LN blocks with a fused `query_key_value` projection laid
//! out per head (`[h, 3, dh]` along its outputs), a tanh-GELU MLP of width
//! `4·d`, and an LM head tied to the word embeddings.
//!
//! The attention is emitted decomposed, the ALiBi bias as
//! `reshape(@alibi_slopes, [h, 1, 1]) · cast(arange(0, T))` added to the
//! scaled scores; attention fusion turns the chain into
//! `attention(q, k, v, @alibi_slopes) alibi=true causal=true`. The slopes are
//! not in the checkpoint: [`alibi_slopes`] computes them from the head count,
//! as BLOOM does.

use std::collections::BTreeMap;

use kiln_ir::{
    BinaryOp, DType, Dim, Graph, GraphBuilder, Op, Tensor, TensorType, UnaryOp, WeightLayout,
};

use crate::blocks::{attention_scale, f32_of, f32_syms, linear, merge_heads, scalar, sym, times};
use crate::config::HfConfig;
use crate::FrontendError;

/// The name of the computed slopes parameter.
pub const SLOPES: &str = "alibi_slopes";

/// The fields of a BLOOM `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct BloomConfig {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `hidden_size` (`n_embed` in older files).
    pub hidden_size: i64,
    /// `n_layer` (`num_hidden_layers`).
    pub n_layer: usize,
    /// `n_head` (`num_attention_heads`).
    pub n_head: i64,
    /// `layer_norm_epsilon`.
    pub layer_norm_epsilon: f64,
    /// `apply_residual_connection_post_layernorm`: the residual branch starts
    /// after the layer norm instead of before it.
    pub residual_post_layernorm: bool,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
}

/// The first key of `keys` present in `c` (older BLOOM files use other names).
fn first_key<'a>(c: &HfConfig, keys: &[&'a str]) -> &'a str {
    keys.iter()
        .copied()
        .find(|k| c.get(k).is_some())
        .unwrap_or(keys[0])
}

impl BloomConfig {
    /// Reads the fields from `config.json`.
    pub fn from_hf(c: &HfConfig) -> Result<BloomConfig, FrontendError> {
        let n_layer = first_key(c, &["n_layer", "num_hidden_layers"]);
        let n_head = first_key(c, &["n_head", "num_attention_heads"]);
        let hidden = first_key(c, &["hidden_size", "n_embed"]);
        Ok(BloomConfig {
            vocab_size: c.int("vocab_size")?,
            hidden_size: c.int(hidden)?,
            n_layer: c.layers(n_layer)?,
            n_head: c.int(n_head)?,
            layer_norm_epsilon: c.non_negative_or("layer_norm_epsilon", 1e-5)?,
            residual_post_layernorm: c
                .bool_or("apply_residual_connection_post_layernorm", false)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
        })
    }

    /// The config keys each graph symbol comes from (for contract messages).
    pub fn keys(c: &HfConfig) -> Vec<(&'static str, &'static str)> {
        vec![
            ("V", "vocab_size"),
            ("d", first_key(c, &["hidden_size", "n_embed"])),
            ("h", first_key(c, &["n_head", "num_attention_heads"])),
        ]
    }
}

/// ALiBi slopes for `heads` heads, as BLOOM (and the ALiBi paper) define
/// them: with `n` the largest power of two `<= heads`, head `i < n` gets
/// `2^(-8(i+1)/n)`; the remaining heads take every other slope of the
/// sequence for `2n` heads (`2^(-4(2j+1)/n)`, `j = 0, 1, …`).
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    if heads == 0 {
        return Vec::new();
    }
    let n = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    // As BLOOM does: the base 2^(-8/n) rounded to f32, raised to k
    // (`torch.pow` on f32; here in f64 and rounded once, the same to 1 ulp
    // whatever the build, where a chain of f32 products is not).
    let base = 2f32.powf(-(2f32.powf(-((n as f32).log2() - 3.0))));
    let pow = |b: f32, k: usize| (b as f64).powi(k as i32) as f32;
    let mut out: Vec<f32> = (1..=n).map(|k| pow(base, k)).collect();
    if n != heads {
        let extra = 2f32.powf(-(2f32.powf(-((2.0 * n as f32).log2() - 3.0))));
        let remaining = n.min(heads - n);
        out.extend((0..remaining).map(|j| pow(extra, 2 * j + 1)));
    }
    out
}

/// The weights BLOOM computes instead of reading: the ALiBi slopes.
pub fn computed_weights(cfg: &BloomConfig) -> Result<BTreeMap<String, Tensor>, FrontendError> {
    let h = cfg.n_head as usize;
    let t =
        Tensor::f32(vec![h], alibi_slopes(h)).map_err(|e| FrontendError::Config(e.to_string()))?;
    Ok(BTreeMap::from([(SLOPES.to_string(), t)]))
}

/// Builds `@bloom(%tokens: i64[B, T]) -> (logits: f32[B, T, V])`. Parameter
/// names are those of `BloomModel` (`word_embeddings.weight`, `h.0.…`); a
/// `BloomForCausalLM` file prefixes them with `transformer.`.
pub fn build_bloom(cfg: &BloomConfig) -> Result<Graph, FrontendError> {
    let mut b = GraphBuilder::new("bloom");
    let cerr = |e: kiln_ir::DimError| FrontendError::Config(e.to_string());
    b.bind("V", cfg.vocab_size)?;
    b.bind("d", cfg.hidden_size)?;
    b.bind("h", cfg.n_head)?;
    b.bind("dh", sym("d").div(&sym("h")).map_err(cerr)?)?;
    b.bind("f", times(4, "d")?)?;
    let eps = cfg.layer_norm_epsilon;
    let tokens = b.input(
        "tokens",
        TensorType::new(DType::I64, vec![sym("B"), sym("T")]),
    );
    let wte = b.param("word_embeddings.weight", f32_syms(&["V", "d"]));
    let ln_w = b.param("word_embeddings_layernorm.weight", f32_syms(&["d"]));
    let ln_b = b.param("word_embeddings_layernorm.bias", f32_syms(&["d"]));
    let slopes = b.param(SLOPES, f32_syms(&["h"]));
    let emb = b.named("tok_emb", Op::Gather, &[wte, tokens])?;
    let mut x = b.named("embed", Op::LayerNorm { eps }, &[emb, ln_w, ln_b])?;

    // The ALiBi bias [h, 1, T]: slope · key position.
    let one = Dim::constant(1);
    let sl = b.reshape(slopes, vec![sym("h"), one.clone(), one])?;
    let keys = crate::blocks::positions(&mut b, "key_positions", 0, "T")?;
    let keys = b.op(Op::Cast { to: DType::F32 }, &[keys])?;
    let bias = b.named("alibi", Op::Binary(BinaryOp::Mul), &[sl, keys])?;
    let causal = b.named(
        "causal",
        Op::CausalMask {
            queries: sym("T"),
            keys: sym("T"),
        },
        &[],
    )?;
    let scale = attention_scale(&mut b, "attn_scale", "dh")?;
    let neg_inf = scalar(&mut b, "neg_inf", f64::NEG_INFINITY)?;
    let out_in = WeightLayout::OutIn;
    let three_d = times(3, "d")?;
    for i in 0..cfg.n_layer {
        let p = |n: &str| format!("h.{i}.{n}");
        let n = |v: &str| format!("l{i}.{v}");
        let norm = |b: &mut GraphBuilder, which: &str, x, name: &str| {
            let w = b.param(&p(&format!("{which}.weight")), f32_syms(&["d"]));
            let bias = b.param(&p(&format!("{which}.bias")), f32_syms(&["d"]));
            b.named(name, Op::LayerNorm { eps }, &[x, w, bias])
        };
        let wqkv = b.param(
            &p("self_attention.query_key_value.weight"),
            f32_of(vec![three_d.clone(), sym("d")]),
        );
        let bqkv = b.param(
            &p("self_attention.query_key_value.bias"),
            f32_of(vec![three_d.clone()]),
        );
        let wo = b.param(&p("self_attention.dense.weight"), f32_syms(&["d", "d"]));
        let bo = b.param(&p("self_attention.dense.bias"), f32_syms(&["d"]));
        let w1 = b.param(&p("mlp.dense_h_to_4h.weight"), f32_syms(&["f", "d"]));
        let b1 = b.param(&p("mlp.dense_h_to_4h.bias"), f32_syms(&["f"]));
        let w2 = b.param(&p("mlp.dense_4h_to_h.weight"), f32_syms(&["d", "f"]));
        let b2 = b.param(&p("mlp.dense_4h_to_h.bias"), f32_syms(&["d"]));

        let hn = norm(&mut b, "input_layernorm", x, &n("input_norm"))?;
        let qkv = linear(&mut b, hn, wqkv, Some(bqkv), out_in, &n("qkv"))?;
        // Outputs are laid out [h, 3, dh]: per head, its q, k and v.
        let qkv = b.reshape(
            qkv,
            vec![sym("B"), sym("T"), sym("h"), Dim::constant(3), sym("dh")],
        )?;
        let mut parts = Vec::new();
        for (j, role) in ["q", "k", "v"].iter().enumerate() {
            let s = b.op(
                Op::Slice {
                    axis: 3,
                    start: Dim::constant(j as i64),
                    end: Dim::constant(j as i64 + 1),
                },
                &[qkv],
            )?;
            let r = b.reshape(s, vec![sym("B"), sym("T"), sym("h"), sym("dh")])?;
            parts.push(b.named(
                &n(role),
                Op::Permute {
                    perm: vec![0, 2, 1, 3],
                },
                &[r],
            )?);
        }
        let (q, k, v) = (parts[0], parts[1], parts[2]);
        let scores = b.named(
            &n("attn.scores"),
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[q, k],
        )?;
        let scores = b.mul(scores, scale)?;
        let scores = b.named(
            &n("attn.biased"),
            Op::Binary(BinaryOp::Add),
            &[scores, bias],
        )?;
        let scores = b.op(Op::Where, &[causal, scores, neg_inf])?;
        let probs = b.named(&n("attn.probs"), Op::Softmax { axis: -1 }, &[scores])?;
        let ctx = b.named(
            &n("attn.ctx"),
            Op::MatMul {
                transpose_a: false,
                transpose_b: false,
            },
            &[probs, v],
        )?;
        let ctx = merge_heads(&mut b, ctx, "T", sym("d"))?;
        let o = linear(&mut b, ctx, wo, Some(bo), out_in, &n("attn_out"))?;
        let residual = if cfg.residual_post_layernorm { hn } else { x };
        let a = b.named(&n("resid_attn"), Op::Binary(BinaryOp::Add), &[o, residual])?;

        let hn = norm(&mut b, "post_attention_layernorm", a, &n("post_norm"))?;
        let u = linear(&mut b, hn, w1, Some(b1), out_in, &n("fc1"))?;
        let u = b.named(&n("gelu"), Op::Unary(UnaryOp::GeluTanh), &[u])?;
        let m = linear(&mut b, u, w2, Some(b2), out_in, &n("fc2"))?;
        let residual = if cfg.residual_post_layernorm { hn } else { a };
        x = b.named(&n("resid_mlp"), Op::Binary(BinaryOp::Add), &[m, residual])?;
    }
    let lnf_w = b.param("ln_f.weight", f32_syms(&["d"]));
    let lnf_b = b.param("ln_f.bias", f32_syms(&["d"]));
    let hf = b.named("ln_f", Op::LayerNorm { eps }, &[x, lnf_w, lnf_b])?;
    let head = if cfg.tie_word_embeddings {
        wte
    } else {
        b.param("lm_head.weight", f32_syms(&["V", "d"]))
    };
    let logits = linear(&mut b, hf, head, None, out_in, "logits")?;
    Ok(b.finish(&[("logits", logits)])?)
}

#[cfg(test)]
mod tests {
    use super::alibi_slopes;

    #[test]
    fn slopes_follow_the_alibi_formula() {
        // Powers of two: 2^(-8/n · k).
        let s4 = alibi_slopes(4);
        assert_eq!(s4, vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // Six heads: the four of n = 4, then 2^(-1), 2^(-3) (odd powers of the n = 8 base).
        let s6 = alibi_slopes(6);
        assert_eq!(&s6[..4], &s4[..]);
        assert_eq!(&s6[4..], &[0.5, 0.125]);
        // Twelve heads: eight of n = 8, then the first four odd powers of 2^(-1/2).
        let s12 = alibi_slopes(12);
        assert_eq!(s12.len(), 12);
        for (j, &x) in s12[8..].iter().enumerate() {
            let want = 2f64.powf(-0.5 * (2 * j + 1) as f64) as f32;
            // 2^(-1/2) is not exact in f32: its powers agree with the
            // exact ones to within one rounding of each.
            assert!(
                (x - want).abs() <= 2.0 * f32::EPSILON * want,
                "{x} vs {want}"
            );
        }
    }
}

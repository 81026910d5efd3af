//! T5 (`T5ForConditionalGeneration`): an encoder–decoder with T5's RMS
//! layer norm (weight only), no position embeddings but a learned relative
//! position bias (a `[buckets, heads]` table in the first block of each
//! stack, bidirectional in the encoder and causal in the decoder, added in
//! every self-attention layer), attention without `1/sqrt(d)` scaling,
//! cross-attention without bias, and a ReLU (v1.0) or gated-GELU (v1.1,
//! `gated-gelu`) FFN. The LM head is the shared embedding scaled by
//! `d_model^-0.5` (v1.0) or its own `lm_head.weight` (v1.1).
//!
//! The attention ops are emitted fused (`attention … rel_buckets=…`): the
//! bias is a function of the query and key positions that the op computes
//! itself, so a decode step over a KV cache reads the right distances.

use kiln_ir::{BinaryOp, Dim, Graph, GraphBuilder, Op, RelativeBias, TensorType, ValueId};
use kiln_ir::{UnaryOp, WeightLayout};

use crate::blocks::{f32_of, f32_syms, linear, merge_heads, scalar, split_heads, sym};
use crate::config::HfConfig;
use crate::FrontendError;

/// The FFN of a T5 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum T5Ffn {
    /// `wo(act(wi x))` (v1.0: ReLU).
    Dense(UnaryOp),
    /// `wo(act(wi_0 x) · wi_1 x)` (v1.1 `gated-gelu`: the tanh GELU).
    Gated(UnaryOp),
}

/// The fields of a T5 `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `d_model`.
    pub d_model: i64,
    /// `d_kv`: the width of one head (not `d_model / num_heads` in general).
    pub d_kv: i64,
    /// `d_ff`.
    pub d_ff: i64,
    /// `num_layers` (encoder blocks).
    pub num_layers: usize,
    /// `num_decoder_layers` (defaults to `num_layers`).
    pub num_decoder_layers: usize,
    /// `num_heads`.
    pub num_heads: i64,
    /// `relative_attention_num_buckets` and `relative_attention_max_distance`.
    pub buckets: usize,
    /// See `buckets`.
    pub max_distance: usize,
    /// `layer_norm_epsilon`.
    pub eps: f64,
    /// `feed_forward_proj`.
    pub ffn: T5Ffn,
    /// The LM head is `lm_head.weight` (else the shared embedding).
    pub own_head: bool,
    /// Decoder outputs are scaled by `d_model^-0.5` before the head.
    pub scale_outputs: bool,
    /// `decoder_start_token_id` (the pad id when absent).
    pub decoder_start_token_id: i64,
}

impl T5Config {
    /// Reads the fields from `config.json`.
    pub fn from_hf(c: &HfConfig) -> Result<T5Config, FrontendError> {
        let proj = c.string_or("feed_forward_proj", "relu")?;
        let (gated, act_name) = match proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, proj.as_str()),
        };
        // transformers maps `gated-gelu` to the tanh GELU (`gelu_new`).
        let act = match act_name {
            "gelu" if gated => Some(UnaryOp::GeluTanh),
            other => crate::blocks::activation(other),
        }
        .ok_or_else(|| {
            c.unsupported(
                "feed_forward_proj",
                &format!("= {proj:?} is not a supported activation"),
            )
        })?;
        let tie = c.bool_or("tie_word_embeddings", true)?;
        let layers = c.layers("num_layers")?;
        let buckets = c.opt_int("relative_attention_num_buckets")?.unwrap_or(32) as usize;
        let max_distance = c.opt_int("relative_attention_max_distance")?.unwrap_or(128) as usize;
        let rel = RelativeBias {
            buckets,
            max_distance,
            bidirectional: true,
        };
        if let Some(p) = rel.problem() {
            return Err(c.unsupported(
                "relative_attention_num_buckets",
                &format!("and relative_attention_max_distance: {p}"),
            ));
        }
        Ok(T5Config {
            vocab_size: c.int("vocab_size")?,
            d_model: c.int("d_model")?,
            d_kv: c.int("d_kv")?,
            d_ff: c.int("d_ff")?,
            num_layers: layers,
            num_decoder_layers: match c.get("num_decoder_layers") {
                Some(_) => c.layers("num_decoder_layers")?,
                None => layers,
            },
            num_heads: c.int("num_heads")?,
            buckets,
            max_distance,
            eps: c.non_negative_or("layer_norm_epsilon", 1e-6)?,
            ffn: if gated {
                T5Ffn::Gated(act)
            } else {
                T5Ffn::Dense(act)
            },
            own_head: !tie,
            scale_outputs: c.bool_or("scale_decoder_outputs", tie)?,
            decoder_start_token_id: match c.opt_id("decoder_start_token_id")? {
                Some(id) => id,
                None => c.opt_id("pad_token_id")?.unwrap_or(0),
            },
        })
    }

    /// The config keys each graph symbol comes from (for contract messages).
    pub const KEYS: &'static [(&'static str, &'static str)] = &[
        ("V", "vocab_size"),
        ("d", "d_model"),
        ("dk", "d_kv"),
        ("h", "num_heads"),
        ("f", "d_ff"),
        ("nb", "relative_attention_num_buckets"),
    ];
}

/// Tensors a T5 checkpoint may hold that the model reads elsewhere: the
/// stacks' copies of the shared embedding, and a cross-attention bias table
/// old checkpoints carry and transformers ignores.
pub fn ignored(name: &str) -> bool {
    matches!(
        name,
        "encoder.embed_tokens.weight"
            | "decoder.embed_tokens.weight"
            | "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    )
}

struct Stack<'a> {
    cfg: &'a T5Config,
    side: &'static str,
    inner: Dim,
}

impl Stack<'_> {
    fn rms(
        &self,
        b: &mut GraphBuilder,
        x: ValueId,
        weight: &str,
    ) -> Result<ValueId, FrontendError> {
        let w = b.param(weight, f32_syms(&["d"]));
        Ok(b.op(Op::RmsNorm { eps: self.cfg.eps }, &[x, w])?)
    }

    /// Attention of `x` (length `q_len`) over `kv` (length `k_len`) with the
    /// module's q/k/v/o projections, then its output projection.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        b: &mut GraphBuilder,
        module: &str,
        name: &str,
        x: ValueId,
        kv: ValueId,
        (q_len, k_len): (&str, &str),
        mask: Option<ValueId>,
        bias: Option<(ValueId, RelativeBias)>,
        causal: bool,
    ) -> Result<ValueId, FrontendError> {
        let out_in = WeightLayout::OutIn;
        let w = |b: &mut GraphBuilder, p: &str, ty: TensorType| {
            b.param(&format!("{module}.{p}.weight"), ty)
        };
        let qkv_ty = f32_of(vec![self.inner.clone(), sym("d")]);
        let wq = w(b, "q", qkv_ty.clone());
        let wk = w(b, "k", qkv_ty.clone());
        let wv = w(b, "v", qkv_ty);
        let wo = w(b, "o", f32_of(vec![sym("d"), self.inner.clone()]));
        let q = linear(b, x, wq, None, out_in, &format!("{name}.q"))?;
        let k = linear(b, kv, wk, None, out_in, &format!("{name}.k"))?;
        let v = linear(b, kv, wv, None, out_in, &format!("{name}.v"))?;
        let q = split_heads(b, q, q_len, "h", "dk")?;
        let k = split_heads(b, k, k_len, "h", "dk")?;
        let v = split_heads(b, v, k_len, "h", "dk")?;
        let mut operands = vec![q, k, v];
        operands.extend(mask);
        operands.extend(bias.map(|(t, _)| t));
        let op = Op::Attention {
            causal,
            scale: 1.0,
            alibi: false,
            relative: bias.map(|(_, r)| r),
        };
        let ctx = b.named(&format!("{name}.ctx"), op, &operands)?;
        let ctx = merge_heads(b, ctx, q_len, self.inner.clone())?;
        Ok(linear(b, ctx, wo, None, out_in, &format!("{name}.out"))?)
    }

    fn ffn(
        &self,
        b: &mut GraphBuilder,
        prefix: &str,
        name: &str,
        x: ValueId,
    ) -> Result<ValueId, FrontendError> {
        let out_in = WeightLayout::OutIn;
        let p = |w: &str| format!("{prefix}.DenseReluDense.{w}.weight");
        let wo = b.param(&p("wo"), f32_syms(&["d", "f"]));
        let h = match self.cfg.ffn {
            T5Ffn::Dense(act) => {
                let wi = b.param(&p("wi"), f32_syms(&["f", "d"]));
                let h = linear(b, x, wi, None, out_in, &format!("{name}.wi"))?;
                b.op(Op::Unary(act), &[h])?
            }
            T5Ffn::Gated(act) => {
                let w0 = b.param(&p("wi_0"), f32_syms(&["f", "d"]));
                let w1 = b.param(&p("wi_1"), f32_syms(&["f", "d"]));
                let g = linear(b, x, w0, None, out_in, &format!("{name}.wi_0"))?;
                let u = linear(b, x, w1, None, out_in, &format!("{name}.wi_1"))?;
                let g = b.op(Op::Unary(act), &[g])?;
                b.op(Op::Binary(BinaryOp::Mul), &[g, u])?
            }
        };
        Ok(linear(b, h, wo, None, out_in, &format!("{name}.wo"))?)
    }

    fn table(&self, b: &mut GraphBuilder) -> (ValueId, RelativeBias) {
        let t = b.param(
            &format!(
                "{}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                self.side
            ),
            f32_syms(&["nb", "h"]),
        );
        let rel = RelativeBias {
            buckets: self.cfg.buckets,
            max_distance: self.cfg.max_distance,
            bidirectional: self.side == "encoder",
        };
        (t, rel)
    }
}

/// Builds `@t5(%tokens: i64[B, S], %attention_mask: i64[B, S],
/// %decoder_tokens: i64[B, T]) -> (logits: f32[B, T, V])`.
pub fn build_t5(cfg: &T5Config) -> Result<Graph, FrontendError> {
    let mut b = GraphBuilder::new("t5");
    b.bind("V", cfg.vocab_size)?;
    b.bind("d", cfg.d_model)?;
    b.bind("dk", cfg.d_kv)?;
    b.bind("h", cfg.num_heads)?;
    b.bind("f", cfg.d_ff)?;
    b.bind("nb", cfg.buckets as i64)?;
    let inner = sym("h")
        .mul(&sym("dk"))
        .map_err(|e| FrontendError::Config(e.to_string()))?;
    let (tokens, attention_mask, decoder_tokens) = crate::blocks::seq2seq_inputs(&mut b);
    let shared = b.param("shared.weight", f32_syms(&["V", "d"]));
    let enc_mask = b.named("enc_mask", Op::PaddingMask, &[attention_mask])?;

    // Encoder.
    let enc = Stack {
        cfg,
        side: "encoder",
        inner: inner.clone(),
    };
    let enc_bias = enc.table(&mut b);
    let mut x = b.named("encoder.embed", Op::Gather, &[shared, tokens])?;
    for i in 0..cfg.num_layers {
        let p = format!("encoder.block.{i}.layer");
        let n = format!("enc{i}");
        let hn = enc.rms(&mut b, x, &format!("{p}.0.layer_norm.weight"))?;
        let a = enc.attention(
            &mut b,
            &format!("{p}.0.SelfAttention"),
            &format!("{n}.attn"),
            hn,
            hn,
            ("S", "S"),
            Some(enc_mask),
            Some(enc_bias),
            false,
        )?;
        x = b.named(
            &format!("{n}.resid_attn"),
            Op::Binary(BinaryOp::Add),
            &[x, a],
        )?;
        let hn = enc.rms(&mut b, x, &format!("{p}.1.layer_norm.weight"))?;
        let f = enc.ffn(&mut b, &format!("{p}.1"), &format!("{n}.ffn"), hn)?;
        x = b.named(&format!("{n}.out"), Op::Binary(BinaryOp::Add), &[x, f])?;
    }
    let memory = enc.rms(&mut b, x, "encoder.final_layer_norm.weight")?;

    // Decoder.
    let dec = Stack {
        cfg,
        side: "decoder",
        inner,
    };
    let dec_bias = dec.table(&mut b);
    let mut y = b.named("decoder.embed", Op::Gather, &[shared, decoder_tokens])?;
    for i in 0..cfg.num_decoder_layers {
        let p = format!("decoder.block.{i}.layer");
        let n = format!("dec{i}");
        let hn = dec.rms(&mut b, y, &format!("{p}.0.layer_norm.weight"))?;
        let a = dec.attention(
            &mut b,
            &format!("{p}.0.SelfAttention"),
            &format!("{n}.attn"),
            hn,
            hn,
            ("T", "T"),
            None,
            Some(dec_bias),
            true,
        )?;
        y = b.named(
            &format!("{n}.resid_attn"),
            Op::Binary(BinaryOp::Add),
            &[y, a],
        )?;
        let hn = dec.rms(&mut b, y, &format!("{p}.1.layer_norm.weight"))?;
        let c = dec.attention(
            &mut b,
            &format!("{p}.1.EncDecAttention"),
            &format!("{n}.cross"),
            hn,
            memory,
            ("T", "S"),
            Some(enc_mask),
            None,
            false,
        )?;
        y = b.named(
            &format!("{n}.resid_cross"),
            Op::Binary(BinaryOp::Add),
            &[y, c],
        )?;
        let hn = dec.rms(&mut b, y, &format!("{p}.2.layer_norm.weight"))?;
        let f = dec.ffn(&mut b, &format!("{p}.2"), &format!("{n}.ffn"), hn)?;
        y = b.named(&format!("{n}.out"), Op::Binary(BinaryOp::Add), &[y, f])?;
    }
    let mut out = dec.rms(&mut b, y, "decoder.final_layer_norm.weight")?;
    if cfg.scale_outputs {
        let s = scalar(&mut b, "output_scale", (cfg.d_model as f64).powf(-0.5))?;
        out = b.mul(out, s)?;
    }
    let head = if cfg.own_head {
        b.param("lm_head.weight", f32_syms(&["V", "d"]))
    } else {
        shared
    };
    let logits = linear(&mut b, out, head, None, WeightLayout::OutIn, "logits")?;
    Ok(b.finish(&[("logits", logits)])?)
}

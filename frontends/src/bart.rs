//! BART (`BartForConditionalGeneration`): encoder–decoder with learned positions
//! offset by 2, `layernorm_embedding`, post-LN layers with biases, padding mask on
//! the encoder, causal self-attention and cross-attention in the decoder, LM head
//! tied to `model.shared` plus `final_logits_bias`.
//!
//! Marian (`MarianMTModel`) is the same structure with static sinusoidal
//! positions (no offset, the table computed from the config by
//! [`sinusoidal_table`], never read) and no embedding layer norm.

use std::collections::BTreeMap;

use kiln_ir::{BinaryOp, Dim, Graph, GraphBuilder, Op, Tensor, ValueId, WeightLayout};
use serde_json::json;

use crate::blocks::{
    activation, attention, attention_scale, f32_of, f32_syms, linear, merge_heads, positions,
    scalar, split_heads, sym,
};
use crate::config::HfConfig;
use crate::FrontendError;

/// The fields of a BART `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct BartConfig {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `d_model`.
    pub d_model: i64,
    /// `encoder_layers`.
    pub encoder_layers: usize,
    /// `decoder_layers`.
    pub decoder_layers: usize,
    /// `encoder_attention_heads`.
    pub encoder_attention_heads: i64,
    /// `decoder_attention_heads`.
    pub decoder_attention_heads: i64,
    /// `encoder_ffn_dim`.
    pub encoder_ffn_dim: i64,
    /// `decoder_ffn_dim`.
    pub decoder_ffn_dim: i64,
    /// `max_position_embeddings`.
    pub max_position_embeddings: i64,
    /// `activation_function`.
    pub activation_function: String,
    /// `scale_embedding`: multiply token embeddings by `sqrt(d_model)`.
    pub scale_embedding: bool,
    /// `decoder_start_token_id`.
    pub decoder_start_token_id: i64,
    /// Marian: sinusoidal positions without offset and no embedding layer
    /// norm (BART: learned positions offset by 2, `layernorm_embedding`).
    pub marian: bool,
}

/// Position rows before the first real position in BART's learned table.
pub const POSITION_OFFSET: i64 = 2;

impl BartConfig {
    /// Reads the fields from `config.json`, rejecting semantics kiln lacks.
    pub fn from_hf(c: &HfConfig) -> Result<BartConfig, FrontendError> {
        c.require("normalize_before", &json!(false), "pre-LN layers (mBART)")?;
        c.require(
            "add_final_layer_norm",
            &json!(false),
            "final layer norms (mBART)",
        )?;
        c.require(
            "normalize_embedding",
            &json!(true),
            "skipping the embedding layer norm",
        )?;
        let act = c.string_or("activation_function", "gelu")?;
        if activation(&act).is_none() {
            return Err(c.unsupported(
                "activation_function",
                &format!("= {act:?} is not a supported activation"),
            ));
        }
        Ok(BartConfig {
            vocab_size: c.int("vocab_size")?,
            d_model: c.int("d_model")?,
            encoder_layers: c.layers("encoder_layers")?,
            decoder_layers: c.layers("decoder_layers")?,
            encoder_attention_heads: c.int("encoder_attention_heads")?,
            decoder_attention_heads: c.int("decoder_attention_heads")?,
            encoder_ffn_dim: c.int("encoder_ffn_dim")?,
            decoder_ffn_dim: c.int("decoder_ffn_dim")?,
            max_position_embeddings: c.int("max_position_embeddings")?,
            activation_function: act,
            scale_embedding: c.bool_or("scale_embedding", false)?,
            decoder_start_token_id: c.opt_id("decoder_start_token_id")?.unwrap_or(2),
            marian: false,
        })
    }

    /// Reads a Marian `config.json` (`MarianMTModel`).
    pub fn from_marian(c: &HfConfig) -> Result<BartConfig, FrontendError> {
        c.require(
            "share_encoder_decoder_embeddings",
            &json!(true),
            "separate encoder and decoder vocabularies",
        )?;
        c.require("tie_word_embeddings", &json!(true), "an untied LM head")?;
        let vocab = c.int("vocab_size")?;
        if let Some(dv) = c.opt_int("decoder_vocab_size")? {
            if dv != vocab {
                return Err(c.unsupported(
                    "decoder_vocab_size",
                    &format!(
                        "= {dv} differs from vocab_size = {vocab} (separate target vocabularies)"
                    ),
                ));
            }
        }
        let act = c.string_or("activation_function", "swish")?;
        if activation(&act).is_none() {
            return Err(c.unsupported(
                "activation_function",
                &format!("= {act:?} is not a supported activation"),
            ));
        }
        let d_model = c.int("d_model")?;
        Ok(BartConfig {
            vocab_size: vocab,
            d_model,
            encoder_layers: c.layers("encoder_layers")?,
            decoder_layers: c.layers("decoder_layers")?,
            encoder_attention_heads: c.int("encoder_attention_heads")?,
            decoder_attention_heads: c.int("decoder_attention_heads")?,
            encoder_ffn_dim: c.int("encoder_ffn_dim")?,
            decoder_ffn_dim: c.int("decoder_ffn_dim")?,
            max_position_embeddings: c.int("max_position_embeddings")?,
            activation_function: act,
            scale_embedding: c.bool_or("scale_embedding", true)?,
            // Marian starts decoding from the pad token.
            decoder_start_token_id: match c.opt_id("decoder_start_token_id")? {
                Some(id) => id,
                None => c.opt_id("pad_token_id")?.ok_or_else(|| {
                    FrontendError::Config(
                        "decoder_start_token_id and pad_token_id are both missing".into(),
                    )
                })?,
            },
            marian: true,
        })
    }

    fn position_offset(&self) -> i64 {
        if self.marian {
            0
        } else {
            POSITION_OFFSET
        }
    }
}

/// Marian's static position table `[positions, d]`: row `p` holds
/// `sin(p / 10000^(2i/d))` in column `i < ⌈d/2⌉` and `cos(p / 10000^(2i/d))`
/// in column `⌈d/2⌉ + i` (sines first, then cosines; not interleaved),
/// computed in f64 and rounded to f32 as transformers does.
pub fn sinusoidal_table(positions: usize, d: usize) -> Vec<f32> {
    let sin_cols = d.div_ceil(2);
    let mut out = vec![0f32; positions * d];
    for p in 0..positions {
        let row = &mut out[p * d..(p + 1) * d];
        for j in 0..d {
            let angle = p as f64 / 10000f64.powf((2 * (j / 2)) as f64 / d as f64);
            if j % 2 == 0 {
                row[j / 2] = angle.sin() as f32;
            } else {
                row[sin_cols + j / 2] = angle.cos() as f32;
            }
        }
    }
    out
}

/// The weights Marian computes instead of reading: both position tables.
pub fn computed_weights(cfg: &BartConfig) -> Result<BTreeMap<String, Tensor>, FrontendError> {
    if !cfg.marian {
        return Ok(BTreeMap::new());
    }
    let (p, d) = (cfg.max_position_embeddings, cfg.d_model);
    let too_big = || {
        FrontendError::Config(format!(
            "max_position_embeddings × d_model = {p} × {d} is too large a position table"
        ))
    };
    p.checked_mul(d)
        .filter(|&n| n <= 1 << 31)
        .ok_or_else(too_big)?;
    let table = sinusoidal_table(p as usize, d as usize);
    let mut out = BTreeMap::new();
    for side in ["encoder", "decoder"] {
        let t = Tensor::f32(vec![p as usize, d as usize], table.clone())
            .map_err(|e| FrontendError::Config(e.to_string()))?;
        out.insert(format!("model.{side}.embed_positions.weight"), t);
    }
    Ok(out)
}

struct Shared {
    scale: ValueId,
    neg_inf: ValueId,
    act: kiln_ir::UnaryOp,
}

/// Builds `@bart(%tokens: i64[B, S], %attention_mask: i64[B, S],
/// %decoder_tokens: i64[B, T]) -> (logits: f32[B, T, V])`.
pub fn build_bart(cfg: &BartConfig) -> Result<Graph, FrontendError> {
    let mut b = GraphBuilder::new(if cfg.marian { "marian" } else { "bart" });
    let cerr = |e: kiln_ir::DimError| FrontendError::Config(e.to_string());
    b.bind("V", cfg.vocab_size)?;
    let positions = cfg
        .max_position_embeddings
        .checked_add(cfg.position_offset())
        .ok_or_else(|| FrontendError::Config("max_position_embeddings is too large".into()))?;
    b.bind("P", positions)?;
    b.bind("d", cfg.d_model)?;
    b.bind("he", cfg.encoder_attention_heads)?;
    b.bind("hd", cfg.decoder_attention_heads)?;
    b.bind("dhe", sym("d").div(&sym("he")).map_err(cerr)?)?;
    b.bind("dhd", sym("d").div(&sym("hd")).map_err(cerr)?)?;
    b.bind("fe", cfg.encoder_ffn_dim)?;
    b.bind("fd", cfg.decoder_ffn_dim)?;
    let (tokens, attention_mask, decoder_tokens) = crate::blocks::seq2seq_inputs(&mut b);
    let shared_w = b.param("model.shared.weight", f32_syms(&["V", "d"]));
    let neg_inf = scalar(&mut b, "neg_inf", f64::NEG_INFINITY)?;
    let act = activation(&cfg.activation_function).unwrap_or(kiln_ir::UnaryOp::Gelu);
    let mut sh = Shared {
        scale: neg_inf,
        neg_inf,
        act,
    };

    // Encoder.
    sh.scale = attention_scale(&mut b, "enc_attn_scale", "dhe")?;
    let mut x = embed(&mut b, cfg, "encoder", shared_w, tokens, "S")?;
    let enc_mask = b.named("enc_mask", Op::PaddingMask, &[attention_mask])?;
    for i in 0..cfg.encoder_layers {
        let p = format!("model.encoder.layers.{i}");
        let n = format!("enc{i}");
        let a = attn_block(
            &mut b,
            &sh,
            &p,
            "self_attn",
            &n,
            x,
            x,
            "S",
            "S",
            ("he", "dhe"),
            Some(enc_mask),
        )?;
        x = post_ln(&mut b, &format!("{p}.self_attn_layer_norm"), x, a)?;
        let f = ffn(&mut b, &sh, &p, x, "fe")?;
        x = post_ln(&mut b, &format!("{p}.final_layer_norm"), x, f)?;
    }
    let memory = x;

    // Decoder.
    let dec_scale = attention_scale(&mut b, "dec_attn_scale", "dhd")?;
    sh.scale = dec_scale;
    let causal = b.named(
        "causal",
        Op::CausalMask {
            queries: sym("T"),
            keys: sym("T"),
        },
        &[],
    )?;
    let mut y = embed(&mut b, cfg, "decoder", shared_w, decoder_tokens, "T")?;
    for i in 0..cfg.decoder_layers {
        let p = format!("model.decoder.layers.{i}");
        let n = format!("dec{i}");
        let a = attn_block(
            &mut b,
            &sh,
            &p,
            "self_attn",
            &n,
            y,
            y,
            "T",
            "T",
            ("hd", "dhd"),
            Some(causal),
        )?;
        y = post_ln(&mut b, &format!("{p}.self_attn_layer_norm"), y, a)?;
        let c = attn_block(
            &mut b,
            &sh,
            &p,
            "encoder_attn",
            &format!("{n}.cross"),
            y,
            memory,
            "T",
            "S",
            ("hd", "dhd"),
            Some(enc_mask),
        )?;
        y = post_ln(&mut b, &format!("{p}.encoder_attn_layer_norm"), y, c)?;
        let f = ffn(&mut b, &sh, &p, y, "fd")?;
        y = post_ln(&mut b, &format!("{p}.final_layer_norm"), y, f)?;
    }
    let bias = b.param(
        "final_logits_bias",
        f32_of(vec![Dim::constant(1), sym("V")]),
    );
    let logits = linear(&mut b, y, shared_w, None, WeightLayout::OutIn, "lm_head")?;
    let logits = b.named("logits", Op::Binary(BinaryOp::Add), &[logits, bias])?;
    Ok(b.finish(&[("logits", logits)])?)
}

/// Token embedding (times `sqrt(d)` when configured) + positions (learned and
/// offset by 2, or Marian's sinusoids), then `layernorm_embedding` (BART).
fn embed(
    b: &mut GraphBuilder,
    cfg: &BartConfig,
    side: &str,
    shared: ValueId,
    ids: ValueId,
    len: &str,
) -> Result<ValueId, FrontendError> {
    let pos_table = b.param(
        &format!("model.{side}.embed_positions.weight"),
        f32_syms(&["P", "d"]),
    );
    let mut tok = b.named(&format!("{side}.tok_emb"), Op::Gather, &[shared, ids])?;
    if cfg.scale_embedding {
        let s = scalar(
            b,
            &format!("{side}.embed_scale"),
            (cfg.d_model as f64).sqrt(),
        )?;
        tok = b.mul(tok, s)?;
    }
    let pos = positions(b, &format!("{side}.positions"), cfg.position_offset(), len)?;
    let pe = b.named(&format!("{side}.pos_emb"), Op::Gather, &[pos_table, pos])?;
    if cfg.marian {
        return Ok(b.named(
            &format!("{side}.embed"),
            Op::Binary(BinaryOp::Add),
            &[tok, pe],
        )?);
    }
    let ln_w = b.param(
        &format!("model.{side}.layernorm_embedding.weight"),
        f32_syms(&["d"]),
    );
    let ln_b = b.param(
        &format!("model.{side}.layernorm_embedding.bias"),
        f32_syms(&["d"]),
    );
    let e = b.add_(tok, pe)?;
    Ok(b.named(
        &format!("{side}.embed"),
        Op::LayerNorm { eps: 1e-5 },
        &[e, ln_w, ln_b],
    )?)
}

/// `LayerNorm(x + y)` with the norm's weights at `{prefix}.weight/bias`.
fn post_ln(
    b: &mut GraphBuilder,
    prefix: &str,
    x: ValueId,
    y: ValueId,
) -> Result<ValueId, FrontendError> {
    let w = b.param(&format!("{prefix}.weight"), f32_syms(&["d"]));
    let bias = b.param(&format!("{prefix}.bias"), f32_syms(&["d"]));
    let r = b.add_(x, y)?;
    Ok(b.op(Op::LayerNorm { eps: 1e-5 }, &[r, w, bias])?)
}

/// Attention of queries from `x` (length `q_len`) over keys/values from `kv`
/// (length `k_len`), with output projection; `module` is `self_attn` or `encoder_attn`.
#[allow(clippy::too_many_arguments)]
fn attn_block(
    b: &mut GraphBuilder,
    sh: &Shared,
    prefix: &str,
    module: &str,
    name: &str,
    x: ValueId,
    kv: ValueId,
    q_len: &str,
    k_len: &str,
    (heads, dh): (&str, &str),
    mask: Option<ValueId>,
) -> Result<ValueId, FrontendError> {
    let out_in = WeightLayout::OutIn;
    let proj = |b: &mut GraphBuilder, p: &str| {
        let w = b.param(
            &format!("{prefix}.{module}.{p}.weight"),
            f32_syms(&["d", "d"]),
        );
        let bias = b.param(&format!("{prefix}.{module}.{p}.bias"), f32_syms(&["d"]));
        (w, bias)
    };
    let (wq, bq) = proj(b, "q_proj");
    let (wk, bk) = proj(b, "k_proj");
    let (wv, bv) = proj(b, "v_proj");
    let (wo, bo) = proj(b, "out_proj");
    let q = linear(b, x, wq, Some(bq), out_in, &format!("{name}.q"))?;
    let k = linear(b, kv, wk, Some(bk), out_in, &format!("{name}.k"))?;
    let v = linear(b, kv, wv, Some(bv), out_in, &format!("{name}.v"))?;
    let q = split_heads(b, q, q_len, heads, dh)?;
    let k = split_heads(b, k, k_len, heads, dh)?;
    let v = split_heads(b, v, k_len, heads, dh)?;
    let ctx = attention(
        b,
        &format!("{name}.attn"),
        q,
        k,
        v,
        mask,
        sh.scale,
        sh.neg_inf,
    )?;
    let ctx = merge_heads(b, ctx, q_len, sym("d"))?;
    Ok(linear(
        b,
        ctx,
        wo,
        Some(bo),
        out_in,
        &format!("{name}.out"),
    )?)
}

fn ffn(
    b: &mut GraphBuilder,
    sh: &Shared,
    prefix: &str,
    x: ValueId,
    width: &str,
) -> Result<ValueId, FrontendError> {
    let out_in = WeightLayout::OutIn;
    let w1 = b.param(&format!("{prefix}.fc1.weight"), f32_syms(&[width, "d"]));
    let b1 = b.param(&format!("{prefix}.fc1.bias"), f32_syms(&[width]));
    let w2 = b.param(&format!("{prefix}.fc2.weight"), f32_syms(&["d", width]));
    let b2 = b.param(&format!("{prefix}.fc2.bias"), f32_syms(&["d"]));
    let h = linear(
        b,
        x,
        w1,
        Some(b1),
        out_in,
        &format!("{prefix}.fc1").replace("model.", ""),
    )?;
    let h = b.op(Op::Unary(sh.act), &[h])?;
    Ok(linear(
        b,
        h,
        w2,
        Some(b2),
        out_in,
        &format!("{prefix}.fc2").replace("model.", ""),
    )?)
}

//! BERT (`BertModel`): word + position + token-type embeddings, post-LN encoder
//! layers with biases and exact GELU, padding mask from `attention_mask`.
//! Outputs `last_hidden_state`, the mask-weighted mean-pooled sentence embedding
//! `pooled`, and the `pooler_output` (tanh dense on the first token).
//!
//! `BertForMaskedLM` (`architectures` says so) ends instead in the masked-LM
//! head: `logits = LayerNorm(act(dense(h))) · Eᵀ + bias`, the decoder tied to
//! the word embeddings `E` (or `cls.predictions.decoder.weight` when
//! `tie_word_embeddings` is false), and outputs `logits: f32[B, T, V]`.

use kiln_ir::{
    BinaryOp, DType, Dim, Graph, GraphBuilder, Op, ReduceKind, TensorType, WeightLayout,
};
use serde_json::json;

use crate::blocks::{
    activation, attention, attention_scale, f32_syms, linear, merge_heads, positions, scalar,
    split_heads, sym,
};
use crate::config::HfConfig;
use crate::FrontendError;

/// The fields of a BERT `config.json` that shape the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
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
    /// `max_position_embeddings`.
    pub max_position_embeddings: i64,
    /// `type_vocab_size`.
    pub type_vocab_size: i64,
    /// `layer_norm_eps`.
    pub layer_norm_eps: f64,
    /// `hidden_act`.
    pub hidden_act: String,
    /// The masked-LM head of `BertForMaskedLM` instead of the pooler.
    pub masked_lm: bool,
    /// `tie_word_embeddings` (the masked-LM decoder is the word embeddings).
    pub tie_word_embeddings: bool,
}

impl BertConfig {
    /// Reads the fields from `config.json`, rejecting semantics kiln lacks.
    pub fn from_hf(c: &HfConfig) -> Result<BertConfig, FrontendError> {
        c.require(
            "position_embedding_type",
            &json!("absolute"),
            "relative position embeddings",
        )?;
        c.require("is_decoder", &json!(false), "BERT as a causal decoder")?;
        c.require(
            "add_cross_attention",
            &json!(false),
            "cross-attention layers",
        )?;
        let hidden_act = c.string_or("hidden_act", "gelu")?;
        if activation(&hidden_act).is_none() {
            return Err(c.unsupported(
                "hidden_act",
                &format!("= {hidden_act:?} is not a supported activation"),
            ));
        }
        let architectures: Vec<String> = c
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let masked_lm = architectures.iter().any(|a| a == "BertForMaskedLM");
        Ok(BertConfig {
            masked_lm,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
            vocab_size: c.int("vocab_size")?,
            hidden_size: c.int("hidden_size")?,
            intermediate_size: c.int("intermediate_size")?,
            num_hidden_layers: c.layers("num_hidden_layers")?,
            num_attention_heads: c.int("num_attention_heads")?,
            max_position_embeddings: c.int("max_position_embeddings")?,
            type_vocab_size: c.int("type_vocab_size")?,
            layer_norm_eps: c.non_negative_or("layer_norm_eps", 1e-12)?,
            hidden_act,
        })
    }
}

/// Builds `@bert(%tokens, %attention_mask, %token_type_ids: i64[B, T])`
/// `-> (last_hidden_state: f32[B, T, d], pooled: f32[B, d], pooler_output: f32[B, d])`.
pub fn build_bert(cfg: &BertConfig) -> Result<Graph, FrontendError> {
    let mut b = GraphBuilder::new("bert");
    b.bind("V", cfg.vocab_size)?;
    b.bind("P", cfg.max_position_embeddings)?;
    b.bind("G", cfg.type_vocab_size)?;
    b.bind("d", cfg.hidden_size)?;
    b.bind("f", cfg.intermediate_size)?;
    b.bind("h", cfg.num_attention_heads)?;
    b.bind(
        "dh",
        sym("d")
            .div(&sym("h"))
            .map_err(|e| FrontendError::Config(e.to_string()))?,
    )?;
    let ids = TensorType::new(DType::I64, vec![sym("B"), sym("T")]);
    let tokens = b.input("tokens", ids.clone());
    let attention_mask = b.input("attention_mask", ids.clone());
    let token_types = b.input("token_type_ids", ids);
    let eps = cfg.layer_norm_eps;
    let act = activation(&cfg.hidden_act).unwrap_or(kiln_ir::UnaryOp::Gelu);
    let out_in = WeightLayout::OutIn;

    let word = b.param("embeddings.word_embeddings.weight", f32_syms(&["V", "d"]));
    let position = b.param(
        "embeddings.position_embeddings.weight",
        f32_syms(&["P", "d"]),
    );
    let token_type = b.param(
        "embeddings.token_type_embeddings.weight",
        f32_syms(&["G", "d"]),
    );
    let emb_ln_w = b.param("embeddings.LayerNorm.weight", f32_syms(&["d"]));
    let emb_ln_b = b.param("embeddings.LayerNorm.bias", f32_syms(&["d"]));
    let w = b.named("word_emb", Op::Gather, &[word, tokens])?;
    let pos = positions(&mut b, "positions", 0, "T")?;
    let p = b.named("pos_emb", Op::Gather, &[position, pos])?;
    let t = b.named("type_emb", Op::Gather, &[token_type, token_types])?;
    let wp = b.add_(w, p)?;
    let e = b.add_(wp, t)?;
    let mut x = b.named("embed", Op::LayerNorm { eps }, &[e, emb_ln_w, emb_ln_b])?;
    let mask = b.named("mask", Op::PaddingMask, &[attention_mask])?;
    let scale = attention_scale(&mut b, "attn_scale", "dh")?;
    let neg_inf = scalar(&mut b, "neg_inf", f64::NEG_INFINITY)?;

    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("encoder.layer.{i}.{n}");
        let n = |v: &str| format!("l{i}.{v}");
        let lin = |b: &mut GraphBuilder, name: &str, out: &str, inp: &str| {
            let w = b.param(&p(&format!("{name}.weight")), f32_syms(&[out, inp]));
            let bias = b.param(&p(&format!("{name}.bias")), f32_syms(&[out]));
            (w, bias)
        };
        let (wq, bq) = lin(&mut b, "attention.self.query", "d", "d");
        let (wk, bk) = lin(&mut b, "attention.self.key", "d", "d");
        let (wv, bv) = lin(&mut b, "attention.self.value", "d", "d");
        let (wo, bo) = lin(&mut b, "attention.output.dense", "d", "d");
        let ln1_w = b.param(&p("attention.output.LayerNorm.weight"), f32_syms(&["d"]));
        let ln1_b = b.param(&p("attention.output.LayerNorm.bias"), f32_syms(&["d"]));
        let (wi, bi) = lin(&mut b, "intermediate.dense", "f", "d");
        let (wo2, bo2) = lin(&mut b, "output.dense", "d", "f");
        let ln2_w = b.param(&p("output.LayerNorm.weight"), f32_syms(&["d"]));
        let ln2_b = b.param(&p("output.LayerNorm.bias"), f32_syms(&["d"]));

        let q = linear(&mut b, x, wq, Some(bq), out_in, &n("q"))?;
        let k = linear(&mut b, x, wk, Some(bk), out_in, &n("k"))?;
        let v = linear(&mut b, x, wv, Some(bv), out_in, &n("v"))?;
        let q = split_heads(&mut b, q, "T", "h", "dh")?;
        let k = split_heads(&mut b, k, "T", "h", "dh")?;
        let v = split_heads(&mut b, v, "T", "h", "dh")?;
        let ctx = attention(&mut b, &n("attn"), q, k, v, Some(mask), scale, neg_inf)?;
        let ctx = merge_heads(&mut b, ctx, "T", sym("d"))?;
        let a = linear(&mut b, ctx, wo, Some(bo), out_in, &n("attn_out"))?;
        let r = b.add_(x, a)?;
        x = b.named(&n("attn_norm"), Op::LayerNorm { eps }, &[r, ln1_w, ln1_b])?;
        let up = linear(&mut b, x, wi, Some(bi), out_in, &n("intermediate"))?;
        let up = b.named(&n("act"), Op::Unary(act), &[up])?;
        let down = linear(&mut b, up, wo2, Some(bo2), out_in, &n("ffn_out"))?;
        let r = b.add_(x, down)?;
        x = b.named(&n("out"), Op::LayerNorm { eps }, &[r, ln2_w, ln2_b])?;
    }

    if cfg.masked_lm {
        let dw = b.param(
            "cls.predictions.transform.dense.weight",
            f32_syms(&["d", "d"]),
        );
        let db = b.param("cls.predictions.transform.dense.bias", f32_syms(&["d"]));
        let h = linear(&mut b, x, dw, Some(db), out_in, "mlm.dense")?;
        let h = b.named("mlm.act", Op::Unary(act), &[h])?;
        let nw = b.param(
            "cls.predictions.transform.LayerNorm.weight",
            f32_syms(&["d"]),
        );
        let nb = b.param("cls.predictions.transform.LayerNorm.bias", f32_syms(&["d"]));
        let h = b.named("mlm.norm", Op::LayerNorm { eps }, &[h, nw, nb])?;
        let decoder = if cfg.tie_word_embeddings {
            word
        } else {
            b.param("cls.predictions.decoder.weight", f32_syms(&["V", "d"]))
        };
        let bias = b.param("cls.predictions.bias", f32_syms(&["V"]));
        let logits = linear(&mut b, h, decoder, Some(bias), out_in, "logits")?;
        return Ok(b.finish(&[("logits", logits)])?);
    }

    // Mask-weighted mean over the sequence: sum(x * m) / sum(m).
    let m = b.op(Op::Cast { to: DType::F32 }, &[attention_mask])?;
    let m3 = b.reshape(m, vec![sym("B"), sym("T"), Dim::constant(1)])?;
    let xm = b.mul(x, m3)?;
    let sum = b.op(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
            keepdim: false,
        },
        &[xm],
    )?;
    let count = b.op(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: vec![1],
            keepdim: false,
        },
        &[m3],
    )?;
    let pooled = b.named("pooled", Op::Binary(BinaryOp::Div), &[sum, count])?;

    let pw = b.param("pooler.dense.weight", f32_syms(&["d", "d"]));
    let pb = b.param("pooler.dense.bias", f32_syms(&["d"]));
    let first = b.op(
        Op::Slice {
            axis: 1,
            start: Dim::constant(0),
            end: Dim::constant(1),
        },
        &[x],
    )?;
    let first = b.reshape(first, vec![sym("B"), sym("d")])?;
    let dense = linear(&mut b, first, pw, Some(pb), out_in, "pooler.dense")?;
    let pooler = b.named("pooler_output", Op::Unary(kiln_ir::UnaryOp::Tanh), &[dense])?;
    Ok(b.finish(&[
        ("last_hidden_state", x),
        ("pooled", pooled),
        ("pooler_output", pooler),
    ])?)
}

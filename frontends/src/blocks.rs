//! Building blocks the model families share: linear layers in either weight
//! layout, head split/merge, decomposed scaled-dot-product attention, GQA head
//! repetition. Each emits plain IR ops through the builder (shape-checked as added).

use kiln_ir::{
    BinaryOp, DType, Dim, GraphBuilder, IrError, Op, TensorType, UnaryOp, ValueId, WeightLayout,
};

/// A `Dim` symbol.
pub fn sym(name: &str) -> Dim {
    Dim::sym(name)
}

/// `k * name` as a dim.
pub fn times(k: i64, name: &str) -> Result<Dim, IrError> {
    Dim::constant(k)
        .mul(&Dim::sym(name))
        .map_err(|e| IrError::Build(format!("{k} * {name}: {e}")))
}

/// `f32[dims...]` from symbol names or expressions.
pub fn f32_of(dims: Vec<Dim>) -> TensorType {
    TensorType::new(DType::F32, dims)
}

/// `f32[names...]`.
pub fn f32_syms(names: &[&str]) -> TensorType {
    f32_of(names.iter().map(|n| sym(n)).collect())
}

/// Named i64 positions `start, start + 1, …` over the run-time length `len`
/// (the `arange` the KV-cache pass shifts by the cache length when decoding).
pub fn positions(
    b: &mut GraphBuilder,
    name: &str,
    start: i64,
    len: &str,
) -> Result<ValueId, IrError> {
    b.named(
        name,
        Op::Arange {
            start: Dim::constant(start),
            len: sym(len),
            dtype: DType::I64,
        },
        &[],
    )
}

/// An encoder–decoder's inputs: `%tokens: i64[B, S]`, `%attention_mask:
/// i64[B, S]` (of the encoder) and `%decoder_tokens: i64[B, T]`.
pub fn seq2seq_inputs(b: &mut GraphBuilder) -> (ValueId, ValueId, ValueId) {
    let ids = |len: &str| TensorType::new(DType::I64, vec![sym("B"), sym(len)]);
    let tokens = b.input("tokens", ids("S"));
    let attention_mask = b.input("attention_mask", ids("S"));
    let decoder_tokens = b.input("decoder_tokens", ids("T"));
    (tokens, attention_mask, decoder_tokens)
}

/// The named scalar `1 / sqrt(dh)` that scales attention scores, for the
/// head-dim symbol `dh` (which the builder must have bound to a constant).
pub fn attention_scale(b: &mut GraphBuilder, name: &str, dh: &str) -> Result<ValueId, IrError> {
    let value = b
        .cx()
        .eval(&sym(dh))
        .ok()
        .and_then(|d| d.as_const())
        .filter(|&v| v > 0)
        .ok_or_else(|| IrError::Build(format!("head dim `{dh}` is not a positive constant")))?;
    scalar(b, name, 1.0 / (value as f64).sqrt())
}

/// A named scalar f32 constant.
pub fn scalar(b: &mut GraphBuilder, name: &str, value: f64) -> Result<ValueId, IrError> {
    b.named(
        name,
        Op::Constant {
            value,
            dtype: DType::F32,
            shape: vec![],
        },
        &[],
    )
}

/// `x · W (+ bias)` where `W` is stored `[in, out]` (`InOut`, GPT-2 `Conv1D`) or
/// `[out, in]` (`OutIn`, `nn.Linear`); the result is named `name`.
pub fn linear(
    b: &mut GraphBuilder,
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    layout: WeightLayout,
    name: &str,
) -> Result<ValueId, IrError> {
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b: layout == WeightLayout::OutIn,
    };
    match bias {
        None => b.named(name, mm, &[x, w]),
        Some(bias) => {
            let y = b.op(mm, &[x, w])?;
            b.named(name, Op::Binary(BinaryOp::Add), &[y, bias])
        }
    }
}

/// `[B, L, heads * dh]` → `[B, heads, L, dh]`.
pub fn split_heads(
    b: &mut GraphBuilder,
    x: ValueId,
    len: &str,
    heads: &str,
    dh: &str,
) -> Result<ValueId, IrError> {
    let r = b.reshape(x, vec![sym("B"), sym(len), sym(heads), sym(dh)])?;
    b.permute(r, &[0, 2, 1, 3])
}

/// `[B, heads, L, dh]` → `[B, L, width]`.
pub fn merge_heads(
    b: &mut GraphBuilder,
    x: ValueId,
    len: &str,
    width: Dim,
) -> Result<ValueId, IrError> {
    let p = b.permute(x, &[0, 2, 1, 3])?;
    b.reshape(p, vec![sym("B"), sym(len), width])
}

/// `[B, hk, L, dh]` → `[B, hk * rep, L, dh]`, each kv head repeated `rep` times
/// in place (HF `repeat_kv`): reshape, expand, reshape.
pub fn repeat_kv(
    b: &mut GraphBuilder,
    x: ValueId,
    hk: &str,
    rep: &str,
    len: &str,
    dh: &str,
) -> Result<ValueId, IrError> {
    let one = Dim::constant(1);
    let r = b.reshape(x, vec![sym("B"), sym(hk), one, sym(len), sym(dh)])?;
    let e = b.op(
        Op::Expand {
            shape: vec![sym("B"), sym(hk), sym(rep), sym(len), sym(dh)],
        },
        &[r],
    )?;
    let heads = sym(hk)
        .mul(&sym(rep))
        .map_err(|e| IrError::Build(format!("{hk} * {rep}: {e}")))?;
    b.reshape(e, vec![sym("B"), heads, sym(len), sym(dh)])
}

/// Decomposed attention over `[B, h, T, dh]` heads: `softmax(scale·q·kᵀ masked)·v`.
/// `mask` is bool and broadcastable to the scores; masked-out scores become
/// `neg_inf` before the softmax. Intermediate values are named `{prefix}.scores`,
/// `{prefix}.probs`, `{prefix}.ctx`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    b: &mut GraphBuilder,
    prefix: &str,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    mask: Option<ValueId>,
    scale: ValueId,
    neg_inf: ValueId,
) -> Result<ValueId, IrError> {
    let scores = b.named(
        &format!("{prefix}.scores"),
        Op::MatMul {
            transpose_a: false,
            transpose_b: true,
        },
        &[q, k],
    )?;
    let mut scores = b.mul(scores, scale)?;
    if let Some(m) = mask {
        scores = b.op(Op::Where, &[m, scores, neg_inf])?;
    }
    let probs = b.named(
        &format!("{prefix}.probs"),
        Op::Softmax { axis: -1 },
        &[scores],
    )?;
    b.named(
        &format!("{prefix}.ctx"),
        Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        },
        &[probs, v],
    )
}

/// An elementwise activation by its Hugging Face name.
pub fn activation(name: &str) -> Option<UnaryOp> {
    match name {
        "gelu" => Some(UnaryOp::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(UnaryOp::GeluTanh),
        "relu" => Some(UnaryOp::Relu),
        "silu" | "swish" => Some(UnaryOp::Silu),
        "tanh" => Some(UnaryOp::Tanh),
        _ => None,
    }
}

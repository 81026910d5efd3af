//! Attention fusion: decomposed scaled-dot-product attention becomes one
//! `attention` op.
//!
//! Matches, in every function, the chain the frontends emit (and the same chain
//! written in text IR, whatever its value names):
//!
//! ```text
//! %s = matmul(%q, %k) transpose_b=true          scores [B, h, T, S]
//! %s = mul(%s, <scalar>) | mul(<scalar>, %s) | div(%s, <scalar>)   (zero or more)
//! %s = where(%mask, %s, <fill>)                  (optional, at most one)
//! %p = softmax(%s) axis=-1
//! %o = matmul(%p, %v)                            context [B, h, T, dv]
//! ```
//!
//! - The scale is the product of the scalar f32 constants on the way (`div`
//!   divides), including one `mul`/`div` by a scalar constant directly on `q`
//!   or on `k`; no scale at all is `scale = 1.0`. A scale applied after the
//!   `where` is accepted only when positive and the fill is `-inf` (so masked
//!   scores stay `-inf`).
//! - The mask: `causal_mask queries=T keys=S` whose dims equal the scores' `T`
//!   and `S` is the op's own bottom-right causal rule (`causal=true`, no mask
//!   operand); `and(causal, m)` (either order) gives `causal=true` with `m` as
//!   the mask operand; any other bool mask (`padding_mask` output, a user mask)
//!   becomes the 4th operand. The fill must be an f32 constant `-inf`; a finite
//!   fill `<= -1e30` (e.g. `f32::MIN`) is accepted only for the causal mask with
//!   `T == S`, the one case where every query keeps a visible key (a fully
//!   masked row is uniform after a finite fill but zero in `attention`).
//! - GQA: when `k` and `v` both come through `repeat_kv` (reshape
//!   `[B, hk, 1, S, dh]` → expand `[B, hk, rep, S, dh]` → reshape
//!   `[B, hk * rep, S, dh]`), the fused op reads the un-repeated `[B, hk, S, dh]`
//!   tensors (query head `i` reads kv head `i / rep`, exactly what the repeat
//!   did); the repeat is left dead.
//! - Anything before the scores matmul (head split, RoPE on q and k) is kept as
//!   it is; cross-attention (`T` and `S` different symbols) fuses like
//!   self-attention.
//!
//! Produces: the context matmul node rewritten in place into
//! `attention(q, k, v[, mask]) causal=… scale=…`, so it keeps its name (e.g.
//! `%l0.attn.ctx`), its id and its type; the scores, scale, where and softmax
//! nodes are removed. Values the chain read but no longer needs (the causal
//! mask, the constants, the repeat of k and v) are left for `dce`. The pass
//! notes `fused {n} attention patterns`.
//!
//! Guarantees: it fuses only when the result is the same computation: every
//! intermediate from the scores to the softmax has the chain as its only user
//! and is not an output, each has exactly the scores' type (nothing broadcasts
//! wider), the softmax is over the last axis of rank-4 f32 scores, and the
//! `attention` op's shape rule, applied to the chosen operands, gives the
//! context's type under the function's bindings. Otherwise the chain is left
//! untouched. The scale is taken at f32 precision, the precision of the
//! constants it comes from.

use kiln_ir::{
    verify, BinaryOp, DType, Dim, Graph, Module, NodeKind, Op, ShapeCx, TensorType, ValueId,
};

use crate::{Changed, Pass, PassContext, PassError};

/// Replaces decomposed attention chains with one `attention` op.
pub struct AttentionFusion;

/// A finite `where` fill at or below this counts as "minus infinity".
const VERY_NEGATIVE: f64 = -1e30;

/// Everything a match decided: how to rewrite the context matmul and which
/// chain nodes die with it.
struct Fusion {
    ctx: ValueId,
    operands: Vec<ValueId>,
    causal: bool,
    scale: f64,
    alibi: bool,
    /// Softmax first, scores matmul last: the order in which they become dead.
    chain: Vec<ValueId>,
}

/// What the `where` of a chain contributes.
struct Masking {
    causal: bool,
    mask: Option<ValueId>,
}

/// Fuses every matching attention chain of `graph`; returns how many.
pub fn fuse_attention(graph: &mut Graph) -> usize {
    // The verifier's context carries the bindings that dim comparisons need; a
    // graph that does not verify is left alone (the pass manager reports it).
    let Ok(cx) = verify(graph) else {
        return 0;
    };
    let Ok(order) = graph.topo_order() else {
        return 0;
    };
    let softmaxes: Vec<ValueId> = order
        .into_iter()
        .filter(|&v| matches!(graph.op(v), Some(Op::Softmax { .. })))
        .collect();
    let mut fused = 0;
    for s in softmaxes {
        if !graph.contains(s) {
            continue;
        }
        if let Some(f) = match_chain(graph, &cx, s) {
            apply(graph, f);
            fused += 1;
        }
    }
    fused
}

/// Rewrites the context matmul into the fused op and removes the dead chain.
fn apply(graph: &mut Graph, f: Fusion) {
    if let NodeKind::Op { op, .. } = &mut graph.node_mut(f.ctx).kind {
        *op = Op::Attention {
            causal: f.causal,
            scale: f.scale,
            alibi: f.alibi,
            relative: None,
        };
    }
    graph.set_operands(f.ctx, &f.operands);
    for v in f.chain {
        if graph.contains(v) && graph.is_dead(v) {
            graph.remove_node(v);
        }
    }
}

/// The one node using `x`, when `x` has exactly one user and is not an output.
fn sole_user(graph: &Graph, x: ValueId) -> Option<ValueId> {
    if graph.outputs().iter().any(|(_, v)| *v == x) {
        return None;
    }
    match graph.users(x).as_slice() {
        [u] => Some(*u),
        _ => None,
    }
}

/// Whether `a` and `b` are the same type under the bindings.
fn same_type(cx: &ShapeCx, a: &TensorType, b: &TensorType) -> bool {
    a.dtype == b.dtype
        && a.rank() == b.rank()
        && a.shape
            .iter()
            .zip(&b.shape)
            .all(|(x, y)| cx.same(x, y).unwrap_or(false))
}

/// The value of `x` when it is a constant f32 with one element, rounded to
/// f32 as the interpreter materializes it.
fn scalar_constant(graph: &Graph, cx: &ShapeCx, x: ValueId) -> Option<f64> {
    match graph.op(x) {
        Some(Op::Constant {
            value,
            dtype: DType::F32,
            shape,
        }) if shape.iter().all(|d| cx.is_const(d, 1).unwrap_or(false)) => {
            Some(*value as f32 as f64)
        }
        _ => None,
    }
}

/// `(y, c)` when `x = y · c` for a finite scalar constant `c` (`mul` either way
/// round, or `div` by a nonzero constant) and `x` has `y`'s type.
fn scaled_by_constant(graph: &Graph, cx: &ShapeCx, x: ValueId) -> Option<(ValueId, f64)> {
    let ops = graph.operands(x);
    let (y, c) = match (graph.op(x)?, ops.as_slice()) {
        (Op::Binary(BinaryOp::Mul), &[a, b]) => match scalar_constant(graph, cx, b) {
            Some(c) => (a, c),
            None => (b, scalar_constant(graph, cx, a)?),
        },
        (Op::Binary(BinaryOp::Div), &[a, b]) => {
            let c = scalar_constant(graph, cx, b)?;
            if c == 0.0 {
                return None;
            }
            (a, 1.0 / c)
        }
        _ => return None,
    };
    (c.is_finite() && same_type(cx, graph.ty(x), graph.ty(y))).then_some((y, c))
}

/// `x` without one scale by a constant, and that scale (1.0 when there is none).
fn strip_scale(graph: &Graph, cx: &ShapeCx, x: ValueId) -> (ValueId, f64) {
    scaled_by_constant(graph, cx, x).unwrap_or((x, 1.0))
}

/// The un-repeated `[B, hk, S, dh]` tensor when `x` is `repeat_kv` of it:
/// reshape to `[B, hk, 1, S, dh]`, expand to `[B, hk, rep, S, dh]`, reshape to
/// `[B, hk * rep, S, dh]`, so that head `i` of `x` is head `i / rep` of it.
fn unrepeat_kv(graph: &Graph, cx: &ShapeCx, x: ValueId) -> Option<ValueId> {
    let same = |a, b| cx.same(a, b).unwrap_or(false);
    let Some(Op::Reshape { .. }) = graph.op(x) else {
        return None;
    };
    let e = *graph.operands(x).first()?;
    let Some(Op::Expand { .. }) = graph.op(e) else {
        return None;
    };
    let r = *graph.operands(e).first()?;
    let Some(Op::Reshape { .. }) = graph.op(r) else {
        return None;
    };
    let k = *graph.operands(r).first()?;
    let (out, ex, r5, k4) = (
        &graph.ty(x).shape,
        &graph.ty(e).shape,
        &graph.ty(r).shape,
        &graph.ty(k).shape,
    );
    if out.len() != 4 || ex.len() != 5 || r5.len() != 5 || k4.len() != 4 {
        return None;
    }
    // [B, hk, S, dh] -> [B, hk, 1, S, dh]: a unit axis after the kv heads.
    let unit_axis = same(&r5[0], &k4[0])
        && same(&r5[1], &k4[1])
        && cx.is_const(&r5[2], 1).unwrap_or(false)
        && same(&r5[3], &k4[2])
        && same(&r5[4], &k4[3]);
    // Only that unit axis stretches.
    let expand_rep = [0, 1, 3, 4].iter().all(|&i| same(&ex[i], &r5[i]));
    // [B, hk, rep, S, dh] -> [B, hk * rep, S, dh]: kv head major, repeat minor.
    let merged = ex[1].mul(&ex[2]).ok()?;
    let merge = same(&out[0], &ex[0])
        && same(&out[1], &merged)
        && same(&out[2], &ex[3])
        && same(&out[3], &ex[4]);
    (unit_axis && expand_rep && merge).then_some(k)
}

/// The slopes `[h]` when `bias` is an ALiBi bias of the `[B, h, T, S]`
/// scores: `mul` (either order) of `reshape(slopes)` to `[h, 1, 1]` or
/// `[1, h, 1, 1]` and the key positions `0, 1, …, S − 1` as f32 (an f32
/// `arange` or a cast of an integer one), so that head `i`'s score of key `j`
/// gains `slopes[i] · j`, the fused op's ALiBi rule.
fn alibi_slopes(
    graph: &Graph,
    cx: &ShapeCx,
    bias: ValueId,
    scores: &TensorType,
) -> Option<ValueId> {
    let same = |a: &Dim, b: &Dim| cx.same(a, b).unwrap_or(false);
    let one = |d: &Dim| cx.is_const(d, 1).unwrap_or(false);
    let Some(Op::Binary(BinaryOp::Mul)) = graph.op(bias) else {
        return None;
    };
    let &[a, b] = graph.operands(bias).as_slice() else {
        return None;
    };
    let key_positions = |p: ValueId| {
        let p = match graph.op(p) {
            Some(Op::Cast { to: DType::F32 }) => *graph.operands(p).first()?,
            Some(Op::Arange {
                dtype: DType::F32, ..
            }) => p,
            _ => return None,
        };
        match graph.op(p) {
            Some(Op::Arange { start, len, .. })
                if cx.is_const(start, 0).unwrap_or(false) && same(len, &scores.shape[3]) =>
            {
                Some(())
            }
            _ => None,
        }
    };
    let slopes_of = |r: ValueId| {
        let Some(Op::Reshape { shape }) = graph.op(r) else {
            return None;
        };
        let src = *graph.operands(r).first()?;
        let st = graph.ty(src);
        let heads_at = shape.len().checked_sub(3)?;
        let fits = st.rank() == 1
            && st.dtype == DType::F32
            && (shape.len() == 3 || shape.len() == 4)
            && shape.iter().enumerate().all(|(i, d)| {
                if i == heads_at {
                    same(d, &scores.shape[1])
                } else {
                    one(d)
                }
            });
        fits.then_some(src)
    };
    let (r, p) = match (slopes_of(a), slopes_of(b)) {
        (Some(sl), None) => (sl, b),
        (None, Some(sl)) => (sl, a),
        _ => return None,
    };
    let pt = graph.ty(p);
    (pt.rank() == 1 && pt.dtype == DType::F32 && key_positions(p).is_some()).then_some(r)
}

/// Whether `m` is `causal_mask` with exactly the scores' query and key lengths,
/// i.e. the `attention` op's own causal rule.
fn is_standard_causal(graph: &Graph, cx: &ShapeCx, m: ValueId, scores: &TensorType) -> bool {
    match graph.op(m) {
        Some(Op::CausalMask { queries, keys }) => {
            cx.same(queries, &scores.shape[2]).unwrap_or(false)
                && cx.same(keys, &scores.shape[3]).unwrap_or(false)
        }
        _ => false,
    }
}

/// How the where's condition `m` maps onto `causal` and the mask operand.
fn classify_mask(graph: &Graph, cx: &ShapeCx, m: ValueId, scores: &TensorType) -> Masking {
    if is_standard_causal(graph, cx, m, scores) {
        return Masking {
            causal: true,
            mask: None,
        };
    }
    if let (Some(Op::Binary(BinaryOp::And)), [a, b]) = (graph.op(m), graph.operands(m).as_slice()) {
        for (c, other) in [(*a, *b), (*b, *a)] {
            if is_standard_causal(graph, cx, c, scores) {
                return Masking {
                    causal: true,
                    mask: Some(other),
                };
            }
        }
    }
    Masking {
        causal: false,
        mask: Some(m),
    }
}

/// Matches the chain ending in softmax `s`; `None` when it is not exactly
/// decomposed attention.
fn match_chain(graph: &Graph, cx: &ShapeCx, s: ValueId) -> Option<Fusion> {
    let Some(Op::Softmax { axis }) = graph.op(s) else {
        return None;
    };
    let probs_ty = graph.ty(s).clone();
    if probs_ty.rank() != 4 || probs_ty.dtype != DType::F32 || !(*axis == -1 || *axis == 3) {
        return None;
    }
    let ctx = sole_user(graph, s)?;
    let Some(Op::MatMul {
        transpose_a: false,
        transpose_b: false,
    }) = graph.op(ctx)
    else {
        return None;
    };
    let (probs_operand, v) = match graph.operands(ctx).as_slice() {
        &[p, v] => (p, v),
        _ => return None,
    };
    if probs_operand != s || v == s {
        return None;
    }

    let mut chain = vec![s];
    let mut scale = 1.0f64;
    // Scales met before the where when walking back are applied after it.
    let mut scales_after_mask: Vec<f64> = Vec::new();
    let mut masking: Option<Masking> = None;
    let mut slopes: Option<ValueId> = None;
    let mut x = *graph.operands(s).first()?;
    let scores = loop {
        let consumer = *chain.last()?;
        if sole_user(graph, x) != Some(consumer) || !same_type(cx, graph.ty(x), &probs_ty) {
            return None;
        }
        let next = match graph.op(x)? {
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            } => break x,
            // ALiBi: a bias added after every scale (none met yet walking
            // back), at most once.
            Op::Binary(BinaryOp::Add) if slopes.is_none() && scale == 1.0 => {
                let &[a, b] = graph.operands(x).as_slice() else {
                    return None;
                };
                let (y, sl) = match (
                    alibi_slopes(graph, cx, b, &probs_ty),
                    alibi_slopes(graph, cx, a, &probs_ty),
                ) {
                    (Some(sl), _) => (a, sl),
                    (None, Some(sl)) => (b, sl),
                    (None, None) => return None,
                };
                slopes = Some(sl);
                y
            }
            Op::Binary(BinaryOp::Mul | BinaryOp::Div) => {
                let (y, c) = scaled_by_constant(graph, cx, x)?;
                scale *= c;
                if masking.is_none() {
                    scales_after_mask.push(c);
                }
                y
            }
            Op::Where if masking.is_none() => {
                let &[m, a, fill] = graph.operands(x).as_slice() else {
                    return None;
                };
                let fill = mask_fill(graph, fill)?;
                let mk = classify_mask(graph, cx, m, &probs_ty);
                let exact = if fill == f64::NEG_INFINITY {
                    scales_after_mask.iter().all(|&c| c > 0.0)
                } else {
                    // A finite fill keeps fully masked rows uniform, which only
                    // the causal mask with T == S provably never produces.
                    fill <= VERY_NEGATIVE
                        && scales_after_mask.is_empty()
                        && mk.causal
                        && mk.mask.is_none()
                        && cx
                            .same(&probs_ty.shape[2], &probs_ty.shape[3])
                            .unwrap_or(false)
                };
                if !exact {
                    return None;
                }
                masking = Some(mk);
                a
            }
            _ => return None,
        };
        chain.push(x);
        x = next;
    };
    chain.push(scores);

    let (qs, ks) = match graph.operands(scores).as_slice() {
        &[q, k] => (q, k),
        _ => return None,
    };
    let (q, q_scale) = strip_scale(graph, cx, qs);
    let (k, k_scale) = strip_scale(graph, cx, ks);
    scale *= q_scale * k_scale;
    let masking = masking.unwrap_or(Masking {
        causal: false,
        mask: None,
    });

    // Prefer the un-repeated k and v (GQA); fall back to the tensors as they are.
    let mut candidates = Vec::new();
    if let (Some(k_un), Some(v_un)) = (unrepeat_kv(graph, cx, k), unrepeat_kv(graph, cx, v)) {
        let (k_un, inner) = strip_scale(graph, cx, k_un);
        candidates.push((k_un, v_un, scale * inner));
    }
    candidates.push((k, v, scale));

    let ctx_ty = graph.ty(ctx);
    for (k, v, scale) in candidates {
        let mut operands = vec![q, k, v];
        operands.extend(masking.mask);
        operands.extend(slopes);
        let op = Op::Attention {
            causal: masking.causal,
            scale,
            alibi: slopes.is_some(),
            relative: None,
        };
        let types: Vec<TensorType> = operands.iter().map(|&o| graph.ty(o).clone()).collect();
        match op.infer(&types, cx) {
            Ok(t) if same_type(cx, &t, ctx_ty) => {
                return Some(Fusion {
                    ctx,
                    operands,
                    causal: masking.causal,
                    scale,
                    alibi: slopes.is_some(),
                    chain,
                })
            }
            _ => continue,
        }
    }
    None
}

/// The value of a `where` fill when it is an f32 constant that is `-inf` or
/// very negative (anything else would not mean "hidden").
fn mask_fill(graph: &Graph, fill: ValueId) -> Option<f64> {
    match graph.op(fill) {
        Some(Op::Constant {
            value,
            dtype: DType::F32,
            ..
        }) => {
            let v = *value as f32 as f64;
            (v == f64::NEG_INFINITY || v <= VERY_NEGATIVE).then_some(v)
        }
        _ => None,
    }
}

impl Pass for AttentionFusion {
    fn name(&self) -> &'static str {
        "attention-fusion"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut total = 0;
        for g in &mut module.funcs {
            total += fuse_attention(g);
        }
        if total > 0 {
            cx.note(format!("fused {total} attention patterns"));
        }
        Ok(Changed::from_bool(total > 0))
    }
}

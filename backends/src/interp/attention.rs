//! Attention and its helpers: `causal_mask`, `padding_mask`, `rope` and the
//! composite `attention` op (GQA/MQA, boolean mask, bottom-right causal).

use kiln_ir::Dim;

use super::index::{broadcast_map, numel};
use super::reduce::softmax_row;
use super::NodeCx;
use crate::{RunError, Tensor};
use kiln_ir::tensor::TensorData;

/// Whether query `i` of `queries` may see key `j` of `keys` under the causal
/// rule aligned bottom-right: `j <= i + keys - queries`.
fn causal_visible(i: usize, j: usize, queries: usize, keys: usize) -> bool {
    j as i128 <= i as i128 + keys as i128 - queries as i128
}

/// `bool[queries, keys]`, true where `j <= i + keys - queries`.
pub(super) fn causal_mask(n: &NodeCx<'_>, queries: &Dim, keys: &Dim) -> Result<Tensor, RunError> {
    let (q, k) = (n.size(queries)?, n.size(keys)?);
    let values = (0..q)
        .flat_map(|i| (0..k).map(move |j| causal_visible(i, j, q, k)))
        .collect();
    Ok(Tensor::bool(vec![q, k], values)?)
}

/// `padding_mask(m[B, S])` → `bool[B, 1, 1, S]`, true where `m != 0`.
pub(super) fn padding_mask(n: &NodeCx<'_>, m: &Tensor) -> Result<Tensor, RunError> {
    let &[b, s] = m.shape() else {
        return Err(n.invalid(format!("attention mask must be [B, S], got {m}")));
    };
    let values = match m.data() {
        TensorData::I32(d) => d.iter().map(|&v| v != 0).collect(),
        TensorData::I64(d) => d.iter().map(|&v| v != 0).collect(),
        TensorData::Bool(d) => d.to_vec(),
        TensorData::F32(_) | TensorData::F16(_) | TensorData::BF16(_) => {
            return Err(n.invalid(format!("attention mask must be integer or bool, got {m}")))
        }
    };
    Ok(Tensor::bool(vec![b, 1, 1, s], values)?)
}

/// Rotary embedding, rotate-half form (Hugging Face LLaMA), of `x[..., T, dh]`
/// at positions `pos[T]` or `pos[B, T]` (`B` being axis 0 of `x`):
/// `out[i] = x[i]·cos − x[i+half]·sin`, `out[i+half] = x[i+half]·cos + x[i]·sin`
/// with angle `pos · theta^(−2i/dh)`.
///
/// The angle is computed in f64. Hugging Face computes `inv_freq` and the angle
/// in f32, whose rounding grows with the position (about `pos · 2⁻²⁴` radians,
/// ~2e-4 at position 4096), so at long positions HF and this oracle differ by
/// up to ~1e-4 relative; that is HF's error, not ours.
pub(super) fn rope(
    n: &NodeCx<'_>,
    x: &Tensor,
    pos: &Tensor,
    theta: f64,
) -> Result<Tensor, RunError> {
    let xd = n.f32s(x, "input of rope")?;
    let r = x.rank();
    if r < 2 {
        return Err(n.invalid(format!("rope needs [..., T, dh], got {x}")));
    }
    let (t_len, dh) = (x.shape()[r - 2], x.shape()[r - 1]);
    if dh % 2 != 0 {
        return Err(n.invalid(format!("rope needs an even head dim, got {x}")));
    }
    let positions: Vec<i64> = match pos.data() {
        TensorData::I32(d) => d.iter().map(|&p| p as i64).collect(),
        TensorData::I64(d) => d.to_vec(),
        _ => return Err(n.invalid(format!("positions must be i32 or i64, got {pos}"))),
    };
    let batched = match pos.shape() {
        [t] if *t == t_len => false,
        [b, t] if *b == x.shape()[0] && *t == t_len => true,
        _ => return Err(n.invalid(format!("positions {pos} do not match {x}"))),
    };
    let half = dh / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / dh as f64))
        .collect();
    // Rows (one `dh` vector each) per index of axis 0 of `x`.
    let rows_per_batch = numel(&x.shape()[1..r - 1]);
    let mut out = vec![0.0f32; xd.len()];
    for (row, (src, dst)) in xd
        .chunks(dh.max(1))
        .zip(out.chunks_mut(dh.max(1)))
        .enumerate()
    {
        let t = row % t_len.max(1);
        let p = if batched {
            positions[(row / rows_per_batch.max(1)) * t_len + t]
        } else {
            positions[t]
        };
        for i in 0..half {
            let (sin, cos) = (p as f64 * inv_freq[i]).sin_cos();
            let (lo, hi) = (src[i] as f64, src[i + half] as f64);
            dst[i] = (lo * cos - hi * sin) as f32;
            dst[i + half] = (hi * cos + lo * sin) as f32;
        }
    }
    Ok(Tensor::f32(x.shape().to_vec(), out)?)
}

/// The extra operand of an attention with a position bias.
pub(super) enum Bias<'a> {
    /// ALiBi slopes `[h]`.
    Alibi(&'a Tensor),
    /// T5's table `[buckets, h]` and its bucketing.
    Relative(&'a Tensor, kiln_ir::RelativeBias),
}

/// `attention(q[B,h,T,dh], k[B,hk,S,dh], v[B,hk,S,dv] [, mask])`: query head `i`
/// reads kv head `i / (h / hk)`; scores `scale · q·kᵀ`; a key is excluded where
/// the mask is false or (when `causal`) `j > i + S − T`; with ALiBi `slopes[h]`,
/// head `i`'s score of key `j` gains `slopes[i] · j`; softmax over the
/// remaining keys; a query with every key excluded outputs zeros.
pub(super) fn attention(
    n: &NodeCx<'_>,
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
    bias: Option<Bias<'_>>,
    causal: bool,
    scale: f64,
) -> Result<Tensor, RunError> {
    let (qd, kd, vd) = (n.f32s(q, "query")?, n.f32s(k, "key")?, n.f32s(v, "value")?);
    let (slopes, table) = match bias {
        Some(Bias::Alibi(sl)) => (Some(n.f32s(sl, "ALiBi slopes")?), None),
        Some(Bias::Relative(t, rel)) => (None, Some((n.f32s(t, "relative bias table")?, t, rel))),
        None => (None, None),
    };
    let (&[b, h, t, dh], &[kb, hk, s, kdh], &[vb, vhk, vs, dv]) = (q.shape(), k.shape(), v.shape())
    else {
        return Err(n.invalid(format!("attention needs rank-4 q, k, v, got {q}, {k}, {v}")));
    };
    if kb != b
        || vb != b
        || kdh != dh
        || vhk != hk
        || vs != s
        || (h > 0 && (hk == 0 || h % hk != 0))
    {
        return Err(n.invalid(format!("attention shapes disagree: q {q}, k {k}, v {v}")));
    }
    if slopes.as_ref().is_some_and(|sl| sl.len() != h) {
        return Err(n.invalid(format!(
            "attention needs {h} ALiBi slopes, one per query head"
        )));
    }
    if let Some((_, t, rel)) = &table {
        if t.shape() != [rel.buckets, h] {
            return Err(n.invalid(format!(
                "attention needs a relative bias table [{}, {h}], got {t}",
                rel.buckets
            )));
        }
    }
    let group = h.checked_div(hk).unwrap_or(1);
    let scores_shape = [b, h, t, s];
    let mask = match mask {
        None => None,
        Some(m) => {
            let md = m
                .as_bool()
                .ok_or_else(|| n.invalid(format!("attention mask must be bool, got {m}")))?;
            let map = broadcast_map(m.shape(), &scores_shape).ok_or_else(|| {
                n.invalid(format!("mask {m} does not broadcast to {scores_shape:?}"))
            })?;
            Some((md, map))
        }
    };
    let mut out = Vec::with_capacity(b * h * t * dv);
    let mut scores = vec![0.0f64; s];
    for bi in 0..b {
        for hi in 0..h {
            let kv = bi * hk + hi / group;
            for ti in 0..t {
                let qrow = &qd[((bi * h + hi) * t + ti) * dh..][..dh];
                for (j, score) in scores.iter_mut().enumerate() {
                    let score_index = ((bi * h + hi) * t + ti) * s + j;
                    let masked = mask.as_ref().is_some_and(|(md, map)| !md[map[score_index]]);
                    *score = if masked || (causal && !causal_visible(ti, j, t, s)) {
                        f64::NEG_INFINITY
                    } else {
                        let krow = &kd[(kv * s + j) * dh..][..dh];
                        let bias = match (&slopes, &table) {
                            (Some(sl), _) => sl[hi] as f64 * j as f64,
                            (None, Some((td, _, rel))) => {
                                let query = ti as i64 + s as i64 - t as i64;
                                td[rel.bucket(j as i64 - query) * h + hi] as f64
                            }
                            (None, None) => 0.0,
                        };
                        scale
                            * qrow
                                .iter()
                                .zip(krow)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                            + bias
                    };
                }
                // Excluded keys are -inf, so they get weight 0, and an all-excluded
                // row comes back from softmax_row as zeros.
                let probs = softmax_row(&scores);
                for c in 0..dv {
                    let acc: f64 = probs
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| scores[*j] != f64::NEG_INFINITY)
                        .map(|(j, &p)| p * vd[(kv * s + j) * dv + c] as f64)
                        .sum();
                    out.push(acc as f32);
                }
            }
        }
    }
    Ok(Tensor::f32(vec![b, h, t, dv], out)?)
}

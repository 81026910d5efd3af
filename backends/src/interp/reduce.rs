//! Reductions and the ops built on them: reduce_sum/mean/max, softmax,
//! layer_norm, rms_norm. Every sum is accumulated in f64 (i64, wrapping, for
//! integer reductions) and rounded once at the end.

use kiln_ir::ReduceKind;

use super::elementwise::IntElement;
use super::index::{numel, strided_map, strides};
use super::NodeCx;
use crate::{RunError, Tensor};
use kiln_ir::tensor::TensorData;

/// Reduces `x` over `axes` (negative allowed), keeping them as size 1 when `keepdim`.
pub(super) fn reduce(
    n: &NodeCx<'_>,
    x: &Tensor,
    kind: ReduceKind,
    axes: &[i64],
    keepdim: bool,
) -> Result<Tensor, RunError> {
    let mut picked = vec![false; x.rank()];
    for &a in axes {
        let i = n.axis(a, x.rank())?;
        if std::mem::replace(&mut picked[i], true) {
            return Err(n.invalid(format!("axis {a} is listed twice")));
        }
    }
    // The reduced axes as size 1: its row-major flat index is also the index
    // without them, so one map serves both `keepdim` forms.
    let kept: Vec<usize> = x
        .shape()
        .iter()
        .zip(&picked)
        .map(|(&d, &p)| if p { 1 } else { d })
        .collect();
    let kept_strides = strides(&kept);
    let step: Vec<usize> = kept_strides
        .iter()
        .zip(&picked)
        .map(|(&s, &p)| if p { 0 } else { s })
        .collect();
    let target = strided_map(x.shape(), &step, 0);
    let out_len = numel(&kept);
    // How many input elements fold into each output element.
    let count: usize = x
        .shape()
        .iter()
        .zip(&picked)
        .filter(|(_, &p)| p)
        .map(|(&d, _)| d)
        .product();
    if kind == ReduceKind::Max && count == 0 && out_len > 0 {
        return Err(n.invalid(format!("reduce_max over an empty axis of {x}")));
    }
    let shape = if keepdim {
        kept
    } else {
        x.shape()
            .iter()
            .zip(&picked)
            .filter(|(_, &p)| !p)
            .map(|(&d, _)| d)
            .collect()
    };
    let data = match x.data() {
        TensorData::F32(d) => {
            let mut acc = vec![
                if kind == ReduceKind::Max {
                    f64::NEG_INFINITY
                } else {
                    0.0
                };
                out_len
            ];
            for (&v, &t) in d.iter().zip(&target) {
                let v = v as f64;
                acc[t] = match kind {
                    ReduceKind::Sum | ReduceKind::Mean => acc[t] + v,
                    // NaN propagates, as in `torch.amax`.
                    ReduceKind::Max if v.is_nan() || acc[t].is_nan() => f64::NAN,
                    ReduceKind::Max => acc[t].max(v),
                };
            }
            if kind == ReduceKind::Mean {
                // An empty mean is 0 / 0 = NaN, as in PyTorch.
                acc.iter_mut().for_each(|a| *a /= count as f64);
            }
            TensorData::F32(acc.iter().map(|&a| a as f32).collect())
        }
        TensorData::I32(d) => int_reduce(n, kind, d, &target, out_len)?,
        TensorData::I64(d) => int_reduce(n, kind, d, &target, out_len)?,
        TensorData::Bool(_) => return Err(n.invalid("cannot reduce bool")),
        TensorData::F16(_) | TensorData::BF16(_) => {
            return Err(n.invalid(format!(
                "cannot reduce {x} in 16 bits (cast it to f32 first)"
            )))
        }
    };
    Ok(Tensor::new(shape, data)?)
}

fn int_reduce<T: IntElement>(
    n: &NodeCx<'_>,
    kind: ReduceKind,
    d: &[T],
    target: &[usize],
    out_len: usize,
) -> Result<TensorData, RunError> {
    let (init, f): (i64, fn(i64, i64) -> i64) = match kind {
        ReduceKind::Sum => (0, i64::wrapping_add),
        ReduceKind::Max => (i64::MIN, i64::max),
        ReduceKind::Mean => {
            return Err(n.invalid(format!("reduce_mean needs a float input, got {}", T::DTYPE)))
        }
    };
    let mut acc = vec![init; out_len];
    for (&v, &t) in d.iter().zip(target) {
        acc[t] = f(acc[t], v.to_i64());
    }
    Ok(T::wrap(acc.into_iter().map(T::from_i64).collect()))
}

/// `(outer, len, inner)`: `x` seen as `[outer, len, inner]` around axis `a`.
fn split_at_axis(shape: &[usize], a: usize) -> (usize, usize, usize) {
    (numel(&shape[..a]), shape[a], numel(&shape[a + 1..]))
}

/// Softmax along `axis`, stable (the row max is subtracted); a row with no
/// finite maximum because every entry is `-inf` gives zeros, not NaN.
pub(super) fn softmax(n: &NodeCx<'_>, x: &Tensor, axis: i64) -> Result<Tensor, RunError> {
    let d = n.f32s(x, "input of softmax")?;
    let a = n.axis(axis, x.rank())?;
    let (outer, len, inner) = split_at_axis(x.shape(), a);
    let mut out = vec![0.0f32; d.len()];
    let mut row = vec![0.0f64; len];
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| o * len * inner + k * inner + i;
            for (k, r) in row.iter_mut().enumerate() {
                *r = d[at(k)] as f64;
            }
            for (k, p) in softmax_row(&row).into_iter().enumerate() {
                out[at(k)] = p as f32;
            }
        }
    }
    Ok(Tensor::f32(x.shape().to_vec(), out)?)
}

/// Softmax of one row in f64; all `-inf` (or empty) gives zeros.
pub(crate) fn softmax_row(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, |m, v| {
        if v.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(v)
        }
    });
    if max == f64::NEG_INFINITY {
        return vec![0.0; row.len()];
    }
    let exps: Vec<f64> = row.iter().map(|&v| (v - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// The last-axis length of `x` and checks that each of `params` is `f32[that]`.
fn norm_width(n: &NodeCx<'_>, x: &Tensor, params: &[(&str, &Tensor)]) -> Result<usize, RunError> {
    let Some(&width) = x.shape().last() else {
        return Err(n.invalid(format!("cannot normalize the last axis of scalar {x}")));
    };
    for (role, p) in params {
        n.f32s(p, role)?;
        if p.shape() != [width] {
            return Err(n.invalid(format!("{role} {p} does not match the last axis of {x}")));
        }
    }
    Ok(width)
}

/// `(x - mean) / sqrt(var + eps) · w (+ b)` over the last axis, biased variance.
pub(super) fn layer_norm(
    n: &NodeCx<'_>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor, RunError> {
    let d = n.f32s(x, "input of layer_norm")?;
    let mut params = vec![("weight of layer_norm", w)];
    params.extend(b.map(|b| ("bias of layer_norm", b)));
    let width = norm_width(n, x, &params)?;
    let w = n.f32s(w, "weight")?;
    let b = b.map(|b| n.f32s(b, "bias")).transpose()?;
    let mut out = Vec::with_capacity(d.len());
    for row in d.chunks(width.max(1)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (k, &v) in row.iter().enumerate() {
            let y = (v as f64 - mean) * inv * w[k] as f64 + b.map_or(0.0, |b| b[k] as f64);
            out.push(y as f32);
        }
    }
    Ok(Tensor::f32(x.shape().to_vec(), out)?)
}

/// `x / sqrt(mean(x²) + eps) · w` over the last axis.
pub(super) fn rms_norm(
    n: &NodeCx<'_>,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Tensor, RunError> {
    let d = n.f32s(x, "input of rms_norm")?;
    let width = norm_width(n, x, &[("weight of rms_norm", w)])?;
    let w = n.f32s(w, "weight")?;
    let mut out = Vec::with_capacity(d.len());
    for row in d.chunks(width.max(1)) {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (v as f64 * inv * g as f64) as f32),
        );
    }
    Ok(Tensor::f32(x.shape().to_vec(), out)?)
}

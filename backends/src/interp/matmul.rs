//! Matrix products: batched `matmul` and `lora_linear`. Dot products accumulate
//! in f64 (wrapping i64 for integer matmul) and are rounded once.

use kiln_ir::WeightLayout;

use super::elementwise::IntElement;
use super::index::{broadcast_map, broadcast_shapes, numel};
use super::NodeCx;
use crate::{RunError, Tensor};
use kiln_ir::tensor::TensorData;

/// The geometry of one batched product `[.., m, k] · [.., k, n]`.
struct Plan {
    shape: Vec<usize>,
    /// For each output batch, the batch index of `a` and of `b`.
    batches: Vec<(usize, usize)>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
}

impl Plan {
    /// Flat index of `A[i, p]` in batch `ba` (`a` stored as `[k, m]` when transposed).
    fn a_at(&self, ba: usize, i: usize, p: usize) -> usize {
        ba * self.m * self.k
            + if self.ta {
                p * self.m + i
            } else {
                i * self.k + p
            }
    }
    /// Flat index of `B[p, j]` in batch `bb` (`b` stored as `[n, k]` when transposed).
    fn b_at(&self, bb: usize, p: usize, j: usize) -> usize {
        bb * self.k * self.n
            + if self.tb {
                j * self.k + p
            } else {
                p * self.n + j
            }
    }
}

fn plan(nc: &NodeCx<'_>, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Plan, RunError> {
    let (ar, br) = (a.rank(), b.rank());
    if ar < 2 || br < 2 {
        return Err(nc.invalid(format!("matmul needs rank >= 2 operands, got {a} and {b}")));
    }
    let (sa, sb) = (a.shape(), b.shape());
    let (m, ka) = if ta {
        (sa[ar - 1], sa[ar - 2])
    } else {
        (sa[ar - 2], sa[ar - 1])
    };
    let (kb, n) = if tb {
        (sb[br - 1], sb[br - 2])
    } else {
        (sb[br - 2], sb[br - 1])
    };
    if ka != kb {
        return Err(nc.invalid(format!("inner dims differ: {ka} vs {kb} ({a} and {b})")));
    }
    let (batch_a, batch_b) = (&sa[..ar - 2], &sb[..br - 2]);
    let mismatch = || nc.invalid(format!("batch dims of {a} and {b} do not broadcast"));
    let batch = broadcast_shapes(batch_a, batch_b).ok_or_else(mismatch)?;
    let map_a = broadcast_map(batch_a, &batch).ok_or_else(mismatch)?;
    let map_b = broadcast_map(batch_b, &batch).ok_or_else(mismatch)?;
    let mut shape = batch;
    shape.extend([m, n]);
    Ok(Plan {
        shape,
        batches: map_a.into_iter().zip(map_b).collect(),
        m,
        k: ka,
        n,
        ta,
        tb,
    })
}

/// Batched `a · b`; batch dims broadcast; `ta`/`tb` swap the last two axes of that operand.
pub(super) fn matmul(
    nc: &NodeCx<'_>,
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
) -> Result<Tensor, RunError> {
    let p = plan(nc, a, b, ta, tb)?;
    let data = match (a.data(), b.data()) {
        (x, y) if x.dtype().is_float() && y.dtype().is_float() => {
            // A 16-bit weight is read as stored, each element widened as it is read.
            let (x, y) = (Floats::of(x), Floats::of(y));
            TensorData::F32(
                products(&p, |ba, bb, i, j| {
                    let dot: f64 = (0..p.k)
                        .map(|q| x.get(p.a_at(ba, i, q)) * y.get(p.b_at(bb, q, j)))
                        .sum();
                    dot as f32
                })
                .into(),
            )
        }
        (TensorData::I32(x), TensorData::I32(y)) => int_matmul(&p, x, y),
        (TensorData::I64(x), TensorData::I64(y)) => int_matmul(&p, x, y),
        _ => return Err(nc.invalid(format!("matmul cannot multiply {a} by {b}"))),
    };
    Ok(Tensor::new(p.shape.clone(), data)?)
}

/// The elements of a float tensor of any width, read as f64.
enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl<'a> Floats<'a> {
    fn of(d: &'a TensorData) -> Floats<'a> {
        match d {
            TensorData::F16(v) => Floats::F16(v),
            TensorData::BF16(v) => Floats::BF16(v),
            TensorData::F32(v) => Floats::F32(v),
            _ => Floats::F32(&[]),
        }
    }

    fn get(&self, i: usize) -> f64 {
        match self {
            Floats::F32(v) => v[i] as f64,
            Floats::F16(v) => v[i].to_f64(),
            Floats::BF16(v) => v[i].to_f64(),
        }
    }
}

/// Every output element, batch by batch, row by row.
fn products<T>(p: &Plan, mut f: impl FnMut(usize, usize, usize, usize) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(p.batches.len() * p.m * p.n);
    for &(ba, bb) in &p.batches {
        for i in 0..p.m {
            for j in 0..p.n {
                out.push(f(ba, bb, i, j));
            }
        }
    }
    out
}

fn int_matmul<T: IntElement>(p: &Plan, x: &[T], y: &[T]) -> TensorData {
    T::wrap(products(p, |ba, bb, i, j| {
        let dot = (0..p.k).fold(0i64, |acc, q| {
            acc.wrapping_add(
                x[p.a_at(ba, i, q)]
                    .to_i64()
                    .wrapping_mul(y[p.b_at(bb, q, j)].to_i64()),
            )
        });
        T::from_i64(dot)
    }))
}

/// `x·w + (alpha / r)·(x·a)·b (+ bias)` over the last axis of `x`, with `w`, `a`,
/// `b` laid out per `layout` (see [`WeightLayout`]). The low-rank product stays
/// in f64 (it is not rounded to f32 between the two factors).
pub(super) fn lora_linear(
    nc: &NodeCx<'_>,
    [x, w, a, b]: [&Tensor; 4],
    bias: Option<&Tensor>,
    alpha: f64,
    layout: WeightLayout,
) -> Result<Tensor, RunError> {
    let xd = nc.f32s(x, "input of lora_linear")?;
    let (wd, ad, bd) = (
        nc.f32s(w, "weight")?,
        nc.f32s(a, "lora_a")?,
        nc.f32s(b, "lora_b")?,
    );
    let biasd = bias.map(|t| nc.f32s(t, "bias")).transpose()?;
    let (ws, as_, bs) = (w.shape(), a.shape(), b.shape());
    if ws.len() != 2 || as_.len() != 2 || bs.len() != 2 {
        return Err(nc.invalid(format!(
            "weights of lora_linear must be matrices, got {w}, {a}, {b}"
        )));
    }
    // (in, out) of w, (in, r) of a, (r, out) of b, whatever the storage layout.
    let in_out = layout == WeightLayout::InOut;
    let (din, dout) = if in_out {
        (ws[0], ws[1])
    } else {
        (ws[1], ws[0])
    };
    let (a_in, r) = if in_out {
        (as_[0], as_[1])
    } else {
        (as_[1], as_[0])
    };
    let (b_r, b_out) = if in_out {
        (bs[0], bs[1])
    } else {
        (bs[1], bs[0])
    };
    let Some(&x_in) = x.shape().last() else {
        return Err(nc.invalid(format!("input of lora_linear {x} has no feature axis")));
    };
    if x_in != din
        || a_in != din
        || b_r != r
        || b_out != dout
        || bias.is_some_and(|t| t.shape() != [dout])
    {
        return Err(nc.invalid(format!(
            "lora_linear shapes disagree: x {x}, w {w}, a {a}, b {b}{} ({layout:?})",
            bias.map_or_else(String::new, |t| format!(", bias {t}"))
        )));
    }
    let w_at = |i: usize, o: usize| wd[if in_out { i * dout + o } else { o * din + i }] as f64;
    let a_at = |i: usize, k: usize| ad[if in_out { i * r + k } else { k * din + i }] as f64;
    let b_at = |k: usize, o: usize| bd[if in_out { k * dout + o } else { o * r + k }] as f64;
    // With rank 0 the adapter term is an empty sum; skip it rather than form alpha / 0.
    let scale = if r == 0 { 0.0 } else { alpha / r as f64 };
    let rows = numel(&x.shape()[..x.rank() - 1]);
    let mut out = Vec::with_capacity(rows * dout);
    for row in 0..rows {
        let xr = &xd[row * din..(row + 1) * din];
        let xa: Vec<f64> = (0..r)
            .map(|k| (0..din).map(|i| xr[i] as f64 * a_at(i, k)).sum())
            .collect();
        for o in 0..dout {
            let base: f64 = (0..din).map(|i| xr[i] as f64 * w_at(i, o)).sum();
            let low_rank: f64 = (0..r).map(|k| xa[k] * b_at(k, o)).sum();
            let y = base + scale * low_rank + biasd.map_or(0.0, |bb| bb[o] as f64);
            out.push(y as f32);
        }
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = dout;
    }
    Ok(Tensor::f32(shape, out)?)
}

//! The eight kernel kinds as plain loops over resolved views.

use kiln_ir::{DType, KernelOp, ReduceKind, ShapeCx};

use super::scalar::{body_dtypes, run_body, Scalar};
use super::{CView, Memory};
use crate::interp::softmax_row;
use crate::lower::{FillOp, Kernel, RowOp};
use crate::RunError;

/// Why a step failed; the caller names the step.
pub(crate) enum StepError {
    Run(RunError),
    Message(String),
    Gather { id: i64, rows: usize },
}

impl StepError {
    /// The error as a message, for callers that name the step themselves.
    fn into_message(self) -> String {
        match self {
            StepError::Message(m) => m,
            StepError::Run(e) => e.to_string(),
            StepError::Gather { id, rows } => {
                format!("id {id} is out of range for a table of {rows} rows")
            }
        }
    }
}

impl From<String> for StepError {
    fn from(m: String) -> StepError {
        StepError::Message(m)
    }
}

pub(crate) type R = Result<(), StepError>;

/// Calls `f` with every multi-index of `shape`, row-major.
pub(crate) fn each_index(shape: &[usize], mut f: impl FnMut(&[usize]) -> R) -> R {
    if shape.contains(&0) {
        return Ok(());
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        f(&idx)?;
        let mut k = shape.len();
        loop {
            if k == 0 {
                return Ok(());
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

pub(crate) fn run_step(
    m: &mut Memory<'_>,
    kernel: &Kernel,
    ins: &[&CView],
    out: &CView,
    cx: &ShapeCx,
) -> R {
    match kernel {
        Kernel::Loop { body } => run_loop(m, body, ins, out),
        Kernel::Copy => each_index(&out.shape, |idx| {
            let v = m.read(ins[0], ins[0].at(idx))?;
            Ok(m.write(out, out.at(idx), v)?)
        }),
        Kernel::Fill(f) => fill(m, f, out, cx),
        Kernel::Gemm { epilogue } => gemm(m, epilogue, ins, out),
        Kernel::Row(r) => row(m, r, ins, out),
        Kernel::Attention {
            causal,
            scale,
            alibi,
            relative,
        } => attention(m, ins, out, *causal, *scale, *alibi, *relative),
        Kernel::Gather => gather(m, ins, out),
        Kernel::Moe { top_k } => moe(m, ins, out, *top_k),
        Kernel::Rope { theta } => rope(m, ins, out, *theta),
    }
}

fn run_loop(m: &mut Memory<'_>, body: &[KernelOp], ins: &[&CView], out: &CView) -> R {
    let operand_types: Vec<DType> = ins.iter().map(|v| v.dtype).collect();
    let dtypes = body_dtypes(body, &operand_types);
    let mut vals = Vec::with_capacity(dtypes.len());
    each_index(&out.shape, |idx| {
        vals.clear();
        for v in ins {
            vals.push(m.read(v, v.at(idx))?);
        }
        let x = run_body(body, &dtypes, &mut vals)?;
        Ok(m.write(out, out.at(idx), x)?)
    })
}

fn fill(m: &mut Memory<'_>, f: &FillOp, out: &CView, cx: &ShapeCx) -> R {
    let start = match f {
        FillOp::Arange { start } => {
            crate::eval_int_in(cx, start, "arange start").map_err(StepError::Run)?
        }
        _ => 0,
    };
    let (q, k) = match out.shape.as_slice() {
        [q, k] => (*q as i128, *k as i128),
        _ => (0, 0),
    };
    each_index(&out.shape, |idx| {
        let v = match f {
            FillOp::Constant { value } => Scalar::Float(*value),
            FillOp::Arange { .. } => Scalar::Int(start.wrapping_add(idx[0] as i64)),
            FillOp::CausalMask => Scalar::Bool(idx[1] as i128 <= idx[0] as i128 + k - q),
        };
        Ok(m.write(out, out.at(idx), v.to(out.dtype))?)
    })
}

fn gemm(m: &mut Memory<'_>, epilogue: &[KernelOp], ins: &[&CView], out: &CView) -> R {
    let (a, b) = (ins[0], ins[1]);
    let extras = &ins[2..];
    let r = out.shape.len();
    let k = a.shape[r - 1];
    let mut types = vec![out.dtype];
    types.extend(extras.iter().map(|v| v.dtype));
    let dtypes = body_dtypes(epilogue, &types);
    let mut vals = Vec::new();
    let int = !out.dtype.is_float();
    let mut ai = vec![0usize; r];
    let mut bi = vec![0usize; r];
    each_index(&out.shape, |idx| {
        ai.copy_from_slice(idx);
        bi.copy_from_slice(idx);
        let (mut accf, mut acci) = (0f64, 0i64);
        for p in 0..k {
            ai[r - 1] = p;
            bi[r - 2] = p;
            let (x, y) = (m.read(a, a.at(&ai))?, m.read(b, b.at(&bi))?);
            if int {
                acci = acci.wrapping_add(x.int()?.wrapping_mul(y.int()?));
            } else {
                accf += x.float()? * y.float()?;
            }
        }
        let acc = if int {
            Scalar::Int(acci)
        } else {
            Scalar::Float(accf)
        }
        .to(out.dtype);
        let v = if epilogue.is_empty() {
            acc
        } else {
            vals.clear();
            vals.push(acc);
            for e in extras {
                vals.push(m.read(e, e.at(idx))?);
            }
            run_body(epilogue, &dtypes, &mut vals)?
        };
        Ok(m.write(out, out.at(idx), v)?)
    })
}

fn row(m: &mut Memory<'_>, op: &RowOp, ins: &[&CView], out: &CView) -> R {
    let x = ins[0];
    let outer_rank = match op {
        RowOp::Reduce { axes, .. } => x.shape.len() - axes,
        _ => x.shape.len().saturating_sub(1),
    };
    let (outer, row_shape) = x.shape.split_at(outer_rank);
    let width: usize = row_shape.iter().product();
    let mut xi = vec![0usize; x.shape.len()];
    let mut values: Vec<Scalar> = Vec::with_capacity(width);
    let mut positions: Vec<usize> = Vec::with_capacity(width);
    each_index(outer, |o| {
        xi[..outer_rank].copy_from_slice(o);
        values.clear();
        positions.clear();
        each_index(row_shape, |r| {
            xi[outer_rank..].copy_from_slice(r);
            values.push(m.read(x, x.at(&xi))?);
            positions.push(out.at(&xi[..out.shape.len()]));
            Ok(())
        })?;
        match op {
            RowOp::Reduce { kind, .. } => {
                let v = reduce(*kind, &values)?;
                Ok(m.write(out, out.at(o), v)?)
            }
            RowOp::Softmax => {
                let row: Vec<f64> = values.iter().map(|v| v.float()).collect::<Result<_, _>>()?;
                for (p, &at) in softmax_row(&row).into_iter().zip(&positions) {
                    m.write(out, at, Scalar::Float(p))?;
                }
                Ok(())
            }
            RowOp::LayerNorm { eps } | RowOp::RmsNorm { eps } => {
                let row: Vec<f64> = values.iter().map(|v| v.float()).collect::<Result<_, _>>()?;
                let layer = matches!(op, RowOp::LayerNorm { .. });
                let (mean, inv) = norm_stats(&row, layer, *eps);
                for (j, (&v, &at)) in row.iter().zip(&positions).enumerate() {
                    let w = m.read(ins[1], ins[1].at(&[j]))?.float()?;
                    let b = match ins.get(2) {
                        Some(bv) => m.read(bv, bv.at(&[j]))?.float()?,
                        None => 0.0,
                    };
                    let y = if layer {
                        (v - mean) * inv * w + b
                    } else {
                        v * inv * w
                    };
                    m.write(out, at, Scalar::Float(y))?;
                }
                Ok(())
            }
        }
    })
}

/// A float reduction with the interpreter's rules: sums in f64, NaN
/// propagating through max, an empty max an error, an empty mean NaN.
pub(crate) fn reduce_floats(kind: ReduceKind, values: &[f64]) -> Result<f64, StepError> {
    if kind == ReduceKind::Max && values.is_empty() {
        return Err(StepError::Message("reduce_max over an empty axis".into()));
    }
    let mut acc = if kind == ReduceKind::Max {
        f64::NEG_INFINITY
    } else {
        0.0
    };
    for &v in values {
        acc = match kind {
            ReduceKind::Sum | ReduceKind::Mean => acc + v,
            ReduceKind::Max if v.is_nan() || acc.is_nan() => f64::NAN,
            ReduceKind::Max => acc.max(v),
        };
    }
    if kind == ReduceKind::Mean {
        acc /= values.len() as f64;
    }
    Ok(acc)
}

/// The mean (0 for an RMS norm) and the inverse deviation of one row, as
/// layer_norm and rms_norm define them over the last axis.
pub(crate) fn norm_stats(row: &[f64], layer: bool, eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = if layer {
        row.iter().sum::<f64>() / n
    } else {
        0.0
    };
    let var = row.iter().map(|&v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn reduce(kind: ReduceKind, values: &[Scalar]) -> Result<Scalar, StepError> {
    match values.first() {
        Some(Scalar::Int(_)) => {
            let ints: Vec<i64> = values.iter().map(|v| v.int()).collect::<Result<_, _>>()?;
            Ok(Scalar::Int(match kind {
                ReduceKind::Sum => ints.iter().fold(0i64, |a, &b| a.wrapping_add(b)),
                ReduceKind::Max => ints.iter().copied().fold(i64::MIN, i64::max),
                ReduceKind::Mean => {
                    return Err("reduce_mean needs a float input".to_string().into())
                }
            }))
        }
        Some(Scalar::Bool(_)) => Err("cannot reduce bool".to_string().into()),
        _ => {
            let floats: Vec<f64> = values.iter().map(|v| v.float()).collect::<Result<_, _>>()?;
            Ok(Scalar::Float(reduce_floats(kind, &floats)?))
        }
    }
}

fn attention(
    m: &mut Memory<'_>,
    ins: &[&CView],
    out: &CView,
    causal: bool,
    scale: f64,
    alibi: bool,
    relative: Option<kiln_ir::RelativeBias>,
) -> R {
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    let (ins, extra) = if alibi || relative.is_some() {
        (&ins[..ins.len() - 1], ins.last())
    } else {
        (ins, None)
    };
    let (slopes, table) = match relative {
        Some(r) => (None, extra.map(|t| (t, r))),
        None => (extra, None),
    };
    let mask = ins.get(3);
    let [b, h, t, dh] = q.shape[..] else {
        return Err("attention needs rank-4 q".to_string().into());
    };
    let (hk, s, dv) = (k.shape[1], k.shape[2], v.shape[3]);
    if hk == 0 || h % hk != 0 {
        return Err(format!("{h} query heads do not group over {hk} kv heads").into());
    }
    let group = h / hk;
    let mut scores = vec![0f64; s];
    for bi in 0..b {
        for hi in 0..h {
            let kv = hi / group;
            let slope = match slopes {
                Some(sv) => m.read(sv, sv.at(&[hi]))?.float()?,
                None => 0.0,
            };
            for ti in 0..t {
                for (j, score) in scores.iter_mut().enumerate() {
                    let visible = !causal || j as i128 <= ti as i128 + s as i128 - t as i128;
                    let allowed = match mask {
                        Some(mv) => {
                            matches!(m.read(mv, mv.at(&[bi, hi, ti, j]))?, Scalar::Bool(true))
                        }
                        None => true,
                    };
                    *score = if !(visible && allowed) {
                        f64::NEG_INFINITY
                    } else {
                        let mut dot = 0f64;
                        for c in 0..dh {
                            dot += m.read(q, q.at(&[bi, hi, ti, c]))?.float()?
                                * m.read(k, k.at(&[bi, kv, j, c]))?.float()?;
                        }
                        let rel = match table {
                            Some((tv, r)) => {
                                let query = ti as i64 + s as i64 - t as i64;
                                m.read(tv, tv.at(&[r.bucket(j as i64 - query), hi]))?
                                    .float()?
                            }
                            None => 0.0,
                        };
                        scale * dot + slope * j as f64 + rel
                    };
                }
                let probs = softmax_row(&scores);
                for c in 0..dv {
                    let mut acc = 0f64;
                    for (j, &p) in probs.iter().enumerate() {
                        if scores[j] != f64::NEG_INFINITY {
                            acc += p * m.read(v, v.at(&[bi, kv, j, c]))?.float()?;
                        }
                    }
                    m.write(out, out.at(&[bi, hi, ti, c]), Scalar::Float(acc))?;
                }
            }
        }
    }
    Ok(())
}

/// Every element of a view as f64, in row-major order of its shape.
fn read_all(m: &Memory<'_>, v: &CView) -> Result<Vec<f64>, StepError> {
    let mut out = Vec::new();
    each_index(&v.shape, |idx| {
        out.push(m.read(v, v.at(idx))?.float()?);
        Ok(())
    })?;
    Ok(out)
}

fn moe(m: &mut Memory<'_>, ins: &[&CView], out: &CView, top_k: usize) -> R {
    let [x, router, gate, up, down] = ins[..] else {
        return Err("moe takes five operands".to_string().into());
    };
    let (e, f, d) = match (&router.shape[..], &gate.shape[..]) {
        ([e, _], [_, f, d]) => (*e, *f, *d),
        _ => {
            return Err("moe needs router [E, d] and gate [E, f, d]"
                .to_string()
                .into())
        }
    };
    let vals = [router, gate, up, down]
        .iter()
        .map(|v| read_all(m, v))
        .collect::<Result<Vec<_>, _>>()?;
    let xs = read_all(m, x)?;
    let y = crate::routing::moe_rows(
        &xs,
        [&vals[0], &vals[1], &vals[2], &vals[3]],
        (e, f, d),
        top_k,
    );
    let mut it = y.into_iter();
    each_index(&out.shape, |idx| {
        let v = it.next().unwrap_or(f64::NAN);
        Ok(m.write(out, out.at(idx), Scalar::Float(v))?)
    })
}

fn gather(m: &mut Memory<'_>, ins: &[&CView], out: &CView) -> R {
    let (table, ids) = (ins[0], ins[1]);
    let rows = table.shape.first().copied().unwrap_or(0);
    let lead = ids.shape.len();
    let mut ti = vec![0usize; table.shape.len()];
    each_index(&out.shape, |idx| {
        let id = m.read(ids, ids.at(&idx[..lead]))?.int()?;
        let r = usize::try_from(id)
            .ok()
            .filter(|&r| r < rows)
            .ok_or(StepError::Gather { id, rows })?;
        ti[0] = r;
        ti[1..].copy_from_slice(&idx[lead..]);
        let v = m.read(table, table.at(&ti))?;
        Ok(m.write(out, out.at(idx), v)?)
    })
}

fn rope(m: &mut Memory<'_>, ins: &[&CView], out: &CView, theta: f64) -> R {
    let (x, pos) = (ins[0], ins[1]);
    let r = x.shape.len();
    let dh = x.shape[r - 1];
    if dh % 2 != 0 {
        return Err(format!("rope needs an even head dim, got {dh}").into());
    }
    let half = dh / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / dh as f64))
        .collect();
    let mut xi = vec![0usize; r];
    each_index(&x.shape[..r - 1], |row| {
        let p = m.read(pos, pos.at(row))?.int()?;
        xi[..r - 1].copy_from_slice(row);
        for (i, f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (p as f64 * f).sin_cos();
            xi[r - 1] = i;
            let (lo_at, lo_out) = (x.at(&xi), out.at(&xi));
            xi[r - 1] = i + half;
            let (hi_at, hi_out) = (x.at(&xi), out.at(&xi));
            let (lo, hi) = (m.read(x, lo_at)?.float()?, m.read(x, hi_at)?.float()?);
            m.write(out, lo_out, Scalar::Float(lo * cos - hi * sin))?;
            m.write(out, hi_out, Scalar::Float(hi * cos + lo * sin))?;
        }
        Ok(())
    })
}

/// Row-major strides of `shape`.
fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A host tensor from the little-endian bytes of `shape`'s elements of
/// `dtype`, laid out contiguously (a bool byte other than 0 or 1 is an error;
/// 16-bit elements are not returned as host tensors).
pub(crate) fn tensor_from_le_bytes(
    shape: Vec<usize>,
    dtype: DType,
    bytes: &[u8],
) -> Result<kiln_ir::Tensor, String> {
    let t = match dtype {
        DType::F32 => kiln_ir::Tensor::f32(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::I32 => kiln_ir::Tensor::i32(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::I64 => kiln_ir::Tensor::i64(
            shape,
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DType::Bool => {
            if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                return Err(format!("element {b} is not a bool (0 or 1)"));
            }
            kiln_ir::Tensor::bool(shape, bytes.iter().map(|&b| b == 1).collect())
        }
        DType::F16 | DType::BF16 => {
            return Err(format!(
                "a {dtype} output cannot be returned as a host tensor"
            ))
        }
    };
    t.map_err(|e| e.to_string())
}

/// Writes host tensor `t` into the view `v` (a cache given as an input).
pub(super) fn write_tensor(
    m: &mut Memory<'_>,
    v: &CView,
    t: &kiln_ir::Tensor,
) -> Result<(), String> {
    if t.shape() != v.shape.as_slice() {
        return Err(format!(
            "shape {:?} does not fit the view {:?}",
            t.shape(),
            v.shape
        ));
    }
    let mut k = 0usize;
    let r = each_index(&v.shape, |idx| {
        let x = super::tensor_elem(t, k).ok_or_else(|| format!("element {k} is missing"))?;
        k += 1;
        Ok(m.write(v, v.at(idx), x)?)
    });
    r.map_err(StepError::into_message)
}

/// The elements of view `v` as a host tensor.
pub(super) fn read_tensor(m: &Memory<'_>, v: &CView) -> Result<kiln_ir::Tensor, String> {
    // A contiguous view: decode its bytes in one pass, straight into the
    // tensor's storage (no per-element scalar: a 7.4 GB i64 output took
    // 14.8 GB more that way).
    let size = v.dtype.size_bytes();
    if v.strides == contiguous(&v.shape) && v.dtype != DType::F16 && v.dtype != DType::BF16 {
        let n: usize = v.shape.iter().product();
        if let Some(bytes) = m.bytes_of(v.root, v.offset * size, n * size) {
            return tensor_from_le_bytes(v.shape.clone(), v.dtype, bytes);
        }
    }
    let mut vals = Vec::with_capacity(v.shape.iter().product());
    let r = each_index(&v.shape, |idx| {
        vals.push(m.read(v, v.at(idx))?);
        Ok(())
    });
    r.map_err(StepError::into_message)?;
    let shape = v.shape.clone();
    let bad = |x: &Scalar| format!("element {x:?} does not match dtype {}", v.dtype);
    let t = match v.dtype {
        DType::F32 => kiln_ir::Tensor::f32(
            shape,
            vals.iter()
                .map(|x| x.float().map(|f| f as f32).map_err(|_| bad(x)))
                .collect::<Result<_, _>>()?,
        ),
        DType::I64 => kiln_ir::Tensor::i64(
            shape,
            vals.iter()
                .map(|x| x.int().map_err(|_| bad(x)))
                .collect::<Result<_, _>>()?,
        ),
        DType::I32 => kiln_ir::Tensor::i32(
            shape,
            vals.iter()
                .map(|x| x.int().map(|i| i as i32).map_err(|_| bad(x)))
                .collect::<Result<_, _>>()?,
        ),
        DType::Bool => kiln_ir::Tensor::bool(
            shape,
            vals.iter()
                .map(|x| match x {
                    Scalar::Bool(b) => Ok(*b),
                    _ => Err(bad(x)),
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::F16 | DType::BF16 => {
            return Err(format!(
                "a {} output cannot be returned as a host tensor",
                v.dtype
            ))
        }
    };
    t.map_err(|e| e.to_string())
}

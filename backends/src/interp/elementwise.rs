//! Elementwise ops: unary, binary (numpy broadcasting), `where`, `cast`, and the
//! value-producing `constant` and `arange`.
//!
//! Float math is done in f64 and rounded once to f32. For `+ - * /` and `sqrt`
//! that equals the f32 operation exactly (f64 has more than twice f32's
//! precision, so the double rounding is harmless); for `exp`, `tanh`, `erf`, …
//! it is the correctly rounded value or within an ulp of it. Integer math is
//! done in i64 and wraps to the element type, like PyTorch.

use kiln_ir::{BinaryOp, DType, Dim, UnaryOp};

use super::index::{broadcast_map, broadcast_shapes};
use super::NodeCx;
use crate::{RunError, Tensor};
use kiln_ir::tensor::{Element, TensorData};

/// An integer element type, computed on as i64 and wrapped back.
pub(crate) trait IntElement: Element {
    /// Widens to i64.
    fn to_i64(self) -> i64;
    /// Narrows from i64, wrapping (two's complement truncation).
    fn from_i64(v: i64) -> Self;
}

impl IntElement for i32 {
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v as i32
    }
}

impl IntElement for i64 {
    fn to_i64(self) -> i64 {
        self
    }
    fn from_i64(v: i64) -> Self {
        v
    }
}

/// The interpreter computes in f32: a 16-bit weight is widened before an op
/// reads it, so a 16-bit operand here is a value the graph computed in 16 bits.
fn half_value(n: &NodeCx<'_>, x: &Tensor) -> RunError {
    n.invalid(format!(
        "the interpreter computes in f32, but an operand is {x} (cast it to f32 first)"
    ))
}

/// `u(x)` elementwise.
pub(super) fn unary(n: &NodeCx<'_>, u: UnaryOp, x: &Tensor) -> Result<Tensor, RunError> {
    let data = match x.data() {
        TensorData::F32(d) => {
            let f = u
                .float_fn()
                .ok_or_else(|| n.invalid(format!("{} does not apply to f32", u.name())))?;
            TensorData::F32(d.iter().map(|&v| f(v as f64) as f32).collect())
        }
        TensorData::I32(d) => int_unary(n, u, d)?,
        TensorData::I64(d) => int_unary(n, u, d)?,
        TensorData::Bool(d) => match u {
            UnaryOp::Not => TensorData::Bool(d.iter().map(|&v| !v).collect()),
            _ => return Err(n.invalid(format!("{} does not apply to bool", u.name()))),
        },
        TensorData::F16(_) | TensorData::BF16(_) => return Err(half_value(n, x)),
    };
    Ok(Tensor::new(x.shape().to_vec(), data)?)
}

fn int_unary<T: IntElement>(n: &NodeCx<'_>, u: UnaryOp, d: &[T]) -> Result<TensorData, RunError> {
    let f: fn(i64) -> i64 = match u {
        UnaryOp::Neg => i64::wrapping_neg,
        UnaryOp::Abs => i64::wrapping_abs,
        UnaryOp::Relu => |x| x.max(0),
        _ => return Err(n.invalid(format!("{} does not apply to {}", u.name(), T::DTYPE))),
    };
    Ok(T::wrap(
        d.iter().map(|&v| T::from_i64(f(v.to_i64()))).collect(),
    ))
}

/// The broadcast result shape of `shapes` and, for each operand, its source-index map.
fn broadcast_all(
    n: &NodeCx<'_>,
    shapes: &[&[usize]],
) -> Result<(Vec<usize>, Vec<Vec<usize>>), RunError> {
    let mut out: Vec<usize> = Vec::new();
    for s in shapes {
        out = broadcast_shapes(&out, s)
            .ok_or_else(|| n.invalid(format!("cannot broadcast {out:?} with {s:?}")))?;
    }
    let maps = shapes
        .iter()
        .map(|s| {
            broadcast_map(s, &out)
                .ok_or_else(|| n.invalid(format!("cannot broadcast {s:?} to {out:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((out, maps))
}

/// `a op b` elementwise with numpy broadcasting.
pub(super) fn binary(
    n: &NodeCx<'_>,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor, RunError> {
    let (shape, maps) = broadcast_all(n, &[a.shape(), b.shape()])?;
    let (ia, ib) = (&maps[0], &maps[1]);
    let data = match (a.data(), b.data()) {
        (TensorData::F32(x), TensorData::F32(y)) => {
            let pairs = ia.iter().zip(ib).map(|(&i, &j)| (x[i] as f64, y[j] as f64));
            if op.is_predicate() {
                comparison(n, op, DType::F32)?;
                TensorData::Bool(
                    pairs
                        .map(|(p, q)| op.compare(p.partial_cmp(&q)) == Some(true))
                        .collect(),
                )
            } else {
                let f = float_binary(n, op)?;
                TensorData::F32(pairs.map(|(p, q)| f(p, q) as f32).collect())
            }
        }
        (TensorData::I32(x), TensorData::I32(y)) => int_binary(n, op, x, y, ia, ib)?,
        (TensorData::I64(x), TensorData::I64(y)) => int_binary(n, op, x, y, ia, ib)?,
        (TensorData::Bool(x), TensorData::Bool(y)) => {
            let f: fn(bool, bool) -> bool = match op {
                BinaryOp::Eq => |p, q| p == q,
                BinaryOp::Ne => |p, q| p != q,
                BinaryOp::And => |p, q| p && q,
                BinaryOp::Or => |p, q| p || q,
                _ => return Err(n.invalid(format!("{} does not apply to bool", op.name()))),
            };
            TensorData::Bool(ia.iter().zip(ib).map(|(&i, &j)| f(x[i], y[j])).collect())
        }
        (x, y) => {
            return Err(n.invalid(format!(
                "operands of {} have different dtypes {} and {}",
                op.name(),
                x.dtype(),
                y.dtype()
            )))
        }
    };
    Ok(Tensor::new(shape, data)?)
}

/// The f64 function of an arithmetic op on floats.
fn float_binary(n: &NodeCx<'_>, op: BinaryOp) -> Result<fn(f64, f64) -> f64, RunError> {
    Ok(match op {
        BinaryOp::Add => |p, q| p + q,
        BinaryOp::Sub => |p, q| p - q,
        BinaryOp::Mul => |p, q| p * q,
        BinaryOp::Div => |p, q| p / q,
        BinaryOp::Pow => f64::powf,
        // NaN propagates, as in `torch.maximum` (f64::max would drop it).
        BinaryOp::Max => |p, q| {
            if p.is_nan() || q.is_nan() {
                f64::NAN
            } else {
                p.max(q)
            }
        },
        BinaryOp::Min => |p, q| {
            if p.is_nan() || q.is_nan() {
                f64::NAN
            } else {
                p.min(q)
            }
        },
        _ => return Err(n.invalid(format!("{} does not apply to f32", op.name()))),
    })
}

/// The predicate of a comparison, on the ordering of its operands (`None`: unordered, NaN).
/// Checks that `op` is a comparison (`and`/`or` are not, on numbers).
fn comparison(n: &NodeCx<'_>, op: BinaryOp, dtype: DType) -> Result<(), RunError> {
    match op.compare(None) {
        Some(_) => Ok(()),
        None => Err(n.invalid(format!("{} does not apply to {dtype}", op.name()))),
    }
}

fn int_binary<T: IntElement>(
    n: &NodeCx<'_>,
    op: BinaryOp,
    x: &[T],
    y: &[T],
    ia: &[usize],
    ib: &[usize],
) -> Result<TensorData, RunError> {
    let pairs = ia
        .iter()
        .zip(ib)
        .map(|(&i, &j)| (x[i].to_i64(), y[j].to_i64()));
    if op.is_predicate() {
        comparison(n, op, T::DTYPE)?;
        return Ok(TensorData::Bool(
            pairs
                .map(|(p, q)| op.compare(Some(p.cmp(&q))) == Some(true))
                .collect(),
        ));
    }
    let f: fn(i64, i64) -> i64 = match op {
        BinaryOp::Add => i64::wrapping_add,
        BinaryOp::Sub => i64::wrapping_sub,
        BinaryOp::Mul => i64::wrapping_mul,
        // Truncates toward zero; zero divisors are rejected below.
        BinaryOp::Div => i64::wrapping_div,
        BinaryOp::Max => i64::max,
        BinaryOp::Min => i64::min,
        _ => return Err(n.invalid(format!("{} does not apply to {}", op.name(), T::DTYPE))),
    };
    if op == BinaryOp::Div && ib.iter().any(|&j| y[j].to_i64() == 0) {
        return Err(RunError::DivisionByZero {
            node: n.name.to_string(),
        });
    }
    Ok(T::wrap(pairs.map(|(p, q)| T::from_i64(f(p, q))).collect()))
}

/// `where(cond, a, b)`: `a` where `cond` is true, else `b`; all three broadcast.
pub(super) fn select(
    n: &NodeCx<'_>,
    cond: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor, RunError> {
    fn pick<T: Element>(c: &[bool], x: &[T], y: &[T], maps: &[Vec<usize>]) -> TensorData {
        let picked = maps[0].iter().zip(&maps[1]).zip(&maps[2]);
        T::wrap(
            picked
                .map(|((&k, &i), &j)| if c[k] { x[i] } else { y[j] })
                .collect(),
        )
    }
    let c = cond
        .as_bool()
        .ok_or_else(|| n.invalid(format!("condition must be bool, got {}", cond.dtype())))?;
    let (shape, maps) = broadcast_all(n, &[cond.shape(), a.shape(), b.shape()])?;
    let data = match (a.data(), b.data()) {
        (TensorData::F32(x), TensorData::F32(y)) => pick(c, x, y, &maps),
        (TensorData::I32(x), TensorData::I32(y)) => pick(c, x, y, &maps),
        (TensorData::I64(x), TensorData::I64(y)) => pick(c, x, y, &maps),
        (TensorData::Bool(x), TensorData::Bool(y)) => pick(c, x, y, &maps),
        (x, y) => {
            return Err(n.invalid(format!(
                "branches of where have different dtypes {} and {}",
                x.dtype(),
                y.dtype()
            )))
        }
    };
    Ok(Tensor::new(shape, data)?)
}

/// One element on its way through a cast. The rules: float → int truncates
/// toward zero (saturating; NaN → 0), int → narrower int wraps, int → float
/// rounds to nearest, bool → 1/0, anything → bool is `!= 0` (NaN → true).
#[derive(Clone, Copy)]
enum Scalar {
    Float(f64),
    Int(i64),
    Bool(bool),
}

impl Scalar {
    fn to_f32(self) -> f32 {
        match self {
            Scalar::Float(x) => x as f32,
            Scalar::Int(i) => i as f32,
            Scalar::Bool(b) => u8::from(b) as f32,
        }
    }
    fn to_i64(self) -> i64 {
        match self {
            Scalar::Float(x) => x as i64,
            Scalar::Int(i) => i,
            Scalar::Bool(b) => i64::from(b),
        }
    }
    fn to_i32(self) -> i32 {
        match self {
            Scalar::Float(x) => x as i32,
            Scalar::Int(i) => i as i32,
            Scalar::Bool(b) => i32::from(b),
        }
    }
    fn to_bool(self) -> bool {
        match self {
            Scalar::Float(x) => x != 0.0,
            Scalar::Int(i) => i != 0,
            Scalar::Bool(b) => b,
        }
    }
}

/// `values` converted to storage of `dtype`.
fn convert(
    n: &NodeCx<'_>,
    values: impl Iterator<Item = Scalar>,
    dtype: DType,
) -> Result<TensorData, RunError> {
    Ok(match dtype {
        DType::F32 => TensorData::F32(values.map(Scalar::to_f32).collect()),
        DType::I32 => TensorData::I32(values.map(Scalar::to_i32).collect()),
        DType::I64 => TensorData::I64(values.map(Scalar::to_i64).collect()),
        DType::Bool => TensorData::Bool(values.map(Scalar::to_bool).collect()),
        DType::F16 | DType::BF16 => {
            return Err(RunError::UnsupportedDType {
                what: n.name.to_string(),
                dtype,
            })
        }
    })
}

/// Elementwise dtype conversion (see [`Scalar`] for the rules).
pub(super) fn cast(n: &NodeCx<'_>, x: &Tensor, to: DType) -> Result<Tensor, RunError> {
    let data = match x.data() {
        TensorData::F32(d) => convert(n, d.iter().map(|&v| Scalar::Float(v as f64)), to)?,
        TensorData::I32(d) => convert(n, d.iter().map(|&v| Scalar::Int(v as i64)), to)?,
        TensorData::I64(d) => convert(n, d.iter().map(|&v| Scalar::Int(v)), to)?,
        TensorData::Bool(d) => convert(n, d.iter().map(|&v| Scalar::Bool(v)), to)?,
        TensorData::F16(d) => convert(n, d.iter().map(|&v| Scalar::Float(v.to_f64())), to)?,
        TensorData::BF16(d) => convert(n, d.iter().map(|&v| Scalar::Float(v.to_f64())), to)?,
    };
    Ok(Tensor::new(x.shape().to_vec(), data)?)
}

/// A tensor of `shape` filled with `value` converted to `dtype` (`-inf` stays `-inf` in f32).
pub(super) fn constant(
    n: &NodeCx<'_>,
    value: f64,
    dtype: DType,
    shape: &[Dim],
) -> Result<Tensor, RunError> {
    let shape = shape
        .iter()
        .map(|d| n.size(d))
        .collect::<Result<Vec<_>, _>>()?;
    let count = kiln_ir::tensor::checked_numel(&shape)
        .ok_or_else(|| n.invalid(format!("constant shape {shape:?} is too large")))?;
    let data = convert(n, std::iter::repeat_n(Scalar::Float(value), count), dtype)?;
    Ok(Tensor::new(shape, data)?)
}

/// `start, start + 1, …, start + len - 1` as `dtype`.
pub(super) fn arange(
    n: &NodeCx<'_>,
    start: &Dim,
    len: &Dim,
    dtype: DType,
) -> Result<Tensor, RunError> {
    let (start, len) = (n.int(start)?, n.size(len)?);
    if dtype == DType::Bool {
        return Err(n.invalid("arange cannot produce bool"));
    }
    let values = (0..len as i64).map(|k| Scalar::Int(start.wrapping_add(k)));
    Ok(Tensor::new(vec![len], convert(n, values, dtype)?)?)
}

//! The scalar table of the reference Program executor: every unary and binary
//! op of a loop body, `where`, `cast` and constants on one element, with the
//! interpreter's rules (float math in f64 rounded to f32 per instruction,
//! integers wrapping in i64, NaN propagating through max/min).

use kiln_ir::{BinaryOp, DType, KernelOp, UnaryOp};

/// One element of any dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scalar {
    /// f32, f16 or bf16, widened.
    Float(f64),
    /// i32 or i64, widened.
    Int(i64),
    /// bool.
    Bool(bool),
}

impl Scalar {
    /// The value converted to `dtype` (`as` casts: floats to integers
    /// truncate and saturate, integers wrap to i32, non-zero is `true`),
    /// floats rounded to the dtype's precision.
    pub(crate) fn to(self, dtype: DType) -> Scalar {
        match dtype {
            DType::F32 => Scalar::Float(match self {
                Scalar::Float(x) => x as f32 as f64,
                Scalar::Int(i) => i as f32 as f64,
                Scalar::Bool(b) => u8::from(b) as f64,
            }),
            DType::F16 => Scalar::Float(to_f16(self.as_f64()).to_f64()),
            DType::BF16 => Scalar::Float(to_bf16(self.as_f64()).to_f64()),
            DType::I64 => Scalar::Int(match self {
                Scalar::Float(x) => x as i64,
                Scalar::Int(i) => i,
                Scalar::Bool(b) => i64::from(b),
            }),
            DType::I32 => Scalar::Int(match self {
                Scalar::Float(x) => (x as i32) as i64,
                Scalar::Int(i) => (i as i32) as i64,
                Scalar::Bool(b) => i64::from(b),
            }),
            DType::Bool => Scalar::Bool(match self {
                Scalar::Float(x) => x != 0.0,
                Scalar::Int(i) => i != 0,
                Scalar::Bool(b) => b,
            }),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Scalar::Float(x) => x,
            Scalar::Int(i) => i as f64,
            Scalar::Bool(b) => u8::from(b) as f64,
        }
    }

    /// The value of a float element (an error message otherwise).
    pub(crate) fn float(self) -> Result<f64, String> {
        match self {
            Scalar::Float(x) => Ok(x),
            other => Err(format!("expected a float element, got {other:?}")),
        }
    }

    /// The value of an integer element.
    pub(crate) fn int(self) -> Result<i64, String> {
        match self {
            Scalar::Int(i) => Ok(i),
            other => Err(format!("expected an integer element, got {other:?}")),
        }
    }
}

fn unary(u: UnaryOp, x: Scalar) -> Result<Scalar, String> {
    let bad = || format!("{} does not apply to {x:?}", u.name());
    match x {
        Scalar::Float(v) => u.float_fn().map(|f| Scalar::Float(f(v))).ok_or_else(bad),
        Scalar::Int(i) => Ok(Scalar::Int(match u {
            UnaryOp::Neg => i.wrapping_neg(),
            UnaryOp::Abs => i.wrapping_abs(),
            UnaryOp::Relu => i.max(0),
            _ => return Err(bad()),
        })),
        Scalar::Bool(b) => match u {
            UnaryOp::Not => Ok(Scalar::Bool(!b)),
            _ => Err(bad()),
        },
    }
}

fn binary(op: BinaryOp, a: Scalar, b: Scalar) -> Result<Scalar, String> {
    let bad = || format!("{} does not apply to {a:?} and {b:?}", op.name());
    match (a, b) {
        (Scalar::Float(p), Scalar::Float(q)) => {
            if let Some(c) = op.compare(p.partial_cmp(&q)) {
                return Ok(Scalar::Bool(c));
            }
            let nan = p.is_nan() || q.is_nan();
            Ok(Scalar::Float(match op {
                BinaryOp::Add => p + q,
                BinaryOp::Sub => p - q,
                BinaryOp::Mul => p * q,
                BinaryOp::Div => p / q,
                BinaryOp::Pow => p.powf(q),
                BinaryOp::Max if nan => f64::NAN,
                BinaryOp::Min if nan => f64::NAN,
                BinaryOp::Max => p.max(q),
                BinaryOp::Min => p.min(q),
                _ => return Err(bad()),
            }))
        }
        (Scalar::Int(p), Scalar::Int(q)) => {
            if let Some(c) = op.compare(Some(p.cmp(&q))) {
                return Ok(Scalar::Bool(c));
            }
            Ok(Scalar::Int(match op {
                BinaryOp::Add => p.wrapping_add(q),
                BinaryOp::Sub => p.wrapping_sub(q),
                BinaryOp::Mul => p.wrapping_mul(q),
                BinaryOp::Div if q == 0 => return Err("integer division by zero".into()),
                BinaryOp::Div => p.wrapping_div(q),
                BinaryOp::Max => p.max(q),
                BinaryOp::Min => p.min(q),
                _ => return Err(bad()),
            }))
        }
        (Scalar::Bool(p), Scalar::Bool(q)) => Ok(Scalar::Bool(match op {
            BinaryOp::Eq => p == q,
            BinaryOp::Ne => p != q,
            BinaryOp::And => p && q,
            BinaryOp::Or => p || q,
            _ => return Err(bad()),
        })),
        _ => Err(bad()),
    }
}

/// The dtype of each value of a body whose operands have `dtypes`.
pub(crate) fn body_dtypes(body: &[KernelOp], operands: &[DType]) -> Vec<DType> {
    let mut out = operands.to_vec();
    for k in body {
        let get = |i: usize| out.get(i).copied().unwrap_or(DType::F32);
        let t = match k {
            KernelOp::Unary(_, a) => get(*a),
            KernelOp::Binary(b, _, _) if b.is_predicate() => DType::Bool,
            KernelOp::Binary(_, x, _) => get(*x),
            KernelOp::Where(_, a, _) => get(*a),
            KernelOp::Cast(t, _) => *t,
            KernelOp::Const(_, t) => *t,
        };
        out.push(t);
    }
    out
}

/// Runs `body` on one element: `vals` holds the operands and receives each
/// instruction's value, rounded to its dtype (`dtypes` from [`body_dtypes`]).
pub(crate) fn run_body(
    body: &[KernelOp],
    dtypes: &[DType],
    vals: &mut Vec<Scalar>,
) -> Result<Scalar, String> {
    for k in body {
        let get = |i: usize| {
            vals.get(i)
                .copied()
                .ok_or_else(|| format!("reads undefined value {i}"))
        };
        let v = match k {
            KernelOp::Unary(u, a) => unary(*u, get(*a)?)?,
            KernelOp::Binary(b, x, y) => binary(*b, get(*x)?, get(*y)?)?,
            KernelOp::Where(c, a, b) => match get(*c)? {
                Scalar::Bool(true) => get(*a)?,
                Scalar::Bool(false) => get(*b)?,
                other => return Err(format!("where needs a bool condition, got {other:?}")),
            },
            KernelOp::Cast(t, a) => get(*a)?.to(*t),
            KernelOp::Const(v, t) => Scalar::Float(*v).to(*t),
        };
        let t = dtypes.get(vals.len()).copied().unwrap_or(DType::F32);
        vals.push(v.to(t));
    }
    vals.last().copied().ok_or_else(|| "empty body".to_string())
}

/// `x` rounded to f32 "to odd": truncated toward zero, the last bit set when
/// that was inexact. Rounding the result to a 16-bit format gives `x`'s own
/// nearest 16-bit value (f32 keeps 13 more bits than f16 and 16 more than
/// bf16), where rounding through the nearest f32 could round twice, and
/// `half`'s own f64 conversions drop the low 32 bits first or round twice.
pub fn f32_odd(x: f64) -> f32 {
    let f = x as f32;
    if x.is_nan() || f as f64 == x {
        return f;
    }
    // |f| > |x| ≥ 0, so f is not zero: one step toward zero truncates.
    let t = if (f as f64).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(t.to_bits() | 1)
}

/// `x` rounded once to the nearest f16 (ties to even).
pub fn to_f16(x: f64) -> half::f16 {
    half::f16::from_f32(f32_odd(x))
}

/// `x` rounded once to the nearest bf16 (ties to even).
pub fn to_bf16(x: f64) -> half::bf16 {
    half::bf16::from_f32(f32_odd(x))
}

#[cfg(test)]
mod rounding {
    use super::{to_bf16, to_f16};

    /// Against the exact rule on values that break both shortcuts: just
    /// above a tie by less than f32 can hold (rounding through the nearest
    /// f32 lands on the tie and goes to even; the right answer is up), and
    /// above a tie by bits in the low half of the f64 (which `half` drops).
    #[test]
    fn sixteen_bit_rounding_is_correct_past_f32_precision() {
        // 1 + 2^-11 is the f16 tie between 1 and 1 + 2^-10.
        let up = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(to_f16(up).to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(to_f16(-up).to_f64(), -(1.0 + 2f64.powi(-10)));
        assert_eq!(to_f16(1.0 + 2f64.powi(-11)).to_f64(), 1.0);
        // 1 + 2^-8 is the bf16 tie between 1 and 1 + 2^-7.
        let up = 1.0 + 2f64.powi(-8) + 2f64.powi(-45);
        assert_eq!(to_bf16(up).to_f64(), 1.0 + 2f64.powi(-7));
        assert_eq!(to_bf16(1.0 + 2f64.powi(-8)).to_f64(), 1.0);
        // Overflow, NaN and zero keep their meaning.
        assert!(to_f16(1e300).to_f64().is_infinite());
        assert!(to_bf16(-1e300).to_f64().is_infinite());
        assert!(to_f16(f64::NAN).is_nan());
        assert_eq!(to_bf16(1e-300).to_f64(), 0.0);
    }
}

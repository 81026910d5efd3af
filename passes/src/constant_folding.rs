//! Constant folding: ops whose operands are all `constant` nodes become one
//! `constant`.
//!
//! A `constant` node is a tensor filled with one value, so any elementwise op of
//! constants is again a filled tensor, and so is any data movement of one.
//! Matches op nodes whose every operand is a `constant` (of any shape, rank 0
//! included) and whose op is:
//! - elementwise: a unary op (computed by `UnaryOp::float_fn`, the same
//!   definition the interpreter uses), a binary op, `where` or `cast`;
//! - data movement: `reshape`, `permute`, `expand` (a constant broadcast to a
//!   shape), `slice`, and `concat` of constants with one value.
//!
//! Produces: the node rewritten in place into
//! `constant() value=v dtype=t shape=s`, where `t[s]` is the node's exact stored
//! type and its name is kept; the operand constants are left for DCE.
//!
//! Guarantees: the folded value is exactly the one the interpreter computes (see
//! `backends/src/interp/elementwise.rs`): f32 operands are widened to f64, the op
//! runs in f64 and the result is rounded once to f32; integers compute in i64 and
//! wrap to the element type; casts truncate, saturate and round as the
//! interpreter does. So `recip(sqrt(constant 64))`, an attention scale, folds to
//! the f32 the interpreter would produce, bit for bit. Not folded: integer
//! division by zero (it stays a run-time error), integer results beyond ±2^53
//! (a constant's value is an f64), f16/bf16 (the interpreter does not run them).
//!
//! Deliberately not done: re-associating scale chains such as
//! `mul(mul(x, c1), c2)` → `mul(x, c1 * c2)`: that changes the rounding of every
//! element, and this pass only makes exact rewrites.

use kiln_ir::{BinaryOp, DType, Graph, Module, NodeKind, Op, UnaryOp, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Folds ops of constants into constants (see the module contract).
pub struct ConstantFolding;

/// The value of every element of a filled tensor, in its storage type.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scalar {
    F32(f32),
    I32(i32),
    I64(i64),
    Bool(bool),
}

impl Scalar {
    /// The element a `constant` op of `dtype` materializes, as the interpreter
    /// converts its f64 `value` (`None` for f16/bf16, which it does not run).
    fn materialize(value: f64, dtype: DType) -> Option<Scalar> {
        Some(match dtype {
            DType::F32 => Scalar::F32(value as f32),
            DType::I32 => Scalar::I32(value as i32),
            DType::I64 => Scalar::I64(value as i64),
            DType::Bool => Scalar::Bool(value != 0.0),
            DType::F16 | DType::BF16 => return None,
        })
    }

    fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::I32(_) => DType::I32,
            Scalar::I64(_) => DType::I64,
            Scalar::Bool(_) => DType::Bool,
        }
    }

    /// The f64 `value` attribute that materializes back to exactly this element.
    fn to_attr(self) -> Option<f64> {
        const EXACT: u64 = 1 << 53;
        match self {
            Scalar::F32(x) => Some(x as f64),
            Scalar::I32(i) => Some(i as f64),
            Scalar::I64(i) if i.unsigned_abs() <= EXACT => Some(i as f64),
            Scalar::I64(_) => None,
            Scalar::Bool(b) => Some(f64::from(u8::from(b))),
        }
    }

    /// Bitwise equality (so NaN equals NaN and -0.0 differs from 0.0).
    fn same_bits(self, other: Scalar) -> bool {
        match (self, other) {
            (Scalar::F32(a), Scalar::F32(b)) => a.to_bits() == b.to_bits(),
            (a, b) => a == b,
        }
    }
}

fn unary(u: UnaryOp, a: Scalar) -> Option<Scalar> {
    let int = |v: i64| -> Option<i64> {
        match u {
            UnaryOp::Neg => Some(v.wrapping_neg()),
            UnaryOp::Abs => Some(v.wrapping_abs()),
            UnaryOp::Relu => Some(v.max(0)),
            _ => None,
        }
    };
    Some(match a {
        Scalar::F32(x) => Scalar::F32(u.float_fn()?(x as f64) as f32),
        Scalar::I32(i) => Scalar::I32(int(i as i64)? as i32),
        Scalar::I64(i) => Scalar::I64(int(i)?),
        Scalar::Bool(b) if u == UnaryOp::Not => Scalar::Bool(!b),
        Scalar::Bool(_) => return None,
    })
}

fn float_binary(op: BinaryOp, p: f64, q: f64) -> Option<f64> {
    Some(match op {
        BinaryOp::Add => p + q,
        BinaryOp::Sub => p - q,
        BinaryOp::Mul => p * q,
        BinaryOp::Div => p / q,
        BinaryOp::Pow => p.powf(q),
        BinaryOp::Max if p.is_nan() || q.is_nan() => f64::NAN,
        BinaryOp::Max => p.max(q),
        BinaryOp::Min if p.is_nan() || q.is_nan() => f64::NAN,
        BinaryOp::Min => p.min(q),
        _ => return None,
    })
}

/// `p op q` on integers widened to i64 (`None`: not folded).
fn int_binary(op: BinaryOp, p: i64, q: i64) -> Option<IntResult> {
    if op.is_predicate() {
        return op.compare(Some(p.cmp(&q))).map(IntResult::Bool);
    }
    Some(IntResult::Int(match op {
        BinaryOp::Add => p.wrapping_add(q),
        BinaryOp::Sub => p.wrapping_sub(q),
        BinaryOp::Mul => p.wrapping_mul(q),
        // Division by zero is a run-time error; folding would hide it.
        BinaryOp::Div if q == 0 => return None,
        BinaryOp::Div => p.wrapping_div(q),
        BinaryOp::Max => p.max(q),
        BinaryOp::Min => p.min(q),
        _ => return None,
    }))
}

/// An integer op's result: a number or, for comparisons, a bool.
enum IntResult {
    Int(i64),
    Bool(bool),
}

fn binary(op: BinaryOp, a: Scalar, b: Scalar) -> Option<Scalar> {
    match (a, b) {
        (Scalar::F32(x), Scalar::F32(y)) => {
            let (p, q) = (x as f64, y as f64);
            if op.is_predicate() {
                op.compare(p.partial_cmp(&q)).map(Scalar::Bool)
            } else {
                float_binary(op, p, q).map(|r| Scalar::F32(r as f32))
            }
        }
        (Scalar::I32(x), Scalar::I32(y)) => match int_binary(op, x as i64, y as i64)? {
            IntResult::Int(r) => Some(Scalar::I32(r as i32)),
            IntResult::Bool(r) => Some(Scalar::Bool(r)),
        },
        (Scalar::I64(x), Scalar::I64(y)) => match int_binary(op, x, y)? {
            IntResult::Int(r) => Some(Scalar::I64(r)),
            IntResult::Bool(r) => Some(Scalar::Bool(r)),
        },
        (Scalar::Bool(x), Scalar::Bool(y)) => Some(Scalar::Bool(match op {
            BinaryOp::Eq => x == y,
            BinaryOp::Ne => x != y,
            BinaryOp::And => x && y,
            BinaryOp::Or => x || y,
            _ => return None,
        })),
        _ => None,
    }
}

/// One element through a cast, by the interpreter's rules: float → int truncates
/// toward zero (saturating, NaN → 0), int → narrower int wraps, int → float
/// rounds to nearest, bool → 1/0, anything → bool is `!= 0` (NaN → true).
fn cast(a: Scalar, to: DType) -> Option<Scalar> {
    enum Wide {
        Float(f64),
        Int(i64),
        Bool(bool),
    }
    let w = match a {
        Scalar::F32(x) => Wide::Float(x as f64),
        Scalar::I32(i) => Wide::Int(i as i64),
        Scalar::I64(i) => Wide::Int(i),
        Scalar::Bool(b) => Wide::Bool(b),
    };
    Some(match (to, w) {
        (DType::F32, Wide::Float(x)) => Scalar::F32(x as f32),
        (DType::F32, Wide::Int(i)) => Scalar::F32(i as f32),
        (DType::F32, Wide::Bool(b)) => Scalar::F32(u8::from(b) as f32),
        (DType::I32, Wide::Float(x)) => Scalar::I32(x as i32),
        (DType::I32, Wide::Int(i)) => Scalar::I32(i as i32),
        (DType::I32, Wide::Bool(b)) => Scalar::I32(i32::from(b)),
        (DType::I64, Wide::Float(x)) => Scalar::I64(x as i64),
        (DType::I64, Wide::Int(i)) => Scalar::I64(i),
        (DType::I64, Wide::Bool(b)) => Scalar::I64(i64::from(b)),
        (DType::Bool, Wide::Float(x)) => Scalar::Bool(x != 0.0),
        (DType::Bool, Wide::Int(i)) => Scalar::Bool(i != 0),
        (DType::Bool, Wide::Bool(b)) => Scalar::Bool(b),
        (DType::F16 | DType::BF16, _) => return None,
    })
}

/// The element value of `op` applied to filled tensors of `args`, if it folds.
fn fold(op: &Op, args: &[Scalar]) -> Option<Scalar> {
    match (op, args) {
        (Op::Unary(u), &[a]) => unary(*u, a),
        (Op::Binary(b), &[x, y]) => binary(*b, x, y),
        (Op::Where, &[Scalar::Bool(c), a, b]) if a.dtype() == b.dtype() => {
            Some(if c { a } else { b })
        }
        (Op::Cast { to }, &[a]) => cast(a, *to),
        (Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. }, &[a]) => {
            Some(a)
        }
        (Op::Concat { .. }, [first, rest @ ..]) if rest.iter().all(|r| r.same_bits(*first)) => {
            Some(*first)
        }
        _ => None,
    }
}

/// The element of a `constant` node, if `v` is one the interpreter can run.
fn constant_scalar(graph: &Graph, v: ValueId) -> Option<Scalar> {
    match graph.op(v)? {
        Op::Constant { value, dtype, .. } => Scalar::materialize(*value, *dtype),
        _ => None,
    }
}

/// The constant that node `v` folds to, if it does.
fn folded(graph: &Graph, v: ValueId) -> Option<Op> {
    let op = graph.op(v)?;
    if matches!(op, Op::Constant { .. }) {
        return None;
    }
    let operands = graph.operands(v);
    if operands.is_empty() {
        // Nullary ops (arange, causal_mask) are not filled tensors.
        return None;
    }
    if let Op::Slice { axis, start, end } = op {
        // A slice whose bounds depend on run-time sizes is checked when it runs
        // (out of bounds is an error there); folding it would hide that error.
        let x = graph.ty(operands[0]);
        let a = kiln_ir::shape::normalize_axis("slice", *axis, x.rank()).ok()?;
        let (s, e, n) = (start.as_const()?, end.as_const()?, x.shape[a].as_const()?);
        if !(0 <= s && s <= e && e <= n) {
            return None;
        }
    }
    let args: Vec<Scalar> = operands
        .iter()
        .map(|&o| constant_scalar(graph, o))
        .collect::<Option<_>>()?;
    let result = fold(op, &args)?;
    let ty = graph.ty(v);
    if result.dtype() != ty.dtype {
        return None;
    }
    Some(Op::Constant {
        value: result.to_attr()?,
        dtype: ty.dtype,
        shape: ty.shape.clone(),
    })
}

/// Folds every foldable node of one graph, in topological order (so a folded
/// node is a constant by the time its users are looked at); returns how many.
pub fn fold_constants(graph: &mut Graph) -> Result<usize, PassError> {
    let order = graph.topo_order().map_err(|v| PassError::Failed {
        pass: "constant-folding",
        message: format!(
            "@{}: the graph has a cycle through {}",
            graph.name,
            graph.describe(v)
        ),
    })?;
    let mut count = 0;
    for v in order {
        let Some(constant) = folded(graph, v) else {
            continue;
        };
        if let NodeKind::Op { op, .. } = &mut graph.node_mut(v).kind {
            *op = constant;
        }
        graph.set_operands(v, &[]);
        count += 1;
    }
    Ok(count)
}

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "constant-folding"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut total = 0;
        for g in &mut module.funcs {
            total += fold_constants(g)?;
        }
        if total > 0 {
            cx.note(format!("folded {total} constants"));
        }
        Ok(Changed::from_bool(total > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_math_rounds_once_like_the_interpreter() {
        // 1 / sqrt(8) in f64, rounded once: the attention scale of dh = 8.
        let s = unary(UnaryOp::Sqrt, Scalar::F32(8.0)).and_then(|s| unary(UnaryOp::Recip, s));
        let expected = (1.0 / ((8.0f32 as f64).sqrt() as f32 as f64)) as f32;
        assert_eq!(s, Some(Scalar::F32(expected)));
        assert_eq!(
            binary(BinaryOp::Add, Scalar::F32(0.1), Scalar::F32(0.2)),
            Some(Scalar::F32((0.1f32 as f64 + 0.2f32 as f64) as f32))
        );
    }

    #[test]
    fn integers_wrap_and_division_by_zero_is_not_folded() {
        assert_eq!(
            binary(BinaryOp::Add, Scalar::I32(i32::MAX), Scalar::I32(1)),
            Some(Scalar::I32(i32::MIN))
        );
        assert_eq!(
            binary(BinaryOp::Div, Scalar::I64(-7), Scalar::I64(2)),
            Some(Scalar::I64(-3))
        );
        assert_eq!(binary(BinaryOp::Div, Scalar::I64(1), Scalar::I64(0)), None);
        assert_eq!(Scalar::I64(1 << 60).to_attr(), None);
    }

    #[test]
    fn casts_truncate_and_saturate() {
        assert_eq!(cast(Scalar::F32(-2.7), DType::I64), Some(Scalar::I64(-2)));
        assert_eq!(
            cast(Scalar::F32(f32::NAN), DType::I32),
            Some(Scalar::I32(0))
        );
        assert_eq!(
            cast(Scalar::F32(1e20), DType::I32),
            Some(Scalar::I32(i32::MAX))
        );
        assert_eq!(
            cast(Scalar::F32(f32::NAN), DType::Bool),
            Some(Scalar::Bool(true))
        );
        assert_eq!(cast(Scalar::I64(1 << 40), DType::I32), Some(Scalar::I32(0)));
    }

    #[test]
    fn nan_comparisons_are_false_except_ne() {
        let nan = Scalar::F32(f32::NAN);
        assert_eq!(binary(BinaryOp::Eq, nan, nan), Some(Scalar::Bool(false)));
        assert_eq!(binary(BinaryOp::Ne, nan, nan), Some(Scalar::Bool(true)));
        let max = binary(BinaryOp::Max, nan, Scalar::F32(1.0));
        assert!(matches!(max, Some(Scalar::F32(x)) if x.is_nan()), "{max:?}");
    }
}

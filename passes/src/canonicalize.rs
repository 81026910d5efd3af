//! Canonicalization: local algebraic simplifications that put the graph in one
//! normal form, so that CSE and the fusion passes have fewer shapes to match.
//!
//! Matches, per op node (repeated until nothing applies):
//! - `reshape(x)` whose type is `x`'s type → `x`;
//!   `reshape(reshape(x))` → one `reshape(x)` to the outer shape;
//! - `permute(x)` with the identity perm → `x`;
//!   `permute(permute(x, p), q)` → `permute(x, p∘q)` (then `x` if that is the identity);
//! - `expand(x)` whose type is `x`'s type → `x`; `expand(expand(x))` → one `expand(x)`;
//! - `slice(x)` from 0 whose type is `x`'s type (the full range) → `x`;
//! - `cast(x)` to `x`'s own dtype → `x`;
//! - `neg(neg(x))` → `x`;
//! - `mul(x, 1)`, `mul(1, x)`, `div(x, 1)` → `x`; `add(x, 0)`, `add(0, x)` and
//!   `sub(x, 0)` on integers → `x`. On floats only the exact IEEE identities are
//!   used: `add(x, -0.0)`, `add(-0.0, x)` and `sub(x, +0.0)`. `x + +0.0` is not `x`
//!   when `x` is `-0.0` (a later `recip` would turn `-inf` into `+inf`), so it stays.
//!   Each applies only when the result's type equals `x`'s type: a constant of a
//!   higher rank or with wider axes broadcasts `x`, and then the op is not a no-op.
//!   "Constant" means a `constant` node; its value is taken as the interpreter
//!   materializes it (`value as f32` for f32).
//! - commutative binary ops (`add`, `mul`, `max`, `min`, `eq`, `ne`, `and`, `or`)
//!   whose first operand is a `constant` and second is not → operands swapped, so
//!   that constants come second (for float `max`/`min` only when the constant is
//!   not a zero: `max(+0.0, -0.0)` depends on the operand order).
//!
//! Types are compared under the function's compile-time bindings (`d` equals `768`
//! when `d = 768`), which is what the verifier does.
//!
//! Produces: the same module, where a node replaced by its operand is removed (its
//! uses now read the operand) and a node rewritten in place keeps its name and its
//! exact stored type. Operands that become unused are left for DCE.
//!
//! Guarantees: every rewrite is exact — the interpreter's outputs are
//! bit-identical before and after; the graph still verifies; inputs, parameters
//! and output names are untouched. Notes list how often each rule fired.

use kiln_ir::{BinaryOp, DType, Graph, Module, Op, ShapeCx, TensorType, UnaryOp, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Local algebraic simplifications (see the module contract).
pub struct Canonicalize;

/// The rewrite rules, in the order their counts are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    IdentityReshape,
    ReshapeOfReshape,
    IdentityPermute,
    PermuteOfPermute,
    IdentityExpand,
    ExpandOfExpand,
    FullSlice,
    SameDtypeCast,
    DoubleNeg,
    NeutralOperand,
    ConstantSecond,
}

impl Rule {
    const ALL: [Rule; 11] = [
        Rule::IdentityReshape,
        Rule::ReshapeOfReshape,
        Rule::IdentityPermute,
        Rule::PermuteOfPermute,
        Rule::IdentityExpand,
        Rule::ExpandOfExpand,
        Rule::FullSlice,
        Rule::SameDtypeCast,
        Rule::DoubleNeg,
        Rule::NeutralOperand,
        Rule::ConstantSecond,
    ];

    fn describe(self) -> &'static str {
        match self {
            Rule::IdentityReshape => "identity reshape",
            Rule::ReshapeOfReshape => "reshape of reshape",
            Rule::IdentityPermute => "identity permute",
            Rule::PermuteOfPermute => "permute of permute",
            Rule::IdentityExpand => "identity expand",
            Rule::ExpandOfExpand => "expand of expand",
            Rule::FullSlice => "full slice",
            Rule::SameDtypeCast => "same-dtype cast",
            Rule::DoubleNeg => "double neg",
            Rule::NeutralOperand => "neutral operand",
            Rule::ConstantSecond => "constant moved second",
        }
    }
}

/// The compile-time bindings of `graph`, resolved, for comparing dims.
pub(crate) fn binding_cx(graph: &Graph, pass: &'static str) -> Result<ShapeCx, PassError> {
    let mut cx = ShapeCx::new();
    for (name, value) in graph.bindings() {
        cx.bind(name, value).map_err(|e| PassError::Failed {
            pass,
            message: format!("@{}: binding `{name} = {value}`: {e}", graph.name),
        })?;
    }
    Ok(cx)
}

/// Whether two types are equal under the bindings of `cx`.
pub(crate) fn same_type(cx: &ShapeCx, a: &TensorType, b: &TensorType) -> bool {
    a.dtype == b.dtype
        && a.rank() == b.rank()
        && a.shape
            .iter()
            .zip(&b.shape)
            .all(|(x, y)| cx.same(x, y).unwrap_or(false))
}

/// The value every element of a `constant` node has, as the interpreter stores
/// it (f32 rounding applied; f16/bf16 values taken as written, which is exact
/// for the 0 and 1 this pass looks for).
fn constant_value(graph: &Graph, v: ValueId) -> Option<f64> {
    match graph.op(v)? {
        Op::Constant { value, dtype, .. } => Some(match dtype {
            DType::F32 => *value as f32 as f64,
            DType::Bool => f64::from(u8::from(*value != 0.0)),
            _ => *value,
        }),
        _ => None,
    }
}

fn is_constant(graph: &Graph, v: ValueId) -> bool {
    matches!(graph.op(v), Some(Op::Constant { .. }))
}

/// Makes every use of `v` a use of `x` and removes `v`.
fn forward(graph: &mut Graph, v: ValueId, x: ValueId) {
    graph.replace_all_uses(v, x);
    graph.remove_node(v);
}

/// What one rule did to a node.
struct Applied {
    rule: Rule,
    /// Whether the node was removed (replaced by an operand).
    removed: bool,
}

/// Tries every rule on node `v`; applies the first that matches.
fn rewrite(graph: &mut Graph, cx: &ShapeCx, v: ValueId) -> Option<Applied> {
    let op = graph.op(v)?.clone();
    let operands = graph.operands(v);
    let ty = graph.ty(v).clone();
    let replaced = |graph: &mut Graph, x: ValueId, rule: Rule| {
        forward(graph, v, x);
        Some(Applied {
            rule,
            removed: true,
        })
    };
    let in_place = |rule: Rule| {
        Some(Applied {
            rule,
            removed: false,
        })
    };
    match (&op, operands.as_slice()) {
        (Op::Reshape { .. }, &[x]) => {
            if same_type(cx, &ty, graph.ty(x)) {
                return replaced(graph, x, Rule::IdentityReshape);
            }
            if let (Some(Op::Reshape { .. }), &[inner]) =
                (graph.op(x), graph.operands(x).as_slice())
            {
                graph.set_operands(v, &[inner]);
                return in_place(Rule::ReshapeOfReshape);
            }
            None
        }
        (Op::Permute { perm: outer }, &[x]) => {
            let identity = outer.iter().enumerate().all(|(i, &p)| i == p);
            if identity && same_type(cx, &ty, graph.ty(x)) {
                return replaced(graph, x, Rule::IdentityPermute);
            }
            if let (Some(Op::Permute { perm: inner }), &[src]) =
                (graph.op(x), graph.operands(x).as_slice())
            {
                // Output axis i of the outer permute is its input axis outer[i],
                // which is axis inner[outer[i]] of the inner permute's input.
                let composed: Option<Vec<usize>> =
                    outer.iter().map(|&o| inner.get(o).copied()).collect();
                if let Some(perm) = composed.filter(|c| c.len() == inner.len()) {
                    graph.replace_op(v, Op::Permute { perm }, &[src], cx).ok()?;
                    return in_place(Rule::PermuteOfPermute);
                }
            }
            None
        }
        (Op::Expand { .. }, &[x]) => {
            if same_type(cx, &ty, graph.ty(x)) {
                return replaced(graph, x, Rule::IdentityExpand);
            }
            if let (Some(Op::Expand { .. }), &[inner]) = (graph.op(x), graph.operands(x).as_slice())
            {
                // Size-1 axes stretched twice are stretched once; axes the inner
                // expand kept are kept or stretched by the outer one alike.
                graph.set_operands(v, &[inner]);
                return in_place(Rule::ExpandOfExpand);
            }
            None
        }
        (Op::Slice { start, .. }, &[x]) => {
            let from_zero = cx.is_const(start, 0).unwrap_or(false);
            if from_zero && same_type(cx, &ty, graph.ty(x)) {
                return replaced(graph, x, Rule::FullSlice);
            }
            None
        }
        (Op::Cast { to }, &[x]) => {
            if *to == graph.ty(x).dtype && same_type(cx, &ty, graph.ty(x)) {
                return replaced(graph, x, Rule::SameDtypeCast);
            }
            None
        }
        (Op::Unary(UnaryOp::Neg), &[x]) => {
            if let (Some(Op::Unary(UnaryOp::Neg)), &[inner]) =
                (graph.op(x), graph.operands(x).as_slice())
            {
                if same_type(cx, &ty, graph.ty(inner)) {
                    return replaced(graph, inner, Rule::DoubleNeg);
                }
            }
            None
        }
        (Op::Binary(b), &[lhs, rhs]) => {
            if let Some(x) = neutral_operand(graph, *b, lhs, rhs) {
                if same_type(cx, &ty, graph.ty(x)) {
                    return replaced(graph, x, Rule::NeutralOperand);
                }
            }
            if constant_should_move(graph, *b, lhs, rhs) {
                graph.set_operands(v, &[rhs, lhs]);
                return in_place(Rule::ConstantSecond);
            }
            None
        }
        _ => None,
    }
}

/// For `op(lhs, rhs)` where one side is the op's neutral element, the other side.
fn neutral_operand(graph: &Graph, op: BinaryOp, lhs: ValueId, rhs: ValueId) -> Option<ValueId> {
    let float = graph.ty(lhs).dtype.is_float();
    let is = |v: ValueId, test: &dyn Fn(f64) -> bool| constant_value(graph, v).is_some_and(test);
    let one = |c: f64| c == 1.0;
    // Integers have one zero; on floats only the exact identities (see the contract).
    let add_zero = |c: f64| c == 0.0 && (!float || c.is_sign_negative());
    let sub_zero = |c: f64| c == 0.0 && (!float || c.is_sign_positive());
    match op {
        BinaryOp::Mul if is(rhs, &one) => Some(lhs),
        BinaryOp::Mul if is(lhs, &one) => Some(rhs),
        BinaryOp::Div if is(rhs, &one) => Some(lhs),
        BinaryOp::Add if is(rhs, &add_zero) => Some(lhs),
        BinaryOp::Add if is(lhs, &add_zero) => Some(rhs),
        BinaryOp::Sub if is(rhs, &sub_zero) => Some(lhs),
        _ => None,
    }
}

/// Whether `op(lhs, rhs)` is commutative with a constant first and a
/// non-constant second, and swapping them gives bit-identical results.
fn constant_should_move(graph: &Graph, op: BinaryOp, lhs: ValueId, rhs: ValueId) -> bool {
    use BinaryOp::*;
    if !is_constant(graph, lhs) || is_constant(graph, rhs) {
        return false;
    }
    match op {
        Add | Mul | Eq | Ne | And | Or => true,
        // `f64::max(0.0, -0.0)` may return either zero depending on the order.
        Max | Min => {
            !graph.ty(lhs).dtype.is_float() || constant_value(graph, lhs).is_some_and(|c| c != 0.0)
        }
        _ => false,
    }
}

/// Canonicalizes one graph; returns how often each rule fired.
fn canonicalize_graph(graph: &mut Graph, cx: &ShapeCx) -> Result<Vec<(Rule, usize)>, PassError> {
    let mut counts: Vec<(Rule, usize)> = Rule::ALL.iter().map(|r| (*r, 0)).collect();
    // Every rule removes a node, shortens a chain or moves a constant to the
    // right, so this terminates; the bound only guards against a bug looping.
    let max_rounds = graph.node_ids().len() + 2;
    for _ in 0..max_rounds {
        let order = graph.topo_order().map_err(|v| PassError::Failed {
            pass: "canonicalize",
            message: format!(
                "@{}: the graph has a cycle through {}",
                graph.name,
                graph.describe(v)
            ),
        })?;
        let mut changed = false;
        for v in order {
            // Rules on one node can enable each other (a composed permute that
            // is the identity); try again until none applies or the node is gone.
            for _ in 0..8 {
                if !graph.contains(v) {
                    break;
                }
                let Some(applied) = rewrite(graph, cx, v) else {
                    break;
                };
                changed = true;
                if let Some(entry) = counts.iter_mut().find(|(r, _)| *r == applied.rule) {
                    entry.1 += 1;
                }
                if applied.removed {
                    break;
                }
            }
        }
        if !changed {
            break;
        }
    }
    Ok(counts)
}

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut totals: Vec<(Rule, usize)> = Rule::ALL.iter().map(|r| (*r, 0)).collect();
        for g in &mut module.funcs {
            let shapes = binding_cx(g, "canonicalize")?;
            for (rule, n) in canonicalize_graph(g, &shapes)? {
                if let Some(entry) = totals.iter_mut().find(|(r, _)| *r == rule) {
                    entry.1 += n;
                }
            }
        }
        let total: usize = totals.iter().map(|(_, n)| n).sum();
        if total > 0 {
            let parts: Vec<String> = totals
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}: {n}", r.describe()))
                .collect();
            cx.note(format!("applied {total} rewrites ({})", parts.join(", ")));
        }
        Ok(Changed::from_bool(total > 0))
    }
}

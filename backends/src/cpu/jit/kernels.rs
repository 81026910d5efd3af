//! The kernel builders: each takes a description, says whether it can
//! generate it (`None`: the description has a dtype or op the generated code
//! does not cover, which the caller reports), and returns the compiled
//! function.
//!
//! Calling conventions (every pointer is a byte address already offset to
//! the first element the call touches; sizes are element counts):
//!
//! | kernel | signature |
//! |---|---|
//! | loop | `(ptrs: *const *mut u8, strides: *const i64, n) -> i32` (0, or 1 on an integer division by zero) |
//! | row | `(x, w, b, out, n, eps: f64, x_stride)` (the stride, in bytes, only for a strided reduction) |
//! | gather | `(table, ids, out, count, width, rows, ids_stride, table_stride, out_stride) -> i64` (-1, or the index of the first id out of range) |
//! | rope | `(x, out, cos, sin, half)` |
//! | arange | `(out, n, start, stride)` |
//! | causal | `(out, queries, keys, row_stride, col_stride)` |
//! | matvec | `(x, w, y, k, j0, j1, ldw)` |

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{self, Type};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;
use kiln_ir::{BinaryOp, DType, KernelOp, ReduceKind, UnaryOp};

use super::emit::{for_range, mem, size, E};
use super::{with_jit, JitError, Tools};
use crate::reference::scalar::body_dtypes;

/// How an operand of a loop kernel moves along the inner axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    /// Stride 1.
    Contig,
    /// Stride 0: one element for the whole row.
    Bcast,
    /// Any other stride, passed at run time.
    Strided,
}

/// A loop kernel: the body, the operands' declared and stored dtypes, the
/// output dtype, and how each operand (inputs, then the output) moves.
#[derive(Clone, Debug)]
pub(crate) struct LoopSpec<'a> {
    pub(crate) body: &'a [KernelOp],
    pub(crate) declared: Vec<DType>,
    pub(crate) stored: Vec<DType>,
    pub(crate) out: DType,
    pub(crate) steps: Vec<Step>,
}

pub(crate) type LoopFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64) -> i32;
pub(crate) type RowFn =
    unsafe extern "C" fn(*const u8, *const u8, *const u8, *mut u8, i64, f64, i64);
pub(crate) type GatherFn =
    unsafe extern "C" fn(*const u8, *const u8, *mut u8, i64, i64, i64, i64, i64, i64) -> i64;
pub(crate) type RopeFn = unsafe extern "C" fn(*const u8, *mut u8, *const f32, *const f32, i64);
pub(crate) type ArangeFn = unsafe extern "C" fn(*mut u8, i64, i64, i64);
pub(crate) type CausalFn = unsafe extern "C" fn(*mut u8, i64, i64, i64, i64);
pub(crate) type MatvecFn =
    unsafe extern "C" fn(*const f32, *const u8, *mut f32, i64, i64, i64, i64);

/// A value of a body: float (`f32` / `f32x4`), bool (`i8` 0/1 / an `i32x4`
/// mask), or integer (`i64`, scalar code only).
#[derive(Clone, Copy)]
enum V {
    F(Value),
    B(Value),
    I(Value),
}

fn is_float_store(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

/// Whether stored dtype `s` can be read as declared dtype `d`.
fn readable(d: DType, s: DType) -> bool {
    d == s && !matches!(d, DType::F16 | DType::BF16) || d == DType::F32 && is_float_store(s)
}

/// Whether the generated code covers `spec`, and whether the vector form
/// applies: `None` when not covered.
fn loop_mode(spec: &LoopSpec<'_>) -> Option<bool> {
    let n = spec.declared.len();
    if spec.stored.len() != n || spec.steps.len() != n + 1 {
        return None;
    }
    if !spec
        .declared
        .iter()
        .zip(&spec.stored)
        .all(|(&d, &s)| readable(d, s))
    {
        return None;
    }
    let types = body_dtypes(spec.body, &spec.declared);
    let class = |d: DType| match d {
        DType::F32 => Some(0),
        DType::Bool => Some(1),
        DType::I64 | DType::I32 => Some(2),
        _ => None,
    };
    if types.iter().any(|&t| class(t).is_none()) || class(spec.out).is_none() {
        return None;
    }
    if spec.body.is_empty() && n != 1 {
        return None;
    }
    for (i, op) in spec.body.iter().enumerate() {
        let get = |a: usize| types.get(a).copied().filter(|_| a < n + i);
        let ok = match *op {
            KernelOp::Unary(u, a) => match (get(a)?, u) {
                (DType::F32, UnaryOp::Not) => false,
                (DType::F32, _) => true,
                (DType::I64 | DType::I32, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu) => true,
                (DType::Bool, UnaryOp::Not) => true,
                _ => false,
            },
            KernelOp::Binary(b, x, y) => {
                let (tx, ty) = (get(x)?, get(y)?);
                let int = |t: DType| matches!(t, DType::I64 | DType::I32);
                match b {
                    BinaryOp::And | BinaryOp::Or => tx == DType::Bool && ty == DType::Bool,
                    BinaryOp::Eq | BinaryOp::Ne => tx == ty || int(tx) && int(ty),
                    _ if b.is_predicate() => {
                        tx == DType::F32 && ty == DType::F32 || int(tx) && int(ty)
                    }
                    BinaryOp::Pow => tx == DType::F32 && ty == DType::F32,
                    _ => tx == DType::F32 && ty == DType::F32 || int(tx) && int(ty),
                }
            }
            KernelOp::Where(c, a, b) => get(c)? == DType::Bool && class(get(a)?) == class(get(b)?),
            KernelOp::Cast(_, a) => get(a).is_some(),
            KernelOp::Const(..) => true,
        };
        if !ok {
            return None;
        }
    }
    let vector = spec.steps.iter().all(|&s| s != Step::Strided)
        && spec.stored.iter().all(|&s| is_float_store(s))
        && spec.out == DType::F32
        && types.iter().all(|&t| matches!(t, DType::F32 | DType::Bool))
        && !spec
            .body
            .iter()
            .any(|k| matches!(k, KernelOp::Binary(BinaryOp::Pow, ..)));
    Some(vector)
}

/// The compiled loop kernel of `spec`, or `None` when the generated code
/// does not cover it.
pub(crate) fn loop_kernel(spec: &LoopSpec<'_>) -> Result<Option<LoopFn>, JitError> {
    let Some(vector) = loop_mode(spec) else {
        return Ok(None);
    };
    let key = format!(
        "loop {:?} {:?} {:?} {:?} {:?}",
        spec.body, spec.declared, spec.stored, spec.out, spec.steps
    );
    let p = with_jit(|j| {
        let sig = j.signature(3, &[], Some(types::I32));
        j.function(&key, sig, |b, t| build_loop(b, t, spec, vector))
    })?;
    // SAFETY: the function was built with exactly this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, LoopFn>(p) }))
}

fn build_loop(b: &mut FunctionBuilder<'_>, t: &Tools, spec: &LoopSpec<'_>, vector: bool) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let (ptrs, strides, n) = {
        let p = b.block_params(entry);
        (p[0], p[1], p[2])
    };
    let fail = b.create_block();
    let nops = spec.declared.len();
    let mut dtypes = spec.stored.clone();
    dtypes.push(spec.out);
    // Operand base pointers and byte strides.
    let mut bases = Vec::new();
    let mut bstrides = Vec::new();
    for (k, (&st, &d)) in spec.steps.iter().zip(&dtypes).enumerate() {
        let p = b.ins().load(types::I64, mem(), ptrs, (8 * k) as i32);
        bases.push(p);
        bstrides.push(match st {
            Step::Contig => b.ins().iconst(types::I64, size(d)),
            Step::Bcast => b.ins().iconst(types::I64, 0),
            Step::Strided => {
                let s = b.ins().load(types::I64, mem(), strides, (8 * k) as i32);
                b.ins().imul_imm_s(s, size(d))
            }
        });
    }
    let zero = b.ins().iconst(types::I64, 0);
    let mut e = E { b, t };
    // Broadcast operands: loaded once.
    let hoisted: Vec<Option<(V, V)>> = (0..nops)
        .map(|k| {
            (spec.steps[k] == Step::Bcast).then(|| {
                let s = load_value(&mut e, spec.declared[k], spec.stored[k], false, bases[k]);
                let v = if vector { splat_value(&mut e, s) } else { s };
                (s, v)
            })
        })
        .collect();
    let types_all = body_dtypes(spec.body, &spec.declared);
    // Operands that move (not hoisted), each with a pointer variable.
    let moving: Vec<usize> = (0..=nops)
        .filter(|&k| k == nops || hoisted[k].is_none())
        .collect();
    let vars: Vec<_> = moving.iter().map(|&k| ptr_var(e.b, bases[k])).collect();
    let run = |e: &mut E<'_, '_>, cur: &[Value], vec: bool| {
        let at = |k: usize| moving.iter().position(|&m| m == k).map(|i| cur[i]);
        let mut vals = Vec::new();
        for (k, &h) in hoisted.iter().enumerate() {
            vals.push(match (h, at(k)) {
                (Some((s, v)), _) => {
                    if vec {
                        v
                    } else {
                        s
                    }
                }
                (None, Some(a)) => load_value(e, spec.declared[k], spec.stored[k], vec, a),
                (None, None) => V::F(zero),
            });
        }
        for (idx, op) in spec.body.iter().enumerate() {
            let v = body_op(e, op, &vals, &types_all, vec, fail);
            let v = cast_value(e, v, types_all[nops + idx], vec);
            vals.push(v);
        }
        let last = *vals.last().unwrap_or(&V::F(zero));
        let last_type = *types_all.last().unwrap_or(&spec.out);
        let out = if last_type == spec.out {
            last
        } else {
            cast_value(e, last, spec.out, vec)
        };
        if let Some(a) = at(nops) {
            store_value(e, spec.out, vec, out, a);
        }
    };
    let steps_of = |e: &mut E<'_, '_>, lanes: i64| -> Vec<(cranelift_frontend::Variable, Value)> {
        moving
            .iter()
            .zip(&vars)
            .map(|(&k, &v)| {
                let s = if lanes == 1 {
                    bstrides[k]
                } else {
                    e.b.ins().imul_imm_s(bstrides[k], lanes)
                };
                (v, s)
            })
            .collect()
    };
    let tail = if vector {
        // Unrolled: `UNROLL` vectors per iteration (fewer pointer and
        // counter updates per element, independent chains for the core to
        // overlap), then one vector at a time, then single elements.
        let unroll: i64 = if spec.body.len() <= 4 { 4 } else { 2 };
        let shift = unroll.trailing_zeros() as i64 + 2;
        let big = e.b.ins().ushr_imm_s(n, shift);
        let steps = steps_of(&mut e, 4 * unroll);
        let quarter: Vec<Value> = steps_of(&mut e, 4).iter().map(|&(_, s)| s).collect();
        for_ptrs_dyn(e.b, big, &steps, |b, cur| {
            let mut e = E { b, t };
            let mut at = cur.to_vec();
            for u in 0..unroll {
                if u > 0 {
                    at = at
                        .iter()
                        .zip(&quarter)
                        .map(|(&p, &q)| e.b.ins().iadd(p, q))
                        .collect();
                }
                run(&mut e, &at, true);
            }
        });
        let n4 = e.b.ins().ushr_imm_s(n, 2);
        let n4 = e.b.ins().band_imm_s(n4, unroll - 1);
        let steps = steps_of(&mut e, 4);
        for_ptrs_dyn(e.b, n4, &steps, |b, cur| run(&mut E { b, t }, cur, true));
        e.b.ins().band_imm_s(n, 3)
    } else {
        n
    };
    let steps = steps_of(&mut e, 1);
    for_ptrs_dyn(e.b, tail, &steps, |b, cur| run(&mut E { b, t }, cur, false));
    let ok = e.b.ins().iconst(types::I32, 0);
    e.b.ins().return_(&[ok]);
    e.b.switch_to_block(fail);
    let bad = e.b.ins().iconst(types::I32, 1);
    e.b.ins().return_(&[bad]);
}

/// Loads an operand element (or four) as its declared dtype.
fn load_value(e: &mut E<'_, '_>, declared: DType, stored: DType, vec: bool, a: Value) -> V {
    match declared {
        DType::F32 => V::F(e.load_float(stored, vec, a)),
        DType::I64 => V::I(e.b.ins().load(types::I64, mem(), a, 0)),
        DType::I32 => V::I(e.b.ins().sload32(mem(), a, 0)),
        _ => {
            let x = e.b.ins().uload8(types::I32, mem(), a, 0);
            V::B(e.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0))
        }
    }
}

fn splat_value(e: &mut E<'_, '_>, v: V) -> V {
    match v {
        V::F(x) => V::F(e.b.ins().splat(types::F32X4, x)),
        V::B(c) => {
            let t = e.b.ins().iconst(types::I32, -1);
            let f = e.b.ins().iconst(types::I32, 0);
            let m = e.b.ins().select(c, t, f);
            V::B(e.b.ins().splat(types::I32X4, m))
        }
        other => other,
    }
}

fn store_value(e: &mut E<'_, '_>, out: DType, vec: bool, v: V, a: Value) {
    match (out, v) {
        (DType::F32, V::F(x)) => {
            e.b.ins().store(mem(), x, a, 0);
        }
        (DType::I64, V::I(x)) => {
            e.b.ins().store(mem(), x, a, 0);
        }
        (DType::I32, V::I(x)) => {
            let x = e.b.ins().ireduce(types::I32, x);
            e.b.ins().store(mem(), x, a, 0);
        }
        (DType::Bool, V::B(c)) if !vec => {
            e.b.ins().store(mem(), c, a, 0);
        }
        // `loop_mode` admits no other pair.
        _ => {}
    }
}

fn fty(vec: bool) -> Type {
    if vec {
        types::F32X4
    } else {
        types::F32
    }
}

/// A bool as the lane mask or `i8` of the current width, from a comparison.
fn mask(e: &mut E<'_, '_>, c: Value, vec: bool) -> V {
    if vec {
        let ty = e.b.func.dfg.value_type(c);
        if ty == types::I32X4 {
            V::B(c)
        } else {
            V::B(e.cast_bits(types::I32X4, c))
        }
    } else {
        V::B(c)
    }
}

/// `v` converted to `to` (the interpreter's `Scalar::to`).
fn cast_value(e: &mut E<'_, '_>, v: V, to: DType, vec: bool) -> V {
    let ty = fty(vec);
    match (v, to) {
        (V::F(_), DType::F32) | (V::B(_), DType::Bool) | (V::I(_), DType::I64) => v,
        (V::F(x), DType::I64) => V::I(e.b.ins().fcvt_to_sint_sat(types::I64, x)),
        (V::F(x), DType::I32) => {
            let i = e.b.ins().fcvt_to_sint_sat(types::I32, x);
            V::I(e.b.ins().sextend(types::I64, i))
        }
        (V::F(x), _) => {
            let z = e.f(ty, 0.0);
            let c = e.fcmp(FloatCC::NotEqual, x, z);
            mask(e, c, vec)
        }
        (V::I(x), DType::F32) => V::F(e.b.ins().fcvt_from_sint(types::F32, x)),
        (V::I(x), DType::I32) => {
            let r = e.b.ins().ireduce(types::I32, x);
            V::I(e.b.ins().sextend(types::I64, r))
        }
        (V::I(x), _) => V::B(e.b.ins().icmp_imm_s(IntCC::NotEqual, x, 0)),
        (V::B(c), DType::F32) => {
            if vec {
                let one = e.f(ty, 1.0);
                let m = e.cast_bits(types::F32X4, c);
                V::F(e.b.ins().band(m, one))
            } else {
                let one = e.f(ty, 1.0);
                let z = e.f(ty, 0.0);
                V::F(e.b.ins().select(c, one, z))
            }
        }
        (V::B(c), _) => V::I(e.b.ins().uextend(types::I64, c)),
    }
}

/// One body instruction on values of the current width.
fn body_op(
    e: &mut E<'_, '_>,
    op: &KernelOp,
    vals: &[V],
    types_all: &[DType],
    vec: bool,
    fail: cranelift_codegen::ir::Block,
) -> V {
    let ty = fty(vec);
    match *op {
        KernelOp::Const(v, d) => match d {
            DType::F32 => V::F(e.f(ty, v as f32)),
            DType::Bool => {
                let bit = i64::from(v != 0.0);
                if vec {
                    V::B(e.i(ty, -bit))
                } else {
                    V::B(e.b.ins().iconst(types::I8, bit))
                }
            }
            DType::I32 => V::I(e.b.ins().iconst(types::I64, (v as i32) as i64)),
            _ => V::I(e.b.ins().iconst(types::I64, v as i64)),
        },
        KernelOp::Cast(d, a) => cast_value(e, vals[a], d, vec),
        KernelOp::Where(c, a, b) => {
            let V::B(c) = vals[c] else { return vals[a] };
            match (vals[a], vals[b]) {
                (V::F(x), V::F(y)) => V::F(e.sel(c, x, y)),
                (V::B(x), V::B(y)) => V::B(e.sel(c, x, y)),
                (V::I(x), V::I(y)) => V::I(e.b.ins().select(c, x, y)),
                (x, _) => x,
            }
        }
        KernelOp::Unary(u, a) => match vals[a] {
            V::F(x) => V::F(unary_float(e, u, x)),
            V::I(x) => V::I(match u {
                UnaryOp::Neg => e.b.ins().ineg(x),
                UnaryOp::Abs => e.b.ins().iabs(x),
                _ => {
                    let z = e.b.ins().iconst(types::I64, 0);
                    e.b.ins().smax(x, z)
                }
            }),
            V::B(c) => V::B(if vec {
                e.b.ins().bnot(c)
            } else {
                e.b.ins().bxor_imm_s(c, 1)
            }),
        },
        KernelOp::Binary(op, x, y) => {
            let _ = types_all;
            match (vals[x], vals[y]) {
                (V::F(p), V::F(q)) => binary_float(e, op, p, q, vec),
                (V::I(p), V::I(q)) => binary_int(e, op, p, q, fail),
                (V::B(p), V::B(q)) => V::B(match op {
                    BinaryOp::And => e.b.ins().band(p, q),
                    BinaryOp::Or => e.b.ins().bor(p, q),
                    BinaryOp::Eq if vec => e.b.ins().icmp(IntCC::Equal, p, q),
                    BinaryOp::Ne if vec => e.b.ins().icmp(IntCC::NotEqual, p, q),
                    BinaryOp::Eq => e.b.ins().icmp(IntCC::Equal, p, q),
                    _ => e.b.ins().icmp(IntCC::NotEqual, p, q),
                }),
                (p, _) => p,
            }
        }
    }
}

fn unary_float(e: &mut E<'_, '_>, u: UnaryOp, x: Value) -> Value {
    let ty = e.b.func.dfg.value_type(x);
    match u {
        UnaryOp::Neg => e.b.ins().fneg(x),
        UnaryOp::Exp => e.exp(x),
        UnaryOp::Log => e.log(x),
        UnaryOp::Sqrt => e.b.ins().sqrt(x),
        UnaryOp::Rsqrt => {
            let s = e.b.ins().sqrt(x);
            let one = e.f(ty, 1.0);
            e.div(one, s)
        }
        UnaryOp::Tanh => e.tanh(x),
        UnaryOp::Sigmoid => e.sigmoid(x),
        UnaryOp::Abs => e.b.ins().fabs(x),
        UnaryOp::Recip => {
            let one = e.f(ty, 1.0);
            e.div(one, x)
        }
        UnaryOp::Erf => e.erf(x),
        UnaryOp::Gelu => {
            let c = e.f(ty, std::f32::consts::FRAC_1_SQRT_2);
            let z = e.mul(x, c);
            let r = e.erf(z);
            let one = e.f(ty, 1.0);
            let r = e.add(one, r);
            let half = e.f(ty, 0.5);
            let hx = e.mul(half, x);
            e.mul(hx, r)
        }
        UnaryOp::GeluTanh => {
            let c = e.f(ty, (2.0f64 / std::f64::consts::PI).sqrt() as f32);
            let k = e.f(ty, 0.044_715);
            let x3 = e.mul(x, x);
            let x3 = e.mul(x3, x);
            let inner = e.madd(k, x3, x);
            let inner = e.mul(c, inner);
            let th = e.tanh(inner);
            let one = e.f(ty, 1.0);
            let r = e.add(one, th);
            let half = e.f(ty, 0.5);
            let hx = e.mul(half, x);
            e.mul(hx, r)
        }
        UnaryOp::Silu => {
            let s = e.sigmoid(x);
            e.mul(x, s)
        }
        UnaryOp::Relu => {
            // NaN passes through, as `x < 0 ? 0 : x`.
            let z = e.f(ty, 0.0);
            let neg = e.fcmp(FloatCC::LessThan, x, z);
            e.sel(neg, z, x)
        }
        UnaryOp::Not => x,
    }
}

fn binary_float(e: &mut E<'_, '_>, op: BinaryOp, p: Value, q: Value, vec: bool) -> V {
    let cc = match op {
        BinaryOp::Eq => Some(FloatCC::Equal),
        BinaryOp::Ne => Some(FloatCC::NotEqual),
        BinaryOp::Lt => Some(FloatCC::LessThan),
        BinaryOp::Le => Some(FloatCC::LessThanOrEqual),
        BinaryOp::Gt => Some(FloatCC::GreaterThan),
        BinaryOp::Ge => Some(FloatCC::GreaterThanOrEqual),
        _ => None,
    };
    if let Some(cc) = cc {
        let c = e.fcmp(cc, p, q);
        return mask(e, c, vec);
    }
    V::F(match op {
        BinaryOp::Add => e.add(p, q),
        BinaryOp::Sub => e.sub(p, q),
        BinaryOp::Mul => e.mul(p, q),
        BinaryOp::Div => e.div(p, q),
        BinaryOp::Max => e.b.ins().fmax(p, q),
        BinaryOp::Min => e.b.ins().fmin(p, q),
        _ => {
            // Pow (scalar code only, see `loop_mode`).
            let call = e.b.ins().call(e.t.pow, &[p, q]);
            e.b.inst_results(call)[0]
        }
    })
}

fn binary_int(
    e: &mut E<'_, '_>,
    op: BinaryOp,
    p: Value,
    q: Value,
    fail: cranelift_codegen::ir::Block,
) -> V {
    let cc = match op {
        BinaryOp::Eq => Some(IntCC::Equal),
        BinaryOp::Ne => Some(IntCC::NotEqual),
        BinaryOp::Lt => Some(IntCC::SignedLessThan),
        BinaryOp::Le => Some(IntCC::SignedLessThanOrEqual),
        BinaryOp::Gt => Some(IntCC::SignedGreaterThan),
        BinaryOp::Ge => Some(IntCC::SignedGreaterThanOrEqual),
        _ => None,
    };
    if let Some(cc) = cc {
        return V::B(e.b.ins().icmp(cc, p, q));
    }
    V::I(match op {
        BinaryOp::Add => e.b.ins().iadd(p, q),
        BinaryOp::Sub => e.b.ins().isub(p, q),
        BinaryOp::Mul => e.b.ins().imul(p, q),
        BinaryOp::Max => e.b.ins().smax(p, q),
        BinaryOp::Min => e.b.ins().smin(p, q),
        _ => {
            // Division: zero fails the call; -1 negates (wrapping, where
            // the machine instruction would trap on i64::MIN / -1).
            let go = e.b.create_block();
            e.b.ins().brif(q, go, &[], fail, &[]);
            e.b.switch_to_block(go);
            let minus_one = e.b.ins().icmp_imm_s(IntCC::Equal, q, -1);
            let one = e.b.ins().iconst(types::I64, 1);
            let safe_q = e.b.ins().select(minus_one, one, q);
            let d = e.b.ins().sdiv(p, safe_q);
            let n = e.b.ins().ineg(p);
            e.b.ins().select(minus_one, n, d)
        }
    })
}

/// What a row kernel computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowKind {
    LayerNorm { bias: bool },
    RmsNorm,
    Softmax,
    Reduce(ReduceKind),
}

/// The compiled row kernel: x and out f32 and contiguous along the row
/// (a reduction may instead read x with a stride: `strided`), the norm
/// weight and bias stored as `wdt` (f32, f16 or bf16).
pub(crate) fn row_kernel(
    kind: RowKind,
    wdt: DType,
    strided: bool,
) -> Result<Option<RowFn>, JitError> {
    if !is_float_store(wdt) || strided && !matches!(kind, RowKind::Reduce(_)) {
        return Ok(None);
    }
    let key = format!("row {kind:?} {wdt:?} {strided}");
    let p = with_jit(|j| {
        let sig = j.signature(5, &[types::F64, types::I64], None);
        j.function(&key, sig, |b, t| {
            if strided {
                build_strided_reduce(b, t, kind)
            } else {
                build_row(b, t, kind, wdt)
            }
        })
    })?;
    // SAFETY: built with this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, RowFn>(p) }))
}

/// Sums `f(x)` over the row in f64, two lanes at a time.
fn row_sum(
    e: &mut E<'_, '_>,
    x: Value,
    n: Value,
    f: &dyn Fn(&mut E<'_, '_>, Value) -> Value,
) -> Value {
    let zero = e.b.ins().iconst(types::I64, 0);
    let z = e.b.ins().f64const(0.0);
    let zv = e.b.ins().splat(types::F64X2, z);
    let acc = e.b.declare_var(types::F64X2);
    e.b.def_var(acc, zv);
    let acc2 = e.b.declare_var(types::F64X2);
    e.b.def_var(acc2, zv);
    let t = e.t;
    // Four elements a step into two accumulators (two dependency chains),
    // then a pair, then one.
    let rest = for_range(e.b, zero, n, 4, |b, i| {
        let mut e = E { b, t };
        for (k, var) in [(0, acc), (8, acc2)] {
            let a = e.addr(x, i, 4);
            let a = e.b.ins().iadd_imm_s(a, k);
            let v = e.load_pair_f64(DType::F32, a);
            let v = f(&mut e, v);
            let s = e.b.use_var(var);
            let s = e.b.ins().fadd(s, v);
            e.b.def_var(var, s);
        }
    });
    let rest = for_range(e.b, rest, n, 2, |b, i| {
        let mut e = E { b, t };
        let a = e.addr(x, i, 4);
        let v = e.load_pair_f64(DType::F32, a);
        let v = f(&mut e, v);
        let s = e.b.use_var(acc);
        let s = e.b.ins().fadd(s, v);
        e.b.def_var(acc, s);
    });
    let tail = e.b.declare_var(types::F64);
    e.b.def_var(tail, z);
    for_range(e.b, rest, n, 1, |b, i| {
        let mut e = E { b, t };
        let a = e.addr(x, i, 4);
        let v = e.b.ins().load(types::F32, mem(), a, 0);
        let v = e.b.ins().fpromote(types::F64, v);
        let v = e.b.ins().splat(types::F64X2, v);
        let v = f(&mut e, v);
        let v = e.b.ins().extractlane(v, 0);
        let s = e.b.use_var(tail);
        let s = e.b.ins().fadd(s, v);
        e.b.def_var(tail, s);
    });
    let s = e.b.use_var(acc);
    let s2 = e.b.use_var(acc2);
    let s = e.b.ins().fadd(s, s2);
    let l0 = e.b.ins().extractlane(s, 0);
    let l1 = e.b.ins().extractlane(s, 1);
    let s = e.b.ins().fadd(l0, l1);
    let tl = e.b.use_var(tail);
    e.b.ins().fadd(s, tl)
}

fn build_row(b: &mut FunctionBuilder<'_>, t: &Tools, kind: RowKind, wdt: DType) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry).to_vec();
    let (x, w, bias, out, n, eps) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let mut e = E { b, t };
    let nf = e.b.ins().fcvt_from_sint(types::F64, n);
    let zero = e.b.ins().iconst(types::I64, 0);
    let ws = size(wdt);
    match kind {
        RowKind::LayerNorm { .. } | RowKind::RmsNorm => {
            let layer = matches!(kind, RowKind::LayerNorm { .. });
            let has_bias = matches!(kind, RowKind::LayerNorm { bias: true });
            let mean = if layer {
                let s = row_sum(&mut e, x, n, &|_, v| v);
                e.b.ins().fdiv(s, nf)
            } else {
                e.b.ins().f64const(0.0)
            };
            let mv = e.b.ins().splat(types::F64X2, mean);
            let sq = row_sum(&mut e, x, n, &|e, v| {
                let d = e.b.ins().fsub(v, mv);
                e.b.ins().fmul(d, d)
            });
            let var = e.b.ins().fdiv(sq, nf);
            let ve = e.b.ins().fadd(var, eps);
            let sd = e.b.ins().sqrt(ve);
            let one = e.b.ins().f64const(1.0);
            let inv = e.b.ins().fdiv(one, sd);
            // y = (x - mean)·inv·w (+ b) in f32, four lanes at a time: the
            // statistics are f64 sums, rounded to f32 once.
            let mean32 = e.b.ins().fdemote(types::F32, mean);
            let inv32 = e.b.ins().fdemote(types::F32, inv);
            let norm = |e: &mut E<'_, '_>, i: Value, vec: bool| {
                let ax = e.addr(x, i, 4);
                let aw = e.addr(w, i, ws);
                let ao = e.addr(out, i, 4);
                let (mv, iv) = if vec {
                    (
                        e.b.ins().splat(types::F32X4, mean32),
                        e.b.ins().splat(types::F32X4, inv32),
                    )
                } else {
                    (mean32, inv32)
                };
                let xv = e.load_float(DType::F32, vec, ax);
                let wv = e.load_float(wdt, vec, aw);
                let d = e.sub(xv, mv);
                let y = e.mul(d, iv);
                let y = e.mul(y, wv);
                let y = if has_bias {
                    let ab = e.addr(bias, i, ws);
                    let bv = e.load_float(wdt, vec, ab);
                    e.add(y, bv)
                } else {
                    y
                };
                e.b.ins().store(mem(), y, ao, 0);
            };
            let rest = for_range(e.b, zero, n, 4, |b, i| norm(&mut E { b, t }, i, true));
            for_range(e.b, rest, n, 1, |b, i| norm(&mut E { b, t }, i, false));
        }
        RowKind::Softmax => {
            let ninf = e.f(types::F32, f32::NEG_INFINITY);
            let mx = row_max(&mut e, x, n);
            // An all-hidden row (max -inf) is zeros.
            let all_hidden = e.fcmp(FloatCC::Equal, mx, ninf);
            let go = e.b.create_block();
            let zeros = e.b.create_block();
            let done = e.b.create_block();
            e.b.ins().brif(all_hidden, zeros, &[], go, &[]);
            e.b.switch_to_block(zeros);
            for_range(e.b, zero, n, 1, |b, i| {
                let mut e = E { b, t };
                let a = e.addr(out, i, 4);
                let z = e.f(types::F32, 0.0);
                e.b.ins().store(mem(), z, a, 0);
            });
            e.b.ins().jump(done, &[]);
            e.b.switch_to_block(go);
            // exp(x - max) into out, then the f64 sum, then out / sum.
            let ex = |e: &mut E<'_, '_>, i: Value, vec: bool| {
                let ax = e.addr(x, i, 4);
                let ao = e.addr(out, i, 4);
                let v = e.load_float(DType::F32, vec, ax);
                let m = if vec {
                    e.b.ins().splat(types::F32X4, mx)
                } else {
                    mx
                };
                let d = e.sub(v, m);
                let y = e.exp(d);
                e.b.ins().store(mem(), y, ao, 0);
            };
            let rest = for_range(e.b, zero, n, 4, |b, i| ex(&mut E { b, t }, i, true));
            for_range(e.b, rest, n, 1, |b, i| ex(&mut E { b, t }, i, false));
            let sum = row_sum(&mut e, out, n, &|_, v| v);
            let one = e.b.ins().f64const(1.0);
            let inv = e.b.ins().fdiv(one, sum);
            let _ = inv;
            let sv = e.b.ins().splat(types::F64X2, sum);
            let div = |e: &mut E<'_, '_>, i: Value, pair: bool| {
                let ao = e.addr(out, i, 4);
                if pair {
                    let v = e.load_pair_f64(DType::F32, ao);
                    let y = e.b.ins().fdiv(v, sv);
                    e.store_pair_f32(y, ao);
                } else {
                    let v = e.b.ins().load(types::F32, mem(), ao, 0);
                    let v = e.b.ins().fpromote(types::F64, v);
                    let y = e.b.ins().fdiv(v, sum);
                    let y = e.b.ins().fdemote(types::F32, y);
                    e.b.ins().store(mem(), y, ao, 0);
                }
            };
            let rest = for_range(e.b, zero, n, 2, |b, i| div(&mut E { b, t }, i, true));
            for_range(e.b, rest, n, 1, |b, i| div(&mut E { b, t }, i, false));
            e.b.ins().jump(done, &[]);
            e.b.switch_to_block(done);
        }
        RowKind::Reduce(kind) => {
            let y = match kind {
                ReduceKind::Max => row_max(&mut e, x, n),
                _ => {
                    let s = row_sum(&mut e, x, n, &|_, v| v);
                    let s = if kind == ReduceKind::Mean {
                        e.b.ins().fdiv(s, nf)
                    } else {
                        s
                    };
                    e.b.ins().fdemote(types::F32, s)
                }
            };
            e.b.ins().store(mem(), y, out, 0);
        }
    }
    e.b.ins().return_(&[]);
}

/// A reduction over a strided row, one element at a time (sums in f64).
fn build_strided_reduce(b: &mut FunctionBuilder<'_>, t: &Tools, kind: RowKind) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry).to_vec();
    let (x, out, n, xs) = (p[0], p[3], p[4], p[6]);
    let zero = b.ins().iconst(types::I64, 0);
    let max = kind == RowKind::Reduce(ReduceKind::Max);
    let ty = if max { types::F32 } else { types::F64 };
    let acc = b.declare_var(ty);
    let init = if max {
        b.ins().f32const(f32::NEG_INFINITY)
    } else {
        b.ins().f64const(0.0)
    };
    b.def_var(acc, init);
    for_range(b, zero, n, 1, |b, i| {
        let off = b.ins().imul(i, xs);
        let a = b.ins().iadd(x, off);
        let v = b.ins().load(types::F32, mem(), a, 0);
        let s = b.use_var(acc);
        let s = if max {
            b.ins().fmax(s, v)
        } else {
            let v = b.ins().fpromote(types::F64, v);
            b.ins().fadd(s, v)
        };
        b.def_var(acc, s);
    });
    let s = b.use_var(acc);
    let y = if max {
        s
    } else {
        let s = if kind == RowKind::Reduce(ReduceKind::Mean) {
            let nf = b.ins().fcvt_from_sint(types::F64, n);
            b.ins().fdiv(s, nf)
        } else {
            s
        };
        b.ins().fdemote(types::F32, s)
    };
    b.ins().store(mem(), y, out, 0);
    b.ins().return_(&[]);
    let _ = t;
}

/// The row's maximum in f32 (-inf when empty; NaN when any element is).
fn row_max(e: &mut E<'_, '_>, x: Value, n: Value) -> Value {
    let t = e.t;
    let zero = e.b.ins().iconst(types::I64, 0);
    let ninf = e.f(types::F32X4, f32::NEG_INFINITY);
    let acc = e.b.declare_var(types::F32X4);
    e.b.def_var(acc, ninf);
    let rest = for_range(e.b, zero, n, 4, |b, i| {
        let mut e = E { b, t };
        let a = e.addr(x, i, 4);
        let v = e.load_float(DType::F32, true, a);
        let m = e.b.use_var(acc);
        let m = e.b.ins().fmax(m, v);
        e.b.def_var(acc, m);
    });
    let s = e.b.ins().extractlane(ninf, 0);
    let tail = e.b.declare_var(types::F32);
    e.b.def_var(tail, s);
    for_range(e.b, rest, n, 1, |b, i| {
        let mut e = E { b, t };
        let a = e.addr(x, i, 4);
        let v = e.b.ins().load(types::F32, mem(), a, 0);
        let m = e.b.use_var(tail);
        let m = e.b.ins().fmax(m, v);
        e.b.def_var(tail, m);
    });
    let m = e.b.use_var(acc);
    let mut r = e.b.use_var(tail);
    for l in 0..4u8 {
        let v = e.b.ins().extractlane(m, l);
        r = e.b.ins().fmax(r, v);
    }
    r
}

/// The compiled gather: table rows stored as `tdt` (read as f32, or copied
/// as is when `tdt` is the output dtype), ids `idt` (i64 or i32).
pub(crate) fn gather_kernel(
    tdt: DType,
    idt: DType,
    out: DType,
) -> Result<Option<GatherFn>, JitError> {
    let widen = out == DType::F32 && is_float_store(tdt);
    if !(widen || tdt == out) || !matches!(idt, DType::I64 | DType::I32) {
        return Ok(None);
    }
    let key = format!("gather {tdt:?} {idt:?} {out:?}");
    let p = with_jit(|j| {
        let sig = j.signature(9, &[], Some(types::I64));
        j.function(&key, sig, |b, t| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let (table, ids, outp, count, width, rows) = (p[0], p[1], p[2], p[3], p[4], p[5]);
            let (ids_stride, table_stride, out_stride) = (p[6], p[7], p[8]);
            let bad = b.create_block();
            b.append_block_param(bad, types::I64);
            let zero = b.ins().iconst(types::I64, 0);
            for_range(b, zero, count, 1, |b, r| {
                let e = E { b, t };
                let ia = e.b.ins().imul(r, ids_stride);
                let ia = e.b.ins().iadd(ids, ia);
                let id = if idt == DType::I64 {
                    e.b.ins().load(types::I64, mem(), ia, 0)
                } else {
                    e.b.ins().sload32(mem(), ia, 0)
                };
                // Unsigned compare: negative ids are out of range too.
                let inside = e.b.ins().icmp(IntCC::UnsignedLessThan, id, rows);
                let go = e.b.create_block();
                e.b.ins().brif(inside, go, &[], bad, &[r.into()]);
                e.b.switch_to_block(go);
                let src = e.b.ins().imul(id, table_stride);
                let src = e.b.ins().iadd(table, src);
                let dst = e.b.ins().imul(r, out_stride);
                let dst = e.b.ins().iadd(outp, dst);
                let t2 = e.t;
                if widen {
                    let copy = |e: &mut E<'_, '_>, j: Value, vec: bool| {
                        let a = e.addr(src, j, size(tdt));
                        let v = e.load_float(tdt, vec, a);
                        let d = e.addr(dst, j, 4);
                        e.b.ins().store(mem(), v, d, 0);
                    };
                    let rest = for_range(e.b, zero, width, 4, |b, j| {
                        copy(&mut E { b, t: t2 }, j, true)
                    });
                    for_range(e.b, rest, width, 1, |b, j| {
                        copy(&mut E { b, t: t2 }, j, false)
                    });
                } else {
                    // Same dtype: bytes.
                    let bytes = e.b.ins().imul_imm_s(width, size(out));
                    let rest = for_range(e.b, zero, bytes, 16, |b, j| {
                        let s = b.ins().iadd(src, j);
                        let v = b.ins().load(types::I8X16, mem(), s, 0);
                        let d = b.ins().iadd(dst, j);
                        b.ins().store(mem(), v, d, 0);
                    });
                    for_range(e.b, rest, bytes, 1, |b, j| {
                        let s = b.ins().iadd(src, j);
                        let v = b.ins().load(types::I8, mem(), s, 0);
                        let d = b.ins().iadd(dst, j);
                        b.ins().store(mem(), v, d, 0);
                    });
                }
            });
            let ok = b.ins().iconst(types::I64, -1);
            b.ins().return_(&[ok]);
            b.switch_to_block(bad);
            let r = b.block_params(bad)[0];
            b.ins().return_(&[r]);
        })
    })?;
    // SAFETY: built with this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, GatherFn>(p) }))
}

/// The compiled rotary embedding of one row: `x` and `out` f32 and
/// contiguous, the row's cos and sin (f32, `half` each).
pub(crate) fn rope_kernel() -> Result<RopeFn, JitError> {
    let p = with_jit(|j| {
        let sig = j.signature(5, &[], None);
        j.function("rope", sig, |b, t| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let (x, out, cos, sin, half) = (p[0], p[1], p[2], p[3], p[4]);
            let zero = b.ins().iconst(types::I64, 0);
            let hb = b.ins().imul_imm_s(half, 4);
            let body = |e: &mut E<'_, '_>, i: Value, vec: bool| {
                let alo = e.addr(x, i, 4);
                let ahi = e.b.ins().iadd(alo, hb);
                let lo = e.load_float(DType::F32, vec, alo);
                let hi = e.load_float(DType::F32, vec, ahi);
                let ac = e.addr(cos, i, 4);
                let c = e.load_float(DType::F32, vec, ac);
                let as_ = e.addr(sin, i, 4);
                let s = e.load_float(DType::F32, vec, as_);
                let hs = e.mul(hi, s);
                let lc = e.mul(lo, c);
                let y0 = e.sub(lc, hs);
                let ls = e.mul(lo, s);
                let hc = e.mul(hi, c);
                let y1 = e.add(hc, ls);
                let o0 = e.addr(out, i, 4);
                let o1 = e.b.ins().iadd(o0, hb);
                e.b.ins().store(mem(), y0, o0, 0);
                e.b.ins().store(mem(), y1, o1, 0);
            };
            let rest = for_range(b, zero, half, 4, |b, i| body(&mut E { b, t }, i, true));
            for_range(b, rest, half, 1, |b, i| body(&mut E { b, t }, i, false));
            b.ins().return_(&[]);
        })
    })?;
    // SAFETY: built with this signature.
    Ok(unsafe { std::mem::transmute::<usize, RopeFn>(p) })
}

/// The compiled arange into dtype `out` (`start + i`, converted).
pub(crate) fn arange_kernel(out: DType) -> Result<Option<ArangeFn>, JitError> {
    if !matches!(out, DType::F32 | DType::I64 | DType::I32 | DType::Bool) {
        return Ok(None);
    }
    let key = format!("arange {out:?}");
    let p = with_jit(|j| {
        let sig = j.signature(4, &[], None);
        j.function(&key, sig, |b, t| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let (o, n, start, stride) = (p[0], p[1], p[2], p[3]);
            let zero = b.ins().iconst(types::I64, 0);
            for_range(b, zero, n, 1, |b, i| {
                let mut e = E { b, t };
                let v = e.b.ins().iadd(start, i);
                let v = cast_value(&mut e, V::I(v), out, false);
                let off = e.b.ins().imul(i, stride);
                let a = e.b.ins().iadd(o, off);
                store_value(&mut e, out, false, v, a);
            });
            b.ins().return_(&[]);
        })
    })?;
    // SAFETY: built with this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, ArangeFn>(p) }))
}

/// The compiled causal mask `out[i, j] = j <= i + keys - queries` in dtype `out`.
pub(crate) fn causal_kernel(out: DType) -> Result<Option<CausalFn>, JitError> {
    if !matches!(out, DType::F32 | DType::I64 | DType::I32 | DType::Bool) {
        return Ok(None);
    }
    let key = format!("causal {out:?}");
    let p = with_jit(|j| {
        let sig = j.signature(5, &[], None);
        j.function(&key, sig, |b, t| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let (o, q, k, rs, cs) = (p[0], p[1], p[2], p[3], p[4]);
            let zero = b.ins().iconst(types::I64, 0);
            let shift = b.ins().isub(k, q);
            for_range(b, zero, q, 1, |b, i| {
                let lim = b.ins().iadd(i, shift);
                let row = b.ins().imul(i, rs);
                let row = b.ins().iadd(o, row);
                for_range(b, zero, k, 1, |b, j| {
                    let mut e = E { b, t };
                    let c = e.b.ins().icmp(IntCC::SignedLessThanOrEqual, j, lim);
                    let v = cast_value(&mut e, V::B(c), out, false);
                    let off = e.b.ins().imul(j, cs);
                    let a = e.b.ins().iadd(row, off);
                    store_value(&mut e, out, false, v, a);
                });
            });
            b.ins().return_(&[]);
        })
    })?;
    // SAFETY: built with this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, CausalFn>(p) }))
}

/// Weight rows per block of the row-layout matrix–vector kernel, and
/// vectors per row per iteration: sixteen accumulators, eight weight
/// streams in flight (measured on Zen 5: 4x2 reads ~12 GB/s per core, 8x2
/// ~25 GB/s; more rows spill registers).
const ROWS_BLOCK: usize = 8;
const ROWS_VECS: usize = 2;

/// Matrix–vector layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MatvecLayout {
    /// `y[j] = Σ_k x[k]·w[j·ldw + k]` (weight rows are output features).
    Rows,
    /// `y[j] = Σ_k x[k]·w[k·ldw + j]` (weight rows are input features).
    Cols,
}

/// The compiled matrix–vector product over output features `j0..j1`,
/// weights stored as `wdt`.
pub(crate) fn matvec_kernel(
    layout: MatvecLayout,
    wdt: DType,
) -> Result<Option<MatvecFn>, JitError> {
    if !is_float_store(wdt) {
        return Ok(None);
    }
    let key = format!("matvec {layout:?} {wdt:?}");
    let p = with_jit(|j| {
        let sig = j.signature(7, &[], None);
        j.function(&key, sig, |b, t| match layout {
            MatvecLayout::Rows => build_matvec_rows(b, t, wdt, ROWS_BLOCK, ROWS_VECS),
            MatvecLayout::Cols => build_matvec_cols(b, t, wdt),
        })
    })?;
    // SAFETY: built with this signature.
    Ok(Some(unsafe { std::mem::transmute::<usize, MatvecFn>(p) }))
}

/// A loop over `count` iterations whose pointers advance by fixed byte
/// steps: `body(b, ptrs)` sees each pointer's current value. Keeping the
/// addresses in loop-carried variables (no index multiplication) leaves
/// the loop body loads and multiply-adds only.
fn for_ptrs(
    b: &mut FunctionBuilder<'_>,
    count: Value,
    ptrs: &[(cranelift_frontend::Variable, i64)],
    body: impl FnMut(&mut FunctionBuilder<'_>, &[Value]),
) {
    let steps: Vec<_> = ptrs
        .iter()
        .map(|&(v, step)| (v, b.ins().iconst(types::I64, step)))
        .collect();
    for_ptrs_dyn(b, count, &steps, body);
}

/// [`for_ptrs`] with run-time steps.
fn for_ptrs_dyn(
    b: &mut FunctionBuilder<'_>,
    count: Value,
    ptrs: &[(cranelift_frontend::Variable, Value)],
    mut body: impl FnMut(&mut FunctionBuilder<'_>, &[Value]),
) {
    let n = b.declare_var(types::I64);
    b.def_var(n, count);
    let head = b.create_block();
    let block = b.create_block();
    let exit = b.create_block();
    b.ins().jump(head, &[]);
    b.switch_to_block(head);
    let left = b.use_var(n);
    b.ins().brif(left, block, &[], exit, &[]);
    b.switch_to_block(block);
    let cur: Vec<Value> = ptrs.iter().map(|&(v, _)| b.use_var(v)).collect();
    body(b, &cur);
    for (&(v, step), &p) in ptrs.iter().zip(&cur) {
        let next = b.ins().iadd(p, step);
        b.def_var(v, next);
    }
    let left = b.use_var(n);
    let left = b.ins().iadd_imm_s(left, -1);
    b.def_var(n, left);
    b.ins().jump(head, &[]);
    b.switch_to_block(exit);
}

fn ptr_var(b: &mut FunctionBuilder<'_>, v: Value) -> cranelift_frontend::Variable {
    let var = b.declare_var(types::I64);
    b.def_var(var, v);
    var
}

/// Sums the four lanes of an `f32x4`.
fn hsum(e: &mut E<'_, '_>, v: Value) -> Value {
    let mut s = e.b.ins().extractlane(v, 0);
    for l in 1..4u8 {
        let x = e.b.ins().extractlane(v, l);
        s = e.b.ins().fadd(s, x);
    }
    s
}

/// `block` weight rows at a time, `vecs` vector accumulators each, so every
/// load of x serves every row and the multiply-add chains overlap; then
/// four elements, then one; rows left over one at a time.
fn build_matvec_rows(
    b: &mut FunctionBuilder<'_>,
    t: &Tools,
    wdt: DType,
    block: usize,
    vecs: usize,
) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry).to_vec();
    let (x, w, y, k, j0, j1, ldw) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let ws = size(wdt);
    let row_bytes = b.ins().imul_imm_s(ldw, ws);
    let per = 4 * vecs as i64;
    let k8 = b.ins().udiv_imm_s(k, per);
    let k_rest = b.ins().urem_imm_s(k, per);
    let k4 = b.ins().ushr_imm_s(k_rest, 2);
    let k1 = b.ins().band_imm_s(k, 3);
    let rows_of = |rows: usize| {
        move |b: &mut FunctionBuilder<'_>, j: Value| {
            let mut e = E { b, t };
            let off = e.b.ins().imul(j, row_bytes);
            let w0 = e.b.ins().iadd(w, off);
            let mut ptrs = vec![(ptr_var(e.b, x), 4 * per)];
            for r in 0..rows {
                let extra = e.b.ins().imul_imm_s(row_bytes, r as i64);
                let pr = e.b.ins().iadd(w0, extra);
                ptrs.push((ptr_var(e.b, pr), per * ws));
            }
            let z = e.f(types::F32X4, 0.0);
            let accs: Vec<_> = (0..vecs * rows)
                .map(|_| {
                    let v = e.b.declare_var(types::F32X4);
                    e.b.def_var(v, z);
                    v
                })
                .collect();
            for_ptrs(e.b, k8, &ptrs, |b, cur| {
                let mut e = E { b, t };
                let xs: Vec<Value> = (0..vecs)
                    .map(|h| e.b.ins().load(types::F32X4, mem(), cur[0], 16 * h as i32))
                    .collect();
                for r in 0..rows {
                    for (h, &xv) in xs.iter().enumerate() {
                        let a = e.b.ins().iadd_imm_s(cur[1 + r], 4 * ws * h as i64);
                        let wv = e.load_float(wdt, true, a);
                        let acc = e.b.use_var(accs[vecs * r + h]);
                        let s = e.madd(xv, wv, acc);
                        e.b.def_var(accs[vecs * r + h], s);
                    }
                }
            });
            let steps4: Vec<_> = ptrs
                .iter()
                .enumerate()
                .map(|(i, &(v, _))| (v, if i == 0 { 16 } else { 4 * ws }))
                .collect();
            for_ptrs(e.b, k4, &steps4, |b, cur| {
                let mut e = E { b, t };
                let xv = e.b.ins().load(types::F32X4, mem(), cur[0], 0);
                for r in 0..rows {
                    let wv = e.load_float(wdt, true, cur[1 + r]);
                    let acc = e.b.use_var(accs[vecs * r]);
                    let s = e.madd(xv, wv, acc);
                    e.b.def_var(accs[vecs * r], s);
                }
            });
            let sums: Vec<_> = (0..rows)
                .map(|r| {
                    let mut v = e.b.use_var(accs[vecs * r]);
                    for h in 1..vecs {
                        let c = e.b.use_var(accs[vecs * r + h]);
                        v = e.b.ins().fadd(v, c);
                    }
                    let s = hsum(&mut e, v);
                    let var = e.b.declare_var(types::F32);
                    e.b.def_var(var, s);
                    var
                })
                .collect();
            let steps1: Vec<_> = ptrs
                .iter()
                .enumerate()
                .map(|(i, &(v, _))| (v, if i == 0 { 4 } else { ws }))
                .collect();
            for_ptrs(e.b, k1, &steps1, |b, cur| {
                let mut e = E { b, t };
                let xv = e.b.ins().load(types::F32, mem(), cur[0], 0);
                for (r, &sum) in sums.iter().enumerate() {
                    let wv = e.load_float(wdt, false, cur[1 + r]);
                    let s = e.b.use_var(sum);
                    let s = e.madd(xv, wv, s);
                    e.b.def_var(sum, s);
                }
            });
            for (r, &sum) in sums.iter().enumerate() {
                let jr = e.b.ins().iadd_imm_s(j, r as i64);
                let ay = e.addr(y, jr, 4);
                let s = e.b.use_var(sum);
                e.b.ins().store(mem(), s, ay, 0);
            }
        }
    };
    let rest = for_range(b, j0, j1, block as i64, rows_of(block));
    for_range(b, rest, j1, 1, rows_of(1));
    b.ins().return_(&[]);
}

/// `y[j0..j1] = Σ_k x[k]·w[k, j0..j1]`, streaming the weight rows in
/// order: the output range is zeroed, then every block of four rows adds
/// its four scaled sub-rows to it (each output element loaded and stored
/// once per block, from L1), then the rows left one at a time.
fn build_matvec_cols(b: &mut FunctionBuilder<'_>, t: &Tools, wdt: DType) {
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let p = b.block_params(entry).to_vec();
    let (x, w, y, k, j0, j1, ldw) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let ws = size(wdt);
    let row_bytes = b.ins().imul_imm_s(ldw, ws);
    let width = b.ins().isub(j1, j0);
    let w4 = b.ins().ushr_imm_s(width, 2);
    let w1 = b.ins().band_imm_s(width, 3);
    let y0 = {
        let mut e = E { b, t };
        e.addr(y, j0, 4)
    };
    let wj = {
        let mut e = E { b, t };
        e.addr(w, j0, ws)
    };
    // Zero the output range.
    {
        let mut e = E { b, t };
        let z4 = e.f(types::F32X4, 0.0);
        let z1 = e.f(types::F32, 0.0);
        let yp = ptr_var(e.b, y0);
        for_ptrs(e.b, w4, &[(yp, 16)], |b, cur| {
            b.ins().store(mem(), z4, cur[0], 0);
        });
        for_ptrs(e.b, w1, &[(yp, 4)], |b, cur| {
            b.ins().store(mem(), z1, cur[0], 0);
        });
    }
    const BLOCK: usize = 4;
    let rows_of = |rows: usize| {
        move |b: &mut FunctionBuilder<'_>, kk: Value| {
            let mut e = E { b, t };
            let mut xs4 = Vec::new();
            let mut xs1 = Vec::new();
            let mut ptrs4 = vec![(ptr_var(e.b, y0), 16)];
            for r in 0..rows {
                let kr = e.b.ins().iadd_imm_s(kk, r as i64);
                let ax = e.addr(x, kr, 4);
                let xv = e.b.ins().load(types::F32, mem(), ax, 0);
                xs1.push(xv);
                xs4.push(e.b.ins().splat(types::F32X4, xv));
                let off = e.b.ins().imul(kr, row_bytes);
                let wr = e.b.ins().iadd(wj, off);
                ptrs4.push((ptr_var(e.b, wr), 4 * ws));
            }
            for_ptrs(e.b, w4, &ptrs4, |b, cur| {
                let mut e = E { b, t };
                let mut acc = e.b.ins().load(types::F32X4, mem(), cur[0], 0);
                for r in 0..rows {
                    let wv = e.load_float(wdt, true, cur[1 + r]);
                    acc = e.madd(xs4[r], wv, acc);
                }
                e.b.ins().store(mem(), acc, cur[0], 0);
            });
            let ptrs1: Vec<_> = ptrs4
                .iter()
                .enumerate()
                .map(|(i, &(v, _))| (v, if i == 0 { 4 } else { ws }))
                .collect();
            for_ptrs(e.b, w1, &ptrs1, |b, cur| {
                let mut e = E { b, t };
                let mut acc = e.b.ins().load(types::F32, mem(), cur[0], 0);
                for r in 0..rows {
                    let wv = e.load_float(wdt, false, cur[1 + r]);
                    acc = e.madd(xs1[r], wv, acc);
                }
                e.b.ins().store(mem(), acc, cur[0], 0);
            });
        }
    };
    let zero = b.ins().iconst(types::I64, 0);
    let rest = for_range(b, zero, k, BLOCK as i64, rows_of(BLOCK));
    for_range(b, rest, k, 1, rows_of(1));
    b.ins().return_(&[]);
}

pub(crate) type ExpRowFn = unsafe extern "C" fn(*mut f32, i64, f32) -> f32;

/// The compiled `row[j] = exp(row[j] - max)` over `n` f32 in place,
/// returning the sum of the new values (attention's softmax tiles).
pub(crate) fn exp_row_kernel() -> Result<ExpRowFn, JitError> {
    let p = with_jit(|j| {
        let sig = j.signature(2, &[types::F32], Some(types::F32));
        j.function("exp_row", sig, |b, t| {
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            let p = b.block_params(entry).to_vec();
            let (row, n, mx) = (p[0], p[1], p[2]);
            let mut e = E { b, t };
            let z4 = e.f(types::F32X4, 0.0);
            let acc4 = e.b.declare_var(types::F32X4);
            e.b.def_var(acc4, z4);
            let z1 = e.f(types::F32, 0.0);
            let acc1 = e.b.declare_var(types::F32);
            e.b.def_var(acc1, z1);
            let m4 = e.b.ins().splat(types::F32X4, mx);
            let n4 = e.b.ins().ushr_imm_s(n, 2);
            let n1 = e.b.ins().band_imm_s(n, 3);
            let rp = ptr_var(e.b, row);
            for_ptrs(e.b, n4, &[(rp, 16)], |b, cur| {
                let mut e = E { b, t };
                let v = e.b.ins().load(types::F32X4, mem(), cur[0], 0);
                let d = e.sub(v, m4);
                let y = e.exp(d);
                e.b.ins().store(mem(), y, cur[0], 0);
                let a = e.b.use_var(acc4);
                let a = e.add(a, y);
                e.b.def_var(acc4, a);
            });
            for_ptrs(e.b, n1, &[(rp, 4)], |b, cur| {
                let mut e = E { b, t };
                let v = e.b.ins().load(types::F32, mem(), cur[0], 0);
                let d = e.sub(v, mx);
                let y = e.exp(d);
                e.b.ins().store(mem(), y, cur[0], 0);
                let a = e.b.use_var(acc1);
                let a = e.add(a, y);
                e.b.def_var(acc1, a);
            });
            let a4 = e.b.use_var(acc4);
            let s = hsum(&mut e, a4);
            let a1 = e.b.use_var(acc1);
            let s = e.add(s, a1);
            e.b.ins().return_(&[s]);
        })
    })?;
    // SAFETY: built with this signature.
    Ok(unsafe { std::mem::transmute::<usize, ExpRowFn>(p) })
}

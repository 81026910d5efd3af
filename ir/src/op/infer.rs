//! The shape rules: `Op::infer` and the dtype, rank and size checks it shares
//! between ops.

use super::{BinaryOp, KernelOp, Op, ReduceKind, UnaryOp, WeightLayout};
use crate::dim::Dim;
use crate::shape::{normalize_axis, ShapeCx, ShapeError};
use crate::types::{shape_string, DType, TensorType};

impl Op {
    /// The shape rule: the result type for operands of types `inputs`.
    pub fn infer(&self, inputs: &[TensorType], cx: &ShapeCx) -> Result<TensorType, ShapeError> {
        let (lo, hi) = self.arity();
        if inputs.len() < lo || inputs.len() > hi {
            let expected = match (lo, hi) {
                (l, h) if l == h => l.to_string(),
                (l, usize::MAX) => format!("at least {l}"),
                (l, h) => format!("{l} to {h}"),
            };
            return Err(ShapeError::Arity {
                expected,
                got: inputs.len(),
            });
        }
        match self {
            Op::Unary(u) => infer_unary(*u, &inputs[0]),
            Op::Binary(b) => infer_binary(*b, &inputs[0], &inputs[1], cx),
            Op::Where => {
                expect_dtype("condition of where", &inputs[0], "bool", |d| {
                    d == DType::Bool
                })?;
                same_dtype("where", &inputs[1], &inputs[2])?;
                let s = cx.broadcast(&inputs[0].shape, &inputs[1].shape)?;
                let s = cx.broadcast(&s, &inputs[2].shape)?;
                Ok(TensorType::new(inputs[1].dtype, s))
            }
            Op::Cast { to } => Ok(inputs[0].with_dtype(*to)),
            Op::Constant {
                value,
                dtype,
                shape,
            } => {
                check_constant(*value, *dtype)?;
                check_sizes(cx, shape)?;
                Ok(TensorType::new(*dtype, shape.clone()))
            }
            Op::Arange { start, len, dtype } => {
                if !dtype.is_int() && !dtype.is_float() {
                    return Err(ShapeError::Attribute(format!(
                        "arange cannot produce {dtype}"
                    )));
                }
                check_sizes(cx, std::slice::from_ref(len))?;
                cx.eval(start)?;
                Ok(TensorType::new(*dtype, vec![len.clone()]))
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => infer_matmul(&inputs[0], &inputs[1], *transpose_a, *transpose_b, cx),
            Op::Reduce {
                kind,
                axes,
                keepdim,
            } => {
                let x = &inputs[0];
                expect_numeric(kind.name(), x)?;
                let mut picked = vec![false; x.rank()];
                for &a in axes {
                    let i = normalize_axis(kind.name(), a, x.rank())?;
                    if picked[i] {
                        return Err(ShapeError::Attribute(format!(
                            "{}: axis {a} is listed twice",
                            kind.name()
                        )));
                    }
                    picked[i] = true;
                }
                if *kind == ReduceKind::Mean {
                    expect_float("input of reduce_mean", x)?;
                }
                let mut shape = Vec::new();
                for (i, d) in x.shape.iter().enumerate() {
                    if !picked[i] {
                        shape.push(d.clone());
                    } else if *keepdim {
                        shape.push(Dim::constant(1));
                    }
                }
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Softmax { axis } => {
                expect_float("input of softmax", &inputs[0])?;
                normalize_axis("softmax", *axis, inputs[0].rank())?;
                Ok(inputs[0].clone())
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let x = &inputs[0];
                let what = self.name();
                expect_float(&format!("input of {what}"), x)?;
                let Some(last) = x.shape.last() else {
                    return Err(rank_error(&format!("input of {what}"), "at least 1", x));
                };
                for (i, p) in inputs.iter().enumerate().skip(1) {
                    let role = if i == 1 { "weight" } else { "bias" };
                    let role = format!("{role} of {what}");
                    same_dtype(&role, x, p)?;
                    if p.rank() != 1 {
                        return Err(rank_error(&role, "1", p));
                    }
                    cx.expect_same(
                        &format!("{role} does not match the normalized (last) axis"),
                        &p.shape[0],
                        last,
                        p,
                        x,
                    )?;
                }
                Ok(x.clone())
            }
            Op::Reshape { shape } => {
                let x = &inputs[0];
                check_sizes(cx, shape)?;
                let from = cx.product(&x.shape)?;
                let to = cx.product(shape)?;
                if from != to {
                    return Err(ShapeError::ElementCount {
                        from: x.shape_string(),
                        to: shape_string(shape),
                        from_count: from.to_string(),
                        to_count: to.to_string(),
                    });
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Permute { perm } => {
                let x = &inputs[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank() {
                    return Err(ShapeError::Attribute(format!(
                        "permute: perm {perm:?} has {} entries for rank {} input {x}",
                        perm.len(),
                        x.rank()
                    )));
                }
                for &p in perm {
                    if p >= x.rank() || seen[p] {
                        return Err(ShapeError::Attribute(format!(
                            "permute: perm {perm:?} is not a permutation of 0..{}",
                            x.rank()
                        )));
                    }
                    seen[p] = true;
                }
                let shape = perm.iter().map(|&p| x.shape[p].clone()).collect();
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Expand { shape } => {
                let x = &inputs[0];
                check_sizes(cx, shape)?;
                if x.rank() > shape.len() {
                    return Err(rank_error(
                        "input of expand",
                        &format!("at most {}", shape.len()),
                        x,
                    ));
                }
                let offset = shape.len() - x.rank();
                for (i, d) in x.shape.iter().enumerate() {
                    let target = &shape[offset + i];
                    if !cx.same(d, target)? && !cx.is_const(d, 1)? {
                        return Err(ShapeError::Attribute(format!(
                            "cannot expand {} to {}: axis {} is {} vs {} (only size-1 axes can be expanded)",
                            x.shape_string(),
                            shape_string(shape),
                            offset + i,
                            cx.describe(d),
                            cx.describe(target)
                        )));
                    }
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Slice { axis, start, end } => {
                let x = &inputs[0];
                let a = normalize_axis("slice", *axis, x.rank())?;
                let len = end.sub(start).map_err(|source| ShapeError::Dim {
                    expr: format!("{end} - {start}"),
                    source,
                })?;
                let (s, e, n) = (cx.eval(start)?, cx.eval(end)?, cx.eval(&x.shape[a])?);
                let bad = match (s.as_const(), e.as_const(), n.as_const()) {
                    (Some(s), _, _) if s < 0 => true,
                    (Some(s), Some(e), _) if e < s => true,
                    (_, Some(e), Some(n)) if e > n => true,
                    _ => {
                        // Symbolic bounds: out of range for every size of the symbols.
                        let past_end = n.sub(&e).map_err(|source| ShapeError::Dim {
                            expr: format!("{} - {}", x.shape[a], end),
                            source,
                        })?;
                        s.is_never_positive()
                            || cx.eval(&len)?.is_never_positive()
                            || past_end.is_never_positive()
                    }
                };
                if bad {
                    return Err(ShapeError::Attribute(format!(
                        "slice {}..{} is out of bounds for axis {axis} of size {} in {x}",
                        cx.describe(start),
                        cx.describe(end),
                        cx.describe(&x.shape[a])
                    )));
                }
                let mut shape = x.shape.clone();
                shape[a] = len;
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                let first = &inputs[0];
                let a = normalize_axis("concat", *axis, first.rank())?;
                let mut total = first.shape[a].clone();
                for x in &inputs[1..] {
                    same_dtype("concat operands", first, x)?;
                    if x.rank() != first.rank() {
                        return Err(rank_error("concat operands", &first.rank().to_string(), x));
                    }
                    for i in 0..x.rank() {
                        if i != a {
                            cx.expect_same(
                                &format!("concat along axis {axis}: axis {i} differs"),
                                &first.shape[i],
                                &x.shape[i],
                                first,
                                x,
                            )?;
                        }
                    }
                    total = total.add(&x.shape[a]).map_err(|source| ShapeError::Dim {
                        expr: "concatenated length".into(),
                        source,
                    })?;
                }
                let mut shape = first.shape.clone();
                shape[a] = total;
                Ok(TensorType::new(first.dtype, shape))
            }
            Op::Gather => {
                let (table, ids) = (&inputs[0], &inputs[1]);
                if table.rank() < 1 {
                    return Err(rank_error("table of gather", "at least 1", table));
                }
                expect_dtype("ids of gather", ids, "i32 or i64", DType::is_int)?;
                let mut shape = ids.shape.clone();
                shape.extend(table.shape[1..].iter().cloned());
                Ok(TensorType::new(table.dtype, shape))
            }
            Op::CausalMask { queries, keys } => {
                check_sizes(cx, &[queries.clone(), keys.clone()])?;
                Ok(TensorType::new(
                    DType::Bool,
                    vec![queries.clone(), keys.clone()],
                ))
            }
            Op::PaddingMask => {
                let m = &inputs[0];
                expect_dtype("attention mask", m, "an integer or bool type", |d| {
                    d.is_int() || d == DType::Bool
                })?;
                if m.rank() != 2 {
                    return Err(rank_error("attention mask [B, S]", "2", m));
                }
                let one = Dim::constant(1);
                Ok(TensorType::new(
                    DType::Bool,
                    vec![m.shape[0].clone(), one.clone(), one, m.shape[1].clone()],
                ))
            }
            Op::Rope { .. } => {
                let (x, pos) = (&inputs[0], &inputs[1]);
                expect_float("input of rope", x)?;
                expect_dtype("positions of rope", pos, "i32 or i64", DType::is_int)?;
                if x.rank() < 2 {
                    return Err(rank_error("input of rope [..., T, dh]", "at least 2", x));
                }
                let t = &x.shape[x.rank() - 2];
                let dh = cx.eval(&x.shape[x.rank() - 1])?;
                if dh.as_const().is_some_and(|c| c % 2 != 0) {
                    return Err(ShapeError::Attribute(format!(
                        "rope needs an even head dim, got {} in {x}",
                        cx.describe(&x.shape[x.rank() - 1])
                    )));
                }
                match pos.rank() {
                    1 => cx.expect_same(
                        "rope positions length differs from T",
                        &pos.shape[0],
                        t,
                        pos,
                        x,
                    )?,
                    2 => {
                        cx.expect_same(
                            "rope positions length differs from T",
                            &pos.shape[1],
                            t,
                            pos,
                            x,
                        )?;
                        cx.expect_same(
                            "rope positions batch differs",
                            &pos.shape[0],
                            &x.shape[0],
                            pos,
                            x,
                        )?;
                    }
                    _ => {
                        return Err(rank_error(
                            "positions of rope",
                            "1 ([T]) or 2 ([B, T])",
                            pos,
                        ))
                    }
                }
                Ok(x.clone())
            }
            Op::Attention { relative, .. } => {
                let (mask, bias) = self.attention_extras(inputs.len()).unwrap_or_default();
                let (slopes, table) = match relative {
                    Some(r) => (None, bias.map(|i| (i, *r))),
                    None => (bias, None),
                };
                infer_attention(inputs, mask, slopes, table, cx)
            }
            Op::LoraLinear { layout, .. } => infer_lora(inputs, *layout, cx),
            Op::Moe { top_k } => infer_moe(inputs, *top_k, cx),
            Op::Kernel { body } => infer_kernel(inputs, body, cx),
        }
    }
}

fn rank_error(what: &str, expected: &str, ty: &TensorType) -> ShapeError {
    ShapeError::Rank {
        what: what.to_string(),
        expected: expected.to_string(),
        got: ty.rank(),
        ty: ty.to_string(),
    }
}

fn expect_dtype(
    what: &str,
    ty: &TensorType,
    expected: &str,
    ok: impl Fn(DType) -> bool,
) -> Result<(), ShapeError> {
    if ok(ty.dtype) {
        Ok(())
    } else {
        Err(ShapeError::DType {
            what: what.to_string(),
            expected: expected.to_string(),
            got: ty.dtype,
        })
    }
}

fn expect_float(what: &str, ty: &TensorType) -> Result<(), ShapeError> {
    expect_dtype(what, ty, "a float type", DType::is_float)
}

fn expect_numeric(what: &str, ty: &TensorType) -> Result<(), ShapeError> {
    expect_dtype(what, ty, "a numeric type", |d| d != DType::Bool)
}

fn same_dtype(what: &str, a: &TensorType, b: &TensorType) -> Result<(), ShapeError> {
    if a.dtype == b.dtype {
        return Ok(());
    }
    Err(ShapeError::DType {
        what: what.to_string(),
        expected: format!("{} like the first operand", a.dtype),
        got: b.dtype,
    })
}

/// A constant must be exactly representable in its dtype (integers: whole and
/// in range, i64 within ±2^53 so the f64 attribute is exact).
fn check_constant(value: f64, dtype: DType) -> Result<(), ShapeError> {
    let (lo, hi) = match dtype {
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::I64 => (-(2f64.powi(53)), 2f64.powi(53)),
        DType::Bool => (0.0, 1.0),
        DType::F32 | DType::F16 | DType::BF16 => return Ok(()),
    };
    if !value.is_finite() || value.fract() != 0.0 || value < lo || value > hi {
        return Err(ShapeError::Attribute(format!(
            "constant {value:?} is not representable as {dtype}"
        )));
    }
    Ok(())
}

/// Sizes must evaluate (exact divisions) and must not be negative constants.
fn check_sizes(cx: &ShapeCx, dims: &[Dim]) -> Result<(), ShapeError> {
    for d in dims {
        if cx.eval(d)?.is_never_positive() {
            return Err(ShapeError::Attribute(format!(
                "size {} is negative",
                cx.describe(d)
            )));
        }
    }
    Ok(())
}

fn infer_unary(u: UnaryOp, x: &TensorType) -> Result<TensorType, ShapeError> {
    let what = format!("input of {}", u.name());
    match u {
        UnaryOp::Not => expect_dtype(&what, x, "bool", |d| d == DType::Bool)?,
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => expect_numeric(&what, x)?,
        _ => expect_float(&what, x)?,
    }
    Ok(x.clone())
}

fn infer_binary(
    b: BinaryOp,
    x: &TensorType,
    y: &TensorType,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    same_dtype(&format!("operands of {}", b.name()), x, y)?;
    let what = format!("operands of {}", b.name());
    match b {
        BinaryOp::And | BinaryOp::Or => expect_dtype(&what, x, "bool", |d| d == DType::Bool)?,
        BinaryOp::Eq | BinaryOp::Ne => {}
        BinaryOp::Pow => expect_float(&what, x)?,
        _ => expect_numeric(&what, x)?,
    }
    let shape = cx.broadcast(&x.shape, &y.shape)?;
    let dtype = if b.is_predicate() {
        DType::Bool
    } else {
        x.dtype
    };
    Ok(TensorType::new(dtype, shape))
}

fn infer_matmul(
    a: &TensorType,
    b: &TensorType,
    ta: bool,
    tb: bool,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    same_dtype("operands of matmul", a, b)?;
    expect_numeric("operands of matmul", a)?;
    if a.rank() < 2 {
        return Err(rank_error("lhs of matmul", "at least 2", a));
    }
    if b.rank() < 2 {
        return Err(rank_error("rhs of matmul", "at least 2", b));
    }
    let (ar, br) = (a.rank(), b.rank());
    let (m, ka) = if ta {
        (&a.shape[ar - 1], &a.shape[ar - 2])
    } else {
        (&a.shape[ar - 2], &a.shape[ar - 1])
    };
    let (kb, n) = if tb {
        (&b.shape[br - 1], &b.shape[br - 2])
    } else {
        (&b.shape[br - 2], &b.shape[br - 1])
    };
    cx.expect_same("inner dims differ", ka, kb, a, b)?;
    let mut shape = cx
        .broadcast(&a.shape[..ar - 2], &b.shape[..br - 2])
        .map_err(|e| match e {
            ShapeError::Broadcast {
                axis, a: x, b: y, ..
            } => ShapeError::Broadcast {
                lhs: a.shape_string(),
                rhs: b.shape_string(),
                axis: axis - 2,
                a: x,
                b: y,
            },
            other => other,
        })?;
    shape.push(m.clone());
    shape.push(n.clone());
    Ok(TensorType::new(a.dtype, shape))
}

fn infer_attention(
    inputs: &[TensorType],
    mask: Option<usize>,
    slopes: Option<usize>,
    table: Option<(usize, crate::op::RelativeBias)>,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    for (role, t) in [("query", q), ("key", k), ("value", v)] {
        let what = format!("attention {role} [B, heads, len, head_dim]");
        if t.rank() != 4 {
            return Err(rank_error(&what, "4", t));
        }
        expect_float(&format!("attention {role}"), t)?;
    }
    same_dtype("attention key", q, k)?;
    same_dtype("attention value", q, v)?;
    cx.expect_same(
        "attention batch differs between query and key",
        &q.shape[0],
        &k.shape[0],
        q,
        k,
    )?;
    cx.expect_same(
        "attention batch differs between key and value",
        &k.shape[0],
        &v.shape[0],
        k,
        v,
    )?;
    cx.expect_same(
        "attention head dim differs between query and key",
        &q.shape[3],
        &k.shape[3],
        q,
        k,
    )?;
    cx.expect_same(
        "attention kv heads differ between key and value",
        &k.shape[1],
        &v.shape[1],
        k,
        v,
    )?;
    cx.expect_same(
        "attention key and value lengths differ",
        &k.shape[2],
        &v.shape[2],
        k,
        v,
    )?;
    let (h, hk) = (cx.eval(&q.shape[1])?, cx.eval(&k.shape[1])?);
    match h.div(&hk) {
        Ok(_) => {}
        Err(_) => {
            return Err(ShapeError::DimMismatch {
                what: "query heads are not a multiple of kv heads (GQA needs h % h_kv == 0)".into(),
                lhs: cx.describe(&q.shape[1]),
                rhs: cx.describe(&k.shape[1]),
                lhs_ty: q.to_string(),
                rhs_ty: k.to_string(),
            })
        }
    }
    if let Some(slopes) = slopes.map(|i| &inputs[i]) {
        expect_float("attention ALiBi slopes", slopes)?;
        if slopes.rank() != 1 {
            return Err(rank_error("attention ALiBi slopes [heads]", "1", slopes));
        }
        cx.expect_same(
            "attention ALiBi needs one slope per query head",
            &slopes.shape[0],
            &q.shape[1],
            slopes,
            q,
        )?;
    }
    if let Some((i, rel)) = table {
        let t = &inputs[i];
        expect_float("attention relative bias table", t)?;
        if t.rank() != 2 {
            return Err(rank_error(
                "attention relative bias table [buckets, heads]",
                "2",
                t,
            ));
        }
        cx.expect_same(
            "attention relative bias table needs one column per query head",
            &t.shape[1],
            &q.shape[1],
            t,
            q,
        )?;
        if !cx.is_const(&t.shape[0], rel.buckets as i64)? {
            return Err(ShapeError::Attribute(format!(
                "attention rel_buckets={} but the bias table {t} has {} rows",
                rel.buckets,
                cx.describe(&t.shape[0])
            )));
        }
    }
    if let Some(mask) = mask.map(|i| &inputs[i]) {
        expect_dtype("attention mask", mask, "bool", |d| d == DType::Bool)?;
        let scores = vec![
            q.shape[0].clone(),
            q.shape[1].clone(),
            q.shape[2].clone(),
            k.shape[2].clone(),
        ];
        if mask.rank() > 4 {
            return Err(rank_error("attention mask", "at most 4", mask));
        }
        let offset = 4 - mask.rank();
        for (i, d) in mask.shape.iter().enumerate() {
            let target = &scores[offset + i];
            if !cx.same(d, target)? && !cx.is_const(d, 1)? {
                return Err(ShapeError::Attribute(format!(
                    "attention mask {} does not broadcast to the scores {}: axis {} is {} vs {}",
                    mask.shape_string(),
                    shape_string(&scores),
                    offset + i,
                    cx.describe(d),
                    cx.describe(target)
                )));
            }
        }
    }
    Ok(TensorType::new(
        q.dtype,
        vec![
            q.shape[0].clone(),
            q.shape[1].clone(),
            q.shape[2].clone(),
            v.shape[3].clone(),
        ],
    ))
}

fn infer_moe(inputs: &[TensorType], top_k: usize, cx: &ShapeCx) -> Result<TensorType, ShapeError> {
    let (x, router, gate, up, down) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3], &inputs[4]);
    expect_float("input of moe", x)?;
    let Some(d) = x.shape.last() else {
        return Err(rank_error("input of moe [..., d]", "at least 1", x));
    };
    for (role, t, rank) in [
        ("router [E, d]", router, 2),
        ("gate [E, f, d]", gate, 3),
        ("up [E, f, d]", up, 3),
        ("down [E, d, f]", down, 3),
    ] {
        same_dtype(&format!("moe {role}"), x, t)?;
        if t.rank() != rank {
            return Err(rank_error(&format!("moe {role}"), &rank.to_string(), t));
        }
    }
    let experts = &router.shape[0];
    cx.expect_same(
        "moe router width differs from the input's",
        &router.shape[1],
        d,
        router,
        x,
    )?;
    for (what, t) in [("gate", gate), ("up", up), ("down", down)] {
        cx.expect_same(
            &format!("moe {what} experts differ from the router's"),
            &t.shape[0],
            experts,
            t,
            router,
        )?;
    }
    cx.expect_same(
        "moe gate width differs from the input's",
        &gate.shape[2],
        d,
        gate,
        x,
    )?;
    cx.expect_same(
        "moe up width differs from the input's",
        &up.shape[2],
        d,
        up,
        x,
    )?;
    cx.expect_same(
        "moe up and gate widths differ",
        &up.shape[1],
        &gate.shape[1],
        up,
        gate,
    )?;
    cx.expect_same(
        "moe down output differs from the input's width",
        &down.shape[1],
        d,
        down,
        x,
    )?;
    cx.expect_same(
        "moe down input differs from the gate's width",
        &down.shape[2],
        &gate.shape[1],
        down,
        gate,
    )?;
    if let Some(e) = cx.eval(experts)?.as_const() {
        if top_k as i64 > e {
            return Err(ShapeError::Attribute(format!(
                "moe top_k={top_k} chooses more experts per token than the router has: {} ({router})",
                cx.describe(experts)
            )));
        }
    }
    Ok(x.clone())
}

fn infer_lora(
    inputs: &[TensorType],
    layout: WeightLayout,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    let (x, w, a, b) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
    expect_float("input of lora_linear", x)?;
    for (role, t) in [("weight", w), ("lora_a", a), ("lora_b", b)] {
        same_dtype(&format!("{role} of lora_linear"), x, t)?;
        if t.rank() != 2 {
            return Err(rank_error(&format!("{role} of lora_linear"), "2", t));
        }
    }
    let Some(x_in) = x.shape.last() else {
        return Err(rank_error("input of lora_linear", "at least 1", x));
    };
    // (in, out) of w, (in, r) of a, (r, out) of b, whatever the storage layout.
    let (w_in, w_out, a_in, a_r, b_r, b_out) = match layout {
        WeightLayout::InOut => (
            &w.shape[0],
            &w.shape[1],
            &a.shape[0],
            &a.shape[1],
            &b.shape[0],
            &b.shape[1],
        ),
        WeightLayout::OutIn => (
            &w.shape[1],
            &w.shape[0],
            &a.shape[1],
            &a.shape[0],
            &b.shape[1],
            &b.shape[0],
        ),
    };
    cx.expect_same(
        "lora_linear input width differs from the weight's in-features",
        x_in,
        w_in,
        x,
        w,
    )?;
    cx.expect_same(
        "lora_linear lora_a in-features differ from the weight's",
        a_in,
        w_in,
        a,
        w,
    )?;
    cx.expect_same(
        "lora_linear rank differs between lora_a and lora_b",
        a_r,
        b_r,
        a,
        b,
    )?;
    cx.expect_same(
        "lora_linear lora_b out-features differ from the weight's",
        b_out,
        w_out,
        b,
        w,
    )?;
    if let Some(bias) = inputs.get(4) {
        same_dtype("bias of lora_linear", x, bias)?;
        if bias.rank() != 1 {
            return Err(rank_error("bias of lora_linear", "1", bias));
        }
        cx.expect_same(
            "lora_linear bias length differs from out-features",
            &bias.shape[0],
            w_out,
            bias,
            w,
        )?;
    }
    let mut shape = x.shape.clone();
    let last = shape.len() - 1;
    shape[last] = w_out.clone();
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_kernel(
    inputs: &[TensorType],
    body: &[KernelOp],
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    if body.is_empty() {
        return Err(ShapeError::Attribute("kernel body is empty".into()));
    }
    let mut shape: Vec<Dim> = Vec::new();
    for t in inputs {
        shape = cx.broadcast(&shape, &t.shape)?;
    }
    // Scalar types of every kernel value: operands first, then instructions.
    let mut vals: Vec<TensorType> = inputs
        .iter()
        .map(|t| TensorType::new(t.dtype, vec![]))
        .collect();
    for (i, k) in body.iter().enumerate() {
        let at = |j: usize| -> Result<&TensorType, ShapeError> {
            if j >= vals.len() {
                return Err(ShapeError::Attribute(format!(
                    "kernel instruction {i} reads value {j}, but only {} are defined before it",
                    vals.len()
                )));
            }
            Ok(&vals[j])
        };
        let scalar_cx = ShapeCx::new();
        let ty = match k {
            KernelOp::Unary(u, a) => infer_unary(*u, at(*a)?)?,
            KernelOp::Binary(b, x, y) => infer_binary(*b, at(*x)?, at(*y)?, &scalar_cx)?,
            KernelOp::Where(c, a, b) => {
                let (c, a, b) = (at(*c)?, at(*a)?, at(*b)?);
                expect_dtype("condition of where", c, "bool", |d| d == DType::Bool)?;
                same_dtype("where", a, b)?;
                a.clone()
            }
            KernelOp::Cast(t, a) => at(*a)?.with_dtype(*t),
            KernelOp::Const(v, t) => {
                check_constant(*v, *t)?;
                TensorType::new(*t, vec![])
            }
        };
        vals.push(ty);
    }
    let dtype = vals.last().map_or(DType::F32, |t| t.dtype);
    Ok(TensorType::new(dtype, shape))
}

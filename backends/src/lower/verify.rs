//! The Program verifier. Structure (binding-independent): operand counts and
//! shapes per kernel kind, views of roots only, no step reads a buffer before
//! it is written, nothing writes an input or a weight, every output is
//! written. Per binding: every view stays inside its root, and no two arena
//! slots that are live at the same step overlap. Every error names the step
//! or buffer; all are collected, not just the first.

use kiln_ir::{Dim, ShapeCx};

use super::{ArenaPlan, BufferId, BufferKind, Kernel, Program, RowOp};
use crate::RunError;

fn err(p: &Program, errors: Vec<String>) -> Result<(), RunError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RunError::Program {
            func: p.name.clone(),
            errors,
        })
    }
}

/// Checks what holds for every binding.
pub fn verify_structure(p: &Program) -> Result<(), RunError> {
    let mut errors = Vec::new();
    let n = p.buffers.len();
    let valid = |b: BufferId| b.index() < n;
    for (i, b) in p.buffers.iter().enumerate() {
        if let BufferKind::View { base, strides, .. } = &b.kind {
            if !valid(*base) || matches!(p.buffer(*base).kind, BufferKind::View { .. }) {
                errors.push(format!("b{i} views {base}, which is not a root buffer"));
            } else if p.buffer(*base).dtype != b.dtype {
                errors.push(format!("b{i} views {base} with another dtype"));
            }
            if strides.len() != b.shape.len() {
                errors.push(format!(
                    "b{i} has {} strides for rank {}",
                    strides.len(),
                    b.shape.len()
                ));
            }
        }
    }
    let mut written = vec![false; n];
    for &b in p.inputs.iter().chain(&p.params) {
        if valid(b) {
            written[p.root(b).index()] = true;
        }
    }
    for (i, s) in p.steps.iter().enumerate() {
        let at = format!("s{i} ({})", s.origin);
        if !s
            .inputs
            .iter()
            .chain(std::iter::once(&s.output))
            .all(|&b| valid(b))
        {
            errors.push(format!("{at}: refers to a buffer that does not exist"));
            continue;
        }
        for &b in &s.inputs {
            if !written[p.root(b).index()] {
                errors.push(format!(
                    "{at}: reads {b} ({}) before it is written",
                    p.buffer(b).value
                ));
            }
        }
        let out_root = p.root(s.output);
        if matches!(
            p.buffer(out_root).kind,
            BufferKind::Input { .. } | BufferKind::Param { .. }
        ) {
            errors.push(format!(
                "{at}: writes {} ({}), an input or weight",
                s.output,
                p.buffer(s.output).value
            ));
        }
        written[out_root.index()] = true;
        if let Err(m) = check_step(p, &s.kernel, &s.inputs, s.output) {
            errors.push(format!("{at}: {m}"));
        }
    }
    for (name, b) in &p.outputs {
        if valid(*b) && !written[p.root(*b).index()] {
            errors.push(format!("output {name} ({b}) is never written"));
        }
    }
    err(p, errors)
}

fn check_step(p: &Program, k: &Kernel, ins: &[BufferId], out: BufferId) -> Result<(), String> {
    let shape = |b: BufferId| &p.buffer(b).shape;
    let o = shape(out);
    let count = |lo: usize, hi: usize| {
        if ins.len() < lo || ins.len() > hi {
            Err(format!(
                "{} takes {lo} to {hi} operands, got {}",
                k.kind_name(),
                ins.len()
            ))
        } else {
            Ok(())
        }
    };
    let same = |b: BufferId, what: &str| {
        if shape(b) == o {
            Ok(())
        } else {
            Err(format!(
                "{what} {b} has shape {} but the output has {}",
                kiln_ir::types::shape_string(shape(b)),
                kiln_ir::types::shape_string(o)
            ))
        }
    };
    match k {
        Kernel::Loop { body } => {
            if body.is_empty() {
                return Err("an empty loop body".into());
            }
            for (j, op) in body.iter().enumerate() {
                if op.args().iter().any(|&a| a >= ins.len() + j) {
                    return Err(format!("loop instruction {j} reads an undefined value"));
                }
            }
            ins.iter().try_for_each(|&b| same(b, "operand"))
        }
        Kernel::Copy => {
            count(1, 1)?;
            if p.buffer(ins[0]).dtype != p.buffer(out).dtype {
                return Err("copy between dtypes".into());
            }
            same(ins[0], "source")
        }
        Kernel::Fill(_) => count(0, 0),
        Kernel::Gemm { epilogue } => {
            if ins.len() < 2 {
                return Err("gemm needs A and B".into());
            }
            let (a, b) = (shape(ins[0]), shape(ins[1]));
            let r = o.len();
            if r < 2 || a.len() != r || b.len() != r {
                return Err(format!(
                    "gemm operands of ranks {}, {} for an output of rank {r}",
                    a.len(),
                    b.len()
                ));
            }
            if a[..r - 2] != o[..r - 2]
                || b[..r - 2] != o[..r - 2]
                || a[r - 2] != o[r - 2]
                || b[r - 1] != o[r - 1]
                || a[r - 1] != b[r - 2]
            {
                return Err(format!(
                    "gemm shapes disagree: {} · {} -> {}",
                    kiln_ir::types::shape_string(a),
                    kiln_ir::types::shape_string(b),
                    kiln_ir::types::shape_string(o)
                ));
            }
            for (j, op) in epilogue.iter().enumerate() {
                if op.args().iter().any(|&x| x >= ins.len() - 1 + j) {
                    return Err(format!("epilogue instruction {j} reads an undefined value"));
                }
            }
            ins[2..]
                .iter()
                .try_for_each(|&b| same(b, "epilogue operand"))
        }
        Kernel::Row(RowOp::Reduce { axes, .. }) => {
            count(1, 1)?;
            let x = shape(ins[0]);
            if x.len() != o.len() + axes || x[..o.len()] != o[..] {
                return Err("reduce output is not the input without its row axes".into());
            }
            Ok(())
        }
        Kernel::Row(RowOp::Softmax) => {
            count(1, 1)?;
            same(ins[0], "input")
        }
        Kernel::Row(RowOp::LayerNorm { .. } | RowOp::RmsNorm { .. }) => {
            count(2, 3)?;
            same(ins[0], "input")?;
            for &w in &ins[1..] {
                if shape(w).len() != 1 || o.last() != shape(w).last() {
                    return Err(format!("norm parameter {w} does not match the last axis"));
                }
            }
            Ok(())
        }
        Kernel::Attention {
            alibi, relative, ..
        } => {
            let tensors = if let Some(r) = relative {
                count(4, 5)?;
                let (q, table) = (shape(ins[0]), shape(ins[ins.len() - 1]));
                if table.len() != 2
                    || q.get(1) != table.get(1)
                    || table[0].as_const() != Some(r.buckets as i64)
                {
                    return Err(
                        "the relative bias table must be [buckets, heads of the query]".into(),
                    );
                }
                &ins[..ins.len() - 1]
            } else if *alibi {
                count(4, 5)?;
                let (q, slopes) = (shape(ins[0]), shape(ins[ins.len() - 1]));
                if slopes.len() != 1 || q.get(1) != slopes.first() {
                    return Err("ALiBi slopes must be [heads] of the query".into());
                }
                &ins[..ins.len() - 1]
            } else {
                count(3, 4)?;
                ins
            };
            if tensors
                .iter()
                .chain(std::iter::once(&out))
                .any(|&b| shape(b).len() != 4)
            {
                return Err("attention operands must have rank 4".into());
            }
            Ok(())
        }
        Kernel::Gather => count(2, 2),
        Kernel::Moe { top_k } => {
            count(5, 5)?;
            same(ins[0], "input")?;
            let (r, g, u, dn) = (shape(ins[1]), shape(ins[2]), shape(ins[3]), shape(ins[4]));
            let d = o.last();
            if r.len() != 2 || g.len() != 3 || u != g || dn.len() != 3 {
                return Err(
                    "moe weights must be router [E, d], gate/up [E, f, d], down [E, d, f]".into(),
                );
            }
            if r.get(1) != d
                || g[2..] != r[1..]
                || g[0] != r[0]
                || dn[0] != r[0]
                || dn.get(1) != d
                || dn[2] != g[1]
            {
                return Err("moe weight shapes disagree".into());
            }
            match r[0].as_const() {
                Some(e) if (*top_k as i64) > e || *top_k == 0 => {
                    Err(format!("moe top_k={top_k} with {e} experts"))
                }
                _ => Ok(()),
            }
        }
        Kernel::Rope { .. } => {
            count(2, 2)?;
            same(ins[0], "input")?;
            if shape(ins[1])[..] != o[..o.len().saturating_sub(1)] {
                return Err("positions are not viewed as the input without its last axis".into());
            }
            Ok(())
        }
    }
}

/// Whether every size check of `p` holds under `cx` (what
/// [`verify_binding_with`] reports when one does not).
pub fn checks_hold(p: &Program, cx: &ShapeCx) -> bool {
    p.checks
        .iter()
        .all(|c| matches!((eval(cx, &c.lhs), eval(cx, &c.rhs)), (Ok(l), Ok(r)) if l <= r))
}

fn eval(cx: &ShapeCx, d: &Dim) -> Result<i64, String> {
    cx.eval(d)
        .map_err(|e| e.to_string())?
        .as_const()
        .ok_or_else(|| format!("`{d}` does not evaluate to a number (is a symbol unbound?)"))
}

/// Most elements [`check_written`] visits before it leaves the rest to the
/// per-buffer check of [`verify_structure`].
const WRITTEN_CHECK_LIMIT: usize = 1 << 26;

/// Calls `f` with every element address of a view.
fn each_address(
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    mut f: impl FnMut(usize) -> bool,
) {
    if shape.contains(&0) {
        return;
    }
    let mut idx = vec![0usize; shape.len()];
    let mut at = offset;
    loop {
        if !f(at) {
            return;
        }
        let mut k = shape.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            at += strides[k];
            if idx[k] < shape[k] {
                break;
            }
            at -= strides[k] * shape[k];
            idx[k] = 0;
        }
    }
}

/// Element by element: no step reads an element of a temporary, an output
/// or a cache before a step wrote it (a cache's input positions count as
/// written). Catches a buffer only partly written, which the per-buffer
/// check of [`verify_structure`] cannot.
fn check_written(p: &Program, cx: &ShapeCx, errors: &mut Vec<String>) {
    type View = (usize, Vec<usize>, Vec<usize>, usize);
    let resolve = |b: BufferId| -> Option<View> {
        let l = p.layout(b).ok()?;
        let ev = |d: &Dim| eval(cx, d).ok().and_then(|v| usize::try_from(v).ok());
        let shape = l.shape.iter().map(ev).collect::<Option<Vec<_>>>()?;
        let strides = l.strides.iter().map(ev).collect::<Option<Vec<_>>>()?;
        Some((p.root(b).index(), shape, strides, ev(&l.offset)?))
    };
    let tracked = |r: usize| {
        matches!(
            p.buffers[r].kind,
            BufferKind::Temp | BufferKind::Output { .. } | BufferKind::State { .. }
        )
    };
    let mut written: Vec<Option<Vec<bool>>> = vec![None; p.buffers.len()];
    let mut budget = WRITTEN_CHECK_LIMIT;
    for (r, slot) in written.iter_mut().enumerate() {
        if !tracked(r) {
            continue;
        }
        let Some((_, shape, _, _)) = resolve(BufferId(r as u32)) else {
            return;
        };
        let n: usize = shape.iter().product();
        let Some(left) = budget.checked_sub(n) else {
            return;
        };
        budget = left;
        *slot = Some(vec![false; n]);
    }
    for st in &p.states {
        if let Some(&input) = st.input.and_then(|i| p.inputs.get(i)) {
            let Some((r, shape, strides, offset)) = resolve(input) else {
                return;
            };
            if let Some(w) = written[r].as_mut() {
                each_address(&shape, &strides, offset, |a| {
                    if let Some(x) = w.get_mut(a) {
                        *x = true;
                    }
                    true
                });
            }
        }
    }
    for (i, s) in p.steps.iter().enumerate() {
        for &b in &s.inputs {
            let Some((r, shape, strides, offset)) = resolve(b) else {
                return;
            };
            let n: usize = shape.iter().product();
            let Some(left) = budget.checked_sub(n) else {
                return;
            };
            budget = left;
            let Some(w) = written[r].as_ref() else {
                continue;
            };
            let mut unwritten = None;
            each_address(&shape, &strides, offset, |a| {
                if !w.get(a).copied().unwrap_or(false) {
                    unwritten = Some(a);
                    return false;
                }
                true
            });
            if let Some(a) = unwritten {
                errors.push(format!(
                    "s{i} ({}): reads element {a} of b{r} ({}) before any step writes it",
                    s.origin, p.buffers[r].value
                ));
            }
        }
        let Some((r, shape, strides, offset)) = resolve(s.output) else {
            return;
        };
        if let Some(w) = written[r].as_mut() {
            each_address(&shape, &strides, offset, |a| {
                if let Some(x) = w.get_mut(a) {
                    *x = true;
                }
                true
            });
        }
    }
}

/// Checks the views and the arena plan of `p` under one binding.
pub fn verify_binding(p: &Program, cx: &ShapeCx, plan: &ArenaPlan) -> Result<(), RunError> {
    verify_binding_with(p, cx, plan, true)
}

/// [`verify_binding`]; with `elements: false` without the element-by-element
/// check that everything read was written, whose cost grows with the sizes
/// (an executor runs it on the first binding of a Program: the access pattern
/// is the same affine one under every binding).
pub fn verify_binding_with(
    p: &Program,
    cx: &ShapeCx,
    plan: &ArenaPlan,
    elements: bool,
) -> Result<(), RunError> {
    let mut errors = Vec::new();
    let mut numel: Vec<i128> = Vec::with_capacity(p.buffers.len());
    for (i, b) in p.buffers.iter().enumerate() {
        let mut n: i128 = 1;
        for d in &b.shape {
            match eval(cx, d) {
                Ok(v) if v >= 0 => n = n.saturating_mul(v as i128),
                Ok(v) => {
                    errors.push(format!("b{i} ({}): size `{d}` is negative ({v})", b.value));
                    n = 0;
                }
                Err(e) => {
                    errors.push(format!("b{i} ({}): {e}", b.value));
                    n = 0;
                }
            }
        }
        numel.push(n);
    }
    for (i, b) in p.buffers.iter().enumerate() {
        let BufferKind::View {
            base,
            offset,
            strides,
        } = &b.kind
        else {
            continue;
        };
        if numel[i] == 0 {
            continue;
        }
        let (mut lo, mut hi) = match eval(cx, offset) {
            Ok(o) => (o as i128, o as i128),
            Err(e) => {
                errors.push(format!("b{i} ({}): offset {e}", b.value));
                continue;
            }
        };
        for (d, s) in b.shape.iter().zip(strides) {
            let (Ok(d), Ok(s)) = (eval(cx, d), eval(cx, s)) else {
                continue;
            };
            let reach = (d as i128 - 1) * s as i128;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        let size = numel[base.index()];
        if lo < 0 || hi >= size {
            errors.push(format!(
                "b{i} ({}): view reaches elements {lo}..={hi} of {base}, which has {size}",
                b.value
            ));
        }
    }
    if elements {
        check_written(p, cx, &mut errors);
    }
    for c in &p.checks {
        match (eval(cx, &c.lhs), eval(cx, &c.rhs)) {
            (Ok(l), Ok(r)) if l > r => errors.push(format!(
                "{}: `{}` = {l} exceeds `{}` = {r}",
                c.what, c.lhs, c.rhs
            )),
            (Err(e), _) | (_, Err(e)) => errors.push(format!("{}: {e}", c.what)),
            _ => {}
        }
    }
    let live = &p.liveness;
    for a in 0..live.slots.len() {
        for c in a + 1..live.slots.len() {
            let (x, y) = (&live.slots[a], &live.slots[c]);
            let meets = x.first <= y.last && y.first <= x.last;
            let (xs, xe) = (plan.offsets[a], plan.offsets[a] + plan.sizes[a]);
            let (ys, ye) = (plan.offsets[c], plan.offsets[c] + plan.sizes[c]);
            if meets && xs < ye && ys < xe && plan.sizes[a] > 0 && plan.sizes[c] > 0 {
                errors.push(format!(
                    "arena slots {a} ({}) and {c} ({}) are live together but overlap: bytes {xs}..{xe} and {ys}..{ye}",
                    x.buffers[0], y.buffers[0]
                ));
            }
        }
    }
    for (i, b) in p.buffers.iter().enumerate() {
        if b.kind == BufferKind::Temp && live.slot_of.get(i).copied().flatten().is_none() {
            errors.push(format!(
                "b{i} ({}) is a temporary without an arena slot",
                b.value
            ));
        }
    }
    err(p, errors)
}

//! LoRA merge.
//!
//! Matches: `lora_linear(x, w, a, b[, bias]) alpha layout` whose `w` is a
//! parameter and whose `a` and `b` are parameters or `concat`s of parameters
//! (adapters stacked along the rank axis), with every one of those tensors f32
//! in the pass context's weights.
//!
//! Produces: one weight `w' = w + (alpha / r)·Δ` in the layout of `w`
//! (`out_in`: `Δ = b·a`, `[out, in]`; `in_out`: `Δ = a·b`, `[in, out]`, i.e. the
//! transpose of PEFT's `B·A`), and the node becomes a plain
//! `matmul(x, w')` (`transpose_b` for `out_in`), followed by `add(·, bias)` when
//! it had a bias; the node keeps its name. The update is accumulated in f64 and
//! rounded once. `w'` replaces `w` under the same name when nothing else in any
//! function of the module uses `w` (the usual case); otherwise it is a new
//! parameter `<w>.merged`, so a weight other nodes still use is never changed.
//! Factors and stacks left unused are removed with their weights.
//!
//! Leaves a node unmerged, with a note saying why, when the module has no
//! weights, when a factor is not a parameter (or stack of parameters), or when a
//! tensor is missing: unmerged adapters stay run-time data (see
//! `kiln_frontends::peft`). Guarantees: outputs equal the unmerged graph's
//! within float rounding; the module verifies.

use std::collections::{BTreeMap, BTreeSet};

use kiln_ir::{
    BinaryOp, Graph, Module, NodeKind, Op, ShapeCx, Tensor, ValueId, WeightLayout, Weights,
};

use crate::{Changed, Pass, PassContext, PassError};

/// Folds `lora_linear` nodes with known weights into plain matmuls.
pub struct LoraMerge;

const NAME: &str = "lora-merge";

/// Where a factor's tensor comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// A parameter, by name.
    Param(String),
    /// The concatenation of parameters along an axis (stacked adapters).
    Concat(usize, Vec<String>),
}

impl Source {
    fn names(&self) -> Vec<&str> {
        match self {
            Source::Param(n) => vec![n.as_str()],
            Source::Concat(_, ns) => ns.iter().map(String::as_str).collect(),
        }
    }
}

/// What one merged weight is made of: every node with the same key gets the
/// same merged weight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    w: String,
    a: Source,
    b: Source,
    alpha_bits: u64,
    out_in: bool,
}

fn failed(message: String) -> PassError {
    PassError::Failed {
        pass: NAME,
        message,
    }
}

fn param_name(g: &Graph, v: ValueId) -> Option<String> {
    match &g.node(v).kind {
        NodeKind::Param { name } => Some(name.clone()),
        _ => None,
    }
}

/// The source of a factor operand, or why it has none.
fn source(g: &Graph, v: ValueId) -> Result<Source, String> {
    if let Some(n) = param_name(g, v) {
        return Ok(Source::Param(n));
    }
    let printed = || kiln_ir::Namer::new(g).name(v).to_string();
    match g.op(v) {
        Some(Op::Concat { axis }) => {
            let rank = g.ty(v).rank() as i64;
            let axis = if *axis < 0 { axis + rank } else { *axis };
            let names = g
                .operands(v)
                .into_iter()
                .map(|p| param_name(g, p))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    format!(
                        "`{}` concatenates values that are not parameters",
                        printed()
                    )
                })?;
            Ok(Source::Concat(axis.max(0) as usize, names))
        }
        _ => Err(format!("`{}` is not a parameter", printed())),
    }
}

/// The key of a `lora_linear` node, or why it cannot be merged.
fn key_of(g: &Graph, u: ValueId, weights: &Weights) -> Result<Key, String> {
    let Some(Op::LoraLinear { alpha, layout }) = g.op(u) else {
        return Err("not a lora_linear".into());
    };
    let ops = g.operands(u);
    if g.ty(ops[0]).rank() < 2 {
        // The merged form is a matmul, which needs a rank >= 2 input.
        return Err("its input has rank 1 (a merged matmul needs rank >= 2)".into());
    }
    let w = param_name(g, ops[1]).ok_or_else(|| {
        format!(
            "its weight `{}` is not a parameter",
            kiln_ir::Namer::new(g).name(ops[1])
        )
    })?;
    let key = Key {
        w,
        a: source(g, ops[2])?,
        b: source(g, ops[3])?,
        alpha_bits: alpha.to_bits(),
        out_in: *layout == WeightLayout::OutIn,
    };
    for n in std::iter::once(key.w.as_str())
        .chain(key.a.names())
        .chain(key.b.names())
    {
        match weights.get(n) {
            None => return Err(format!("no weight for `@{n}`")),
            Some(t) if t.as_f32().is_none() || t.rank() != 2 => {
                return Err(format!("`@{n}` is not an f32 matrix"))
            }
            Some(_) => {}
        }
    }
    Ok(key)
}

/// A dense row-major f32 matrix, viewed for the merge.
struct Mat<'t> {
    rows: usize,
    cols: usize,
    data: &'t [f32],
}

impl Mat<'_> {
    fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j] as f64
    }
}

/// The tensor of a source: a weight, or the concatenation of weights.
fn resolve(src: &Source, weights: &Weights) -> Result<Tensor, String> {
    let get = |n: &str| -> Result<&Tensor, String> {
        weights
            .get(n)
            .ok_or_else(|| format!("no weight for `@{n}`"))
    };
    match src {
        Source::Param(n) => get(n).cloned(),
        Source::Concat(axis, names) => {
            let parts = names
                .iter()
                .map(|n| get(n))
                .collect::<Result<Vec<_>, _>>()?;
            concat2(&parts, *axis).ok_or_else(|| {
                format!("cannot concatenate {names:?} along axis {axis}: shapes disagree")
            })
        }
    }
}

/// Concatenates f32 matrices along `axis` (0 or 1).
fn concat2(parts: &[&Tensor], axis: usize) -> Option<Tensor> {
    let first = parts.first()?;
    let (rows0, cols0) = (first.shape()[0], first.shape()[1]);
    let mut out = Vec::new();
    match axis {
        0 => {
            let mut rows = 0;
            for p in parts {
                if p.rank() != 2 || p.shape()[1] != cols0 {
                    return None;
                }
                rows += p.shape()[0];
                out.extend_from_slice(p.as_f32()?);
            }
            Tensor::f32(vec![rows, cols0], out).ok()
        }
        1 => {
            if parts.iter().any(|p| p.rank() != 2 || p.shape()[0] != rows0) {
                return None;
            }
            let cols: usize = parts.iter().map(|p| p.shape()[1]).sum();
            for i in 0..rows0 {
                for p in parts {
                    let c = p.shape()[1];
                    out.extend_from_slice(&p.as_f32()?[i * c..(i + 1) * c]);
                }
            }
            Tensor::f32(vec![rows0, cols], out).ok()
        }
        _ => None,
    }
}

/// `w + (alpha / r)·Δ` in the layout of `w`; `None` when the shapes disagree.
fn merged_weight(w: &Tensor, a: &Tensor, b: &Tensor, alpha: f64, out_in: bool) -> Option<Tensor> {
    let mat = |t: &'_ Tensor| -> Option<(usize, usize)> {
        (t.rank() == 2 && t.as_f32().is_some()).then(|| (t.shape()[0], t.shape()[1]))
    };
    let ((wr, wc), (ar, ac), (br, bc)) = (mat(w)?, mat(a)?, mat(b)?);
    let (w, a, b) = (
        Mat {
            rows: wr,
            cols: wc,
            data: w.as_f32()?,
        },
        Mat {
            rows: ar,
            cols: ac,
            data: a.as_f32()?,
        },
        Mat {
            rows: br,
            cols: bc,
            data: b.as_f32()?,
        },
    );
    // out_in: w [out, in], a [r, in], b [out, r]; Δ[o][i] = Σ_k b[o][k]·a[k][i].
    // in_out: w [in, out], a [in, r], b [r, out]; Δ[i][o] = Σ_k a[i][k]·b[k][o].
    let (left, right, rank) = if out_in {
        (&b, &a, a.rows)
    } else {
        (&a, &b, a.cols)
    };
    if left.rows != w.rows || right.cols != w.cols || left.cols != rank || right.rows != rank {
        return None;
    }
    // With rank 0 the update is an empty sum (the interpreter's convention too).
    let scale = if rank == 0 { 0.0 } else { alpha / rank as f64 };
    let mut out = Vec::with_capacity(w.rows * w.cols);
    for i in 0..w.rows {
        for j in 0..w.cols {
            let delta: f64 = (0..rank).map(|k| left.at(i, k) * right.at(k, j)).sum();
            out.push((w.at(i, j) + scale * delta) as f32);
        }
    }
    Tensor::f32(vec![w.rows, w.cols], out).ok()
}

/// Re-types and rewrites op node `u` as `op(operands)`, by the op's shape rule.
fn rewrite(
    g: &mut Graph,
    cx: &ShapeCx,
    u: ValueId,
    op: Op,
    operands: &[ValueId],
) -> Result<(), PassError> {
    let name = op.name();
    g.replace_op(u, op, operands, cx)
        .map_err(|e| failed(format!("the merged {name} does not type: {e}")))
}

/// Removes `v` when it is a dead parameter or a dead `concat` of parameters
/// (an adapter factor or stack); returns the names of removed parameters.
fn remove_dead_factor(g: &mut Graph, v: ValueId, removed: &mut Vec<String>) {
    if !g.contains(v) || !g.is_dead(v) {
        return;
    }
    match &g.node(v).kind {
        NodeKind::Param { name } => {
            removed.push(name.clone());
            g.remove_node(v);
        }
        NodeKind::Op {
            op: Op::Concat { .. },
            ..
        } => {
            let parts = g.operands(v);
            g.remove_node(v);
            for p in parts {
                remove_dead_factor(g, p, removed);
            }
        }
        _ => {}
    }
}

/// A parameter name not used by any function nor by the weights.
fn fresh_name(module: &Module, weights: &Weights, base: &str) -> String {
    let taken = |n: &str| {
        weights.contains_key(n) || module.funcs.iter().any(|g| g.param_by_name(n).is_some())
    };
    let mut name = format!("{base}.merged");
    let mut i = 2;
    while taken(&name) {
        name = format!("{base}.merged{i}");
        i += 1;
    }
    name
}

impl Pass for LoraMerge {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let lora_nodes: Vec<(usize, ValueId)> = module
            .funcs
            .iter()
            .enumerate()
            .flat_map(|(f, g)| {
                g.node_ids()
                    .into_iter()
                    .filter(move |&v| matches!(g.op(v), Some(Op::LoraLinear { .. })))
                    .map(move |v| (f, v))
            })
            .collect();
        if lora_nodes.is_empty() {
            return Ok(Changed::No);
        }
        let Some(weights) = cx.weights.as_deref_mut() else {
            cx.note(format!(
                "left {} lora_linear unmerged: the module has no weights",
                lora_nodes.len()
            ));
            return Ok(Changed::No);
        };

        let mut groups: BTreeMap<Key, Vec<(usize, ValueId)>> = BTreeMap::new();
        let mut skipped: Vec<String> = Vec::new();
        for &(f, u) in &lora_nodes {
            let g = &module.funcs[f];
            match key_of(g, u, weights) {
                Ok(key) => groups.entry(key).or_default().push((f, u)),
                Err(why) => {
                    let namer = kiln_ir::Namer::new(g);
                    skipped.push(format!("`{}`: {why}", namer.node_header(g, u)));
                }
            }
        }

        let cxs = module
            .funcs
            .iter()
            .map(|g| {
                kiln_ir::verify(g)
                    .map_err(|e| failed(format!("the module does not verify before merging:\n{e}")))
            })
            .collect::<Result<Vec<ShapeCx>, _>>()?;
        let (mut in_place, mut renamed, mut merged_nodes) = (0usize, Vec::new(), 0usize);
        let mut removed: BTreeSet<String> = BTreeSet::new();
        for (key, nodes) in &groups {
            let w = &weights[&key.w];
            let a = resolve(&key.a, weights).map_err(failed)?;
            let b = resolve(&key.b, weights).map_err(failed)?;
            let alpha = f64::from_bits(key.alpha_bits);
            let merged = merged_weight(w, &a, &b, alpha, key.out_in).ok_or_else(|| {
                failed(format!(
                    "lora_linear on `@{}`: weight {:?}, lora_a {:?} and lora_b {:?} do not fit ({})",
                    key.w,
                    w.shape(),
                    a.shape(),
                    b.shape(),
                    if key.out_in { "out_in" } else { "in_out" }
                ))
            })?;
            // `w` may be replaced in place only when these nodes are its only users.
            let group: BTreeSet<(usize, ValueId)> = nodes.iter().copied().collect();
            // Shared: an output, used outside these nodes, or used by them in
            // another operand slot than the weight's (e.g. as their input).
            let shared = module.funcs.iter().enumerate().any(|(f, g)| {
                g.param_by_name(&key.w).is_some_and(|p| {
                    g.outputs().iter().any(|(_, v)| *v == p)
                        || g.users(p).into_iter().any(|u| {
                            !group.contains(&(f, u))
                                || g.operands(u)
                                    .iter()
                                    .enumerate()
                                    .any(|(i, o)| *o == p && i != 1)
                        })
                })
            });
            let target = if shared {
                let name = fresh_name(module, weights, &key.w);
                renamed.push(name.clone());
                name
            } else {
                in_place += 1;
                key.w.clone()
            };
            for &(f, u) in nodes {
                let g = &mut module.funcs[f];
                let gcx = &cxs[f];
                let ops = g.operands(u);
                let w_param = match g.param_by_name(&target) {
                    Some(p) => p,
                    None => g.add_param(&target, g.ty(ops[1]).clone()),
                };
                let mm = Op::MatMul {
                    transpose_a: false,
                    transpose_b: key.out_in,
                };
                match ops.get(4) {
                    None => rewrite(g, gcx, u, mm, &[ops[0], w_param])?,
                    Some(&bias) => {
                        let product = g
                            .add_op_inferred(mm, &[ops[0], w_param], None, gcx)
                            .map_err(|e| failed(format!("the merged matmul does not type: {e}")))?;
                        rewrite(g, gcx, u, Op::Binary(BinaryOp::Add), &[product, bias])?;
                    }
                }
                merged_nodes += 1;
                let mut gone = Vec::new();
                for v in [ops[2], ops[3]] {
                    remove_dead_factor(g, v, &mut gone);
                }
                removed.extend(gone);
            }
            weights.insert(target, merged);
        }
        // Factor weights no function declares any more go with their parameters.
        for name in &removed {
            if !module.funcs.iter().any(|g| g.param_by_name(name).is_some()) {
                weights.remove(name);
            }
        }

        let mut notes = Vec::new();
        if merged_nodes > 0 {
            let mut note = format!(
                "merged {merged_nodes} lora_linear into {} weights ({in_place} in place",
                groups.len()
            );
            if !renamed.is_empty() {
                note.push_str(&format!(
                    ", {} as new parameters because the base weight has other users: {}",
                    renamed.len(),
                    renamed
                        .iter()
                        .map(|n| format!("@{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            note.push(')');
            notes.push(note);
        }
        if !skipped.is_empty() {
            notes.push(format!(
                "left {} lora_linear unmerged: {}",
                skipped.len(),
                skipped.join("; ")
            ));
        }
        for n in notes {
            cx.note(n);
        }
        Ok(Changed::from_bool(merged_nodes > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], values: &[f32]) -> Tensor {
        Tensor::f32(shape.to_vec(), values.to_vec()).expect("tensor")
    }

    fn run(text: &str, weights: Option<&mut Weights>) -> (Module, Vec<String>, Changed) {
        let mut module = kiln_ir::parse_module(text).expect("parses");
        let mut cx = PassContext::new(weights);
        let changed = LoraMerge.run(&mut module, &mut cx).expect("runs");
        kiln_ir::verify_module(&module).expect("verifies");
        (module, cx.notes.clone(), changed)
    }

    const OUT_IN: &str = "func @f(%x: f32[B, 3]) -> (y: f32[B, 2]) {
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  %y = lora_linear(%x, @w, @a, @b) alpha=2.0 layout=out_in : f32[B, 2]
  return %y
}
";

    fn out_in_weights() -> Weights {
        let mut w = Weights::new();
        w.insert("w".into(), t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        w.insert("a".into(), t(&[1, 3], &[1.0, 0.0, -1.0]));
        w.insert("b".into(), t(&[2, 1], &[0.5, 2.0]));
        w
    }

    #[test]
    fn merges_out_in_in_place() {
        let mut w = out_in_weights();
        let (module, notes, changed) = run(OUT_IN, Some(&mut w));
        assert_eq!(changed, Changed::Yes);
        assert_eq!(
            kiln_ir::print_module(&module),
            "func @f(%x: f32[B, 3]) -> (y: f32[B, 2]) {\n  param @w: f32[2, 3]\n  %y = matmul(%x, @w) transpose_b=true : f32[B, 2]\n  return %y\n}\n"
        );
        // w + 2·b·a = [[1+1, 2, 3-1], [4+4, 5, 6-4]].
        assert_eq!(
            w["w"].as_f32(),
            Some(&[2.0f32, 2.0, 2.0, 8.0, 5.0, 2.0][..])
        );
        assert!(!w.contains_key("a") && !w.contains_key("b"));
        assert_eq!(
            notes,
            vec!["merged 1 lora_linear into 1 weights (1 in place)"]
        );
    }

    #[test]
    fn shared_in_out_weight_gets_a_new_parameter_and_keeps_the_bias() {
        let text = "func @f(%x: f32[B, 2], %ids: i64[B]) -> (y: f32[B, 3], e: f32[B, 3]) {
  param @w: f32[2, 3]
  param @a: f32[2, 1]
  param @b: f32[1, 3]
  param @bias: f32[3]
  %y = lora_linear(%x, @w, @a, @b, @bias) alpha=1.0 layout=in_out : f32[B, 3]
  %e = gather(@w, %ids) : f32[B, 3]
  return %y, %e
}
";
        let mut w = Weights::new();
        w.insert("w".into(), t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        w.insert("a".into(), t(&[2, 1], &[1.0, 2.0]));
        w.insert("b".into(), t(&[1, 3], &[1.0, 0.0, -1.0]));
        w.insert("bias".into(), t(&[3], &[0.0, 0.0, 0.0]));
        let (module, notes, _) = run(text, Some(&mut w));
        let printed = kiln_ir::print_module(&module);
        assert!(
            printed.contains("%0 = matmul(%x, @w.merged) : f32[B, 3]")
                && printed.contains("%y = add(%0, @bias) : f32[B, 3]")
                && printed.contains("%e = gather(@w, %ids)"),
            "{printed}"
        );
        assert_eq!(
            w["w"].as_f32(),
            Some(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0][..])
        );
        // w + a·b = [[1+1, 2, 3-1], [4+2, 5, 6-2]].
        assert_eq!(
            w["w.merged"].as_f32(),
            Some(&[2.0f32, 2.0, 2.0, 6.0, 5.0, 4.0][..])
        );
        assert!(notes[0].contains("@w.merged"), "{notes:?}");
    }

    #[test]
    fn stacked_factors_merge_as_one_update() {
        let text = "func @f(%x: f32[B, 3]) -> (y: f32[B, 2]) {
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  param @a2: f32[1, 3]
  param @b2: f32[2, 1]
  %sa = concat(@a, @a2) axis=0 : f32[2, 3]
  %sb = concat(@b, @b2) axis=1 : f32[2, 2]
  %y = lora_linear(%x, @w, %sa, %sb) alpha=4.0 layout=out_in : f32[B, 2]
  return %y
}
";
        let mut w = out_in_weights();
        w.insert("a2".into(), t(&[1, 3], &[0.0, 1.0, 0.0]));
        w.insert("b2".into(), t(&[2, 1], &[1.0, 0.0]));
        let (module, _, _) = run(text, Some(&mut w));
        assert_eq!(module.funcs[0].params().len(), 1);
        // w + 2·(b·a + b2·a2).
        assert_eq!(
            w["w"].as_f32(),
            Some(&[2.0f32, 4.0, 2.0, 8.0, 5.0, 2.0][..])
        );
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_weight_shared_across_functions_is_merged_in_place_only_when_every_use_merges() {
        let two = |second: &str| {
            format!(
                "{OUT_IN}func @g(%x: f32[B, 3]) -> (y: f32[B, 2]) {{
  param @w: f32[2, 3]
  param @a: f32[1, 3]
  param @b: f32[2, 1]
  {second}
  return %y
}}
"
            )
        };
        let mut w = out_in_weights();
        let (module, notes, _) = run(
            &two("%y = lora_linear(%x, @w, @a, @b) alpha=2.0 layout=out_in : f32[B, 2]"),
            Some(&mut w),
        );
        assert_eq!(
            notes,
            vec!["merged 2 lora_linear into 1 weights (1 in place)"]
        );
        assert!(!kiln_ir::print_module(&module).contains("merged"));
        assert_eq!(
            w["w"].as_f32(),
            Some(&[2.0f32, 2.0, 2.0, 8.0, 5.0, 2.0][..])
        );

        let mut w = out_in_weights();
        let (module, _, _) = run(
            &two("%y = matmul(%x, @w) transpose_b=true : f32[B, 2]"),
            Some(&mut w),
        );
        let printed = kiln_ir::print_module(&module);
        assert!(
            printed.contains("%y = matmul(%x, @w.merged) transpose_b=true")
                && printed.contains("%y = matmul(%x, @w) transpose_b=true"),
            "{printed}"
        );
        assert_eq!(
            w["w"].as_f32(),
            Some(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0][..])
        );
        // @a and @b are still declared (unused) by @g, so their weights stay.
        assert!(w.contains_key("a"));
    }

    #[test]
    fn without_weights_nodes_stay_and_say_why() {
        let (module, notes, changed) = run(OUT_IN, None);
        assert_eq!(changed, Changed::No);
        assert!(kiln_ir::print_module(&module).contains("lora_linear"));
        assert_eq!(
            notes,
            vec!["left 1 lora_linear unmerged: the module has no weights"]
        );

        let mut w = out_in_weights();
        w.remove("b");
        let (module, notes, changed) = run(OUT_IN, Some(&mut w));
        assert_eq!(changed, Changed::No);
        assert!(kiln_ir::print_module(&module).contains("lora_linear"));
        assert_eq!(
            notes,
            vec!["left 1 lora_linear unmerged: `%y = lora_linear(%x, @w, @a, @b)`: no weight for `@b`"]
        );
    }
}

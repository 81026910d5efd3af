//! The graph side of adapters: finding the model's linear layers, checking that an
//! adapter fits them, inserting it unmerged as `lora_linear` nodes (stacking ranks
//! onto an existing one) and swapping another adapter into a slot's weights.

use std::collections::{BTreeMap, BTreeSet};

use kiln_ir::{
    Dim, Graph, IrError, Module, NodeKind, Op, ShapeCx, Tensor, TensorType, ValueId, WeightLayout,
    Weights,
};

use super::config::{selects, TargetModules};
use super::tensors::{slot_param_names, slot_tensors, LoraAdapter};
use crate::FrontendError;

/// How a weight parameter is used as the weight of linear layers in a module.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearWeight {
    /// The storage layout (`out_in` for `matmul(x, w) transpose_b`).
    pub layout: WeightLayout,
    /// In-features.
    pub in_features: usize,
    /// Out-features.
    pub out_features: usize,
}

/// The op nodes of `g` that use parameter `w` as the weight of a linear layer:
/// `matmul(x, w)` (either transpose of `w`, never of `x`) or `lora_linear(x, w, …)`.
fn linear_uses(g: &Graph, w: ValueId) -> Vec<(ValueId, WeightLayout)> {
    g.users(w)
        .into_iter()
        .filter_map(|u| {
            let ops = g.operands(u);
            match g.op(u)? {
                Op::MatMul {
                    transpose_a: false,
                    transpose_b,
                } if ops.len() == 2 && ops[1] == w && ops[0] != w => Some((
                    u,
                    if *transpose_b {
                        WeightLayout::OutIn
                    } else {
                        WeightLayout::InOut
                    },
                )),
                Op::LoraLinear { layout, .. } if ops.get(1) == Some(&w) && ops[0] != w => {
                    Some((u, *layout))
                }
                _ => None,
            }
        })
        .collect()
}

/// The concrete value of `d`, if it has one.
fn concrete(cx: &ShapeCx, d: &Dim) -> Option<usize> {
    cx.eval(d)
        .ok()
        .and_then(|v| v.as_const())
        .and_then(|c| usize::try_from(c).ok())
}

/// Every parameter of `module` used as the weight of a linear layer, by name.
/// A weight used in both layouts is an error.
pub fn linear_weights(module: &Module) -> Result<BTreeMap<String, LinearWeight>, FrontendError> {
    let mut out: BTreeMap<String, LinearWeight> = BTreeMap::new();
    for g in &module.funcs {
        let cx = kiln_ir::verify(g).map_err(|e| FrontendError::Ir(e.into()))?;
        for &p in g.params() {
            let NodeKind::Param { name } = &g.node(p).kind else {
                continue;
            };
            let ty = g.ty(p);
            let uses = linear_uses(g, p);
            if ty.rank() != 2 || uses.is_empty() {
                continue;
            }
            let (Some(d0), Some(d1)) = (concrete(&cx, &ty.shape[0]), concrete(&cx, &ty.shape[1]))
            else {
                continue;
            };
            for (_, layout) in uses {
                let (in_features, out_features) = match layout {
                    WeightLayout::OutIn => (d1, d0),
                    WeightLayout::InOut => (d0, d1),
                };
                let lw = LinearWeight {
                    layout,
                    in_features,
                    out_features,
                };
                match out.get(name) {
                    Some(prev) if *prev != lw => {
                        return Err(FrontendError::Unsupported(format!(
                            "parameter `{name}` is used as a linear weight in both layouts ({:?} and {:?}); kiln cannot attach one LoRA update to both",
                            prev.layout, lw.layout
                        )))
                    }
                    _ => {
                        out.insert(name.clone(), lw);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Checks that `adapter` fits `module`: every target name selects a linear layer,
/// every selected layer has tensors, and every pair fits its base weight.
pub fn check_adapter(module: &Module, adapter: &LoraAdapter) -> Result<(), FrontendError> {
    let linears = linear_weights(module)?;
    let config_path = adapter.dir.join("adapter_config.json");
    let mut problems = Vec::new();
    if let TargetModules::Names(names) = &adapter.config.target_modules {
        for t in names {
            let selected: Vec<&String> = linears
                .keys()
                .filter(|w| w.strip_suffix(".weight").is_some_and(|m| selects(t, m)))
                .collect();
            if selected.is_empty() {
                let known: BTreeSet<&str> = linears
                    .keys()
                    .filter_map(|w| w.strip_suffix(".weight"))
                    .filter_map(|m| m.rsplit('.').next())
                    .collect();
                problems.push(format!(
                    "target module `{t}` matches no linear layer of the model (its linear layers are named {})",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            for w in selected {
                if !adapter.modules.contains_key(w) {
                    problems.push(format!(
                        "target module `{t}` selects `{}`, but the adapter has no lora_A/lora_B for it",
                        w.trim_end_matches(".weight")
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(FrontendError::Config(format!(
            "{}:\n  {}",
            config_path.display(),
            problems.join("\n  ")
        )));
    }
    let declared = |name: &str| module.funcs.iter().any(|g| g.param_by_name(name).is_some());
    for (w, pair) in &adapter.modules {
        let (a, b) = (pair.lora_a.shape(), pair.lora_b.shape());
        let Some(lw) = linears.get(w) else {
            problems.push(if declared(w) {
                format!(
                    "module `{}`: the parameter `{w}` is not the weight of a matmul (kiln applies LoRA to linear layers only)",
                    pair.module
                )
            } else {
                format!(
                    "module `{}`: the model has no parameter `{w}`",
                    pair.module
                )
            });
            continue;
        };
        if a[1] != lw.in_features || b[0] != lw.out_features {
            let (stored, layout) = match lw.layout {
                WeightLayout::OutIn => ([lw.out_features, lw.in_features], "[out, in]"),
                WeightLayout::InOut => ([lw.in_features, lw.out_features], "[in, out]"),
            };
            problems.push(format!(
                "module `{}`: lora_A {a:?} and lora_B {b:?} do not fit the weight `{w}` {stored:?} ({layout}): expected lora_A [r, {}] and lora_B [{}, r]",
                pair.module, lw.in_features, lw.out_features
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FrontendError::Weights {
            path: adapter.dir.join("adapter_model.safetensors"),
            message: problems.join("\n  "),
        });
    }
    Ok(())
}

/// The adapter slots of `module`: the `<slot>` of every `….lora_A.<slot>` parameter.
pub fn adapter_slots(module: &Module) -> BTreeSet<String> {
    module
        .funcs
        .iter()
        .flat_map(|g| g.params().iter().map(move |&p| &g.node(p).kind))
        .filter_map(|k| match k {
            NodeKind::Param { name } => name.rsplit_once(".lora_A.").map(|(_, s)| s.to_string()),
            _ => None,
        })
        .collect()
}

/// The axes along which `a` and `b` hold the rank, per layout.
fn rank_axes(layout: WeightLayout) -> (usize, usize) {
    match layout {
        WeightLayout::OutIn => (0, 1),
        WeightLayout::InOut => (1, 0),
    }
}

/// The shape context (compile-time bindings) of every function, verified.
fn shape_contexts(module: &Module) -> Result<Vec<ShapeCx>, FrontendError> {
    module
        .funcs
        .iter()
        .map(|g| kiln_ir::verify(g).map_err(|e| FrontendError::Ir(e.into())))
        .collect()
}

fn build_error(message: String) -> FrontendError {
    FrontendError::Ir(IrError::Build(message))
}

/// The factor parameters behind a `lora_linear` operand: the parameter itself,
/// or the parameters of a `concat` along the rank axis (stacked adapters).
fn factor_params(g: &Graph, v: ValueId, axis: usize) -> Option<Vec<ValueId>> {
    let is_param = |x: ValueId| matches!(g.node(x).kind, NodeKind::Param { .. });
    if is_param(v) {
        return Some(vec![v]);
    }
    match g.op(v)? {
        Op::Concat { axis: ax } if (*ax == axis as i64 || *ax == axis as i64 - 2) => {
            let parts = g.operands(v);
            parts.iter().all(|&p| is_param(p)).then_some(parts)
        }
        _ => None,
    }
}

/// Adds an op node typed by its shape rule.
fn add_typed(
    g: &mut Graph,
    cx: &ShapeCx,
    op: Op,
    operands: &[ValueId],
) -> Result<ValueId, FrontendError> {
    let tys: Vec<TensorType> = operands.iter().map(|&o| g.ty(o).clone()).collect();
    let ty = op.infer(&tys, cx).map_err(|e| IrError::Shape {
        node: format!("{} inserted for a LoRA adapter", op.name()),
        source: Box::new(e),
    })?;
    Ok(g.add_op(op, operands, ty, None))
}

/// Makes op node `u` compute `op` on `operands`, re-typed by the shape rule.
fn rewrite(
    g: &mut Graph,
    cx: &ShapeCx,
    u: ValueId,
    op: Op,
    operands: &[ValueId],
) -> Result<(), FrontendError> {
    let tys: Vec<TensorType> = operands.iter().map(|&o| g.ty(o).clone()).collect();
    let ty = op.infer(&tys, cx).map_err(|e| IrError::Shape {
        node: format!("{} rewritten for a LoRA adapter", op.name()),
        source: Box::new(e),
    })?;
    let node = g.node_mut(u);
    if let NodeKind::Op { op: slot, .. } = &mut node.kind {
        *slot = op;
    }
    node.ty = ty;
    g.set_operands(u, operands);
    Ok(())
}

/// What [`insert_adapter`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InsertReport {
    /// The base weights that received the adapter, by name.
    pub modules: Vec<String>,
    /// How many `matmul` nodes became `lora_linear`.
    pub new_nodes: usize,
    /// How many existing `lora_linear` nodes had the adapter stacked onto them.
    pub stacked_nodes: usize,
}

/// Inserts `adapter` unmerged into `module` under the name `slot` (letters,
/// digits, `_`), adding its factors to `weights`. On error nothing is changed.
pub fn insert_adapter(
    module: &mut Module,
    weights: &mut Weights,
    adapter: &LoraAdapter,
    slot: &str,
) -> Result<InsertReport, FrontendError> {
    if slot.is_empty()
        || !slot.starts_with(|c: char| c.is_ascii_alphabetic())
        || !slot.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(FrontendError::Config(format!(
            "adapter slot name `{slot}` must start with a letter and hold only letters, digits and `_`"
        )));
    }
    if adapter_slots(module).contains(slot) {
        return Err(FrontendError::Config(format!(
            "the model already has an adapter in slot `{slot}`; choose another name or swap it"
        )));
    }
    check_adapter(module, adapter)?;
    let mut new_module = module.clone();
    // The compile-time bindings of each function (rewrites do not change them).
    let cxs = shape_contexts(module)?;
    let mut new_weights: Vec<(String, Tensor)> = Vec::new();
    let mut report = InsertReport::default();
    let scale = adapter.config.scale();
    for (w_name, pair) in &adapter.modules {
        let (a_name, b_name) = slot_param_names(w_name, slot);
        if weights.contains_key(&a_name) || weights.contains_key(&b_name) {
            return Err(FrontendError::Config(format!(
                "the weights already hold `{a_name}` or `{b_name}`"
            )));
        }
        // The factor `k` by which this slot's B is stored; equal in every use.
        let mut k: Option<(f64, WeightLayout)> = None;
        for (g, cx) in new_module.funcs.iter_mut().zip(&cxs) {
            let Some(w) = g.param_by_name(w_name) else {
                continue;
            };
            let uses = linear_uses(g, w);
            let Some(&(_, layout)) = uses.first() else {
                continue;
            };
            let w_ty = g.ty(w).clone();
            let in_dim = match layout {
                WeightLayout::OutIn => w_ty.shape[1].clone(),
                WeightLayout::InOut => w_ty.shape[0].clone(),
            };
            let out_dim = match layout {
                WeightLayout::OutIn => w_ty.shape[0].clone(),
                WeightLayout::InOut => w_ty.shape[1].clone(),
            };
            let r = Dim::constant(adapter.config.r as i64);
            let (a_shape, b_shape) = match layout {
                WeightLayout::OutIn => (vec![r.clone(), in_dim], vec![out_dim, r]),
                WeightLayout::InOut => (vec![in_dim, r.clone()], vec![r, out_dim]),
            };
            let a_p = g.add_param(&a_name, TensorType::new(w_ty.dtype, a_shape));
            let b_p = g.add_param(&b_name, TensorType::new(w_ty.dtype, b_shape));
            let (a_axis, b_axis) = rank_axes(layout);
            for (u, _) in uses {
                let ops = g.operands(u);
                let (node_k, new_op, new_ops) = match g.op(u) {
                    Some(Op::LoraLinear { alpha, layout: l }) => {
                        let (alpha, l) = (*alpha, *l);
                        let stacked = |v: ValueId, axis: usize| {
                            factor_params(g, v, axis).ok_or_else(|| {
                                FrontendError::Unsupported(format!(
                                    "module `{}` already has a lora_linear whose factors are not adapter parameters; kiln stacks adapters only onto those it inserted",
                                    pair.module
                                ))
                            })
                        };
                        let mut a_parts = stacked(ops[2], a_axis)?;
                        let mut b_parts = stacked(ops[3], b_axis)?;
                        let old_rank = concrete(cx, &g.ty(ops[2]).shape[a_axis])
                            .filter(|&r| r > 0)
                            .ok_or_else(|| {
                                build_error(format!(
                                    "module `{}`: the existing lora_linear has no concrete rank",
                                    pair.module
                                ))
                            })?;
                        let node_scale = alpha / old_rank as f64;
                        if !(node_scale.is_finite() && node_scale != 0.0) {
                            // Later adapters are rescaled relative to the node's
                            // scale, which a zero-alpha first adapter makes zero.
                            return Err(build_error(format!(
                                "module `{}`: cannot stack another adapter onto one with lora_alpha {alpha} (its update scale is 0); apply the adapters in another order",
                                pair.module
                            )));
                        }
                        a_parts.push(a_p);
                        b_parts.push(b_p);
                        let a_cat = add_typed(
                            g,
                            cx,
                            Op::Concat {
                                axis: a_axis as i64,
                            },
                            &a_parts,
                        )?;
                        let b_cat = add_typed(
                            g,
                            cx,
                            Op::Concat {
                                axis: b_axis as i64,
                            },
                            &b_parts,
                        )?;
                        let mut new_ops = vec![ops[0], w, a_cat, b_cat];
                        new_ops.extend(ops.get(4).copied());
                        let op = Op::LoraLinear {
                            alpha: node_scale * (old_rank + adapter.config.r) as f64,
                            layout: l,
                        };
                        report.stacked_nodes += 1;
                        (scale / node_scale, op, new_ops)
                    }
                    _ => {
                        let op = Op::LoraLinear {
                            alpha: adapter.config.lora_alpha,
                            layout,
                        };
                        report.new_nodes += 1;
                        (1.0, op, vec![ops[0], w, a_p, b_p])
                    }
                };
                match k {
                    Some((prev, _)) if (prev - node_k).abs() > 1e-12 * prev.abs().max(1.0) => {
                        return Err(FrontendError::Unsupported(format!(
                            "module `{}` has lora_linear nodes with different scales; kiln cannot share one adapter slot between them",
                            pair.module
                        )))
                    }
                    _ => k = Some((node_k, layout)),
                }
                let old_factors = [ops.get(2).copied(), ops.get(3).copied()];
                rewrite(g, cx, u, new_op, &new_ops)?;
                // A concat of an earlier stack that nothing uses any more.
                for v in old_factors.into_iter().flatten() {
                    if g.contains(v) && g.op(v).is_some() && g.is_dead(v) {
                        g.remove_node(v);
                    }
                }
            }
        }
        let Some((k, layout)) = k else {
            return Err(build_error(format!(
                "module `{}`: no linear use of `{w_name}` found",
                pair.module
            )));
        };
        let (a, b) = slot_tensors(pair, layout, k).ok_or_else(|| {
            build_error(format!(
                "module `{}`: lora tensors are not f32 matrices",
                pair.module
            ))
        })?;
        new_weights.push((a_name, a));
        new_weights.push((b_name, b));
        report.modules.push(w_name.clone());
    }
    kiln_ir::verify_module(&new_module).map_err(|e| FrontendError::Ir(e.into()))?;
    *module = new_module;
    weights.extend(new_weights);
    Ok(report)
}

/// The `lora_linear` node of `g` whose factor `a` (directly or through a stack)
/// is parameter `p`, with its layout, alpha and total rank.
fn lora_user(g: &Graph, cx: &ShapeCx, p: ValueId) -> Option<(WeightLayout, f64, usize)> {
    let direct = g.users(p);
    let via_concat = direct
        .iter()
        .filter(|&&u| matches!(g.op(u), Some(Op::Concat { .. })))
        .flat_map(|&u| g.users(u));
    direct
        .iter()
        .copied()
        .chain(via_concat)
        .find_map(|u| match g.op(u)? {
            Op::LoraLinear { alpha, layout } => {
                let a = *g.operands(u).get(2)?;
                let (a_axis, _) = rank_axes(*layout);
                let rank = concrete(cx, &g.ty(a).shape[a_axis])?;
                Some((*layout, *alpha, rank))
            }
            _ => None,
        })
}

/// Writes `adapter` into the weights of the existing `slot`, leaving the module
/// unchanged: the adapter must adapt the same modules with the same rank. `B` is
/// rescaled to the `alpha` of the nodes, so `lora_alpha` may differ.
pub fn swap_adapter(
    module: &Module,
    weights: &mut Weights,
    adapter: &LoraAdapter,
    slot: &str,
) -> Result<(), FrontendError> {
    let suffix = format!(".lora_A.{slot}");
    let mut slot_weights: BTreeSet<String> = BTreeSet::new();
    for g in &module.funcs {
        for &p in g.params() {
            if let NodeKind::Param { name } = &g.node(p).kind {
                if let Some(m) = name.strip_suffix(&suffix) {
                    slot_weights.insert(format!("{m}.weight"));
                }
            }
        }
    }
    if slot_weights.is_empty() {
        let slots: Vec<String> = adapter_slots(module).into_iter().collect();
        return Err(FrontendError::Config(format!(
            "the model has no adapter slot `{slot}` (slots: {}); merged adapters cannot be swapped",
            if slots.is_empty() {
                "none".to_string()
            } else {
                slots.join(", ")
            }
        )));
    }
    let given: BTreeSet<String> = adapter.modules.keys().cloned().collect();
    if given != slot_weights {
        let strip = |s: &String| s.trim_end_matches(".weight").to_string();
        let missing: Vec<String> = slot_weights.difference(&given).map(strip).collect();
        let extra: Vec<String> = given.difference(&slot_weights).map(strip).collect();
        return Err(FrontendError::Config(format!(
            "{}: swapping into slot `{slot}` needs an adapter of the same modules (missing: [{}], not in the slot: [{}]); insert it as a new adapter instead",
            adapter.dir.display(),
            missing.join(", "),
            extra.join(", ")
        )));
    }
    let cxs = shape_contexts(module)?;
    let mut updates = Vec::new();
    for (w_name, pair) in &adapter.modules {
        let (a_name, b_name) = slot_param_names(w_name, slot);
        let mut found = None;
        for (g, cx) in module.funcs.iter().zip(&cxs) {
            if let Some(p) = g.param_by_name(&a_name) {
                if let Some(u) = lora_user(g, cx, p) {
                    found = Some(u);
                    break;
                }
            }
        }
        let Some((layout, alpha, rank)) = found else {
            return Err(build_error(format!(
                "module `{}`: `{a_name}` feeds no lora_linear",
                pair.module
            )));
        };
        let k = adapter.config.scale() / (alpha / rank as f64);
        let (a, b) = slot_tensors(pair, layout, k).ok_or_else(|| {
            build_error(format!(
                "module `{}`: lora tensors are not f32 matrices",
                pair.module
            ))
        })?;
        for (name, t) in [(&a_name, &a), (&b_name, &b)] {
            let old = weights.get(name).map(|o| o.shape().to_vec());
            if old.as_deref() != Some(t.shape()) {
                return Err(FrontendError::Weights {
                    path: adapter.dir.join("adapter_model.safetensors"),
                    message: format!(
                        "module `{}`: slot `{slot}` holds `{name}` as {:?} but the adapter gives {:?} (lora_A {:?}, lora_B {:?}); swapping needs the same rank, insert it as a new adapter instead",
                        pair.module,
                        old.unwrap_or_default(),
                        t.shape(),
                        pair.lora_a.shape(),
                        pair.lora_b.shape()
                    ),
                });
            }
        }
        updates.push((a_name, a));
        updates.push((b_name, b));
    }
    weights.extend(updates);
    Ok(())
}

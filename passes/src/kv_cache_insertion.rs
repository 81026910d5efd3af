//! KV-cache insertion: one causal decoder forward becomes two entry points.
//!
//! Matches: a module whose single function maps token ids to logits and whose
//! self-attention is fused into `attention` ops with `causal=true` (run
//! `attention-fusion` first), with no explicit mask operand, and whose
//! positions are `arange` ops of length `T` (the token count).
//!
//! Produces two functions:
//! - `@prefill`: the original forward, plus outputs `key_cache` and
//!   `value_cache` of type `[L, B, hk, T, dh]` (every attention layer's keys and
//!   values stacked in layer order). Generation reads only the last
//!   position's logits, so when the logits are `matmul(x, w)`, prefill
//!   returns them for the last position only (`[B, 1, V]`).
//! - `@decode`: the same forward for `T` new tokens after `S` cached ones: extra
//!   inputs `past_keys`/`past_values: [L, B, hk, S, dh]`; every position
//!   `arange` starts `S` later; each attention reads
//!   `concat(past_l, new_l)` along the length axis (length `S + T`; the
//!   attention op's causal mask is aligned bottom-right, so new token `i` sees
//!   the `S` cached keys and new keys `<= i`); outputs the logits and the
//!   extended caches `[L, B, hk, S + T, dh]`.
//! - In types: `@decode`'s cache inputs are `cache=key_cache` /
//!   `cache=value_cache`, naming the outputs that hold the grown caches; both
//!   functions' cache outputs carry `cache_axis=3`; hoisted values (below) are
//!   `carried` inputs. A backend keeps the caches in place between calls.
//! - Values that do not depend on the new tokens (an encoder–decoder's encoder
//!   output, cross-attention keys/values and mask) are computed once: `@prefill`
//!   also returns them (`cached0`, `cached1`, …) and `@decode` takes them as
//!   inputs of the same names instead of the encoder's inputs.
//!
//! Guarantees: decode on one token costs O(S) in attention and O(1) in the
//! weights; `decode(prefill(x)[caches], next)` computes exactly what the
//! original forward computes for the last token of `x ++ next`; both functions
//! verify, with the cache length a checked symbol like every other dim.

use kiln_ir::{Dim, Graph, InputRole, Module, NodeKind, Op, ShapeCx, TensorType, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Splits a causal decoder into `prefill` and `decode` entry points.
pub struct KvCacheInsertion;

const NAME: &str = "kv-cache";

fn fail(message: impl Into<String>) -> PassError {
    PassError::Failed {
        pass: NAME,
        message: message.into(),
    }
}

/// The causal self-attention nodes of `graph`, in topological order.
fn causal_attentions(graph: &Graph) -> Result<Vec<ValueId>, PassError> {
    let order = graph
        .topo_order()
        .map_err(|_| fail("the graph has a cycle"))?;
    Ok(order
        .into_iter()
        .filter(|&v| matches!(graph.op(v), Some(Op::Attention { causal: true, .. })))
        .collect())
}

/// A symbol name not used anywhere in `graph`.
fn fresh_symbol(graph: &Graph, base: &str) -> String {
    let mut used: Vec<String> = graph.bindings().iter().map(|(n, _)| n.clone()).collect();
    for v in graph.node_ids() {
        used.extend(graph.ty(v).symbols());
    }
    let mut name = base.to_string();
    let mut i = 0;
    while used.contains(&name) {
        i += 1;
        name = format!("{base}{i}");
    }
    name
}

/// `op(operands)` added to `graph`, typed by its shape rule.
fn add(
    graph: &mut Graph,
    cx: &ShapeCx,
    op: Op,
    operands: &[ValueId],
    name: Option<&str>,
) -> Result<ValueId, PassError> {
    let what = op.name();
    graph
        .add_op_inferred(op, operands, name.map(str::to_string), cx)
        .map_err(|e| fail(format!("the {what} it inserts does not type: {e}")))
}

/// Stacks per-layer `[B, hk, len, dh]` tensors into `[L, B, hk, len, dh]`.
fn stack(
    graph: &mut Graph,
    cx: &ShapeCx,
    layers: &[ValueId],
    name: &str,
) -> Result<ValueId, PassError> {
    let mut parts = Vec::new();
    let first = graph.ty(layers[0]).clone();
    for &v in layers {
        let ty = graph.ty(v).clone();
        if ty != first {
            return Err(fail(format!(
                "layers cache different shapes ({} and {first}); one stacked cache needs equal layers",
                ty
            )));
        }
        let mut shape = vec![Dim::constant(1)];
        shape.extend(ty.shape.iter().cloned());
        parts.push(add(graph, cx, Op::Reshape { shape }, &[v], None)?);
    }
    add(graph, cx, Op::Concat { axis: 0 }, &parts, Some(name))
}

/// Checks the preconditions and returns the attention nodes and the token-count symbol.
fn analyse(graph: &Graph) -> Result<(Vec<ValueId>, Dim), PassError> {
    let attns = causal_attentions(graph)?;
    if attns.is_empty() {
        return Err(fail(
            "no causal `attention` op found: run attention-fusion first (kv-cache needs a causal decoder)",
        ));
    }
    let mut len: Option<Dim> = None;
    for &a in &attns {
        let ops = graph.operands(a);
        let mask = graph
            .op(a)
            .and_then(|op| op.attention_extras(ops.len()))
            .and_then(|(mask, _)| mask);
        if mask.is_some() {
            return Err(fail(format!(
                "{} has a mask operand; caching masked (padded) attention is not supported",
                graph.describe(a)
            )));
        }
        let q = graph.ty(ops[0]);
        let k = graph.ty(ops[1]);
        if q.shape[2] != k.shape[2] {
            return Err(fail(format!(
                "{} is not self-attention (query length {} vs key length {})",
                graph.describe(a),
                q.shape[2],
                k.shape[2]
            )));
        }
        match &len {
            None => len = Some(q.shape[2].clone()),
            Some(l) if *l != q.shape[2] => {
                return Err(fail(format!(
                    "attention layers disagree on the sequence length ({l} vs {})",
                    q.shape[2]
                )))
            }
            Some(_) => {}
        }
    }
    let len = len.ok_or_else(|| fail("no attention layers"))?;
    let Some(t) = len.as_sym() else {
        return Err(fail(format!(
            "the sequence length `{len}` is not a run-time symbol"
        )));
    };
    check_no_other_mixing(graph, t)?;
    Ok((attns, len))
}

/// Nodes the outputs depend on.
fn live_nodes(graph: &Graph) -> Vec<ValueId> {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack: Vec<ValueId> = graph.outputs().iter().map(|(_, v)| *v).collect();
    while let Some(v) = stack.pop() {
        if seen.insert(v) {
            stack.extend(graph.operands(v));
        }
    }
    seen.into_iter().collect()
}

/// Rejects graphs where anything but the fused causal attentions combines values
/// across the sequence axis `t`, or where positions are not `arange` ops over
/// `t`: decoding one token against a cache would silently change those results.
fn check_no_other_mixing(graph: &Graph, t: &str) -> Result<(), PassError> {
    let namer = kiln_ir::Namer::new(graph);
    let mentions = |d: &Dim| d.symbols().iter().any(|s| s == t);
    for v in live_nodes(graph) {
        let Some(op) = graph.op(v) else { continue };
        let operands = graph.operands(v);
        let ty = |i: usize| graph.ty(operands[i]);
        let axis_dim = |i: usize, axis: i64| {
            let x = ty(i);
            kiln_ir::shape::normalize_axis("axis", axis, x.rank())
                .ok()
                .map(|a| x.shape[a].clone())
        };
        let why = match op {
            Op::Attention { causal: false, .. } if mentions(&ty(1).shape[2]) => {
                Some("a non-causal attention over the sequence")
            }
            Op::Softmax { axis } if axis_dim(0, *axis).is_some_and(|d| mentions(&d)) => {
                Some("a softmax along the sequence axis (an unfused attention?)")
            }
            Op::CausalMask { queries, keys } if mentions(queries) || mentions(keys) => {
                Some("a causal mask used outside a fused attention")
            }
            Op::Reduce { axes, .. }
                if axes
                    .iter()
                    .any(|a| axis_dim(0, *a).is_some_and(|d| mentions(&d))) =>
            {
                Some("a reduction over the sequence axis")
            }
            Op::Slice { axis, start, end }
                if mentions(start)
                    || mentions(end)
                    || axis_dim(0, *axis).is_some_and(|d| mentions(&d)) =>
            {
                Some("a slice along or sized by the sequence")
            }
            Op::Concat { axis } if axis_dim(0, *axis).is_some_and(|d| mentions(&d)) => {
                Some("a concatenation along the sequence axis")
            }
            Op::MatMul { transpose_a, .. } => {
                let a = ty(0);
                let k = if *transpose_a {
                    &a.shape[a.rank() - 2]
                } else {
                    &a.shape[a.rank() - 1]
                };
                mentions(k).then_some("a matrix product that sums over the sequence axis")
            }
            Op::Arange { start, len: n, .. }
                if mentions(start) || (mentions(n) && n.as_sym() != Some(t)) =>
            {
                Some("positions that are not `arange` over the new tokens")
            }
            Op::Rope { .. } if !matches!(graph.op(operands[1]), Some(Op::Arange { .. })) => {
                Some("rotary positions that do not come from an `arange`")
            }
            _ => None,
        };
        if let Some(why) = why {
            return Err(fail(format!(
                "{} is {why}; decoding against a cache would change its result",
                namer.node_header(graph, v)
            )));
        }
    }
    Ok(())
}

/// Generation reads only the last position's logits: when the `logits`
/// output is `matmul(x, w)` over a `[B, T, d]` input, `@prefill` multiplies
/// only the last position (`slice(x, T-1..T)`), so the LM head's cost does
/// not grow with the prompt. Returns whether it did.
fn last_position_logits(g: &mut Graph, cx: &ShapeCx, len: &Dim) -> Result<bool, PassError> {
    let Some(&(_, logits)) = g.outputs().iter().find(|(n, _)| n == "logits") else {
        return Ok(false);
    };
    let Some(Op::MatMul {
        transpose_a: false,
        transpose_b,
    }) = g.op(logits).cloned()
    else {
        return Ok(false);
    };
    let ops = g.operands(logits);
    let (x, w) = (ops[0], ops[1]);
    let xt = g.ty(x).clone();
    if xt.rank() != 3 || xt.shape[1] != *len || g.users(logits).len() > 1 {
        return Ok(false);
    }
    let start = len
        .sub(&Dim::constant(1))
        .map_err(|e| fail(e.to_string()))?;
    let slice = Op::Slice {
        axis: 1,
        start,
        end: len.clone(),
    };
    let last = add(g, cx, slice, &[x], None)?;
    let mm = Op::MatMul {
        transpose_a: false,
        transpose_b,
    };
    g.replace_op(logits, mm, &[last, w], cx)
        .map_err(|e| fail(format!("the last-position logits do not type: {e}")))?;
    let ty = g.ty(logits).clone();
    for i in 0..g.outputs().len() {
        if g.outputs()[i].1 == logits {
            g.redeclare_output_type(i, ty.clone());
        }
    }
    Ok(true)
}

fn build_prefill(
    src: &Graph,
    cx: &ShapeCx,
    attns: &[ValueId],
    len: &Dim,
) -> Result<Graph, PassError> {
    let mut g = src.clone();
    g.name = "prefill".to_string();
    last_position_logits(&mut g, cx, len)?;
    let keys: Vec<ValueId> = attns.iter().map(|&a| g.operands(a)[1]).collect();
    let values: Vec<ValueId> = attns.iter().map(|&a| g.operands(a)[2]).collect();
    let kc = stack(&mut g, cx, &keys, "key_cache")?;
    let vc = stack(&mut g, cx, &values, "value_cache")?;
    let mut outs = g.outputs().to_vec();
    outs.push(("key_cache".into(), kc));
    outs.push(("value_cache".into(), vc));
    g.set_outputs(outs);
    g.set_cache_output("key_cache", CACHE_AXIS);
    g.set_cache_output("value_cache", CACHE_AXIS);
    Ok(g)
}

/// The length axis of the stacked caches `[L, B, hk, S, dh]`.
const CACHE_AXIS: usize = 3;

fn build_decode(
    src: &Graph,
    cx: &ShapeCx,
    attns: &[ValueId],
    len: &Dim,
) -> Result<Graph, PassError> {
    let mut g = src.clone();
    g.name = "decode".to_string();
    let s = fresh_symbol(&g, "S");
    let past = Dim::sym(&s);
    let layers = attns.len() as i64;
    let k0 = g.ty(g.operands(attns[0])[1]).clone();
    let v0 = g.ty(g.operands(attns[0])[2]).clone();
    let cache_ty = |t: &TensorType| {
        TensorType::new(
            t.dtype,
            vec![
                Dim::constant(layers),
                t.shape[0].clone(),
                t.shape[1].clone(),
                past.clone(),
                t.shape[3].clone(),
            ],
        )
    };
    let past_keys = g.add_input("past_keys", cache_ty(&k0));
    let past_values = g.add_input("past_values", cache_ty(&v0));
    for (input, output) in [(past_keys, "key_cache"), (past_values, "value_cache")] {
        g.set_input_role(
            input,
            InputRole::Cache {
                output: output.to_string(),
            },
        );
    }

    // Positions: every `arange` over the new tokens starts `S` later.
    for v in g.node_ids() {
        let Some(Op::Arange {
            start,
            len: n,
            dtype,
        }) = g.op(v).cloned()
        else {
            continue;
        };
        if n == *len {
            let start = start.add(&past).map_err(|e| fail(e.to_string()))?;
            if let NodeKind::Op { op, .. } = &mut g.node_mut(v).kind {
                *op = Op::Arange {
                    start,
                    len: n,
                    dtype,
                };
            }
        }
    }
    let mut new_keys = Vec::new();
    let mut new_values = Vec::new();
    for (l, &a) in attns.iter().enumerate() {
        let ops = g.operands(a);
        let mut grown = Vec::new();
        for (which, cache) in [(1usize, past_keys), (2usize, past_values)] {
            let cur = ops[which];
            let ty = g.ty(cur).clone();
            let slice = Op::Slice {
                axis: 0,
                start: Dim::constant(l as i64),
                end: Dim::constant(l as i64 + 1),
            };
            let sl = add(&mut g, cx, slice, &[cache], None)?;
            let layer_shape = vec![
                ty.shape[0].clone(),
                ty.shape[1].clone(),
                past.clone(),
                ty.shape[3].clone(),
            ];
            let past_l = add(&mut g, cx, Op::Reshape { shape: layer_shape }, &[sl], None)?;
            grown.push(add(
                &mut g,
                cx,
                Op::Concat { axis: 2 },
                &[past_l, cur],
                None,
            )?);
        }
        // ALiBi slopes (the op's last operand after k and v) stay: the
        // keys' positions are their places in the grown cache.
        let mut operands = vec![ops[0], grown[0], grown[1]];
        operands.extend_from_slice(&ops[3..]);
        g.set_operands(a, &operands);
        new_keys.push(grown[0]);
        new_values.push(grown[1]);
    }
    let kc = stack(&mut g, cx, &new_keys, "key_cache")?;
    let vc = stack(&mut g, cx, &new_values, "value_cache")?;
    let mut outs = g.outputs().to_vec();
    outs.push(("key_cache".into(), kc));
    outs.push(("value_cache".into(), vc));
    g.set_outputs(outs);
    g.set_cache_output("key_cache", CACHE_AXIS);
    g.set_cache_output("value_cache", CACHE_AXIS);
    Ok(g)
}

/// Moves work that does not depend on the growing tokens out of `decode`: every
/// value computed only from the other inputs (an encoder's tokens and mask) and
/// used by token-dependent nodes becomes a `prefill` output and a `decode` input
/// of the same name (`cached0`, `cached1`, …), so a step does not re-run the
/// encoder. Returns how many values moved.
fn hoist_static(prefill: &mut Graph, decode: &mut Graph, len: &Dim) -> usize {
    let Some(t) = len.as_sym() else { return 0 };
    let Ok(order) = decode.topo_order() else {
        return 0;
    };
    let inputs: Vec<ValueId> = decode.inputs().to_vec();
    let is_dynamic_input = |g: &Graph, v: ValueId| {
        matches!(g.input_role(v), InputRole::Cache { .. })
            || g.ty(v).symbols().iter().any(|s| s == t)
    };
    let mut dynamic = std::collections::BTreeSet::new();
    let mut from_static = std::collections::BTreeSet::new();
    for &v in &order {
        if inputs.contains(&v) {
            if is_dynamic_input(decode, v) {
                dynamic.insert(v);
            } else {
                from_static.insert(v);
            }
            continue;
        }
        let ops = decode.operands(v);
        if ops.iter().any(|o| dynamic.contains(o)) {
            dynamic.insert(v);
        } else if ops.iter().any(|o| from_static.contains(o)) {
            from_static.insert(v);
        }
    }
    let frontier: Vec<ValueId> = order
        .iter()
        .copied()
        .filter(|v| from_static.contains(v) && !inputs.contains(v))
        .filter(|&v| {
            decode.users(v).iter().any(|u| dynamic.contains(u))
                || decode.outputs().iter().any(|(_, o)| *o == v)
        })
        .collect();
    let mut outs = prefill.outputs().to_vec();
    for (i, &f) in frontier.iter().enumerate() {
        let name = format!("cached{i}");
        let input = decode.add_input(&name, decode.ty(f).clone());
        decode.set_input_role(input, InputRole::Carried);
        decode.replace_all_uses(f, input);
        outs.push((name, f));
    }
    prefill.set_outputs(outs);
    crate::dce::eliminate_dead_code(decode);
    for v in inputs {
        if !is_dynamic_input(decode, v) && decode.is_dead(v) {
            decode.remove_node(v);
        }
    }
    frontier.len()
}

impl Pass for KvCacheInsertion {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        if module.funcs.len() != 1 {
            return Err(fail(format!(
                "expected one function to split, found {} (already split?)",
                module.funcs.len()
            )));
        }
        let src = &module.funcs[0];
        let (attns, len) = analyse(src)?;
        let scx = kiln_ir::verify(src).map_err(|e| fail(e.to_string()))?;
        let mut prefill = build_prefill(src, &scx, &attns, &len)?;
        let mut decode = build_decode(src, &scx, &attns, &len)?;
        let hoisted = hoist_static(&mut prefill, &mut decode, &len);
        cx.note(format!(
            "split @{} into @prefill and @decode with a {}-layer key/value cache",
            src.name,
            attns.len()
        ));
        if hoisted > 0 {
            cx.note(format!(
                "{hoisted} values that do not depend on the new tokens (an encoder's output) are computed once by @prefill and passed to @decode"
            ));
        }
        module.funcs = vec![prefill, decode];
        Ok(Changed::Yes)
    }
}

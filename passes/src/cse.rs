//! Common-subexpression elimination.
//!
//! Matches: two op nodes with the same op and attributes, the same operands in
//! the same order and the same stored type (structurally equal, not merely equal
//! under the bindings). Float attributes compare by their bits, so a `NaN`
//! constant equals itself and `-0.0` differs from `0.0`. Every op of the IR is
//! pure, so every op is a candidate, nullary ones (`constant`, `arange`,
//! `causal_mask`) included. Inputs are never merged; parameters with one name
//! are one node already.
//!
//! Produces: the same module where, of each set of equal nodes, the first in the
//! graph's deterministic topological order is kept (with its name) and the others
//! are removed, their uses (and outputs) reading the kept node. Nodes are visited
//! in topological order, so merging a node's operands makes its users equal before
//! they are compared; the pass sweeps until a sweep merges nothing (a fixed
//! point). Operands orphaned by a merge are left for DCE.
//!
//! Guarantees: values are unchanged bit for bit (a merged node computed the same
//! thing); the result is deterministic (no hash-map order); the graph verifies.

use std::collections::BTreeMap;

use kiln_ir::{AttrValue, Graph, Module, Op, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Merges duplicate nodes (see the module contract).
pub struct Cse;

/// Attribute equality with floats compared by their bits.
fn same_attr(a: &AttrValue, b: &AttrValue) -> bool {
    match (a, b) {
        (AttrValue::Float(x), AttrValue::Float(y)) => x.to_bits() == y.to_bits(),
        (AttrValue::List(x), AttrValue::List(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_attr(p, q))
        }
        (AttrValue::Call(f, x), AttrValue::Call(g, y)) => {
            f == g && x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_attr(p, q))
        }
        (x, y) => x == y,
    }
}

/// Whether two ops are the same op with the same attributes. An op is its name
/// and its attributes (the text IR round-trips through exactly these).
fn same_op(a: &Op, b: &Op) -> bool {
    if a.name() != b.name() {
        return false;
    }
    let (x, y) = (a.attrs(), b.attrs());
    x.len() == y.len()
        && x.iter()
            .zip(&y)
            .all(|((n, p), (m, q))| n == m && same_attr(p, q))
}

/// One sweep over `graph` in topological order; returns how many nodes merged.
fn sweep(graph: &mut Graph) -> Result<usize, PassError> {
    let order = graph.topo_order().map_err(|v| PassError::Failed {
        pass: "cse",
        message: format!(
            "@{}: the graph has a cycle through {}",
            graph.name,
            graph.describe(v)
        ),
    })?;
    // Candidates bucketed by op name and operands; within a bucket, in the
    // order they were met (the first is the one kept).
    let mut seen: BTreeMap<(&'static str, Vec<ValueId>), Vec<ValueId>> = BTreeMap::new();
    let mut merged = 0;
    for v in order {
        let Some(op) = graph.op(v) else {
            continue;
        };
        let key = (op.name(), graph.operands(v));
        let bucket = seen.entry(key).or_default();
        let twin = bucket
            .iter()
            .copied()
            .find(|&w| graph.ty(w) == graph.ty(v) && graph.op(w).is_some_and(|o| same_op(o, op)));
        match twin {
            Some(w) => {
                graph.replace_all_uses(v, w);
                graph.remove_node(v);
                merged += 1;
            }
            None => bucket.push(v),
        }
    }
    Ok(merged)
}

/// Merges duplicate nodes of one graph until none is left; returns how many.
pub fn eliminate_common_subexpressions(graph: &mut Graph) -> Result<usize, PassError> {
    let mut total = 0;
    loop {
        let merged = sweep(graph)?;
        if merged == 0 {
            return Ok(total);
        }
        total += merged;
    }
}

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut total = 0;
        for g in &mut module.funcs {
            total += eliminate_common_subexpressions(g)?;
        }
        if total > 0 {
            cx.note(format!("merged {total} duplicate nodes"));
        }
        Ok(Changed::from_bool(total > 0))
    }
}

//! Elementwise fusion: chains of elementwise ops become one `kernel` node.
//!
//! Matches: groups of connected *fusible* ops — unary, binary (comparisons and
//! logic included), `where`, `cast`, and existing `kernel` nodes — such as
//! bias add → GELU, a residual add, a scale `mul`, a mask `where`. Scalar
//! `constant` operands (every dim equal to 1) are folded into the kernel body as
//! `const` instructions instead of being passed as operands.
//!
//! Produces: for each group of two or more fusible ops, one
//! `kernel(externals…) body=[…]` node that replaces the group's *root* (its
//! only value used outside the group). The node keeps the root's id, name and
//! type; its operands are the group's external inputs, deduplicated, in the
//! order the group's ops (in topological order) first read them; the body lists
//! the ops in topological order, an absorbed `kernel` contributing its own body.
//! The other members are removed, and so are folded constants left unused.
//! The pass notes `fused N ops into M kernels`.
//!
//! Rules:
//! - Groups grow from a root (visited in reverse topological order) towards
//!   its producers. A producer joins only when **all** of its users are already
//!   in the group and it is not a function output. A value also needed outside
//!   the group therefore stays materialized: it becomes an operand of the
//!   kernel and is never recomputed (recomputing would trade memory traffic for
//!   duplicated work; keeping it is the simple, always-profitable choice).
//! - Every non-root member has all its users inside the group, so no path can
//!   leave the group and come back: the fused graph stays acyclic by
//!   construction.
//! - A kernel's result is broadcast to the common shape of *all* its operands.
//!   Elementwise ops commute with broadcasting and every member's shape
//!   broadcasts into its user's, so the operands' common shape is the root's
//!   shape; the pass checks this with the graph's bindings anyway. Only folded
//!   constants can shrink it (a `f32[1, 1]` constant widens the rank): when the
//!   check fails with them folded, non-scalar constants are passed as operands
//!   instead, and a group that still fails is left alone.
//! - Groups of one op stay as they are (a lone `add` is not wrapped in a kernel).
//!
//! Guarantees: the module verifies after the pass, every output keeps its
//! type, and the interpreter computes the same values (the interpreter runs a
//! kernel as the sequence of whole-tensor ops it stands for).

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use kiln_ir::{verify, Graph, KernelOp, Module, NodeKind, Op, ShapeCx, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Fuses chains of elementwise ops into `kernel` nodes.
pub struct ElementwiseFusion;

/// What fusion did to one graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusionStats {
    /// Ops replaced by kernels (each absorbed `kernel` counts as one).
    pub ops_fused: usize,
    /// Kernel nodes produced.
    pub kernels: usize,
    /// Scalar constants folded into kernel bodies.
    pub constants_folded: usize,
}

impl Pass for ElementwiseFusion {
    fn name(&self) -> &'static str {
        "elementwise-fusion"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut total = FusionStats::default();
        for g in &mut module.funcs {
            let s = fuse_elementwise(g)?;
            total.ops_fused += s.ops_fused;
            total.kernels += s.kernels;
            total.constants_folded += s.constants_folded;
        }
        if total.kernels > 0 {
            let mut note = format!(
                "fused {} ops into {} kernels",
                total.ops_fused, total.kernels
            );
            if total.constants_folded > 0 {
                let s = if total.constants_folded == 1 { "" } else { "s" };
                note.push_str(&format!(
                    " ({} scalar constant{s} folded in)",
                    total.constants_folded
                ));
            }
            cx.note(note);
        }
        Ok(Changed::from_bool(total.kernels > 0))
    }
}

/// Whether `op` can be a member of a fused group.
fn is_fusible(op: &Op) -> bool {
    op.is_elementwise() || matches!(op, Op::Kernel { .. })
}

/// A group chosen for fusion: its members in topological order (root last).
struct Group {
    members: Vec<ValueId>,
}

/// Fuses the elementwise chains of one graph.
pub fn fuse_elementwise(graph: &mut Graph) -> Result<FusionStats, PassError> {
    let cx = verify(graph).map_err(|e| PassError::Failed {
        pass: "elementwise-fusion",
        message: format!("the graph does not verify before fusion:\n{e}"),
    })?;
    let order = graph.topo_order().map_err(|_| PassError::Failed {
        pass: "elementwise-fusion",
        message: "the graph has a cycle".into(),
    })?;
    let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    let outputs: HashSet<ValueId> = graph.outputs().iter().map(|(_, v)| *v).collect();
    let fusible = |g: &Graph, v: ValueId| g.op(v).is_some_and(is_fusible);

    let mut assigned: HashSet<ValueId> = HashSet::new();
    let mut groups: Vec<Group> = Vec::new();
    for &root in order.iter().rev() {
        if assigned.contains(&root) || !fusible(graph, root) {
            continue;
        }
        assigned.insert(root);
        let mut members: BTreeSet<ValueId> = BTreeSet::from([root]);
        // Candidates by decreasing topological position: when a producer is
        // considered, every node that could still join and use it already has.
        let mut heap: BinaryHeap<(usize, ValueId)> = BinaryHeap::new();
        let mut seen: HashSet<ValueId> = HashSet::new();
        let push = |heap: &mut BinaryHeap<(usize, ValueId)>, seen: &mut HashSet<ValueId>, v| {
            for o in graph.operands(v) {
                if seen.insert(o) {
                    heap.push((pos[&o], o));
                }
            }
        };
        push(&mut heap, &mut seen, root);
        while let Some((_, p)) = heap.pop() {
            if assigned.contains(&p)
                || !fusible(graph, p)
                || outputs.contains(&p)
                || !graph.users(p).iter().all(|u| members.contains(u))
            {
                continue;
            }
            members.insert(p);
            assigned.insert(p);
            push(&mut heap, &mut seen, p);
        }
        if members.len() < 2 {
            continue;
        }
        let mut members: Vec<ValueId> = members.into_iter().collect();
        members.sort_by_key(|v| pos[v]);
        groups.push(Group { members });
    }

    let mut stats = FusionStats::default();
    let mut folded_consts: BTreeSet<ValueId> = BTreeSet::new();
    // Roots in topological order, so that the rewrite is deterministic.
    groups.sort_by_key(|g| g.members.last().map(|r| pos[r]));
    for group in &groups {
        let Some(kernel) = build_kernel(graph, &cx, &group.members) else {
            continue;
        };
        let root = kernel.root;
        let name = match &graph.node(root).kind {
            NodeKind::Op { name, .. } => name.clone(),
            _ => None,
        };
        graph.node_mut(root).kind = NodeKind::Op {
            op: Op::Kernel { body: kernel.body },
            name,
        };
        graph.set_operands(root, &kernel.operands);
        for &m in group.members.iter().rev().skip(1) {
            graph.remove_node(m);
        }
        stats.ops_fused += group.members.len();
        stats.kernels += 1;
        stats.constants_folded += kernel.constants.len();
        folded_consts.extend(kernel.constants);
    }
    for c in folded_consts {
        if graph.contains(c) && graph.is_dead(c) {
            graph.remove_node(c);
        }
    }
    Ok(stats)
}

/// The fused form of one group.
struct FusedKernel {
    root: ValueId,
    operands: Vec<ValueId>,
    body: Vec<KernelOp>,
    constants: Vec<ValueId>,
}

/// A constant that can become a `const` instruction: every dim is 1.
fn scalar_constant(graph: &Graph, cx: &ShapeCx, v: ValueId) -> Option<KernelOp> {
    match graph.op(v)? {
        Op::Constant {
            value,
            dtype,
            shape,
        } if shape.iter().all(|d| cx.is_const(d, 1).unwrap_or(false)) => {
            Some(KernelOp::Const(*value, *dtype))
        }
        _ => None,
    }
}

/// Builds the kernel for `members` (topological order, root last), or `None`
/// when its operands' common shape would not be the root's shape.
fn build_kernel(graph: &Graph, cx: &ShapeCx, members: &[ValueId]) -> Option<FusedKernel> {
    let root = *members.last()?;
    let rank0_only = |v: ValueId| graph.ty(v).rank() == 0;
    // First try folding every scalar constant, then only rank-0 ones (a
    // `[1, 1]` constant can carry rank the other operands lack).
    for fold_all in [true, false] {
        let member_set: HashSet<ValueId> = members.iter().copied().collect();
        let foldable =
            |v: ValueId| scalar_constant(graph, cx, v).filter(|_| fold_all || rank0_only(v));
        let mut operands: Vec<ValueId> = Vec::new();
        for &m in members {
            for o in graph.operands(m) {
                if !member_set.contains(&o) && foldable(o).is_none() && !operands.contains(&o) {
                    operands.push(o);
                }
            }
        }
        if !shape_matches(graph, cx, &operands, root) {
            continue;
        }
        let n = operands.len();
        let mut index: HashMap<ValueId, usize> =
            operands.iter().enumerate().map(|(i, v)| (*v, i)).collect();
        let mut body: Vec<KernelOp> = Vec::new();
        let mut constants: Vec<ValueId> = Vec::new();
        for &m in members {
            let mut args: Vec<usize> = Vec::new();
            for o in graph.operands(m) {
                if let Some(&i) = index.get(&o) {
                    args.push(i);
                    continue;
                }
                // Only a foldable constant is neither an operand nor a member
                // emitted earlier (members come in topological order).
                let c = foldable(o)?;
                body.push(c);
                let i = n + body.len() - 1;
                index.insert(o, i);
                constants.push(o);
                args.push(i);
            }
            let base = n + body.len();
            match graph.op(m)? {
                Op::Unary(u) => body.push(KernelOp::Unary(*u, *args.first()?)),
                Op::Binary(b) => body.push(KernelOp::Binary(*b, *args.first()?, *args.get(1)?)),
                Op::Where => body.push(KernelOp::Where(
                    *args.first()?,
                    *args.get(1)?,
                    *args.get(2)?,
                )),
                Op::Cast { to } => body.push(KernelOp::Cast(*to, *args.first()?)),
                Op::Kernel { body: inner } => {
                    // Inner value j: operand j below `args.len()`, else the
                    // inner instruction j - args.len(), now at `base + …`.
                    let k = args.len();
                    let map = |j: usize| -> Option<usize> {
                        if j < k {
                            args.get(j).copied()
                        } else {
                            Some(base + (j - k))
                        }
                    };
                    for ins in inner {
                        body.push(ins.try_map_args(map)?);
                    }
                    if inner.is_empty() {
                        return None;
                    }
                }
                _ => return None,
            }
            index.insert(m, n + body.len() - 1);
        }
        return Some(FusedKernel {
            root,
            operands,
            body,
            constants,
        });
    }
    None
}

/// Whether the common broadcast shape of `operands` equals the type of `root`.
fn shape_matches(graph: &Graph, cx: &ShapeCx, operands: &[ValueId], root: ValueId) -> bool {
    let mut shape = Vec::new();
    for o in operands {
        match cx.broadcast(&shape, &graph.ty(*o).shape) {
            Ok(s) => shape = s,
            Err(_) => return false,
        }
    }
    let want = &graph.ty(root).shape;
    shape.len() == want.len()
        && shape
            .iter()
            .zip(want)
            .all(|(a, b)| cx.same(a, b).unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{parse_graph, print_graph};

    fn fuse(src: &str) -> (String, FusionStats) {
        let mut g = parse_graph(src).expect("test IR parses");
        let stats = fuse_elementwise(&mut g).expect("fusion runs");
        kiln_ir::verify(&g).expect("fused graph verifies");
        (print_graph(&g), stats)
    }

    #[test]
    fn bias_gelu_chain_becomes_one_kernel() {
        let (text, stats) = fuse(
            "func @f(%x: f32[B, 4], %b: f32[4]) -> (y: f32[B, 4]) {
  %h = constant() value=0.5 dtype=f32 shape=[] : f32[]
  %s = add(%x, %b) : f32[B, 4]
  %m = mul(%s, %h) : f32[B, 4]
  %y = gelu_tanh(%m) : f32[B, 4]
  return %y
}",
        );
        assert!(
            text.contains(
                "%y = kernel(%x, %b) body=[add(0, 1), const(0.5, f32), mul(2, 3), gelu_tanh(4)] : f32[B, 4]"
            ),
            "{text}"
        );
        assert!(!text.contains("constant"), "{text}");
        assert_eq!(
            stats,
            FusionStats {
                ops_fused: 3,
                kernels: 1,
                constants_folded: 1
            }
        );
    }

    #[test]
    fn value_used_outside_the_group_stays_materialized() {
        let (text, stats) = fuse(
            "func @f(%x: f32[4], %w: f32[4, 4]) -> (y: f32[4], z: f32[4]) {
  %a = exp(%x) : f32[4]
  %b = neg(%a) : f32[4]
  %z = tanh(%a) : f32[4]
  %y = abs(%b) : f32[4]
  return %y, %z
}",
        );
        assert!(text.contains("%a = exp(%x)"), "{text}");
        assert!(
            text.contains("%y = kernel(%a) body=[neg(0), abs(1)]"),
            "{text}"
        );
        assert!(text.contains("%z = tanh(%a)"), "{text}");
        assert_eq!(stats.kernels, 1);
    }

    #[test]
    fn lone_ops_and_outputs_are_not_absorbed() {
        let (text, stats) = fuse(
            "func @f(%x: f32[4]) -> (a: f32[4], y: f32[4]) {
  %a = exp(%x) : f32[4]
  %y = neg(%a) : f32[4]
  return %a, %y
}",
        );
        assert_eq!(stats, FusionStats::default(), "{text}");
    }

    #[test]
    fn unit_constant_of_higher_rank_stays_an_operand() {
        let (text, _) = fuse(
            "func @f(%x: f32[4]) -> (y: f32[1, 4]) {
  %c = constant() value=2.0 dtype=f32 shape=[1, 1] : f32[1, 1]
  %m = mul(%x, %c) : f32[1, 4]
  %y = exp(%m) : f32[1, 4]
  return %y
}",
        );
        assert!(
            text.contains("%y = kernel(%x, %c) body=[mul(0, 1), exp(2)] : f32[1, 4]"),
            "{text}"
        );
    }

    #[test]
    fn absorbed_kernels_are_inlined() {
        let (text, stats) = fuse(
            "func @f(%x: f32[B, 3], %b: f32[3]) -> (y: f32[B, 3]) {
  %k = kernel(%x, %b) body=[exp(1), neg(2)] : f32[B, 3]
  %y = add(%k, %b) : f32[B, 3]
  return %y
}",
        );
        assert!(
            text.contains("%y = kernel(%x, %b) body=[exp(1), neg(2), add(3, 1)] : f32[B, 3]"),
            "{text}"
        );
        assert_eq!(stats.ops_fused, 2);
    }
}

//! The dataflow graph of one function: typed inputs, named parameters, op nodes
//! and named outputs, on a `petgraph` `StableDiGraph` so that passes can remove and
//! add nodes without invalidating the ids of the others.

use std::collections::{BTreeSet, HashMap};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::dim::Dim;
use crate::op::Op;
use crate::shape::{ShapeCx, ShapeError};
use crate::types::TensorType;

/// A value: the one result of a node (an input, a parameter or an op).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValueId(pub(crate) NodeIndex);

impl ValueId {
    /// The raw index, stable for the life of the node.
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// A position in a text-IR source (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub col: usize,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// A function input, printed `%name`.
    Input { name: String },
    /// A named weight, printed `@name`.
    Param { name: String },
    /// An operation, optionally named (printed `%name`, else `%N`).
    Op { op: Op, name: Option<String> },
}

/// What an entry point's input is, beyond a tensor the caller passes each call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum InputRole {
    /// Given by the caller on every call (token ids, masks): the default.
    Data,
    /// A cache that lives between calls (printed `cache=key_cache`): its next
    /// value is this function's output `output`, longer along that output's
    /// cache axis. A backend may keep it in place, never copying it.
    Cache {
        /// The output that holds the cache after this call.
        output: String,
    },
    /// Computed once by an earlier entry point, whose output of the same name
    /// it is, and passed unchanged to every call (printed `carried`): an
    /// encoder's output for a decoder.
    Carried,
}

/// A node and the type of the value it produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// What the node is.
    pub kind: NodeKind,
    /// The stored type of its value (re-inferred and compared by the verifier).
    pub ty: TensorType,
}

/// One function: `func @name(inputs) -> (outputs) where bindings { body }`.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Function name, printed `@name`.
    pub name: String,
    bindings: Vec<(String, Dim)>,
    dag: StableDiGraph<Node, usize>,
    inputs: Vec<ValueId>,
    params: Vec<ValueId>,
    outputs: Vec<(String, ValueId)>,
    spans: HashMap<ValueId, Span>,
    binding_spans: HashMap<String, Span>,
    declared_outputs: HashMap<usize, (TensorType, Span)>,
    input_roles: HashMap<ValueId, InputRole>,
    cache_outputs: std::collections::BTreeMap<String, usize>,
}

impl Graph {
    /// An empty function called `name`.
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            ..Graph::default()
        }
    }

    /// Adds a compile-time binding `name = value` (checked by the verifier).
    pub fn bind(&mut self, name: &str, value: Dim) {
        self.bindings.push((name.to_string(), value));
    }

    /// The compile-time bindings, in declaration order.
    pub fn bindings(&self) -> &[(String, Dim)] {
        &self.bindings
    }

    /// Adds a function input.
    pub fn add_input(&mut self, name: &str, ty: TensorType) -> ValueId {
        let id = ValueId(self.dag.add_node(Node {
            kind: NodeKind::Input {
                name: name.to_string(),
            },
            ty,
        }));
        self.inputs.push(id);
        id
    }

    /// Declares a parameter (weight).
    pub fn add_param(&mut self, name: &str, ty: TensorType) -> ValueId {
        let id = ValueId(self.dag.add_node(Node {
            kind: NodeKind::Param {
                name: name.to_string(),
            },
            ty,
        }));
        self.params.push(id);
        id
    }

    /// Adds an op node with its stored type; nothing is checked here.
    pub fn add_op(
        &mut self,
        op: Op,
        operands: &[ValueId],
        ty: TensorType,
        name: Option<String>,
    ) -> ValueId {
        let n = self.dag.add_node(Node {
            kind: NodeKind::Op { op, name },
            ty,
        });
        for (i, v) in operands.iter().enumerate() {
            self.dag.add_edge(v.0, n, i);
        }
        ValueId(n)
    }

    /// Adds an op node typed by its shape rule under `cx` (the graph's
    /// bindings, as [`crate::verify`] returns them): the one checked way to add
    /// an op.
    pub fn add_op_inferred(
        &mut self,
        op: Op,
        operands: &[ValueId],
        name: Option<String>,
        cx: &ShapeCx,
    ) -> Result<ValueId, ShapeError> {
        let ty = self.infer(&op, operands, cx)?;
        Ok(self.add_op(op, operands, ty, name))
    }

    /// Makes op node `id` compute `op(operands)`, re-inferring its type by the
    /// op's shape rule under `cx`; on an error nothing changes. The one way to
    /// replace an op.
    pub fn replace_op(
        &mut self,
        id: ValueId,
        op: Op,
        operands: &[ValueId],
        cx: &ShapeCx,
    ) -> Result<(), ShapeError> {
        let ty = self.infer(&op, operands, cx)?;
        let node = self.node_mut(id);
        if let NodeKind::Op { op: slot, .. } = &mut node.kind {
            *slot = op;
        }
        node.ty = ty;
        self.set_operands(id, operands);
        Ok(())
    }

    fn infer(&self, op: &Op, operands: &[ValueId], cx: &ShapeCx) -> Result<TensorType, ShapeError> {
        let types: Vec<TensorType> = operands.iter().map(|&o| self.ty(o).clone()).collect();
        op.infer(&types, cx)
    }

    /// Sets the outputs, in order.
    pub fn set_outputs(&mut self, outputs: Vec<(String, ValueId)>) {
        self.outputs = outputs;
    }

    /// The inputs, in order.
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    /// The parameters, in declaration order.
    pub fn params(&self) -> &[ValueId] {
        &self.params
    }

    /// The outputs, in order.
    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    /// Whether `id` names a live node.
    pub fn contains(&self, id: ValueId) -> bool {
        self.dag.contains_node(id.0)
    }

    /// The node of `id`. Panics on a removed id (a bug in the caller, not input).
    pub fn node(&self, id: ValueId) -> &Node {
        &self.dag[id.0]
    }

    /// Mutable access to a node (passes use it to rewrite types and ops).
    pub fn node_mut(&mut self, id: ValueId) -> &mut Node {
        &mut self.dag[id.0]
    }

    /// The stored type of `id`.
    pub fn ty(&self, id: ValueId) -> &TensorType {
        &self.dag[id.0].ty
    }

    /// The op of `id`, if it is an op node.
    pub fn op(&self, id: ValueId) -> Option<&Op> {
        match &self.dag[id.0].kind {
            NodeKind::Op { op, .. } => Some(op),
            _ => None,
        }
    }

    /// The operands of `id`, in order.
    pub fn operands(&self, id: ValueId) -> Vec<ValueId> {
        let mut edges: Vec<(usize, NodeIndex)> = self
            .dag
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| ValueId(n)).collect()
    }

    /// The nodes that use `id` (each once), in id order.
    pub fn users(&self, id: ValueId) -> Vec<ValueId> {
        let set: BTreeSet<ValueId> = self
            .dag
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(ValueId)
            .collect();
        set.into_iter().collect()
    }

    /// Every live node id, in id order.
    pub fn node_ids(&self) -> Vec<ValueId> {
        self.dag.node_indices().map(ValueId).collect()
    }

    /// Number of op nodes.
    pub fn op_count(&self) -> usize {
        self.dag
            .node_weights()
            .filter(|n| matches!(n.kind, NodeKind::Op { .. }))
            .count()
    }

    /// Makes every use of `old` (by ops and outputs) a use of `new` instead.
    /// Returns how many uses moved.
    pub fn replace_all_uses(&mut self, old: ValueId, new: ValueId) -> usize {
        if old == new {
            return 0;
        }
        let uses: Vec<(NodeIndex, usize, petgraph::stable_graph::EdgeIndex)> = self
            .dag
            .edges_directed(old.0, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight(), e.id()))
            .collect();
        for (user, operand, edge) in &uses {
            self.dag.remove_edge(*edge);
            self.dag.add_edge(new.0, *user, *operand);
        }
        let mut moved = uses.len();
        for (_, v) in &mut self.outputs {
            if *v == old {
                *v = new;
                moved += 1;
            }
        }
        moved
    }

    /// Replaces the operands of op node `id`.
    pub fn set_operands(&mut self, id: ValueId, operands: &[ValueId]) {
        let old: Vec<petgraph::stable_graph::EdgeIndex> = self
            .dag
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.dag.remove_edge(e);
        }
        for (i, v) in operands.iter().enumerate() {
            self.dag.add_edge(v.0, id.0, i);
        }
    }

    /// Removes a node and its edges. Removing a used value leaves its users with
    /// fewer operands, which the verifier reports; callers remove only dead nodes
    /// or replace uses first. Inputs and parameters are removed from their lists.
    pub fn remove_node(&mut self, id: ValueId) {
        self.dag.remove_node(id.0);
        self.inputs.retain(|v| *v != id);
        self.params.retain(|v| *v != id);
        self.spans.remove(&id);
    }

    /// Whether `id` has no users and is not an output.
    pub fn is_dead(&self, id: ValueId) -> bool {
        self.dag
            .edges_directed(id.0, Direction::Outgoing)
            .next()
            .is_none()
            && !self.outputs.iter().any(|(_, v)| *v == id)
    }

    /// The parameter called `name`, if declared.
    pub fn param_by_name(&self, name: &str) -> Option<ValueId> {
        self.params
            .iter()
            .copied()
            .find(|p| matches!(&self.dag[p.0].kind, NodeKind::Param { name: n } if n == name))
    }

    /// The input called `name`, if any.
    pub fn input_by_name(&self, name: &str) -> Option<ValueId> {
        self.inputs
            .iter()
            .copied()
            .find(|p| matches!(&self.dag[p.0].kind, NodeKind::Input { name: n } if n == name))
    }

    /// Replaces the bindings (passes that fold or add symbols use it).
    pub fn set_bindings(&mut self, bindings: Vec<(String, Dim)>) {
        self.bindings = bindings;
    }

    /// Adds a raw dataflow edge. Only for tests of the verifier (it can make cycles).
    pub fn add_edge_unchecked(&mut self, from: ValueId, to: ValueId, operand: usize) {
        self.dag.add_edge(from.0, to.0, operand);
    }

    /// A deterministic topological order: inputs, then parameters, then ops, each
    /// time taking the ready node with the smallest id. `Err` holds a node on a cycle.
    pub fn topo_order(&self) -> Result<Vec<ValueId>, ValueId> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut indegree: HashMap<NodeIndex, usize> = HashMap::new();
        let mut ready = BinaryHeap::new();
        let mut out: Vec<ValueId> = Vec::with_capacity(self.dag.node_count());
        out.extend(self.inputs.iter().copied());
        out.extend(self.params.iter().copied());
        let leaves: BTreeSet<ValueId> = out.iter().copied().collect();
        for n in self.dag.node_indices() {
            let d = self.dag.edges_directed(n, Direction::Incoming).count();
            indegree.insert(n, d);
            if d == 0 && !leaves.contains(&ValueId(n)) {
                ready.push(Reverse(n));
            }
        }
        for leaf in &leaves {
            for e in self.dag.edges_directed(leaf.0, Direction::Outgoing) {
                if let Some(d) = indegree.get_mut(&e.target()) {
                    *d -= 1;
                    if *d == 0 && !leaves.contains(&ValueId(e.target())) {
                        ready.push(Reverse(e.target()));
                    }
                }
            }
        }
        while let Some(Reverse(n)) = ready.pop() {
            out.push(ValueId(n));
            for e in self.dag.edges_directed(n, Direction::Outgoing) {
                if let Some(d) = indegree.get_mut(&e.target()) {
                    *d -= 1;
                    if *d == 0 && !leaves.contains(&ValueId(e.target())) {
                        ready.push(Reverse(e.target()));
                    }
                }
            }
        }
        if out.len() < self.dag.node_count() {
            let placed: BTreeSet<ValueId> = out.iter().copied().collect();
            let stuck = self
                .dag
                .node_indices()
                .map(ValueId)
                .find(|v| !placed.contains(v));
            return Err(stuck.unwrap_or(ValueId(NodeIndex::new(0))));
        }
        Ok(out)
    }

    /// Sets what input `id` is (see [`InputRole`]).
    pub fn set_input_role(&mut self, id: ValueId, role: InputRole) {
        if role == InputRole::Data {
            self.input_roles.remove(&id);
        } else {
            self.input_roles.insert(id, role);
        }
    }

    /// What input `id` is; [`InputRole::Data`] unless set.
    pub fn input_role(&self, id: ValueId) -> &InputRole {
        self.input_roles.get(&id).unwrap_or(&InputRole::Data)
    }

    /// Declares output `name` a cache growing along `axis` (printed `cache_axis=3`):
    /// a value that lives on between calls, the next call's `cache=name` input.
    pub fn set_cache_output(&mut self, name: &str, axis: usize) {
        self.cache_outputs.insert(name.to_string(), axis);
    }

    /// The cache axis of output `name`, if it is a cache.
    pub fn cache_axis(&self, name: &str) -> Option<usize> {
        self.cache_outputs.get(name).copied()
    }

    /// Every cache output by name, with its axis.
    pub fn cache_outputs(&self) -> &std::collections::BTreeMap<String, usize> {
        &self.cache_outputs
    }

    /// Records where a node was written in text IR.
    pub fn set_span(&mut self, id: ValueId, span: Span) {
        self.spans.insert(id, span);
    }

    /// Where a node was written in text IR, if it was parsed.
    pub fn span(&self, id: ValueId) -> Option<Span> {
        self.spans.get(&id).copied()
    }

    /// Records where a binding was written in text IR.
    pub fn set_binding_span(&mut self, name: &str, span: Span) {
        self.binding_spans.insert(name.to_string(), span);
    }

    /// Where a binding was written in text IR, if it was parsed.
    pub fn binding_span(&self, name: &str) -> Option<Span> {
        self.binding_spans.get(name).copied()
    }

    /// Records the type the text signature declares for output `i`.
    pub fn declare_output_type(&mut self, i: usize, ty: TensorType, span: Span) {
        self.declared_outputs.insert(i, (ty, span));
    }

    /// Changes the type recorded for output `i`'s declaration (a pass that
    /// changes an output's type keeps its source position).
    pub fn redeclare_output_type(&mut self, i: usize, ty: TensorType) {
        if let Some((t, _)) = self.declared_outputs.get_mut(&i) {
            *t = ty;
        }
    }

    /// The type the text signature declared for output `i`, if parsed.
    pub fn declared_output_type(&self, i: usize) -> Option<&(TensorType, Span)> {
        self.declared_outputs.get(&i)
    }

    /// The structure of the graph with ids replaced by topological positions, for
    /// comparing graphs independently of node ids and source positions.
    fn canonical(&self) -> Option<Vec<(String, Vec<usize>)>> {
        let order = self.topo_order().ok()?;
        let pos: HashMap<ValueId, usize> = order.iter().enumerate().map(|(i, v)| (*v, i)).collect();
        let mut out = Vec::with_capacity(order.len() + 1);
        for v in &order {
            let ops = self.operands(*v).iter().map(|o| pos[o]).collect();
            out.push((canonical_node(self.node(*v)), ops));
        }
        let outs: Vec<usize> = self
            .outputs
            .iter()
            .map(|(_, v)| pos.get(v).copied().unwrap_or(usize::MAX))
            .collect();
        out.push(("<outputs>".into(), outs));
        Some(out)
    }
}

/// A node as comparable text: kind, name, op with its attributes (floats by
/// their exact shortest text, so NaN equals NaN and -0.0 differs from 0.0, as
/// in the printed IR) and type.
fn canonical_node(node: &Node) -> String {
    match &node.kind {
        NodeKind::Input { name } => format!("input {name}: {}", node.ty),
        NodeKind::Param { name } => format!("param {name}: {}", node.ty),
        NodeKind::Op { op, name } => {
            format!("{name:?} {} {:?}: {}", op.name(), op.attrs(), node.ty)
        }
    }
}

/// Structural equality: same name, bindings, inputs, parameters, ops (in
/// topological order, with operands by position) and outputs. Node ids and
/// source positions do not count.
impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        let names =
            |g: &Graph| -> Vec<String> { g.outputs.iter().map(|(n, _)| n.clone()).collect() };
        let roles = |g: &Graph| -> Vec<InputRole> {
            g.inputs.iter().map(|v| g.input_role(*v).clone()).collect()
        };
        self.name == other.name
            && self.bindings == other.bindings
            && roles(self) == roles(other)
            && self.cache_outputs == other.cache_outputs
            && names(self) == names(other)
            && self.inputs.len() == other.inputs.len()
            && self.params.len() == other.params.len()
            && match (self.canonical(), other.canonical()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            }
    }
}

/// A text-IR file: one or more functions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Module {
    /// The functions, in file order.
    pub funcs: Vec<Graph>,
}

//! The text-IR printer. Output is deterministic: nodes in the graph's stable
//! topological order, unnamed values numbered `%0, %1, …` in that order.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{Graph, InputRole, Module, NodeKind, ValueId};

/// The printed name of every value of a graph.
pub struct Namer {
    names: HashMap<ValueId, String>,
}

impl Namer {
    /// Names the values of `graph` in print order.
    pub fn new(graph: &Graph) -> Namer {
        let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
        let mut names = HashMap::new();
        let mut next = 0usize;
        for v in order {
            let name = match &graph.node(v).kind {
                NodeKind::Input { name } => format!("%{name}"),
                NodeKind::Param { name } => format!("@{name}"),
                NodeKind::Op { name: Some(n), .. } => format!("%{n}"),
                NodeKind::Op { name: None, .. } => {
                    next += 1;
                    format!("%{}", next - 1)
                }
            };
            names.insert(v, name);
        }
        Namer { names }
    }

    /// The printed name of `v` (`%3`, `%x`, `@wte`).
    pub fn name(&self, v: ValueId) -> &str {
        self.names.get(&v).map_or("%?", |s| s.as_str())
    }

    /// `%7 = matmul(%6, @w)`: a node without attributes and type, for messages.
    pub fn node_header(&self, graph: &Graph, v: ValueId) -> String {
        match &graph.node(v).kind {
            NodeKind::Op { op, .. } => {
                let args: Vec<&str> = graph.operands(v).iter().map(|o| self.name(*o)).collect();
                format!("{} = {}({})", self.name(v), op.name(), args.join(", "))
            }
            NodeKind::Input { .. } => format!("input {}", self.name(v)),
            NodeKind::Param { .. } => format!("param {}", self.name(v)),
        }
    }
}

impl Graph {
    /// Node `v` as it prints in messages: `%7 = matmul(%6, @w)`, `input %x`.
    pub fn describe(&self, v: ValueId) -> String {
        Namer::new(self).node_header(self, v)
    }
}

/// Prints one function.
pub fn print_graph(graph: &Graph) -> String {
    let namer = Namer::new(graph);
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    let mut s = String::new();
    let inputs: Vec<String> = graph
        .inputs()
        .iter()
        .map(|v| {
            let role = match graph.input_role(*v) {
                InputRole::Data => String::new(),
                InputRole::Cache { output } => format!(" cache={output}"),
                InputRole::Carried => " carried".to_string(),
            };
            format!("{}: {}{role}", namer.name(*v), graph.ty(*v))
        })
        .collect();
    let outputs: Vec<String> = graph
        .outputs()
        .iter()
        .map(|(n, v)| match graph.cache_axis(n) {
            Some(axis) => format!("{n}: {} cache_axis={axis}", graph.ty(*v)),
            None => format!("{n}: {}", graph.ty(*v)),
        })
        .collect();
    let _ = write!(
        s,
        "func @{}({}) -> ({})",
        graph.name,
        inputs.join(", "),
        outputs.join(", ")
    );
    if !graph.bindings().is_empty() {
        let b: Vec<String> = graph
            .bindings()
            .iter()
            .map(|(n, d)| format!("{n} = {d}"))
            .collect();
        let _ = write!(s, "\n    where {}", b.join(", "));
    }
    s.push_str(" {\n");
    for p in graph.params() {
        let _ = writeln!(s, "  param {}: {}", namer.name(*p), graph.ty(*p));
    }
    for v in order {
        let NodeKind::Op { op, .. } = &graph.node(v).kind else {
            continue;
        };
        let _ = write!(s, "  {}", namer.node_header(graph, v));
        for (k, a) in op.attrs() {
            let _ = write!(s, " {k}={a}");
        }
        let _ = writeln!(s, " : {}", graph.ty(v));
    }
    let rets: Vec<&str> = graph
        .outputs()
        .iter()
        .map(|(_, v)| namer.name(*v))
        .collect();
    let _ = writeln!(s, "  return {}", rets.join(", "));
    s.push_str("}\n");
    s
}

/// Prints a module: its functions separated by blank lines.
pub fn print_module(module: &Module) -> String {
    let parts: Vec<String> = module.funcs.iter().map(print_graph).collect();
    parts.join("\n")
}

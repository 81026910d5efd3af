//! Graphviz DOT rendering of a graph, with the value's type on every edge.

use std::fmt::Write;

use crate::graph::{Graph, NodeKind};
use crate::print::Namer;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `graph` as a DOT digraph: inputs and parameters as boxes, ops as
/// ellipses labelled with their name and attributes, outputs as double circles.
pub fn to_dot(graph: &Graph) -> String {
    let namer = Namer::new(graph);
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{", escape(&graph.name));
    s.push_str("  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];\n  edge [fontname=\"monospace\", fontsize=9];\n");
    for &v in &order {
        let id = v.index();
        let name = namer.name(v);
        let (label, shape) = match &graph.node(v).kind {
            NodeKind::Input { .. } => (format!("{name}\n{}", graph.ty(v)), "box"),
            NodeKind::Param { .. } => (format!("{name}\n{}", graph.ty(v)), "note"),
            NodeKind::Op { op, .. } => {
                let attrs: Vec<String> =
                    op.attrs().iter().map(|(k, a)| format!("{k}={a}")).collect();
                let mut l = format!("{name} = {}", op.name());
                if !attrs.is_empty() {
                    l.push('\n');
                    l.push_str(&attrs.join(" "));
                }
                (l, "ellipse")
            }
        };
        let _ = writeln!(s, "  n{id} [label=\"{}\", shape={shape}];", escape(&label));
    }
    for &v in &order {
        for (i, o) in graph.operands(v).iter().enumerate() {
            let _ = writeln!(
                s,
                "  n{} -> n{} [label=\"{}\", headlabel=\"{i}\"];",
                o.index(),
                v.index(),
                escape(&graph.ty(*o).to_string())
            );
        }
    }
    for (i, (name, v)) in graph.outputs().iter().enumerate() {
        let _ = writeln!(
            s,
            "  out{i} [label=\"{}\", shape=doublecircle];",
            escape(name)
        );
        let _ = writeln!(
            s,
            "  n{} -> out{i} [label=\"{}\"];",
            v.index(),
            escape(&graph.ty(*v).to_string())
        );
    }
    s.push_str("}\n");
    s
}

//! The shape trace: a table with one row per node (name, op, operand shapes,
//! result shape), the text `kiln check` prints for a graph that passes.

use std::fmt::Write;

use crate::graph::{Graph, NodeKind};
use crate::print::Namer;
use crate::shape::ShapeCx;
use crate::verify::runtime_symbols;

/// Renders the shape trace of a verified graph.
pub fn shape_trace(graph: &Graph, cx: &ShapeCx) -> String {
    let namer = Namer::new(graph);
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    let mut s = String::new();
    let ins: Vec<String> = graph
        .inputs()
        .iter()
        .map(|v| format!("{}: {}", namer.name(*v), graph.ty(*v)))
        .collect();
    let outs: Vec<String> = graph
        .outputs()
        .iter()
        .map(|(n, v)| format!("{n}: {}", graph.ty(*v)))
        .collect();
    let _ = writeln!(
        s,
        "func @{}({}) -> ({})",
        graph.name,
        ins.join(", "),
        outs.join(", ")
    );
    let rt: Vec<String> = runtime_symbols(graph).into_iter().collect();
    if !rt.is_empty() {
        let _ = writeln!(s, "  run-time symbols: {}", rt.join(", "));
    }
    if !graph.bindings().is_empty() {
        let b: Vec<String> = graph
            .bindings()
            .iter()
            .map(|(n, d)| match cx.bindings().get(n) {
                Some(v) if v != d => format!("{n} = {d} = {v}"),
                _ => format!("{n} = {d}"),
            })
            .collect();
        let _ = writeln!(s, "  compile-time symbols: {}", b.join(", "));
    }
    let mut elements: Option<i64> = Some(0);
    for p in graph.params() {
        let n = cx
            .product(&graph.ty(*p).shape)
            .ok()
            .and_then(|d| d.as_const());
        elements = match (elements, n) {
            (Some(a), Some(b)) => a.checked_add(b),
            _ => None,
        };
    }
    let count = graph.params().len();
    match elements {
        Some(e) if count > 0 => {
            let _ = writeln!(
                s,
                "  parameters: {count} tensors, {} elements",
                group_digits(e)
            );
        }
        None if count > 0 => {
            let _ = writeln!(
                s,
                "  parameters: {count} tensors (element count is symbolic or overflows 64 bits)"
            );
        }
        _ => {
            let _ = writeln!(s, "  parameters: {count} tensors");
        }
    }
    let mut rows: Vec<[String; 4]> =
        vec![["node".into(), "op".into(), "inputs".into(), "output".into()]];
    for v in order {
        let node = graph.node(v);
        let (op, inputs) = match &node.kind {
            NodeKind::Input { .. } => ("input".to_string(), "-".to_string()),
            NodeKind::Param { .. } => continue,
            NodeKind::Op { op, .. } => {
                let tys: Vec<String> = graph
                    .operands(v)
                    .iter()
                    .map(|o| graph.ty(*o).to_string())
                    .collect();
                let tys = if tys.is_empty() {
                    "-".to_string()
                } else {
                    tys.join(", ")
                };
                (op.name().to_string(), tys)
            }
        };
        rows.push([namer.name(v).to_string(), op, inputs, node.ty.to_string()]);
    }
    for (n, v) in graph.outputs() {
        rows.push([
            format!("-> {n}"),
            "output".into(),
            namer.name(*v).to_string(),
            graph.ty(*v).to_string(),
        ]);
    }
    // A cell longer than MAX_CELL characters (a generated name of 65,536
    // characters, say) is shortened in the middle: the table stays
    // readable and bounded.
    for r in rows.iter_mut() {
        for c in r.iter_mut() {
            let n = c.chars().count();
            if n > MAX_CELL {
                let head: String = c.chars().take(MAX_CELL / 2).collect();
                let tail: String = c.chars().skip(n - (MAX_CELL / 2 - 1)).collect();
                *c = format!("{head}…{tail}");
            }
        }
    }
    let mut widths = [0usize; 4];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for (i, r) in rows.iter().enumerate() {
        s.push('|');
        for (w, c) in widths.iter().zip(r) {
            // Padded by hand: a format width must fit 16 bits.
            let pad = w.saturating_sub(c.chars().count());
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s.push('\n');
        if i == 0 {
            s.push('|');
            for w in widths {
                let _ = write!(s, "{}|", "-".repeat(w + 2));
            }
            s.push('\n');
        }
    }
    s
}

/// Longest cell of the shape-trace table, in characters.
const MAX_CELL: usize = 160;

fn group_digits(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    out
}

//! The verifier: the shape-contract checker. It collects every problem it finds
//! (not just the first), each naming the node as printed and its source line.
//!
//! Checks: bindings evaluate (exact divisions, no negative sizes) and mention only
//! known symbols; every symbol is bound or a run-time symbol (one that appears as a
//! whole dim of an input); the graph is acyclic; every op's stored type equals the
//! type its shape rule infers; names are unique; outputs exist and match the
//! signature.

use std::collections::BTreeSet;
use std::fmt;

use crate::dim::Dim;
use crate::graph::{Graph, Module, NodeKind, Span, ValueId};
use crate::op::{AttrValue, Op};
use crate::print::Namer;
use crate::shape::{ShapeCx, ShapeError};
use crate::types::TensorType;

/// One contract violation.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The function it is in.
    pub func: String,
    /// The node or declaration as printed, e.g. `%7 = matmul(%6, @w)`.
    pub location: String,
    /// Where it was written, when the graph came from text.
    pub span: Option<Span>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "in @{}: {}: {}", self.func, self.location, self.message)?;
        if let Some(s) = self.span {
            write!(f, " (line {}, column {})", s.line, s.col)?;
        }
        Ok(())
    }
}

/// All contract violations found in a graph or module.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyErrors(pub Vec<Diagnostic>);

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for VerifyErrors {}

struct Checker<'g> {
    graph: &'g Graph,
    namer: Namer,
    errors: Vec<Diagnostic>,
    /// Symbols whose binding failed (already reported): uses are not re-reported.
    poisoned: BTreeSet<String>,
    /// Unbound symbols already reported once.
    reported_unbound: BTreeSet<String>,
}

impl Checker<'_> {
    fn report(&mut self, location: String, span: Option<Span>, message: String) {
        self.errors.push(Diagnostic {
            func: self.graph.name.clone(),
            location,
            span,
            message,
        });
    }

    /// The unbound symbols among `unknown` not reported yet (and not from a
    /// failed binding), now marked reported: each is named once.
    fn first_reports_of(&mut self, unknown: Vec<String>) -> Vec<String> {
        let fresh: Vec<String> = unknown
            .into_iter()
            .filter(|u| !self.poisoned.contains(u) && !self.reported_unbound.contains(u))
            .collect();
        self.reported_unbound.extend(fresh.iter().cloned());
        fresh
    }

    fn report_node(&mut self, v: ValueId, message: String) {
        let loc = self.namer.node_header(self.graph, v);
        let span = self.graph.span(v);
        self.report(loc, span, message);
    }
}

/// Symbols used as a whole dim of some input: their values come from run-time shapes.
pub fn runtime_symbols(graph: &Graph) -> BTreeSet<String> {
    let bound: BTreeSet<&str> = graph.bindings().iter().map(|(n, _)| n.as_str()).collect();
    graph
        .inputs()
        .iter()
        .flat_map(|v| graph.ty(*v).shape.iter())
        .filter_map(|d| d.as_sym())
        .filter(|s| !bound.contains(s))
        .map(str::to_string)
        .collect()
}

fn attr_dims(op: &Op) -> Vec<Dim> {
    fn collect(a: &AttrValue, out: &mut Vec<Dim>) {
        match a {
            AttrValue::Dim(d) => out.push(d.clone()),
            AttrValue::List(items) => items.iter().for_each(|i| collect(i, out)),
            AttrValue::Float(_) | AttrValue::Bool(_) | AttrValue::Call(..) => {}
        }
    }
    let mut out = Vec::new();
    match op {
        // Word-valued attributes (dtypes, layouts) are not sizes.
        Op::Cast { .. } | Op::LoraLinear { .. } | Op::Kernel { .. } => {}
        Op::Constant { shape, .. } => out.extend(shape.iter().cloned()),
        Op::Arange { start, len, .. } => out.extend([start.clone(), len.clone()]),
        _ => op.attrs().iter().for_each(|(_, a)| collect(a, &mut out)),
    }
    out
}

/// Checks one function; on success returns its resolved symbol context.
pub fn verify(graph: &Graph) -> Result<ShapeCx, VerifyErrors> {
    let mut ck = Checker {
        graph,
        namer: Namer::new(graph),
        errors: Vec::new(),
        poisoned: BTreeSet::new(),
        reported_unbound: BTreeSet::new(),
    };
    let runtime = runtime_symbols(graph);
    let mut known: BTreeSet<String> = runtime.clone();
    let mut cx = ShapeCx::new();

    for (name, value) in graph.bindings() {
        let loc = format!("where {name} = {value}");
        let span = graph.binding_span(name);
        let unknown: Vec<String> = value
            .symbols()
            .into_iter()
            .filter(|s| !known.contains(s))
            .collect();
        if !unknown.is_empty() {
            let fresh: Vec<String> = unknown
                .into_iter()
                .filter(|u| !ck.poisoned.contains(u))
                .collect();
            if !fresh.is_empty() {
                ck.report(
                    loc,
                    span,
                    format!(
                        "symbol `{}` is not bound (bind it earlier in `where` or use it as an input dim)",
                        fresh.join("`, `")
                    ),
                );
                ck.reported_unbound.extend(fresh);
            }
            ck.poisoned.insert(name.clone());
            continue;
        }
        let failure = match cx.bind(name, value) {
            Ok(v) if v.is_never_positive() => {
                Some(format!("size `{name}` evaluates to {v}, which is negative"))
            }
            Ok(_) => None,
            Err(ShapeError::Dim { source, .. }) => {
                Some(format!("{source} ({})", describe_bindings(&cx, value)))
            }
            Err(e) => Some(format!("{e} ({})", describe_bindings(&cx, value))),
        };
        match failure {
            Some(msg) => {
                ck.report(loc, span, msg);
                ck.poisoned.insert(name.clone());
            }
            None => {
                known.insert(name.clone());
            }
        }
    }

    let mut names: BTreeSet<String> = BTreeSet::new();
    // Nodes already reported; their types are not trusted for later checks.
    let mut bad: BTreeSet<ValueId> = BTreeSet::new();
    for &v in graph.inputs().iter().chain(graph.params()) {
        let node = graph.node(v);
        let (name, kind) = match &node.kind {
            NodeKind::Input { name } => (format!("%{name}"), "input"),
            NodeKind::Param { name } => (format!("@{name}"), "parameter"),
            NodeKind::Op { .. } => continue,
        };
        if !names.insert(name.clone()) {
            ck.report_node(v, format!("{kind} {name} is declared twice"));
        }
        if !check_type_symbols(&mut ck, v, &node.ty, &known, &cx) {
            bad.insert(v);
        }
    }

    let order = match graph.topo_order() {
        Ok(o) => o,
        Err(v) => {
            ck.report_node(v, "the graph has a cycle through this node".into());
            return Err(VerifyErrors(ck.errors));
        }
    };

    for &v in &order {
        let node = graph.node(v);
        let NodeKind::Op { op, name } = &node.kind else {
            continue;
        };
        if let Some(n) = name {
            let key = format!("%{n}");
            let ok_name = n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok_name {
                ck.report_node(v, format!("value name `{key}` must start with a letter and use only letters, digits, `_` and `.`"));
            } else if !names.insert(key.clone()) {
                ck.report_node(v, format!("value {key} is defined twice"));
            }
        }
        let mut unknown: Vec<String> = attr_dims(op)
            .iter()
            .flat_map(|d| d.symbols())
            .filter(|s| !known.contains(s))
            .collect();
        unknown.sort();
        unknown.dedup();
        if !unknown.is_empty() {
            let fresh = ck.first_reports_of(unknown);
            if !fresh.is_empty() {
                ck.report_node(
                    v,
                    format!("attribute mentions unbound symbol `{}`", fresh.join("`, `")),
                );
            }
            bad.insert(v);
            continue;
        }
        if graph.operands(v).iter().any(|o| bad.contains(o)) {
            // An operand's type is untrusted and already reported.
            bad.insert(v);
            continue;
        }
        if !check_type_symbols(&mut ck, v, &node.ty, &known, &cx) {
            bad.insert(v);
            continue;
        }
        let operands = graph.operands(v);
        let types: Vec<TensorType> = operands.iter().map(|o| graph.ty(*o).clone()).collect();
        match op.infer(&types, &cx) {
            Ok(inferred) => {
                if let Some(msg) = type_mismatch(&cx, &node.ty, &inferred) {
                    ck.report_node(v, msg);
                }
            }
            Err(e) => ck.report_node(v, describe_shape_error(&e, op, &types)),
        }
    }

    if graph.outputs().is_empty() {
        ck.report(
            format!("func @{}", graph.name),
            None,
            "the function has no outputs".into(),
        );
    }
    let mut out_names = BTreeSet::new();
    for (i, (name, v)) in graph.outputs().iter().enumerate() {
        let declared = graph.declared_output_type(i);
        let span = declared.map(|(_, s)| *s);
        if !out_names.insert(name.clone()) {
            ck.report(
                format!("output `{name}`"),
                span,
                "output name is used twice".into(),
            );
        }
        if !graph.contains(*v) {
            ck.report(
                format!("output `{name}`"),
                span,
                "returns a value that does not exist".into(),
            );
            continue;
        }
        if bad.contains(v) {
            continue;
        }
        if let Some((ty, _)) = declared {
            if let Some(msg) = type_mismatch(&cx, ty, graph.ty(*v)) {
                let loc = format!("output `{name}` (returns {})", ck.namer.name(*v));
                ck.report(
                    loc,
                    span,
                    format!("signature does not match the returned value: {msg}"),
                );
            }
        }
    }

    check_caches(&mut ck, &cx);

    if ck.errors.is_empty() {
        Ok(cx)
    } else {
        Err(VerifyErrors(ck.errors))
    }
}

/// Cache outputs name an axis of their type; a `cache=NAME` input names a
/// cache output of the same dtype and rank whose dims equal its own except on
/// the cache axis.
fn check_caches(ck: &mut Checker<'_>, cx: &ShapeCx) {
    let graph = ck.graph;
    for (name, &axis) in graph.cache_outputs() {
        let Some((i, (_, v))) = graph
            .outputs()
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == name)
        else {
            ck.report(
                format!("output `{name}`"),
                None,
                "is declared a cache but is not an output".into(),
            );
            continue;
        };
        let span = graph.declared_output_type(i).map(|(_, s)| *s);
        if graph.contains(*v) && axis >= graph.ty(*v).rank() {
            ck.report(
                format!("output `{name}`"),
                span,
                format!("cache_axis={axis} is not an axis of {}", graph.ty(*v)),
            );
        }
    }
    let mut named: BTreeSet<String> = BTreeSet::new();
    for &input in graph.inputs() {
        let crate::graph::InputRole::Cache { output } = graph.input_role(input) else {
            continue;
        };
        let loc = format!("input {}", ck.namer.name(input));
        let span = graph.span(input);
        if !named.insert(output.clone()) {
            ck.report(loc, span, format!("a second input reads the cache {output} (one `cache={output}` input per cache)"));
            continue;
        }
        let Some(axis) = graph.cache_axis(output) else {
            ck.report(
                loc,
                span,
                format!(
                    "cache={output} names no cache output (declare `{output}: … cache_axis=N`)"
                ),
            );
            continue;
        };
        let Some((_, out)) = graph.outputs().iter().find(|(n, _)| n == output) else {
            continue;
        };
        if !graph.contains(*out) {
            continue;
        }
        let (a, b) = (graph.ty(input), graph.ty(*out));
        let same_elsewhere = a.dtype == b.dtype
            && a.rank() == b.rank()
            && a.shape
                .iter()
                .zip(&b.shape)
                .enumerate()
                .all(|(k, (x, y))| k == axis || cx.same(x, y).unwrap_or(false));
        if !same_elsewhere {
            ck.report(
                loc,
                span,
                format!(
                    "a cache of {a} cannot grow into output `{output}` of {b} along axis {axis}"
                ),
            );
        }
    }
}

/// Checks every function of a module.
pub fn verify_module(module: &Module) -> Result<(), VerifyErrors> {
    let mut all = Vec::new();
    for g in &module.funcs {
        if let Err(VerifyErrors(mut e)) = verify(g) {
            all.append(&mut e);
        }
    }
    if all.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(all))
    }
}

/// `d = 770, h = 12` for the symbols of `value` that are bound.
fn describe_bindings(cx: &ShapeCx, value: &Dim) -> String {
    let parts: Vec<String> = value
        .symbols()
        .into_iter()
        .filter_map(|s| cx.bindings().get(&s).map(|v| format!("{s} = {v}")))
        .collect();
    if parts.is_empty() {
        format!("in `{value}`")
    } else {
        format!("in `{value}` with {}", parts.join(", "))
    }
}

/// Returns false (after reporting) when the stored type mentions unknown symbols
/// or does not evaluate.
fn check_type_symbols(
    ck: &mut Checker<'_>,
    v: ValueId,
    ty: &TensorType,
    known: &BTreeSet<String>,
    cx: &ShapeCx,
) -> bool {
    let unknown: Vec<String> = ty
        .symbols()
        .into_iter()
        .filter(|s| !known.contains(s))
        .collect();
    if !unknown.is_empty() {
        let fresh = ck.first_reports_of(unknown);
        if !fresh.is_empty() {
            ck.report_node(
                v,
                format!(
                    "type {ty} mentions unbound symbol `{}` (bind it in `where` or make it an input dim)",
                    fresh.join("`, `")
                ),
            );
        }
        return false;
    }
    for d in &ty.shape {
        match cx.eval(d) {
            Ok(x) if x.is_never_positive() => {
                ck.report_node(
                    v,
                    format!("type {ty} has a negative size {}", cx.describe(d)),
                );
                return false;
            }
            Ok(_) => {}
            Err(e) => {
                ck.report_node(v, format!("type {ty}: {e}"));
                return false;
            }
        }
    }
    true
}

/// A message when `stored` and `inferred` differ under the bindings.
fn type_mismatch(cx: &ShapeCx, stored: &TensorType, inferred: &TensorType) -> Option<String> {
    let head = format!("declared type {stored} differs from the inferred {inferred}");
    if stored.dtype != inferred.dtype {
        return Some(format!(
            "{head}: dtype {} vs {}",
            stored.dtype, inferred.dtype
        ));
    }
    if stored.rank() != inferred.rank() {
        return Some(format!(
            "{head}: rank {} vs {}",
            stored.rank(),
            inferred.rank()
        ));
    }
    for (i, (a, b)) in stored.shape.iter().zip(&inferred.shape).enumerate() {
        match cx.same(a, b) {
            Ok(true) => {}
            Ok(false) => {
                return Some(format!(
                    "{head}: axis {i} is {} vs {}",
                    cx.describe(a),
                    cx.describe(b)
                ))
            }
            Err(e) => return Some(format!("{head}: {e}")),
        }
    }
    None
}

/// The shape rule's message, with the operand types when the message lacks them.
fn describe_shape_error(e: &ShapeError, op: &Op, types: &[TensorType]) -> String {
    match e {
        ShapeError::Arity { .. } => format!("{} {e}", op.name()),
        ShapeError::DimMismatch { .. }
        | ShapeError::Rank { .. }
        | ShapeError::Broadcast { .. }
        | ShapeError::ElementCount { .. } => e.to_string(),
        _ => {
            let tys: Vec<String> = types.iter().map(|t| t.to_string()).collect();
            if tys.is_empty() {
                e.to_string()
            } else {
                format!("{e} (operands: {})", tys.join(", "))
            }
        }
    }
}

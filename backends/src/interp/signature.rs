//! The contract between a graph's signature and the tensors handed to it:
//! weights checked against parameter types at compile time, run-time symbols
//! bound from input shapes, and every type evaluated to concrete sizes before
//! any node runs.

use std::collections::BTreeMap;

use kiln_ir::verify::runtime_symbols;
use kiln_ir::{DType, Dim, Graph, Namer, NodeKind, ShapeCx, TensorType, ValueId};

use crate::{RunError, Tensor, Weights};

/// Each node of `order` as it prints, with its source line when it came from text.
pub(crate) fn node_names(graph: &Graph, order: &[ValueId]) -> Vec<String> {
    let namer = Namer::new(graph);
    order
        .iter()
        .map(|&v| {
            let header = namer.node_header(graph, v);
            match graph.span(v) {
                Some(s) => format!("{header} (line {})", s.line),
                None => header,
            }
        })
        .collect()
}

/// Rejects graphs with values of a dtype the interpreter cannot store (f16, bf16).
pub(crate) fn check_dtypes(
    graph: &Graph,
    order: &[ValueId],
    names: &[String],
) -> Result<(), RunError> {
    for (v, name) in order.iter().zip(names) {
        let dtype = graph.ty(*v).dtype;
        if matches!(dtype, DType::F16 | DType::BF16) {
            return Err(RunError::UnsupportedDType {
                what: name.clone(),
                dtype,
            });
        }
    }
    Ok(())
}

/// The `where` bindings evaluated in order on top of `cx`.
fn bind_where(graph: &Graph, mut cx: ShapeCx) -> Result<ShapeCx, RunError> {
    for (name, value) in graph.bindings() {
        cx.bind(name, value).map_err(|source| RunError::Binding {
            name: name.clone(),
            value: value.to_string(),
            source: Box::new(source),
        })?;
    }
    Ok(cx)
}

/// `f32[d, 4 * d] = [8, 32]`: a type and, when binding changes it, its evaluated shape.
fn describe_type(ty: &TensorType, cx: &ShapeCx) -> String {
    let evaluated: Vec<String> = ty
        .shape
        .iter()
        .map(|d| cx.eval(d).map_or_else(|_| d.to_string(), |v| v.to_string()))
        .collect();
    let evaluated = format!("[{}]", evaluated.join(", "));
    if evaluated == ty.shape_string() {
        ty.to_string()
    } else {
        format!("{ty} = {evaluated}")
    }
}

/// Checks every parameter's weight (present, dtype, rank, every size known at
/// compile time) and returns the weights to bind. Extra weights are ignored.
pub(crate) fn check_weights(
    graph: &Graph,
    weights: &Weights,
) -> Result<Vec<(ValueId, Tensor)>, RunError> {
    // Run-time symbols stay free here; dims that mention them are checked per run.
    let cx = bind_where(graph, ShapeCx::new())?;
    let mut out = Vec::with_capacity(graph.params().len());
    for &p in graph.params() {
        let NodeKind::Param { name } = &graph.node(p).kind else {
            continue;
        };
        let ty = graph.ty(p);
        let Some(w) = weights.get(name) else {
            return Err(RunError::MissingWeight {
                name: name.clone(),
                expected: describe_type(ty, &cx),
            });
        };
        // A 16-bit weight for an f32 parameter stays 16-bit; kernels widen it.
        let widens = ty.dtype == DType::F32 && matches!(w.dtype(), DType::F16 | DType::BF16);
        if w.dtype() != ty.dtype && !widens {
            return Err(RunError::WeightDType {
                name: name.clone(),
                expected: ty.to_string(),
                got: w.dtype(),
            });
        }
        let shape_error = |axis| RunError::WeightShape {
            name: name.clone(),
            expected: describe_type(ty, &cx),
            axis,
            got: w.shape().to_vec(),
        };
        if w.rank() != ty.rank() {
            return Err(shape_error(None));
        }
        for (axis, (d, &got)) in ty.shape.iter().zip(w.shape()).enumerate() {
            let value = cx.eval(d).map_err(|e| RunError::Size {
                what: format!("weight @{name} axis {axis}"),
                dim: d.to_string(),
                problem: format!("cannot be evaluated: {e}"),
            })?;
            if value.as_const().is_some_and(|c| c != got as i64) {
                return Err(shape_error(Some(axis)));
            }
        }
        out.push((p, w.clone()));
    }
    Ok(out)
}

/// Checks a weight against its parameter type evaluated under the run-time symbols.
pub(crate) fn check_weight_at_run_time(
    graph: &Graph,
    v: ValueId,
    w: &Tensor,
    expected: &[usize],
) -> Result<(), RunError> {
    if w.shape() == expected {
        return Ok(());
    }
    let name = match &graph.node(v).kind {
        NodeKind::Param { name } => name.clone(),
        _ => graph.describe(v),
    };
    Err(RunError::WeightShape {
        name,
        expected: format!("{} = {expected:?}", graph.ty(v)),
        axis: w.shape().iter().zip(expected).position(|(a, b)| a != b),
        got: w.shape().to_vec(),
    })
}

/// Binds the run-time symbols from the input shapes and checks each input's
/// dtype, rank and every dim; returns a context in which every dim is a constant.
pub(crate) fn bind_inputs(graph: &Graph, inputs: &[Tensor]) -> Result<ShapeCx, RunError> {
    let shapes: Vec<(DType, &[usize])> = inputs.iter().map(|t| (t.dtype(), t.shape())).collect();
    bind_shapes(graph, &shapes)
}

/// [`bind_inputs`] on the dtypes and shapes of the inputs (a cache kept by a
/// backend has a shape but no host tensor).
pub(crate) fn bind_shapes(
    graph: &Graph,
    inputs: &[(DType, &[usize])],
) -> Result<ShapeCx, RunError> {
    if inputs.len() != graph.inputs().len() {
        return Err(RunError::InputCount {
            func: graph.name.clone(),
            expected: graph.inputs().len(),
            got: inputs.len(),
        });
    }
    let input_name = |v: ValueId| match &graph.node(v).kind {
        NodeKind::Input { name } => name.clone(),
        _ => graph.describe(v),
    };
    for (&v, &(dtype, shape)) in graph.inputs().iter().zip(inputs) {
        let ty = graph.ty(v);
        if dtype != ty.dtype {
            return Err(RunError::InputDType {
                input: input_name(v),
                expected: ty.to_string(),
                got: dtype,
            });
        }
        if shape.len() != ty.rank() {
            return Err(RunError::InputRank {
                input: input_name(v),
                expected: ty.to_string(),
                expected_rank: ty.rank(),
                got: shape.to_vec(),
            });
        }
    }

    // First pass: each run-time symbol takes its value where it first appears.
    let runtime = runtime_symbols(graph);
    let mut bound: BTreeMap<String, (usize, String, usize)> = BTreeMap::new();
    for (&v, &(_, shape)) in graph.inputs().iter().zip(inputs) {
        for (axis, (d, &got)) in graph.ty(v).shape.iter().zip(shape).enumerate() {
            let Some(sym) = d.as_sym().filter(|s| runtime.contains(*s)) else {
                continue;
            };
            match bound.get(sym) {
                None => {
                    bound.insert(sym.to_string(), (got, input_name(v), axis));
                }
                Some((value, by, by_axis)) if *value != got => {
                    return Err(RunError::InputSymbol {
                        input: input_name(v),
                        axis,
                        symbol: sym.to_string(),
                        bound: *value,
                        bound_by: by.clone(),
                        bound_axis: *by_axis,
                        got,
                    })
                }
                Some(_) => {}
            }
        }
    }
    let mut cx = ShapeCx::new();
    for (sym, (value, by, axis)) in &bound {
        let value = i64::try_from(*value).map_err(|_| RunError::Size {
            what: format!("input %{by} axis {axis}"),
            dim: sym.clone(),
            problem: format!("is {value}, too large for a size"),
        })?;
        cx.bind(sym, &Dim::constant(value))
            .map_err(|source| RunError::Binding {
                name: sym.clone(),
                value: value.to_string(),
                source: Box::new(source),
            })?;
    }
    let cx = bind_where(graph, cx)?;

    // Second pass: every dim (`d` bound to 32, `S + 1`, …) must equal the actual size.
    for (&v, &(_, shape)) in graph.inputs().iter().zip(inputs) {
        let what = format!("input %{}", input_name(v));
        for (axis, (d, &got)) in graph.ty(v).shape.iter().zip(shape).enumerate() {
            let expected = eval_int(&cx, d, &what)?;
            if expected != got as i64 {
                return Err(RunError::InputDim {
                    input: input_name(v),
                    axis,
                    dim: d.to_string(),
                    expected,
                    got,
                });
            }
        }
    }
    Ok(cx)
}

/// The largest tensor the interpreter allocates: larger ones are an error
/// before anything runs, not an out-of-memory abort half-way.
pub(super) const MAX_TENSOR_BYTES: usize = 8 << 30;

/// Every node's type evaluated to concrete sizes, by slot.
pub(crate) fn eval_shapes(
    graph: &Graph,
    order: &[ValueId],
    names: &[String],
    cx: &ShapeCx,
) -> Result<Vec<Vec<usize>>, RunError> {
    order
        .iter()
        .zip(names)
        .map(|(&v, name)| {
            let shape = graph
                .ty(v)
                .shape
                .iter()
                .map(|d| eval_size(cx, d, name))
                .collect::<Result<Vec<usize>, RunError>>()?;
            let bytes = kiln_ir::tensor::checked_numel(&shape)
                .and_then(|n| n.checked_mul(graph.ty(v).dtype.size_bytes()));
            match bytes {
                Some(b) if b <= MAX_TENSOR_BYTES => Ok(shape),
                _ => Err(RunError::Size {
                    what: name.clone(),
                    dim: graph.ty(v).shape_string(),
                    problem: format!(
                        "= {shape:?} needs more than the interpreter's {} GiB per tensor",
                        MAX_TENSOR_BYTES >> 30
                    ),
                }),
            }
        })
        .collect()
}

/// The integer value of `d` under `cx`; `what` names where it is used.
pub(crate) fn eval_int(cx: &ShapeCx, d: &Dim, what: &str) -> Result<i64, RunError> {
    let v = cx.eval(d).map_err(|e| RunError::Size {
        what: what.to_string(),
        dim: d.to_string(),
        problem: format!("cannot be evaluated: {e}"),
    })?;
    v.as_const().ok_or_else(|| RunError::Size {
        what: what.to_string(),
        dim: d.to_string(),
        problem: format!("does not evaluate to a number (it is `{v}`; is a symbol unbound?)"),
    })
}

/// The value of `d` under `cx` as a size (not negative); `what` names where it is used.
pub(crate) fn eval_size(cx: &ShapeCx, d: &Dim, what: &str) -> Result<usize, RunError> {
    let v = eval_int(cx, d, what)?;
    usize::try_from(v).map_err(|_| RunError::Size {
        what: what.to_string(),
        dim: d.to_string(),
        problem: format!("is negative ({v})"),
    })
}

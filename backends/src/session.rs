//! Sessions: entry points that share state between calls.
//!
//! A split decoder has `@prefill` (the prompt → logits and caches) and
//! `@decode` (new tokens + caches → logits and longer caches). Their
//! signatures say which inputs are caches (`cache=key_cache`) and which are
//! values computed once (`carried`); a [`Session`] supplies those itself, so a
//! caller passes only the data inputs (the tokens) and gets back only the
//! other outputs (the logits). Where the caches live is the backend's
//! business: [`TensorSession`] passes them as tensors (each decode step copies
//! them), the reference backend keeps them in place in buffers of fixed
//! capacity, a GPU backend keeps them on the device.

use std::collections::{BTreeMap, BTreeSet};

use kiln_ir::{Graph, InputRole, NodeKind};

use crate::{Executable, RunError, Tensor};

/// Entry points sharing caches and carried values between calls.
pub trait Session {
    /// Runs entry point `entry` on its data inputs (its inputs that are
    /// neither `cache=` nor `carried`, in signature order); returns its outputs
    /// that are neither caches nor carried values, by name.
    fn call(&mut self, entry: &str, data: &[Tensor]) -> Result<Vec<(String, Tensor)>, RunError>;

    /// Positions held in the caches now (0 before the first call).
    fn cache_len(&self) -> usize;

    /// Positions the caches can hold.
    fn capacity(&self) -> usize;

    /// Steps of the last calls that ran on the reference kernels although
    /// the backend compiles them (see [`crate::Executable::fallback_steps`]).
    fn fallback_steps(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The names of the values `funcs` carry from one entry point to another.
pub(crate) fn carried_names(funcs: &[&Graph]) -> BTreeSet<String> {
    funcs
        .iter()
        .flat_map(|g| {
            g.inputs()
                .iter()
                .filter_map(|&v| match (g.input_role(v), &g.node(v).kind) {
                    (InputRole::Carried, NodeKind::Input { name }) => Some(name.clone()),
                    _ => None,
                })
        })
        .collect()
}

/// The name of input `v`.
pub(crate) fn input_name(g: &Graph, v: kiln_ir::ValueId) -> String {
    match &g.node(v).kind {
        NodeKind::Input { name } => name.clone(),
        _ => g.describe(v),
    }
}

/// The entry point `entry` of `graphs`, or an error listing them.
pub(crate) fn find_entry<'a, T>(
    entries: &'a mut [(Graph, T)],
    entry: &str,
) -> Result<&'a mut (Graph, T), RunError> {
    let names: Vec<String> = entries
        .iter()
        .map(|(g, _)| format!("@{}", g.name))
        .collect();
    entries
        .iter_mut()
        .find(|(g, _)| g.name == entry)
        .ok_or_else(|| {
            RunError::Session(format!(
                "no entry point @{entry} (there are {})",
                names.join(", ")
            ))
        })
}

/// The data inputs of `g` checked against what the caller gave.
pub(crate) fn check_data_count(g: &Graph, data: &[Tensor]) -> Result<(), RunError> {
    let expected = g
        .inputs()
        .iter()
        .filter(|&&v| *g.input_role(v) == InputRole::Data)
        .count();
    if expected != data.len() {
        return Err(RunError::InputCount {
            func: g.name.clone(),
            expected,
            got: data.len(),
        });
    }
    Ok(())
}

/// The inputs of a call to `g` (`entry`) in a session that keeps its caches
/// in place: per input, the tensor (data or a carried value) or `None` for a
/// cache read in place; and the run-time symbols bound from the data, the
/// carried values and each cache's shape as the last call left it.
#[allow(clippy::type_complexity)]
pub(crate) fn bind_call<'a>(
    g: &Graph,
    entry: &str,
    data: &'a [Tensor],
    carried: &'a BTreeMap<String, Tensor>,
    shapes: &'a BTreeMap<String, Vec<usize>>,
) -> Result<(Vec<Option<&'a Tensor>>, kiln_ir::ShapeCx), RunError> {
    let missing = |name: &str| {
        RunError::Session(format!(
            "@{entry} reads %{name}, which no earlier call produced (call the entry point that returns it first)"
        ))
    };
    let mut data_iter = data.iter();
    let mut tensors: Vec<Option<&Tensor>> = Vec::new();
    let mut bind: Vec<(kiln_ir::DType, &[usize])> = Vec::new();
    for &v in g.inputs() {
        let name = input_name(g, v);
        match g.input_role(v) {
            InputRole::Data => {
                let t = data_iter.next().ok_or_else(|| missing(&name))?;
                bind.push((t.dtype(), t.shape()));
                tensors.push(Some(t));
            }
            InputRole::Carried => {
                let t = carried.get(&name).ok_or_else(|| missing(&name))?;
                bind.push((t.dtype(), t.shape()));
                tensors.push(Some(t));
            }
            InputRole::Cache { output } => {
                let shape = shapes.get(output).ok_or_else(|| missing(&name))?;
                bind.push((g.ty(v).dtype, shape));
                tensors.push(None);
            }
        }
    }
    let cx = crate::interp::signature::bind_shapes(g, &bind)?;
    Ok((tensors, cx))
}

/// After a session call that kept its caches in place: records each cache's
/// new shape and length (from `program`'s cache outputs under `cx`) and the
/// carried values among `outputs`; returns the other outputs by name.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_call(
    program: &crate::lower::Program,
    cx: &kiln_ir::ShapeCx,
    g: &Graph,
    outputs: Vec<Option<Tensor>>,
    carried_names: &BTreeSet<String>,
    carried: &mut BTreeMap<String, Tensor>,
    shapes: &mut BTreeMap<String, Vec<usize>>,
    len: &mut usize,
) -> Result<Vec<(String, Tensor)>, RunError> {
    for st in &program.states {
        let out = program.outputs[st.output].1;
        let shape = program
            .buffer(out)
            .shape
            .iter()
            .map(|d| crate::eval_size_in(cx, d, &st.name))
            .collect::<Result<Vec<_>, _>>()?;
        *len = shape.get(st.axis).copied().unwrap_or(0);
        shapes.insert(st.name.clone(), shape);
    }
    let mut result = Vec::new();
    for ((name, _), t) in g.outputs().iter().zip(outputs) {
        let Some(t) = t else { continue };
        if carried_names.contains(name) {
            carried.insert(name.clone(), t);
        } else {
            result.push((name.clone(), t));
        }
    }
    Ok(result)
}

/// A session that passes caches and carried values as host tensors; works on
/// any backend (the graph interpreter uses it).
pub struct TensorSession {
    entries: Vec<(Graph, Box<dyn Executable>)>,
    carried_names: BTreeSet<String>,
    caches: BTreeMap<String, Tensor>,
    carried: BTreeMap<String, Tensor>,
    len: usize,
    capacity: usize,
}

impl TensorSession {
    /// A session over compiled entry points.
    pub fn new(entries: Vec<(Graph, Box<dyn Executable>)>, capacity: usize) -> TensorSession {
        let graphs: Vec<&Graph> = entries.iter().map(|(g, _)| g).collect();
        TensorSession {
            carried_names: carried_names(&graphs),
            entries,
            caches: BTreeMap::new(),
            carried: BTreeMap::new(),
            len: 0,
            capacity,
        }
    }
}

impl Session for TensorSession {
    fn call(&mut self, entry: &str, data: &[Tensor]) -> Result<Vec<(String, Tensor)>, RunError> {
        let (caches, carried) = (&self.caches, &self.carried);
        let (g, exe) = find_entry(&mut self.entries, entry)?;
        check_data_count(g, data)?;
        let mut data_iter = data.iter();
        let mut inputs = Vec::with_capacity(g.inputs().len());
        for &v in g.inputs() {
            let name = input_name(g, v);
            let t = match g.input_role(v) {
                InputRole::Data => data_iter.next(),
                InputRole::Cache { output } => caches.get(output),
                InputRole::Carried => carried.get(&name),
            };
            let t = t.ok_or_else(|| {
                RunError::Session(format!(
                    "@{entry} reads %{name}, which no earlier call produced (call the entry point that returns it first)"
                ))
            })?;
            inputs.push(t.clone());
        }
        let outs = exe.run(&inputs)?;
        // Check before changing anything: a refused call leaves the session as it was.
        for ((name, _), t) in g.outputs().iter().zip(&outs) {
            if let Some(axis) = g.cache_axis(name) {
                let n = t.shape().get(axis).copied().unwrap_or(0);
                if n > self.capacity {
                    return Err(RunError::CacheFull {
                        capacity: self.capacity,
                        needed: n,
                    });
                }
            }
        }
        let mut result = Vec::new();
        let mut len = self.len;
        let mut new_caches = Vec::new();
        for ((name, _), t) in g.outputs().iter().zip(outs) {
            if let Some(axis) = g.cache_axis(name) {
                len = t.shape().get(axis).copied().unwrap_or(0);
                new_caches.push((name.clone(), t));
            } else if self.carried_names.contains(name) {
                self.carried.insert(name.clone(), t);
            } else {
                result.push((name.clone(), t));
            }
        }
        self.caches.extend(new_caches);
        self.len = len;
        Ok(result)
    }

    fn cache_len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

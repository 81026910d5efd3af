//! The reference interpreter: kiln's oracle.
//!
//! It runs any verified graph node by node in [`Graph::topo_order`], with plain
//! loops over row-major buffers: f32 values, f64 accumulation in every reduction,
//! matrix product, softmax, norm and attention. It is slow on purpose; every op is
//! written to be checked by reading it against the op's doc comment in
//! `kiln_ir::op`, and every pass and backend is tested against it.
//!
//! Running is in two phases so that a bad call fails before any work:
//! 1. [`signature`] binds the run-time symbols from the input shapes, checks every
//!    input dim and evaluates every node's type to concrete sizes;
//! 2. the nodes execute; each result's shape is checked against its evaluated type.

mod attention;
mod elementwise;
mod index;
mod matmul;
mod moe;
mod movement;
mod reduce;

pub(crate) use reduce::softmax_row;
pub(crate) mod signature;

use std::collections::HashMap;

use kiln_ir::{DType, Dim, Graph, KernelOp, NodeKind, Op, ShapeCx, ValueId};

use crate::{Backend, Executable, RunError, Tensor, Weights};

/// The reference interpreter backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Interpreter;

impl Backend for Interpreter {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        Ok(Box::new(InterpExecutable::new(graph, weights)?))
    }
}

/// One op node, resolved to slots (positions in the topological order).
#[derive(Debug)]
struct Step {
    /// The slot of the node's own value.
    slot: usize,
    /// The op.
    op: Op,
    /// The slots of its operands, in order.
    operands: Vec<usize>,
    /// The dtype of its stored type.
    dtype: DType,
}

/// A graph prepared for the interpreter: order, operand slots, bound weights.
#[derive(Debug)]
pub struct InterpExecutable {
    graph: Graph,
    /// Every node in topological order; a node's slot is its index here.
    order: Vec<ValueId>,
    /// The op nodes, in execution order.
    steps: Vec<Step>,
    /// `(slot, weight)` for every parameter.
    weights: Vec<(usize, Tensor)>,
    /// The slots of the inputs, in signature order.
    inputs: Vec<usize>,
    /// The slots of the outputs, in signature order.
    outputs: Vec<usize>,
    /// For each slot, the index of the last step that reads it (`usize::MAX`:
    /// an output; `None`: dead, never stored).
    last_use: Vec<Option<usize>>,
    /// For each slot, the node as it prints (`%7 = matmul(%6, @w) (line 14)`), for errors.
    names: Vec<String>,
}

impl InterpExecutable {
    /// Refuses a run whose values, alive at once, need more memory than the
    /// machine can give: the peak over the steps of the live results (each
    /// freed after its last use) plus the running step's result and the
    /// index map a data-movement op builds (8 bytes per element).
    fn check_memory(&self, shapes: &[Vec<usize>], cx: &ShapeCx) -> Result<(), RunError> {
        let bytes = |slot: usize| -> u64 {
            shapes[slot]
                .iter()
                .try_fold(
                    self.graph.ty(self.order[slot]).dtype.size_bytes() as u64,
                    |a, &d| a.checked_mul(d as u64),
                )
                .unwrap_or(u64::MAX)
        };
        let mut frees: Vec<Vec<usize>> = vec![Vec::new(); self.steps.len()];
        for step in &self.steps {
            if let Some(Some(last)) = self.last_use.get(step.slot) {
                if let Some(f) = frees.get_mut(*last) {
                    f.push(step.slot);
                }
            }
        }
        let (mut live, mut peak) = (0u64, 0u64);
        for (i, step) in self.steps.iter().enumerate() {
            let out = bytes(step.slot);
            let numel = shapes[step.slot].iter().product::<usize>() as u64;
            let index_map = match step.op {
                Op::Expand { .. }
                | Op::Permute { .. }
                | Op::Slice { .. }
                | Op::Concat { .. }
                | Op::Gather => numel.saturating_mul(8),
                _ => 0,
            };
            peak = peak.max(live.saturating_add(out).saturating_add(index_map));
            if self.last_use[step.slot].is_some() {
                live = live.saturating_add(out);
            }
            for &s in &frees[i] {
                live = live.saturating_sub(bytes(s));
            }
        }
        let mut binding: Vec<String> = Vec::new();
        for &v in self.graph.inputs() {
            for d in &self.graph.ty(v).shape {
                for s in d.symbols() {
                    if let Ok(Some(x)) = cx.eval(&kiln_ir::Dim::sym(&s)).map(|d| d.as_const()) {
                        let b = format!("{s}={x}");
                        if !binding.contains(&b) {
                            binding.push(b);
                        }
                    }
                }
            }
        }
        crate::memory::check(
            &format!("@{} with {}", self.graph.name, binding.join(", ")),
            peak,
            "the interpreter's live values at their peak",
        )
    }

    /// Verifies `graph`, checks `weights` against its parameters and prepares to run it.
    pub fn new(graph: &Graph, weights: &Weights) -> Result<InterpExecutable, RunError> {
        kiln_ir::verify(graph)?;
        let order = graph.topo_order().map_err(|v| RunError::Invalid {
            node: graph.describe(v),
            message: "the graph has a cycle through this node".into(),
        })?;
        let names = signature::node_names(graph, &order);
        signature::check_dtypes(graph, &order, &names)?;
        let slot_of: HashMap<ValueId, usize> =
            order.iter().enumerate().map(|(i, v)| (*v, i)).collect();
        let slot = |v: ValueId| -> Result<usize, RunError> {
            slot_of.get(&v).copied().ok_or_else(|| RunError::Invalid {
                node: graph.describe(v),
                message: "refers to a value that is not in the graph".into(),
            })
        };

        let mut steps = Vec::new();
        let mut last_use: Vec<Option<usize>> = vec![None; order.len()];
        for (i, &v) in order.iter().enumerate() {
            let NodeKind::Op { op, .. } = &graph.node(v).kind else {
                continue;
            };
            let operands = graph
                .operands(v)
                .into_iter()
                .map(slot)
                .collect::<Result<Vec<_>, _>>()?;
            for &o in &operands {
                last_use[o] = Some(steps.len());
            }
            steps.push(Step {
                slot: i,
                op: op.clone(),
                operands,
                dtype: graph.ty(v).dtype,
            });
        }
        let inputs = graph
            .inputs()
            .iter()
            .map(|v| slot(*v))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = graph
            .outputs()
            .iter()
            .map(|(_, v)| slot(*v))
            .collect::<Result<Vec<_>, _>>()?;
        for &o in &outputs {
            last_use[o] = Some(usize::MAX);
        }

        let bound = signature::check_weights(graph, weights)?;
        let weights = bound
            .into_iter()
            .map(|(v, t)| Ok((slot(v)?, t)))
            .collect::<Result<Vec<_>, RunError>>()?;
        Ok(InterpExecutable {
            graph: graph.clone(),
            order,
            steps,
            weights,
            inputs,
            outputs,
            last_use,
            names,
        })
    }

    /// The graph this executable runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl Executable for InterpExecutable {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let cx = signature::bind_inputs(&self.graph, inputs)?;
        let shapes = signature::eval_shapes(&self.graph, &self.order, &self.names, &cx)?;
        self.check_memory(&shapes, &cx)?;
        for (slot, w) in &self.weights {
            signature::check_weight_at_run_time(&self.graph, self.order[*slot], w, &shapes[*slot])?;
        }

        let mut values: Vec<Option<Tensor>> = vec![None; self.order.len()];
        for (slot, t) in self.inputs.iter().zip(inputs) {
            values[*slot] = Some(t.clone());
        }
        for (slot, w) in &self.weights {
            values[*slot] = Some(w.clone());
        }

        for (step_index, step) in self.steps.iter().enumerate() {
            let node = NodeCx {
                name: &self.names[step.slot],
                out_shape: &shapes[step.slot],
                cx: &cx,
            };
            let out = {
                let stored = step
                    .operands
                    .iter()
                    .map(|&o| {
                        values[o]
                            .as_ref()
                            .ok_or_else(|| node.invalid("an operand was freed before its last use"))
                    })
                    .collect::<Result<Vec<&Tensor>, RunError>>()?;
                // 16-bit weights stay 16-bit. Matrix products read them as
                // stored and a gather picks its rows first; any other op reads
                // them widened to f32 (a copy that lives only while it runs).
                let reads_16_bit = matches!(step.op, Op::MatMul { .. } | Op::Gather);
                let widened: Vec<Option<Tensor>> = if reads_16_bit {
                    vec![None; stored.len()]
                } else {
                    stored.iter().map(|t| widen(t)).collect::<Result<_, _>>()?
                };
                let args: Vec<&Tensor> = stored
                    .iter()
                    .zip(&widened)
                    .map(|(t, w)| w.as_ref().unwrap_or(t))
                    .collect();
                let out = eval_op(&node, &step.op, &args)?;
                match (step.dtype, widen(&out)?) {
                    (DType::F32, Some(wide)) => wide,
                    _ => out,
                }
            };
            if out.shape() != node.out_shape || out.dtype() != step.dtype {
                return Err(RunError::ResultType {
                    node: node.name.to_string(),
                    expected: format!("{}{:?}", step.dtype, node.out_shape),
                    got: out.to_string(),
                });
            }
            if self.last_use[step.slot].is_some() {
                values[step.slot] = Some(out);
            }
            // Intermediates die after their last reader; the oracle then fits
            // the same models as the backends it checks.
            for &o in &step.operands {
                if self.last_use[o] == Some(step_index) {
                    values[o] = None;
                }
            }
        }

        self.outputs
            .iter()
            .map(|&o| {
                values[o].clone().ok_or_else(|| RunError::Invalid {
                    node: self.names[o].clone(),
                    message: "an output was never computed".into(),
                })
            })
            .collect()
    }
}

/// An f32 copy of a 16-bit tensor; `None` for any other dtype.
fn widen(t: &Tensor) -> Result<Option<Tensor>, RunError> {
    match t.dtype() {
        DType::F16 | DType::BF16 => match t.to_f32() {
            Some(v) => Ok(Some(Tensor::f32(t.shape().to_vec(), v.into_owned())?)),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// What an op implementation knows about its node: its name for errors, its
/// evaluated result shape and the run-time symbol context.
pub(crate) struct NodeCx<'a> {
    /// The node as it prints, for error messages.
    pub name: &'a str,
    /// The node's type evaluated under the run-time symbols.
    pub out_shape: &'a [usize],
    /// Every symbol bound to a constant.
    pub cx: &'a ShapeCx,
}

impl NodeCx<'_> {
    /// A [`RunError::Invalid`] naming this node.
    pub fn invalid(&self, message: impl Into<String>) -> RunError {
        RunError::Invalid {
            node: self.name.to_string(),
            message: message.into(),
        }
    }

    /// The integer value of a size attribute.
    pub fn int(&self, d: &Dim) -> Result<i64, RunError> {
        signature::eval_int(self.cx, d, self.name)
    }

    /// The value of a size attribute, which must not be negative.
    pub fn size(&self, d: &Dim) -> Result<usize, RunError> {
        signature::eval_size(self.cx, d, self.name)
    }

    /// The elements of an operand that must be f32.
    pub fn f32s<'t>(&self, t: &'t Tensor, role: &str) -> Result<&'t [f32], RunError> {
        t.as_f32()
            .ok_or_else(|| self.invalid(format!("{role} must be f32, got {}", t.dtype())))
    }

    /// Resolves a possibly negative axis against `rank`.
    pub fn axis(&self, axis: i64, rank: usize) -> Result<usize, RunError> {
        kiln_ir::shape::normalize_axis("axis", axis, rank).map_err(|e| self.invalid(e.to_string()))
    }
}

/// Runs one op on its operand values.
fn eval_op(n: &NodeCx<'_>, op: &Op, args: &[&Tensor]) -> Result<Tensor, RunError> {
    let (lo, hi) = op.arity();
    if args.len() < lo || args.len() > hi {
        return Err(n.invalid(format!(
            "{} takes {lo} to {hi} operands, got {}",
            op.name(),
            args.len()
        )));
    }
    match op {
        Op::Unary(u) => elementwise::unary(n, *u, args[0]),
        Op::Binary(b) => elementwise::binary(n, *b, args[0], args[1]),
        Op::Where => elementwise::select(n, args[0], args[1], args[2]),
        Op::Cast { to } => elementwise::cast(n, args[0], *to),
        Op::Constant {
            value,
            dtype,
            shape,
        } => elementwise::constant(n, *value, *dtype, shape),
        Op::Arange { start, len, dtype } => elementwise::arange(n, start, len, *dtype),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => matmul::matmul(n, args[0], args[1], *transpose_a, *transpose_b),
        Op::Reduce {
            kind,
            axes,
            keepdim,
        } => reduce::reduce(n, args[0], *kind, axes, *keepdim),
        Op::Softmax { axis } => reduce::softmax(n, args[0], *axis),
        Op::LayerNorm { eps } => {
            reduce::layer_norm(n, args[0], args[1], args.get(2).copied(), *eps)
        }
        Op::RmsNorm { eps } => reduce::rms_norm(n, args[0], args[1], *eps),
        Op::Reshape { shape } => movement::reshape(n, args[0], shape),
        Op::Permute { perm } => movement::permute(n, args[0], perm),
        Op::Expand { shape } => movement::expand(n, args[0], shape),
        Op::Slice { axis, start, end } => movement::slice(n, args[0], *axis, start, end),
        Op::Concat { axis } => movement::concat(n, args, *axis),
        Op::Gather => movement::gather(n, args[0], args[1]),
        Op::CausalMask { queries, keys } => attention::causal_mask(n, queries, keys),
        Op::PaddingMask => attention::padding_mask(n, args[0]),
        Op::Rope { theta } => attention::rope(n, args[0], args[1], *theta),
        Op::Attention {
            causal,
            scale,
            relative,
            ..
        } => {
            let (mask, bias) = op.attention_extras(args.len()).unwrap_or_default();
            let bias = match relative {
                Some(r) => bias.map(|i| attention::Bias::Relative(args[i], *r)),
                None => bias.map(|i| attention::Bias::Alibi(args[i])),
            };
            attention::attention(
                n,
                [args[0], args[1], args[2]],
                mask.map(|i| args[i]),
                bias,
                *causal,
                *scale,
            )
        }
        Op::Moe { top_k } => moe::moe(n, [args[0], args[1], args[2], args[3], args[4]], *top_k),
        Op::LoraLinear { alpha, layout } => matmul::lora_linear(
            n,
            [args[0], args[1], args[2], args[3]],
            args.get(4).copied(),
            *alpha,
            *layout,
        ),
        Op::Kernel { body } => kernel(n, body, args),
    }
}

/// A fused elementwise kernel, run as the sequence of whole-tensor elementwise
/// ops it stands for (the oracle's definition of fusion: same values, one node).
fn kernel(n: &NodeCx<'_>, body: &[KernelOp], args: &[&Tensor]) -> Result<Tensor, RunError> {
    let mut vals: Vec<Tensor> = args.iter().map(|t| (*t).clone()).collect();
    for (i, k) in body.iter().enumerate() {
        let get = |j: usize| {
            vals.get(j).ok_or_else(|| {
                n.invalid(format!("kernel instruction {i} reads undefined value {j}"))
            })
        };
        let v = match k {
            KernelOp::Unary(u, a) => elementwise::unary(n, *u, get(*a)?)?,
            KernelOp::Binary(b, x, y) => elementwise::binary(n, *b, get(*x)?, get(*y)?)?,
            KernelOp::Where(c, a, b) => elementwise::select(n, get(*c)?, get(*a)?, get(*b)?)?,
            KernelOp::Cast(t, a) => elementwise::cast(n, get(*a)?, *t)?,
            KernelOp::Const(value, t) => elementwise::constant(n, *value, *t, &[])?,
        };
        vals.push(v);
    }
    let last = vals
        .pop()
        .ok_or_else(|| n.invalid("kernel body is empty".to_string()))?;
    let shape: Vec<Dim> = n
        .out_shape
        .iter()
        .map(|&d| Dim::constant(d as i64))
        .collect();
    if last.shape().len() == shape.len()
        && last
            .shape()
            .iter()
            .zip(&shape)
            .all(|(a, b)| b.is_const(*a as i64))
    {
        Ok(last)
    } else {
        movement::expand(n, &last, &shape)
    }
}

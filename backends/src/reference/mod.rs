//! The reference Program executor: runs a lowered [`Program`] with plain loops
//! over its eight kernel kinds, reading and writing the arena the memory plan
//! laid out. It proves the lowering (its outputs are checked against the graph
//! interpreter) and is the model every compiled backend follows: the same
//! Program, the same buffers, the same arena.
//!
//! Arithmetic follows the interpreter: f64 accumulation in every sum, float
//! results rounded to f32 per instruction, integers wrapping in i64.

mod kernels;
pub(crate) mod scalar;

use std::collections::HashMap;

use kiln_ir::{DType, Graph, ShapeCx};

use crate::interp::signature;
use crate::lower::{self, verify, ArenaPlan, BufferKind, Program};
use crate::{Backend, Executable, RunError, Tensor, Weights};
use scalar::Scalar;

/// The backend that lowers a graph and runs the Program with plain loops.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        Ok(Box::new(ReferenceExecutable::new(graph, weights)?))
    }
}

/// A lowered graph with its weights, ready to run.
#[derive(Debug)]
pub struct ReferenceExecutable {
    graph: Graph,
    program: Program,
    /// The weight of each parameter buffer, in [`Program::params`] order.
    weights: Vec<Tensor>,
    /// Arena plans by the values of the run-time symbols, each verified once.
    plans: HashMap<Vec<i64>, ArenaPlan>,
}

/// The largest arena or output a run may allocate (as the interpreter's cap).
const MAX_BYTES: u64 = 8 << 30;

impl ReferenceExecutable {
    /// Lowers and verifies `graph`, and binds its weights.
    pub fn new(graph: &Graph, weights: &Weights) -> Result<ReferenceExecutable, RunError> {
        let program = lower::lower(graph)?;
        verify::verify_structure(&program)?;
        let bound = signature::check_weights(graph, weights)?;
        let by_name: HashMap<String, Tensor> = bound
            .into_iter()
            .filter_map(|(v, t)| match &graph.node(v).kind {
                kiln_ir::NodeKind::Param { name } => Some((name.clone(), t)),
                _ => None,
            })
            .collect();
        let weights = program
            .params
            .iter()
            .map(|&b| match &program.buffer(b).kind {
                BufferKind::Param { name } => {
                    by_name
                        .get(name)
                        .cloned()
                        .ok_or_else(|| RunError::MissingWeight {
                            name: name.clone(),
                            expected: format!(
                                "{}{}",
                                program.buffer(b).dtype,
                                kiln_ir::types::shape_string(&program.buffer(b).shape)
                            ),
                        })
                }
                _ => Err(RunError::Invalid {
                    node: b.to_string(),
                    message: "a parameter buffer of another kind".into(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReferenceExecutable {
            graph: graph.clone(),
            program,
            weights,
            plans: HashMap::new(),
        })
    }

    /// The Program this executable runs.
    pub fn program(&self) -> &Program {
        &self.program
    }
}

/// Where a root buffer's elements are during a run.
#[derive(Clone, Copy, Debug)]
enum Place {
    Input(usize),
    Param(usize),
    Output(usize),
    Arena(usize),
    None,
}

/// A view resolved under one binding: root buffer, sizes, strides, offset (elements).
#[derive(Clone, Debug)]
pub(crate) struct CView {
    root: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) offset: usize,
    pub(crate) dtype: DType,
}

impl CView {
    /// The element of the root at multi-index `idx` of this view.
    pub(crate) fn at(&self, idx: &[usize]) -> usize {
        self.offset
            + idx
                .iter()
                .zip(&self.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>()
    }
}

/// The memory of one run.
pub(crate) struct Memory<'a> {
    places: Vec<Place>,
    dtypes: Vec<DType>,
    inputs: &'a [Tensor],
    weights: &'a [Tensor],
    outputs: Vec<Vec<u8>>,
    arena: Vec<u8>,
}

fn tensor_elem(t: &Tensor, i: usize) -> Option<Scalar> {
    use kiln_ir::TensorData;
    Some(match t.data() {
        TensorData::F32(d) => Scalar::Float(*d.get(i)? as f64),
        TensorData::I32(d) => Scalar::Int(*d.get(i)? as i64),
        TensorData::I64(d) => Scalar::Int(*d.get(i)?),
        TensorData::Bool(d) => Scalar::Bool(*d.get(i)?),
    })
}

fn decode(bytes: &[u8], at: usize, dtype: DType) -> Option<Scalar> {
    let n = dtype.size_bytes();
    let b = bytes.get(at * n..at * n + n)?;
    Some(match dtype {
        DType::F32 => Scalar::Float(f32::from_le_bytes(b.try_into().ok()?) as f64),
        DType::F16 => Scalar::Float(half::f16::from_le_bytes(b.try_into().ok()?).to_f64()),
        DType::BF16 => Scalar::Float(half::bf16::from_le_bytes(b.try_into().ok()?).to_f64()),
        DType::I32 => Scalar::Int(i32::from_le_bytes(b.try_into().ok()?) as i64),
        DType::I64 => Scalar::Int(i64::from_le_bytes(b.try_into().ok()?)),
        DType::Bool => Scalar::Bool(b[0] != 0),
    })
}

fn encode(bytes: &mut [u8], at: usize, dtype: DType, v: Scalar) -> Option<()> {
    let n = dtype.size_bytes();
    let b = bytes.get_mut(at * n..at * n + n)?;
    match (dtype, v.to(dtype)) {
        (DType::F32, Scalar::Float(x)) => b.copy_from_slice(&(x as f32).to_le_bytes()),
        (DType::F16, Scalar::Float(x)) => b.copy_from_slice(&half::f16::from_f64(x).to_le_bytes()),
        (DType::BF16, Scalar::Float(x)) => {
            b.copy_from_slice(&half::bf16::from_f64(x).to_le_bytes())
        }
        (DType::I32, Scalar::Int(i)) => b.copy_from_slice(&(i as i32).to_le_bytes()),
        (DType::I64, Scalar::Int(i)) => b.copy_from_slice(&i.to_le_bytes()),
        (DType::Bool, Scalar::Bool(x)) => b[0] = u8::from(x),
        _ => return None,
    }
    Some(())
}

impl Memory<'_> {
    /// Element `i` of the root of `v`.
    pub(crate) fn read(&self, v: &CView, i: usize) -> Result<Scalar, String> {
        let dtype = self.dtypes[v.root];
        let got = match self.places[v.root] {
            Place::Input(k) => self.inputs.get(k).and_then(|t| tensor_elem(t, i)),
            Place::Param(k) => self.weights.get(k).and_then(|t| tensor_elem(t, i)),
            Place::Output(k) => self.outputs.get(k).and_then(|b| decode(b, i, dtype)),
            Place::Arena(at) => self.arena.get(at..).and_then(|b| decode(b, i, dtype)),
            Place::None => None,
        };
        got.ok_or_else(|| format!("read of element {i} outside buffer b{}", v.root))
    }

    /// Writes element `i` of the root of `v`.
    pub(crate) fn write(&mut self, v: &CView, i: usize, x: Scalar) -> Result<(), String> {
        let dtype = self.dtypes[v.root];
        let done = match self.places[v.root] {
            Place::Output(k) => self.outputs.get_mut(k).and_then(|b| encode(b, i, dtype, x)),
            Place::Arena(at) => self
                .arena
                .get_mut(at..)
                .and_then(|b| encode(b, i, dtype, x)),
            _ => None,
        };
        done.ok_or_else(|| format!("write of element {i} outside buffer b{}", v.root))
    }
}

fn size(cx: &ShapeCx, d: &kiln_ir::Dim, what: &str) -> Result<usize, RunError> {
    crate::eval_size_in(cx, d, what)
}

impl Executable for ReferenceExecutable {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let cx = signature::bind_inputs(&self.graph, inputs)?;
        let p = &self.program;
        let key = p
            .runtime_symbols
            .iter()
            .map(|s| {
                cx.eval(&kiln_ir::Dim::sym(s))
                    .ok()
                    .and_then(|d| d.as_const())
                    .unwrap_or(-1)
            })
            .collect::<Vec<_>>();
        if !self.plans.contains_key(&key) {
            let plan = ArenaPlan::place(p, &cx)?;
            verify::verify_binding(p, &cx, &plan)?;
            if plan.peak_bytes > MAX_BYTES {
                return Err(RunError::Size {
                    what: format!("the arena of @{}", p.name),
                    dim: format!("{} bytes", plan.peak_bytes),
                    problem: format!(
                        "is more than the {} GiB a run may allocate",
                        MAX_BYTES >> 30
                    ),
                });
            }
            self.plans.insert(key.clone(), plan);
        }
        let plan = &self.plans[&key];
        let mut views = Vec::with_capacity(p.buffers.len());
        for (i, b) in p.buffers.iter().enumerate() {
            let what = format!("b{i} ({})", b.value);
            let layout = p
                .layout(lower::BufferId(i as u32))
                .map_err(|e| RunError::Size {
                    what: what.clone(),
                    dim: kiln_ir::types::shape_string(&b.shape),
                    problem: e.to_string(),
                })?;
            views.push(CView {
                root: p.root(lower::BufferId(i as u32)).index(),
                shape: layout
                    .shape
                    .iter()
                    .map(|d| size(&cx, d, &what))
                    .collect::<Result<_, _>>()?,
                strides: layout
                    .strides
                    .iter()
                    .map(|d| size(&cx, d, &what))
                    .collect::<Result<_, _>>()?,
                offset: size(&cx, &layout.offset, &what)?,
                dtype: b.dtype,
            });
        }
        for (&b, w) in p.params.iter().zip(&self.weights) {
            if views[b.index()].shape != w.shape() {
                return Err(RunError::WeightShape {
                    name: p.buffer(b).value.trim_start_matches('@').to_string(),
                    expected: format!("{:?}", views[b.index()].shape),
                    axis: None,
                    got: w.shape().to_vec(),
                });
            }
        }
        let mut places = vec![Place::None; p.buffers.len()];
        let mut outputs = Vec::new();
        for (i, b) in p.buffers.iter().enumerate() {
            places[i] = match &b.kind {
                BufferKind::Input { index } => Place::Input(*index),
                BufferKind::Param { .. } => Place::Param(
                    p.params
                        .iter()
                        .position(|x| x.index() == i)
                        .unwrap_or(usize::MAX),
                ),
                BufferKind::Output { .. } => {
                    let bytes = views[i]
                        .shape
                        .iter()
                        .try_fold(b.dtype.size_bytes() as u64, |acc, &d| {
                            acc.checked_mul(d as u64)
                        });
                    let bytes =
                        bytes
                            .filter(|&n| n <= MAX_BYTES)
                            .ok_or_else(|| RunError::Size {
                                what: format!("output {}", b.value),
                                dim: format!("{:?}", views[i].shape),
                                problem: format!(
                                    "needs more than the {} GiB a run may allocate",
                                    MAX_BYTES >> 30
                                ),
                            })?;
                    outputs.push(vec![0u8; bytes as usize]);
                    Place::Output(outputs.len() - 1)
                }
                BufferKind::Temp => match plan.offset_of(p, lower::BufferId(i as u32)) {
                    Some(o) => Place::Arena(o as usize),
                    None => Place::None,
                },
                BufferKind::View { .. } => Place::None,
            };
        }
        let output_slot: Vec<usize> = p
            .outputs
            .iter()
            .map(|(_, b)| match places[b.index()] {
                Place::Output(k) => k,
                _ => usize::MAX,
            })
            .collect();
        let mut mem = Memory {
            places,
            dtypes: p.buffers.iter().map(|b| b.dtype).collect(),
            inputs,
            weights: &self.weights,
            outputs,
            arena: vec![0u8; plan.peak_bytes as usize],
        };
        for s in &p.steps {
            let ins: Vec<&CView> = s.inputs.iter().map(|b| &views[b.index()]).collect();
            kernels::run_step(&mut mem, &s.kernel, &ins, &views[s.output.index()], &cx).map_err(
                |e| match e {
                    kernels::StepError::Run(e) => e,
                    kernels::StepError::Message(message) => RunError::Invalid {
                        node: s.origin.clone(),
                        message,
                    },
                    kernels::StepError::Gather { id, rows } => RunError::GatherIndex {
                        node: s.origin.clone(),
                        id,
                        rows,
                    },
                },
            )?;
        }
        let mut result = Vec::with_capacity(p.outputs.len());
        for ((_, b), &k) in p.outputs.iter().zip(&output_slot) {
            let v = &views[b.index()];
            let bytes = mem.outputs.get(k).map(Vec::as_slice).unwrap_or(&[]);
            result.push(to_tensor(bytes, v)?);
        }
        Ok(result)
    }
}

/// The bytes of an output as a host tensor.
fn to_tensor(bytes: &[u8], v: &CView) -> Result<Tensor, RunError> {
    let n: usize = v.shape.iter().product();
    let get = |i: usize| decode(bytes, i, v.dtype);
    let missing = || RunError::Invalid {
        node: format!("b{}", v.root),
        message: "output shorter than its shape".into(),
    };
    let t = match v.dtype {
        DType::F32 => Tensor::f32(
            v.shape.clone(),
            (0..n)
                .map(|i| {
                    get(i)
                        .and_then(|s| s.float().ok())
                        .map(|x| x as f32)
                        .ok_or_else(missing)
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::I64 => Tensor::i64(
            v.shape.clone(),
            (0..n)
                .map(|i| get(i).and_then(|s| s.int().ok()).ok_or_else(missing))
                .collect::<Result<_, _>>()?,
        ),
        DType::I32 => Tensor::i32(
            v.shape.clone(),
            (0..n)
                .map(|i| {
                    get(i)
                        .and_then(|s| s.int().ok())
                        .map(|x| x as i32)
                        .ok_or_else(missing)
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::Bool => Tensor::bool(
            v.shape.clone(),
            (0..n)
                .map(|i| match get(i) {
                    Some(Scalar::Bool(b)) => Ok(b),
                    _ => Err(missing()),
                })
                .collect::<Result<_, _>>()?,
        ),
        DType::F16 | DType::BF16 => {
            return Err(RunError::UnsupportedDType {
                what: "an output".into(),
                dtype: v.dtype,
            })
        }
    };
    Ok(t?)
}

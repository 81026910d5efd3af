//! The reference Program executor: runs a lowered [`Program`] with plain loops
//! over its eight kernel kinds, reading and writing the arena the memory plan
//! laid out. It proves the lowering (its outputs are checked against the graph
//! interpreter) and is the model every compiled backend follows: the same
//! Program, the same buffers, the same arena.
//!
//! Arithmetic follows the interpreter: f64 accumulation in every sum, float
//! results rounded to f32 per instruction, integers wrapping in i64.

pub(crate) mod kernels;
mod rebind;
pub(crate) mod scalar;

use std::collections::HashMap;

use kiln_ir::{DType, Graph, ShapeCx};

use crate::interp::signature;
use crate::lower::{self, verify, ArenaPlan, BufferKind, Program};
use crate::session::{self as sess, Session};
use crate::{Backend, Executable, RunError, Tensor, Weights};
use scalar::Scalar;
use std::collections::{BTreeMap, BTreeSet};

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

    fn session(
        &self,
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<Box<dyn Session>, RunError> {
        Ok(Box::new(ReferenceSession::new(funcs, weights, capacity)?))
    }
}

/// A lowered graph with its weights, ready to run.
#[derive(Debug)]
pub struct ReferenceExecutable {
    graph: Graph,
    program: Program,
    /// The weight of each parameter buffer, in [`Program::params`] order.
    weights: Vec<Tensor>,
    /// Arena plans and resolved views by the values of the run-time
    /// symbols, each verified once.
    plans: HashMap<Vec<i64>, (ArenaPlan, Vec<CView>)>,
    /// Which kernels run the steps.
    kernels: KernelSet,
    /// Whether a binding has had the element-by-element written check.
    verified_elements: bool,
    /// Steps of the last run that the scalar kernels ran.
    scalar_steps: Vec<usize>,
    /// Why a run of compiled code failed (a panic caught): the executable
    /// refuses to run again.
    failed: Option<String>,
    /// The generated kernels each step has used (CPU backend).
    step_code: Vec<crate::cpu::codegen::StepCache>,
    /// Per step, the end of the group of products sharing its input that
    /// starts there (CPU backend; `crate::cpu::product_groups`).
    groups: Vec<usize>,
    /// The arena of the last run, reused by the next one that fits in it
    /// (no step reads an arena element before writing it: verified), so a
    /// run does not fault in and clear fresh pages.
    arena: AlignedBytes,
    /// What each buffer's resolution reads, for deriving a binding from
    /// the last one (`None`: every binding takes the full path).
    rebind: Option<rebind::Rebind>,
    /// The key and symbol values of the binding prepared last.
    last: Option<(Vec<i64>, Vec<Option<i64>>)>,
    /// The most bytes a binding of this executable was found to fit in
    /// the machine's memory: a derived binding that needs no more is not
    /// checked again (a decode step would read the system's figures on
    /// every token).
    checked_need: u64,
}

/// Which kernels run a Program's steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelSet {
    /// Plain scalar loops over every dtype: the reference.
    Scalar,
    /// The CPU backend's native kernels (f32) and GEMM library on `threads`
    /// threads; a step whose dtypes they do not cover (integer positions,
    /// masks, 16-bit weights) runs the scalar kernels and is counted.
    Native {
        /// Threads for the GEMM library and the split kernels.
        threads: usize,
    },
}

/// Bindings whose plans an executable keeps at once.
const MAX_PLANS: usize = 16;

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
        let rebind = rebind::Rebind::new(&program);
        Ok(ReferenceExecutable {
            graph: graph.clone(),
            program,
            weights,
            plans: HashMap::new(),
            kernels: KernelSet::Scalar,
            verified_elements: false,
            checked_need: 0,
            scalar_steps: Vec::new(),
            failed: None,
            step_code: Vec::new(),
            groups: Vec::new(),
            arena: AlignedBytes::default(),
            rebind,
            last: None,
        })
    }

    /// The same, its steps run by `kernels`.
    pub(crate) fn with_kernels(
        graph: &Graph,
        weights: &Weights,
        kernels: KernelSet,
    ) -> Result<ReferenceExecutable, RunError> {
        let mut exe = ReferenceExecutable::new(graph, weights)?;
        exe.kernels = kernels;
        if let KernelSet::Native { .. } = kernels {
            exe.step_code = exe
                .program
                .steps
                .iter()
                .map(|_| Default::default())
                .collect();
            let threads = match kernels {
                KernelSet::Native { threads } => threads,
                KernelSet::Scalar => 1,
            };
            // Code generation and packing report their failures as errors;
            // a panic among them (Cranelift's, or a kernel builder's) is one
            // too.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::cpu::on_threads(threads, || {
                    crate::cpu::codegen::precompile(&exe.program, &exe.weights, &mut exe.step_code)
                })
            }))
            .unwrap_or_else(|payload| {
                Err(crate::cpu::jit::JitError(format!(
                    "it panicked: {}",
                    crate::cpu::panic_message(payload.as_ref())
                )))
            })
            .map_err(|e| RunError::Backend {
                backend: "cpu".into(),
                message: e.to_string(),
            })?;
            exe.groups = crate::cpu::product_groups(&exe.program);
        }
        Ok(exe)
    }

    /// How many steps of the last run the scalar kernels ran (with native
    /// kernels: the steps whose dtypes the native kernels do not cover).
    pub fn scalar_steps(&self) -> usize {
        self.scalar_steps.len()
    }

    /// The steps of the last run that the scalar kernels ran although the
    /// executable was compiled for native kernels, described (`s12 loop
    /// (%x = add(…))`).
    pub fn fallback_steps(&self) -> Vec<String> {
        if self.kernels == KernelSet::Scalar {
            return Vec::new();
        }
        self.scalar_steps
            .iter()
            .map(|&i| {
                let s = &self.program.steps[i];
                format!(
                    "@{} s{i} {} ({})",
                    self.program.name,
                    s.kernel.kind_name(),
                    s.origin
                )
            })
            .collect()
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
    State(usize),
    None,
}

/// A view resolved under one binding: root buffer, sizes, strides, offset (elements).
#[derive(Clone, Debug)]
pub(crate) struct CView {
    pub(crate) root: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) offset: usize,
    pub(crate) dtype: DType,
}

impl CView {
    /// Bytes of the view's elements in its dtype (`None` past 64 bits).
    pub(crate) fn bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_bytes() as u64, |a, &d| {
                a.checked_mul(d as u64)
            })
    }

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

/// Zeroed bytes aligned for every element type (8 bytes), so kernels may
/// read and write them as typed elements.
#[derive(Clone, Debug, Default)]
pub(crate) struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// A pointer to the first byte (no reference to the contents is made).
    pub(crate) fn base_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast::<u8>()
    }

    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> AlignedBytes {
        AlignedBytes {
            words: vec![0u64; len.div_ceil(8)],
            len,
        }
    }
}

impl std::ops::Deref for AlignedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the words hold at least `len` initialized bytes; u8 has no
        // alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// The memory of one run.
pub(crate) struct Memory<'a> {
    places: Vec<Place>,
    dtypes: Vec<DType>,
    inputs: &'a [Tensor],
    weights: &'a [Tensor],
    outputs: Vec<AlignedBytes>,
    states: &'a mut [AlignedBytes],
    arena: AlignedBytes,
}

pub(crate) fn tensor_elem(t: &Tensor, i: usize) -> Option<Scalar> {
    use kiln_ir::TensorData;
    Some(match t.data() {
        TensorData::F32(d) => Scalar::Float(*d.get(i)? as f64),
        TensorData::I32(d) => Scalar::Int(*d.get(i)? as i64),
        TensorData::I64(d) => Scalar::Int(*d.get(i)?),
        TensorData::Bool(d) => Scalar::Bool(*d.get(i)?),
        TensorData::F16(d) => Scalar::Float(d.get(i)?.to_f64()),
        TensorData::BF16(d) => Scalar::Float(d.get(i)?.to_f64()),
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
        (DType::F16, Scalar::Float(x)) => b.copy_from_slice(&scalar::to_f16(x).to_le_bytes()),
        (DType::BF16, Scalar::Float(x)) => b.copy_from_slice(&scalar::to_bf16(x).to_le_bytes()),
        (DType::I32, Scalar::Int(i)) => b.copy_from_slice(&(i as i32).to_le_bytes()),
        (DType::I64, Scalar::Int(i)) => b.copy_from_slice(&i.to_le_bytes()),
        (DType::Bool, Scalar::Bool(x)) => b[0] = u8::from(x),
        _ => return None,
    }
    Some(())
}

impl Memory<'_> {
    /// A raw pointer to the bytes of root buffer `root`, their length, and
    /// the dtype they really hold (a 16-bit weight bound to an f32 parameter
    /// holds f16), for kernels that read and write typed elements in place.
    /// Only outputs, caches and the arena may be written through it; the
    /// Program verifier proved every view of a root stays inside it.
    pub(crate) fn raw(&mut self, root: usize) -> Option<(*mut u8, usize, DType)> {
        let dtype = self.dtypes[root];
        // `Vec::as_mut_ptr` materializes no reference, so pointers into the
        // same buffer taken for a step's inputs and its output may coexist.
        match self.places[root] {
            Place::Input(k) => self
                .inputs
                .get(k)
                .map(|t| (t.bytes().as_ptr().cast_mut(), t.bytes().len(), t.dtype())),
            Place::Param(k) => self
                .weights
                .get(k)
                .map(|t| (t.bytes().as_ptr().cast_mut(), t.bytes().len(), t.dtype())),
            Place::Output(k) => self
                .outputs
                .get_mut(k)
                .map(|b| (b.base_ptr(), b.len, dtype)),
            Place::State(k) => self.states.get_mut(k).map(|b| (b.base_ptr(), b.len, dtype)),
            Place::Arena(at) if at <= self.arena.len => {
                // SAFETY: `at` is within the arena (checked), so the offset
                // pointer stays inside its allocation.
                Some((
                    unsafe { self.arena.base_ptr().add(at) },
                    self.arena.len - at,
                    dtype,
                ))
            }
            _ => None,
        }
    }

    /// `len` bytes at byte `at` of a root written by steps (an output, a
    /// cache, an arena slot), when they are there and really of its dtype.
    pub(crate) fn bytes_of(&self, root: usize, at: usize, len: usize) -> Option<&[u8]> {
        let bytes: &[u8] = match self.places[root] {
            Place::Output(k) => self.outputs.get(k)?,
            Place::State(k) => self.states.get(k)?,
            Place::Arena(base) => self.arena.get(base..)?,
            _ => return None,
        };
        bytes.get(at..at.checked_add(len)?)
    }

    /// Element `i` of the root of `v`.
    pub(crate) fn read(&self, v: &CView, i: usize) -> Result<Scalar, String> {
        let dtype = self.dtypes[v.root];
        let got = match self.places[v.root] {
            Place::Input(k) => self.inputs.get(k).and_then(|t| tensor_elem(t, i)),
            Place::Param(k) => self.weights.get(k).and_then(|t| tensor_elem(t, i)),
            Place::Output(k) => self.outputs.get(k).and_then(|b| decode(b, i, dtype)),
            Place::Arena(at) => self.arena.get(at..).and_then(|b| decode(b, i, dtype)),
            Place::State(k) => self.states.get(k).and_then(|b| decode(b, i, dtype)),
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
            Place::State(k) => self.states.get_mut(k).and_then(|b| encode(b, i, dtype, x)),
            _ => None,
        };
        done.ok_or_else(|| format!("write of element {i} outside buffer b{}", v.root))
    }
}

/// What a call hands the Program besides its weights: a host tensor for
/// every input that is not a cache kept in `states`.
pub(crate) struct CallInputs<'a> {
    /// Per Program input: the tensor, or `None` for a cache input read in place.
    pub tensors: Vec<Option<&'a Tensor>>,
    /// One byte buffer per [`Program::states`], sized for the capacity;
    /// the caller keeps them whether or not the call succeeds.
    pub states: &'a mut [AlignedBytes],
}

impl ReferenceExecutable {
    /// The run-time symbol binding of `cx` as a plan key.
    fn plan_key(&self, cx: &ShapeCx) -> Vec<i64> {
        let p = &self.program;
        p.runtime_symbols
            .iter()
            .chain(p.capacity.iter())
            .map(|s| {
                cx.eval(&kiln_ir::Dim::sym(s))
                    .ok()
                    .and_then(|d| d.as_const())
                    .unwrap_or(-1)
            })
            .collect()
    }

    /// Every buffer resolved under `cx`.
    fn views(&self, cx: &ShapeCx) -> Result<Vec<CView>, RunError> {
        (0..self.program.buffers.len())
            .map(|i| self.view_of(i, cx))
            .collect()
    }

    /// Buffer `i` resolved under `cx`.
    fn view_of(&self, i: usize, cx: &ShapeCx) -> Result<CView, RunError> {
        let p = &self.program;
        let b = &p.buffers[i];
        let id = lower::BufferId(i as u32);
        let what = || format!("b{i} ({})", b.value);
        let formed;
        let layout = match self.rebind.as_ref().and_then(|r| r.layout(i)) {
            Some(l) => l,
            None => {
                formed = p.layout(id).map_err(|e| RunError::Size {
                    what: what(),
                    dim: kiln_ir::types::shape_string(&b.shape),
                    problem: e.to_string(),
                })?;
                &formed
            }
        };
        let one = |d: &kiln_ir::Dim| crate::eval_size_lazy(cx, d, what);
        let sizes =
            |ds: &[kiln_ir::Dim]| -> Result<Vec<usize>, RunError> { ds.iter().map(one).collect() };
        Ok(CView {
            root: p.root(id).index(),
            shape: sizes(&layout.shape)?,
            strides: sizes(&layout.strides)?,
            offset: one(&layout.offset)?,
            dtype: b.dtype,
        })
    }

    /// The plan and views of binding `cx` derived from the last binding's,
    /// which it takes over (a decode step's binding is not seen again),
    /// re-resolving and re-verifying only the buffers that read a changed
    /// symbol (`None`: the full path must run; it reports any error).
    fn derive(&mut self, cx: &ShapeCx, values: &[Option<i64>]) -> Option<(ArenaPlan, Vec<CView>)> {
        if !self.verified_elements {
            return None;
        }
        let r = self.rebind.as_ref()?;
        let (last_key, last_values) = self.last.as_ref()?;
        let changed = r.changed(last_values, values)?;
        if r.moves_plan(changed) {
            return None;
        }
        let (plan, mut views) = self.plans.remove(last_key)?;
        let p = &self.program;
        let mut touched = Vec::new();
        for (i, v) in views.iter_mut().enumerate() {
            if r.reads(i, changed) {
                let (shape, strides, offset) = r.resolve(i, values)?;
                (v.shape, v.strides, v.offset) = (shape, strides, offset);
                touched.push(i);
            }
        }
        // Every re-resolved view inside its root, as the verifier checks it.
        for &i in &touched {
            let v = &views[i];
            if v.shape.contains(&0) {
                continue;
            }
            let size = views
                .get(v.root)?
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))?;
            let mut hi = v.offset;
            for (&d, &st) in v.shape.iter().zip(&v.strides) {
                hi = hi.checked_add((d - 1).checked_mul(st)?)?;
            }
            if hi >= size {
                return None;
            }
        }
        if !verify::checks_hold(p, cx) {
            return None;
        }
        for (&b, w) in p.params.iter().zip(&self.weights) {
            if r.reads(b.index(), changed) && views[b.index()].shape != w.shape() {
                return None;
            }
        }
        let mut outputs = 0u64;
        for (b, v) in p.buffers.iter().zip(&views) {
            if matches!(b.kind, BufferKind::Output { .. }) {
                outputs = outputs.checked_add(v.bytes().filter(|&n| n <= MAX_BYTES)?)?;
            }
        }
        let need = plan.peak_bytes.checked_add(outputs.checked_mul(2)?)?;
        if need > self.checked_need {
            if crate::memory::available_bytes().is_some_and(|avail| need > avail) {
                return None;
            }
            self.checked_need = need;
        }
        Some((plan, views))
    }

    /// The byte size of every state buffer under `cx`, each checked
    /// against what the machine can give ([`Self::check_state`]).
    pub(crate) fn state_bytes(&self, cx: &ShapeCx) -> Result<Vec<usize>, RunError> {
        let sizes = self.state_sizes(cx)?;
        for (k, &b) in sizes.iter().enumerate() {
            self.check_state(k, b)?;
        }
        Ok(sizes)
    }

    /// Refuses state `k` of `bytes` when the machine cannot give them (asked
    /// only for a state about to be allocated: a session's decode step,
    /// which reuses its caches, does not read the system's figures).
    pub(crate) fn check_state(&self, k: usize, bytes: usize) -> Result<(), RunError> {
        let st = &self.program.states[k];
        crate::memory::check(
            &format!("the cache {} of @{}", st.name, self.program.name),
            bytes as u64,
            "one buffer of the session's capacity",
        )
    }

    /// The byte size of every state buffer under `cx` (at most the per-run
    /// cap each; what the machine has left is not asked).
    pub(crate) fn state_sizes(&self, cx: &ShapeCx) -> Result<Vec<usize>, RunError> {
        self.program
            .states
            .iter()
            .map(|st| {
                let b = lower::plan::buffer_bytes(&self.program, st.root, cx)?;
                if b > MAX_BYTES {
                    return Err(RunError::Size {
                        what: format!("the cache {}", st.name),
                        dim: format!("{b} bytes"),
                        problem: format!(
                            "is more than the {} GiB a run may allocate",
                            MAX_BYTES >> 30
                        ),
                    });
                }
                Ok(b as usize)
            })
            .collect()
    }

    /// The arena plan and resolved views of the binding `cx`, made and
    /// verified once per binding (a few kept); returns the binding's key
    /// into `plans`.
    pub(crate) fn prepare_binding(&mut self, cx: &ShapeCx) -> Result<Vec<i64>, RunError> {
        let key = self.plan_key(cx);
        let values = self.rebind.as_ref().map(|r| r.values(cx));
        if !self.plans.contains_key(&key) {
            let timer = crate::profile::enabled().then(std::time::Instant::now);
            let entry = match values.as_ref().and_then(|v| self.derive(cx, v)) {
                Some(e) => e,
                None => {
                    let e = self.full_binding(cx, &key)?;
                    if let Some(t) = timer {
                        crate::profile::record("host: new binding, full".into(), t.elapsed());
                    }
                    e
                }
            };
            // A decode step binds a new cache length each call: keep the plans
            // of the last few bindings, not one per length ever seen.
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            self.plans.insert(key.clone(), entry);
        }
        self.last = values.map(|v| (key.clone(), v));
        Ok(key)
    }

    /// The plan and views of binding `cx`, everything resolved, placed and
    /// verified from the Program.
    fn full_binding(
        &mut self,
        cx: &ShapeCx,
        key: &[i64],
    ) -> Result<(ArenaPlan, Vec<CView>), RunError> {
        let plan = ArenaPlan::place(&self.program, cx)?;
        let first = !self.verified_elements;
        verify::verify_binding_with(&self.program, cx, &plan, first)?;
        self.verified_elements = true;
        if plan.peak_bytes > MAX_BYTES {
            return Err(RunError::Size {
                what: format!("the arena of @{}", self.program.name),
                dim: format!("{} bytes", plan.peak_bytes),
                problem: format!(
                    "is more than the {} GiB a run may allocate",
                    MAX_BYTES >> 30
                ),
            });
        }
        let views = self.views(cx)?;
        // What this binding allocates on each call: the arena and the
        // outputs (caches were sized when the session began).
        let outputs = self
            .program
            .buffers
            .iter()
            .zip(&views)
            .filter(|(b, _)| matches!(b.kind, BufferKind::Output { .. }))
            .map(|(_, v)| v.bytes().unwrap_or(u64::MAX))
            .collect::<Vec<u64>>();
        // An output past the per-output cap is refused below, by name.
        let over_cap = outputs.iter().any(|&b| b > MAX_BYTES);
        let outputs = outputs.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let binding: Vec<String> = self
            .program
            .runtime_symbols
            .iter()
            .zip(key)
            .map(|(s, v)| format!("{s}={v}"))
            .collect();
        let need = if over_cap {
            0
        } else {
            plan.peak_bytes.saturating_add(outputs.saturating_mul(2))
        };
        crate::memory::check(
            &format!("@{} with {}", self.program.name, binding.join(", ")),
            need,
            &format!(
                "arena {}, outputs {} and their host copies",
                crate::memory::human(plan.peak_bytes),
                crate::memory::human(outputs)
            ),
        )?;
        self.checked_need = self.checked_need.max(need);
        // The weights fit this binding's parameter shapes: checked once per binding.
        for (&b, w) in self.program.params.iter().zip(&self.weights) {
            if views[b.index()].shape != w.shape() {
                return Err(RunError::WeightShape {
                    name: self
                        .program
                        .buffer(b)
                        .value
                        .trim_start_matches('@')
                        .to_string(),
                    expected: format!("{:?}", views[b.index()].shape),
                    axis: None,
                    got: w.shape().to_vec(),
                });
            }
        }
        Ok((plan, views))
    }

    /// The plan and views of a binding [`ReferenceExecutable::prepare_binding`] made.
    pub(crate) fn plan_of(&self, key: &[i64]) -> Option<&(ArenaPlan, Vec<CView>)> {
        self.plans.get(key)
    }

    /// The graph this executable was compiled from.
    pub(crate) fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The weight bound to each parameter buffer, in [`Program::params`] order.
    pub(crate) fn weights(&self) -> &[Tensor] {
        &self.weights
    }

    /// Runs the Program under `cx` (every run-time symbol and the capacity
    /// bound). Returns the calls' states and, per output, its value as a host
    /// tensor when `want[i]`.
    pub(crate) fn execute(
        &mut self,
        cx: &ShapeCx,
        call: CallInputs<'_>,
        want: &[bool],
    ) -> Result<Vec<Option<Tensor>>, RunError> {
        let threads = match self.kernels {
            KernelSet::Scalar => return self.execute_steps(cx, call, want),
            KernelSet::Native { threads } => threads,
        };
        if let Some(why) = &self.failed {
            return Err(RunError::Backend {
                backend: "cpu".into(),
                message: format!(
                    "an earlier run failed ({why}); this executable cannot run again: compile the model anew"
                ),
            });
        }
        // Compiled code, the GEMM library and the thread team must not
        // bring the process down: a panic among them becomes this run's
        // error, and the executable (whose arena and caches it may have
        // left half-written) refuses further runs.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if threads > 1 {
                // The split steps run on the CPU backend's spinning thread
                // team (`cpu::team`): a decode step's many small parallel
                // jobs start on every core without waiting for sleeping
                // workers to wake.
                crate::cpu::with_team(threads, || self.execute_steps(cx, call, want))
            } else {
                self.execute_steps(cx, call, want)
            }
        }));
        ran.unwrap_or_else(|payload| {
            let why = crate::cpu::panic_message(payload.as_ref());
            self.failed = Some(why.clone());
            Err(RunError::Backend {
                backend: "cpu".into(),
                message: format!("a kernel failed: {why}"),
            })
        })
    }

    fn execute_steps(
        &mut self,
        cx: &ShapeCx,
        call: CallInputs<'_>,
        want: &[bool],
    ) -> Result<Vec<Option<Tensor>>, RunError> {
        let timer = crate::profile::enabled().then(std::time::Instant::now);
        let key = self.prepare_binding(cx)?;
        if let Some(t) = timer {
            crate::profile::record("host: binding, in all".into(), t.elapsed());
        }
        let p = &self.program;
        let (plan, views) = &self.plans[&key];
        let mut places = vec![Place::None; p.buffers.len()];
        let mut outputs = Vec::new();
        let host: Vec<Tensor> = call
            .tensors
            .iter()
            .flatten()
            .map(|t| (*t).clone())
            .collect();
        let mut host_index = Vec::new();
        let mut next = 0;
        for t in &call.tensors {
            host_index.push(t.map(|_| {
                next += 1;
                next - 1
            }));
        }
        for (i, b) in p.buffers.iter().enumerate() {
            places[i] = match &b.kind {
                BufferKind::Input { index } => match host_index.get(*index).copied().flatten() {
                    Some(k) => Place::Input(k),
                    None => Place::None,
                },
                // Set below, from the parameter list.
                BufferKind::Param { .. } => Place::None,
                BufferKind::Output { .. } => {
                    let bytes = views[i]
                        .bytes()
                        .filter(|&n| n <= MAX_BYTES)
                        .ok_or_else(|| RunError::Size {
                            what: format!(
                                "output {}",
                                p.outputs
                                    .iter()
                                    .find(|(_, o)| o.index() == i)
                                    .map_or(b.value.as_str(), |(n, _)| n.as_str())
                            ),
                            dim: format!("{:?}", views[i].shape),
                            problem: format!(
                                "needs more than the {} GiB a run may allocate",
                                MAX_BYTES >> 30
                            ),
                        })?;
                    outputs.push(AlignedBytes::zeroed(bytes as usize));
                    Place::Output(outputs.len() - 1)
                }
                BufferKind::Temp => match plan.offset_of(p, lower::BufferId(i as u32)) {
                    Some(o) => Place::Arena(o as usize),
                    None => Place::None,
                },
                BufferKind::State { .. } => {
                    match p.states.iter().position(|s| s.root.index() == i) {
                        Some(k) => Place::State(k),
                        None => Place::None,
                    }
                }
                BufferKind::View { .. } => Place::None,
            };
        }
        for (k, &b) in p.params.iter().enumerate() {
            places[b.index()] = Place::Param(k);
        }
        let mut mem = Memory {
            places,
            dtypes: p.buffers.iter().map(|b| b.dtype).collect(),
            inputs: &host,
            weights: &self.weights,
            outputs,
            states: call.states,
            arena: {
                let need = plan.peak_bytes as usize;
                if self.arena.len < need {
                    self.arena = AlignedBytes::zeroed(need);
                }
                std::mem::take(&mut self.arena)
            },
        };
        // A cache input given as a host tensor is copied into its state first.
        for (i, t) in call.tensors.iter().enumerate() {
            let (Some(t), Some(&b)) = (t, p.inputs.get(i)) else {
                continue;
            };
            if matches!(p.buffer(b).kind, BufferKind::View { .. }) {
                kernels::write_tensor(&mut mem, &views[b.index()], t).map_err(|m| {
                    RunError::Invalid {
                        node: format!("input {i}"),
                        message: m,
                    }
                })?;
            }
        }
        let kernel_set = self.kernels;
        let mut scalar_steps = Vec::new();
        let map_err = |s: &crate::lower::Step, e: kernels::StepError| match e {
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
        };
        let mut next = 0;
        for (si, s) in p.steps.iter().enumerate() {
            #[cfg(test)]
            if crate::cpu::FAIL_AT_STEP.with(|f| f.get()) == Some(si) {
                panic!("step {si} failed (injected)");
            }
            if si < next {
                // Run with the group that started before it.
                continue;
            }
            // Matrix–vector products sharing their input run as one
            // parallel job (CPU backend).
            if let (KernelSet::Native { threads }, Some(&end)) = (kernel_set, self.groups.get(si)) {
                if end > si + 1 {
                    let timer = crate::profile::enabled().then(std::time::Instant::now);
                    let group = crate::cpu::run_group(
                        &mut mem,
                        &p.steps[si..end],
                        &mut self.step_code[si..end],
                        views,
                        cx,
                        threads,
                    );
                    if let Some(ran) = group {
                        if let Some(t) = timer {
                            let took = t.elapsed();
                            let shapes: Vec<_> = p.steps[si..end]
                                .iter()
                                .map(|m| views[m.output.index()].shape.last().copied().unwrap_or(1))
                                .collect();
                            crate::profile::record(
                                format!("gemm group of {} (n = {shapes:?})", end - si),
                                took,
                            );
                        }
                        let scalar = ran.map_err(|(k, e)| map_err(&p.steps[si + k], e))?;
                        scalar_steps.extend(scalar.into_iter().map(|k| si + k));
                        next = end;
                        continue;
                    }
                }
            }
            let ins: Vec<&CView> = s.inputs.iter().map(|b| &views[b.index()]).collect();
            let out = &views[s.output.index()];
            let timer = crate::profile::enabled().then(std::time::Instant::now);
            let ran = match kernel_set {
                KernelSet::Scalar => kernels::run_step(&mut mem, &s.kernel, &ins, out, cx),
                KernelSet::Native { threads } => {
                    let Some(code) = self.step_code.get_mut(si) else {
                        return Err(RunError::Invalid {
                            node: s.origin.clone(),
                            message: "a step without generated code".into(),
                        });
                    };
                    match crate::cpu::run_step(&mut mem, &s.kernel, code, &ins, out, cx, threads) {
                        Some(r) => r,
                        None => {
                            scalar_steps.push(si);
                            kernels::run_step(&mut mem, &s.kernel, &ins, out, cx)
                        }
                    }
                }
            };
            if let Some(t) = timer {
                // The time first: describing the step formats its kernel.
                let took = t.elapsed();
                let inner = ins.first().and_then(|a| a.shape.last().copied());
                crate::profile::record(
                    crate::profile::describe(&s.kernel, &out.shape, inner),
                    took,
                );
            }
            ran.map_err(|e| map_err(s, e))?;
        }
        let mut result = Vec::with_capacity(p.outputs.len());
        for (k, (name, b)) in p.outputs.iter().enumerate() {
            if !want.get(k).copied().unwrap_or(true) {
                result.push(None);
                continue;
            }
            let t =
                kernels::read_tensor(&mem, &views[b.index()]).map_err(|m| RunError::Invalid {
                    node: format!("output {name}"),
                    message: m,
                })?;
            result.push(Some(t));
        }
        self.scalar_steps = scalar_steps;
        self.arena = std::mem::take(&mut mem.arena);
        if kernel_set != KernelSet::Scalar && !self.scalar_steps.is_empty() {
            crate::cpu::warn_fallbacks(&self.fallback_steps());
        }
        Ok(result)
    }
}

impl Executable for ReferenceExecutable {
    fn fallback_steps(&self) -> Vec<String> {
        ReferenceExecutable::fallback_steps(self)
    }

    fn kernel_addresses(&self) -> Vec<Vec<usize>> {
        self.step_code.iter().map(|c| c.addresses()).collect()
    }

    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let cx = signature::bind_inputs(&self.graph, inputs)?;
        // Without a session, the caches are sized for this call's outputs.
        let cx = self.program.bind_capacity(&cx, None)?;
        let states = self
            .state_bytes(&cx)?
            .into_iter()
            .map(AlignedBytes::zeroed)
            .collect::<Vec<_>>();
        let mut states = states;
        let call = CallInputs {
            tensors: inputs.iter().map(Some).collect(),
            states: &mut states,
        };
        let outputs = self.execute(&cx, call, &[])?;
        Ok(outputs.into_iter().flatten().collect())
    }
}

/// A session whose caches stay in place: one buffer per cache, of the
/// session's capacity, written by each call only where it grows.
pub struct ReferenceSession {
    entries: Vec<(Graph, ReferenceExecutable)>,
    carried_names: BTreeSet<String>,
    carried: BTreeMap<String, Tensor>,
    /// Each cache's memory by name, allocated by the first call that writes
    /// it from position 0 (a prefill) and kept across calls.
    states: BTreeMap<String, AlignedBytes>,
    /// Each cache's shape as the last call left it.
    shapes: BTreeMap<String, Vec<usize>>,
    len: usize,
    capacity: usize,
}

impl ReferenceSession {
    /// Lowers every entry point; caches get `capacity` positions.
    pub fn new(
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<ReferenceSession, RunError> {
        ReferenceSession::with_kernels(funcs, weights, capacity, KernelSet::Scalar)
    }

    /// The same, its steps run by `kernels`.
    pub(crate) fn with_kernels(
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
        kernels: KernelSet,
    ) -> Result<ReferenceSession, RunError> {
        let entries = funcs
            .iter()
            .map(|g| {
                Ok((
                    g.clone(),
                    ReferenceExecutable::with_kernels(g, weights, kernels)?,
                ))
            })
            .collect::<Result<Vec<_>, RunError>>()?;
        Ok(ReferenceSession {
            carried_names: sess::carried_names(&funcs.iter().collect::<Vec<_>>()),
            entries,
            carried: BTreeMap::new(),
            states: BTreeMap::new(),
            shapes: BTreeMap::new(),
            len: 0,
            capacity,
        })
    }
}

impl Session for ReferenceSession {
    fn fallback_steps(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|(_, e)| e.fallback_steps())
            .collect()
    }

    fn call(&mut self, entry: &str, data: &[Tensor]) -> Result<Vec<(String, Tensor)>, RunError> {
        let timer = crate::profile::enabled().then(std::time::Instant::now);
        let capacity = self.capacity;
        let (carried, shapes) = (&self.carried, &self.shapes);
        let (g, exe) = sess::find_entry(&mut self.entries, entry)?;
        sess::check_data_count(g, data)?;
        let (tensors, cx) = sess::bind_call(g, entry, data, carried, shapes)?;
        let cx = exe.program.bind_capacity(&cx, Some(capacity))?;
        let sizes = exe.state_sizes(&cx)?;
        // Every cache this call must allocate fits before any is taken out.
        for (k, (st, &size)) in exe.program.states.iter().zip(&sizes).enumerate() {
            if self.states.get(&st.name).is_none_or(|m| m.len() != size) {
                exe.check_state(k, size)?;
            }
        }
        let mut states = Vec::with_capacity(sizes.len());
        for (st, &size) in exe.program.states.iter().zip(&sizes) {
            let kept = self.states.remove(&st.name);
            let mem = match (st.input, kept) {
                (Some(_), Some(mem)) if mem.len() == size => mem,
                (Some(_), _) => {
                    return Err(RunError::Session(format!(
                        "@{entry} reads the cache {} with another batch or layout than the call that wrote it; start a new session",
                        st.name
                    )))
                }
                // A call that writes the cache from position 0 starts a new sequence.
                (None, Some(mem)) if mem.len() == size => mem,
                (None, _) => AlignedBytes::zeroed(size),
            };
            states.push(mem);
        }
        let want: Vec<bool> = g
            .outputs()
            .iter()
            .map(|(n, _)| g.cache_axis(n).is_none())
            .collect();
        let call = CallInputs {
            tensors,
            states: &mut states,
        };
        if let Some(t) = timer {
            crate::profile::record("host: session call set-up".into(), t.elapsed());
        }
        let result = exe.execute(&cx, call, &want);
        // The caches stay with the session whether or not the call succeeded.
        // A failed call that writes a cache from position 0 (a prefill) may
        // have overwritten it: that cache is then gone, and a decode says so.
        for (st, mem) in exe.program.states.iter().zip(states) {
            self.states.insert(st.name.clone(), mem);
            if result.is_err() && st.input.is_none() {
                self.shapes.remove(&st.name);
            }
        }
        let outputs = result?;
        sess::finish_call(
            &exe.program,
            &cx,
            g,
            outputs,
            &self.carried_names,
            &mut self.carried,
            &mut self.shapes,
            &mut self.len,
        )
    }

    fn cache_len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two run-time sizes: `T` sizes temporaries, `S` only moves a view.
    const SRC: &str = "func @f(%x: f32[B, S, 4], %y: f32[B, T, 4]) -> (z: f32[B, T, 4]) {
  %l = slice(%x) axis=1 start=S - 1 end=S : f32[B, 1, 4]
  %lx = expand(%l) shape=[B, T, 4] : f32[B, T, 4]
  %e = exp(%y) : f32[B, T, 4]
  %t = tanh(%e) : f32[B, T, 4]
  %z = add(%t, %lx) : f32[B, T, 4]
  return %z
}";

    fn input(b: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (0..b * n * 4)
            .map(|i| (i % 7) as f32 * 0.25 - 0.5)
            .collect();
        Tensor::f32(vec![b, n, 4], v).expect("tensor")
    }

    /// A binding derived from the last one resolves to what the full path
    /// makes of it from scratch, and runs to the same outputs.
    #[test]
    fn derived_bindings_equal_full_ones() {
        let graph = kiln_ir::parse_graph(SRC).expect("graph");
        let mut exe = ReferenceExecutable::new(&graph, &Weights::new()).expect("compile");
        assert!(exe.rebind.is_some());
        let mut fresh = ReferenceExecutable::new(&graph, &Weights::new()).expect("compile");
        for (b, s, t) in [
            (1, 3, 2),
            (1, 4, 2),
            (1, 9, 2),
            (1, 9, 5),
            (1, 10, 5),
            (2, 10, 5),
            (2, 1, 1),
        ] {
            let ins = [input(b, s), input(b, t)];
            let cx = signature::bind_inputs(&graph, &ins).expect("bind");
            let cx = exe.program.bind_capacity(&cx, None).expect("capacity");
            let key = exe.prepare_binding(&cx).expect("prepare");
            let (plan, views) = exe.plan_of(&key).expect("plan").clone();
            let full = fresh.full_binding(&cx, &key).expect("full");
            assert_eq!(plan, full.0, "plan of B={b} S={s} T={t}");
            assert_eq!(views.len(), full.1.len());
            for (i, (a, f)) in views.iter().zip(&full.1).enumerate() {
                assert_eq!(
                    (a.root, &a.shape, &a.strides, a.offset, a.dtype),
                    (f.root, &f.shape, &f.strides, f.offset, f.dtype),
                    "b{i} of B={b} S={s} T={t}"
                );
            }
            let got = Executable::run(&mut exe, &ins).expect("run");
            let want = Executable::run(&mut fresh, &ins).expect("run");
            assert_eq!(got, want);
        }
    }

    /// A binding that changes only symbols no temporary's size reads (a
    /// decode step's cache length) is derived from the last one, which it
    /// takes over; one that moves a temporary takes the full path.
    #[test]
    fn a_binding_that_moves_no_temporary_is_derived() {
        let src = "func @g(%x: f32[B, S, 4]) -> (z: f32[B, 1, 4]) {
  %l = slice(%x) axis=1 start=S - 1 end=S : f32[B, 1, 4]
  %e = exp(%l) : f32[B, 1, 4]
  %z = add(%e, %l) : f32[B, 1, 4]
  return %z
}";
        let graph = kiln_ir::parse_graph(src).expect("graph");
        let mut exe = ReferenceExecutable::new(&graph, &Weights::new()).expect("compile");
        let mut fresh = ReferenceExecutable::new(&graph, &Weights::new()).expect("compile");
        let r = exe.rebind.as_ref().expect("rebind");
        let bit = |name: &str| 1u64 << r.symbols.iter().position(|s| s == name).expect("symbol");
        assert!(!r.moves_plan(bit("S")) && r.moves_plan(bit("B")));
        for (b, s) in [(1, 2), (1, 3), (1, 4), (1, 9), (2, 9), (2, 5)] {
            let ins = [input(b, s)];
            let got = Executable::run(&mut exe, &ins).expect("run");
            assert_eq!(got, Executable::run(&mut fresh, &ins).expect("run"));
            // The first binding and B = 2 are planned in full and kept; the
            // others replace the binding they derive from.
            let kept = if b == 1 { 1 } else { 2 };
            assert_eq!(exe.plans.len(), kept, "B={b} S={s}");
        }
    }
}

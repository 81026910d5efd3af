//! kiln-backends: turns a verified kiln graph plus its weights into something
//! that runs.
//!
//! Every backend implements [`Backend`] (compile once) and hands back an
//! [`Executable`] (run many times on [`Tensor`] inputs). The first backend is the
//! reference [`interp::Interpreter`]: plain loops over f32 with f64 accumulation,
//! slow on purpose and obviously correct, the oracle every pass and every other
//! backend is tested against.
//!
//! ```
//! use kiln_backends::{Backend, Interpreter, Tensor, Weights};
//!
//! let graph = kiln_ir::parse_graph(
//!     "func @f(%x: f32[B, 2]) -> (y: f32[B, 2]) {\n  %y = relu(%x) : f32[B, 2]\n  return %y\n}",
//! )?;
//! let mut exe = Interpreter.compile(&graph, &Weights::new())?;
//! let out = exe.run(&[Tensor::f32(vec![1, 2], vec![-1.0, 2.0])?])?;
//! assert_eq!(out[0].as_f32(), Some(&[0.0f32, 2.0][..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod interp;
pub mod lower;
pub mod memory;
pub mod profile;
pub mod progress;
pub mod reference;
pub mod routing;
pub mod session;

use kiln_ir::{DType, Dim, Graph, ShapeCx, ShapeError, VerifyErrors};

pub use cpu::Cpu;
pub use interp::Interpreter;
pub use kiln_ir::{Element, Tensor, TensorData, TensorError, Weights};
pub use lower::{lower, Program};
pub use reference::Reference;
pub use session::Session;

/// Compiles a verified graph and its weights into an [`Executable`].
pub trait Backend {
    /// The backend's short name (`interp`, `cpu`, `cuda`), for reports.
    fn name(&self) -> &'static str;

    /// Checks `weights` against the graph's parameters and prepares to run `graph`.
    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError>;

    /// A [`Session`] over the entry points `funcs` (e.g. `prefill` and
    /// `decode`) whose caches hold up to `capacity` positions. The default
    /// passes the caches between calls as tensors (each call copies them);
    /// a backend that keeps them in place overrides it.
    fn session(
        &self,
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<Box<dyn Session>, RunError> {
        let exes = funcs
            .iter()
            .map(|g| Ok((g.clone(), self.compile(g, weights)?)))
            .collect::<Result<Vec<_>, RunError>>()?;
        Ok(Box::new(session::TensorSession::new(exes, capacity)))
    }
}

/// A compiled graph: runs on inputs in signature order, returns outputs in signature order.
pub trait Executable {
    /// Runs the graph once; input shapes bind the run-time symbols (`B`, `T`, …).
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError>;

    /// Steps of the last run that a compiled backend could not cover with
    /// its own code and ran on the reference kernels instead, described;
    /// empty when everything ran as compiled.
    fn fallback_steps(&self) -> Vec<String> {
        Vec::new()
    }

    /// Per step of the Program (in order), the addresses of the generated
    /// kernels the step has run so far: identical steps, such as those of
    /// two layers, share theirs. Empty for backends without generated code.
    fn kernel_addresses(&self) -> Vec<Vec<usize>> {
        Vec::new()
    }
}

/// Everything that can go wrong compiling or running a graph.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The graph breaks its own shape contracts.
    #[error("the graph does not verify:\n{0}")]
    Graph(#[from] VerifyErrors),
    /// A dtype this backend (or tensor storage) does not handle.
    #[error(
        "{what}: dtype {dtype} is not supported by the graph interpreter, which holds f32 values \
         (declare the value f32: 16-bit weights of an f32 param are widened as they are read; \
         the reference and CPU backends run {dtype} values)"
    )]
    UnsupportedDType {
        /// The value or call, e.g. `input %x` or `%3 = cast(%2)`.
        what: String,
        /// The unsupported dtype.
        dtype: DType,
    },
    /// Wrong number of inputs.
    #[error("@{func} takes {expected} inputs, got {got}")]
    InputCount {
        /// The function name.
        func: String,
        /// Inputs in the signature.
        expected: usize,
        /// Tensors passed.
        got: usize,
    },
    /// An input's dtype contradicts the signature.
    #[error("input %{input}: dtype {got} contradicts the signature type {expected}")]
    InputDType {
        /// The input name, without `%`.
        input: String,
        /// The signature type, e.g. `f32[B, T, d]`.
        expected: String,
        /// The tensor's dtype.
        got: DType,
    },
    /// An input's rank contradicts the signature.
    #[error("input %{input}: shape {got:?} has rank {}, but the signature type {expected} has rank {expected_rank}", got.len())]
    InputRank {
        /// The input name, without `%`.
        input: String,
        /// The signature type.
        expected: String,
        /// Its rank.
        expected_rank: usize,
        /// The tensor's shape.
        got: Vec<usize>,
    },
    /// A run-time symbol takes two different values in the input shapes.
    #[error("input %{input}: axis {axis} is `{symbol}`, which is {bound} (from axis {bound_axis} of input %{bound_by}), but this tensor has {got}")]
    InputSymbol {
        /// The input whose size disagrees.
        input: String,
        /// Its axis.
        axis: usize,
        /// The run-time symbol, e.g. `T`.
        symbol: String,
        /// The value bound first.
        bound: usize,
        /// The input that bound it.
        bound_by: String,
        /// The axis of that input.
        bound_axis: usize,
        /// The size found here.
        got: usize,
    },
    /// An input size disagrees with its dim expression (`d = 32`, `S + 1`).
    #[error("input %{input}: axis {axis} is `{dim}` = {expected}, but this tensor has {got}")]
    InputDim {
        /// The input name, without `%`.
        input: String,
        /// The axis.
        axis: usize,
        /// The dim as written in the signature.
        dim: String,
        /// What it evaluates to.
        expected: i64,
        /// The size found.
        got: usize,
    },
    /// A parameter has no weight.
    #[error("weight @{name} ({expected}) is missing")]
    MissingWeight {
        /// The parameter name, without `@`.
        name: String,
        /// The parameter type.
        expected: String,
    },
    /// A weight's dtype contradicts its parameter type.
    #[error("weight @{name}: dtype {got} contradicts the parameter type {expected}")]
    WeightDType {
        /// The parameter name, without `@`.
        name: String,
        /// The parameter type.
        expected: String,
        /// The weight's dtype.
        got: DType,
    },
    /// A weight's shape contradicts its parameter type.
    #[error("weight @{name}: shape {got:?} contradicts the parameter type {expected}{}", describe_axis(*axis))]
    WeightShape {
        /// The parameter name, without `@`.
        name: String,
        /// The parameter type, with bound sizes, e.g. `f32[d, 4 * d] (d = 8)`.
        expected: String,
        /// The first axis that disagrees, when the ranks agree.
        axis: Option<usize>,
        /// The weight's shape.
        got: Vec<usize>,
    },
    /// A `where` binding cannot be evaluated under the run-time symbols.
    #[error("where {name} = {value}: {source}")]
    Binding {
        /// The bound symbol.
        name: String,
        /// Its expression.
        value: String,
        /// Why evaluation failed (e.g. a division that is not exact); boxed, it is large.
        #[source]
        source: Box<ShapeError>,
    },
    /// A run that needs more memory than the machine can give, refused
    /// before anything is allocated.
    #[error("{what} needs {need} of memory ({detail}); the machine has {available} available")]
    Memory {
        /// The function and its binding.
        what: String,
        /// Bytes needed, readable.
        need: String,
        /// What the figure is made of.
        detail: String,
        /// Bytes available, readable.
        available: String,
    },
    /// A size expression that does not evaluate to a non-negative integer.
    #[error("{what}: size `{dim}` {problem}")]
    Size {
        /// Where the size is used (a node, a parameter).
        what: String,
        /// The dim expression.
        dim: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// A gather id outside the table.
    #[error("{node}: id {id} is out of range for a table of {rows} rows")]
    GatherIndex {
        /// The node, e.g. `%h = gather(@wte, %ids)`.
        node: String,
        /// The offending id.
        id: i64,
        /// The number of rows of the table.
        rows: usize,
    },
    /// An integer division by zero.
    #[error("{node}: integer division by zero")]
    DivisionByZero {
        /// The node.
        node: String,
    },
    /// Operands the op cannot take, found only at run time.
    #[error("{node}: {message}")]
    Invalid {
        /// The node.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// A node produced a value other than its evaluated type (a backend or contract bug).
    #[error("{node}: produced {got}, but its type evaluates to {expected}")]
    ResultType {
        /// The node.
        node: String,
        /// The stored type evaluated to sizes, e.g. `f32[2, 3]`.
        expected: String,
        /// The type of what the backend produced.
        got: String,
    },
    /// An op the lowering cannot turn into kernels.
    #[error("{node}: cannot lower: {message}")]
    Lower {
        /// The node, as printed.
        node: String,
        /// Why.
        message: String,
    },
    /// A lowered Program that breaks its own invariants (a lowering bug, or a
    /// binding under which a view leaves its buffer).
    #[error("program @{func} does not verify:\n  {}", errors.join("\n  "))]
    Program {
        /// The entry point.
        func: String,
        /// Every violation found.
        errors: Vec<String>,
    },
    /// A session call that does not fit the session's entry points or state.
    #[error("session: {0}")]
    Session(String),
    /// A call that would grow a kept cache past its capacity.
    #[error("the KV cache holds {capacity} positions, but this call needs {needed} (start a new session with a larger capacity)")]
    CacheFull {
        /// Positions the cache was allocated for.
        capacity: usize,
        /// Positions the call needs.
        needed: usize,
    },
    /// A tensor that cannot be formed (wrong element count, ragged token rows).
    #[error("{0}")]
    Tensor(#[from] kiln_ir::TensorError),
    /// A backend that cannot serve this host or model (code generation
    /// failed, a device is missing).
    #[error("the {backend} backend: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What failed.
        message: String,
    },
}

fn describe_axis(axis: Option<usize>) -> String {
    axis.map_or_else(String::new, |a| format!(" (axis {a} differs)"))
}

/// The integer value of `d` under `cx`; `what` names where it is used.
pub(crate) fn eval_int_in(cx: &ShapeCx, d: &Dim, what: &str) -> Result<i64, RunError> {
    interp::signature::eval_int(cx, d, what)
}

/// The value of `d` under `cx` as a size (not negative).
pub(crate) fn eval_size_in(cx: &ShapeCx, d: &Dim, what: &str) -> Result<usize, RunError> {
    interp::signature::eval_size(cx, d, what)
}

/// [`eval_size_in`] with `what` formatted only when `d` does not evaluate
/// to a size (sizes resolved on every call of a decode step).
pub(crate) fn eval_size_lazy(
    cx: &ShapeCx,
    d: &Dim,
    what: impl FnOnce() -> String,
) -> Result<usize, RunError> {
    match cx.value(d) {
        Some(v) if v >= 0 => Ok(v as usize),
        _ => eval_size_in(cx, d, &what()),
    }
}

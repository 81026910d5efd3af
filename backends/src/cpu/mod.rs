//! The CPU backend: compiles the lowered Program to machine code.
//!
//! It shares the Program machinery of the reference executor (views resolved
//! per binding, the arena the memory plan lays out, caches kept in place by
//! sessions) and runs every step with compiled code: Cranelift-generated
//! loop, row, gather, rope, copy and fill kernels and matrix–vector products
//! ([`jit`], driven by `codegen`), kiln's AVX-512 GEMM over weights packed at
//! compile time (`packed`) or the `gemm` library, and a flash-style attention
//! kernel. A step the compiled code does not cover would run the scalar
//! reference kernels and be listed by `Executable::fallback_steps`; the tests
//! assert that no step of any model family does.
//!
//! Safety: every kernel reads and writes through raw pointers into buffers
//! whose extent the Program verifier checked for the current binding (every
//! view inside its root; roots sized by the plan), and only writes outputs,
//! caches and arena slots. Debug builds re-check each address.

#[cfg(target_arch = "x86_64")]
mod amx;
pub(crate) mod codegen;
pub mod isa;
pub mod jit;
mod kernels;
pub use kernels::{addends_fused, tile_products, tile_unit_usable};
mod matvec;
mod moe;
pub(crate) mod packed;
pub use packed::{
    adopt as adopt_packed, available as packed_available, packed_weights, PackedWeight,
};
mod norms;
mod softmax;
pub(crate) mod team;
mod vbody;

/// The steps [`warn_fallbacks`] has named in this process.
static FALLBACKS_SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Every step of this process so far that a compiled executable or session
/// ran on the reference kernels (what the warning on stderr named), in the
/// order they first ran: a test runs whole generations and asserts that
/// none did.
pub fn fallbacks_so_far() -> Vec<String> {
    FALLBACKS_SAID
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Says on stderr that compiled steps ran on the scalar reference kernels
/// (correct, but far slower): nothing falls back silently. Each step is
/// named once per process, so a generation's decode steps do not repeat
/// it; `Executable::fallback_steps` lists them for programs.
pub(crate) fn warn_fallbacks(steps: &[String]) {
    let mut said = FALLBACKS_SAID.lock().unwrap_or_else(|p| p.into_inner());
    let new: Vec<&String> = steps.iter().filter(|s| !said.contains(s)).collect();
    if new.is_empty() {
        return;
    }
    let mut text = format!(
        "kiln: warning: the CPU backend has no compiled kernel for {} step{}; {} on the reference kernels (correct, but slow):",
        new.len(),
        if new.len() == 1 { "" } else { "s" },
        if new.len() == 1 { "it ran" } else { "they ran" },
    );
    for s in &new {
        text.push_str("\n  ");
        text.push_str(s);
    }
    // A stderr that cannot be written (a closed pipe) loses the warning,
    // not the run.
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
    said.extend(new.into_iter().cloned());
}

thread_local! {
    /// The team the steps running on this thread split their work over
    /// (set for the duration of a CPU-backend run).
    static CURRENT: std::cell::RefCell<Option<std::sync::Arc<team::Team>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the team of `threads` threads as this thread's current one.
pub(crate) fn with_team<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let t = if std::env::var_os("KILN_NO_TEAM").is_some() {
        None
    } else {
        team::team(threads)
    };
    /// Puts the previous team back, also when `f` unwinds.
    struct Restore(Option<Option<std::sync::Arc<team::Team>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take().flatten();
            CURRENT.with(|c| *c.borrow_mut() = old);
        }
    }
    let _restore = Restore(Some(CURRENT.with(|c| c.replace(t))));
    f()
}

/// A panic's message, for the error that reports it.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
thread_local! {
    /// Tests: the step at which the next run on this thread panics, as a
    /// failing kernel or GEMM library would.
    pub(crate) static FAIL_AT_STEP: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` (packing weights at compile time) with rayon's parallel work
/// on `threads` threads: in a pool of its own when that is not the global
/// pool's size, so that `--threads 1` packs on one core too.
pub(crate) fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    if threads == 0 || threads == rayon::current_num_threads() {
        return f();
    }
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(f),
        // No threads to be had: the global pool does the work.
        Err(_) => f(),
    }
}

/// Runs `f(0) … f(parts - 1)` in parallel: on the current team when there
/// is one, else on the rayon pool.
pub(crate) fn par(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 {
        (0..parts).for_each(f);
        return;
    }
    match CURRENT.with(|c| c.borrow().clone()) {
        Some(t) => t.run(parts, f),
        None => {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(f);
        }
    }
}

use kiln_ir::Graph;

use crate::reference::kernels::StepError;
use crate::reference::{CView, KernelSet, Memory, ReferenceExecutable, ReferenceSession};
use crate::{Backend, Executable, RunError, Session, Weights};

/// The CPU backend; `threads: 0` uses every core.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Threads for every split step and for packing at compile time (0:
    /// all cores).
    pub threads: usize,
}

impl Cpu {
    /// The number of threads this backend runs on.
    pub fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    fn kernels(&self) -> KernelSet {
        KernelSet::Native {
            threads: self.threads(),
        }
    }
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        Ok(Box::new(ReferenceExecutable::with_kernels(
            graph,
            weights,
            self.kernels(),
        )?))
    }

    fn session(
        &self,
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<Box<dyn Session>, RunError> {
        Ok(Box::new(ReferenceSession::with_kernels(
            funcs,
            weights,
            capacity,
            self.kernels(),
        )?))
    }
}

/// Per step of `program`, the end of the group of products that starts
/// there (`i + 1`: none): consecutive gemm steps reading the same `A`. The
/// q/k/v projections and the up/gate pair are such groups, run by
/// [`run_group`] as one parallel job instead of one job each: decode's (one
/// row times several weights, the epilogues after every product in step
/// order) and a prefill's or an encoder's (A packed once, each epilogue
/// fused). `run_group` checks at run time that no epilogue reads memory a
/// member writes out of order (the up projection's SwiGLU epilogue reads
/// the gate's output; an arena slot may be reused), and otherwise leaves
/// the steps to run one by one.
pub(crate) fn product_groups(program: &crate::lower::Program) -> Vec<usize> {
    use crate::lower::Kernel;
    let steps = &program.steps;
    let mut ends: Vec<usize> = (1..=steps.len()).collect();
    let mut i = 0;
    while i < steps.len() {
        let mut j = i;
        while j < steps.len() {
            let Kernel::Gemm { .. } = &steps[j].kernel else {
                break;
            };
            if steps[j].inputs.first() != steps[i].inputs.first() {
                break;
            }
            j += 1;
        }
        if j > i + 1 {
            ends[i] = j;
            i = j;
        } else {
            i += 1;
        }
    }
    ends
}

/// Runs a group of [`product_groups`] when every member is A times a packed
/// weight (`None`: run the steps one by one). `Ok` lists the members
/// whose epilogue the generated code could not run, run instead by the
/// scalar kernels; `Err` names the member that failed.
pub(crate) fn run_group(
    mem: &mut Memory<'_>,
    steps: &[crate::lower::Step],
    caches: &mut [codegen::StepCache],
    views: &[CView],
    cx: &kiln_ir::ShapeCx,
    threads: usize,
) -> Option<Result<Vec<usize>, (usize, StepError)>> {
    kernels::run_group(mem, steps, caches, views, cx, threads)
}

/// Runs one step with the generated and native kernels; `None` when they do
/// not cover its dtypes (the caller runs the scalar kernels and counts it).
pub(crate) fn run_step(
    mem: &mut Memory<'_>,
    kernel: &crate::lower::Kernel,
    cache: &mut codegen::StepCache,
    ins: &[&CView],
    out: &CView,
    cx: &kiln_ir::ShapeCx,
    threads: usize,
) -> Option<Result<(), StepError>> {
    kernels::run(mem, kernel, cache, ins, out, cx, threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_run_is_an_error_and_the_executable_refuses_to_run_again() {
        let src = "func @f(%x: f32[B, 8]) -> (y: f32[B, 4]) {\n  param @w: f32[4, 8]\n  \
                   %h = matmul(%x, @w) transpose_b=true : f32[B, 4]\n  \
                   %y = tanh(%h) : f32[B, 4]\n  return %y\n}\n";
        let graph = kiln_ir::parse_graph(src).expect("parses");
        let mut weights = Weights::new();
        weights.insert(
            "w".into(),
            kiln_ir::Tensor::f32(vec![4, 8], (0..32).map(|i| i as f32 * 0.01).collect()).unwrap(),
        );
        let x = kiln_ir::Tensor::f32(vec![3, 8], vec![0.5; 24]).unwrap();
        let mut exe = Cpu { threads: 2 }
            .compile(&graph, &weights)
            .expect("compiles");
        let want = exe.run(std::slice::from_ref(&x)).expect("runs");
        FAIL_AT_STEP.with(|f| f.set(Some(0)));
        let err = exe.run(std::slice::from_ref(&x)).expect_err("fails");
        FAIL_AT_STEP.with(|f| f.set(None));
        assert_eq!(
            err.to_string(),
            "the cpu backend: a kernel failed: step 0 failed (injected)",
        );
        let again = exe.run(std::slice::from_ref(&x)).expect_err("refused");
        assert!(
            again.to_string().contains("an earlier run failed (step 0 failed (injected)); this executable cannot run again"),
            "{again}"
        );
        // The thread team and the JIT serve the next executable.
        let mut fresh = Cpu { threads: 2 }
            .compile(&graph, &weights)
            .expect("compiles");
        assert_eq!(fresh.run(std::slice::from_ref(&x)).expect("runs"), want);
    }

    #[test]
    fn products_of_one_input_group_and_run_as_the_interpreter_does() {
        // Products of one input group, one with an epilogue reading an
        // earlier member's output among them; a product of another input
        // does not join. Run with one row (decode's group: epilogues after
        // the products) and with several (the fused group, which leaves
        // such an epilogue to the steps run one by one), with an epilogue
        // of a weight only (fused in the group) besides.
        let src = "func @f(%x: f32[B, 1, 8], %y: f32[B, 1, 8]) -> (a: f32[B, 1, 4], b: f32[B, 1, 4], c: f32[B, 1, 4], d: f32[B, 1, 4], e: f32[B, 1, 4]) {\n  \
                   param @w1: f32[4, 8]\n  param @w2: f32[4, 8]\n  param @w3: f32[4, 8]\n  \
                   %a = matmul(%x, @w1) transpose_b=true : f32[B, 1, 4]\n  \
                   %b = matmul(%x, @w2) transpose_b=true : f32[B, 1, 4]\n  \
                   %c0 = matmul(%x, @w3) transpose_b=true : f32[B, 1, 4]\n  \
                   %c = add(%c0, %a) : f32[B, 1, 4]\n  \
                   %d = matmul(%x, @w1) transpose_b=true : f32[B, 1, 4]\n  \
                   %e = matmul(%y, @w2) transpose_b=true : f32[B, 1, 4]\n  \
                   return %a, %b, %c, %d, %e\n}\n";
        let graph = kiln_ir::parse_graph(src).expect("parses");
        let program = crate::lower::lower(&graph).expect("lowers");
        let gemms: Vec<usize> = program
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kernel.kind_name() == "gemm")
            .map(|(i, _)| i)
            .collect();
        let ends = product_groups(&program);
        let first = gemms[0];
        assert_eq!(ends[first], first + 4, "{:?}", program.steps);
        assert_eq!(ends[first + 4], first + 5);

        // Run grouped (one row: packed products on AVX-512 hosts) and
        // compared with the interpreter.
        let mut weights = Weights::new();
        for (i, name) in ["w1", "w2", "w3"].iter().enumerate() {
            let data = (0..32)
                .map(|j| ((j * 7 + i * 5) % 11) as f32 * 0.1 - 0.5)
                .collect();
            weights.insert(
                name.to_string(),
                kiln_ir::Tensor::f32(vec![4, 8], data).unwrap(),
            );
        }
        run_against_the_interpreter(&graph, &weights, 2);
        // A bias epilogue on two members of a group of three (BERT's q/k/v).
        let src = "func @f(%x: f32[B, 1, 8]) -> (a: f32[B, 1, 4], b: f32[B, 1, 4], c: f32[B, 1, 4]) {\n  \
                   param @w1: f32[4, 8]\n  param @w2: f32[4, 8]\n  param @w3: f32[4, 8]\n  param @bias: f32[4]\n  \
                   %a0 = matmul(%x, @w1) transpose_b=true : f32[B, 1, 4]\n  \
                   %a = add(%a0, @bias) : f32[B, 1, 4]\n  \
                   %b = matmul(%x, @w2) transpose_b=true : f32[B, 1, 4]\n  \
                   %c0 = matmul(%x, @w3) transpose_b=true : f32[B, 1, 4]\n  \
                   %c = gelu(%c0) : f32[B, 1, 4]\n  \
                   return %a, %b, %c\n}\n";
        let graph = kiln_ir::parse_graph(src).expect("parses");
        let program = crate::lower::lower(&graph).expect("lowers");
        let first = program
            .steps
            .iter()
            .position(|s| s.kernel.kind_name() == "gemm")
            .unwrap();
        assert_eq!(product_groups(&program)[first], first + 3);
        weights.insert(
            "bias".to_string(),
            kiln_ir::Tensor::f32(vec![4], vec![0.5, -0.25, 1.0, 2.0]).unwrap(),
        );
        run_against_the_interpreter(&graph, &weights, 1);
    }

    /// Runs `graph` (of `operands` inputs `[rows, 1, 8]`) on the CPU backend
    /// and the interpreter with 1 and 40 rows and compares every output.
    fn run_against_the_interpreter(graph: &kiln_ir::Graph, weights: &Weights, operands: usize) {
        for rows in [1usize, 40] {
            let inputs: Vec<kiln_ir::Tensor> = (0..operands)
                .map(|k| {
                    let data = (0..rows * 8)
                        .map(|j| ((j * 13 + k * 3) % 17) as f32 * 0.125 - 1.0)
                        .collect();
                    kiln_ir::Tensor::f32(vec![rows, 1, 8], data).unwrap()
                })
                .collect();
            let want = crate::Interpreter
                .compile(graph, weights)
                .unwrap()
                .run(&inputs)
                .unwrap();
            let mut exe = Cpu { threads: 2 }.compile(graph, weights).unwrap();
            let got = exe.run(&inputs).unwrap();
            assert!(exe.fallback_steps().is_empty());
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (g.as_f32().unwrap(), w.as_f32().unwrap());
                assert_eq!(g.len(), w.len());
                for (a, b) in g.iter().zip(w) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{rows} rows: {g:?} vs {w:?}"
                    );
                }
            }
        }
    }
}

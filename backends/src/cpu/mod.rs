//! The CPU backend: runs the lowered Program with native kernels.
//!
//! It shares the Program machinery of the reference executor (views resolved
//! per binding, the arena the memory plan lays out, caches kept in place by
//! sessions) and replaces its scalar kernels with native ones: matrix products
//! through the `gemm` library (blocked, SIMD, threaded), and f32 loop, row,
//! attention, gather, rope and copy kernels over raw strided memory. A step
//! whose dtypes the native kernels do not cover (integer positions, bool
//! masks, 16-bit weights) runs the scalar kernels; `ReferenceExecutable::
//! scalar_steps` counts them, and the tests assert how many there are.
//!
//! Code generation with Cranelift (fused loop bodies, decode's matrix–vector
//! products) is the next step; these kernels are what it replaces.
//!
//! Safety: every kernel reads and writes through raw pointers into buffers
//! whose extent the Program verifier checked for the current binding (every
//! view inside its root; roots sized by the plan), and only writes outputs,
//! caches and arena slots. Debug builds re-check each address.

pub(crate) mod codegen;
pub mod jit;
mod kernels;
mod matvec;
pub(crate) mod packed;

use kiln_ir::Graph;

use crate::reference::kernels::StepError;
use crate::reference::{CView, KernelSet, Memory, ReferenceExecutable, ReferenceSession};
use crate::{Backend, Executable, RunError, Session, Weights};

/// The CPU backend; `threads: 0` uses every core.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Threads for matrix products (0: all cores).
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

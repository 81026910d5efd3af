//! Not written yet: this file is being implemented (placeholder that changes nothing).

use kiln_ir::Module;

use crate::{Changed, Pass, PassContext, PassError};

/// Placeholder for the `memory-plan` pass.
#[derive(Default)]
pub struct MemoryPlanning;

impl Pass for MemoryPlanning {
    fn name(&self) -> &'static str {
        "memory-plan"
    }

    fn run(&self, _module: &mut Module, _cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        Ok(Changed::No)
    }
}

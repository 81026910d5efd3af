//! Not written yet: this file is being implemented (placeholder that changes nothing).

use kiln_ir::Module;

use crate::{Changed, Pass, PassContext, PassError};

/// Placeholder for the `lora-merge` pass.
pub struct LoraMerge;

impl Pass for LoraMerge {
    fn name(&self) -> &'static str {
        "lora-merge"
    }

    fn run(&self, _module: &mut Module, _cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        Ok(Changed::No)
    }
}

//! Not written yet: this file is being implemented (placeholder that changes nothing).

use kiln_ir::Module;

use crate::{Changed, Pass, PassContext, PassError};

/// Placeholder for the `constant-folding` pass.
pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "constant-folding"
    }

    fn run(&self, _module: &mut Module, _cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        Ok(Changed::No)
    }
}

//! Not written yet: this file is being implemented (placeholder that changes nothing).

use kiln_ir::Module;

use crate::{Changed, Pass, PassContext, PassError};

/// Placeholder for the `elementwise-fusion` pass.
pub struct ElementwiseFusion;

impl Pass for ElementwiseFusion {
    fn name(&self) -> &'static str {
        "elementwise-fusion"
    }

    fn run(&self, _module: &mut Module, _cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        Ok(Changed::No)
    }
}

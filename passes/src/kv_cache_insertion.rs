//! Not written yet: this file is being implemented (placeholder that changes nothing).

use kiln_ir::Module;

use crate::{Changed, Pass, PassContext, PassError};

/// Placeholder for the `kv-cache` pass.
pub struct KvCacheInsertion;

impl Pass for KvCacheInsertion {
    fn name(&self) -> &'static str {
        "kv-cache"
    }

    fn run(&self, _module: &mut Module, _cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        Ok(Changed::No)
    }
}

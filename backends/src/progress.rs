//! Progress of long compile work (packing weights, generating code),
//! reported to a hook the command line installs; nothing happens without one.

use std::sync::{Mutex, OnceLock};

/// Receives `(phase, done, total)` as work advances.
pub type Hook = Box<dyn Fn(&str, u64, u64) + Send + Sync>;

static HOOK: OnceLock<Mutex<Option<Hook>>> = OnceLock::new();

/// Installs `hook` for the process (replacing any earlier one).
pub fn set_hook(hook: Hook) {
    let cell = HOOK.get_or_init(|| Mutex::new(None));
    *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
}

/// Reports progress of `phase` to the hook, if any.
pub(crate) fn report(phase: &str, done: u64, total: u64) {
    if let Some(cell) = HOOK.get() {
        if let Some(h) = cell.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h(phase, done, total);
        }
    }
}

//! Progress bars on a terminal (indicatif): loading a model, and the
//! backend's compile work (packing weights, generating code). Quiet when
//! stderr is not a terminal, so logs and pipes get no control characters.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};

/// Whether bars are drawn.
fn on() -> bool {
    std::io::stderr().is_terminal()
}

/// Installs the backend hook: one bar per phase, cleared when it completes.
pub fn install() {
    if !on() {
        return;
    }
    let current: Arc<Mutex<Option<(String, ProgressBar)>>> = Arc::new(Mutex::new(None));
    kiln::backends::progress::set_hook(Box::new(move |phase, done, total| {
        let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = !matches!(&*cur, Some((p, _)) if p == phase);
        if fresh {
            if let Some((_, bar)) = cur.take() {
                bar.finish_and_clear();
            }
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(phase.to_string());
            *cur = Some((phase.to_string(), bar));
        }
        if let Some((_, bar)) = cur.as_ref() {
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
        }
    }));
}

/// A spinner for work without a count (reading a model folder), cleared
/// when dropped.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    /// Starts a spinner saying `what`.
    pub fn start(what: &str) -> Spinner {
        if !on() {
            return Spinner(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_message(what.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        Spinner(Some(bar))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

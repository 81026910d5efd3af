//! Where run time goes, step by step: with `KILN_PROFILE=1` in the
//! environment, the Program executors time every step and add it to a
//! process-wide table keyed by what the step is (its kernel kind, the
//! generated loop's operations or the row operation, and the output's
//! shape); [`report`] renders the table, slowest first. Off, the cost is
//! one relaxed load per step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::lower::Kernel;

/// 0: not yet read from the environment; 1: off; 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// `(calls, total time)` per step description.
static TABLE: Mutex<Option<HashMap<String, (u64, Duration)>>> = Mutex::new(None);

/// Whether steps are being timed (`KILN_PROFILE` set and not `0`).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os("KILN_PROFILE").is_some_and(|v| v != "0" && !v.is_empty());
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// What a step is, for the table: `gemm+epilogue [128, 768] k 3072`,
/// `loop add,gelu [8, 128, 3072]`, `row LayerNorm [1024, 768]`. A
/// product's inner size (`inner`) tells apart products of the same output
/// shape (BERT's attention output and FFN down projections).
pub(crate) fn describe(kernel: &Kernel, out_shape: &[usize], inner: Option<usize>) -> String {
    let what = match kernel {
        Kernel::Gemm { epilogue } if !epilogue.is_empty() => "gemm+epilogue".to_string(),
        Kernel::Loop { body } => {
            let ops: Vec<String> = body
                .iter()
                .filter_map(|op| {
                    let s = format!("{op:?}");
                    let name = s.split(['(', ' ', '{']).next()?.to_string();
                    let inner = s.split_once('(')?.1.split([',', ')']).next()?.to_string();
                    Some(if name == "Unary" || name == "Binary" {
                        inner.to_lowercase()
                    } else {
                        name.to_lowercase()
                    })
                })
                .collect();
            format!("loop {}", ops.join(","))
        }
        Kernel::Row(op) => {
            let s = format!("{op:?}");
            format!("row {}", s.split([' ', '(', '{']).next().unwrap_or(""))
        }
        k => k.kind_name().to_string(),
    };
    match (kernel, inner) {
        (Kernel::Gemm { .. }, Some(k)) => format!("{what} {out_shape:?} k {k}"),
        _ => format!("{what} {out_shape:?}"),
    }
}

/// Adds one step's time.
pub(crate) fn record(what: String, took: Duration) {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let e = t.get_or_insert_with(HashMap::new).entry(what).or_default();
    e.0 += 1;
    e.1 += took;
}

/// The table so far, slowest kind first, with each kind's share of the
/// total (`None` when nothing was timed).
pub fn report() -> Option<String> {
    let t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let t = t.as_ref().filter(|t| !t.is_empty())?;
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let total: Duration = rows.iter().map(|r| r.1 .1).sum();
    let mut out = format!(
        "step time by kind (KILN_PROFILE): {:.3} s in all\n{:>9} {:>8} {:>7} {:>9}  step\n",
        total.as_secs_f64(),
        "ms",
        "share",
        "calls",
        "us/call"
    );
    for (what, (calls, took)) in rows {
        out += &format!(
            "{:>9.2} {:>7.1}% {:>7} {:>9.1}  {what}\n",
            took.as_secs_f64() * 1e3,
            100.0 * took.as_secs_f64() / total.as_secs_f64().max(1e-12),
            calls,
            took.as_secs_f64() * 1e6 / *calls as f64
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::Kernel;

    #[test]
    fn descriptions_name_the_work() {
        assert_eq!(
            describe(&Kernel::Gemm { epilogue: vec![] }, &[128, 768], Some(3072)),
            "gemm [128, 768] k 3072"
        );
        assert_eq!(
            describe(&Kernel::Gemm { epilogue: vec![] }, &[128, 768], None),
            "gemm [128, 768]"
        );
        assert_eq!(
            describe(&Kernel::Gather, &[1, 16, 768], Some(5)),
            "gather [1, 16, 768]"
        );
    }
}

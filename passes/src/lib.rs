//! kiln-passes: graph-to-graph rewrites and the pass manager that runs them.
//!
//! Every pass implements [`Pass`]; the [`PassManager`] runs a list of passes,
//! verifies the graph after each one (so a pass that breaks a shape contract is
//! caught at the pass that did it) and records what each pass changed.

use kiln_ir::{print_graph, verify, Graph, VerifyErrors};

/// Whether a pass changed the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Changed {
    /// The graph is unchanged.
    No,
    /// The graph was rewritten.
    Yes,
}

/// What can go wrong while running passes.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The graph broke a contract after the named pass ran.
    #[error("after pass `{pass}`:\n{errors}")]
    Verify {
        /// The pass that ran last.
        pass: &'static str,
        /// What the verifier found.
        errors: VerifyErrors,
    },
    /// A pass could not do its job on this graph.
    #[error("pass `{pass}`: {message}")]
    Failed {
        /// The pass.
        pass: &'static str,
        /// Why.
        message: String,
    },
}

/// State shared by the passes of one pipeline run.
#[derive(Debug, Default)]
pub struct PassContext {
    /// One line per pass run: its name and whether it changed the graph.
    pub log: Vec<(&'static str, Changed)>,
    /// Printed IR after each pass, when requested.
    pub dumps: Vec<(&'static str, String)>,
}

/// A graph-to-graph rewrite.
pub trait Pass {
    /// The name used by `--passes` and `--print-after`.
    fn name(&self) -> &'static str;
    /// Rewrites `graph` in place.
    fn run(&self, graph: &mut Graph, cx: &mut PassContext) -> Result<Changed, PassError>;
}

/// The shape-contract check as a pass: changes nothing, fails on a violation.
pub struct ShapeCheck;

impl Pass for ShapeCheck {
    fn name(&self) -> &'static str {
        "shape-check"
    }

    fn run(&self, graph: &mut Graph, _cx: &mut PassContext) -> Result<Changed, PassError> {
        verify(graph).map_err(|errors| PassError::Verify {
            pass: self.name(),
            errors,
        })?;
        Ok(Changed::No)
    }
}

/// Runs passes in order, verifying after each.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    print_after: Vec<String>,
}

impl PassManager {
    /// A manager running `passes` in order.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            passes,
            print_after: Vec::new(),
        }
    }

    /// Records the printed IR after each pass named here (`all` for every pass).
    pub fn print_after(mut self, names: &[&str]) -> PassManager {
        self.print_after = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Runs every pass on `graph`.
    pub fn run(&self, graph: &mut Graph) -> Result<PassContext, PassError> {
        let mut cx = PassContext::default();
        for pass in &self.passes {
            let changed = pass.run(graph, &mut cx)?;
            verify(graph).map_err(|errors| PassError::Verify {
                pass: pass.name(),
                errors,
            })?;
            cx.log.push((pass.name(), changed));
            if self
                .print_after
                .iter()
                .any(|p| p == "all" || p == pass.name())
            {
                cx.dumps.push((pass.name(), print_graph(graph)));
            }
        }
        Ok(cx)
    }
}

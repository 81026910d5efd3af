//! Dead-code elimination.
//!
//! Matches: op nodes whose value reaches no output (transitively unused), and
//! parameters no op uses. Produces: the same module without them. Guarantees:
//! outputs and inputs are untouched (inputs are part of the signature even when
//! unused); every remaining node still verifies.

use kiln_ir::{Graph, Module, NodeKind};

use crate::{Changed, Pass, PassContext, PassError};

/// Removes nodes whose values are never used.
pub struct Dce;

/// Removes dead op nodes and unused parameters of one graph; returns how many.
pub fn eliminate_dead_code(graph: &mut Graph) -> usize {
    let mut removed = 0;
    loop {
        let dead: Vec<_> = graph
            .node_ids()
            .into_iter()
            .filter(|&v| !matches!(graph.node(v).kind, NodeKind::Input { .. }) && graph.is_dead(v))
            .collect();
        if dead.is_empty() {
            return removed;
        }
        for v in dead {
            graph.remove_node(v);
            removed += 1;
        }
    }
}

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        let mut total = 0;
        for g in &mut module.funcs {
            total += eliminate_dead_code(g);
        }
        if total > 0 {
            cx.note(format!("removed {total} dead nodes"));
        }
        Ok(Changed::from_bool(total > 0))
    }
}

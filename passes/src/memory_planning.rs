//! Memory planning: liveness of intermediate tensors → offsets in one arena.
//!
//! Matches: every op value of a function. Produces: a [`MemoryPlan`] (through
//! [`plan_memory`]) that places each *intermediate* — an op value that is not a
//! function output — at a 64-byte-aligned offset of one arena, reusing the
//! memory of buffers that are dead. The pass itself ([`MemoryPlanning`])
//! changes nothing: it notes each function's plan summary when every dim is a
//! compile-time constant, and otherwise that the plan needs run-time sizes
//! (`kiln ir --stats --bind B=1,T=128`).
//!
//! Model:
//! - Inputs and parameters are owned by the caller and are not in the arena.
//!   Outputs are not either: they are handed back to the caller and outlive
//!   the run, so a backend writes them into their own allocations.
//! - Every op value gets its own buffer of `numel × dtype size` bytes (views
//!   such as `reshape` are not aliased: the plan is conservative).
//! - Steps number the op nodes in the graph's deterministic topological order.
//!   A buffer is live from its defining step to the last step that reads it,
//!   both inclusive (a value nobody reads is live at its own step only), so an
//!   op's result never shares memory with its own operands.
//! - Placement is greedy: buffers by decreasing size (ties by definition step),
//!   each at the lowest aligned offset that overlaps no already placed buffer
//!   whose lifetime overlaps its own (first fit).
//!
//! Guarantees: [`MemoryPlan::validate`] holds — two buffers live at the same
//! step never overlap in memory, offsets are aligned, every buffer lies inside
//! the arena; the arena is never larger than the sum of the intermediates
//! rounded up to the alignment.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_ir::{Dim, Graph, Module, Namer, NodeKind, ShapeCx, ValueId};

use crate::{Changed, Pass, PassContext, PassError};

/// Offsets in the arena are multiples of this many bytes.
pub const ALIGNMENT: u64 = 64;

/// How many of the largest buffers [`MemoryPlan::report`] lists.
const REPORT_LARGEST: usize = 8;

/// Plans the arena of each function and notes its size; changes nothing.
#[derive(Default)]
pub struct MemoryPlanning;

/// Where the intermediates of one function live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// One buffer per intermediate value, in topological order.
    pub buffers: Vec<Buffer>,
    /// Size of the arena: the end of the highest buffer (the peak).
    pub arena_bytes: u64,
    /// Sum of the sizes of all intermediates (what no reuse would need).
    pub total_bytes: u64,
}

/// One intermediate tensor and its place in the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// The value stored.
    pub value: ValueId,
    /// The value's printed name (`%h0.fc`, `%3`).
    pub name: String,
    /// Size in bytes: element count × dtype size.
    pub bytes: u64,
    /// Byte offset in the arena (a multiple of [`ALIGNMENT`]).
    pub offset: u64,
    /// The step that defines the value.
    pub first_use: usize,
    /// The last step that reads it (`first_use` when nothing does).
    pub last_use: usize,
}

impl Buffer {
    fn lives_with(&self, other: &Buffer) -> bool {
        self.first_use <= other.last_use && other.first_use <= self.last_use
    }

    fn end(&self) -> u64 {
        self.offset + self.bytes
    }
}

fn failed(message: String) -> PassError {
    PassError::Failed {
        pass: "memory-plan",
        message,
    }
}

/// Plans the arena of `graph` with the run-time symbols bound by `bind`
/// (`[("B", 1), ("T", 128)]`). Symbols the graph does not use are ignored; a
/// symbol the graph needs but nobody binds is an error naming it.
pub fn plan_memory(graph: &Graph, bind: &[(String, i64)]) -> Result<MemoryPlan, PassError> {
    let cx = bind_symbols(graph, bind)?;
    let order = graph
        .topo_order()
        .map_err(|_| failed(format!("function @{} has a cycle", graph.name)))?;
    let namer = Namer::new(graph);
    let steps: Vec<ValueId> = order
        .into_iter()
        .filter(|v| matches!(graph.node(*v).kind, NodeKind::Op { .. }))
        .collect();
    let step_of: HashMap<ValueId, usize> = steps.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    let outputs: BTreeSet<ValueId> = graph.outputs().iter().map(|(_, v)| *v).collect();

    let mut unbound: BTreeSet<String> = BTreeSet::new();
    let mut buffers = Vec::new();
    for (step, &v) in steps.iter().enumerate() {
        if outputs.contains(&v) {
            continue;
        }
        let ty = graph.ty(v);
        let mut numel: u64 = 1;
        let mut known = true;
        for d in &ty.shape {
            let e = cx
                .eval(d)
                .map_err(|e| failed(format!("size of {}: {e}", namer.name(v))))?;
            match e.as_const() {
                Some(n) if n >= 0 => {
                    numel = numel.checked_mul(n as u64).ok_or_else(|| {
                        failed(format!("size of {} ({ty}) overflows", namer.name(v)))
                    })?;
                }
                Some(n) => {
                    return Err(failed(format!(
                        "size of {} ({ty}) has a negative dim {n}",
                        namer.name(v)
                    )))
                }
                None => {
                    known = false;
                    unbound.extend(e.symbols());
                }
            }
        }
        if !known {
            continue;
        }
        let bytes = numel
            .checked_mul(ty.dtype.size_bytes() as u64)
            .ok_or_else(|| failed(format!("size of {} ({ty}) overflows", namer.name(v))))?;
        let last_use = graph
            .users(v)
            .iter()
            .filter_map(|u| step_of.get(u).copied())
            .max()
            .unwrap_or(step)
            .max(step);
        buffers.push(Buffer {
            value: v,
            name: namer.name(v).to_string(),
            bytes,
            offset: 0,
            first_use: step,
            last_use,
        });
    }
    if !unbound.is_empty() {
        let list: Vec<String> = unbound.iter().map(|s| format!("`{s}`")).collect();
        let example: Vec<String> = unbound.iter().map(|s| format!("{s}=<int>")).collect();
        return Err(failed(format!(
            "function @{}: sizes depend on unbound symbol{} {}; bind {} (e.g. --bind {})",
            graph.name,
            if unbound.len() > 1 { "s" } else { "" },
            list.join(", "),
            if unbound.len() > 1 { "them" } else { "it" },
            example.join(",")
        )));
    }
    let total_bytes = buffers
        .iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.bytes))
        .ok_or_else(|| failed(format!("function @{}: total size overflows", graph.name)))?;
    let arena_bytes = assign_offsets(&mut buffers)?;
    Ok(MemoryPlan {
        buffers,
        arena_bytes,
        total_bytes,
    })
}

/// A shape context with `bind` and then the graph's own bindings; a `bind`
/// entry that contradicts a compile-time binding is an error.
fn bind_symbols(graph: &Graph, bind: &[(String, i64)]) -> Result<ShapeCx, PassError> {
    let mut cx = ShapeCx::new();
    let mut given: BTreeMap<&str, i64> = BTreeMap::new();
    for (name, value) in bind {
        if *value < 0 {
            return Err(failed(format!(
                "--bind {name}={value}: sizes cannot be negative"
            )));
        }
        if let Some(old) = given.insert(name, *value) {
            if old != *value {
                return Err(failed(format!(
                    "symbol `{name}` is bound twice ({old} and {value})"
                )));
            }
        }
        cx.bind(name, &Dim::constant(*value))
            .map_err(|e| failed(format!("--bind {name}={value}: {e}")))?;
    }
    for (name, dim) in graph.bindings() {
        let v = cx.bind(name, dim).map_err(|e| {
            failed(format!(
                "function @{}: binding {name} = {dim}: {e}",
                graph.name
            ))
        })?;
        if let (Some(user), Some(c)) = (given.get(name.as_str()), v.as_const()) {
            if *user != c {
                return Err(failed(format!(
                    "function @{} binds {name} = {dim} = {c}, but --bind gives {name}={user}",
                    graph.name
                )));
            }
        }
    }
    Ok(cx)
}

/// Greedy first fit by decreasing size; returns the arena size.
fn assign_offsets(buffers: &mut [Buffer]) -> Result<u64, PassError> {
    let mut by_size: Vec<usize> = (0..buffers.len()).collect();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes), buffers[i].first_use));
    let mut placed: Vec<usize> = Vec::new();
    let mut arena = 0u64;
    for i in by_size {
        let b = &buffers[i];
        // Intervals taken by placed buffers that are live at the same time.
        let mut taken: Vec<(u64, u64)> = placed
            .iter()
            .map(|&j| &buffers[j])
            .filter(|o| o.bytes > 0 && o.lives_with(b))
            .map(|o| (o.offset, o.end()))
            .collect();
        taken.sort_unstable();
        let mut offset = 0u64;
        if b.bytes > 0 {
            for (start, end) in taken {
                if offset.checked_add(b.bytes).is_some_and(|e| e <= start) {
                    break;
                }
                offset = offset.max(align_up(end)?);
            }
        }
        let end = offset
            .checked_add(b.bytes)
            .ok_or_else(|| failed("arena size overflows".into()))?;
        arena = arena.max(end);
        buffers[i].offset = offset;
        placed.push(i);
    }
    Ok(arena)
}

fn align_up(x: u64) -> Result<u64, PassError> {
    x.checked_add(ALIGNMENT - 1)
        .map(|y| y / ALIGNMENT * ALIGNMENT)
        .ok_or_else(|| failed("arena size overflows".into()))
}

impl MemoryPlan {
    /// Checks the plan: aligned offsets, buffers inside the arena, sane
    /// lifetimes, the total, and no two buffers live at the same step sharing
    /// a byte. The message names the first two buffers that collide.
    pub fn validate(&self) -> Result<(), String> {
        let mut total = 0u64;
        for b in &self.buffers {
            if b.offset % ALIGNMENT != 0 {
                return Err(format!(
                    "{} is at offset {}, not a multiple of {ALIGNMENT}",
                    b.name, b.offset
                ));
            }
            if b.first_use > b.last_use {
                return Err(format!(
                    "{} dies (step {}) before it is defined (step {})",
                    b.name, b.last_use, b.first_use
                ));
            }
            let end = b
                .offset
                .checked_add(b.bytes)
                .ok_or_else(|| format!("{} ends past u64", b.name))?;
            if end > self.arena_bytes {
                return Err(format!(
                    "{} ends at byte {end}, past the arena ({} bytes)",
                    b.name, self.arena_bytes
                ));
            }
            total = total
                .checked_add(b.bytes)
                .ok_or_else(|| "the total overflows".to_string())?;
        }
        if total != self.total_bytes {
            return Err(format!(
                "total_bytes is {} but the buffers add up to {total}",
                self.total_bytes
            ));
        }
        for (i, a) in self.buffers.iter().enumerate() {
            for b in &self.buffers[i + 1..] {
                let in_time = a.lives_with(b);
                let in_memory =
                    a.bytes > 0 && b.bytes > 0 && a.offset < b.end() && b.offset < a.end();
                if in_time && in_memory {
                    return Err(format!(
                        "{} (bytes {}..{}, steps {}..={}) and {} (bytes {}..{}, steps {}..={}) are live together and overlap",
                        a.name,
                        a.offset,
                        a.end(),
                        a.first_use,
                        a.last_use,
                        b.name,
                        b.offset,
                        b.end(),
                        b.first_use,
                        b.last_use
                    ));
                }
            }
        }
        Ok(())
    }

    /// The most bytes live at one step: a lower bound for any arena.
    pub fn max_live_bytes(&self) -> u64 {
        let steps = self
            .buffers
            .iter()
            .map(|b| b.last_use + 1)
            .max()
            .unwrap_or(0);
        let mut delta = vec![0i128; steps + 1];
        for b in &self.buffers {
            delta[b.first_use] += b.bytes as i128;
            delta[b.last_use + 1] -= b.bytes as i128;
        }
        let (mut live, mut peak) = (0i128, 0i128);
        for d in delta {
            live += d;
            peak = peak.max(live);
        }
        peak as u64
    }

    /// A one-line summary: arena, sum of intermediates, buffer count.
    pub fn summary(&self) -> String {
        let n = self.buffers.len();
        format!(
            "arena {} for {} of intermediates ({n} buffer{})",
            human_bytes(self.arena_bytes),
            human_bytes(self.total_bytes),
            if n == 1 { "" } else { "s" }
        )
    }

    /// A readable report: peak arena bytes against the sum of all
    /// intermediates, their ratio, the buffer count and the largest buffers.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let ratio = if self.total_bytes == 0 {
            1.0
        } else {
            self.arena_bytes as f64 / self.total_bytes as f64
        };
        s.push_str(&format!("intermediate buffers: {}\n", self.buffers.len()));
        s.push_str(&format!(
            "peak arena:           {} ({} bytes)\n",
            human_bytes(self.arena_bytes),
            self.arena_bytes
        ));
        s.push_str(&format!(
            "sum of intermediates: {} ({} bytes)\n",
            human_bytes(self.total_bytes),
            self.total_bytes
        ));
        s.push_str(&format!(
            "max live at one step: {} ({} bytes)\n",
            human_bytes(self.max_live_bytes()),
            self.max_live_bytes()
        ));
        s.push_str(&format!(
            "arena / sum:          {:.3} ({:.1}x less memory than one buffer each)\n",
            ratio,
            if ratio > 0.0 { 1.0 / ratio } else { 1.0 }
        ));
        let mut largest: Vec<&Buffer> = self.buffers.iter().collect();
        largest.sort_by_key(|b| (std::cmp::Reverse(b.bytes), b.first_use));
        largest.truncate(REPORT_LARGEST);
        if !largest.is_empty() {
            s.push_str("largest buffers:\n");
            let width = largest.iter().map(|b| b.name.len()).max().unwrap_or(0);
            for b in largest {
                s.push_str(&format!(
                    "  {:<width$}  {:>10}  offset {:>10}  steps {}..={}\n",
                    b.name,
                    human_bytes(b.bytes),
                    b.offset,
                    b.first_use,
                    b.last_use
                ));
            }
        }
        s
    }
}

/// `1.5 MiB`, `12 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.2} {}", UNITS[unit])
}

impl Pass for MemoryPlanning {
    fn name(&self) -> &'static str {
        "memory-plan"
    }

    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError> {
        for g in &module.funcs {
            let runtime = kiln_ir::verify::runtime_symbols(g);
            if runtime.is_empty() {
                let plan = plan_memory(g, &[])?;
                cx.note(format!("@{}: {}", g.name, plan.summary()));
            } else {
                let syms: Vec<String> = runtime.into_iter().collect();
                cx.note(format!(
                    "@{}: sizes depend on {}; plan with `kiln ir --stats --bind {}`",
                    g.name,
                    syms.join(", "),
                    syms.iter()
                        .map(|s| format!("{s}=…"))
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        }
        Ok(Changed::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::parse_graph;

    const CHAIN: &str = "func @f(%x: f32[B, 16]) -> (y: f32[B, 16]) {
  %a = exp(%x) : f32[B, 16]
  %b = neg(%a) : f32[B, 16]
  %c = tanh(%b) : f32[B, 16]
  %d = abs(%c) : f32[B, 16]
  %y = add(%d, %a) : f32[B, 16]
  return %y
}";

    fn bind(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn chain_reuses_dead_buffers() {
        let g = parse_graph(CHAIN).unwrap();
        let plan = plan_memory(&g, &bind(&[("B", 2)])).unwrap();
        plan.validate().unwrap();
        // a, b, c, d: 128 bytes each; the output y is not in the arena.
        assert_eq!(plan.buffers.len(), 4);
        assert_eq!(plan.total_bytes, 4 * 128);
        // a lives to the end; b and d can share, c needs a third slot.
        assert_eq!(plan.arena_bytes, 3 * 128);
        assert_eq!(plan.max_live_bytes(), 3 * 128);
        let a = &plan.buffers[0];
        assert_eq!((a.name.as_str(), a.first_use, a.last_use), ("%a", 0, 4));
    }

    #[test]
    fn unbound_symbols_are_named() {
        let g = parse_graph(CHAIN).unwrap();
        let err = plan_memory(&g, &[]).unwrap_err().to_string();
        assert!(err.contains("unbound symbol `B`"), "{err}");
        assert!(err.contains("--bind B=<int>"), "{err}");
    }

    #[test]
    fn contradicting_a_compile_time_binding_is_an_error() {
        let g = parse_graph(
            "func @f(%x: f32[d]) -> (y: f32[d]) where d = 4 {
  %a = exp(%x) : f32[d]
  %y = neg(%a) : f32[d]
  return %y
}",
        )
        .unwrap();
        assert!(plan_memory(&g, &bind(&[("d", 5)])).is_err());
        let plan = plan_memory(&g, &bind(&[("d", 4)])).unwrap();
        assert_eq!(plan.total_bytes, 16);
    }

    #[test]
    fn validate_catches_overlap_misalignment_and_bad_totals() {
        let g = parse_graph(CHAIN).unwrap();
        let good = plan_memory(&g, &bind(&[("B", 2)])).unwrap();
        let mut overlap = good.clone();
        // a (live throughout) and b share bytes.
        overlap.buffers[1].offset = overlap.buffers[0].offset;
        let err = overlap.validate().unwrap_err();
        assert!(err.contains("%a") && err.contains("%b"), "{err}");
        let mut misaligned = good.clone();
        misaligned.buffers[0].offset += 4;
        assert!(misaligned
            .validate()
            .unwrap_err()
            .contains("multiple of 64"));
        let mut outside = good.clone();
        outside.arena_bytes = 64;
        assert!(outside.validate().unwrap_err().contains("past the arena"));
        let mut total = good;
        total.total_bytes += 1;
        assert!(total.validate().unwrap_err().contains("add up to"));
    }

    #[test]
    fn the_pass_notes_the_plan_or_asks_for_bindings() {
        let fixed = parse_graph(
            "func @fixed(%x: f32[2, 16]) -> (y: f32[2, 16]) {
  %a = exp(%x) : f32[2, 16]
  %y = neg(%a) : f32[2, 16]
  return %y
}",
        )
        .unwrap();
        let symbolic = parse_graph(CHAIN).unwrap();
        let mut module = Module {
            funcs: vec![fixed, symbolic],
        };
        let before = module.clone();
        let mut cx = PassContext::new(None);
        let changed = MemoryPlanning.run(&mut module, &mut cx).unwrap();
        assert_eq!(changed, Changed::No);
        assert_eq!(module, before);
        assert_eq!(
            cx.notes,
            vec![
                "@fixed: arena 128 B for 128 B of intermediates (1 buffer)".to_string(),
                "@f: sizes depend on B; plan with `kiln ir --stats --bind B=…`".to_string(),
            ]
        );
    }

    #[test]
    fn report_lists_peak_sum_and_largest() {
        let g = parse_graph(CHAIN).unwrap();
        let report = plan_memory(&g, &bind(&[("B", 2)])).unwrap().report();
        assert!(
            report.contains("peak arena:           384 B (384 bytes)"),
            "{report}"
        );
        assert!(
            report.contains("sum of intermediates: 512 B (512 bytes)"),
            "{report}"
        );
        assert!(report.contains("intermediate buffers: 4"), "{report}");
        assert!(report.contains("largest buffers:\n  %a"), "{report}");
    }
}

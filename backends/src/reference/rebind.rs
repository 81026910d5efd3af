//! A new binding derived from the previous one: a decode step binds a new
//! cache length on every call, and resolving every view, placing the arena
//! and verifying the Program again costs milliseconds per token. What each
//! buffer's resolution reads is known from the Program: the symbols of its
//! shape, strides and offset, and of the size of the root it views. A
//! binding that differs from the last one in a few symbols re-resolves and
//! re-verifies only the buffers that read them, and keeps the arena plan
//! when no temporary's size reads them. Anything unusual (a symbol that
//! does not evaluate, a view outside its root, a plan that changes) leaves
//! the binding to the full path, which reports it.

use kiln_ir::{Dim, ShapeCx};

use crate::lower::{BufferId, BufferKind, Layout, Program};

/// The symbols each buffer's resolution reads, as bits over `symbols`.
#[derive(Debug)]
pub(crate) struct Rebind {
    pub(super) symbols: Vec<String>,
    /// Per buffer: its view (shape, strides, offset) and its root's size.
    deps: Vec<u64>,
    /// Every temporary's size: what the arena plan reads.
    plan: u64,
    /// Each buffer's layout (formed once: contiguous strides are products
    /// of dims).
    layouts: Vec<Layout>,
}

impl Rebind {
    /// The dependences of `p`'s buffers (`None` when the Program reads more
    /// symbols than a mask holds, or a layout cannot be formed: every
    /// binding then takes the full path).
    pub(crate) fn new(p: &Program) -> Option<Rebind> {
        let mut symbols: Vec<String> = Vec::new();
        let mut own: Vec<Vec<String>> = Vec::with_capacity(p.buffers.len());
        let mut layouts = Vec::with_capacity(p.buffers.len());
        for i in 0..p.buffers.len() {
            let layout = p.layout(BufferId(i as u32)).ok()?;
            let mut names = Vec::new();
            let dims = layout
                .shape
                .iter()
                .chain(&layout.strides)
                .chain(std::iter::once(&layout.offset))
                .chain(&p.buffers[i].shape);
            for d in dims {
                names.extend(d.symbols());
            }
            names.sort();
            names.dedup();
            for n in &names {
                if !symbols.contains(n) {
                    symbols.push(n.clone());
                }
            }
            own.push(names);
            layouts.push(layout);
        }
        if symbols.len() > 64 {
            return None;
        }
        let bits = |names: &[String]| {
            names.iter().fold(0u64, |m, n| {
                m | symbols.iter().position(|s| s == n).map_or(0, |k| 1 << k)
            })
        };
        let own: Vec<u64> = own.iter().map(|n| bits(n)).collect();
        let mut deps = own.clone();
        let mut plan = 0;
        for (i, b) in p.buffers.iter().enumerate() {
            if let BufferKind::View { base, .. } = b.kind {
                deps[i] |= own.get(base.index()).copied()?;
            }
            if b.kind == BufferKind::Temp {
                plan |= own[i];
            }
        }
        Some(Rebind {
            symbols,
            deps,
            plan,
            layouts,
        })
    }

    /// The value of every symbol under `cx` (`None`: unbound or not a number).
    pub(crate) fn values(&self, cx: &ShapeCx) -> Vec<Option<i64>> {
        self.symbols
            .iter()
            .map(|s| cx.value(&Dim::sym(s)))
            .collect()
    }

    /// The symbols whose values differ, as bits (`None` when a value is
    /// missing on either side).
    pub(crate) fn changed(&self, old: &[Option<i64>], new: &[Option<i64>]) -> Option<u64> {
        if old.len() != self.symbols.len() || new.len() != self.symbols.len() {
            return None;
        }
        let mut m = 0u64;
        for (k, (a, b)) in old.iter().zip(new).enumerate() {
            if a.is_none() || b.is_none() {
                return None;
            }
            if a != b {
                m |= 1 << k;
            }
        }
        Some(m)
    }

    /// Buffer `i`'s layout.
    pub(crate) fn layout(&self, i: usize) -> Option<&Layout> {
        self.layouts.get(i)
    }

    /// Whether buffer `i`'s resolution reads a symbol of `changed`.
    pub(crate) fn reads(&self, i: usize, changed: u64) -> bool {
        self.deps.get(i).is_none_or(|&d| d & changed != 0)
    }

    /// Whether the arena plan reads a symbol of `changed`.
    pub(crate) fn moves_plan(&self, changed: u64) -> bool {
        self.plan & changed != 0
    }
}

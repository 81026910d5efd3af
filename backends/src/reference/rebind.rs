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

use kiln_ir::dim::IndexedDim;
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
    /// Each layout's shape, strides and offset over indices into `symbols`
    /// (a derived view is evaluated without looking symbols up by name).
    indexed: Vec<IndexedLayout>,
}

/// A layout's dims as [`IndexedDim`]s.
#[derive(Debug)]
struct IndexedLayout {
    shape: Vec<IndexedDim>,
    strides: Vec<IndexedDim>,
    offset: IndexedDim,
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
        let index = |n: &str| symbols.iter().position(|s| s == n);
        let all = |ds: &[Dim]| {
            ds.iter()
                .map(|d| d.indexed(&index))
                .collect::<Option<Vec<_>>>()
        };
        let indexed = layouts
            .iter()
            .map(|l| {
                Some(IndexedLayout {
                    shape: all(&l.shape)?,
                    strides: all(&l.strides)?,
                    offset: l.offset.indexed(&index)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
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
            indexed,
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

    /// Buffer `i`'s shape, strides and offset under the symbol values
    /// `values` ([`Rebind::values`]); `None` when one does not evaluate to
    /// a size (the full path then reports it).
    pub(crate) fn resolve(
        &self,
        i: usize,
        values: &[Option<i64>],
    ) -> Option<(Vec<usize>, Vec<usize>, usize)> {
        let l = self.indexed.get(i)?;
        let one = |d: &IndexedDim| match d.eval(values) {
            Ok(Some(v)) => usize::try_from(v).ok(),
            _ => None,
        };
        let all = |ds: &[IndexedDim]| ds.iter().map(one).collect::<Option<Vec<_>>>();
        Some((all(&l.shape)?, all(&l.strides)?, one(&l.offset)?))
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

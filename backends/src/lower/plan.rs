//! The memory plan: liveness of the arena temporaries over a Program's steps,
//! in-place writes, and their placement in one arena per binding of the
//! run-time symbols.
//!
//! - Inputs, parameters and outputs are not in the arena (the caller owns the
//!   first two; outputs outlive the run).
//! - A temporary lives from the first step that writes it (or a view of it) to
//!   the last step that reads or writes it (or a view of it), both inclusive,
//!   so a step's result never shares memory with its operands...
//! - ...except in place: a `loop` step whose operand is a whole temporary of
//!   the result's byte size, read element for element, dying at this step and
//!   read by no other operand of the step, writes its result over it. The two
//!   share a *slot*. Each element is read before it is written, so this is safe
//!   for every loop body.
//! - Placement (per binding, since sizes are symbolic): slots by decreasing
//!   size (ties by first step), each at the lowest 64-byte-aligned offset that
//!   overlaps no placed slot whose lifetime meets its own (first fit).

use kiln_ir::ShapeCx;

use super::{BufferId, BufferKind, Kernel, Program};
use crate::RunError;

/// Offsets in the arena are multiples of this many bytes.
pub const ALIGNMENT: u64 = 64;

/// Temporaries sharing one piece of the arena, and when it is in use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// The temporaries, in the order they are written; each after the first
    /// is written in place over the one before.
    pub buffers: Vec<BufferId>,
    /// The first step that writes it.
    pub first: usize,
    /// The last step that touches it.
    pub last: usize,
}

impl Slot {
    fn meets(&self, other: &Slot) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// The binding-independent half of the memory plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Every slot, in order of first write.
    pub slots: Vec<Slot>,
    /// For each buffer, its slot (temporaries only).
    pub slot_of: Vec<Option<usize>>,
}

impl Liveness {
    /// Liveness and in-place sharing of `p`'s temporaries.
    pub fn of(p: &Program) -> Liveness {
        let n = p.buffers.len();
        let mut first: Vec<Option<usize>> = vec![None; n];
        let mut last: Vec<usize> = vec![0; n];
        for (i, s) in p.steps.iter().enumerate() {
            for &b in &s.inputs {
                last[p.root(b).index()] = i;
            }
            let r = p.root(s.output).index();
            first[r] = Some(first[r].unwrap_or(i));
            last[r] = last[r].max(i);
        }
        let is_temp = |b: BufferId| p.buffer(b).kind == BufferKind::Temp;
        let mut slot_of: Vec<Option<usize>> = vec![None; n];
        let mut slots: Vec<Slot> = Vec::new();
        for (i, s) in p.steps.iter().enumerate() {
            let out = p.root(s.output);
            if !is_temp(out) || first[out.index()] != Some(i) {
                continue;
            }
            let in_place = match &s.kernel {
                Kernel::Loop { .. } if s.output == out => s.inputs.iter().copied().find(|&x| {
                    let (xb, ob) = (p.buffer(x), p.buffer(out));
                    is_temp(x)
                        && last[x.index()] == i
                        && first[x.index()].is_some_and(|f| f < i)
                        && xb.shape == ob.shape
                        && xb.dtype.size_bytes() == ob.dtype.size_bytes()
                        && s.inputs.iter().filter(|&&y| p.root(y) == x).count() == 1
                        && slot_of[x.index()].is_some_and(|k| slots[k].last == i)
                }),
                _ => None,
            };
            match in_place.and_then(|x| slot_of[x.index()]) {
                Some(k) => {
                    slots[k].buffers.push(out);
                    slots[k].last = last[out.index()];
                    slot_of[out.index()] = Some(k);
                }
                None => {
                    slot_of[out.index()] = Some(slots.len());
                    slots.push(Slot {
                        buffers: vec![out],
                        first: i,
                        last: last[out.index()],
                    });
                }
            }
        }
        Liveness { slots, slot_of }
    }

    /// The temporaries written in place over another, as `(new, old)` pairs.
    pub fn in_place_pairs(&self) -> Vec<(BufferId, BufferId)> {
        self.slots
            .iter()
            .flat_map(|s| s.buffers.windows(2).map(|w| (w[1], w[0])))
            .collect()
    }
}

/// Where every slot lives in the arena under one binding of the run-time symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaPlan {
    /// Byte offset of each slot of [`Liveness::slots`].
    pub offsets: Vec<u64>,
    /// Byte size of each slot.
    pub sizes: Vec<u64>,
    /// The arena's size: the end of the highest slot.
    pub peak_bytes: u64,
    /// What no reuse would need: the sum of every temporary's size.
    pub total_bytes: u64,
}

/// The byte size of buffer `b` of `p` under `cx` (every run-time symbol bound).
pub fn buffer_bytes(p: &Program, b: BufferId, cx: &ShapeCx) -> Result<u64, RunError> {
    let buf = p.buffer(b);
    // Formatted only for an error (sizes are resolved on every decode call).
    let what = || format!("buffer {b} ({})", buf.value);
    let mut n: u64 = buf.dtype.size_bytes() as u64;
    for d in &buf.shape {
        let v = crate::eval_size_lazy(cx, d, what)?;
        n = n.checked_mul(v as u64).ok_or_else(|| RunError::Size {
            what: what(),
            dim: kiln_ir::types::shape_string(&buf.shape),
            problem: "overflows 64 bits of bytes".into(),
        })?;
    }
    Ok(n)
}

impl ArenaPlan {
    /// Places `p`'s slots for the binding `cx`.
    pub fn place(p: &Program, cx: &ShapeCx) -> Result<ArenaPlan, RunError> {
        let live = &p.liveness;
        let mut sizes = Vec::with_capacity(live.slots.len());
        let mut total = 0u64;
        for s in &live.slots {
            let mut size = 0u64;
            for &b in &s.buffers {
                let bytes = buffer_bytes(p, b, cx)?;
                total = total.saturating_add(bytes);
                size = size.max(bytes);
            }
            sizes.push(size);
        }
        let mut order: Vec<usize> = (0..live.slots.len()).collect();
        order.sort_by(|&a, &b| {
            sizes[b]
                .cmp(&sizes[a])
                .then(live.slots[a].first.cmp(&live.slots[b].first))
        });
        let mut offsets = vec![0u64; live.slots.len()];
        let mut placed: Vec<usize> = Vec::new();
        let mut peak = 0u64;
        for k in order {
            let mut busy: Vec<(u64, u64)> = placed
                .iter()
                .filter(|&&j| live.slots[j].meets(&live.slots[k]) && sizes[j] > 0)
                .map(|&j| (offsets[j], offsets[j] + sizes[j]))
                .collect();
            busy.sort_unstable();
            let mut at = 0u64;
            for (start, end) in busy {
                if at.saturating_add(sizes[k]) <= start {
                    break;
                }
                at = at.max(end.div_ceil(ALIGNMENT).saturating_mul(ALIGNMENT));
            }
            offsets[k] = at;
            peak = peak.max(at.saturating_add(sizes[k]));
            placed.push(k);
        }
        Ok(ArenaPlan {
            offsets,
            sizes,
            peak_bytes: peak,
            total_bytes: total,
        })
    }

    /// The byte offset of temporary `b`, if it is one.
    pub fn offset_of(&self, p: &Program, b: BufferId) -> Option<u64> {
        p.liveness
            .slot_of
            .get(b.index())
            .copied()
            .flatten()
            .map(|k| self.offsets[k])
    }
}

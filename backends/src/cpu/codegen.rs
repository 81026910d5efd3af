//! Runs the Program's loop, row, gather, rope, copy and fill steps, and the
//! matrix–vector products of decode, with the kernels Cranelift generated
//! ([`super::jit`]).
//!
//! Each step keeps the kernels it has used ([`StepCache`]), so a run finds
//! its code without hashing; the process-wide JIT compiles each distinct
//! kernel once. Kernels are generated when the Program is compiled, for the
//! operand layouts its symbolic strides promise ([`precompile`]); a binding
//! whose strides differ (a size-1 axis merging, say) compiles its variant
//! on first use.
//!
//! The driver flattens a step to rows: axes every operand can merge are
//! merged, the last one is the row the kernel runs, and rows (or, when
//! there are fewer rows than threads, pieces of a row) are split over the
//! threads.
//!
//! Safety: every pointer handed to generated code is a root buffer's base
//! plus an offset the Program verifier proved inside that root for the
//! current binding (every element of every view), and the kernels touch
//! exactly the elements of the views they are given.

use kiln_ir::{DType, KernelOp, ShapeCx};

use super::jit::kernels::{self as jk, LoopFn, LoopSpec, MatvecLayout, RowKind, Step};
use super::jit::JitError;
use super::kernels::Shared;
use crate::lower::{BufferKind, FillOp, Kernel, Program, RowOp};
use crate::reference::kernels::{StepError, R};
use crate::reference::{CView, Memory};

/// A kernel a step has used, by what it depends on.
#[derive(Clone, Debug, PartialEq)]
enum Key {
    /// A loop body by its operands' stored dtypes and steps, and the number
    /// of a gemm epilogue's leading instructions the GEMM itself ran
    /// ([`split_addends`]; 0 for a whole body).
    Loop(usize, Vec<DType>, Vec<Step>),
    Row(RowKind, DType, bool),
    Gather(DType, DType),
    Matvec(MatvecLayout, DType),
    Fill,
    Rope,
}

/// The kernels one step has used (`None`: not covered by generated code).
#[derive(Default)]
pub(crate) struct StepCache {
    fns: Vec<(Key, Option<usize>)>,
    /// A product's weight, packed at compile time (AVX-512 hosts).
    pub(crate) packed: Option<std::sync::Arc<super::packed::PackedB>>,
}

impl std::fmt::Debug for StepCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepCache({} kernels)", self.fns.len())
    }
}

impl StepCache {
    /// The addresses of the generated kernels this step has used.
    pub(crate) fn addresses(&self) -> Vec<usize> {
        self.fns.iter().filter_map(|(_, f)| *f).collect()
    }

    fn get(
        &mut self,
        key: Key,
        make: impl FnOnce() -> Result<Option<usize>, JitError>,
    ) -> Result<Option<usize>, JitError> {
        if let Some((_, f)) = self.fns.iter().find(|(k, _)| *k == key) {
            return Ok(*f);
        }
        let f = make()?;
        self.fns.push((key, f));
        Ok(f)
    }
}

fn jit_err(e: JitError) -> StepError {
    StepError::Message(e.to_string())
}

/// Runs `f(lo, hi)` over `0..n` split in up to `parts` ranges on the
/// thread pool (in place when `parts` is 1).
fn split(n: usize, parts: usize, f: impl Fn(usize, usize) -> R + Sync) -> R {
    let parts = parts.clamp(1, n.max(1));
    if parts == 1 {
        return f(0, n);
    }
    let per = n.div_ceil(parts);
    let results: Vec<std::sync::Mutex<R>> =
        (0..parts).map(|_| std::sync::Mutex::new(Ok(()))).collect();
    super::par(parts, &|p| {
        let r = f((p * per).min(n), ((p + 1) * per).min(n));
        *results[p].lock().unwrap_or_else(|e| e.into_inner()) = r;
    });
    results
        .into_iter()
        .try_for_each(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Work below this many elements runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

fn parts_for(work: usize, threads: usize) -> usize {
    if threads > 1 && work >= PARALLEL_MIN {
        threads
    } else {
        1
    }
}

/// A root's base pointer and stored dtype, when it is aligned for it.
fn root(mem: &mut Memory<'_>, v: &CView) -> Option<(*mut u8, DType)> {
    let (p, _, stored) = mem.raw(v.root)?;
    ((p as usize).is_multiple_of(stored.size_bytes())).then_some((p, stored))
}

fn step_of(stride: usize) -> Step {
    match stride {
        0 => Step::Bcast,
        1 => Step::Contig,
        _ => Step::Strided,
    }
}

/// Merges adjacent axes along which every operand steps evenly: the shape
/// and each operand's strides (rank at least 1).
fn collapse(shape: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut s: Vec<usize> = Vec::new();
    let mut st: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for (ax, &d) in shape.iter().enumerate() {
        if d == 1 && !s.is_empty() {
            continue;
        }
        let merge = !s.is_empty()
            && strides
                .iter()
                .zip(&st)
                .all(|(o, m)| m.last().copied() == Some(o[ax] * d));
        if merge {
            let last = s.len() - 1;
            s[last] *= d;
            for (m, o) in st.iter_mut().zip(strides) {
                let l = m.len() - 1;
                m[l] = o[ax];
            }
        } else {
            s.push(d);
            for (m, o) in st.iter_mut().zip(strides) {
                m.push(o[ax]);
            }
        }
    }
    if s.is_empty() {
        s.push(1);
        st.iter_mut().for_each(|m| m.push(0));
    }
    (s, st)
}

/// Runs a loop body (or a copy: an empty body) over `out`'s shape.
pub(crate) fn run_loop(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    body: &[KernelOp],
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let mut bases = Vec::new();
    let mut stored = Vec::new();
    for v in ins {
        let (p, s) = root(mem, v)?;
        bases.push(p);
        stored.push(s);
    }
    let (op, os) = root(mem, out)?;
    if os != out.dtype {
        return None;
    }
    bases.push(op);
    let mut sizes: Vec<usize> = stored.iter().map(|d| d.size_bytes()).collect();
    sizes.push(os.size_bytes());
    let mut all: Vec<&[usize]> = ins.iter().map(|v| v.strides.as_slice()).collect();
    all.push(&out.strides);
    let (shape, strides) = collapse(&out.shape, &all);
    let r = shape.len();
    let steps: Vec<Step> = strides.iter().map(|s| step_of(s[r - 1])).collect();
    let f = cache
        .get(Key::Loop(0, stored.clone(), steps.clone()), || {
            let spec = LoopSpec {
                body,
                declared: ins.iter().map(|v| v.dtype).collect(),
                stored: stored.clone(),
                out: out.dtype,
                steps: steps.clone(),
            };
            Ok(jk::loop_kernel(&spec)?.map(|f| f as usize))
        })
        .map_err(jit_err);
    let f = match f {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: the cache holds this step's loop kernels only.
    let f: LoopFn = unsafe { std::mem::transmute::<usize, LoopFn>(f) };
    let n = shape[r - 1];
    let rows: usize = shape[..r - 1].iter().product();
    if n == 0 || rows == 0 {
        return Some(Ok(()));
    }
    let offsets: Vec<usize> = ins
        .iter()
        .map(|v| v.offset)
        .chain(std::iter::once(out.offset))
        .collect();
    let inner: Vec<i64> = strides.iter().map(|s| s[r - 1] as i64).collect();
    let shared = Shared((&bases, &offsets, &strides, &sizes, &inner, &shape));
    let parts = parts_for(rows * n, threads);
    let run = move |row0: usize, row1: usize, j0: usize, j1: usize| -> R {
        let (bases, offsets, strides, sizes, inner, shape) = shared.get();
        let mut ptrs = vec![std::ptr::null_mut::<u8>(); bases.len()];
        let mut idx = vec![0usize; r - 1];
        // The multi-index of row0.
        let mut rem = row0;
        for ax in (0..r - 1).rev() {
            idx[ax] = rem % shape[ax];
            rem /= shape[ax];
        }
        for _ in row0..row1 {
            for (k, p) in ptrs.iter_mut().enumerate() {
                let e = offsets[k]
                    + idx
                        .iter()
                        .zip(&strides[k])
                        .map(|(i, s)| i * s)
                        .sum::<usize>()
                    + j0 * strides[k][r - 1];
                // SAFETY: the element is inside the root (verified views).
                *p = unsafe { bases[k].add(e * sizes[k]) };
            }
            // SAFETY: the kernel touches elements j0..j1 of this row of
            // each view, all inside their roots.
            let code = unsafe { f(ptrs.as_ptr(), inner.as_ptr(), (j1 - j0) as i64) };
            if code != 0 {
                return Err(StepError::Message("integer division by zero".into()));
            }
            for ax in (0..r - 1).rev() {
                idx[ax] += 1;
                if idx[ax] < shape[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
        Ok(())
    };
    Some(if rows >= parts {
        split(rows, parts, |a, b| run(a, b, 0, n))
    } else {
        // Fewer rows than threads: split each row into pieces of whole vectors.
        (0..rows).try_for_each(|row| {
            let per = n.div_ceil(parts).next_multiple_of(4);
            split(n.div_ceil(per), parts, |a, b| {
                (a..b).try_for_each(|p| run(row, row + 1, p * per, ((p + 1) * per).min(n)))
            })
        })
    })
}

/// The loop kernel of `body` reading `views` (stored as `stored`) and
/// writing `out`, along their last axis (a gemm epilogue: the output is also
/// its first operand); `None` when generated code does not cover it.
pub(crate) fn loop_for(
    cache: &mut StepCache,
    variant: usize,
    body: &[KernelOp],
    views: &[&CView],
    stored: &[DType],
    out: &CView,
) -> Option<LoopFn> {
    let r = out.shape.len();
    let mut steps: Vec<Step> = views.iter().map(|v| step_of(v.strides[r - 1])).collect();
    steps.push(step_of(out.strides[r - 1]));
    let st = stored.to_vec();
    let f = cache
        .get(Key::Loop(variant, st.clone(), steps.clone()), || {
            let spec = LoopSpec {
                body,
                declared: views.iter().map(|v| v.dtype).collect(),
                stored: st.clone(),
                out: out.dtype,
                steps: steps.clone(),
            };
            Ok(jk::loop_kernel(&spec)?.map(|f| f as usize))
        })
        .ok()??;
    // SAFETY: the cache holds this step's loop kernels only.
    Some(unsafe { std::mem::transmute::<usize, LoopFn>(f) })
}

/// A gemm epilogue cut in two: the addends the packed GEMM adds to its
/// sums as it stores them ([`super::packed::gemm`]), and the rest of the
/// body, run over the stored result.
#[derive(Debug, PartialEq)]
pub(crate) struct Addends {
    /// The operands added, in order (indices into the epilogue's operands,
    /// whose operand 0 is the product).
    pub(crate) adds: Vec<usize>,
    /// The rest of the body (after the `adds.len()` instructions the GEMM
    /// runs) over the operands in `kept`; its operand 0 is the product with
    /// the addends added.
    pub(crate) rest: Vec<KernelOp>,
    /// The epilogue's operands the rest reads, in their order (0 first).
    pub(crate) kept: Vec<usize>,
}

/// The addends leading an epilogue over `n` operands: at most
/// [`super::packed::MAX_ADDS`] instructions `x + a` (or `a + x`) from the
/// product on, each adding an operand `a` that `can_add` admits (f32,
/// contiguous rows), and the rest of the body rewritten to read their sum
/// as its operand 0 (`None`: no addend, or the rest reads the product
/// itself or a partial sum). The sums are computed in the body's order, so
/// both ways give the same bits.
pub(crate) fn split_addends(
    body: &[KernelOp],
    n: usize,
    can_add: impl Fn(usize) -> bool,
) -> Option<Addends> {
    use kiln_ir::BinaryOp;
    let mut cur = 0;
    let mut adds = Vec::new();
    for (i, op) in body.iter().enumerate().take(super::packed::MAX_ADDS) {
        let KernelOp::Binary(BinaryOp::Add, x, y) = *op else {
            break;
        };
        let other = if x == cur {
            y
        } else if y == cur {
            x
        } else {
            break;
        };
        if other == 0 || other >= n || !can_add(other) {
            break;
        }
        adds.push(other);
        cur = n + i;
    }
    let prefix = adds.len();
    if prefix == 0 {
        return None;
    }
    let tail = &body[prefix..];
    let mut kept = vec![0];
    let mut extra: Vec<usize> = tail
        .iter()
        .flat_map(KernelOp::args)
        .filter(|&a| a != 0 && a < n)
        .collect();
    extra.sort_unstable();
    extra.dedup();
    kept.extend(extra);
    let map = |a: usize| -> Option<usize> {
        if a == cur {
            Some(0)
        } else if a == 0 {
            None
        } else if a < n {
            kept.iter().position(|&k| k == a)
        } else if a >= n + prefix {
            Some(a - n - prefix + kept.len())
        } else {
            None
        }
    };
    let rest = tail
        .iter()
        .map(|op| op.try_map_args(map))
        .collect::<Option<Vec<_>>>()?;
    Some(Addends { adds, rest, kept })
}

/// Whether the trailing `axes` axes of `v` are one contiguous run.
fn contiguous_tail(v: &CView, axes: usize) -> bool {
    let r = v.shape.len();
    let mut want = 1;
    for ax in (r - axes..r).rev() {
        if v.shape[ax] != 1 && v.strides[ax] != want {
            return false;
        }
        want *= v.shape[ax];
    }
    true
}

/// Iterates the outer multi-indices of `shape` in `lo..hi` (row-major).
fn each_row(shape: &[usize], lo: usize, hi: usize, mut f: impl FnMut(&[usize]) -> R) -> R {
    let mut idx = vec![0usize; shape.len()];
    let mut rem = lo;
    for ax in (0..shape.len()).rev() {
        idx[ax] = rem % shape[ax].max(1);
        rem /= shape[ax].max(1);
    }
    for _ in lo..hi {
        f(&idx)?;
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Ok(())
}

/// Norms, softmax and float reductions, one row per kernel call.
pub(crate) fn run_row(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    op: &RowOp,
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let x = ins[0];
    let (xp, xs) = root(mem, x)?;
    let (op_, os) = root(mem, out)?;
    if xs != DType::F32 || x.dtype != DType::F32 || os != DType::F32 {
        return None;
    }
    let axes = match op {
        RowOp::Reduce { axes, .. } => *axes,
        _ => 1,
    };
    let r = x.shape.len();
    if axes > r || axes == 0 {
        return None;
    }
    // A reduction over one strided axis reads with the stride.
    let strided = !contiguous_tail(x, axes);
    if strided && (axes != 1 || !matches!(op, RowOp::Reduce { .. })) {
        return None;
    }
    let x_stride = (x.strides[r - 1] * 4) as i64;
    let kind = match op {
        RowOp::Reduce { kind, .. } => RowKind::Reduce(*kind),
        RowOp::Softmax => RowKind::Softmax,
        RowOp::LayerNorm { .. } => RowKind::LayerNorm {
            bias: ins.len() > 2,
        },
        RowOp::RmsNorm { .. } => RowKind::RmsNorm,
    };
    let eps = match op {
        RowOp::LayerNorm { eps } | RowOp::RmsNorm { eps } => *eps,
        _ => 0.0,
    };
    if !matches!(kind, RowKind::Reduce(_)) && !contiguous_tail(out, 1) {
        return None;
    }
    // Norm parameters: contiguous, one stored dtype.
    let mut params = Vec::new();
    let mut wdt = DType::F32;
    for (i, p) in ins[1..].iter().enumerate() {
        let (pp, ps) = root(mem, p)?;
        if p.dtype != DType::F32 || !contiguous_tail(p, 1) || (i > 0 && ps != wdt) {
            return None;
        }
        wdt = ps;
        // SAFETY: the view's first element is inside its root.
        params.push(unsafe { pp.add(p.offset * ps.size_bytes()) });
    }
    // Norms of f32 weights run as AVX-512 code where the host has it
    // (`Some(layer)`), other rows through the generated kernel.
    let native = match kind {
        RowKind::LayerNorm { .. } | RowKind::RmsNorm
            if wdt == DType::F32 && !strided && super::packed::available() =>
        {
            Some(matches!(kind, RowKind::LayerNorm { .. }))
        }
        _ => None,
    };
    let f = if native.is_some() {
        None
    } else {
        match cache
            .get(Key::Row(kind, wdt, strided), || {
                Ok(jk::row_kernel(kind, wdt, strided)?.map(|f| f as usize))
            })
            .map_err(jit_err)
        {
            Ok(Some(f)) => Some(f),
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        }
    };
    // SAFETY: a row kernel of this step.
    let f = f.map(|f| unsafe { std::mem::transmute::<usize, jk::RowFn>(f) });
    let n: usize = x.shape[r - axes..].iter().product();
    let outer = &x.shape[..r - axes];
    let rows: usize = outer.iter().product();
    if kind == RowKind::Reduce(kiln_ir::ReduceKind::Max) && n == 0 && rows > 0 {
        return Some(Err(StepError::Message(
            "reduce_max over an empty axis".into(),
        )));
    }
    let null = std::ptr::null::<u8>();
    let w = params.first().map_or(null, |p| p.cast_const());
    let b = params.get(1).map_or(null, |p| p.cast_const());
    let shared = Shared((xp, op_, w, b));
    let reduce = matches!(kind, RowKind::Reduce(_));
    Some(split(rows, parts_for(rows * n, threads), |lo, hi| {
        let (xp, op_, w, b) = shared.get();
        each_row(outer, lo, hi, |idx| {
            let xo = x.offset
                + idx
                    .iter()
                    .zip(&x.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let oo = if reduce {
                out.at(idx)
            } else {
                out.offset
                    + idx
                        .iter()
                        .zip(&out.strides)
                        .map(|(i, s)| i * s)
                        .sum::<usize>()
            };
            // SAFETY: the row of x and of the output are inside their roots
            // (verified views; contiguous along the row, checked above); the
            // norm's weight and bias hold a row each (f32, checked above);
            // AVX-512 for `native` (checked).
            unsafe {
                match (f, native) {
                    (Some(f), _) => {
                        f(
                            xp.add(xo * 4),
                            w,
                            b,
                            op_.add(oo * 4),
                            n as i64,
                            eps,
                            x_stride,
                        );
                    }
                    #[cfg(target_arch = "x86_64")]
                    (None, Some(layer)) => super::norms::norm_row(
                        xp.add(xo * 4).cast(),
                        w.cast(),
                        b.cast(),
                        op_.add(oo * 4).cast(),
                        n,
                        eps,
                        layer,
                    ),
                    _ => {}
                }
            };
            Ok(())
        })
    }))
}

/// Rows of a table by ids: one kernel call per run of the ids' last axis.
pub(crate) fn run_gather(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let (table, ids) = (ins[0], ins[1]);
    let (tp, ts) = root(mem, table)?;
    let (ip, is) = root(mem, ids)?;
    let (op_, os) = root(mem, out)?;
    let tr = table.shape.len();
    let lead = ids.shape.len();
    if tr == 0 || os != out.dtype || is != ids.dtype || !readable_as(out.dtype, ts) {
        return None;
    }
    if !contiguous_tail(table, tr - 1) || !contiguous_tail(out, tr - 1) {
        return None;
    }
    let f = match cache
        .get(Key::Gather(ts, is), || {
            Ok(jk::gather_kernel(ts, is, out.dtype)?.map(|f| f as usize))
        })
        .map_err(jit_err)
    {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: a gather kernel of this step.
    let f: jk::GatherFn = unsafe { std::mem::transmute::<usize, jk::GatherFn>(f) };
    let rows = table.shape[0];
    let width: usize = table.shape[1..].iter().product();
    let table_row = if rows > 1 { table.strides[0] } else { width };
    let (count, ids_stride, out_row) = if lead == 0 {
        (1, 0, 0)
    } else {
        (
            ids.shape[lead - 1],
            ids.strides[lead - 1],
            out.strides[lead - 1],
        )
    };
    let outer = if lead == 0 {
        &[][..]
    } else {
        &ids.shape[..lead - 1]
    };
    let runs: usize = outer.iter().product();
    let (isz, tsz, osz) = (is.size_bytes(), ts.size_bytes(), os.size_bytes());
    let shared = Shared((tp, ip, op_));
    Some(split(
        runs,
        parts_for(runs * count * width, threads),
        |lo, hi| {
            let (tp, ip, op_) = shared.get();
            each_row(outer, lo, hi, |idx| {
                let io = ids.offset
                    + idx
                        .iter()
                        .zip(&ids.strides)
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                let oo = out.offset
                    + idx
                        .iter()
                        .zip(&out.strides)
                        .map(|(i, s)| i * s)
                        .sum::<usize>();
                // SAFETY: every id and output row of this run is inside its
                // root (verified views); the kernel checks each id against
                // `rows` before reading the table.
                let bad = unsafe {
                    f(
                        tp.add(table.offset * tsz),
                        ip.add(io * isz),
                        op_.add(oo * osz),
                        count as i64,
                        width as i64,
                        rows as i64,
                        (ids_stride * isz) as i64,
                        (table_row * tsz) as i64,
                        (out_row * osz) as i64,
                    )
                };
                if bad >= 0 {
                    let at = io + bad as usize * ids_stride;
                    // SAFETY: inside the ids view (verified).
                    let id = unsafe {
                        match is {
                            DType::I64 => *ip.add(at * 8).cast::<i64>(),
                            _ => *ip.add(at * 4).cast::<i32>() as i64,
                        }
                    };
                    return Err(StepError::Gather { id, rows });
                }
                Ok(())
            })
        },
    ))
}

fn readable_as(declared: DType, stored: DType) -> bool {
    declared == stored || declared == DType::F32 && matches!(stored, DType::F16 | DType::BF16)
}

/// Positions whose cos/sin rows a table keeps (beyond: computed per row).
const ROPE_TABLE_MAX: usize = 1 << 16;

/// cos and sin of `p · θ^(-2i/dh)` by position, rounded to f32 from f64.
#[derive(Debug, Clone)]
struct RopeTable {
    theta: f64,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn rows(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    fn row(theta: f64, half: usize, p: f64, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        for i in 0..half {
            let f = theta.powf(-(2.0 * i as f64) / (2 * half) as f64);
            let (s, c) = (p * f).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }

    fn grow(&mut self, rows: usize) {
        for p in self.rows()..rows {
            RopeTable::row(
                self.theta,
                self.half,
                p as f64,
                &mut self.cos,
                &mut self.sin,
            );
        }
    }
}

/// Rope tables by (θ, half head dim), shared by every rope step of the
/// process; growing one replaces it (steps holding the old keep using it).
static ROPE_TABLES: std::sync::Mutex<Vec<std::sync::Arc<RopeTable>>> =
    std::sync::Mutex::new(Vec::new());

/// The table for (θ, `half`) covering at least `rows` positions.
fn rope_table(theta: f64, half: usize, rows: usize) -> std::sync::Arc<RopeTable> {
    let mut tables = ROPE_TABLES.lock().unwrap_or_else(|p| p.into_inner());
    let at = tables
        .iter()
        .position(|t| t.theta.to_bits() == theta.to_bits() && t.half == half);
    if let Some(i) = at {
        if tables[i].rows() >= rows {
            return tables[i].clone();
        }
    }
    // Grow geometrically, so a decode loop rebuilds the table log(n) times.
    let old = at.map(|i| tables.swap_remove(i));
    let target = rows
        .max(old.as_ref().map_or(0, |t| t.rows() * 2))
        .min(ROPE_TABLE_MAX)
        .max(rows);
    let mut table = match old {
        Some(t) => std::sync::Arc::unwrap_or_clone(t),
        None => RopeTable {
            theta,
            half,
            cos: Vec::new(),
            sin: Vec::new(),
        },
    };
    table.grow(target);
    let table = std::sync::Arc::new(table);
    tables.push(table.clone());
    table
}

/// The rotary embedding, one kernel call per head vector.
pub(crate) fn run_rope(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    theta: f64,
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let (x, pos) = (ins[0], ins[1]);
    let (xp, xs) = root(mem, x)?;
    let (pp, ps) = root(mem, pos)?;
    let (op_, os) = root(mem, out)?;
    let r = x.shape.len();
    if r == 0
        || xs != DType::F32
        || os != DType::F32
        || !matches!(ps, DType::I64 | DType::I32)
        || ps != pos.dtype
        || !contiguous_tail(x, 1)
        || !contiguous_tail(out, 1)
    {
        return None;
    }
    let dh = x.shape[r - 1];
    if dh % 2 != 0 {
        return Some(Err(StepError::Message(format!(
            "rope needs an even head dim, got {dh}"
        ))));
    }
    let half = dh / 2;
    let f = match cache
        .get(Key::Rope, || Ok(Some(jk::rope_kernel()? as usize)))
        .map_err(jit_err)
    {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: the rope kernel.
    let f: jk::RopeFn = unsafe { std::mem::transmute::<usize, jk::RopeFn>(f) };
    let outer = &x.shape[..r - 1];
    let rows: usize = outer.iter().product();
    let psz = ps.size_bytes();
    let read_pos = |pp: *mut u8, idx: &[usize]| -> i64 {
        let at = pos.at(idx);
        // SAFETY: inside the positions view (verified).
        unsafe {
            match ps {
                DType::I64 => *pp.add(at * psz).cast::<i64>(),
                _ => *pp.add(at * psz).cast::<i32>() as i64,
            }
        }
    };
    // The table covers every position of this call (up to its limit).
    let mut need = 0usize;
    let _ = each_row(outer, 0, rows, |idx| {
        let p = read_pos(pp, idx);
        if (0..ROPE_TABLE_MAX as i64).contains(&p) {
            need = need.max(p as usize + 1);
        }
        Ok(())
    });
    let table = rope_table(theta, half, need);
    let table = &*table;
    let shared = Shared((xp, op_, pp));
    Some(split(rows, parts_for(rows * dh, threads), |lo, hi| {
        let (xp, op_, pp) = shared.get();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        each_row(outer, lo, hi, |idx| {
            let p = read_pos(pp, idx);
            let (c, s) = if (0..table.rows() as i64).contains(&p) {
                let at = p as usize * half;
                (table.cos[at..].as_ptr(), table.sin[at..].as_ptr())
            } else {
                cos.clear();
                sin.clear();
                RopeTable::row(theta, half, p as f64, &mut cos, &mut sin);
                (cos.as_ptr(), sin.as_ptr())
            };
            let xo = x.offset
                + idx
                    .iter()
                    .zip(&x.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let oo = out.offset
                + idx
                    .iter()
                    .zip(&out.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            // SAFETY: the head vectors are inside their roots (verified,
            // contiguous along the last axis); `c`/`s` hold `half` values.
            unsafe { f(xp.add(xo * 4), op_.add(oo * 4), c, s, half as i64) };
            Ok(())
        })
    }))
}

/// Constants, aranges and causal masks.
pub(crate) fn run_fill(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    fill: &FillOp,
    out: &CView,
    cx: &ShapeCx,
    threads: usize,
) -> Option<R> {
    match fill {
        FillOp::Constant { value } => run_loop(
            mem,
            cache,
            &[KernelOp::Const(*value, out.dtype)],
            &[],
            out,
            threads,
        ),
        FillOp::Arange { start } => {
            let (op_, os) = root(mem, out)?;
            if os != out.dtype || out.shape.len() != 1 {
                return None;
            }
            let start = match crate::eval_int_in(cx, start, "arange start") {
                Ok(s) => s,
                Err(e) => return Some(Err(StepError::Run(e))),
            };
            let f = match cache
                .get(Key::Fill, || Ok(jk::arange_kernel(os)?.map(|f| f as usize)))
                .map_err(jit_err)
            {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            // SAFETY: an arange kernel of this step.
            let f: jk::ArangeFn = unsafe { std::mem::transmute::<usize, jk::ArangeFn>(f) };
            let sz = os.size_bytes();
            // SAFETY: the view's elements are inside its root (verified).
            unsafe {
                f(
                    op_.add(out.offset * sz),
                    out.shape[0] as i64,
                    start,
                    (out.strides[0] * sz) as i64,
                )
            };
            Some(Ok(()))
        }
        FillOp::CausalMask => {
            let (op_, os) = root(mem, out)?;
            let [q, k] = out.shape[..] else {
                return None;
            };
            if os != out.dtype {
                return None;
            }
            let f = match cache
                .get(Key::Fill, || Ok(jk::causal_kernel(os)?.map(|f| f as usize)))
                .map_err(jit_err)
            {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            // SAFETY: a causal-mask kernel of this step.
            let f: jk::CausalFn = unsafe { std::mem::transmute::<usize, jk::CausalFn>(f) };
            let sz = os.size_bytes();
            // SAFETY: the view's elements are inside its root (verified).
            unsafe {
                f(
                    op_.add(out.offset * sz),
                    q as i64,
                    k as i64,
                    (out.strides[0] * sz) as i64,
                    (out.strides[1] * sz) as i64,
                )
            };
            Some(Ok(()))
        }
    }
}

/// `y = x·W` for one row `x` (f32, contiguous) and a weight whose rows or
/// columns are contiguous, read as stored (16-bit weights widened in the
/// kernel), split over the output features; `y` contiguous f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_matvec(
    cache: &mut StepCache,
    x: *const f32,
    w: *const u8,
    wdt: DType,
    layout: MatvecLayout,
    ldw: usize,
    y: *mut f32,
    k: usize,
    n: usize,
    threads: usize,
) -> Option<R> {
    let f = match cache
        .get(Key::Matvec(layout, wdt), || {
            Ok(jk::matvec_kernel(layout, wdt)?.map(|f| f as usize))
        })
        .map_err(jit_err)
    {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    // SAFETY: a matvec kernel of this step.
    let f: jk::MatvecFn = unsafe { std::mem::transmute::<usize, jk::MatvecFn>(f) };
    // Pieces of whole 16-feature blocks, at least 64 KiB of weights each.
    let min_cols = (16384 / k.max(1)).max(16);
    let parts = if threads > 1 && n * k >= PARALLEL_MIN {
        threads.min(n.div_ceil(min_cols)).max(1)
    } else {
        1
    };
    let per = n.div_ceil(parts).next_multiple_of(16);
    let shared = Shared((x, w, y));
    Some(split(n.div_ceil(per), parts, |a, b| {
        let (x, w, y) = shared.get();
        for p in a..b {
            let (j0, j1) = (p * per, ((p + 1) * per).min(n));
            // SAFETY: the caller checked x (k elements), the weight extent
            // and y (n elements) inside their buffers.
            unsafe { f(x, w, y, k as i64, j0 as i64, j1 as i64, ldw as i64) };
        }
        Ok(())
    }))
}

/// The packed form of a product's right operand when it is a 2-D view of
/// an f32 weight with constant offset and strides (a linear layer); the
/// weight's mapped pages are released once packed.
fn pack_weight(
    program: &Program,
    weights: &[kiln_ir::Tensor],
    b: crate::lower::BufferId,
) -> Option<std::sync::Arc<super::packed::PackedB>> {
    let buf = program.buffer(b);
    let (root, offset, strides) = match &buf.kind {
        BufferKind::View {
            base,
            offset,
            strides,
        } => (*base, offset.as_const()?, strides.clone()),
        BufferKind::Param { .. } => (b, 0, crate::lower::contiguous_strides(&buf.shape).ok()?),
        _ => return None,
    };
    let k = program.params.iter().position(|&p| p == root)?;
    let w = weights.get(k)?;
    let r = buf.shape.len();
    if r < 2 || !matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
    // Batch axes must not move through the weight.
    if strides[..r - 2].iter().any(|s| !s.is_const(0)) {
        return None;
    }
    let (kk, n) = (buf.shape[r - 2].as_const()?, buf.shape[r - 1].as_const()?);
    let (sk, sn) = (strides[r - 2].as_const()?, strides[r - 1].as_const()?);
    let usz = |v: i64| usize::try_from(v).ok();
    let packed = super::packed::shared(w, usz(offset)?, usz(sk)?, usz(sn)?, usz(kk)?, usz(n)?)?;
    w.release_pages();
    Some(packed)
}

/// Generates the kernels of `program`'s steps for the layouts its symbolic
/// strides promise, so that compile time includes code generation; the
/// weights' stored dtypes come from `weights` (in parameter order).
pub(crate) fn precompile(
    program: &Program,
    weights: &[kiln_ir::Tensor],
    caches: &mut [StepCache],
) -> Result<(), JitError> {
    let stored_of = |b: crate::lower::BufferId| -> DType {
        let mut b = b;
        while let BufferKind::View { base, .. } = &program.buffer(b).kind {
            b = *base;
        }
        match program.params.iter().position(|&p| p == b) {
            Some(k) => weights
                .get(k)
                .map_or(program.buffer(b).dtype, |w| w.dtype()),
            None => program.buffer(b).dtype,
        }
    };
    let last_step = |b: crate::lower::BufferId| -> Step {
        let buf = program.buffer(b);
        match &buf.kind {
            BufferKind::View { strides, .. } => match strides.last() {
                Some(s) if s.is_const(0) => Step::Bcast,
                Some(s) if s.is_const(1) => Step::Contig,
                Some(_) => Step::Strided,
                None => Step::Bcast,
            },
            _ => Step::Contig,
        }
    };
    let total = program.steps.len() as u64;
    for (i, (s, cache)) in program.steps.iter().zip(caches.iter_mut()).enumerate() {
        crate::progress::report(
            &format!("compiling @{} (code, packed weights)", program.name),
            i as u64 + 1,
            total,
        );
        let declared: Vec<DType> = s.inputs.iter().map(|&b| program.buffer(b).dtype).collect();
        let stored: Vec<DType> = s.inputs.iter().map(|&b| stored_of(b)).collect();
        let out = program.buffer(s.output).dtype;
        let loop_of = |cache: &mut StepCache,
                       variant: usize,
                       body: &[KernelOp],
                       declared: Vec<DType>,
                       stored: Vec<DType>,
                       steps: Vec<Step>|
         -> Result<(), JitError> {
            cache.get(Key::Loop(variant, stored.clone(), steps.clone()), || {
                let spec = LoopSpec {
                    body,
                    declared,
                    stored,
                    out,
                    steps,
                };
                Ok(jk::loop_kernel(&spec)?.map(|f| f as usize))
            })?;
            Ok(())
        };
        if matches!(s.kernel, Kernel::Gemm { .. })
            && super::packed::available()
            && std::env::var_os("KILN_NO_PACK").is_none()
        {
            cache.packed = pack_weight(program, weights, s.inputs[1]);
        }
        let mut steps: Vec<Step> = s.inputs.iter().map(|&b| last_step(b)).collect();
        steps.push(last_step(s.output));
        match &s.kernel {
            Kernel::Loop { body } => loop_of(cache, 0, body, declared, stored, steps)?,
            Kernel::Copy => loop_of(cache, 0, &[], declared, stored, steps)?,
            Kernel::Gemm { epilogue } if !epilogue.is_empty() => {
                let mut d = vec![out];
                d.extend(&declared[2..]);
                let mut st = vec![out];
                st.extend(&stored[2..]);
                let mut sp = vec![steps[s.inputs.len()]];
                sp.extend(&steps[2..]);
                // The body after the addends the packed GEMM adds itself
                // (over the operands it still reads), when the weight is
                // packed; the whole body serves the other paths.
                let split = cache.packed.as_ref().and_then(|_| {
                    split_addends(epilogue, d.len(), |j| {
                        d[j] == DType::F32 && st[j] == DType::F32 && sp[j] == Step::Contig
                    })
                });
                if let Some(a) = split.filter(|a| !a.rest.is_empty()) {
                    let d2 = a.kept.iter().map(|&j| d[j]).collect();
                    let st2 = a.kept.iter().map(|&j| st[j]).collect();
                    let sp2 = a.kept.iter().map(|&j| sp[j]).collect();
                    loop_of(cache, a.adds.len(), &a.rest, d2, st2, sp2)?;
                }
                loop_of(cache, 0, epilogue, d, st, sp)?;
            }
            Kernel::Fill(FillOp::Constant { value }) => loop_of(
                cache,
                0,
                &[KernelOp::Const(*value, out)],
                vec![],
                vec![],
                vec![last_step(s.output)],
            )?,
            Kernel::Row(op) => {
                let kind = match op {
                    RowOp::Reduce { kind, .. } => RowKind::Reduce(*kind),
                    RowOp::Softmax => RowKind::Softmax,
                    RowOp::LayerNorm { .. } => RowKind::LayerNorm {
                        bias: s.inputs.len() > 2,
                    },
                    RowOp::RmsNorm { .. } => RowKind::RmsNorm,
                };
                let wdt = stored.get(1).copied().unwrap_or(DType::F32);
                // Strided when the row's last stride is not 1.
                let strided = matches!(op, RowOp::Reduce { axes: 1, .. })
                    && last_step(s.inputs[0]) == Step::Strided;
                cache.get(Key::Row(kind, wdt, strided), || {
                    Ok(jk::row_kernel(kind, wdt, strided)?.map(|f| f as usize))
                })?;
            }
            Kernel::Gather => {
                let (ts, is) = (stored[0], stored[1]);
                cache.get(Key::Gather(ts, is), || {
                    Ok(jk::gather_kernel(ts, is, out)?.map(|f| f as usize))
                })?;
            }
            Kernel::Rope { .. } => {
                cache.get(Key::Rope, || Ok(Some(jk::rope_kernel()? as usize)))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::{BinaryOp::*, UnaryOp};
    use KernelOp::{Binary, Unary};

    /// Every operand may be added.
    fn any(_: usize) -> bool {
        true
    }

    #[test]
    fn a_bias_and_a_residual_leave_nothing_behind() {
        // Operands: 0 the product, 1 a bias, 2 a residual.
        let body = [Binary(Add, 0, 1), Binary(Add, 2, 3)];
        let a = split_addends(&body, 3, any).expect("splits");
        assert_eq!(
            a,
            Addends {
                adds: vec![1, 2],
                rest: vec![],
                kept: vec![0],
            }
        );
    }

    #[test]
    fn the_rest_reads_the_sum_as_its_operand_zero() {
        // gelu(x + bias) · scale, the scale operand 2 kept as operand 1.
        let body = [
            Binary(Add, 1, 0),
            Unary(UnaryOp::Gelu, 3),
            Binary(Mul, 4, 2),
        ];
        let a = split_addends(&body, 3, any).expect("splits");
        assert_eq!(a.adds, vec![1]);
        assert_eq!(a.kept, vec![0, 2]);
        assert_eq!(a.rest, vec![Unary(UnaryOp::Gelu, 0), Binary(Mul, 2, 1)]);
        // The bias read again after its addition stays an operand.
        let body = [Binary(Add, 0, 1), Binary(Mul, 2, 1)];
        let a = split_addends(&body, 2, any).expect("splits");
        assert_eq!((a.kept, a.rest), (vec![0, 1], vec![Binary(Mul, 0, 1)]));
    }

    #[test]
    fn at_most_two_addends_and_only_from_the_product() {
        // A third addition stays in the rest.
        let body = [Binary(Add, 0, 1), Binary(Add, 4, 2), Binary(Add, 5, 3)];
        let a = split_addends(&body, 4, any).expect("splits");
        assert_eq!((a.adds, a.rest), (vec![1, 2], vec![Binary(Add, 0, 1)]));
        assert_eq!(a.kept, vec![0, 3]);
        // An addition of two other operands first, or a product scaled
        // first: nothing for the GEMM.
        assert_eq!(
            split_addends(&[Binary(Add, 1, 2), Binary(Add, 0, 3)], 3, any),
            None
        );
        assert_eq!(
            split_addends(&[Binary(Mul, 0, 1), Binary(Add, 3, 2)], 3, any),
            None
        );
        // The product added to itself.
        assert_eq!(split_addends(&[Binary(Add, 0, 0)], 1, any), None);
        // An operand the caller refuses (not f32, not contiguous rows)
        // ends the addends.
        assert_eq!(split_addends(&[Binary(Add, 0, 1)], 2, |j| j != 1), None);
        let a = split_addends(&[Binary(Add, 0, 1), Binary(Add, 3, 2)], 3, |j| j != 2);
        assert_eq!(
            a.map(|a| (a.adds, a.rest)),
            Some((vec![1], vec![Binary(Add, 0, 1)]))
        );
    }

    #[test]
    fn a_rest_that_needs_the_product_or_a_partial_sum_is_not_split() {
        // x + bias, then a residual scaled by the raw product.
        let body = [Binary(Add, 0, 1), Binary(Mul, 0, 2), Binary(Add, 3, 4)];
        assert_eq!(split_addends(&body, 3, any), None);
        // Two addends, then the first partial sum read again.
        let body = [Binary(Add, 0, 1), Binary(Add, 3, 2), Binary(Mul, 4, 3)];
        assert_eq!(split_addends(&body, 3, any), None);
    }
}

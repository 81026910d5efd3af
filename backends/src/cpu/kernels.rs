//! The native kernels: f32 over raw strided memory, matrix products through
//! the `gemm` library. Each returns `None` before touching memory when it
//! does not cover a step's dtypes.
//!
//! Arithmetic matches the interpreter wherever the order of operations is
//! the same: elementwise ops round each instruction to f32 (`+ - * /` in f32
//! equal the interpreter's f64-then-round; transcendental functions go
//! through the same f64 definitions), and row, norm and attention sums
//! accumulate in f64. Matrix products accumulate in f32 in the library's
//! blocked order, which is where the CPU backend differs from the oracle
//! (about 1e-6 relative).

use kiln_ir::{BinaryOp, DType, KernelOp};

use crate::interp::softmax_row;
use crate::lower::{Kernel, RowOp};
use crate::reference::kernels::{each_index, norm_stats, reduce_floats, StepError, R};
use crate::reference::scalar::body_dtypes;
use crate::reference::{CView, Memory};

/// A view of f32 elements read and written in place.
#[derive(Clone, Copy)]
struct Fv<'a> {
    base: *mut f32,
    /// Elements in the root buffer (every address of the view is below it).
    len: usize,
    v: &'a CView,
}

impl Fv<'_> {
    /// Element `e` of the root.
    ///
    /// # Safety
    /// `e < self.len` (the Program verifier proved every address of a view
    /// is inside its root for this binding).
    #[inline]
    unsafe fn get(&self, e: usize) -> f32 {
        debug_assert!(e < self.len, "read {e} of {}", self.len);
        // SAFETY: the caller keeps `e` inside the root.
        unsafe { *self.base.add(e) }
    }

    /// Writes element `e` of the root.
    ///
    /// # Safety
    /// As for [`Fv::get`]; the root is an output, a cache or an arena slot.
    #[inline]
    unsafe fn set(&self, e: usize, x: f32) {
        debug_assert!(e < self.len, "write {e} of {}", self.len);
        // SAFETY: the caller keeps `e` inside the root.
        unsafe { *self.base.add(e) = x }
    }

    /// The element offset of multi-index `idx` over the leading axes.
    fn at(&self, idx: &[usize]) -> usize {
        self.v.at(idx)
    }
}

/// The f32 view of `v`, when its root really holds f32.
fn f32_view<'a>(mem: &mut Memory<'_>, v: &'a CView) -> Option<Fv<'a>> {
    let (ptr, bytes, dtype) = mem.raw(v.root)?;
    (dtype == DType::F32 && v.dtype == DType::F32 && (ptr as usize) % 4 == 0).then_some(Fv {
        base: ptr.cast(),
        len: bytes / 4,
        v,
    })
}

/// The f32 view of `v`; a 16-bit weight bound to an f32 parameter is widened
/// into a buffer `keep` owns for the step (the weight itself stays 16-bit).
fn f32_or_widened<'a>(
    mem: &mut Memory<'_>,
    v: &'a CView,
    keep: &mut Vec<Vec<f32>>,
) -> Option<Fv<'a>> {
    if let Some(f) = f32_view(mem, v) {
        return Some(f);
    }
    let (ptr, bytes, dtype) = mem.raw(v.root)?;
    if v.dtype != DType::F32
        || !matches!(dtype, DType::F16 | DType::BF16)
        || (ptr as usize) % 2 != 0
    {
        return None;
    }
    // SAFETY: the root holds `bytes / 2` 16-bit values, aligned (checked).
    let bits = unsafe { std::slice::from_raw_parts(ptr.cast::<u16>().cast_const(), bytes / 2) };
    let wide: Vec<f32> = match dtype {
        DType::F16 => bits
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
        _ => bits
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect(),
    };
    keep.push(wide);
    let w = keep.last_mut()?;
    // The heap buffer stays put when `keep` grows; it lives until the step ends.
    Some(Fv {
        base: w.as_mut_ptr(),
        len: w.len(),
        v,
    })
}

/// A view of integer or bool elements, read only.
#[derive(Clone, Copy)]
struct Iv<'a> {
    base: *const u8,
    bytes: usize,
    dtype: DType,
    v: &'a CView,
}

impl Iv<'_> {
    /// Element `e` as an integer (bool as 0/1).
    ///
    /// # Safety
    /// `e` is inside the root, as for [`Fv::get`].
    #[inline]
    unsafe fn get(&self, e: usize) -> i64 {
        debug_assert!((e + 1) * self.dtype.size_bytes() <= self.bytes);
        // SAFETY: in range (above); the root is aligned for its dtype.
        unsafe {
            match self.dtype {
                DType::I64 => *self.base.cast::<i64>().add(e),
                DType::I32 => *self.base.cast::<i32>().add(e) as i64,
                _ => *self.base.add(e) as i64,
            }
        }
    }
}

fn int_view<'a>(mem: &mut Memory<'_>, v: &'a CView) -> Option<Iv<'a>> {
    let (ptr, bytes, dtype) = mem.raw(v.root)?;
    let ok = matches!(dtype, DType::I64 | DType::I32 | DType::Bool)
        && dtype == v.dtype
        && (ptr as usize) % dtype.size_bytes() == 0;
    ok.then_some(Iv {
        base: ptr,
        bytes,
        dtype,
        v,
    })
}

/// The element offset of `idx` in `v` plus `j` steps along its last axis.
fn offset_of(v: &CView, idx: &[usize]) -> usize {
    v.offset
        + idx
            .iter()
            .zip(&v.strides)
            .map(|(i, s)| i * s)
            .sum::<usize>()
}

pub(super) fn run(
    mem: &mut Memory<'_>,
    kernel: &Kernel,
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    match kernel {
        Kernel::Gemm { epilogue } => gemm(mem, epilogue, ins, out, threads),
        Kernel::Loop { body } => {
            if !covered(body, ins.len()) {
                return None;
            }
            let views: Vec<Fv<'_>> = ins
                .iter()
                .map(|v| f32_view(mem, v))
                .collect::<Option<_>>()?;
            let o = f32_view(mem, out)?;
            Some(elementwise(body, &views, o))
        }
        Kernel::Row(op) => row(mem, op, ins, out),
        Kernel::Attention { causal, scale } => attention(mem, ins, out, *causal, *scale, threads),
        Kernel::Gather => gather(mem, ins, out),
        Kernel::Rope { theta } => rope(mem, ins, out, *theta),
        Kernel::Copy => copy(mem, ins[0], out),
        Kernel::Fill(_) => None,
    }
}

/// Whether the f32 loop covers `body` on `operands` f32 operands: every value f32.
fn covered(body: &[KernelOp], operands: usize) -> bool {
    body_dtypes(body, &vec![DType::F32; operands])
        .iter()
        .all(|&t| t == DType::F32)
        && !body.iter().any(|k| matches!(k, KernelOp::Where(..)))
}

/// Elements per chunk of the loop kernel: each instruction runs over a chunk.
const CHUNK: usize = 256;

/// A fused elementwise body over the output's shape, one chunk of the last
/// axis at a time: load the operands, run each instruction over the chunk,
/// store the last value.
fn elementwise(body: &[KernelOp], ins: &[Fv<'_>], out: Fv<'_>) -> R {
    let r = out.v.shape.len();
    let (outer, last) = match r {
        0 => (&[][..], 1),
        _ => (&out.v.shape[..r - 1], out.v.shape[r - 1]),
    };
    let last_stride = |v: &CView| if r == 0 { 0 } else { v.strides[r - 1] };
    let n = ins.len();
    let mut vals = vec![[0f32; CHUNK]; n + body.len()];
    let mut bases = vec![0usize; n];
    each_index(outer, |idx| {
        for (b, f) in bases.iter_mut().zip(ins) {
            *b = offset_of(f.v, idx);
        }
        let out_base = offset_of(out.v, idx);
        let mut c0 = 0;
        while c0 < last {
            let len = CHUNK.min(last - c0);
            for (k, f) in ins.iter().enumerate() {
                let s = last_stride(f.v);
                for (j, slot) in vals[k][..len].iter_mut().enumerate() {
                    // SAFETY: the address is inside the view (verified).
                    *slot = unsafe { f.get(bases[k] + (c0 + j) * s) };
                }
            }
            for (i, op) in body.iter().enumerate() {
                let (src, dst) = vals.split_at_mut(n + i);
                instruction(op, src, &mut dst[0][..len])?;
            }
            let s = last_stride(out.v);
            let result = &vals[n + body.len() - 1];
            for (j, &x) in result[..len].iter().enumerate() {
                // SAFETY: the address is inside the output view (verified).
                unsafe { out.set(out_base + (c0 + j) * s, x) };
            }
            c0 += len;
        }
        Ok(())
    })
}

/// One f32 instruction over a chunk: `dst[j] = op(src[a][j], …)`.
fn instruction(op: &KernelOp, src: &[[f32; CHUNK]], dst: &mut [f32]) -> R {
    let len = dst.len();
    match *op {
        KernelOp::Unary(u, a) => {
            let f = u
                .float_fn()
                .ok_or_else(|| StepError::Message(format!("{} on f32", u.name())))?;
            for (d, &x) in dst.iter_mut().zip(&src[a][..len]) {
                *d = f(x as f64) as f32;
            }
        }
        KernelOp::Binary(b, x, y) => {
            let (xs, ys) = (&src[x][..len], &src[y][..len]);
            let pairs = dst.iter_mut().zip(xs.iter().zip(ys));
            match b {
                BinaryOp::Add => pairs.for_each(|(d, (&p, &q))| *d = p + q),
                BinaryOp::Sub => pairs.for_each(|(d, (&p, &q))| *d = p - q),
                BinaryOp::Mul => pairs.for_each(|(d, (&p, &q))| *d = p * q),
                BinaryOp::Div => pairs.for_each(|(d, (&p, &q))| *d = p / q),
                BinaryOp::Pow => {
                    pairs.for_each(|(d, (&p, &q))| *d = (p as f64).powf(q as f64) as f32)
                }
                // NaN propagates, as in the interpreter (and torch.maximum).
                BinaryOp::Max => pairs.for_each(|(d, (&p, &q))| {
                    *d = if p.is_nan() || q.is_nan() {
                        f32::NAN
                    } else {
                        p.max(q)
                    }
                }),
                BinaryOp::Min => pairs.for_each(|(d, (&p, &q))| {
                    *d = if p.is_nan() || q.is_nan() {
                        f32::NAN
                    } else {
                        p.min(q)
                    }
                }),
                other => {
                    return Err(StepError::Message(format!(
                        "{} is not an f32 op",
                        other.name()
                    )))
                }
            }
        }
        KernelOp::Cast(_, a) => dst.copy_from_slice(&src[a][..len]),
        KernelOp::Const(v, _) => dst.fill(v as f32),
        KernelOp::Where(..) => return Err(StepError::Message("where is not an f32 op".into())),
    }
    Ok(())
}

/// Batched `A·B` through the `gemm` library, then the epilogue in place.
fn gemm(
    mem: &mut Memory<'_>,
    epilogue: &[KernelOp],
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let mut widened = Vec::new();
    let a = f32_or_widened(mem, ins[0], &mut widened)?;
    let b = f32_or_widened(mem, ins[1], &mut widened)?;
    let o = f32_view(mem, out)?;
    let extras: Vec<Fv<'_>> = ins[2..]
        .iter()
        .map(|v| f32_view(mem, v))
        .collect::<Option<_>>()?;
    if !epilogue.is_empty() && !covered(epilogue, 1 + extras.len()) {
        return None;
    }
    let r = out.shape.len();
    let (mut m, n, k) = (out.shape[r - 2], out.shape[r - 1], a.v.shape[r - 1]);
    // Batch axes along which A and the output step by whole matrices and B
    // does not move fold into M: one larger product instead of many.
    let mut batch = r - 2;
    while batch > 0 {
        let ax = batch - 1;
        let (sa, so) = (a.v.strides[ax], out.strides[ax]);
        if b.v.strides[ax] == 0 && sa == m * a.v.strides[r - 2] && so == m * out.strides[r - 2] {
            m *= out.shape[ax];
            batch -= 1;
        } else {
            break;
        }
    }
    if m == 1 && batch == 0 && k > 0 {
        if let Some(r) = matvec(a, b, o, k, n, threads) {
            return finish(r, epilogue, extras, o);
        }
    }
    let par = if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let s = |v: &CView, ax: usize| v.strides[ax] as isize;
    let ran = each_index(&out.shape[..batch], |idx| {
        let (ao, bo, oo) = (
            offset_of(a.v, idx),
            offset_of(b.v, idx),
            offset_of(out, idx),
        );
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: inside the output view (verified).
                    unsafe { o.set(oo + i * out.strides[r - 2] + j * out.strides[r - 1], 0.0) };
                }
            }
            return Ok(());
        }
        // SAFETY: every address the product touches lies in the three views,
        // which the verifier proved inside their roots; the output is not an
        // operand's root (lowering never aliases a product with its inputs).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                o.base.add(oo),
                s(out, r - 1),
                s(out, r - 2),
                false,
                a.base.add(ao).cast_const(),
                s(a.v, r - 1),
                s(a.v, r - 2),
                b.base.add(bo).cast_const(),
                s(b.v, r - 1),
                s(b.v, r - 2),
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        Ok(())
    });
    finish(ran, epilogue, extras, o)
}

/// The epilogue of a product already written to `o`.
fn finish(ran: R, epilogue: &[KernelOp], extras: Vec<Fv<'_>>, o: Fv<'_>) -> Option<R> {
    if ran.is_err() || epilogue.is_empty() {
        return Some(ran);
    }
    let mut operands = vec![o];
    operands.extend(extras);
    Some(elementwise(epilogue, &operands, o))
}

/// One row times a matrix whose rows or columns are contiguous: the native
/// matrix–vector kernels, reading each weight once (`None`: another layout).
fn matvec(a: Fv<'_>, b: Fv<'_>, o: Fv<'_>, k: usize, n: usize, threads: usize) -> Option<R> {
    let r = a.v.shape.len();
    if a.v.strides[r - 1] != 1 {
        return None;
    }
    let (b_k, b_n) = (b.v.strides[r - 2], b.v.strides[r - 1]);
    let (a0, b0) = (a.v.offset, b.v.offset);
    // The extent of B the product reads, in elements from its first one.
    let span = (k - 1) * b_k + (n.max(1) - 1) * b_n + 1;
    if a0 + k > a.len || b0 + span > b.len {
        return Some(Err(StepError::Message(
            "a product reads outside its operands".into(),
        )));
    }
    // SAFETY: both ranges are inside their roots (checked above), and the
    // output (written below) is never the root of an operand.
    let (x, w) = unsafe {
        (
            std::slice::from_raw_parts(a.base.add(a0).cast_const(), k),
            std::slice::from_raw_parts(b.base.add(b0).cast_const(), span),
        )
    };
    let mut y = vec![0f32; n];
    if b_k == 1 {
        super::matvec::rows(x, w, b_n, &mut y, threads);
    } else if b_n == 1 {
        super::matvec::cols(x, w, b_k, &mut y, threads);
    } else {
        return None;
    }
    let os = o.v.strides[r - 1];
    for (j, &v) in y.iter().enumerate() {
        // SAFETY: inside the output view (verified).
        unsafe { o.set(o.v.offset + j * os, v) };
    }
    Some(Ok(()))
}

fn row(mem: &mut Memory<'_>, op: &RowOp, ins: &[&CView], out: &CView) -> Option<R> {
    let x = f32_view(mem, ins[0])?;
    let o = f32_view(mem, out)?;
    let params: Vec<Fv<'_>> = ins[1..]
        .iter()
        .map(|v| f32_view(mem, v))
        .collect::<Option<_>>()?;
    let shape = &x.v.shape;
    let outer_rank = match op {
        RowOp::Reduce { axes, .. } => shape.len() - axes,
        _ => shape.len().saturating_sub(1),
    };
    let (outer, row_shape) = shape.split_at(outer_rank);
    let mut values: Vec<f64> = Vec::new();
    let mut places: Vec<usize> = Vec::new();
    let mut xi = vec![0usize; shape.len()];
    Some(each_index(outer, |oi| {
        xi[..outer_rank].copy_from_slice(oi);
        values.clear();
        places.clear();
        each_index(row_shape, |ri| {
            xi[outer_rank..].copy_from_slice(ri);
            // SAFETY: inside the input view (verified).
            values.push(unsafe { x.get(x.at(&xi)) } as f64);
            places.push(o.at(&xi[..o.v.shape.len()]));
            Ok(())
        })?;
        match op {
            RowOp::Reduce { kind, .. } => {
                let v = reduce_floats(*kind, &values)?;
                // SAFETY: inside the output view (verified).
                unsafe { o.set(o.at(oi), v as f32) };
            }
            RowOp::Softmax => {
                for (p, &at) in softmax_row(&values).into_iter().zip(&places) {
                    // SAFETY: inside the output view (verified).
                    unsafe { o.set(at, p as f32) };
                }
            }
            RowOp::LayerNorm { eps } | RowOp::RmsNorm { eps } => {
                let layer = matches!(op, RowOp::LayerNorm { .. });
                let (mean, inv) = norm_stats(&values, layer, *eps);
                for (j, (&v, &at)) in values.iter().zip(&places).enumerate() {
                    // SAFETY: norm parameters are [width] views (verified).
                    let w = unsafe { params[0].get(params[0].at(&[j])) } as f64;
                    let b = match params.get(1) {
                        // SAFETY: as above.
                        Some(bv) => (unsafe { bv.get(bv.at(&[j])) }) as f64,
                        None => 0.0,
                    };
                    let y = if layer {
                        (v - mean) * inv * w + b
                    } else {
                        v * inv * w
                    };
                    // SAFETY: inside the output view (verified).
                    unsafe { o.set(at, y as f32) };
                }
            }
        }
        Ok(())
    }))
}

/// Raw views shared by the threads of one step, each writing its own part
/// of the output.
#[derive(Clone, Copy)]
struct Shared<T>(T);

// SAFETY: the views point into buffers that outlive the step; threads read
// the operands and write disjoint output elements (one (batch, head) each).
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The views (a method, so that a closure captures the whole wrapper).
    fn get(&self) -> T {
        self.0
    }
}

/// Attention over contiguous head vectors, one task per (batch, head): SIMD
/// dot products for the scores, softmax in f64, SIMD multiply-adds of the
/// value rows.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    q: Fv<'_>,
    k: Fv<'_>,
    v: Fv<'_>,
    o: Fv<'_>,
    mask: Option<Iv<'_>>,
    causal: bool,
    scale: f64,
    threads: usize,
) -> R {
    use rayon::prelude::*;
    let [b, h, t, dh] = q.v.shape[..] else {
        return Err(StepError::Message("attention needs rank-4 q".into()));
    };
    let (hk, s, dv) = (k.v.shape[1], k.v.shape[2], v.v.shape[3]);
    if hk == 0 || h % hk != 0 {
        return Err(StepError::Message(format!(
            "{h} query heads do not group over {hk} kv heads"
        )));
    }
    let group = h / hk;
    let level = super::matvec::level();
    let shared = Shared((q, k, v, o, mask));
    let task = move |job: usize| {
        let (q, k, v, o, mask) = shared.get();
        let (bi, hi) = (job / h, job % h);
        let kv = hi / group;
        let (k0, v0) = (k.at(&[bi, kv, 0, 0]), v.at(&[bi, kv, 0, 0]));
        let (k_row, v_row) = (k.v.strides[2], v.v.strides[2]);
        let mut scores = vec![0f64; s];
        let mut acc = vec![0f32; dv];
        for ti in 0..t {
            let qb = q.at(&[bi, hi, ti, 0]);
            // SAFETY: a head vector of q inside its view (verified).
            let qr = unsafe { std::slice::from_raw_parts(q.base.add(qb).cast_const(), dh) };
            let visible = if causal {
                (ti as i128 + s as i128 - t as i128 + 1).clamp(0, s as i128) as usize
            } else {
                s
            };
            for (j, score) in scores.iter_mut().enumerate() {
                // SAFETY: inside the mask view (verified).
                let allowed = j < visible
                    && mask.is_none_or(|m| unsafe { m.get(m.v.at(&[bi, hi, ti, j])) } != 0);
                *score = if allowed {
                    // SAFETY: a key row inside its view (verified).
                    let kr = unsafe {
                        std::slice::from_raw_parts(k.base.add(k0 + j * k_row).cast_const(), dh)
                    };
                    scale * super::matvec::dot(level, qr, kr) as f64
                } else {
                    f64::NEG_INFINITY
                };
            }
            let probs = softmax_row(&scores);
            acc.fill(0.0);
            for (j, &p) in probs.iter().enumerate() {
                if scores[j] == f64::NEG_INFINITY {
                    continue;
                }
                // SAFETY: a value row inside its view (verified).
                let vr = unsafe {
                    std::slice::from_raw_parts(v.base.add(v0 + j * v_row).cast_const(), dv)
                };
                super::matvec::axpy(level, &mut acc, p as f32, vr);
            }
            let ob = o.at(&[bi, hi, ti, 0]);
            for (c, &a) in acc.iter().enumerate() {
                // SAFETY: this task's own output row (verified in bounds).
                unsafe { o.set(ob + c, a) };
            }
        }
    };
    if threads > 1 && b * h > 1 && t * s * dh >= 1 << 12 {
        (0..b * h).into_par_iter().for_each(task);
    } else {
        (0..b * h).for_each(task);
    }
    Ok(())
}

fn attention(
    mem: &mut Memory<'_>,
    ins: &[&CView],
    out: &CView,
    causal: bool,
    scale: f64,
    threads: usize,
) -> Option<R> {
    let (q, k, v) = (
        f32_view(mem, ins[0])?,
        f32_view(mem, ins[1])?,
        f32_view(mem, ins[2])?,
    );
    let mask = match ins.get(3) {
        Some(m) => Some(int_view(mem, m)?),
        None => None,
    };
    let o = f32_view(mem, out)?;
    let unit = |f: &Fv<'_>| f.v.strides.get(3) == Some(&1);
    if unit(&q) && unit(&k) && unit(&v) && unit(&o) {
        return Some(attention_rows(q, k, v, o, mask, causal, scale, threads));
    }
    let [b, h, t, dh] = q.v.shape[..] else {
        return None;
    };
    let (hk, s, dv) = (k.v.shape[1], k.v.shape[2], v.v.shape[3]);
    if hk == 0 || h % hk != 0 {
        return Some(Err(StepError::Message(format!(
            "{h} query heads do not group over {hk} kv heads"
        ))));
    }
    let group = h / hk;
    let mut scores = vec![0f64; s];
    let mut acc = vec![0f64; dv];
    let (qs, ks, vs) = (q.v.strides[3], k.v.strides[3], v.v.strides[3]);
    let (k_row, v_row) = (k.v.strides[2], v.v.strides[2]);
    let os = o.v.strides[3];
    for bi in 0..b {
        for hi in 0..h {
            let kv = hi / group;
            let (k0, v0) = (k.at(&[bi, kv, 0, 0]), v.at(&[bi, kv, 0, 0]));
            for ti in 0..t {
                let qb = q.at(&[bi, hi, ti, 0]);
                // Keys after this query's position are hidden (bottom-right).
                let visible = if causal {
                    ((ti as i128 + s as i128 - t as i128 + 1).clamp(0, s as i128)) as usize
                } else {
                    s
                };
                for (j, score) in scores.iter_mut().enumerate() {
                    // SAFETY: inside the mask view (verified).
                    let allowed = j < visible
                        && mask.is_none_or(|m| unsafe { m.get(m.v.at(&[bi, hi, ti, j])) } != 0);
                    *score = if !allowed {
                        f64::NEG_INFINITY
                    } else {
                        let kb = k0 + j * k_row;
                        let mut dot = 0f64;
                        for c in 0..dh {
                            // SAFETY: inside the q and k views (verified).
                            dot += unsafe { q.get(qb + c * qs) as f64 * k.get(kb + c * ks) as f64 };
                        }
                        scale * dot
                    };
                }
                let probs = softmax_row(&scores);
                acc.fill(0.0);
                for (j, &p) in probs.iter().enumerate() {
                    if scores[j] == f64::NEG_INFINITY {
                        continue;
                    }
                    let vb = v0 + j * v_row;
                    for (c, a) in acc.iter_mut().enumerate() {
                        // SAFETY: inside the v view (verified).
                        *a += p * unsafe { v.get(vb + c * vs) } as f64;
                    }
                }
                let ob = o.at(&[bi, hi, ti, 0]);
                for (c, &a) in acc.iter().enumerate() {
                    // SAFETY: inside the output view (verified).
                    unsafe { o.set(ob + c * os, a as f32) };
                }
            }
        }
    }
    Some(Ok(()))
}

fn gather(mem: &mut Memory<'_>, ins: &[&CView], out: &CView) -> Option<R> {
    let table = f32_view(mem, ins[0])?;
    let ids = int_view(mem, ins[1])?;
    if ids.dtype == DType::Bool {
        return None;
    }
    let o = f32_view(mem, out)?;
    let rows = table.v.shape.first().copied().unwrap_or(0);
    let lead = ids.v.shape.len();
    let rest = &table.v.shape[1..];
    let mut ti = vec![0usize; table.v.shape.len()];
    let mut oi = vec![0usize; out.shape.len()];
    Some(each_index(&ids.v.shape, |idx| {
        // SAFETY: inside the ids view (verified).
        let id = unsafe { ids.get(ids.v.at(idx)) };
        let r = usize::try_from(id)
            .ok()
            .filter(|&r| r < rows)
            .ok_or(StepError::Gather { id, rows })?;
        ti[0] = r;
        oi[..lead].copy_from_slice(idx);
        each_index(rest, |ri| {
            ti[1..].copy_from_slice(ri);
            oi[lead..].copy_from_slice(ri);
            // SAFETY: `r` is a row of the table (checked above); both
            // addresses are inside their views (verified).
            unsafe { o.set(o.at(&oi), table.get(table.at(&ti))) };
            Ok(())
        })
    }))
}

fn rope(mem: &mut Memory<'_>, ins: &[&CView], out: &CView, theta: f64) -> Option<R> {
    let x = f32_view(mem, ins[0])?;
    let pos = int_view(mem, ins[1])?;
    let o = f32_view(mem, out)?;
    let r = x.v.shape.len();
    let dh = x.v.shape[r - 1];
    if dh % 2 != 0 {
        return Some(Err(StepError::Message(format!(
            "rope needs an even head dim, got {dh}"
        ))));
    }
    let half = dh / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / dh as f64))
        .collect();
    let (xs, os) = (x.v.strides[r - 1], out.strides[r - 1]);
    Some(each_index(&x.v.shape[..r - 1], |row| {
        // SAFETY: inside the positions view (verified).
        let p = unsafe { pos.get(pos.v.at(row)) } as f64;
        let (xb, ob) = (offset_of(x.v, row), offset_of(out, row));
        for (i, f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (p * f).sin_cos();
            // SAFETY: both halves are inside the views (verified).
            unsafe {
                let lo = x.get(xb + i * xs) as f64;
                let hi = x.get(xb + (i + half) * xs) as f64;
                o.set(ob + i * os, (lo * cos - hi * sin) as f32);
                o.set(ob + (i + half) * os, (hi * cos + lo * sin) as f32);
            }
        }
        Ok(())
    }))
}

/// A strided copy of any dtype whose bytes the source really holds.
fn copy(mem: &mut Memory<'_>, src: &CView, dst: &CView) -> Option<R> {
    let (sp, s_bytes, s_dtype) = mem.raw(src.root)?;
    let (dp, d_bytes, _) = mem.raw(dst.root)?;
    if s_dtype != src.dtype || src.dtype != dst.dtype {
        return None;
    }
    let size = src.dtype.size_bytes();
    Some(each_index(&dst.shape, |idx| {
        let (from, to) = (src.at(idx) * size, dst.at(idx) * size);
        debug_assert!(from + size <= s_bytes && to + size <= d_bytes);
        // SAFETY: both elements are inside their views (verified); `copy`
        // allows the two roots to be the same buffer.
        unsafe { std::ptr::copy(sp.add(from), dp.add(to), size) };
        Ok(())
    }))
}

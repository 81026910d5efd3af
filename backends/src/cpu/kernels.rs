//! Step dispatch of the CPU backend: matrix products through the `gemm`
//! library (matrix–vector products and epilogues through generated code),
//! attention natively, every other kind through the generated kernels of
//! [`super::codegen`]. Each returns `None` before touching memory when it
//! does not cover a step's dtypes.
//!
//! Arithmetic: `+ - * /` in f32 equal the interpreter's f64-then-round;
//! transcendental functions are f32 approximations within a few ulp; row,
//! norm and attention sums accumulate in f64. Matrix products accumulate in
//! f32 in the library's blocked order, which is where the CPU backend
//! differs most from the oracle (about 1e-6 relative).

use kiln_ir::{DType, KernelOp, ShapeCx};

use super::codegen::{self, StepCache};
use super::jit::kernels::MatvecLayout;
use crate::interp::softmax_row;
use crate::lower::Kernel;
use crate::reference::kernels::{each_index, StepError, R};
use crate::reference::{CView, Memory};

/// A view of f32 elements read and written in place.
#[derive(Clone, Copy)]
pub(super) struct Fv<'a> {
    pub(super) base: *mut f32,
    /// Elements in the root buffer (every address of the view is below it).
    pub(super) len: usize,
    v: &'a CView,
}

impl Fv<'_> {
    /// Element `e` of the root.
    ///
    /// # Safety
    /// `e < self.len` (the Program verifier proved every address of a view
    /// is inside its root for this binding).
    #[inline]
    pub(super) unsafe fn get(&self, e: usize) -> f32 {
        debug_assert!(e < self.len, "read {e} of {}", self.len);
        // SAFETY: the caller keeps `e` inside the root.
        unsafe { *self.base.add(e) }
    }

    /// Writes element `e` of the root.
    ///
    /// # Safety
    /// As for [`Fv::get`]; the root is an output, a cache or an arena slot.
    #[inline]
    pub(super) unsafe fn set(&self, e: usize, x: f32) {
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
pub(super) fn f32_view<'a>(mem: &mut Memory<'_>, v: &'a CView) -> Option<Fv<'a>> {
    let (ptr, bytes, dtype) = mem.raw(v.root)?;
    (dtype == DType::F32 && v.dtype == DType::F32 && (ptr as usize).is_multiple_of(4)).then_some(
        Fv {
            base: ptr.cast(),
            len: bytes / 4,
            v,
        },
    )
}

/// The f32 view of `v`; a 16-bit weight bound to an f32 parameter is widened
/// into a buffer `keep` owns for the step (the weight itself stays 16-bit).
pub(super) fn f32_or_widened<'a>(
    mem: &mut Memory<'_>,
    v: &'a CView,
    keep: &mut Vec<Vec<f32>>,
) -> Option<Fv<'a>> {
    if let Some(f) = f32_view(mem, v) {
        return Some(f);
    }
    let (bits, dtype) = sixteen_bit_root(mem, v)?;
    let mut wide = vec![0f32; bits.len()];
    widen_into(bits, dtype, &mut wide);
    keep.push(wide);
    let w = keep.last_mut()?;
    // The heap buffer stays put when `keep` grows; it lives until the step ends.
    Some(Fv {
        base: w.as_mut_ptr(),
        len: w.len(),
        v,
    })
}

/// The 16-bit values of the root of `v`, an f32 view of a 16-bit weight
/// (the weight stays 16-bit; kernels widen it), and their dtype (`None`:
/// another dtype, or not aligned).
fn sixteen_bit_root<'a>(mem: &mut Memory<'_>, v: &CView) -> Option<(&'a [u16], DType)> {
    let (ptr, bytes, dtype) = mem.raw(v.root)?;
    if v.dtype != DType::F32
        || !matches!(dtype, DType::F16 | DType::BF16)
        || !(ptr as usize).is_multiple_of(2)
    {
        return None;
    }
    // SAFETY: the root holds `bytes / 2` 16-bit values, aligned (checked);
    // a weight, alive and unchanged for the step.
    let bits = unsafe { std::slice::from_raw_parts(ptr.cast::<u16>().cast_const(), bytes / 2) };
    Some((bits, dtype))
}

/// `bits` (f16 or bf16, as `dtype` says) widened into `out`, of the same
/// length: the `half` crate's slice conversion (F16C where the host has it).
fn widen_into(bits: &[u16], dtype: DType, out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match dtype {
        DType::F16 => bits
            .reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(out),
        _ => bits
            .reinterpret_cast::<half::bf16>()
            .convert_to_f32_slice(out),
    }
}

/// `C = A·B` through the `gemm` crate, `m × n` by depth `k`: each operand
/// its first element and its (column, row) strides in elements; on the
/// rayon pool with `threads` tasks when the product is worth splitting.
///
/// # Safety
/// Every element the strides reach lies inside its operand; C is no
/// operand's memory.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn library_gemm(
    (m, n, k): (usize, usize, usize),
    (c, c_cs, c_rs): (*mut f32, isize, isize),
    (a, a_cs, a_rs): (*const f32, isize, isize),
    (b, b_cs, b_rs): (*const f32, isize, isize),
    threads: usize,
) {
    let par = if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: as the caller promised.
    unsafe {
        gemm::gemm(
            m, n, k, c, c_cs, c_rs, false, a, a_cs, a_rs, b, b_cs, b_rs, 0.0, 1.0, false, false,
            false, par,
        );
    }
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
        && (ptr as usize).is_multiple_of(dtype.size_bytes());
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
    cache: &mut StepCache,
    ins: &[&CView],
    out: &CView,
    cx: &ShapeCx,
    threads: usize,
) -> Option<R> {
    match kernel {
        Kernel::Gemm { epilogue } => gemm(mem, cache, epilogue, ins, out, threads),
        Kernel::Loop { body } => codegen::run_loop(mem, cache, body, ins, out, threads),
        Kernel::Row(op) => codegen::run_row(mem, cache, op, ins, out, threads),
        Kernel::Attention { .. } => attention(mem, ins, out, kernel, threads),
        Kernel::Gather => codegen::run_gather(mem, cache, ins, out, threads),
        Kernel::Moe { top_k } => super::moe::moe(mem, ins, out, *top_k, threads),
        Kernel::Rope { theta } => codegen::run_rope(mem, cache, *theta, ins, out, threads),
        Kernel::Copy => codegen::run_loop(mem, cache, &[], ins, out, threads),
        Kernel::Fill(f) => codegen::run_fill(mem, cache, f, out, cx, threads),
    }
}

/// Batched `A·B` through the `gemm` library, then the epilogue in place.
fn gemm(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    epilogue: &[KernelOp],
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    let o = f32_view(mem, out)?;
    let (av, bv) = (ins[0], ins[1]);
    let r = out.shape.len();
    let (mut m, n, k) = (out.shape[r - 2], out.shape[r - 1], av.shape[r - 1]);
    // Batch axes along which A and the output step by whole matrices and B
    // does not move fold into M: one larger product instead of many.
    let mut batch = r - 2;
    while batch > 0 {
        let ax = batch - 1;
        let (sa, so) = (av.strides[ax], out.strides[ax]);
        // An axis of one index folds whatever its strides (the last
        // position of a prefill's hidden states keeps the stride of 128).
        if out.shape[ax] == 1
            || bv.strides[ax] == 0 && sa == m * av.strides[r - 2] && so == m * out.strides[r - 2]
        {
            m *= out.shape[ax];
            batch -= 1;
        } else {
            break;
        }
    }
    if batch == 0 && k > 0 && n > 0 && m > 0 {
        let fused = (m > 1 && !epilogue.is_empty())
            .then(|| TileEpilogue::new(mem, cache, epilogue, ins, out))
            .flatten();
        if let Some(ran) = packed_product(mem, cache, av, o, m, k, n, threads, fused.as_ref()) {
            if fused.is_some() {
                return Some(ran.and_then(|()| fused.map_or(Ok(()), |f| f.result())));
            }
            return finish(mem, cache, ran, epilogue, ins, out, threads);
        }
    }
    if m == 1 && batch == 0 && k > 0 && n > 0 {
        if let Some(ran) = matvec(mem, cache, av, bv, o, k, n, threads) {
            return finish(mem, cache, ran, epilogue, ins, out, threads);
        }
    }
    if batch == 0 && k > 0 && n > 0 && m > 0 {
        if let Some(ran) = gemm_sixteen_bit_b(mem, av, bv, o, m, k, n, threads) {
            return finish(mem, cache, ran, epilogue, ins, out, threads);
        }
    }
    let mut widened = Vec::new();
    let a = f32_or_widened(mem, av, &mut widened)?;
    let b = f32_or_widened(mem, bv, &mut widened)?;
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
            library_gemm(
                (m, n, k),
                (o.base.add(oo), s(out, r - 1), s(out, r - 2)),
                (a.base.add(ao).cast_const(), s(a.v, r - 1), s(a.v, r - 2)),
                (b.base.add(bo).cast_const(), s(b.v, r - 1), s(b.v, r - 2)),
                threads,
            );
        }
        Ok(())
    });
    drop(widened);
    finish(mem, cache, ran, epilogue, ins, out, threads)
}

/// Bytes of f32 a block of a 16-bit weight is widened into: few enough
/// blocks that the GEMM library's copy of A, made again for each, stays a
/// small part of the product.
const WIDEN_BLOCK_BYTES: usize = 8 << 20;

/// A product by a 16-bit weight (2-D: no batch axis moves through it) where
/// the weight is not packed (hosts without AVX-512, or a view packing does
/// not take): blocks of its columns are widened to f32 into a buffer of
/// about [`WIDEN_BLOCK_BYTES`] and multiplied in turn by the GEMM library,
/// so the weight is read as stored, once per call, and the memory it
/// takes is the block's, never a widened copy of the whole weight (an
/// embedding table used as the LM head is 98 MB in f32). `None`: A is not
/// f32, or B is not a 16-bit weight.
#[allow(clippy::too_many_arguments)]
fn gemm_sixteen_bit_b(
    mem: &mut Memory<'_>,
    av: &CView,
    bv: &CView,
    o: Fv<'_>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) -> Option<R> {
    let a = f32_view(mem, av)?;
    let (bits, bdt) = sixteen_bit_root(mem, bv)?;
    let r = o.v.shape.len();
    let (sk, sn) = (bv.strides[r - 2], bv.strides[r - 1]);
    // The extent of B the product reads, checked against its root (the
    // verifier proved the view; this guards the folded batch axes).
    let last = bv.offset + (k - 1) * sk + (n - 1) * sn;
    if last >= bits.len() {
        return Some(Err(StepError::Message(
            "a product reads outside its operands".into(),
        )));
    }
    let widen = |b: u16| match bdt {
        DType::F16 => half::f16::from_bits(b).to_f32(),
        _ => half::bf16::from_bits(b).to_f32(),
    };
    let cols = (WIDEN_BLOCK_BYTES / 4 / k)
        .clamp(16, n.max(16))
        .next_multiple_of(16);
    let mut block = vec![0f32; cols.min(n) * k];
    let s = |v: &CView, ax: usize| v.strides[ax] as isize;
    for j0 in (0..n).step_by(cols) {
        let jb = cols.min(n - j0);
        // Column j of the block at `block[(j - j0)·k ..]`: B[kk, j] for
        // every kk, read as stored; the columns split over the threads.
        let fill = |col: &mut [f32], j: usize| {
            let start = bv.offset + (j0 + j) * sn;
            if sk == 1 {
                widen_into(&bits[start..start + k], bdt, col);
            } else {
                for (kk, d) in col.iter_mut().enumerate() {
                    *d = widen(bits[start + kk * sk]);
                }
            }
        };
        let parts = if threads > 1 && jb * k >= 1 << 16 {
            threads.min(jb)
        } else {
            1
        };
        let per = jb.div_ceil(parts);
        let base = block.as_mut_ptr() as usize;
        super::par(parts, &|p| {
            for j in p * per..((p + 1) * per).min(jb) {
                // SAFETY: column j of the block (jb·k elements allocated);
                // each part writes its own columns.
                let col =
                    unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(j * k), k) };
                fill(col, j);
            }
        });
        // SAFETY: A and the output are the verified views (row stride,
        // column stride; the folded rows of A and C were checked by the
        // caller's strides); the block holds jb columns of k values with
        // column stride k; the output's columns j0..j0 + jb are in range.
        unsafe {
            library_gemm(
                (m, jb, k),
                (
                    o.base.add(o.v.offset + j0 * o.v.strides[r - 1]),
                    s(o.v, r - 1),
                    s(o.v, r - 2),
                ),
                (
                    a.base.add(av.offset).cast_const(),
                    s(av, r - 1),
                    s(av, r - 2),
                ),
                (block.as_ptr(), k as isize, 1),
                threads,
            );
        }
    }
    Some(Ok(()))
}

/// The epilogue of a product already written to `out`: the generated loop
/// kernel, in place (`None`: not covered, the step runs on the scalar
/// kernels from the start).
fn finish(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    ran: R,
    epilogue: &[KernelOp],
    ins: &[&CView],
    out: &CView,
    threads: usize,
) -> Option<R> {
    if ran.is_err() || epilogue.is_empty() {
        return Some(ran);
    }
    let mut operands = vec![out];
    operands.extend(&ins[2..]);
    codegen::run_loop(mem, cache, epilogue, &operands, out, threads)
}

/// One row times a weight whose rows or columns are contiguous: the
/// generated matrix–vector kernel, reading the weight once as stored
/// (`None`: another layout or dtype).
#[allow(clippy::too_many_arguments)]
fn matvec(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    av: &CView,
    bv: &CView,
    o: Fv<'_>,
    k: usize,
    n: usize,
    threads: usize,
) -> Option<R> {
    let a = f32_view(mem, av)?;
    let (wp, w_bytes, wdt) = mem.raw(bv.root)?;
    if bv.dtype != DType::F32 || !(wp as usize).is_multiple_of(wdt.size_bytes()) {
        return None;
    }
    let r = av.shape.len();
    if av.strides[r - 1] != 1 && k > 1 {
        return None;
    }
    let (b_k, b_n) = (bv.strides[r - 2], bv.strides[r - 1]);
    let (layout, ldw) = if b_k == 1 {
        (MatvecLayout::Rows, b_n)
    } else if b_n == 1 {
        (MatvecLayout::Cols, b_k)
    } else {
        return None;
    };
    // The extent of B the product reads, in elements from its first one.
    let span = (k - 1) * b_k + (n - 1) * b_n + 1;
    if av.offset + k > a.len || bv.offset + span > w_bytes / wdt.size_bytes() {
        return Some(Err(StepError::Message(
            "a product reads outside its operands".into(),
        )));
    }
    let os = out_stride(o);
    let mut temp = Vec::new();
    let y = if os == 1 {
        // SAFETY: n elements from the view's offset, inside the output (verified).
        unsafe { o.base.add(o.v.offset) }
    } else {
        temp.resize(n, 0f32);
        temp.as_mut_ptr()
    };
    // SAFETY: x has k elements and the weight the span checked above; the
    // output (written) is never the root of an operand.
    let ran = codegen::run_matvec(
        cache,
        unsafe { a.base.add(av.offset).cast_const() },
        unsafe { wp.add(bv.offset * wdt.size_bytes()).cast_const() },
        wdt,
        layout,
        ldw,
        y,
        k,
        n,
        threads,
    )?;
    for (j, &v) in temp.iter().enumerate() {
        // SAFETY: inside the output view (verified).
        unsafe { o.set(o.v.offset + j * os, v) };
    }
    Some(ran)
}

/// The product through the weight packed at compile time (`None`: not
/// packed, or A or the output not row-major with unit columns).
#[allow(clippy::too_many_arguments)]
fn packed_product(
    mem: &mut Memory<'_>,
    cache: &mut StepCache,
    av: &CView,
    o: Fv<'_>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    epilogue: Option<&TileEpilogue<'_>>,
) -> Option<R> {
    #[cfg(target_arch = "x86_64")]
    {
        let pb = cache.packed.clone()?;
        if pb.k != k || pb.n != n {
            return None;
        }
        let a = f32_view(mem, av)?;
        let r = av.shape.len();
        let unit = |s: &[usize]| s[r - 1] == 1;
        if !unit(&av.strides) && k > 1 || !unit(&o.v.strides) && n > 1 {
            return None;
        }
        let (lda, ldc) = (av.strides[r - 2], o.v.strides[r - 2]);
        // The last row's extent, checked against the roots (the verifier
        // proved the views; this guards the folded batch axes).
        if av.offset + (m - 1) * lda + k > a.len || o.v.offset + (m - 1) * ldc + n > o.len {
            return Some(Err(StepError::Message(
                "a product reads outside its operands".into(),
            )));
        }
        let panels = pb.panels();
        let split = threads > 1 && m * n * k >= 1 << 15;
        // SAFETY: offsets inside the roots (checked above).
        let (ap, cp) = unsafe {
            (
                a.base.add(av.offset) as usize,
                o.base.add(o.v.offset) as usize,
            )
        };
        if m == 1 {
            let bounds = part_bounds(panels, threads, split);
            let run = |part: usize| {
                let (p0, p1) = (bounds[part], bounds[part + 1]);
                // SAFETY: x holds k elements and y n (checked above); parts
                // write disjoint panels of y; AVX-512 was checked when the
                // weight was packed.
                unsafe {
                    super::packed::matvec(&pb, ap as *const f32, cp as *mut f32, p0, p1);
                }
            };
            super::par(bounds.len() - 1, &run);
            return Some(Ok(()));
        }
        packed_gemms(ap, lda, m, k, &[(&pb, cp, ldc, epilogue)], threads, split);
        Some(Ok(()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mem, cache, av, o, m, k, n, threads);
        None
    }
}

/// One product of [`packed_gemms`]: packed B, C's address and row stride,
/// and its fused epilogue.
type Member<'a> = (
    &'a super::packed::PackedB,
    usize,
    usize,
    Option<&'a TileEpilogue<'a>>,
);

/// `C = A·B` for each member `(B, C, ldc, epilogue)` of a product sharing
/// A (`m` rows of `k` at `ap`, row stride `lda`; `m > 1`), B packed: A is
/// packed once per chunk of rows and every member's panels run as one
/// parallel job, each member's epilogue fused into its own panels (it must
/// not read another member's output).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn packed_gemms(
    ap: usize,
    lda: usize,
    m: usize,
    k: usize,
    members: &[Member<'_>],
    threads: usize,
    split: bool,
) {
    let total: usize = members.iter().map(|(pb, ..)| pb.panels()).sum();
    let added: usize = members.iter().flat_map(|m| m.3).map(|e| e.adds.len()).sum();
    ADDENDS_FUSED.fetch_add(added, std::sync::atomic::Ordering::Relaxed);
    thread_local! {
        /// The calling thread's buffer for A in the GEMM's layout.
        static PACKED_A: std::cell::RefCell<Vec<f32>> =
            const { std::cell::RefCell::new(Vec::new()) };
        /// The same for A split for the tile unit (bytes, aligned in use).
        static SPLIT_A: std::cell::RefCell<Vec<u8>> =
            const { std::cell::RefCell::new(Vec::new()) };
        /// Every member's B in the tile unit's layout (bytes, aligned in
        /// use).
        static CONVERTED_B: std::cell::RefCell<Vec<u8>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    // The tile unit takes products of enough rows to fill its pairs of
    // 16-row tiles, by weights it can split.
    let tiles_unit = m >= AMX_MIN_ROWS
        && super::amx::usable()
        && members.iter().all(|(pb, ..)| super::amx::weight_ok(pb));
    // On the tile unit, a product of several blocks of rows has every
    // member's B converted once, before the products (a parallel job), and
    // runs block of rows by block of rows: a block's split A (1.2 MB) stays
    // in L2 over every panel instead of being read again from L3 for each
    // panel. With one block of rows, converting each panel's block as it
    // is used (into L2) costs less than a pass over all of B.
    // The converted B takes 6 bytes per weight: past CONVERTED_B_MAX (a
    // large model's FFN group) the products convert as they go instead,
    // so that memory stays near the weights' size.
    let converted_len: usize = members
        .iter()
        .map(|(pb, ..)| super::amx::converted_b_len(pb))
        .sum();
    let pre_convert = tiles_unit
        && super::amx::row_block(m.min(GEMM_CHUNK_ROWS)) < m.min(GEMM_CHUNK_ROWS)
        && converted_len <= CONVERTED_B_MAX
        && super::amx::convert_ahead();
    let mut converted = vec![0usize; members.len()];
    CONVERTED_B.with(|cbuf| {
        let mut cbuf = cbuf.borrow_mut();
        if pre_convert {
            let lens: Vec<usize> = members
                .iter()
                .map(|(pb, ..)| super::amx::converted_b_len(pb))
                .collect();
            let len = converted_len + 64;
            if cbuf.len() < len {
                cbuf.resize(len, 0);
            }
            let p = cbuf.as_mut_ptr();
            let mut at = p.wrapping_add(p.align_offset(64)) as usize;
            for (slot, l) in converted.iter_mut().zip(&lens) {
                *slot = at;
                at += l;
            }
            let parts = if split { threads.min(total) } else { 1 };
            let convert = |part: usize| {
                let (g0, g1) = (part * total / parts, (part + 1) * total / parts);
                let mut start = 0;
                for (&(pb, ..), &dst) in members.iter().zip(&converted) {
                    let end = start + pb.panels();
                    if g0 < end && g1 > start {
                        // SAFETY: dst holds converted_b_len(pb) bytes;
                        // parts convert disjoint panels; usable() held.
                        unsafe {
                            super::amx::convert_panels(
                                pb,
                                g0.max(start) - start,
                                g1.min(end) - start,
                                dst as *mut u8,
                            )
                        };
                    }
                    start = end;
                }
            };
            super::par(parts, &convert);
        }
    });
    let converted = &converted;
    SPLIT_A.with(|sbuf| {
        let mut sbuf = sbuf.borrow_mut();
        PACKED_A.with(|buf| {
            let mut buf = buf.borrow_mut();
            // A is packed and multiplied a chunk of rows at a time, which
            // bounds the buffer whatever the batch.
            let chunks = m.div_ceil(GEMM_CHUNK_ROWS);
            let chunk = (super::packed::a_tiles(m.div_ceil(chunks)) * super::packed::MR).min(m);
            for r0 in (0..m).step_by(chunk) {
                let rows = chunk.min(m - r0);
                let tiles = super::packed::a_tiles(rows);
                let packers = if split { threads.min(tiles) } else { 1 };
                let a0 = ap + r0 * lda * 4;
                // A split for the tile unit, if it takes the product and every
                // element of this chunk of A splits (else the f32 kernel).
                let mut sa = 0usize;
                let on_tiles = tiles_unit && {
                    let len = super::amx::split_a_len(rows, k) + 64;
                    if sbuf.len() < len {
                        sbuf.resize(len, 0);
                    }
                    let p = sbuf.as_mut_ptr();
                    sa = p.wrapping_add(p.align_offset(64)) as usize;
                    let pairs = super::amx::a_tiles(rows) / 2;
                    let splitters = if split { threads.min(pairs) } else { 1 };
                    let bad = std::sync::atomic::AtomicBool::new(false);
                    let work = |part: usize| {
                        let (t0, t1) = (
                            2 * (part * pairs / splitters),
                            2 * ((part + 1) * pairs / splitters),
                        );
                        // SAFETY: as for pack_a below; the buffer holds the
                        // chunk split, 64-byte aligned; AVX-512 and the tile
                        // state were checked (usable()).
                        let ok = unsafe {
                            super::amx::split_a(
                                rows,
                                k,
                                a0 as *const f32,
                                lda,
                                sa as *mut u8,
                                t0,
                                t1,
                            )
                        };
                        if !ok {
                            bad.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    };
                    super::par(splitters, &work);
                    let ok = !bad.load(std::sync::atomic::Ordering::Relaxed);
                    if ok {
                        TILE_PRODUCTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    ok
                };
                // Otherwise A packed for the f32 kernel (the buffer grown
                // only for products that need it).
                let mut pa = 0usize;
                if !on_tiles {
                    let len = super::packed::packed_a_len(chunk, k);
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    pa = buf.as_mut_ptr() as usize;
                    let pack = |part: usize| {
                        let (t0, t1) = (part * tiles / packers, (part + 1) * tiles / packers);
                        // SAFETY: A holds m rows of k at stride lda (checked by
                        // the caller), rows r0..r0+rows among them; the buffer
                        // holds the chunk packed; parts pack disjoint tiles.
                        unsafe {
                            super::packed::pack_a(
                                rows,
                                k,
                                a0 as *const f32,
                                lda,
                                pa as *mut f32,
                                t0,
                                t1,
                            )
                        };
                    };
                    super::par(packers, &pack);
                }
                // The work is `total` panels × `blocks` blocks of rows. Parts
                // are claimed as they finish, in order, and shrink towards the
                // end, so that the cores finish together even when one is
                // slowed (its bandwidth, or a neighbour on the machine); the
                // last ones are a few blocks of rows of one panel rather than
                // a whole panel.
                let block = if on_tiles {
                    super::amx::row_block(rows)
                } else {
                    super::packed::row_block(rows)
                };
                let blocks = rows.div_ceil(block);
                let bounds = part_bounds(blocks * total, threads, split);
                let parts = bounds.len() - 1;
                let run_block = |rs: std::ops::Range<usize>, g0: usize, g1: usize| {
                    let mut start = 0;
                    for (&(pb, cp, ldc, epilogue), &conv) in members.iter().zip(converted) {
                        let end = start + pb.panels();
                        let epi = epilogue.filter(|e| e.has_rest()).map(|e| {
                            move |i: usize, rs: usize, j: usize, cols: usize| {
                                e.tile(r0 + i, rs, j, cols)
                            }
                        });
                        // The addends from the chunk's first row.
                        let mut adds = [(std::ptr::null::<f32>(), 0); super::packed::MAX_ADDS];
                        let count = epilogue.map_or(0, |e| e.adds.len());
                        for (slot, &(p, step)) in
                            adds.iter_mut().zip(epilogue.iter().flat_map(|e| &e.adds))
                        {
                            *slot = ((p + r0 * step * 4) as *const f32, step);
                        }
                        if g0 < end && g1 > start {
                            let (p0, p1) = (g0.max(start) - start, g1.min(end) - start);
                            // SAFETY: the chunk of A is packed (or split, on
                            // the tile unit, which usable() and weight_ok()
                            // allowed); each C holds m rows of its n at its
                            // stride (checked by the caller), rows
                            // r0..r0+rows among them; parts write disjoint
                            // panels of columns (of whole blocks of rows,
                            // from a multiple of the kernel's tile); no
                            // output is an operand's root; AVX-512 was
                            // checked when the weights were packed.
                            let epi = epi
                                .as_ref()
                                .map(|f| f as &dyn Fn(usize, usize, usize, usize));
                            let c0 = (cp + r0 * ldc * 4) as *mut f32;
                            unsafe {
                                if on_tiles {
                                    super::amx::gemm(
                                        pb,
                                        rows,
                                        rs.clone(),
                                        sa as *const u8,
                                        c0,
                                        ldc,
                                        p0,
                                        p1,
                                        &adds[..count],
                                        epi,
                                        if on_tiles && pre_convert {
                                            conv as *const u8
                                        } else {
                                            std::ptr::null()
                                        },
                                    );
                                } else {
                                    super::packed::gemm(
                                        pb,
                                        rows,
                                        rs.clone(),
                                        pa as *const f32,
                                        c0,
                                        ldc,
                                        p0,
                                        p1,
                                        &adds[..count],
                                        epi,
                                    );
                                }
                            }
                        }
                        start = end;
                    }
                };
                // Units in panel-major order: unit u is block u % blocks of
                // panel u / blocks. A part: the tail of one panel's blocks,
                // whole panels, the head of one panel's blocks.
                let run = |part: usize| {
                    let (u0, u1) = (bounds[part], bounds[part + 1]);
                    let rows_of = |b0: usize, b1: usize| b0 * block..(b1 * block).min(rows);
                    if on_tiles && pre_convert {
                        // Block-major: unit u is panel u % total of block
                        // u / total.
                        let mut u = u0;
                        while u < u1 {
                            let b = u / total;
                            let end = u1.min((b + 1) * total);
                            run_block(rows_of(b, b + 1), u - b * total, end - b * total);
                            u = end;
                        }
                        return;
                    }
                    let (pa0, ba0) = (u0 / blocks, u0 % blocks);
                    let (pa1, ba1) = (u1 / blocks, u1 % blocks);
                    if pa0 == pa1 {
                        if ba1 > ba0 {
                            run_block(rows_of(ba0, ba1), pa0, pa0 + 1);
                        }
                        return;
                    }
                    let mut first_whole = pa0;
                    if ba0 > 0 {
                        run_block(rows_of(ba0, blocks), pa0, pa0 + 1);
                        first_whole += 1;
                    }
                    if pa1 > first_whole {
                        run_block(0..rows, first_whole, pa1);
                    }
                    if ba1 > 0 {
                        run_block(rows_of(0, ba1), pa1, pa1 + 1);
                    }
                };
                super::par(parts, &run);
            }
        });
    });
}

/// Most bytes of B converted for the tile unit ahead of a product (BERT's
/// FFN: 14 MB; LLaMA-7B's gate and up projections together would take
/// 541 MB, and convert as they go instead).
const CONVERTED_B_MAX: usize = 64 << 20;

/// Fewest rows of a product the tile unit takes ([`super::amx`]): four
/// pairs of 16-row tiles; fewer go to the f32 kernel.
const AMX_MIN_ROWS: usize = 128;

/// [`run_group`] when A has `m > 1` rows (a prefill's or an encoder's
/// q/k/v projections): A packed once and every member's panels as one
/// parallel job, each member's epilogue fused, instead of a packing and a
/// job per product (`None`: an epilogue reads another member's output, or
/// the generated code does not cover it, a weight is not packed, or a
/// layout is not plain rows; the steps then run one by one).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn rows_group(
    mem: &mut Memory<'_>,
    steps: &[crate::lower::Step],
    caches: &mut [StepCache],
    views: &[CView],
    threads: usize,
    av: &CView,
    m: usize,
    lda: usize,
    k: usize,
) -> Option<Result<Vec<usize>, (usize, StepError)>> {
    let a = f32_view(mem, av)?;
    if av.offset + (m - 1) * lda + k > a.len {
        return None;
    }
    // Members' epilogues run while other members' products are being
    // written: none may read memory a member writes (an earlier member's
    // output, or an arena slot a later one reuses).
    if epilogue_reads_a_member(mem, steps, views, |_, _| true)? {
        return None;
    }
    let mut outs = Vec::with_capacity(steps.len());
    let mut flops = 0usize;
    for (s, cache) in steps.iter().zip(caches.iter_mut()) {
        let crate::lower::Kernel::Gemm { epilogue } = &s.kernel else {
            return None;
        };
        let out = &views[s.output.index()];
        let n = *out.shape.last()?;
        let (rows, ldc) = as_rows(out)?;
        let o = f32_view(mem, out)?;
        if rows != m || n == 0 || o.v.offset + (m - 1) * ldc + n > o.len {
            return None;
        }
        let pb = cache.packed.clone()?;
        if pb.k != k || pb.n != n {
            return None;
        }
        let fused = if epilogue.is_empty() {
            None
        } else {
            let ins: Vec<&CView> = s.inputs.iter().map(|b| &views[b.index()]).collect();
            Some(TileEpilogue::new(mem, cache, epilogue, &ins, out)?)
        };
        flops = flops.saturating_add(m.saturating_mul(n).saturating_mul(k));
        // SAFETY: the offset is inside the root (checked above).
        outs.push((pb, unsafe { o.base.add(o.v.offset) } as usize, ldc, fused));
    }
    let members: Vec<Member<'_>> = outs
        .iter()
        .map(|(pb, c, ldc, e)| (&**pb, *c, *ldc, e.as_ref()))
        .collect();
    // SAFETY: inside the root (checked above).
    let ap = unsafe { a.base.add(av.offset) } as usize;
    let split = threads > 1 && flops >= 1 << 15;
    packed_gemms(ap, lda, m, k, &members, threads, split);
    for (i, (.., e)) in outs.iter().enumerate() {
        if let Some(Err(err)) = e.as_ref().map(TileEpilogue::result) {
            return Some(Err((i, err)));
        }
    }
    Some(Ok(Vec::new()))
}

/// Whether an epilogue of a group member reads memory that another member
/// `j` writes, counting only the pairs `(i, j)` that `counts` admits
/// (`None`: a view's memory is unknown). Views are compared by the span of
/// elements they reach, so a slot the plan reuses counts too.
fn epilogue_reads_a_member(
    mem: &mut Memory<'_>,
    steps: &[crate::lower::Step],
    views: &[CView],
    counts: impl Fn(usize, usize) -> bool,
) -> Option<bool> {
    let mut outs = Vec::with_capacity(steps.len());
    for s in steps {
        outs.push(span(mem, &views[s.output.index()])?);
    }
    for (i, s) in steps.iter().enumerate() {
        let crate::lower::Kernel::Gemm { epilogue } = &s.kernel else {
            return None;
        };
        if epilogue.is_empty() {
            continue;
        }
        for b in s.inputs.iter().skip(2) {
            let (lo, hi) = span(mem, &views[b.index()])?;
            for (j, &(olo, ohi)) in outs.iter().enumerate() {
                if j != i && counts(i, j) && lo < ohi && olo < hi {
                    return Some(true);
                }
            }
        }
    }
    Some(false)
}

/// The bytes from a view's first element to its last, as addresses.
fn span(mem: &mut Memory<'_>, v: &CView) -> Option<(usize, usize)> {
    let (p, _, dtype) = mem.raw(v.root)?;
    let size = dtype.size_bytes();
    if v.shape.contains(&0) {
        return Some((p as usize, p as usize));
    }
    let last = v.at(&v.shape.iter().map(|d| d - 1).collect::<Vec<_>>());
    Some((p as usize + v.offset * size, p as usize + (last + 1) * size))
}

/// Boundaries of the parts of `total` panels over `threads` threads
/// (guided self-scheduling): each part a share of what is left, so the
/// first parts are long and the last ones a panel or two. With equal parts
/// (four per thread) the caller waited on the last part of every product:
/// 3.6% of a prefill's samples in `par`.
fn guided_parts(total: usize, threads: usize) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut done = 0;
    while done < total {
        let left = total - done;
        done += left.div_ceil(2 * threads.max(1));
        bounds.push(done);
    }
    if total == 0 {
        bounds.push(0);
    }
    bounds
}

/// The parts of a product of `total` panels: [`guided_parts`] when it is
/// split over the threads, else one part.
fn part_bounds(total: usize, threads: usize, split: bool) -> Vec<usize> {
    if split {
        guided_parts(total, threads)
    } else {
        vec![0, total]
    }
}

/// A view's elements as `m` rows of its last axis at one row stride
/// (its leading axes folded; axes of one index ignored): `(m, stride)`,
/// with unit column stride.
fn as_rows(v: &CView) -> Option<(usize, usize)> {
    let r = v.shape.len();
    if r < 2 || v.shape[r - 1] > 1 && v.strides[r - 1] != 1 {
        return None;
    }
    let ld = v.strides[r - 2];
    let mut want = ld.checked_mul(v.shape[r - 2])?;
    let mut m = v.shape[r - 2];
    for ax in (0..r - 2).rev() {
        if v.shape[ax] == 1 {
            continue;
        }
        if v.strides[ax] != want {
            return None;
        }
        want = want.checked_mul(v.shape[ax])?;
        m = m.checked_mul(v.shape[ax])?;
    }
    Some((m, ld))
}

/// [`super::run_group`]: the members' products as one parallel job over
/// all their panels, then their epilogues in step order.
pub(super) fn run_group(
    mem: &mut Memory<'_>,
    steps: &[crate::lower::Step],
    caches: &mut [StepCache],
    views: &[CView],
    cx: &ShapeCx,
    threads: usize,
) -> Option<Result<Vec<usize>, (usize, StepError)>> {
    #[cfg(target_arch = "x86_64")]
    {
        let av = &views[steps.first()?.inputs.first()?.index()];
        let a = f32_view(mem, av)?;
        let r = av.shape.len();
        let k = *av.shape.last()?;
        if k == 0 {
            return None;
        }
        if let Some((m, lda)) = as_rows(av).filter(|&(m, _)| m > 1) {
            return rows_group(mem, steps, caches, views, threads, av, m, lda, k);
        }
        // One row of A, contiguous, inside its root.
        if av.shape[..r - 1].iter().product::<usize>() != 1 {
            return None;
        }
        if k > 1 && av.strides[r - 1] != 1 || av.offset + k > a.len {
            return None;
        }
        // The epilogues run after every product, in step order: none may
        // read memory a later member writes.
        if epilogue_reads_a_member(mem, steps, views, |i, j| j > i)? {
            return None;
        }
        let mut jobs = Vec::with_capacity(steps.len());
        for (s, cache) in steps.iter().zip(caches.iter()) {
            let crate::lower::Kernel::Gemm { .. } = &s.kernel else {
                return None;
            };
            let out = &views[s.output.index()];
            let o = f32_view(mem, out)?;
            let n = *out.shape.last()?;
            if n == 0 || out.shape.iter().product::<usize>() != n {
                return None;
            }
            if n > 1 && out.strides[out.shape.len() - 1] != 1 || o.v.offset + n > o.len {
                return None;
            }
            let pb = cache.packed.clone()?;
            if pb.k != k || pb.n != n {
                return None;
            }
            // SAFETY: the offset is inside the root (checked above).
            jobs.push((pb, unsafe { o.base.add(o.v.offset) } as usize));
        }
        let total: usize = jobs.iter().map(|(pb, _)| pb.panels()).sum();
        let split = threads > 1 && total * k * super::packed::NR >= 1 << 15;
        let bounds = part_bounds(total, threads, split);
        // SAFETY: inside the root (checked above).
        let x = unsafe { a.base.add(av.offset) } as usize;
        let run = |part: usize| {
            let (g0, g1) = (bounds[part], bounds[part + 1]);
            let mut start = 0;
            for (pb, y) in &jobs {
                let end = start + pb.panels();
                if g0 < end && g1 > start {
                    let (p0, p1) = (g0.max(start) - start, g1.min(end) - start);
                    // SAFETY: x holds k elements and each y its n (checked
                    // above); parts write disjoint panels; no output is A
                    // (a product never writes its operand); AVX-512 was
                    // checked when the weights were packed.
                    unsafe { super::packed::matvec(pb, x as *const f32, *y as *mut f32, p0, p1) };
                }
                start = end;
            }
        };
        super::par(bounds.len() - 1, &run);
        let mut scalar = Vec::new();
        for (i, (s, cache)) in steps.iter().zip(caches.iter_mut()).enumerate() {
            let crate::lower::Kernel::Gemm { epilogue } = &s.kernel else {
                continue;
            };
            if epilogue.is_empty() {
                continue;
            }
            let ins: Vec<&CView> = s.inputs.iter().map(|b| &views[b.index()]).collect();
            let out = &views[s.output.index()];
            let ran = match finish(mem, cache, Ok(()), epilogue, &ins, out, threads) {
                Some(r) => r,
                None => {
                    // The whole step again on the scalar kernels (it
                    // rewrites every output element).
                    scalar.push(i);
                    crate::reference::kernels::run_step(mem, &s.kernel, &ins, out, cx)
                }
            };
            if let Err(e) = ran {
                return Some(Err((i, e)));
            }
        }
        Some(Ok(scalar))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (mem, steps, caches, views, cx, threads);
        None
    }
}

/// A gemm step's elementwise epilogue, run by the packed GEMM instead of
/// as a pass over the whole output afterwards: its leading addends (a
/// bias, a residual) added to the sums in registers as they are stored,
/// and the rest of the body over each block of rows while it is in L2
/// (AVX-512 code, or the generated loop kernel). Adding a bias and a
/// residual in the store instead of in the pass over each block measured
/// 1.037–1.049× BERT-base's throughput (20 alternating forwards each,
/// twice), the same bits.
struct TileEpilogue<'a> {
    /// Operands the packed GEMM adds to its sums as it stores them
    /// ([`codegen::split_addends`]): the address of the operand's element
    /// for the folded output's `(0, 0)`, and its row step in elements.
    adds: Vec<(usize, usize)>,
    /// The rest of the body as generated code (`None`: nothing is left).
    f: Option<super::jit::kernels::LoopFn>,
    /// The body as AVX-512 code, where it has only what that runs.
    vec: Option<super::vbody::VecBody>,
    /// The output, then the epilogue's extra operands: root base, element
    /// size, view.
    operands: Vec<(usize, usize, &'a CView)>,
    inner: Vec<i64>,
    /// The output's leading axes (rows of the folded product).
    lead: Vec<usize>,
    /// Per operand, the element step from one row of the folded product to
    /// the next, where its leading axes fold into one (every operand of a
    /// row-major output and a broadcast bias): a row's start is then one
    /// multiplication, not a division per axis.
    row_steps: Option<Vec<usize>>,
    failed: std::sync::atomic::AtomicBool,
}

impl<'a> TileEpilogue<'a> {
    /// The epilogue `body` of a product written to `out` with operands
    /// `ins` (A, B, then the body's extra operands). When the step's
    /// weight is packed, the body's leading addends go to the GEMM where
    /// they qualify (f32, contiguous rows, not overlapping the output).
    fn new(
        mem: &mut Memory<'_>,
        cache: &mut StepCache,
        body: &[KernelOp],
        ins: &[&'a CView],
        out: &'a CView,
    ) -> Option<TileEpilogue<'a>> {
        // The loop kernel's operands: the product (the output), the extras,
        // then the output it writes.
        let views: Vec<&CView> = std::iter::once(out)
            .chain(ins[2..].iter().copied())
            .collect();
        if views.len() + 1 > 8 {
            return None;
        }
        if cache.packed.is_some() {
            if let Some(e) = Self::with_addends(mem, cache, body, &views, out) {
                return Some(e);
            }
        }
        Self::body(mem, cache, 0, body, &views, out, Vec::new())
    }

    /// The epilogue with its leading addends run by the GEMM (`None`: none
    /// qualifies).
    fn with_addends(
        mem: &mut Memory<'_>,
        cache: &mut StepCache,
        body: &[KernelOp],
        views: &[&'a CView],
        out: &'a CView,
    ) -> Option<TileEpilogue<'a>> {
        let r = out.shape.len();
        let lead = &out.shape[..r - 1];
        let out_span = span(mem, out)?;
        let mut ok = Vec::with_capacity(views.len());
        for v in views {
            let (p, _, stored) = mem.raw(v.root)?;
            let fits = v.dtype == DType::F32
                && stored == DType::F32
                && v.strides[r - 1] == 1
                && (p as usize).is_multiple_of(4)
                && span(mem, v).is_some_and(|(lo, hi)| hi <= out_span.0 || out_span.1 <= lo);
            let step = row_step(v, lead).filter(|_| fits);
            ok.push(step.map(|step| (p as usize + v.offset * 4, step)));
        }
        let split = codegen::split_addends(body, views.len(), |j| ok[j].is_some())?;
        let adds = split
            .adds
            .iter()
            .map(|&j| ok[j])
            .collect::<Option<Vec<_>>>()?;
        if split.rest.is_empty() {
            return Some(TileEpilogue {
                adds,
                f: None,
                vec: None,
                operands: Vec::new(),
                inner: Vec::new(),
                lead: lead.to_vec(),
                row_steps: None,
                failed: std::sync::atomic::AtomicBool::new(false),
            });
        }
        let kept: Vec<&CView> = split.kept.iter().map(|&j| views[j]).collect();
        Self::body(mem, cache, split.adds.len(), &split.rest, &kept, out, adds)
    }

    /// The epilogue running `body` over the rows of `out`, its operands
    /// `views` (the product first); `variant` tells the step's kernels for
    /// a body cut after that many instructions apart.
    fn body(
        mem: &mut Memory<'_>,
        cache: &mut StepCache,
        variant: usize,
        body: &[KernelOp],
        views: &[&'a CView],
        out: &'a CView,
        adds: Vec<(usize, usize)>,
    ) -> Option<TileEpilogue<'a>> {
        let mut operands = Vec::new();
        let mut stored = Vec::new();
        for v in views.iter().chain(std::iter::once(&out)) {
            let (p, _, s) = mem.raw(v.root)?;
            if !(p as usize).is_multiple_of(s.size_bytes()) {
                return None;
            }
            operands.push((p as usize, s.size_bytes(), *v));
            stored.push(s);
        }
        stored.pop();
        let r = out.shape.len();
        let inner: Vec<i64> = operands
            .iter()
            .map(|(_, _, v)| v.strides[r - 1] as i64)
            .collect();
        let f = codegen::loop_for(cache, variant, body, views, &stored, out)?;
        let declared: Vec<DType> = views.iter().map(|v| v.dtype).collect();
        let vec = super::vbody::VecBody::new(body, &declared, &stored, out.dtype);
        let lead = out.shape[..r - 1].to_vec();
        let row_steps = operands
            .iter()
            .map(|(_, _, v)| row_step(v, &lead))
            .collect();
        Some(TileEpilogue {
            adds,
            f: Some(f),
            vec,
            operands,
            inner,
            lead,
            row_steps,
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether anything is left for [`Self::tile`] once the GEMM has added
    /// the addends.
    fn has_rest(&self) -> bool {
        self.f.is_some()
    }

    /// Rows `i..i + rows`, columns `j..j + cols` of the (folded) output.
    fn tile(&self, i: usize, rows: usize, j: usize, cols: usize) {
        let Some(f) = self.f else {
            return;
        };
        let mut ptrs = [std::ptr::null_mut::<u8>(); 8];
        let count = self.operands.len().min(ptrs.len());
        let pointers = |row: usize, ptrs: &mut [*mut u8; 8]| {
            if let Some(steps) = &self.row_steps {
                for ((slot, &(base, size, v)), &step) in
                    ptrs.iter_mut().zip(&self.operands).zip(steps)
                {
                    let e = v.offset + row * step + j * v.strides[self.lead.len()];
                    *slot = (base + e * size) as *mut u8;
                }
            } else {
                self.row_pointers(row, j, ptrs);
            }
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = &self.vec {
            // SAFETY: the tile's elements of every operand view are inside
            // their roots (verified views; the tile is inside the output).
            if unsafe { v.run(rows, |r, p| pointers(i + r, p), &self.inner, cols) } {
                return;
            }
        }
        for row in i..i + rows {
            pointers(row, &mut ptrs);
            // SAFETY: the tile's elements of every operand view are inside
            // their roots (verified views; the tile is inside the output).
            let code = unsafe { f(ptrs[..count].as_ptr(), self.inner.as_ptr(), cols as i64) };
            if code != 0 {
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Every operand's address of element `(row, j)` of the folded output,
    /// from the row's multi-index over the leading axes.
    fn row_pointers(&self, row: usize, j: usize, ptrs: &mut [*mut u8; 8]) {
        {
            for (slot, &(base, size, v)) in ptrs.iter_mut().zip(&self.operands) {
                // The row's multi-index over the output's leading axes.
                let mut rem = row;
                let mut e = v.offset + j * v.strides[self.lead.len()];
                for ax in (0..self.lead.len()).rev() {
                    e += (rem % self.lead[ax]) * v.strides[ax];
                    rem /= self.lead[ax];
                }
                *slot = (base + e * size) as *mut u8;
            }
        }
    }

    fn result(&self) -> R {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StepError::Message("integer division by zero".into()));
        }
        Ok(())
    }
}

/// Addends the packed GEMM has added so far ([`addends_fused`]).
static ADDENDS_FUSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many epilogue addends (a bias, a residual) the process's packed
/// products have added to their sums as they stored them, counted once per
/// product run: for tests that check the path is taken.
pub fn addends_fused() -> usize {
    ADDENDS_FUSED.load(std::sync::atomic::Ordering::Relaxed)
}

static TILE_PRODUCTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many chunks of rows of packed products the process has run on the
/// AMX tile unit (for tests that check the path is taken).
pub fn tile_products() -> usize {
    TILE_PRODUCTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this process runs products of many rows on the AMX tile unit
/// (the CPU has it, the system grants it, and `KILN_AMX` is not `0`).
pub fn tile_unit_usable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::amx::usable()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Row `row` of the output folded over its leading axes `lead` is element
/// `row·step` of view `v` when each leading axis of more than one row has
/// stride `step` times the rows inside it (axes of one row do not matter):
/// `Some(step)`, a row's start then being one multiplication, not a
/// division per axis.
fn row_step(v: &CView, lead: &[usize]) -> Option<usize> {
    let mut step = None;
    let mut inside = 1usize;
    for ax in (0..lead.len()).rev() {
        if lead[ax] > 1 {
            let s = *step.get_or_insert(v.strides[ax] / inside);
            if v.strides[ax] != s.checked_mul(inside)? {
                return None;
            }
        }
        inside = inside.checked_mul(lead[ax])?;
    }
    Some(step.unwrap_or(0))
}

// SAFETY: the epilogue's operands are raw addresses into buffers that outlive
// the step; tiles (disjoint per thread) write only their own elements.
unsafe impl Sync for TileEpilogue<'_> {}

fn out_stride(o: Fv<'_>) -> usize {
    o.v.strides.last().copied().unwrap_or(1)
}

/// Most rows of A a packed GEMM packs and multiplies at a time (8 MiB of
/// A at K = 1536, 18 MiB at 3072); more rows are cut into even chunks of
/// whole micro-tiles. (Chunks of 960 rows left BERT's 1024 a chunk of 64
/// that streamed every weight once more for 6% of the rows.)
const GEMM_CHUNK_ROWS: usize = 1536;

/// Raw views or pointers shared by the threads of one step, each writing its
/// own part of the output.
#[derive(Clone, Copy)]
pub(super) struct Shared<T>(pub(super) T);

// SAFETY: the views point into buffers that outlive the step; threads read
// the operands and write disjoint output elements (rows, panels or (batch,
// head) pairs each).
unsafe impl<T> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The views (a method, so that a closure captures the whole wrapper).
    pub(super) fn get(&self) -> T {
        self.0
    }
}

/// Queries from which attention runs tiled (prefill); fewer (decode) run
/// row by row over the cache.
const TILED_MIN_QUERIES: usize = 4;
/// Queries and keys per tile. Without a causal mask a tile of 128 queries
/// halves the tile products' calls (BERT-base's attention 6-15% faster in
/// three interleaved profiles); a causal one keeps 64, whose first tile
/// skips the keys after it.
const TILE_Q: usize = 128;
const TILE_Q_CAUSAL: usize = 64;
const TILE_K: usize = 128;

/// Scales the visible scores of one row of a tile (those `mask` hides set
/// to −∞) and returns the row's running maximum, from `prev`; NaN when any
/// score is NaN. `mask`: the mask view, the row's first element in it and
/// its step. With `simd` (AVX-512, checked by the caller; the scale is
/// positive, so a mask of another type set to −∞ before scaling stays −∞)
/// the passes read sixteen lanes at a time, a byte mask of unit stride in
/// the same pass as the scale.
fn scale_row_max(
    shown: &mut [f32],
    mask: Option<(Iv<'_>, usize, usize)>,
    scale: f32,
    prev: f32,
    simd: bool,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        let m = match mask {
            Some((mv, at0, step))
                if mv.dtype.size_bytes() == 1 && (step == 1 || shown.len() <= 1) =>
            {
                // SAFETY: the row's mask bytes are inside the view
                // (verified); AVX-512 checked by the caller.
                unsafe { super::softmax::mask_scale_max(shown, mv.base.add(at0), scale) }
            }
            mask => {
                if let Some((mv, at0, step)) = mask {
                    for (j, x) in shown.iter_mut().enumerate() {
                        // SAFETY: inside the mask view (verified).
                        if unsafe { mv.get(at0 + j * step) } == 0 {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                // SAFETY: AVX-512 checked by the caller.
                unsafe { super::softmax::scale_max(shown, scale) }
            }
        };
        return if m.is_nan() || prev.is_nan() {
            f32::NAN
        } else {
            m.max(prev)
        };
    }
    let _ = simd;
    // Scale and maximum in one pass; a NaN anywhere makes the maximum NaN
    // (checked apart).
    let mut m = prev;
    let mut nan = m.is_nan();
    match mask {
        None => {
            for x in shown.iter_mut() {
                *x *= scale;
                nan |= x.is_nan();
                m = if *x > m { *x } else { m };
            }
        }
        Some((mv, at0, step)) => {
            for (j, x) in shown.iter_mut().enumerate() {
                // SAFETY: inside the mask view (verified).
                let allowed = unsafe { mv.get(at0 + j * step) } != 0;
                *x = if allowed {
                    *x * scale
                } else {
                    f32::NEG_INFINITY
                };
                nan |= x.is_nan();
                m = if *x > m { *x } else { m };
            }
        }
    }
    if nan {
        f32::NAN
    } else {
        m
    }
}

/// Flash-style attention, one task per (batch, head): for each tile of
/// queries, each tile of keys not hidden by the causal mask gives a score
/// tile (a GEMM), an online softmax (running max and sum per query,
/// earlier partial sums rescaled), and its probabilities times the value
/// tile added to the output tile (a GEMM). No `[T, S]` buffer: a task holds
/// one `TILE_Q × TILE_K` score tile and one `TILE_Q × dv` accumulator.
/// Scores and sums in f32 (the row-by-row kernel and the interpreter use
/// f64): a few ulp apart.
#[allow(clippy::too_many_arguments)]
fn attention_tiled(
    q: Fv<'_>,
    k: Fv<'_>,
    v: Fv<'_>,
    o: Fv<'_>,
    mask: Option<Iv<'_>>,
    bias: Option<&PosBias>,
    causal: bool,
    scale: f64,
    threads: usize,
    exp_row: super::jit::kernels::ExpRowFn,
) -> R {
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
    let scale = scale as f32;
    let shared = Shared((q, k, v, o, mask));
    let task = move |job: usize| {
        let (q, k, v, o, mask) = shared.get();
        let (bi, hi) = (job / h, job % h);
        let kv = hi / group;
        // This thread's tiles from its last job (every element is written
        // before it is read), instead of 100 KB allocated and zeroed per job.
        let (mut scores, mut acc) = SCRATCH.with(|c| c.take());
        scores.resize(TILE_Q * TILE_K, 0.0);
        acc.resize(TILE_Q * dv, 0.0);
        let (q_row, k_row, v_row) = (q.v.strides[2], k.v.strides[2], v.v.strides[2]);
        // The SIMD passes scale rows a mask of another type than bytes has
        // set to −∞: a positive scale keeps −∞ where it is.
        let simd = super::softmax::available() && scale > 0.0;
        let mut mx = [f32::NEG_INFINITY; TILE_Q];
        let mut sum = [0f32; TILE_Q];
        let tile_q = if causal { TILE_Q_CAUSAL } else { TILE_Q };
        for q0 in (0..t).step_by(tile_q) {
            let tq = tile_q.min(t - q0);
            mx[..tq].fill(f32::NEG_INFINITY);
            sum[..tq].fill(0.0);
            // Keys any query of the tile sees (bottom-right causal alignment).
            let visible = |ti: usize| {
                if causal {
                    (ti as i128 + s as i128 - t as i128 + 1).clamp(0, s as i128) as usize
                } else {
                    s
                }
            };
            let last = visible(q0 + tq - 1);
            for k0 in (0..last).step_by(TILE_K) {
                let tk = TILE_K.min(last - k0);
                // SAFETY: the tile's rows of q and k are inside their views
                // (verified); the score tile is this task's own buffer.
                unsafe {
                    gemm::gemm(
                        tq,
                        tk,
                        dh,
                        scores.as_mut_ptr(),
                        1,
                        TILE_K as isize,
                        false,
                        q.base.add(q.at(&[bi, hi, q0, 0])).cast_const(),
                        1,
                        q_row as isize,
                        k.base.add(k.at(&[bi, kv, k0, 0])).cast_const(),
                        k_row as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for i in 0..tq {
                    let ti = q0 + i;
                    let row = &mut scores[i * TILE_K..i * TILE_K + tk];
                    // Keys of the tile this query sees: a prefix (causal),
                    // then the mask's say.
                    let seen = visible(ti).saturating_sub(k0).min(tk);
                    let (shown, hidden) = row.split_at_mut(seen);
                    hidden.fill(f32::NEG_INFINITY);
                    let mask_row = mask.map(|mv| (mv, mv.v.at(&[bi, hi, ti, k0]), mv.v.strides[3]));
                    let m = match bias {
                        // A position bias: scaled score plus the bias, then
                        // the mask and the maximum at scale 1.
                        Some(pb) => {
                            for (j, x) in shown.iter_mut().enumerate() {
                                *x = *x * scale + pb.at(hi, ti, k0 + j) as f32;
                            }
                            scale_row_max(shown, mask_row, 1.0, mx[i], simd)
                        }
                        None => scale_row_max(shown, mask_row, scale, mx[i], simd),
                    };
                    if m == f32::NEG_INFINITY {
                        // Nothing visible yet: the row's probabilities are 0.
                        row.fill(0.0);
                        continue;
                    }
                    let tile_sum = if simd {
                        // SAFETY: AVX-512 (checked with `simd`).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            super::softmax::exp_sum(row, m)
                        }
                        #[cfg(not(target_arch = "x86_64"))]
                        0.0
                    } else {
                        // SAFETY: `row` holds `tk` values.
                        unsafe { exp_row(row.as_mut_ptr(), tk as i64, m) }
                    };
                    let alpha = if mx[i] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (mx[i] - m).exp()
                    };
                    sum[i] = sum[i] * alpha + tile_sum;
                    // Before the first visible key the row's accumulator
                    // holds zeros (or NaN from 0·∞), which scaling by 0
                    // leaves as they are.
                    if alpha != 1.0 && mx[i] != f32::NEG_INFINITY {
                        acc[i * dv..(i + 1) * dv]
                            .iter_mut()
                            .for_each(|a| *a *= alpha);
                    }
                    mx[i] = m;
                }
                // SAFETY: the value tile is inside its view (verified); the
                // accumulator is this task's own buffer.
                unsafe {
                    gemm::gemm(
                        tq,
                        dv,
                        tk,
                        acc.as_mut_ptr(),
                        1,
                        dv as isize,
                        // The first key tile writes the accumulator (a
                        // query tile that sees no key never reads it).
                        k0 > 0,
                        scores.as_ptr(),
                        1,
                        TILE_K as isize,
                        v.base.add(v.at(&[bi, kv, k0, 0])).cast_const(),
                        1,
                        v_row as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            for i in 0..tq {
                let ob = o.at(&[bi, hi, q0 + i, 0]);
                debug_assert!(ob + dv <= o.len, "attention row {ob} of {}", o.len);
                // SAFETY: this task's own output row, `dv` elements at unit
                // stride (checked by the caller; verified in bounds).
                let out = unsafe { std::slice::from_raw_parts_mut(o.base.add(ob), dv) };
                let row = &acc[i * dv..(i + 1) * dv];
                if sum[i] > 0.0 || sum[i].is_nan() {
                    let inv = if sum[i] > 0.0 { 1.0 / sum[i] } else { 0.0 };
                    out.iter_mut().zip(row).for_each(|(y, &a)| *y = a * inv);
                } else {
                    // A query that sees no key gets zeros, as in the interpreter.
                    out.fill(0.0);
                }
            }
        }
        SCRATCH.with(|c| c.replace((scores, acc)));
    };
    if threads > 1 && b * h > 1 {
        super::par(b * h, &task);
    } else {
        (0..b * h).for_each(task);
    }
    Ok(())
}

thread_local! {
    /// The attention tiles (scores, accumulator) of the jobs this thread runs.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// A position bias added to the scaled scores (ALiBi or T5's relative
/// buckets), read by every attention path.
enum PosBias {
    /// One slope per head: key `j` gains `slope · j`.
    Alibi(Vec<f32>),
    /// T5: `table[bucket(j − position of query), head]`, the buckets of every
    /// distance of this call precomputed.
    Relative {
        table: Vec<f32>,
        heads: usize,
        /// Bucket of distance `d` at `d + offset`.
        buckets: Vec<usize>,
        offset: i64,
        /// Query `t` sits at position `t + shift` (bottom-right alignment).
        shift: i64,
    },
}

impl PosBias {
    fn relative(
        table: Vec<f32>,
        heads: usize,
        rel: kiln_ir::RelativeBias,
        keys: usize,
        queries: usize,
    ) -> PosBias {
        let offset = keys as i64;
        let buckets = (-offset..=offset).map(|d| rel.bucket(d)).collect();
        PosBias::Relative {
            table,
            heads,
            buckets,
            offset,
            shift: keys as i64 - queries as i64,
        }
    }

    /// The bias of head `hi`, query `ti`, key `j`.
    #[inline]
    fn at(&self, hi: usize, ti: usize, j: usize) -> f64 {
        match self {
            PosBias::Alibi(sl) => sl[hi] as f64 * j as f64,
            PosBias::Relative {
                table,
                heads,
                buckets,
                offset,
                shift,
            } => {
                let d = j as i64 - (ti as i64 + shift);
                table[buckets[(d + offset) as usize] * heads + hi] as f64
            }
        }
    }
}

/// Attention for few queries (decode) over contiguous head vectors. One task
/// per (batch, kv head, run of the heads that share it), so a task reads its
/// key and value rows once for all its heads and the tasks spread over the
/// threads even with one kv head; f32 scores from SIMD dot products, the
/// softmax's `exp` in AVX-512 where the host has it (the tiled prefill
/// kernel's), SIMD multiply-adds of the value rows.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    q: Fv<'_>,
    k: Fv<'_>,
    v: Fv<'_>,
    o: Fv<'_>,
    mask: Option<Iv<'_>>,
    bias: Option<&PosBias>,
    causal: bool,
    scale: f64,
    threads: usize,
) -> R {
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
    let simd = level == super::matvec::Level::Avx512 && super::softmax::available();
    let parallel = threads > 1 && b * h > 1 && b * h * t * s * dh >= 1 << 15;
    // Heads per task: every head of a kv group, or fewer when there are
    // not two tasks per thread otherwise.
    let runs = if parallel {
        (2 * threads).div_ceil(b * hk).clamp(1, group)
    } else {
        1
    };
    let per_run = group.div_ceil(runs);
    let scale = scale as f32;
    // Head vectors of 16, 32, 64 or 128 lanes without a mask or a bias
    // operand: one inlined AVX-512 pass per query row ([`head_row`])
    // instead of a dot product and a multiply-add call per key.
    let chunks = match dh {
        16 | 32 | 64 | 128 if simd && dv == dh && mask.is_none() && bias.is_none() => dh / 16,
        _ => 0,
    };
    let shared = Shared((q, k, v, o, mask));
    let task = move |job: usize| {
        let (q, k, v, o, mask) = shared.get();
        let (bi, kv, run) = (job / (hk * runs), job / runs % hk, job % runs);
        let heads =
            kv * group + (run * per_run).min(group)..kv * group + ((run + 1) * per_run).min(group);
        let (k0, v0) = (k.at(&[bi, kv, 0, 0]), v.at(&[bi, kv, 0, 0]));
        let (k_row, v_row) = (k.v.strides[2], v.v.strides[2]);
        let mut scores = vec![0f32; s];
        let mut acc = vec![0f32; dv];
        for hi in heads {
            for ti in 0..t {
                let qb = q.at(&[bi, hi, ti, 0]);
                // SAFETY: a head vector of q inside its view (verified).
                let qr = unsafe { std::slice::from_raw_parts(q.base.add(qb).cast_const(), dh) };
                let visible = if causal {
                    (ti as i128 + s as i128 - t as i128 + 1).clamp(0, s as i128) as usize
                } else {
                    s
                };
                if chunks > 0 {
                    let ob = o.at(&[bi, hi, ti, 0]);
                    // SAFETY: the head vectors of q and of this task's output
                    // row (dh elements each), and the key and value rows
                    // `0..visible` of the kv head, are inside their views
                    // (verified); AVX-512 checked with `simd`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let (qp, op_) = (q.base.add(qb).cast_const(), o.base.add(ob));
                        let (kp, vp) = (k.base.add(k0).cast_const(), v.base.add(v0).cast_const());
                        let rows = Rows {
                            k: kp,
                            k_row,
                            v: vp,
                            v_row,
                            visible,
                        };
                        match chunks {
                            1 => head_row::<1>(qp, &rows, scale, &mut scores, op_),
                            2 => head_row::<2>(qp, &rows, scale, &mut scores, op_),
                            4 => head_row::<4>(qp, &rows, scale, &mut scores, op_),
                            _ => head_row::<8>(qp, &rows, scale, &mut scores, op_),
                        }
                    }
                    continue;
                }
                let mut m = f32::NEG_INFINITY;
                let mut nan = false;
                for (j, score) in scores.iter_mut().enumerate() {
                    // SAFETY: inside the mask view (verified).
                    let allowed = j < visible
                        && mask.is_none_or(|m| unsafe { m.get(m.v.at(&[bi, hi, ti, j])) } != 0);
                    *score = if allowed {
                        // SAFETY: a key row inside its view (verified).
                        let kr = unsafe {
                            std::slice::from_raw_parts(k.base.add(k0 + j * k_row).cast_const(), dh)
                        };
                        let x = scale * super::matvec::dot(level, qr, kr)
                            + bias.map_or(0.0, |pb| pb.at(hi, ti, j) as f32);
                        nan |= x.is_nan();
                        m = m.max(x);
                        x
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let ob = o.at(&[bi, hi, ti, 0]);
                if let Some(x) = row_fill(nan, m) {
                    for c in 0..dv {
                        // SAFETY: this task's own output row (verified in bounds).
                        unsafe { o.set(ob + c, x) };
                    }
                    continue;
                }
                let sum = if simd {
                    // SAFETY: AVX-512 (checked with `simd`).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        super::softmax::exp_sum(&mut scores, m)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    0.0
                } else {
                    let mut sum = 0f64;
                    for x in scores.iter_mut() {
                        *x = (*x - m).exp();
                        sum += *x as f64;
                    }
                    sum as f32
                };
                acc.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    // SAFETY: a value row inside its view (verified).
                    let vr = unsafe {
                        std::slice::from_raw_parts(v.base.add(v0 + j * v_row).cast_const(), dv)
                    };
                    super::matvec::axpy(level, &mut acc, p, vr);
                }
                let inv = 1.0 / sum;
                for (c, &a) in acc.iter().enumerate() {
                    // SAFETY: this task's own output row (verified in bounds).
                    unsafe { o.set(ob + c, a * inv) };
                }
            }
        }
    };
    let jobs = b * hk * runs;
    if parallel && jobs > 1 {
        super::par(jobs, &task);
    } else {
        (0..jobs).for_each(task);
    }
    Ok(())
}

/// The value every element of an attention row takes regardless of the
/// values, as in the interpreter: NaN when a score is NaN, zero when the
/// query sees no key (the row's maximum `m` is −∞); `None` otherwise.
fn row_fill(nan: bool, m: f32) -> Option<f32> {
    if nan {
        Some(f32::NAN)
    } else if m == f32::NEG_INFINITY {
        Some(0.0)
    } else {
        None
    }
}

/// The key and value rows a query row of [`head_row`] attends to.
#[cfg(target_arch = "x86_64")]
struct Rows {
    k: *const f32,
    k_row: usize,
    v: *const f32,
    v_row: usize,
    /// Keys `0..visible` (the causal limit).
    visible: usize,
}

/// One query row of one head (`16·C` lanes) over the keys and values of
/// `rows`: scaled scores, their softmax and the weighted sum of the value
/// rows, written to `out`, as the general path computes them (a NaN score
/// makes the row NaN; no visible key gives zeros; a zero weight skips its
/// value row). `scores` is scratch of at least `visible` elements.
///
/// # Safety
/// `q` and `out` hold `16·C` elements; each of the rows `0..visible` holds
/// `16·C` elements from `k + j·k_row` and `v + j·v_row`; the host has
/// AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn head_row<const C: usize>(
    q: *const f32,
    rows: &Rows,
    scale: f32,
    scores: &mut [f32],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let n = rows.visible;
    let scores = &mut scores[..n];
    // SAFETY (every block): as the caller promised.
    let qv: [__m512; C] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.add(16 * c)) });
    let (mut m, mut nan) = (f32::NEG_INFINITY, false);
    for (j, score) in scores.iter_mut().enumerate() {
        let kr = unsafe { rows.k.add(j * rows.k_row) };
        let mut acc = _mm512_mul_ps(qv[0], unsafe { _mm512_loadu_ps(kr) });
        for (c, &qc) in qv.iter().enumerate().skip(1) {
            acc = _mm512_fmadd_ps(qc, unsafe { _mm512_loadu_ps(kr.add(16 * c)) }, acc);
        }
        let x = scale * _mm512_reduce_add_ps(acc);
        nan |= x.is_nan();
        m = m.max(x);
        *score = x;
    }
    if let Some(x) = row_fill(nan, m) {
        for c in 0..C {
            unsafe { _mm512_storeu_ps(out.add(16 * c), _mm512_set1_ps(x)) };
        }
        return;
    }
    let sum = unsafe { super::softmax::exp_sum(scores, m) };
    let mut acc = [_mm512_setzero_ps(); C];
    for (j, &p) in scores.iter().enumerate() {
        if p == 0.0 {
            continue;
        }
        let (pv, vr) = (_mm512_set1_ps(p), unsafe { rows.v.add(j * rows.v_row) });
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(pv, unsafe { _mm512_loadu_ps(vr.add(16 * c)) }, *a);
        }
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    for (c, a) in acc.iter().enumerate() {
        unsafe { _mm512_storeu_ps(out.add(16 * c), _mm512_mul_ps(*a, inv)) };
    }
}

fn attention(
    mem: &mut Memory<'_>,
    ins: &[&CView],
    out: &CView,
    kernel: &Kernel,
    threads: usize,
) -> Option<R> {
    let &Kernel::Attention {
        causal,
        scale,
        alibi,
        relative,
    } = kernel
    else {
        return None;
    };
    let (q, k, v) = (
        f32_view(mem, ins[0])?,
        f32_view(mem, ins[1])?,
        f32_view(mem, ins[2])?,
    );
    let (ins, bias) = if alibi || relative.is_some() {
        let bv = ins.last()?;
        let f = f32_view(mem, bv)?;
        let mut values = Vec::new();
        let read = each_index(&bv.shape, |idx| {
            // SAFETY: inside the bias operand's view (verified).
            values.push(unsafe { f.get(bv.at(idx)) });
            Ok(())
        });
        if let Err(e) = read {
            return Some(Err(e));
        }
        let (s, t) = (k.v.shape[2], q.v.shape[2]);
        let h = q.v.shape[1];
        let pb = match relative {
            Some(rel) => PosBias::relative(values, h, rel, s, t),
            None => PosBias::Alibi(values),
        };
        (&ins[..ins.len() - 1], Some(pb))
    } else {
        (ins, None)
    };
    let bias = bias.as_ref();
    let mask = match ins.get(3) {
        Some(m) => Some(int_view(mem, m)?),
        None => None,
    };
    let o = f32_view(mem, out)?;
    let unit = |f: &Fv<'_>| f.v.strides.get(3) == Some(&1);
    if unit(&q) && unit(&k) && unit(&v) && unit(&o) {
        if q.v.shape.get(2).is_some_and(|&t| t >= TILED_MIN_QUERIES) {
            let exp_row = match super::jit::kernels::exp_row_kernel() {
                Ok(f) => f,
                Err(e) => return Some(Err(StepError::Message(e.to_string()))),
            };
            return Some(attention_tiled(
                q, k, v, o, mask, bias, causal, scale, threads, exp_row,
            ));
        }
        return Some(attention_rows(
            q, k, v, o, mask, bias, causal, scale, threads,
        ));
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
                        scale * dot + bias.map_or(0.0, |pb| pb.at(hi, ti, j))
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

#[cfg(test)]
mod part_tests {
    use super::guided_parts;

    #[test]
    fn guided_parts_cover_every_panel_once_and_shrink() {
        for threads in 1..=8 {
            for total in 0..300 {
                let b = guided_parts(total, threads);
                assert_eq!((b[0], *b.last().unwrap()), (0, total));
                let sizes: Vec<usize> = b.windows(2).map(|w| w[1] - w[0]).collect();
                assert!(total == 0 || sizes.iter().all(|&s| s > 0), "{sizes:?}");
                assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{sizes:?}");
                // The last parts are a panel each once there are enough.
                if total >= 4 * threads {
                    assert_eq!(sizes.last(), Some(&1), "{total} over {threads}: {sizes:?}");
                }
            }
        }
        assert_eq!(guided_parts(64, 2).len() - 1, 13);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod packed_gemms_tests {
    use super::super::packed::{self, PackedB};

    /// Every member's product through `packed_gemms`, over several blocks
    /// of rows, a block of inner steps and a short one, and parts that cut
    /// panels into blocks of rows (two and three threads), against f64
    /// sums: each element is written once and right.
    #[test]
    fn products_over_blocks_of_rows_and_parts_of_panels_match_f64_sums() {
        if !packed::available() {
            return;
        }
        for (m, k) in [(409usize, 800usize), (1024, 96), (13, 40)] {
            let ns = [100usize, 64, 33];
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 + 3) % 23) as f32 * 0.1 - 1.1)
                .collect();
            let ws: Vec<Vec<f32>> = ns
                .iter()
                .enumerate()
                .map(|(w, &n)| {
                    (0..k * n)
                        .map(|i| ((i * 5 + w) % 17) as f32 * 0.1 - 0.8)
                        .collect()
                })
                .collect();
            let bs: Vec<PackedB> = ns
                .iter()
                .zip(&ws)
                .map(|(&n, w)| PackedB::pack(k, n, |kk, j| w[kk * n + j]))
                .collect();
            for threads in [1usize, 2, 3] {
                // C's rows a little longer than n: the stride is honoured.
                let mut cs: Vec<Vec<f32>> =
                    ns.iter().map(|&n| vec![f32::NAN; m * (n + 3)]).collect();
                let members: Vec<_> = bs
                    .iter()
                    .zip(cs.iter_mut())
                    .map(|(b, c)| (b, c.as_mut_ptr() as usize, b.n + 3, None))
                    .collect();
                super::packed_gemms(a.as_ptr() as usize, k, m, k, &members, threads, threads > 1);
                for ((c, w), &n) in cs.iter().zip(&ws).zip(&ns) {
                    let want = packed::f64_sums(m, k, n, &a, w);
                    for i in 0..m {
                        for j in 0..n {
                            let (sum, abs) = want[i * n + j];
                            let got = c[i * (n + 3) + j] as f64;
                            assert!(
                                (got - sum).abs() <= 1e-6 * abs + 1e-30,
                                "{m}x{k}x{n}, {threads} threads, C[{i}, {j}] = {got}, not {sum}"
                            );
                        }
                        assert!(c[i * (n + 3) + n..(i + 1) * (n + 3)]
                            .iter()
                            .all(|x| x.is_nan()));
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod gemm_speed {
    /// Products as a model runs them: each weight once per pass (out of
    /// cache, as a prefill streams a layer's weights), over the runtime's
    /// parts and threads.
    /// `cargo test --release -p kiln-backends cold_gemm_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn cold_gemm_speed() {
        use super::super::packed::PackedB;
        let threads = 2;
        for (m, k, n) in [
            (128usize, 768usize, 2048usize),
            (128, 2048, 768),
            (1024, 768, 3072),
        ] {
            let weights = (256 << 20) / (k * n * 4);
            let bs: Vec<PackedB> = (0..weights)
                .map(|w| PackedB::pack(k, n, |kk, j| ((kk + j + w) % 7) as f32 * 0.01))
                .collect();
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut c = vec![0f32; m * n];
            let (mut cold, mut hot) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                let t = std::time::Instant::now();
                for b in &bs {
                    let members = [(b, c.as_mut_ptr() as usize, n, None)];
                    super::packed_gemms(a.as_ptr() as usize, k, m, k, &members, threads, true);
                }
                cold.push(t.elapsed().as_secs_f64() / weights as f64);
                let t = std::time::Instant::now();
                for _ in 0..weights {
                    let members = [(&bs[0], c.as_mut_ptr() as usize, n, None)];
                    super::packed_gemms(a.as_ptr() as usize, k, m, k, &members, threads, true);
                }
                hot.push(t.elapsed().as_secs_f64() / weights as f64);
            }
            let gf = |s: &Vec<f64>| {
                let best = s.iter().cloned().fold(f64::MAX, f64::min);
                2.0 * (m * n * k) as f64 / best / 1e9
            };
            println!(
                "{m}x{k}x{n}: cold {:.0} GFLOP/s, hot {:.0} ({weights} weights)",
                gf(&cold),
                gf(&hot)
            );
        }
    }
}

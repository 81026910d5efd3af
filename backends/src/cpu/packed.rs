//! Weights packed once, at compile time, into the layout kiln's own matrix
//! kernels read: column panels of [`NR`] columns, each panel `K × NR`
//! contiguous (k-major), the last panel zero-padded.
//!
//! A packed matrix serves both uses of a linear layer's weight:
//! - prefill and encoders (`M > 1` rows): an AVX-512 GEMM whose microkernel
//!   multiplies `MR` rows of A by one panel with the accumulators in
//!   registers, over blocks of `KC` inner steps (A copied once per product
//!   into `MR`-row micro-panels, a block of `MC` rows of it kept in L2, the
//!   panel block streamed from L2). The GEMM library packs its right
//!   operand on every call; for a prefill of 128 tokens that packing took a
//!   third of the product's time. In cache the microkernel runs at the
//!   core's peak (measured 166–169 GFLOP/s per core, the FMA peak 166);
//! - decode (`M = 1`): [`matvec`], which streams each panel as four runs of
//!   rows in lockstep with 512-bit loads. The loop is bandwidth-bound, but
//!   not insensitive to code: on two cores, over 400 MB of panels, 128-bit
//!   loads read 19 GB/s from one run and 23 from four, 512-bit loads 22 and
//!   25–26 (and decode ran 8% faster than with the Cranelift-generated
//!   128-bit kernel, in interleaved runs).
//!
//! Packed matrices are shared by every executable of the process that packs
//! the same weight the same way (a session's prefill and decode), and a
//! mapped weight's file pages are released once packed, so the packed copy
//! replaces the original in memory rather than doubling it.
//!
//! Hosts without AVX-512 do not pack: their products go through the `gemm`
//! library and the Cranelift-generated matrix–vector kernels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use kiln_ir::DType;

/// Columns per panel: two 16-lane vectors.
pub(crate) const NR: usize = 32;
/// Rows of A per microkernel call.
pub(crate) const MR: usize = 12;
/// Inner steps per block. The microkernel streams a panel block
/// (`KC × NR`, 96 KiB of f32) from L2 at two vector loads per 24
/// multiply-adds, and A's micro-panel (`KC × MR`, 36 KiB) from L1; the
/// longer the block, the fewer passes over C (a BERT-sized C does not fit
/// in cache). 768 measured 2–9% faster than 256 on 2 threads.
const KC: usize = 768;
/// Most rows of A per block (`MC × KC` f32 kept in L2 while every panel
/// passes: 576 KiB at most). The rows are cut into blocks of equal whole
/// micro-tiles ([`row_block`]): a prefill's 128 rows are one block, so each
/// panel passes once (blocks of 120 rows passed every panel a second time
/// for the last 8 rows).
const MC: usize = 192;

/// Rows per block for a product of `m` rows: the fewest blocks of at most
/// [`MC`] rows, as even as whole micro-tiles allow.
pub(crate) fn row_block(m: usize) -> usize {
    let tiles = m.div_ceil(MR).max(1);
    let blocks = tiles.div_ceil(MC / MR);
    tiles.div_ceil(blocks) * MR
}

/// The panels' elements, in the weight's own dtype (16-bit weights stay
/// 16-bit and are widened inside the kernels).
enum Panels {
    F32(Vec<f32>),
    /// f16 or bf16 bit patterns.
    Half(Vec<u16>),
    /// Bytes of an artifact, read in place: `len` bytes from `offset` of
    /// the source, aligned for the element type (checked on adoption).
    Mapped {
        /// Kept alive for `at`.
        _source: Arc<dyn kiln_ir::tensor::ByteSource>,
        /// The first byte (a source returns the same bytes on every call).
        at: *const u8,
        len: usize,
    },
}

// SAFETY: the mapped panels are read-only bytes that live as long as their
// source, which is itself shared between threads.
unsafe impl Send for Panels {}
// SAFETY: as above.
unsafe impl Sync for Panels {}

impl Panels {
    fn bytes(&self) -> &[u8] {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain numbers viewed as bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
        }
        match self {
            Panels::F32(v) => raw(v),
            Panels::Half(v) => raw(v),
            // SAFETY: `len` bytes from `at` inside the source (checked on
            // adoption), which `_source` keeps alive.
            Panels::Mapped { at, len, .. } => unsafe { std::slice::from_raw_parts(*at, *len) },
        }
    }
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({} bytes)", self.bytes().len())
    }
}

/// A `K × N` matrix in column panels.
#[derive(Debug)]
pub(crate) struct PackedB {
    pub(crate) k: usize,
    pub(crate) n: usize,
    /// The stored element type: f32, f16 or bf16.
    pub(crate) dtype: DType,
    data: Panels,
    /// Whether the tile unit can multiply by it ([`super::amx::weight_ok`],
    /// checked on first use).
    pub(crate) amx_ok: std::sync::OnceLock<bool>,
}

/// Fills `k × NR` panels of `B[kk, j] = values[offset + kk·sk + j·sn]`
/// (in range: checked by the caller), in parallel, with straight copies for
/// the two layouts of linear weights (`sk = 1`: `[out, in]`; `sn = 1`:
/// `[in, out]`).
fn fill_panels<T: Copy + Default + Send + Sync>(
    values: &[T],
    offset: usize,
    sk: usize,
    sn: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    use rayon::prelude::*;
    let panels = n.div_ceil(NR);
    let mut data = vec![T::default(); panels * k * NR];
    if k == 0 {
        return data;
    }
    data.par_chunks_mut(k * NR)
        .enumerate()
        .for_each(|(p, panel)| {
            let cols = NR.min(n - p * NR);
            if sn == 1 {
                for kk in 0..k {
                    let start = offset + kk * sk + p * NR;
                    panel[kk * NR..kk * NR + cols].copy_from_slice(&values[start..start + cols]);
                }
            } else {
                // Column by column: a weight stored `[out, in]` (sk = 1) is
                // read along its rows.
                for c in 0..cols {
                    let start = offset + (p * NR + c) * sn;
                    for kk in 0..k {
                        panel[kk * NR + c] = values[start + kk * sk];
                    }
                }
            }
        });
    advise_huge_pages(&data);
    data
}

impl PackedB {
    /// Packs the f32 matrix `B[kk, j] = values[kk·n + j]` (tests).
    #[cfg(test)]
    pub(crate) fn pack(k: usize, n: usize, src: impl Fn(usize, usize) -> f32) -> PackedB {
        let values: Vec<f32> = (0..k * n).map(|i| src(i / n, i % n)).collect();
        PackedB::from_f32(&values, 0, n, 1, k, n)
    }

    /// Packs `B[kk, j] = values[offset + kk·sk + j·sn]` (in range).
    fn from_f32(
        values: &[f32],
        offset: usize,
        sk: usize,
        sn: usize,
        k: usize,
        n: usize,
    ) -> PackedB {
        PackedB {
            k,
            n,
            dtype: DType::F32,
            data: Panels::F32(fill_panels(values, offset, sk, sn, k, n)),
            amx_ok: std::sync::OnceLock::new(),
        }
    }

    /// The same from 16-bit patterns of `dtype` (f16 or bf16).
    fn from_half(
        dtype: DType,
        values: &[u16],
        offset: usize,
        sk: usize,
        sn: usize,
        k: usize,
        n: usize,
    ) -> PackedB {
        PackedB {
            k,
            n,
            dtype,
            data: Panels::Half(fill_panels(values, offset, sk, sn, k, n)),
            amx_ok: std::sync::OnceLock::new(),
        }
    }

    /// Panels of this matrix.
    pub(crate) fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// The first byte of panel `p` (`k × NR` elements of `dtype` from here).
    pub(crate) fn panel(&self, p: usize) -> *const u8 {
        debug_assert!(p < self.panels());
        let at = p * self.k * NR * self.dtype.size_bytes();
        // SAFETY: p < panels: inside the allocation.
        unsafe { self.data.bytes().as_ptr().add(at) }
    }

    /// Every panel's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Bytes of every panel, as the kernels read them.
    fn byte_len(k: usize, n: usize, dtype: DType) -> usize {
        n.div_ceil(NR) * k * NR * dtype.size_bytes()
    }
}

/// Advises the kernel to back the filled panels with transparent huge pages
/// (fewer TLB misses for kernels streaming them), *after* they are written:
/// advised before the first touch, each fault compacted memory for a huge
/// page on the spot (`defrag = madvise`, the usual setting) and packing the
/// 124.7M model took 0.56–0.67 s instead of 0.29 s in a fresh process
/// (first touch of 400 MB measured 870–1270 ms on huge pages against 170 ms
/// on small ones); advised after, the collapse happens in the background
/// and decode speed is the same (interleaved runs: ratio 1.01).
fn advise_huge_pages<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + std::mem::size_of_val(v)) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice only (no change to the contents); the range is
            // inside the slice.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// Whether the host runs the packed kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa::has(super::isa::Feature::Avx512f)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What identifies one packing of one weight: the weight's bytes (address
/// and length) and the view of it the product reads.
type PackKey = (usize, usize, usize, usize, usize, usize, usize);

/// One packing of one weight that this process holds: what `kiln compile`
/// stores in an artifact, and what loading it hands back ([`adopt`]).
#[derive(Clone, Debug)]
pub struct PackedWeight {
    /// Address of the weight's first byte (to find it among the weights).
    pub weight_addr: usize,
    /// The view of the weight the product reads: `B[kk, j] =
    /// w[offset + kk·sk + j·sn]`, `k × n`.
    pub offset: usize,
    /// Element step along `k`.
    pub sk: usize,
    /// Element step along `n`.
    pub sn: usize,
    /// Rows of B.
    pub k: usize,
    /// Columns of B.
    pub n: usize,
    /// The panels' element type (the weight's own).
    pub dtype: DType,
    packed: Arc<PackedB>,
}

impl PackedWeight {
    /// The panels' bytes, as the kernels read them.
    pub fn bytes(&self) -> &[u8] {
        self.packed.data.bytes()
    }

    /// Whether the panels are read in place from an artifact rather than
    /// packed by this process.
    pub fn is_mapped(&self) -> bool {
        matches!(self.packed.data, Panels::Mapped { .. })
    }
}

/// Every packing alive in this process (weights packed by executables that
/// still exist), in a stable order.
pub fn packed_weights() -> Vec<PackedWeight> {
    let guard = PACKED.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<PackedWeight> = guard
        .iter()
        .flat_map(|m| m.iter())
        .filter_map(|(&(addr, _, offset, sk, sn, k, n), w)| {
            let packed = w.upgrade()?;
            Some(PackedWeight {
                weight_addr: addr,
                offset,
                sk,
                sn,
                k,
                n,
                dtype: packed.dtype,
                packed,
            })
        })
        .collect();
    out.sort_by_key(|p| (p.weight_addr, p.offset, p.sk, p.sn, p.k, p.n));
    out
}

/// Makes `len` bytes at `offset` of `source` (an artifact's packed panels,
/// read in place) the packing of `w` viewed as `B[kk, j] = w[offset_w +
/// kk·sk + j·sn]` (`k × n`): executables compiled while the returned
/// handle lives use these panels instead of packing. An error says what
/// does not fit (the view outside the weight, a length or alignment the
/// panels cannot have, a dtype the kernels do not read).
#[allow(clippy::too_many_arguments)]
pub fn adopt(
    w: &kiln_ir::Tensor,
    offset_w: usize,
    sk: usize,
    sn: usize,
    k: usize,
    n: usize,
    source: Arc<dyn kiln_ir::tensor::ByteSource>,
    offset: usize,
    len: usize,
) -> Result<PackedWeight, String> {
    let dtype = w.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!("a {dtype} weight is never packed"));
    }
    let count = w.bytes().len() / dtype.size_bytes();
    let span = (k.max(1) - 1)
        .checked_mul(sk)
        .zip((n.max(1) - 1).checked_mul(sn))
        .and_then(|(a, b)| a.checked_add(b)?.checked_add(offset_w));
    if k == 0 || n == 0 || span.is_none_or(|s| s >= count) {
        return Err(format!(
            "its view ({k} × {n} from element {offset_w}, steps {sk} and {sn}) lies outside the weight's {count} elements"
        ));
    }
    let want = PackedB::byte_len(k, n, dtype);
    if len != want {
        return Err(format!(
            "holds {len} bytes; {k} × {n} {dtype} panels take {want}"
        ));
    }
    let bytes = source.bytes();
    if offset.checked_add(len).is_none_or(|e| e > bytes.len()) {
        return Err(format!("bytes {offset}..+{len} lie outside the file"));
    }
    if !(bytes.as_ptr() as usize + offset).is_multiple_of(64) {
        return Err(format!("offset {offset} is not aligned to 64 bytes"));
    }
    let packed = Arc::new(PackedB {
        k,
        n,
        dtype,
        data: Panels::Mapped {
            // SAFETY: inside the source's bytes (checked above).
            at: unsafe { bytes.as_ptr().add(offset) },
            len,
            _source: source.clone(),
        },
        amx_ok: std::sync::OnceLock::new(),
    });
    let wb = w.bytes();
    let key = (wb.as_ptr() as usize, wb.len(), offset_w, sk, sn, k, n);
    let mut guard = PACKED.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    map.retain(|_, v| v.strong_count() > 0);
    map.insert(key, Arc::downgrade(&packed));
    Ok(PackedWeight {
        weight_addr: key.0,
        offset: offset_w,
        sk,
        sn,
        k,
        n,
        dtype,
        packed,
    })
}

static PACKED: Mutex<Option<HashMap<PackKey, Weak<PackedB>>>> = Mutex::new(None);

/// The packed form of `B[kk, j] = w[offset + kk·sk + j·sn]` (`k × n`), made
/// on first request and shared while any executable holds it.
pub(crate) fn shared(
    w: &kiln_ir::Tensor,
    offset: usize,
    sk: usize,
    sn: usize,
    k: usize,
    n: usize,
) -> Option<Arc<PackedB>> {
    let bytes = w.bytes();
    let size = w.dtype().size_bytes();
    let count = bytes.len() / size;
    let span = offset + (k.max(1) - 1) * sk + (n.max(1) - 1) * sn;
    if k == 0 || n == 0 || span >= count || !(bytes.as_ptr() as usize).is_multiple_of(size) {
        return None;
    }
    let key = (bytes.as_ptr() as usize, bytes.len(), offset, sk, sn, k, n);
    let mut guard = PACKED.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(&key).and_then(Weak::upgrade) {
        return Some(p);
    }
    let packed = match w.dtype() {
        DType::F32 => PackedB::from_f32(w.as_f32()?, offset, sk, sn, k, n),
        d @ (DType::F16 | DType::BF16) => {
            // SAFETY: the tensor's bytes are `count` aligned 16-bit values.
            let halves = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), count) };
            PackedB::from_half(d, halves, offset, sk, sn, k, n)
        }
        _ => return None,
    };
    let packed = Arc::new(packed);
    map.retain(|_, v| v.strong_count() > 0);
    map.insert(key, Arc::downgrade(&packed));
    Some(packed)
}

/// Elements of A in the layout [`gemm`] reads ([`pack_a`]).
pub(crate) fn packed_a_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k
}

/// Copies the row tiles `t0..t1` (`MR` rows each, the last one short) of A
/// (`m × k`, row stride `lda`, unit column stride) into the layout [`gemm`]
/// reads: for each block of [`KC`] steps from `k0`, tile `t`'s micro-panel
/// (`kc × MR`, step-major) at `k0·m̄ + t·MR·kc`, `m̄` being `m` rounded up to
/// `MR`. The microkernel then reads one sequential stream instead of `MR`
/// rows at A's stride (a stride that is a multiple of 4 KiB, as a
/// 3072-wide A has, put all `MR` rows in one L1 set), and A is copied once
/// per product, by every thread a share, not once per thread.
///
/// # Safety
/// `a` holds `m` rows of `k` elements at stride `lda`; `dst` holds
/// [`packed_a_len`]`(m, k)` elements; concurrent callers pack disjoint
/// tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn pack_a(
    m: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    dst: *mut f32,
    t0: usize,
    t1: usize,
) {
    let m_pad = m.div_ceil(MR) * MR;
    for t in t0..t1 {
        let rows = MR.min(m - t * MR);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // SAFETY: as the caller promised; the micro-panel lies inside
            // dst (k0·m̄ + (t+1)·MR·kc ≤ (k0 + kc)·m̄).
            unsafe {
                pack_a_tile(
                    a.add(t * MR * lda + k0),
                    lda,
                    rows,
                    kc,
                    dst.add(k0 * m_pad + t * MR * kc),
                )
            };
        }
    }
}

/// Row tiles of an `m`-row A ([`pack_a`]'s unit of work).
pub(crate) fn a_tiles(m: usize) -> usize {
    m.div_ceil(MR)
}

/// `C[i, j] = Σ_k A[i, k]·B[k, j]` for the rows `rows` (of `0..m`, from a
/// multiple of [`MR`]) and the panels `p0..p1`, in blocks of at most [`MC`]
/// rows of `rows`, each block over every block of inner steps before the
/// next (so its rows of C stay in L2 from one block of steps to the next);
/// A (`m` rows) as [`pack_a`] laid it out, C with row stride `ldc` and unit
/// column stride. 16-bit panels are widened as the microkernel loads them.
/// As the last block of inner steps is stored, each of `adds` (at most
/// [`MAX_ADDS`], in order) is added to the sums: `(p, step)` adds the f32
/// `p[i·step + j]` to `C[i, j]` (step 0: one row for every row, a bias;
/// else a residual's rows), in registers, instead of in a pass over C.
/// After the last block of inner steps of each block of rows,
/// `epilogue(row, rows, col, cols)` runs on the block's columns of the
/// panels `p0..p1` while they are in L2 (the gemm step's fused elementwise
/// body: bias, activation, residual). Run per micro-tile instead, the loop
/// kernel was called once per 32 elements, and a SiLU-gated epilogue took
/// a fifth of its product's time.
///
/// # Safety
/// `pa` holds A (`m × b.k`) packed by [`pack_a`]; `c` holds `m` rows of
/// `b.n` elements at stride `ldc`; each of `adds` holds `b.n` elements
/// from `p + i·step` for every row `i < m` and does not overlap C; the host
/// has AVX-512F ([`available`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    b: &PackedB,
    m: usize,
    rows: std::ops::Range<usize>,
    pa: *const f32,
    c: *mut f32,
    ldc: usize,
    p0: usize,
    p1: usize,
    adds: &[(*const f32, usize)],
    epilogue: Option<&dyn Fn(usize, usize, usize, usize)>,
) {
    assert!(adds.len() <= MAX_ADDS, "at most {MAX_ADDS} addends");
    assert!(
        rows.start.is_multiple_of(MR) && rows.end <= m,
        "rows {rows:?} of {m}: from a whole tile"
    );
    let size = b.dtype.size_bytes();
    let m_pad = m.div_ceil(MR) * MR;
    let mc = row_block(rows.len());
    for i0 in rows.clone().step_by(mc) {
        let i1 = (i0 + mc).min(rows.end);
        for k0 in (0..b.k).step_by(KC) {
            let kc = KC.min(b.k - k0);
            let first = k0 == 0;
            let last = k0 + kc == b.k;
            // The tiles of a panel block fetch the next panel's block into
            // L2 a share each, so that the next panel's first tile does not
            // wait on memory (the hardware prefetcher starts a stream only
            // once it is being read).
            let block = kc * NR * size;
            let share = block.div_ceil(i1.div_ceil(MR) - i0 / MR).div_ceil(64) * 64;
            for p in p0..p1 {
                let cols = NR.min(b.n - p * NR);
                // SAFETY: the block of panel p from row k0.
                let bp = unsafe { b.panel(p).add(k0 * NR * size) };
                let next = if p + 1 < p1 {
                    // SAFETY: the same block of panel p + 1.
                    unsafe { b.panel(p + 1).add(k0 * NR * size) }
                } else {
                    std::ptr::null()
                };
                let mut i = i0;
                while i < i1 {
                    let rows = MR.min(i1 - i);
                    let start = ((i - i0) / MR * share).min(block);
                    let t = Tile {
                        a: pa.wrapping_add(k0 * m_pad + i * kc),
                        b: bp,
                        kc,
                        c: c.wrapping_add(i * ldc + p * NR),
                        ldc,
                        cols,
                        first,
                        adds: std::array::from_fn(|a| match adds.get(a) {
                            Some(&(ap, step)) if last => (ap.wrapping_add(i * step + p * NR), step),
                            _ => (std::ptr::null(), 0),
                        }),
                        next: next.wrapping_add(start),
                        next_lines: if next.is_null() {
                            0
                        } else {
                            (share.min(block - start)) / 64
                        },
                    };
                    // SAFETY: tile i/MR's micro-panel of this block of A
                    // and rows i..i+rows of C (from column p·NR) are inside
                    // the caller's buffers.
                    unsafe {
                        match b.dtype {
                            DType::F16 => rows_micro::<HALF>(rows, &t),
                            DType::BF16 => rows_micro::<BRAIN>(rows, &t),
                            _ => rows_micro::<SINGLE>(rows, &t),
                        }
                    }
                    i += rows;
                }
            }
            // The epilogue over the block's rows of every panel of the part
            // once the last inner block is in (still in L2): long rows for
            // the loop kernel, one call per row of the block rather than
            // per row of each micro-tile.
            if let Some(epi) = epilogue.filter(|_| k0 + kc == b.k) {
                let (j0, j1) = (p0 * NR, (p1 * NR).min(b.n));
                if j1 > j0 {
                    epi(i0, i1 - i0, j0, j1 - j0);
                }
            }
        }
    }
}

/// [`pack_a`] then [`gemm`] on one thread, into a new buffer (tests).
///
/// # Safety
/// As for both.
#[cfg(all(test, target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_unpacked(
    b: &PackedB,
    m: usize,
    a: *const f32,
    lda: usize,
    c: *mut f32,
    ldc: usize,
    p0: usize,
    p1: usize,
    adds: &[(*const f32, usize)],
) {
    let mut pa = vec![0f32; packed_a_len(m, b.k)];
    // SAFETY: forwarded; pa holds the packed A.
    unsafe {
        pack_a(m, b.k, a, lda, pa.as_mut_ptr(), 0, a_tiles(m));
        gemm(b, m, 0..m, pa.as_ptr(), c, ldc, p0, p1, adds, None);
    }
}

/// Copies `rows` (≤ MR) rows of `kc` elements (row stride `lda`) to `d`
/// as a step-major micro-panel of `MR`-element rows (lanes past `rows`
/// are left as they are: the microkernel for `rows` rows never reads
/// them).
///
/// # Safety
/// Each of the rows holds `kc` elements from `a + r·lda`; `d` holds
/// `kc·MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_tile(a: *const f32, lda: usize, rows: usize, kc: usize, d: *mut f32) {
    // Step-major: the writes are sequential, the reads MR streams (a
    // row-by-row copy stalled on its strided stores). A whole tile goes
    // sixteen steps at a time through registers (`transpose_12x16`):
    // 1.3–1.8× the element-by-element copy's speed where A is in cache; in
    // a model, where the packed buffer's lines have left the cache, both
    // wait on the stores (2–3% of BERT's samples either way).
    // SAFETY: as the caller promised.
    unsafe {
        if rows == MR {
            let src: [*const f32; MR] = std::array::from_fn(|r| a.add(r * lda));
            let whole = kc / 16 * 16;
            for kk in (0..whole).step_by(16) {
                transpose_12x16(&src, kk, d.add(kk * MR));
            }
            for kk in whole..kc {
                for (r, s) in src.iter().enumerate() {
                    *d.add(kk * MR + r) = *s.add(kk);
                }
            }
        } else {
            for kk in 0..kc {
                for r in 0..rows {
                    *d.add(kk * MR + r) = *a.add(r * lda + kk);
                }
            }
        }
    }
}

/// Steps `kk..kk + 16` of the twelve rows `src` into `d` step-major
/// (`d[s·MR + r] = src[r][kk + s]`): twelve loads, a 16 × 16 transpose in
/// registers (rows 12–15 zero: their lanes are not stored), sixteen
/// twelve-lane stores.
///
/// # Safety
/// Each row holds `kk + 16` elements; `d` holds `16·MR`; AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_12x16(src: &[*const f32; MR], kk: usize, d: *mut f32) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promised.
    let r: [__m512; MR] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(src[i].add(kk)) });
    // Within each 128-bit lane, groups of four rows: u[4g + c] holds
    // column 4j + c of rows 4g..4g + 4 in lane j.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..MR / 4 {
        let (r0, r1, r2, r3) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let t0 = _mm512_unpacklo_ps(r0, r1);
        let t1 = _mm512_unpackhi_ps(r0, r1);
        let t2 = _mm512_unpacklo_ps(r2, r3);
        let t3 = _mm512_unpackhi_ps(r2, r3);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t0, t2);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t0, t2);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t1, t3);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t1, t3);
    }
    // Across lanes: column 4j + c gathers lane j of u[c], u[4 + c],
    // u[8 + c], u[12 + c].
    let keep: __mmask16 = (1 << MR) - 1;
    for c in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let w0 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
        let cols = [
            (c, _mm512_shuffle_f32x4::<0x88>(v0, v1)),
            (4 + c, _mm512_shuffle_f32x4::<0x88>(w0, w1)),
            (8 + c, _mm512_shuffle_f32x4::<0xDD>(v0, v1)),
            (12 + c, _mm512_shuffle_f32x4::<0xDD>(w0, w1)),
        ];
        for (col, x) in cols {
            // SAFETY: step col's twelve elements inside d.
            unsafe { _mm512_mask_storeu_ps(d.add(col * MR), keep, x) };
        }
    }
}

/// Runs of a panel's rows [`matvec`] reads in lockstep.
const MATVEC_STREAMS: usize = 4;

/// `y[j] = Σ_k x[k]·B[k, j]` for the columns of panels `p0..p1` (the
/// columns past `b.n` masked off). Each panel's rows are read as
/// [`MATVEC_STREAMS`] runs in lockstep, each into its own accumulators:
/// several sequential streams keep more line fills in flight than one.
///
/// # Safety
/// `x` holds `b.k` elements; `y` holds `b.n`; the host has AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn matvec(b: &PackedB, x: *const f32, y: *mut f32, p0: usize, p1: usize) {
    // SAFETY: forwarded.
    unsafe {
        match b.dtype {
            DType::F16 => matvec_dt::<HALF>(b, x, y, p0, p1),
            DType::BF16 => matvec_dt::<BRAIN>(b, x, y, p0, p1),
            _ => matvec_dt::<SINGLE>(b, x, y, p0, p1),
        }
    }
}

/// [`matvec`] for panels of `DT`.
///
/// # Safety
/// As for [`matvec`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn matvec_dt<const DT: u8>(b: &PackedB, x: *const f32, y: *mut f32, p0: usize, p1: usize) {
    use std::arch::x86_64::*;
    const S: usize = MATVEC_STREAMS;
    let size = if DT == SINGLE { 4 } else { 2 };
    let (k, row) = (b.k, NR * size);
    let q = k / S;
    for p in p0..p1 {
        let base = b.panel(p);
        let mut acc = [[_mm512_setzero_ps(); 2]; S];
        // SAFETY: rows 0..k of the panel (k × NR elements of DT) and
        // elements 0..k of x.
        unsafe {
            for i in 0..q {
                for (s, a) in acc.iter_mut().enumerate() {
                    let kk = s * q + i;
                    let r = base.add(kk * row);
                    let xv = _mm512_set1_ps(*x.add(kk));
                    a[0] = _mm512_fmadd_ps(xv, load16::<DT>(r), a[0]);
                    a[1] = _mm512_fmadd_ps(xv, load16::<DT>(r.add(16 * size)), a[1]);
                }
            }
            for kk in S * q..k {
                let r = base.add(kk * row);
                let xv = _mm512_set1_ps(*x.add(kk));
                acc[0][0] = _mm512_fmadd_ps(xv, load16::<DT>(r), acc[0][0]);
                acc[0][1] = _mm512_fmadd_ps(xv, load16::<DT>(r.add(16 * size)), acc[0][1]);
            }
        }
        let (mut v0, mut v1) = (acc[0][0], acc[0][1]);
        for a in &acc[1..] {
            v0 = _mm512_add_ps(v0, a[0]);
            v1 = _mm512_add_ps(v1, a[1]);
        }
        let (m0, m1) = masks(NR.min(b.n - p * NR));
        // SAFETY: the panel's columns below b.n (masked) are inside y.
        unsafe {
            let out = y.add(p * NR);
            _mm512_mask_storeu_ps(out, m0, v0);
            _mm512_mask_storeu_ps(out.add(16), m1, v1);
        }
    }
}

/// Panel element types, as the microkernel's const parameter.
const SINGLE: u8 = 0;
const HALF: u8 = 1;
const BRAIN: u8 = 2;

/// One microkernel call's operands.
#[cfg(target_arch = "x86_64")]
struct Tile {
    /// A's micro-panel: step `kk` of row `r` at `kk·MR + r`.
    a: *const f32,
    b: *const u8,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
    /// Addends of the tile's first row and column and their row steps
    /// (null: none), added to the sums as they are stored, in order.
    adds: [(*const f32, usize); MAX_ADDS],
    /// Lines from `next` to fetch into L2 meanwhile (one per inner step).
    next: *const u8,
    next_lines: usize,
}

/// [`micro`] for `rows` (1..=MR) rows.
///
/// # Safety
/// As for [`micro`].
#[cfg(target_arch = "x86_64")]
unsafe fn rows_micro<const DT: u8>(rows: usize, t: &Tile) {
    // SAFETY: forwarded.
    unsafe {
        match rows {
            12 => micro::<12, DT>(t),
            11 => micro::<11, DT>(t),
            10 => micro::<10, DT>(t),
            9 => micro::<9, DT>(t),
            8 => micro::<8, DT>(t),
            7 => micro::<7, DT>(t),
            6 => micro::<6, DT>(t),
            5 => micro::<5, DT>(t),
            4 => micro::<4, DT>(t),
            3 => micro::<3, DT>(t),
            2 => micro::<2, DT>(t),
            _ => micro::<1, DT>(t),
        }
    }
}

/// Sixteen panel elements of type `DT` at `p` as f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn load16<const DT: u8>(p: *const u8) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's panel holds sixteen elements at `p`.
    unsafe {
        match DT {
            SINGLE => _mm512_loadu_ps(p.cast()),
            HALF => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                16,
            )),
        }
    }
}

/// `R` rows of A (row stride `lda`) times one panel block: `R × 32`
/// accumulators in registers over `kc` steps, then stored (`first`) or
/// added to C, the columns past `cols` masked off.
///
/// # Safety
/// The panel block holds `kc` rows of 32 elements of `DT`; A's `R` rows
/// hold `kc` elements each from `a`; C's `R` rows hold `cols` from `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro<const R: usize, const DT: u8>(t: &Tile) {
    use std::arch::x86_64::*;
    let size = if DT == SINGLE { 4 } else { 2 };
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    for kk in 0..t.kc {
        // Hints (they never fault; past the block they fetch lines of the
        // next block or panel, or nothing). Ahead into L2: the next
        // panel's block, a share per tile.
        if kk < t.next_lines {
            _mm_prefetch::<_MM_HINT_T1>(t.next.wrapping_add(kk * 64).cast());
        }
        // Ahead into L1: the panel row and A's step [`AHEAD`] steps on.
        // The hardware's L1 prefetch left the loop waiting on both streams
        // from L2 (+3–10% median for B, +3–5% more for A in interleaved
        // runs on BERT's and a prefill's shapes).
        let b_ahead = t.b.wrapping_add((kk + AHEAD) * NR * size);
        _mm_prefetch::<_MM_HINT_T0>(b_ahead.cast());
        if size == 4 {
            _mm_prefetch::<_MM_HINT_T0>(b_ahead.wrapping_add(64).cast());
        }
        _mm_prefetch::<_MM_HINT_T0>(t.a.wrapping_add((kk + AHEAD) * MR).cast());
        // SAFETY: as the caller promised.
        unsafe {
            let row = t.b.add(kk * NR * size);
            let b0 = load16::<DT>(row);
            let b1 = load16::<DT>(row.add(16 * size));
            for r in 0..R {
                let x = _mm512_set1_ps(*t.a.add(kk * MR + r));
                acc0[r] = _mm512_fmadd_ps(x, b0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(x, b1, acc1[r]);
            }
        }
    }
    let masks = masks(t.cols);
    for r in 0..R {
        // SAFETY: row r of C and of each addend holds `cols` elements from
        // here.
        unsafe {
            store_row(
                t.c.add(r * t.ldc),
                masks,
                (acc0[r], acc1[r]),
                t.first,
                &t.adds,
                (r, 0),
            )
        };
    }
}

/// Stores one row of a panel's sums `(v0, v1)` at `cp`: added to what C
/// holds there unless `first`, then each addend `(p, step)` of `adds` that
/// is not null added in order, from `p + row·step + col` for `(row, col)`
/// = `at`; lanes past the masks ([`masks`]) are never touched (the second
/// vector's address, computed with `wrapping_add`, may lie past the buffer
/// when the row has 16 columns or fewer).
///
/// # Safety
/// C's row and each addend's row hold the masks' columns from there; the
/// host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn store_row(
    cp: *mut f32,
    (m0, m1): (u16, u16),
    (mut v0, mut v1): (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
    first: bool,
    adds: &[(*const f32, usize)],
    (row, col): (usize, usize),
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promised; masked lanes are not accessed.
    unsafe {
        if !first {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.wrapping_add(16)));
        }
        for &(ap, step) in adds {
            if !ap.is_null() {
                let ap = ap.add(row * step + col);
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ap));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ap.wrapping_add(16)));
            }
        }
        _mm512_mask_storeu_ps(cp, m0, v0);
        _mm512_mask_storeu_ps(cp.wrapping_add(16), m1, v1);
    }
}

/// Most addends [`gemm`] adds to a product as it stores it.
pub(crate) const MAX_ADDS: usize = 2;

/// Steps ahead the microkernel fetches its operands into L1.
const AHEAD: usize = 16;

/// Lane masks of the two vectors of a panel row with `cols` valid columns.
#[cfg(target_arch = "x86_64")]
pub(crate) fn masks(cols: usize) -> (u16, u16) {
    let m0 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let m1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        ((1u32 << (cols - 16)) - 1) as u16
    } else {
        0
    };
    (m0, m1)
}

/// `A·B` (`m × k` by `k × n`, row-major) in f64, each element with the sum
/// of its products' magnitudes (the scale of f32's rounding error), for
/// tests of the product kernels.
#[cfg(test)]
pub(crate) fn f64_sums(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<(f64, f64)> {
    let mut c = vec![(0f64, 0f64); m * n];
    for i in 0..m {
        for kk in 0..k {
            for j in 0..n {
                let p = a[i * k + kk] as f64 * b[kk * n + j] as f64;
                c[i * n + j].0 += p;
                c[i * n + j].1 += p.abs();
            }
        }
    }
    c
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        f64_sums(m, k, n, a, b)
            .into_iter()
            .map(|(sum, _)| sum)
            .collect()
    }

    #[test]
    fn packed_products_match_f64_sums_at_every_edge() {
        if !available() {
            return;
        }
        // Row, column and depth counts off every block boundary.
        for (m, k, n) in [
            (1, 1, 1),
            (9, 300, 33),
            (137, 513, 70),
            (8, 256, 32),
            (3, 7, 95),
            // Two and a bit blocks of inner steps.
            (13, 2 * KC + 5, 33),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 23) as f32 * 0.1 - 1.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 19) as f32 * 0.1 - 0.9)
                .collect();
            let want = reference(m, k, n, &a, &b);
            let packed = PackedB::pack(k, n, |kk, j| b[kk * n + j]);
            // The straight-copy packings of both weight layouts agree.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            assert_eq!(
                PackedB::from_f32(&b, 0, n, 1, k, n).data.bytes(),
                packed.data.bytes()
            );
            assert_eq!(
                PackedB::from_f32(&bt, 0, 1, k, k, n).data.bytes(),
                packed.data.bytes()
            );
            let mut c = vec![f32::NAN; m * n];
            // SAFETY: sizes as allocated; AVX-512 checked.
            unsafe {
                gemm_unpacked(
                    &packed,
                    m,
                    a.as_ptr(),
                    k,
                    c.as_mut_ptr(),
                    n,
                    0,
                    packed.panels(),
                    &[],
                )
            };
            let scale = want.iter().fold(0f64, |s, v| s.max(v.abs())).max(1.0);
            for (g, w) in c.iter().zip(&want) {
                assert!(
                    ((*g as f64) - w).abs() <= 1e-5 * scale,
                    "{m}x{k}x{n}: {g} vs {w}"
                );
            }
            // The matrix–vector kernel over the same panels (row 0 of A).
            let mut y = vec![f32::NAN; n];
            // SAFETY: y holds n; x holds k; AVX-512 checked.
            unsafe { matvec(&packed, a.as_ptr(), y.as_mut_ptr(), 0, packed.panels()) };
            for (g, w) in y.iter().zip(&want[..n]) {
                assert!(
                    ((*g as f64) - w).abs() <= 1e-5 * scale,
                    "matvec {k}x{n}: {g} vs {w}"
                );
            }
            // 16-bit weights: packed as stored, widened in the kernels.
            for dt in [DType::F16, DType::BF16] {
                let halves: Vec<u16> = b
                    .iter()
                    .map(|&v| match dt {
                        DType::F16 => half::f16::from_f32(v).to_bits(),
                        _ => half::bf16::from_f32(v).to_bits(),
                    })
                    .collect();
                let wide: Vec<f32> = halves
                    .iter()
                    .map(|&h| match dt {
                        DType::F16 => half::f16::from_bits(h).to_f32(),
                        _ => half::bf16::from_bits(h).to_f32(),
                    })
                    .collect();
                let want = reference(m, k, n, &a, &wide);
                let p16 = PackedB::from_half(dt, &halves, 0, n, 1, k, n);
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: sizes as allocated; AVX-512 checked.
                unsafe {
                    gemm_unpacked(
                        &p16,
                        m,
                        a.as_ptr(),
                        k,
                        c.as_mut_ptr(),
                        n,
                        0,
                        p16.panels(),
                        &[],
                    )
                };
                for (g, w) in c.iter().zip(&want) {
                    assert!(
                        ((*g as f64) - w).abs() <= 1e-5 * scale,
                        "{dt:?} {m}x{k}x{n}: {g} vs {w}"
                    );
                }
                let mut y = vec![f32::NAN; n];
                // SAFETY: y holds n; x holds k; AVX-512 checked.
                unsafe { matvec(&p16, a.as_ptr(), y.as_mut_ptr(), 0, p16.panels()) };
                for (g, w) in y.iter().zip(&want[..n]) {
                    assert!(
                        ((*g as f64) - w).abs() <= 1e-5 * scale,
                        "{dt:?} matvec: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn addends_are_added_in_order_as_the_last_block_is_stored() {
        if !available() {
            return;
        }
        // A bias (one row for every row) and a residual (its own rows, at
        // a longer stride), with depths of one block and of several.
        for (m, k, n) in [
            (9, 300, 33),
            (137, 513, 70),
            (13, 2 * KC + 5, 33),
            (2, 3, 5),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 23) as f32 * 0.1 - 1.0)
                .collect();
            let b = PackedB::pack(k, n, |kk, j| {
                ((kk * n + j) * 104729 % 19) as f32 * 0.1 - 0.9
            });
            let ldr = n + 3;
            let bias: Vec<f32> = (0..n).map(|j| (j % 11) as f32 * 0.37 - 1.3).collect();
            let res: Vec<f32> = (0..m * ldr).map(|i| (i % 17) as f32 * 0.21 - 1.7).collect();
            let mut plain = vec![f32::NAN; m * n];
            let mut fused = vec![f32::NAN; m * n];
            // SAFETY: sizes as allocated; AVX-512 checked.
            unsafe {
                gemm_unpacked(
                    &b,
                    m,
                    a.as_ptr(),
                    k,
                    plain.as_mut_ptr(),
                    n,
                    0,
                    b.panels(),
                    &[],
                );
                gemm_unpacked(
                    &b,
                    m,
                    a.as_ptr(),
                    k,
                    fused.as_mut_ptr(),
                    n,
                    0,
                    b.panels(),
                    &[(bias.as_ptr(), 0), (res.as_ptr(), ldr)],
                );
            }
            // The same f32 additions in the same order: the same bits.
            for i in 0..m {
                for j in 0..n {
                    let want = plain[i * n + j] + bias[j] + res[i * ldr + j];
                    let got = fused[i * n + j];
                    assert_eq!(got.to_bits(), want.to_bits(), "{m}x{k}x{n} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn packed_a_has_the_step_major_layout_at_every_edge() {
        if !available() {
            return;
        }
        // Depths off the 16-step transpose and the block of inner steps;
        // row counts of whole and short tiles; strides longer than a row.
        for (m, k, lda) in [
            (12, 16, 16),
            (24, 47, 50),
            (13, 2 * KC + 21, 2 * KC + 21),
            (11, 35, 40),
            (37, 768, 800),
        ] {
            let a: Vec<f32> = (0..m * lda).map(|i| i as f32 * 0.5 - 7.0).collect();
            let m_pad = m.div_ceil(MR) * MR;
            let mut got = vec![f32::NAN; packed_a_len(m, k)];
            // SAFETY: sizes as allocated; AVX-512F checked above.
            unsafe { pack_a(m, k, a.as_ptr(), lda, got.as_mut_ptr(), 0, a_tiles(m)) };
            for t in 0..a_tiles(m) {
                let rows = MR.min(m - t * MR);
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    for kk in 0..kc {
                        for r in 0..rows {
                            let at = k0 * m_pad + t * MR * kc + kk * MR + r;
                            assert_eq!(
                                got[at].to_bits(),
                                a[(t * MR + r) * lda + k0 + kk].to_bits(),
                                "m={m} k={k} tile {t} step {} row {r}",
                                k0 + kk
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod speed {
    use super::*;

    /// `cargo test --release -p kiln-backends pack_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn pack_speed() {
        for (m, k) in [(1024usize, 768usize), (1024, 3072), (128, 768)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut pa = vec![0f32; packed_a_len(m, k)];
            let mut best = f64::MAX;
            for _ in 0..50 {
                let t = std::time::Instant::now();
                // SAFETY: sizes as allocated; AVX-512 assumed (a manual run).
                unsafe { pack_a(m, k, a.as_ptr(), k, pa.as_mut_ptr(), 0, a_tiles(m)) };
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "pack {m}x{k}: {:.0} us, {:.1} GB/s",
                best * 1e6,
                (m * k * 8) as f64 / best / 1e9
            );
        }
    }

    /// `cargo test --release -p kiln-backends packed_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn packed_speed() {
        use rayon::prelude::*;
        let threads = std::env::var("KILN_T")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        for (m, k, n) in [
            (1024usize, 768usize, 768usize),
            (1024, 768, 3072),
            (1024, 3072, 768),
            (128, 768, 2048),
            (128, 768, 1280),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
            let b = PackedB::pack(k, n, |kk, j| w[j * k + kk]);
            let mut c = vec![0f32; m * n];
            let mut pa = vec![0f32; packed_a_len(m, k)];
            let (mut best, mut best_lib, mut best_pack) = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..10 {
                let t = std::time::Instant::now();
                let panels = b.panels();
                let per = panels.div_ceil(threads);
                let cp = c.as_mut_ptr() as usize;
                let tiles = a_tiles(m);
                let pp = pa.as_mut_ptr() as usize;
                (0..threads).into_par_iter().for_each(|th| {
                    let (t0, t1) = (th * tiles / threads, (th + 1) * tiles / threads);
                    // SAFETY: sizes as allocated; disjoint tiles per thread.
                    unsafe { pack_a(m, k, a.as_ptr(), k, pp as *mut f32, t0, t1) };
                });
                best_pack = best_pack.min(t.elapsed().as_secs_f64());
                (0..threads).into_par_iter().for_each(|th| {
                    let (p0, p1) = ((th * per).min(panels), ((th + 1) * per).min(panels));
                    // SAFETY: sizes as allocated; disjoint panels per thread.
                    unsafe {
                        gemm(
                            &b,
                            m,
                            0..m,
                            pp as *const f32,
                            cp as *mut f32,
                            n,
                            p0,
                            p1,
                            &[],
                            None,
                        )
                    };
                });
                best = best.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                // SAFETY: sizes as allocated.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
                best_lib = best_lib.min(t.elapsed().as_secs_f64());
            }
            let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
            println!(
                "{m}x{k}x{n}: packed {:.0} GFLOP/s (A's copy {:.0} us of {:.0}), gemm crate {:.0}",
                gf(best),
                best_pack * 1e6,
                best * 1e6,
                gf(best_lib)
            );
        }
    }
}

/// The packed kernels next to guard pages: an access one element past any
/// operand faults (valgrind cannot run AVX-512 code, so these paths are
/// checked here rather than under memcheck).
#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod guard_pages {
    use super::*;

    /// `len` f32 that end exactly where an inaccessible page begins.
    struct Guarded {
        base: *mut libc::c_void,
        total: usize,
        ptr: *mut f32,
    }

    impl Guarded {
        fn new(len: usize, fill: impl Fn(usize) -> f32) -> Guarded {
            let page = 4096;
            let bytes = (len * 4).next_multiple_of(page);
            let total = bytes + page;
            // SAFETY: a fresh anonymous mapping; the last page is made
            // inaccessible and the data placed to end right before it.
            unsafe {
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(base, libc::MAP_FAILED);
                let guard = base.cast::<u8>().add(bytes);
                assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0);
                let ptr = guard.cast::<f32>().sub(len);
                for i in 0..len {
                    *ptr.add(i) = fill(i);
                }
                Guarded { base, total, ptr }
            }
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.base, self.total) };
        }
    }

    #[test]
    fn packed_kernels_stay_inside_their_operands() {
        if !available() {
            return;
        }
        // Whole tiles that end at A's last element (the 16-step transposed
        // copy's last load ends at the guard page) and short ones.
        for (m, k, n) in [
            (13, 257, 64),
            (1, 5, 32),
            (25, 300, 96),
            (2, 9, 70),
            (24, 47, 32),
            (12, 32, 32),
        ] {
            let b = PackedB::pack(k, n, |kk, j| (kk + j) as f32 * 0.01);
            let a = Guarded::new(m * k, |i| (i % 7) as f32);
            let c = Guarded::new(m * n, |_| 0.0);
            // A bias and a residual, each ending at a guard page: their
            // loads past the last column are masked off like C's.
            let bias = Guarded::new(n, |j| j as f32);
            let res = Guarded::new(m * n, |i| i as f32);
            let adds = [(bias.ptr.cast_const(), 0), (res.ptr.cast_const(), n)];
            // SAFETY: A holds m×k, C m×n, the bias n and the residual m×n,
            // each ending at a guard page.
            unsafe { gemm_unpacked(&b, m, a.ptr, k, c.ptr, n, 0, b.panels(), &adds) };
            // The last panel's columns past n are masked off.
            let y = Guarded::new(n, |_| 0.0);
            let x = Guarded::new(k, |i| i as f32);
            // SAFETY: x holds k, y n, both ending at a guard page.
            unsafe { matvec(&b, x.ptr, y.ptr, 0, b.panels()) };
        }
    }

    /// The same for the tile unit's split of A and its stores to C.
    #[test]
    fn tile_products_stay_inside_their_operands() {
        use super::super::amx;
        if !amx::usable() {
            return;
        }
        for (m, k, n) in [
            (13, 257, 64),
            (1, 5, 32),
            (40, 300, 96),
            (33, 47, 70),
            (64, 32, 32),
        ] {
            let b = PackedB::pack(k, n, |kk, j| (kk + j) as f32 * 0.01);
            assert!(amx::weight_ok(&b));
            let a = Guarded::new(m * k, |i| (i % 7) as f32);
            let c = Guarded::new(m * n, |_| 0.0);
            let bias = Guarded::new(n, |j| j as f32);
            let res = Guarded::new(m * n, |i| i as f32);
            let adds = [(bias.ptr.cast_const(), 0), (res.ptr.cast_const(), n)];
            let mut split = vec![0u8; amx::split_a_len(m, k) + 64];
            let sp = split.as_mut_ptr();
            let sp = sp.wrapping_add(sp.align_offset(64));
            // SAFETY: A holds m×k, C m×n, the bias n and the residual m×n,
            // each ending at a guard page; the split buffer is sized and
            // aligned for A.
            unsafe {
                assert!(amx::split_a(m, k, a.ptr, k, sp, 0, amx::a_tiles(m)));
                amx::gemm(
                    &b,
                    m,
                    0..m,
                    sp,
                    c.ptr,
                    n,
                    0,
                    b.panels(),
                    &adds,
                    None,
                    std::ptr::null(),
                );
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod micro_speed {
    use super::*;

    /// A (`m × k`) and B (`k × n`, `w` transposed) of small repeating
    /// values, B packed and A in the GEMM's layout.
    fn operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>, PackedB, Vec<f32>) {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
        let b = PackedB::pack(k, n, |kk, j| w[j * k + kk]);
        let mut pa = vec![0f32; packed_a_len(m, k)];
        // SAFETY: sizes as allocated.
        unsafe { pack_a(m, k, a.as_ptr(), k, pa.as_mut_ptr(), 0, a_tiles(m)) };
        (a, w, b, pa)
    }

    /// kiln's GEMM of `m` rows of the packed `pa` by `b` into `c` (`m × b.n`).
    fn product(b: &PackedB, m: usize, pa: &[f32], c: &mut [f32]) {
        assert!(pa.len() >= packed_a_len(m, b.k) && c.len() >= m * b.n);
        // SAFETY: sizes checked; AVX-512 is assumed (a manual run).
        unsafe {
            gemm(
                b,
                m,
                0..m,
                pa.as_ptr(),
                c.as_mut_ptr(),
                b.n,
                0,
                b.panels(),
                &[],
                None,
            )
        };
    }

    /// `cargo test --release -p kiln-backends micro_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn micro_speed() {
        let (m, k, n) = (120usize, 256usize, 64usize);
        let (_, _, b, pa) = operands(m, k, n);
        let mut c = vec![0f32; m * n];
        for _ in 0..3 {
            let reps = 20000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                product(&b, m, &pa, &mut c);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "in cache, one thread: {:.0} GFLOP/s",
                2.0 * (m * n * k * reps) as f64 / s / 1e9
            );
        }
    }

    /// kiln's 12 × 32 microkernel against an 8 × 48 one (MKL's shape: three
    /// B vectors per broadcast, 11 loads per 24 multiply-adds instead of
    /// 14), in cache, one thread, alternating in one process so that both
    /// see the same load from the machine's other tenants.
    /// `cargo test --release -p kiln-backends micro_shapes -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn micro_shapes() {
        use std::arch::x86_64::*;
        let (m, k, n) = (96usize, 256usize, 96usize);
        let (a, w, b, pa) = operands(m, k, n);
        let mut c = vec![0f32; m * n];
        // The 8 × 48 layouts: A step-major in 8-row tiles, B in 48-column
        // panels, both k-major.
        let a8: Vec<f32> = (0..m / 8)
            .flat_map(|t| (0..k).flat_map(move |kk| (0..8).map(move |r| (t, kk, r))))
            .map(|(t, kk, r)| a[(t * 8 + r) * k + kk])
            .collect();
        let b48: Vec<f32> = (0..n / 48)
            .flat_map(|p| (0..k).flat_map(move |kk| (0..48).map(move |j| (p, kk, j))))
            .map(|(p, kk, j)| w[(p * 48 + j) * k + kk])
            .collect();
        let mut c8 = vec![0f32; m * n];
        #[target_feature(enable = "avx512f")]
        unsafe fn tile8x48(a: *const f32, b: *const f32, k: usize, c: *mut f32, ldc: usize) {
            let mut acc = [[_mm512_setzero_ps(); 3]; 8];
            for kk in 0..k {
                // SAFETY: the caller's tile.
                unsafe {
                    let row = b.add(kk * 48);
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(AHEAD * 48).cast());
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(AHEAD * 48 + 16).cast());
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(AHEAD * 48 + 32).cast());
                    _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((kk + AHEAD) * 8).cast());
                    let bv = [
                        _mm512_loadu_ps(row),
                        _mm512_loadu_ps(row.add(16)),
                        _mm512_loadu_ps(row.add(32)),
                    ];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(*a.add(kk * 8 + r));
                        for (v, bv) in acc.iter_mut().zip(bv) {
                            *v = _mm512_fmadd_ps(x, bv, *v);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (j, v) in acc.iter().enumerate() {
                    // SAFETY: the caller's tile of C.
                    unsafe { _mm512_storeu_ps(c.add(r * ldc + j * 16), *v) };
                }
            }
        }
        let reps = 4000;
        let (mut t12, mut t8) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                product(&b, m, &pa, &mut c);
            }
            t12.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for tile in 0..m / 8 {
                    for p in 0..n / 48 {
                        // SAFETY: sizes as allocated.
                        unsafe {
                            tile8x48(
                                a8.as_ptr().add(tile * 8 * k),
                                b48.as_ptr().add(p * 48 * k),
                                k,
                                c8.as_mut_ptr().add(tile * 8 * n + p * 48),
                                n,
                            )
                        };
                    }
                }
            }
            t8.push(t.elapsed().as_secs_f64());
        }
        assert!(c
            .iter()
            .zip(&c8)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * x.abs().max(1.0)));
        let gf = |s: f64| 2.0 * (m * n * k * reps) as f64 / s / 1e9;
        let ratios: Vec<f64> = t12.iter().zip(&t8).map(|(a, b)| a / b).collect();
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "12x32 best {:.0} GFLOP/s, 8x48 best {:.0}; 8x48 / 12x32 speed per pair: median {:.3}, {:?}",
            gf(t12.iter().cloned().fold(f64::MAX, f64::min)),
            gf(t8.iter().cloned().fold(f64::MAX, f64::min)),
            sorted[sorted.len() / 2],
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>()
        );
    }
}

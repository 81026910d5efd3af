//! f32 products on the AMX tile unit, as sums of bf16 tile products.
//!
//! Each f32 `x` is split into three bf16 parts, each rounded to nearest
//! even from what the parts before it leave: `x = x₀ + x₁ + x₂ + ε`, with
//! `|x₁| ≤ 2⁻⁸·|x|`, `|x₂| ≤ 2⁻¹⁶·|x|` and `|ε| ≤ 2⁻²⁴·|x|` (f32's own
//! rounding). A product `a·b` is then the six tile products
//! `a₀b₀ + a₀b₁ + a₁b₀ + a₀b₂ + a₂b₀ + a₁b₁`, the three left out below
//! `2⁻²³·|a·b|` together; the tile unit multiplies bf16 pairs exactly and
//! accumulates in f32. So the sums are as accurate as f32 multiply-adds
//! (tested against f64 next to [`super::packed`]'s kernel), at about twice
//! their speed on a core whose tile unit is free (measured: 4.4 ns per
//! `tdpbf16ps`, 16 × 16 × 32 products).
//!
//! Values the split cannot carry go to the f32 kernel instead: infinities,
//! NaN, and finite values whose first part rounds up to infinity (a weight
//! is checked once, A on every split). Parts below f32's normal range are
//! read as zero by the tile unit, an absolute error below 2⁻¹²⁶.
//!
//! Layouts (bf16 parts, 1 KiB tiles of 16 rows × 64 bytes):
//! - A: for each 16-row tile `t`, each chunk `c` of 32 inner steps, each
//!   part `q`: a tile of 16 rows × 32 steps at `((t·chunks + c)·3 + q)`
//!   KiB (rows past A's and steps past `k` are zero);
//! - B: a panel's block of steps, converted as it is used: for each chunk
//!   `c`, part `q` and half `h` (columns `16h..16h+16`), a tile of 16 step
//!   pairs × 16 columns × 2 at `((c·3 + q)·2 + h)` KiB (the tile unit's
//!   pair-interleaved layout).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::packed::{masks, store_row, PackedB, MAX_ADDS, NR};

/// Rows per tile.
const TR: usize = 16;
/// Inner steps per chunk (one tile row of bf16).
const TK: usize = 32;
/// Bytes per tile.
const TILE: usize = 1024;
/// Inner steps per block of B converted at a time.
const KC: usize = 768;
/// Most rows per block (A's block of split parts stays in L2: 256 rows ×
/// 768 steps × 6 bytes, 1.2 MB).
const MC: usize = 256;

/// Whether B may be converted ahead of a product of several blocks of rows
/// (`KILN_AMX_PRE=0` turns it off, for comparisons; read once).
pub(crate) fn convert_ahead() -> bool {
    static AHEAD: OnceLock<bool> = OnceLock::new();
    *AHEAD.get_or_init(|| std::env::var_os("KILN_AMX_PRE").is_none_or(|v| v != "0"))
}

/// Whether the tile unit can be used: the CPU has AMX-BF16 and AVX-512F,
/// the system granted this process the tile state, and `KILN_AMX` is not
/// `0` (checked once).
pub(crate) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        if std::env::var("KILN_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            if !super::packed::available()
                || !super::isa::has(super::isa::Feature::Avx512bw)
                || !super::isa::has(super::isa::Feature::Avx512bf16)
            {
                return false;
            }
            // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
            // SAFETY: CPUID is available on every x86_64 CPU.
            let l7 = __cpuid_count(7, 0);
            if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
                return false;
            }
            // Ask for the tile data state (ARCH_REQ_XCOMP_PERM,
            // XFEATURE_XTILEDATA); the kernel refuses where it cannot
            // save it.
            // SAFETY: a plain system call with integer arguments.
            let r = unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) };
            r == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Rows per block for `m` rows: the fewest blocks of at most [`MC`] rows,
/// as even as whole pairs of tiles allow.
pub(crate) fn row_block(m: usize) -> usize {
    let pairs = m.div_ceil(2 * TR).max(1);
    let blocks = pairs.div_ceil(MC / (2 * TR));
    pairs.div_ceil(blocks) * 2 * TR
}

/// Bytes of A split for `m × k`.
pub(crate) fn split_a_len(m: usize, k: usize) -> usize {
    m.div_ceil(2 * TR) * 2 * k.div_ceil(TK) * 3 * TILE
}

/// 16-row tiles of an `m`-row A ([`split_a`]'s unit of work; a whole
/// number of pairs).
pub(crate) fn a_tiles(m: usize) -> usize {
    m.div_ceil(2 * TR) * 2
}

/// Whether every element of `b` can be split ([`split_pair`]), checked
/// once; [`usable`] must hold.
pub(crate) fn weight_ok(b: &PackedB) -> bool {
    b.amx_ok.get_or_init(|| {
        if b.dtype != kiln_ir::DType::F32 {
            return false;
        }
        let bytes = b.bytes();
        let whole = bytes.len() / 64 * 64;
        // SAFETY: `whole` bytes from the start; AVX-512F is checked by
        // usable(), which holds where this is called.
        let vectors = unsafe { all_splittable(bytes.as_ptr(), whole) };
        vectors
            && bytes[whole..]
                .chunks_exact(4)
                .all(|w| splittable(u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
    }) == &true
}

/// [`splittable`] for each of the f32 in `len` bytes (a multiple of 64)
/// from `p`, sixteen at a time (a weight's first use reads it once).
///
/// # Safety
/// `p` holds `len` bytes; the host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn all_splittable(p: *const u8, len: usize) -> bool {
    let (exp, one, half) = (
        _mm512_set1_epi32(0x7f80_0000),
        _mm512_set1_epi32(1),
        _mm512_set1_epi32(0x7fff),
    );
    let mut bad = 0u16;
    for at in (0..len).step_by(64) {
        // SAFETY: 64 bytes from `at` < len.
        let u = unsafe { _mm512_loadu_si512(p.add(at).cast()) };
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(u), one);
        let r = _mm512_add_epi32(u, _mm512_add_epi32(half, odd));
        bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(r, exp), exp);
        if at % 65536 == 0 && bad != 0 {
            return false;
        }
    }
    bad == 0
}

/// Whether the f32 with bits `u` splits into finite parts.
fn splittable(u: u32) -> bool {
    let r = rne(u);
    r & 0x7f80_0000 != 0x7f80_0000
}

/// `u`'s bits rounded to nearest even at bf16 precision (low 16 bits zero).
fn rne(u: u32) -> u32 {
    u.wrapping_add(0x7fff + ((u >> 16) & 1)) & 0xffff_0000
}

/// Three bf16 parts (rounded to nearest even by the conversion
/// instruction) of 32 f32 lanes, `lo` in the parts' lanes 0–15 and `hi` in
/// 16–31, and the lanes whose first part is not finite (an infinity, NaN,
/// or a value rounded up to infinity). The instruction reads f32 below the
/// normal range as zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn split_pair(lo: __m512, hi: __m512) -> ([__m512i; 3], __mmask32) {
    let widen = |h: __m256i| {
        // SAFETY: 16 bf16 patterns, the same bits either way.
        _mm512_cvtpbh_ps(unsafe { std::mem::transmute::<__m256i, __m256bh>(h) })
    };
    let (mut a, mut b) = (lo, hi);
    let mut parts = [_mm512_setzero_si512(); 3];
    for (q, part) in parts.iter_mut().enumerate() {
        // SAFETY: 32 bf16 patterns, the same bits either way.
        let p = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a)) };
        *part = p;
        if q < 2 {
            a = _mm512_sub_ps(a, widen(_mm512_castsi512_si256(p)));
            b = _mm512_sub_ps(b, widen(_mm512_extracti64x4_epi64::<1>(p)));
        }
    }
    let exp = _mm512_set1_epi16(0x7f80);
    let bad = _mm512_cmpeq_epi16_mask(_mm512_and_si512(parts[0], exp), exp);
    (parts, bad)
}

/// Splits the 16-row tiles `t0..t1` of A (`m × k`, row stride `lda`, unit
/// column stride) into `dst` ([`split_a_len`] bytes, the module's layout).
/// Returns false if an element cannot be split (the product must then run
/// on the f32 kernel).
///
/// # Safety
/// `a` holds `m` rows of `k` elements at stride `lda`; `dst` holds
/// [`split_a_len`]`(m, k)` bytes, 64-byte aligned; concurrent callers
/// split disjoint tiles; the host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn split_a(
    m: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    dst: *mut u8,
    t0: usize,
    t1: usize,
) -> bool {
    let chunks = k.div_ceil(TK);
    let mut bad = 0u32;
    for t in t0..t1 {
        for c in 0..chunks {
            let cols = TK.min(k - c * TK);
            let (m0, m1) = masks(cols);
            for r in 0..TR {
                let i = t * TR + r;
                let (x0, x1) = if i < m {
                    // SAFETY: row i holds k elements; lanes past `cols`
                    // are masked off (the second vector's address, with
                    // `wrapping_add`, may lie past the row when cols ≤ 16).
                    unsafe {
                        let p = a.add(i * lda + c * TK);
                        (
                            _mm512_maskz_loadu_ps(m0, p),
                            _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)),
                        )
                    }
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let (parts, b) = split_pair(x0, x1);
                bad |= b;
                for (q, part) in parts.iter().enumerate() {
                    // SAFETY: part q's tile row r of tile t, chunk c, is
                    // inside dst (t < a_tiles(m)).
                    unsafe {
                        let d = dst.add(((t * chunks + c) * 3 + q) * TILE + r * 64);
                        _mm512_storeu_si512(d.cast(), *part);
                    }
                }
            }
        }
    }
    bad == 0
}

/// Converts the steps `k0..k0 + kc` of panel `p` of `b` (f32) into `dst`
/// (the module's B layout, `kc.div_ceil(TK)` chunks; steps past `kc`
/// zero).
///
/// # Safety
/// `dst` holds `kc.div_ceil(TK) · 6` KiB, 64-byte aligned; `b` is f32;
/// the host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_b(b: &PackedB, p: usize, k0: usize, kc: usize, dst: *mut u8) {
    let panel = b.panel(p).cast::<f32>();
    // Lane 2i from the first operand's lane i, lane 2i + 1 from the
    // second's (lanes 16 + i of the converted pair).
    let pairs = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    for c in 0..kc.div_ceil(TK) {
        for kp in 0..TK / 2 {
            let (ka, kb) = (c * TK + 2 * kp, c * TK + 2 * kp + 1);
            // SAFETY: panel rows below the block's end are inside the
            // panel (k0 + kc ≤ b.k, NR columns each).
            let row = |kk: usize, h: usize| unsafe {
                if kk < kc {
                    _mm512_loadu_ps(panel.add((k0 + kk) * NR + 16 * h))
                } else {
                    _mm512_setzero_ps()
                }
            };
            for h in 0..2 {
                let (parts, _) = split_pair(row(ka, h), row(kb, h));
                for (q, part) in parts.iter().enumerate() {
                    // Step ka's part in each 32-bit lane's low half, kb's
                    // above.
                    let v = _mm512_permutexvar_epi16(pairs, *part);
                    // SAFETY: tile (c, q, h)'s row kp is inside dst.
                    unsafe {
                        _mm512_storeu_si512(
                            dst.add(((c * 3 + q) * 2 + h) * TILE + kp * 64).cast(),
                            v,
                        )
                    };
                }
            }
        }
    }
}

/// The tile configuration: eight tiles of 16 rows × 64 bytes (C in 0–3,
/// A in 4–5, B in 6–7).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn config() -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    for t in 0..8 {
        c[16 + 2 * t] = 64; // bytes per row
        c[48 + t] = TR as u8; // rows
    }
    TileConfig(c)
}

/// The four tile products of a 2 × 2 block of sums: tiles 0–3 += the A
/// tiles in 4–5 by the B tiles in 6–7.
macro_rules! products_2x2 {
    () => {
        "tdpbf16ps tmm0, tmm4, tmm6\n\
         tdpbf16ps tmm1, tmm4, tmm7\n\
         tdpbf16ps tmm2, tmm5, tmm6\n\
         tdpbf16ps tmm3, tmm5, tmm7"
    };
}

/// A block of the product on this thread's tile unit: the 32 × 32 sums of
/// two 16-row tiles of A (`a0`, `a1`: their chunk `c0`'s first part) by
/// one panel's converted block (`bt`) over `chunks` chunks, stored to
/// `out` (32 rows of 32 f32), fetching `lines` lines from `next` into L2
/// meanwhile (hints: any address).
///
/// # Safety
/// The tile configuration is loaded; `a0` and `a1` point at `chunks`
/// consecutive chunks of three tiles; `bt` at `chunks` chunks of six;
/// `out` holds 4 KiB.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles(
    a0: *const u8,
    a1: *const u8,
    bt: *const u8,
    chunks: usize,
    out: *mut f32,
    (next, lines): (*const u8, usize),
) {
    // SAFETY: as the caller promised; tiles 0–3 are zeroed here, 4–7 are
    // loaded before each use, and nothing else on this thread uses them.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, preserves_flags)
        );
        for c in 0..chunks {
            // The next panel's lines into L2, a few per chunk.
            for l in (c * lines / chunks)..((c + 1) * lines / chunks) {
                _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(l * 64).cast());
            }
            let (pa0, pa1, pb) = (
                a0.add(c * 3 * TILE),
                a1.add(c * 3 * TILE),
                bt.add(c * 6 * TILE),
            );
            std::arch::asm!(
                // a₀ by b₀, b₁, b₂; a₁ by b₁, b₀; a₂ by b₀: 16 tile
                // loads for the 24 products.
                "tileloadd tmm4, [{a0} + {s}]",
                "tileloadd tmm5, [{a1} + {s}]",
                "tileloadd tmm6, [{b} + {s}]",
                "tileloadd tmm7, [{b} + {s} + 1024]",
                products_2x2!(),
                "tileloadd tmm6, [{b} + {s} + 2048]",
                "tileloadd tmm7, [{b} + {s} + 3072]",
                products_2x2!(),
                "tileloadd tmm6, [{b} + {s} + 4096]",
                "tileloadd tmm7, [{b} + {s} + 5120]",
                products_2x2!(),
                "tileloadd tmm4, [{a0} + {s} + 1024]",
                "tileloadd tmm5, [{a1} + {s} + 1024]",
                "tileloadd tmm6, [{b} + {s} + 2048]",
                "tileloadd tmm7, [{b} + {s} + 3072]",
                products_2x2!(),
                "tileloadd tmm6, [{b} + {s}]",
                "tileloadd tmm7, [{b} + {s} + 1024]",
                products_2x2!(),
                "tileloadd tmm4, [{a0} + {s} + 2048]",
                "tileloadd tmm5, [{a1} + {s} + 2048]",
                products_2x2!(),
                a0 = in(reg) pa0,
                a1 = in(reg) pa1,
                b = in(reg) pb,
                s = in(reg) 64usize,
                options(nostack, preserves_flags, readonly)
            );
        }
        let o = out.cast::<u8>();
        std::arch::asm!(
            "tilestored [{o} + {s}], tmm0",
            "tilestored [{o} + {s} + 64], tmm1",
            "tilestored [{o} + {s} + 2048], tmm2",
            "tilestored [{o} + {s} + 2112], tmm3",
            o = in(reg) o,
            s = in(reg) 128usize,
            options(nostack, preserves_flags)
        );
    }
}

/// Thread-local buffers: one panel block of B converted, and a 32 × 32
/// block of sums, both 64-byte aligned.
#[repr(C, align(64))]
struct Scratch {
    b: [u8; B_BLOCK],
    out: [f32; 32 * 32],
}

/// Bytes of one panel's block of [`KC`] steps of B in the tile layout.
const B_BLOCK: usize = KC / TK * 6 * TILE;

/// Bytes of all of `b` in the tile layout ([`convert_panels`]): per panel,
/// per block of [`KC`] steps, [`B_BLOCK`] bytes.
pub(crate) fn converted_b_len(b: &PackedB) -> usize {
    b.panels() * b.k.div_ceil(KC) * B_BLOCK
}

/// Converts panels `p0..p1` of `b`, every block of steps, into the tile
/// layout at `dst` (laid out as [`converted_b_len`] says).
///
/// # Safety
/// `dst` holds [`converted_b_len`]`(b)` bytes; [`usable`] holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn convert_panels(b: &PackedB, p0: usize, p1: usize, dst: *mut u8) {
    let blocks = b.k.div_ceil(KC);
    for p in p0..p1 {
        for kb in 0..blocks {
            let k0 = kb * KC;
            // SAFETY: block (p, kb) lies inside dst (the caller's length).
            unsafe {
                convert_b(
                    b,
                    p,
                    k0,
                    KC.min(b.k - k0),
                    dst.add((p * blocks + kb) * B_BLOCK),
                )
            };
        }
    }
}

/// [`super::packed::gemm`] on the tile unit: `C = A·B` for the rows `rows`
/// (of `0..m`, from a multiple of 32) and the panels `p0..p1`, A split by
/// [`split_a`]; the addends and the epilogue as there.
///
/// # Safety
/// As for [`super::packed::gemm`], with `pa` holding A split
/// ([`split_a_len`]`(m, b.k)` bytes); [`usable`] and [`weight_ok`] hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    b: &PackedB,
    m: usize,
    rows: std::ops::Range<usize>,
    pa: *const u8,
    c: *mut f32,
    ldc: usize,
    p0: usize,
    p1: usize,
    adds: &[(*const f32, usize)],
    epilogue: Option<&dyn Fn(usize, usize, usize, usize)>,
    converted: *const u8,
) {
    assert!(adds.len() <= MAX_ADDS, "at most {MAX_ADDS} addends");
    assert!(
        rows.start.is_multiple_of(2 * TR) && rows.end <= m,
        "rows {rows:?} of {m}: from a whole pair of tiles"
    );
    thread_local! {
        static SCRATCH: std::cell::RefCell<Option<Box<Scratch>>> =
            const { std::cell::RefCell::new(None) };
    }
    let chunks = b.k.div_ceil(TK);
    let cfg = config();
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.get_or_insert_with(|| {
            // SAFETY: plain bytes and numbers; zero is a valid value.
            unsafe { Box::new(std::mem::zeroed()) }
        });
        // SAFETY: this thread's tile state was granted (usable()); the
        // configuration is a valid palette-1 layout.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, preserves_flags, readonly))
        };
        let mc = row_block(rows.len());
        for i0 in rows.clone().step_by(mc) {
            let i1 = (i0 + mc).min(rows.end);
            for k0 in (0..b.k).step_by(KC) {
                let kc = KC.min(b.k - k0);
                let (first, last) = (k0 == 0, k0 + kc == b.k);
                let (c0, cn) = (k0 / TK, kc.div_ceil(TK));
                for p in p0..p1 {
                    let cols = NR.min(b.n - p * NR);
                    let bt = if converted.is_null() {
                        // SAFETY: the scratch holds KC/TK chunks of six tiles.
                        unsafe { convert_b(b, p, k0, kc, s.b.as_mut_ptr()) };
                        s.b.as_ptr()
                    } else {
                        // Converted for the whole product beforehand.
                        converted.wrapping_add((p * b.k.div_ceil(KC) + k0 / KC) * B_BLOCK)
                    };
                    let masks = masks(cols);
                    // The next panel's f32 block, fetched into L2 a share
                    // per pair of tiles while this one's products run.
                    let block = kc * NR * 4;
                    let pairs = (i1 - i0).div_ceil(2 * TR);
                    let share = block.div_ceil(64).div_ceil(pairs);
                    let next = if p + 1 < p1 && converted.is_null() {
                        b.panel(p + 1).wrapping_add(k0 * NR * 4)
                    } else {
                        std::ptr::null()
                    };
                    for i in (i0..i1).step_by(2 * TR) {
                        let t = i / TR;
                        let pf = if next.is_null() {
                            (next, 0)
                        } else {
                            let first = (i - i0) / (2 * TR) * share;
                            (next.wrapping_add(first * 64), share.min((block / 64).saturating_sub(first)))
                        };
                        // SAFETY: tiles t and t + 1 (a pair: a_tiles(m) is
                        // even) hold chunks c0..c0 + cn inside pa.
                        unsafe {
                            tiles(
                                pa.add((t * chunks + c0) * 3 * TILE),
                                pa.add(((t + 1) * chunks + c0) * 3 * TILE),
                                bt,
                                cn,
                                s.out.as_mut_ptr(),
                                pf,
                            )
                        };
                        for r in 0..(2 * TR).min(i1 - i) {
                            let row = i + r;
                            // SAFETY: row i + r of C and of each addend
                            // holds the panel's `cols` columns from here;
                            // the scratch holds 32 rows of 32 sums.
                            unsafe {
                                store_row(
                                    c.add(row * ldc + p * NR),
                                    masks,
                                    (
                                        _mm512_loadu_ps(s.out.as_ptr().add(r * 32)),
                                        _mm512_loadu_ps(s.out.as_ptr().add(r * 32 + 16)),
                                    ),
                                    first,
                                    if last { adds } else { &[] },
                                    (row, p * NR),
                                )
                            };
                        }
                    }
                }
                if let Some(epi) = epilogue.filter(|_| last) {
                    let (j0, j1) = (p0 * NR, (p1 * NR).min(b.n));
                    if j1 > j0 {
                        epi(i0, i1 - i0, j0, j1 - j0);
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state (nothing is live).
        unsafe { std::arch::asm!("tilerelease", options(nostack, preserves_flags)) };
    });
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A 64-byte aligned byte buffer.
    fn aligned(len: usize) -> Vec<u8> {
        // Over-allocated and offset: the test reads from `at`.
        vec![0u8; len + 64]
    }

    fn at(v: &mut [u8]) -> *mut u8 {
        let p = v.as_mut_ptr();
        p.wrapping_add(p.align_offset(64))
    }

    /// The product through split_a and gemm on `threads`-like parts (rows
    /// in blocks from `step`, panels in two halves), with a bias and a
    /// residual added as the last block is stored.
    fn product(m: usize, k: usize, n: usize, a: &[f32], w: &[f32], adds: bool) -> Vec<f32> {
        let b = PackedB::pack(k, n, |kk, j| w[kk * n + j]);
        assert!(weight_ok(&b));
        let mut sa = aligned(split_a_len(m, k));
        let pa = at(&mut sa);
        // SAFETY: sizes as allocated; AVX-512 checked by usable().
        assert!(unsafe { split_a(m, k, a.as_ptr(), k, pa, 0, a_tiles(m)) });
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
        let res: Vec<f32> = (0..m * n).map(|i| (i % 11) as f32 - 5.0).collect();
        let list = [(bias.as_ptr(), 0usize), (res.as_ptr(), n)];
        let adds: &[(*const f32, usize)] = if adds { &list } else { &[] };
        let mut c = vec![f32::NAN; m * n];
        let panels = b.panels();
        let block = row_block(m);
        // The second half of the panels reads B converted beforehand, the
        // first converts each block as it goes.
        let mut conv = aligned(converted_b_len(&b));
        let pre = at(&mut conv);
        // SAFETY: sizes as allocated; usable() checked by the callers.
        unsafe { convert_panels(&b, panels / 2, panels, pre) };
        for i0 in (0..m).step_by(block) {
            for (p0, p1, converted) in [
                (0, panels / 2, std::ptr::null()),
                (panels / 2, panels, pre.cast_const()),
            ] {
                // SAFETY: as above; disjoint rows and panels.
                unsafe {
                    gemm(
                        &b,
                        m,
                        i0..(i0 + block).min(m),
                        pa,
                        c.as_mut_ptr(),
                        n,
                        p0,
                        p1,
                        adds,
                        None,
                        converted,
                    )
                };
            }
        }
        c
    }

    #[test]
    fn tile_products_match_f64_sums_at_every_edge() {
        if !usable() {
            return;
        }
        for (m, k, n) in [
            (1usize, 1usize, 1usize),
            (37, 800, 70),
            (64, 96, 32),
            (300, 1600, 100),
            (33, 31, 17),
            (128, 768, 64),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 + 3) % 23) as f32 * 0.1037 - 1.1)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 + 1) % 17) as f32 * 0.0931 - 0.8)
                .collect();
            for adds in [false, true] {
                let c = product(m, k, n, &a, &w, adds);
                let want = super::super::packed::f64_sums(m, k, n, &a, &w);
                let mut worst = 0f64;
                for i in 0..m {
                    for j in 0..n {
                        let (mut sum, mut abs) = want[i * n + j];
                        if adds {
                            sum += (j as f32 * 0.25 - 3.0) as f64 + ((i * n + j) % 11) as f64 - 5.0;
                            abs += 8.0;
                        }
                        let got = c[i * n + j] as f64;
                        assert!(got.is_finite(), "{m}x{k}x{n}: C[{i}, {j}] = {got}");
                        worst = worst.max((got - sum).abs() / abs);
                    }
                }
                // f32 multiply-adds over these operands: a few 1e-7.
                assert!(worst <= 1e-6, "{m}x{k}x{n}, adds {adds}: worst {worst:e}");
            }
        }
    }

    /// Operands whose bits reach every part, over 32 steps so that every
    /// partial sum is exact in f32: each of the six products must be
    /// there for the sums to be exact (one left out costs 2⁻¹⁸ of each).
    #[test]
    fn every_tile_product_is_summed() {
        if !usable() {
            return;
        }
        let x = 1.0 + 2f32.powi(-9) + 2f32.powi(-18);
        let y = 1.0 + 2f32.powi(-9);
        let z = 1.0 + 2f32.powi(-17) + 2f32.powi(-18);
        let (m, k, n) = (40usize, 32usize, 40usize);
        for (a, b) in [
            (x, 1.0),
            (1.0, x),
            (y, y),
            (-y, y),
            (-x, 1.0),
            (z, 1.0),
            (1.0, z),
        ] {
            let av = vec![a; m * k];
            let wv = vec![b; k * n];
            let c = product(m, k, n, &av, &wv, false);
            let want = (k as f64 * a as f64 * b as f64) as f32;
            assert_eq!(want as f64, k as f64 * a as f64 * b as f64, "exact in f32");
            for (e, &got) in c.iter().enumerate() {
                assert_eq!(got, want, "{a} × {b}: C[{}, {}]", e / n, e % n);
            }
        }
    }

    /// `cargo test --release -p kiln-backends weight_check_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn weight_check_speed() {
        if !usable() {
            return;
        }
        let b = PackedB::pack(768, 3072, |kk, j| ((kk + j) % 7) as f32 * 0.01);
        let t = std::time::Instant::now();
        assert!(weight_ok(&b));
        println!(
            "{:.2} ms for {} MB",
            t.elapsed().as_secs_f64() * 1e3,
            b.bytes().len() >> 20
        );
    }

    #[test]
    fn values_the_split_cannot_carry_are_refused() {
        if !usable() {
            return;
        }
        for bad in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            -3.4e38,
        ] {
            let (m, k) = (20, 40);
            let mut a = vec![0.5f32; m * k];
            a[17 * k + 39] = bad;
            let mut sa = aligned(split_a_len(m, k));
            // SAFETY: sizes as allocated.
            let ok = unsafe { split_a(m, k, a.as_ptr(), k, at(&mut sa), 0, a_tiles(m)) };
            assert!(!ok, "{bad} in A");
            let b = PackedB::pack(k, 3, |kk, j| if kk == 5 && j == 2 { bad } else { 0.5 });
            assert!(!weight_ok(&b), "{bad} in B");
        }
        // The largest finite value whose first part stays finite splits.
        let edge = f32::from_bits(0x7f7f_7fff);
        let b = PackedB::pack(4, 3, |_, _| edge);
        assert!(weight_ok(&b));
    }

    /// `cargo test --release -p kiln-backends amx_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn amx_speed() {
        if !usable() {
            println!("no AMX");
            return;
        }
        for (m, k, n) in [
            (1024usize, 768usize, 3072usize),
            (1024, 3072, 768),
            (128, 768, 2048),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let b = PackedB::pack(k, n, |kk, j| ((kk + j) % 7) as f32 * 0.01);
            assert!(weight_ok(&b));
            let mut sa = aligned(split_a_len(m, k));
            let pa = at(&mut sa);
            let mut c = vec![0f32; m * n];
            let (mut best, mut best_split) = (f64::MAX, f64::MAX);
            for _ in 0..10 {
                let t = std::time::Instant::now();
                // SAFETY: sizes as allocated.
                unsafe { split_a(m, k, a.as_ptr(), k, pa, 0, a_tiles(m)) };
                best_split = best_split.min(t.elapsed().as_secs_f64());
                // SAFETY: as above.
                unsafe {
                    gemm(
                        &b,
                        m,
                        0..m,
                        pa,
                        c.as_mut_ptr(),
                        n,
                        0,
                        b.panels(),
                        &[],
                        None,
                        std::ptr::null(),
                    )
                };
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{m}x{k}x{n}: one thread {:.0} GFLOP/s (split {:.0} us of {:.0})",
                2.0 * (m * n * k) as f64 / best / 1e9,
                best_split * 1e6,
                best * 1e6
            );
        }
    }
}

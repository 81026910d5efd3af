//! AVX-512 passes over one row of an attention score tile: the mask, the
//! scale with the row's maximum, and `exp(x − max)` with its sum. The
//! Cranelift-generated row kernel (`jit::kernels::exp_row_kernel`) does the
//! last on hosts without AVX-512. On BERT-base 8 × 128 the attention step
//! took 300–330 ms per four forwards with the 128-bit kernel and the
//! scalar mask-scale-max loop, 185–220 ms with these passes (interleaved
//! `KILN_PROFILE` runs, 2 threads). (Packing the tile products for kiln's
//! own GEMM microkernel was tried too: the packing cost more than the
//! `gemm` library's small-matrix path, 0.88× in the same runs.)
//!
//! `exp` is the same algorithm as the generated code's (`jit::emit`): the
//! argument clamped to `[-86.6, 88.72]`, `n = round(x·log₂e)`, the
//! remainder `r = x − n·ln 2` in two parts, a degree-7 polynomial, then
//! `·2ⁿ` (here by `vscalefps`, exact where the product is normal), `+∞`
//! above the range and `0` below, NaN kept.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the host runs these passes (AVX-512F and BW, for the mask's
/// byte compare).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::{has, Feature};
        has(Feature::Avx512f) && has(Feature::Avx512bw)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Lanes `0..n` of a 16-lane vector.
#[cfg(target_arch = "x86_64")]
pub(crate) fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// The mask and the scale in one pass: `row[j] = −∞` where `mask[j]`
/// (bytes: bool, i8, u8) is zero, else `row[j]·scale`; returns the row's maximum (NaN
/// when any element left is NaN; −∞ for an empty or fully masked row).
///
/// # Safety
/// `mask` holds `row.len()` bytes; the host has AVX-512F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn mask_scale_max(row: &mut [f32], mask: *const u8, scale: f32) -> f32 {
    let s = _mm512_set1_ps(scale);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut mx = ninf;
    let mut nan: u16 = 0;
    let mut j = 0;
    while j < row.len() {
        let k = lanes(row.len() - j);
        // SAFETY: lanes inside the row and the mask (the caller's promise).
        unsafe {
            let p = row.as_mut_ptr().add(j);
            let m = _mm_maskz_loadu_epi8(k, mask.add(j).cast());
            let shown = _mm_mask_test_epi8_mask(k, m, m);
            let v =
                _mm512_mask_blend_ps(shown, ninf, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), s));
            _mm512_mask_storeu_ps(p, k, v);
            nan |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(k, v, v);
            mx = _mm512_mask_max_ps(mx, k, mx, v);
        }
        j += 16;
    }
    if nan != 0 {
        return f32::NAN;
    }
    _mm512_reduce_max_ps(mx)
}

/// `row[j] *= scale`, returning the row's maximum (NaN when any element
/// is NaN; −∞ for an empty row).
///
/// # Safety
/// The host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    let s = _mm512_set1_ps(scale);
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut nan: u16 = 0;
    let mut j = 0;
    while j < row.len() {
        let k = lanes(row.len() - j);
        // SAFETY: masked to the row.
        unsafe {
            let p = row.as_mut_ptr().add(j);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), s);
            _mm512_mask_storeu_ps(p, k, v);
            nan |= _mm512_mask_cmp_ps_mask::<_CMP_UNORD_Q>(k, v, v);
            mx = _mm512_mask_max_ps(mx, k, mx, v);
        }
        j += 16;
    }
    if nan != 0 {
        return f32::NAN;
    }
    _mm512_reduce_max_ps(mx)
}

/// `row[j] = exp(row[j] − m)` in place, returning the sum of the new values.
///
/// # Safety
/// The host has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_sum(row: &mut [f32], m: f32) -> f32 {
    let mv = _mm512_set1_ps(m);
    let mut acc = _mm512_setzero_ps();
    let mut j = 0;
    while j < row.len() {
        let k = lanes(row.len() - j);
        // SAFETY: masked to the row.
        unsafe {
            let p = row.as_mut_ptr().add(j);
            let y = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p), mv));
            _mm512_mask_storeu_ps(p, k, y);
            acc = _mm512_mask_add_ps(acc, k, acc, y);
        }
        j += 16;
    }
    _mm512_reduce_add_ps(acc)
}

/// Sixteen `exp`s (the module's algorithm).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp(x: __m512) -> __m512 {
    use super::jit::emit::{EXP_HI, EXP_LO, EXP_P, LN2_HI, LN2_LO};
    let (hi, lo) = (_mm512_set1_ps(EXP_HI), _mm512_set1_ps(EXP_LO));
    // Clamp by compare and blend, so that NaN passes through.
    let xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi), x, hi);
    let xc = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(xc, lo), xc, lo);
    let t = _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_P[0]);
    for c in &EXP_P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    let y = _mm512_scalef_ps(y, n);
    let y = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi),
        y,
        _mm512_set1_ps(f32::INFINITY),
    );
    _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo),
        y,
        _mm512_setzero_ps(),
    )
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_and_keeps_special_values() {
        if !available() {
            return;
        }
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0467).collect();
        xs.extend([
            0.0,
            -0.0,
            88.72,
            88.73,
            -86.5,
            -86.7,
            -103.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let mut row = xs.clone();
        // SAFETY: AVX-512 checked above.
        let sum = unsafe { exp_sum(&mut row, 0.0) };
        for (&x, &y) in xs.iter().zip(&row) {
            let w = (x as f64).exp();
            if x.is_nan() {
                assert!(y.is_nan(), "exp(NaN) = {y}");
                continue;
            }
            if x < -86.6 {
                assert_eq!(y, 0.0, "exp({x})");
            } else if w > f32::MAX as f64 {
                assert_eq!(y, f32::INFINITY, "exp({x})");
            } else {
                let rel = ((y as f64 - w) / w).abs();
                assert!(rel < 4e-7, "exp({x}) = {y}, want {w}: relative {rel:e}");
            }
        }
        assert!(sum.is_nan(), "a NaN element makes the sum NaN");
        let finite: Vec<f32> = xs
            .iter()
            .copied()
            .filter(|x| x.is_finite() && *x < 80.0)
            .collect();
        let mut r = finite.clone();
        // SAFETY: as above.
        let s = unsafe { exp_sum(&mut r, 0.0) } as f64;
        let w: f64 = finite.iter().map(|&x| (x as f64).exp()).sum();
        assert!(((s - w) / w).abs() < 1e-6, "sum {s} want {w}");
    }

    #[test]
    fn scale_max_and_mask_cover_every_tail() {
        if !available() {
            return;
        }
        for n in 0..40 {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
            let mask: Vec<u8> = (0..n).map(|i| (i % 3 != 1) as u8 * (1 + i as u8)).collect();
            let mut row = xs.clone();
            // SAFETY: AVX-512 checked; the mask holds n bytes.
            let m = unsafe { mask_scale_max(&mut row, mask.as_ptr(), 0.5) };
            let want: Vec<f32> = xs
                .iter()
                .zip(&mask)
                .map(|(&x, &k)| if k == 0 { f32::NEG_INFINITY } else { x * 0.5 })
                .collect();
            assert_eq!(row, want, "n = {n}");
            let wm = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(m, wm, "n = {n}");
            // No mask: the scale alone.
            let mut row = xs.clone();
            // SAFETY: as above.
            let m = unsafe { scale_max(&mut row, 0.5) };
            let want: Vec<f32> = xs.iter().map(|&x| x * 0.5).collect();
            assert_eq!(row, want, "n = {n}");
            assert_eq!(
                m,
                want.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "n = {n}"
            );
        }
        let mut row = vec![1.0, f32::NAN, 3.0];
        // SAFETY: as above.
        assert!(unsafe { scale_max(&mut row, 1.0) }.is_nan());
        // A NaN the mask hides does not count; one it shows does.
        let mut row = vec![1.0, f32::NAN, 3.0];
        // SAFETY: as above; three mask bytes.
        assert_eq!(
            unsafe { mask_scale_max(&mut row, [1u8, 0, 1].as_ptr(), 1.0) },
            3.0
        );
        let mut row = vec![1.0, f32::NAN, 3.0];
        // SAFETY: as above.
        assert!(unsafe { mask_scale_max(&mut row, [1u8, 1, 0].as_ptr(), 1.0) }.is_nan());
    }
}

//! Dot products and multiply-adds of f32 vectors for the native attention
//! kernel, with SIMD chosen at run time (AVX-512, AVX2+FMA, or portable
//! code).

/// Accumulators per dot product: enough independent chains to hide the FMA
/// latency and fill 512-bit registers.
const LANES: usize = 32;

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy_portable(y: &mut [f32], a: f32, x: &[f32]) {
    for (d, s) in y.iter_mut().zip(x) {
        *d = s.mul_add(a, *d);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    // SAFETY: every load is inside both slices (full vectors below `n`,
    // then masked).
    unsafe {
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr().add(i + 16)),
                _mm512_loadu_ps(b.as_ptr().add(i + 16)),
                s1,
            );
            i += 32;
        }
        while i < n {
            let k = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            s0 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(k, a.as_ptr().add(i)),
                _mm512_maskz_loadu_ps(k, b.as_ptr().add(i)),
                s0,
            );
            i += 16;
        }
    }
    // A tree of adds, not a chain of 32.
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn axpy_avx512(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_portable(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_portable(y, a, x)
}

/// The SIMD level of this host, detected once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Avx512,
    Avx2,
    Portable,
}

pub(super) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use super::isa::{has, Feature};
        if has(Feature::Avx512f) {
            return Level::Avx512;
        }
        if has(Feature::Avx2) && has(Feature::Fma) {
            return Level::Avx2;
        }
    }
    Level::Portable
}

pub(super) fn dot(level: Level, a: &[f32], b: &[f32]) -> f32 {
    match level {
        // SAFETY: the host has the features (detected above).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { dot_avx512(a, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { dot_avx2(a, b) },
        _ => dot_portable(a, b),
    }
}

pub(super) fn axpy(level: Level, y: &mut [f32], a: f32, x: &[f32]) {
    match level {
        // SAFETY: the host has the features (detected above).
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { axpy_avx512(y, a, x) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { axpy_avx2(y, a, x) },
        _ => axpy_portable(y, a, x),
    }
}

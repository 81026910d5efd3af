//! Matrix–vector products (one row of `A`: every decode step's linear
//! layers). Bandwidth-bound: each weight is read once, in its stored order,
//! with SIMD fused multiply-adds chosen at run time (AVX-512, AVX2+FMA, or
//! portable code), the output columns split over threads.

use rayon::prelude::*;

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
    dot_portable(a, b)
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
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
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

/// Columns per task: large enough that a task outweighs its scheduling.
const COLS_PER_TASK: usize = 64;

/// `out[j] = Σ_k x[k]·w[j·ldw + k]`: each output a dot product with one
/// contiguous weight row (`nn.Linear`'s `[out, in]` read transposed).
pub(super) fn rows(x: &[f32], w: &[f32], ldw: usize, out: &mut [f32], threads: usize) {
    let level = level();
    let k = x.len();
    let run = |(c, chunk): (usize, &mut [f32])| {
        for (i, o) in chunk.iter_mut().enumerate() {
            let j = c * COLS_PER_TASK + i;
            *o = dot(level, x, &w[j * ldw..j * ldw + k]);
        }
    };
    if threads > 1 && out.len() > COLS_PER_TASK {
        out.par_chunks_mut(COLS_PER_TASK).enumerate().for_each(run);
    } else {
        out.chunks_mut(COLS_PER_TASK).enumerate().for_each(run);
    }
}

/// `out[j] = Σ_k x[k]·w[k·ldw + j]`: the weight read row by row (GPT-2's
/// `Conv1D` `[in, out]`), each task owning a block of output columns.
pub(super) fn cols(x: &[f32], w: &[f32], ldw: usize, out: &mut [f32], threads: usize) {
    let level = level();
    const BLOCK: usize = 256;
    let run = |(c, chunk): (usize, &mut [f32])| {
        chunk.fill(0.0);
        let j0 = c * BLOCK;
        for (kk, &xv) in x.iter().enumerate() {
            let row = &w[kk * ldw + j0..kk * ldw + j0 + chunk.len()];
            axpy(level, chunk, xv, row);
        }
    };
    if threads > 1 && out.len() > BLOCK {
        out.par_chunks_mut(BLOCK).enumerate().for_each(run);
    } else {
        out.chunks_mut(BLOCK).enumerate().for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_give_the_product() {
        let (k, n) = (70, 130);
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        // w as [n, k] rows, and its transpose as [k, n].
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let want: Vec<f64> = (0..n)
            .map(|j| (0..k).map(|q| x[q] as f64 * w[j * k + q] as f64).sum())
            .collect();
        for threads in [1, 2] {
            let mut a = vec![0f32; n];
            rows(&x, &w, k, &mut a, threads);
            let mut b = vec![0f32; n];
            cols(&x, &wt, n, &mut b, threads);
            for j in 0..n {
                assert!(
                    (a[j] as f64 - want[j]).abs() < 1e-4,
                    "rows {j}: {} vs {}",
                    a[j],
                    want[j]
                );
                assert!(
                    (b[j] as f64 - want[j]).abs() < 1e-4,
                    "cols {j}: {} vs {}",
                    b[j],
                    want[j]
                );
            }
        }
    }
}

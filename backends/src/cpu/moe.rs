//! The `moe` kernel: routing per token, then each expert's SwiGLU on the
//! tokens routed to it, as three GEMMs over that expert's slices of the
//! stacked weights. Experts no token chose are never read.

use super::kernels::{f32_or_widened, f32_view, Fv};
use crate::reference::kernels::{each_index, StepError, R};
use crate::reference::{CView, Memory};
use crate::routing::route;

/// Whether `v` addresses its elements row-major without gaps.
fn contiguous(v: &CView) -> bool {
    let mut want = 1;
    for (&n, &s) in v.shape.iter().zip(&v.strides).rev() {
        if n > 1 && s != want {
            return false;
        }
        want *= n;
    }
    true
}

/// `C[m, n] = A[m, k] · B` with `A` row-major (`lda`) and `B[kk, j]` at
/// `b[j * ldb + kk]` (a `[n, k]` row-major weight used transposed).
fn gemm_nt(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    threads: usize,
) {
    debug_assert!(a.len() >= m * k && c.len() >= m * n);
    debug_assert!(n == 0 || k == 0 || b.len() >= (n - 1) * ldb + k);
    // SAFETY: A is m×k row-major in `a`, B reads b[j·ldb + kk] for j < n,
    // kk < k (inside `b`, asserted above), C is m×n row-major in `c`.
    unsafe {
        super::kernels::library_gemm(
            (m, n, k),
            (c.as_mut_ptr(), 1, n as isize),
            (a.as_ptr(), 1, k as isize),
            (b.as_ptr(), ldb as isize, 1),
            threads,
        );
    }
}

/// The slice of a contiguous weight's root that `v` covers.
fn weight<'a>(f: &'a Fv<'_>, v: &CView) -> Option<&'a [f32]> {
    let n: usize = v.shape.iter().product();
    (contiguous(v) && v.offset + n <= f.len).then(|| {
        // SAFETY: `offset + n` elements lie inside the root (checked).
        unsafe { std::slice::from_raw_parts(f.base.add(v.offset).cast_const(), n) }
    })
}

pub(super) fn moe(
    mem: &mut Memory<'_>,
    ins: &[&CView],
    out: &CView,
    top_k: usize,
    threads: usize,
) -> Option<R> {
    let [xv, rv, gv, uv, dv] = ins[..] else {
        return None;
    };
    let (e, f, d) = match (&rv.shape[..], &gv.shape[..]) {
        ([e, _], [_, f, d]) => (*e, *f, *d),
        _ => return None,
    };
    if top_k == 0 || top_k > e {
        return Some(Err(StepError::Message(format!(
            "moe top_k={top_k} with {e} experts"
        ))));
    }
    let mut keep = Vec::new();
    let x = f32_view(mem, xv)?;
    let o = f32_view(mem, out)?;
    let rf = f32_or_widened(mem, rv, &mut keep)?;
    let gf = f32_or_widened(mem, gv, &mut keep)?;
    let uf = f32_or_widened(mem, uv, &mut keep)?;
    let df = f32_or_widened(mem, dv, &mut keep)?;
    let (router, gate, up, down) = (
        weight(&rf, rv)?,
        weight(&gf, gv)?,
        weight(&uf, uv)?,
        weight(&df, dv)?,
    );
    let lead = &xv.shape[..xv.shape.len().saturating_sub(1)];
    let last_stride = xv.strides.last().copied().unwrap_or(1);
    // Gather the tokens' rows (any view) into one row-major buffer.
    let mut xs = Vec::with_capacity(lead.iter().product::<usize>() * d);
    let gathered = each_index(lead, |idx| {
        let base = xv.at(idx);
        // SAFETY: every address of the view is inside its root (verified).
        xs.extend((0..d).map(|c| unsafe { x.get(base + c * last_stride) }));
        Ok(())
    });
    if let Err(e) = gathered {
        return Some(Err(e));
    }
    let tokens = xs.len().checked_div(d).unwrap_or(0);
    // Route in f64, as the interpreter does, so every backend picks the same experts.
    let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
    for t in 0..tokens {
        let xr = &xs[t * d..(t + 1) * d];
        let logits: Vec<f64> = (0..e)
            .map(|i| {
                router[i * d..(i + 1) * d]
                    .iter()
                    .zip(xr)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum()
            })
            .collect();
        for (ex, w) in route(&logits, top_k) {
            chosen[ex].push((t, w as f32));
        }
    }
    let mut y = vec![0f32; tokens * d];
    let (mut xe, mut g, mut u, mut ye) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (ex, rows) in chosen.iter().enumerate() {
        let m = rows.len();
        if m == 0 {
            continue;
        }
        xe.clear();
        for &(t, _) in rows {
            xe.extend_from_slice(&xs[t * d..(t + 1) * d]);
        }
        g.resize(m * f, 0.0);
        u.resize(m * f, 0.0);
        ye.resize(m * d, 0.0);
        // Threads for products worth splitting.
        let par = if m * f * d >= 1 << 18 { threads } else { 1 };
        let (ge, ue, de) = (
            &gate[ex * f * d..(ex + 1) * f * d],
            &up[ex * f * d..(ex + 1) * f * d],
            &down[ex * d * f..(ex + 1) * d * f],
        );
        gemm_nt((m, f, d), &xe, ge, d, &mut g, par);
        gemm_nt((m, f, d), &xe, ue, d, &mut u, par);
        for (gi, &ui) in g.iter_mut().zip(&u) {
            *gi = *gi / (1.0 + (-*gi).exp()) * ui;
        }
        gemm_nt((m, d, f), &g, de, f, &mut ye, par);
        for (r, &(t, w)) in rows.iter().enumerate() {
            for (acc, &v) in y[t * d..(t + 1) * d]
                .iter_mut()
                .zip(&ye[r * d..(r + 1) * d])
            {
                *acc += w * v;
            }
        }
    }
    let out_last = out.strides.last().copied().unwrap_or(1);
    let mut t = 0;
    Some(each_index(lead, |idx| {
        let base = out.at(idx);
        for c in 0..d {
            // SAFETY: every address of the output view is inside its root (verified).
            unsafe { o.set(base + c * out_last, y[t * d + c]) };
        }
        t += 1;
        Ok(())
    }))
}

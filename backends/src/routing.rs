//! Mixture-of-experts routing, the one rule every executor shares: softmax
//! over the router's logits, the `k` most probable experts, their
//! probabilities renormalised to sum to 1.

/// The experts chosen for one token and their weights, most probable first,
/// from the router's `logits` (one per expert). Exact ties go to the lower
/// expert index (PyTorch's CPU `topk` leaves their order unspecified: it was
/// measured choosing either way depending on the shape). A NaN logit makes
/// every weight NaN, so the output shows it.
pub fn route(logits: &[f64], k: usize) -> Vec<(usize, f64)> {
    let k = k.min(logits.len());
    if logits.iter().any(|l| l.is_nan()) {
        return (0..k).map(|e| (e, f64::NAN)).collect();
    }
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Descending probability; equal probabilities by ascending index.
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    order.truncate(k);
    let chosen: f64 = order.iter().map(|&e| exps[e] / total).sum();
    order
        .into_iter()
        .map(|e| (e, exps[e] / total / chosen))
        .collect()
}

fn dot<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum()
}

/// The mixture of SwiGLU experts over `x` (`tokens × d`, row-major) with
/// `router [E, d]`, `gate`/`up [E, f, d]`, `down [E, d, f]` (row-major,
/// `dims = (E, f, d)`), every sum in f64: per token, only the `top_k`
/// experts [`route`] picks are evaluated. The interpreter's and the
/// reference executor's definition of `moe`.
pub fn moe_rows<T: Copy + Into<f64>>(
    x: &[T],
    [router, gate, up, down]: [&[T]; 4],
    (e, f, d): (usize, usize, usize),
    top_k: usize,
) -> Vec<f64> {
    let tokens = x.len().checked_div(d).unwrap_or(0);
    let mut out = vec![0f64; tokens * d];
    let mut h = vec![0f64; f];
    for t in 0..tokens {
        let xr = &x[t * d..(t + 1) * d];
        let logits: Vec<f64> = (0..e)
            .map(|i| dot(&router[i * d..(i + 1) * d], xr))
            .collect();
        let y = &mut out[t * d..(t + 1) * d];
        for (ex, w) in route(&logits, top_k) {
            for (i, hi) in h.iter_mut().enumerate() {
                let row = (ex * f + i) * d;
                let g = dot(&gate[row..row + d], xr);
                let u = dot(&up[row..row + d], xr);
                *hi = g / (1.0 + (-g).exp()) * u;
            }
            for (c, yc) in y.iter_mut().enumerate() {
                let row = (ex * d + c) * f;
                let s: f64 = down[row..row + f]
                    .iter()
                    .zip(&h)
                    .map(|(&a, &b)| a.into() * b)
                    .sum();
                *yc += w * s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn picks_the_most_probable_and_renormalises() {
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let e = std::f64::consts::E;
        assert!((r[0].1 - e / (e + 1.0)).abs() < 1e-15);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-15);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let r = route(&[1.0, 3.0, 3.0, 2.0, 3.0], 2);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(r[0].1, 0.5);
    }

    #[test]
    fn nan_logits_give_nan_weights() {
        assert!(route(&[0.0, f64::NAN, 1.0], 2).iter().all(|x| x.1.is_nan()));
    }

    #[test]
    fn k_equal_to_the_experts_keeps_the_softmax() {
        let r = route(&[0.5, 0.5], 2);
        assert_eq!(r, vec![(0, 0.5), (1, 0.5)]);
    }
}

//! `moe`: a sparse mixture of SwiGLU experts, per token only the chosen ones.

use super::NodeCx;
use crate::routing::moe_rows;
use crate::{RunError, Tensor};

/// `moe(x[..., d], router[E, d], gate[E, f, d], up[E, f, d], down[E, d, f])`
/// with `top_k` experts per token (see [`kiln_ir::Op::Moe`]); sums in f64.
pub(super) fn moe(
    n: &NodeCx<'_>,
    [x, router, gate, up, down]: [&Tensor; 5],
    top_k: usize,
) -> Result<Tensor, RunError> {
    let xd = n.f32s(x, "input")?;
    let (rd, gd, ud, dd) = (
        n.f32s(router, "router")?,
        n.f32s(gate, "gate")?,
        n.f32s(up, "up")?,
        n.f32s(down, "down")?,
    );
    let d = x.shape().last().copied().unwrap_or(0);
    let (&[e, rw], &[ge, f, gw], &[de, dout, df]) = (router.shape(), gate.shape(), down.shape())
    else {
        return Err(n.invalid(format!(
            "moe needs router [E, d], gate [E, f, d], down [E, d, f], got {router}, {gate}, {down}"
        )));
    };
    if rw != d
        || ge != e
        || gw != d
        || de != e
        || dout != d
        || df != f
        || up.shape() != gate.shape()
    {
        return Err(n.invalid(format!(
            "moe shapes disagree: x {x}, router {router}, gate {gate}, up {up}, down {down}"
        )));
    }
    if top_k == 0 || top_k > e {
        return Err(n.invalid(format!("moe top_k={top_k} with {e} experts")));
    }
    let out = moe_rows(xd, [rd, gd, ud, dd], (e, f, d), top_k);
    let out = out.into_iter().map(|v| v as f32).collect();
    Ok(Tensor::f32(x.shape().to_vec(), out)?)
}

//! Data movement: reshape, permute, expand, slice, concat, gather. Each op
//! builds the flat source index of every output element and reads it with
//! [`take`]; none of them looks at the values (except gather's ids).

use kiln_ir::Dim;

use super::index::{broadcast_map, numel, strided_map, strides, take};
use super::NodeCx;
use crate::{RunError, Tensor};
use kiln_ir::tensor::{Element, TensorData};

fn sizes(n: &NodeCx<'_>, dims: &[Dim]) -> Result<Vec<usize>, RunError> {
    dims.iter().map(|d| n.size(d)).collect()
}

/// The same elements in row-major order under `shape`.
pub(super) fn reshape(n: &NodeCx<'_>, x: &Tensor, shape: &[Dim]) -> Result<Tensor, RunError> {
    let shape = sizes(n, shape)?;
    if kiln_ir::tensor::checked_numel(&shape) != Some(x.numel()) {
        return Err(n.invalid(format!(
            "cannot reshape {x} to {shape:?}: element counts differ"
        )));
    }
    Ok(x.reshaped(shape)?)
}

/// Output axis `i` is input axis `perm[i]`.
pub(super) fn permute(n: &NodeCx<'_>, x: &Tensor, perm: &[usize]) -> Result<Tensor, RunError> {
    let mut seen = vec![false; x.rank()];
    for &p in perm {
        if p >= x.rank() || std::mem::replace(&mut seen[p], true) {
            return Err(n.invalid(format!(
                "perm {perm:?} is not a permutation of the axes of {x}"
            )));
        }
    }
    if perm.len() != x.rank() {
        return Err(n.invalid(format!("perm {perm:?} does not cover the axes of {x}")));
    }
    let in_strides = strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let step: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    Ok(Tensor::new(
        shape.clone(),
        take(x.data(), &strided_map(&shape, &step, 0)),
    )?)
}

/// Broadcasts `x` to `shape` (size-1 axes stretch, new axes on the left).
pub(super) fn expand(n: &NodeCx<'_>, x: &Tensor, shape: &[Dim]) -> Result<Tensor, RunError> {
    let shape = sizes(n, shape)?;
    let map = broadcast_map(x.shape(), &shape)
        .ok_or_else(|| n.invalid(format!("cannot expand {x} to {shape:?}")))?;
    Ok(Tensor::new(shape, take(x.data(), &map))?)
}

/// Elements `start..end` along `axis`.
pub(super) fn slice(
    n: &NodeCx<'_>,
    x: &Tensor,
    axis: i64,
    start: &Dim,
    end: &Dim,
) -> Result<Tensor, RunError> {
    let a = n.axis(axis, x.rank())?;
    let (s, e) = (n.int(start)?, n.int(end)?);
    let size = x.shape()[a];
    if s < 0 || e < s || e > size as i64 {
        return Err(n.invalid(format!(
            "slice {s}..{e} is out of bounds for axis {a} of size {size} in {x}"
        )));
    }
    let in_strides = strides(x.shape());
    let mut shape = x.shape().to_vec();
    shape[a] = (e - s) as usize;
    let map = strided_map(&shape, &in_strides, s as usize * in_strides[a]);
    Ok(Tensor::new(shape, take(x.data(), &map))?)
}

/// Concatenation along `axis`; all operands agree on dtype and every other axis.
pub(super) fn concat(n: &NodeCx<'_>, xs: &[&Tensor], axis: i64) -> Result<Tensor, RunError> {
    let Some(first) = xs.first() else {
        return Err(n.invalid("concat needs at least one operand"));
    };
    let a = n.axis(axis, first.rank())?;
    let mut shape = first.shape().to_vec();
    shape[a] = 0;
    for x in xs {
        let mut other = x.shape().to_vec();
        if x.dtype() != first.dtype() || other.len() != shape.len() {
            return Err(n.invalid(format!("cannot concatenate {x} with {first}")));
        }
        other[a] = shape[a];
        if other != shape {
            return Err(n.invalid(format!(
                "cannot concatenate {x} with {first} along axis {a}"
            )));
        }
        shape[a] += x.shape()[a];
    }
    let outer = numel(&shape[..a]);
    let data = match first.data() {
        TensorData::F32(_) => join::<f32>(xs, a, outer),
        TensorData::I32(_) => join::<i32>(xs, a, outer),
        TensorData::I64(_) => join::<i64>(xs, a, outer),
        TensorData::Bool(_) => join::<bool>(xs, a, outer),
        TensorData::F16(_) => join::<half::f16>(xs, a, outer),
        TensorData::BF16(_) => join::<half::bf16>(xs, a, outer),
    };
    Ok(Tensor::new(shape, data)?)
}

/// For each of the `outer` leading positions, the chunk of every operand in turn.
fn join<T: Element>(xs: &[&Tensor], a: usize, outer: usize) -> TensorData {
    let parts: Vec<&[T]> = xs.iter().filter_map(|x| T::slice(x.data())).collect();
    let chunks: Vec<usize> = xs.iter().map(|x| numel(&x.shape()[a..])).collect();
    let mut out = Vec::with_capacity(chunks.iter().sum::<usize>() * outer);
    for o in 0..outer {
        for (part, &c) in parts.iter().zip(&chunks) {
            out.extend_from_slice(&part[o * c..(o + 1) * c]);
        }
    }
    T::wrap(out)
}

/// `out[idx..., rest...] = table[ids[idx...], rest...]`; an id outside the table is an error.
pub(super) fn gather(n: &NodeCx<'_>, table: &Tensor, ids: &Tensor) -> Result<Tensor, RunError> {
    let id_values: Vec<i64> = match ids.data() {
        TensorData::I32(d) => d.iter().map(|&i| i as i64).collect(),
        TensorData::I64(d) => d.to_vec(),
        _ => return Err(n.invalid(format!("ids must be i32 or i64, got {}", ids.dtype()))),
    };
    let Some((&rows, rest)) = table.shape().split_first() else {
        return Err(n.invalid(format!("the table {table} has no rows axis")));
    };
    let row = numel(rest);
    let mut map = Vec::with_capacity(id_values.len() * row);
    for &id in &id_values {
        let r = usize::try_from(id)
            .ok()
            .filter(|&r| r < rows)
            .ok_or_else(|| RunError::GatherIndex {
                node: n.name.to_string(),
                id,
                rows,
            })?;
        map.extend(r * row..(r + 1) * row);
    }
    let mut shape = ids.shape().to_vec();
    shape.extend_from_slice(rest);
    Ok(Tensor::new(shape, take(table.data(), &map))?)
}

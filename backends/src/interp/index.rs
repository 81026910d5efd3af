//! Row-major index arithmetic: strides, numpy broadcasting, and source-index maps.
//!
//! Every data-movement op of the interpreter is written as "for each output
//! element, which input element?": a `Vec<usize>` of flat source indices, which
//! [`take`] then reads. Slow, but each op is a few obviously correct lines.

use kiln_ir::tensor::{Element, TensorData};

/// Row-major strides of `shape` (the last axis has stride 1).
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The element count of `shape`.
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Numpy broadcast of two shapes (aligned right, size 1 stretches); `None` if incompatible.
pub(crate) fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = (i + a.len()).checked_sub(rank).map_or(1, |j| a[j]);
        let db = (i + b.len()).checked_sub(rank).map_or(1, |j| b[j]);
        out.push(match (da, db) {
            _ if da == db => da,
            (1, _) => db,
            (_, 1) => da,
            _ => return None,
        });
    }
    Some(out)
}

/// For each element of `to`, the flat index of the element of `from` that
/// broadcasts onto it; `None` if `from` does not broadcast to `to`.
pub(crate) fn broadcast_map(from: &[usize], to: &[usize]) -> Option<Vec<usize>> {
    if from.len() > to.len() {
        return None;
    }
    let lead = to.len() - from.len();
    let from_strides = strides(from);
    // The stride of each output axis in `from`, 0 where `from` is stretched or absent.
    let mut step = vec![0usize; to.len()];
    for (j, (&f, &s)) in from.iter().zip(&from_strides).enumerate() {
        let t = to[lead + j];
        if f == t {
            step[lead + j] = s;
        } else if f != 1 {
            return None;
        }
    }
    Some(strided_map(to, &step, 0))
}

/// For each element of `shape` (row-major), `base + Σ coord[i]·step[i]`.
pub(crate) fn strided_map(shape: &[usize], step: &[usize], base: usize) -> Vec<usize> {
    let n = numel(shape);
    let mut out = Vec::with_capacity(n);
    let mut coord = vec![0usize; shape.len()];
    let mut offset = base;
    for _ in 0..n {
        out.push(offset);
        // Increment the multi-index like an odometer, keeping `offset` in step.
        for axis in (0..shape.len()).rev() {
            coord[axis] += 1;
            offset += step[axis];
            if coord[axis] < shape[axis] {
                break;
            }
            offset -= step[axis] * coord[axis];
            coord[axis] = 0;
        }
    }
    out
}

/// The elements of `data` at `indices`, in that order.
pub(crate) fn take(data: &TensorData, indices: &[usize]) -> TensorData {
    fn pick<T: Element>(src: &[T], indices: &[usize]) -> TensorData {
        T::wrap(indices.iter().map(|&i| src[i]).collect())
    }
    match data {
        TensorData::F32(d) => pick(d, indices),
        TensorData::I32(d) => pick(d, indices),
        TensorData::I64(d) => pick(d, indices),
        TensorData::Bool(d) => pick(d, indices),
        TensorData::F16(d) => pick(d, indices),
        TensorData::BF16(d) => pick(d, indices),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_and_broadcast() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
        assert_eq!(broadcast_shapes(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
        assert_eq!(broadcast_shapes(&[2, 3], &[4, 3]), None);
        assert_eq!(broadcast_shapes(&[0, 1], &[1, 5]), Some(vec![0, 5]));
        assert_eq!(broadcast_map(&[3], &[2, 3]), Some(vec![0, 1, 2, 0, 1, 2]));
        assert_eq!(
            broadcast_map(&[2, 1], &[2, 3]),
            Some(vec![0, 0, 0, 1, 1, 1])
        );
        assert_eq!(broadcast_map(&[], &[2]), Some(vec![0, 0]));
        assert_eq!(broadcast_map(&[2], &[3]), None);
        assert_eq!(strided_map(&[2, 2], &[1, 2], 10), vec![10, 12, 11, 13]);
        assert_eq!(strided_map(&[], &[], 4), vec![4]);
        assert_eq!(strided_map(&[2, 0], &[1, 1], 0), Vec::<usize>::new());
    }
}

//! Strided layouts over a buffer, with symbolic sizes: how reshape, permute,
//! slice and expand become views instead of copies.
//!
//! A [`Layout`] addresses element `idx` of a tensor of `shape` at
//! `offset + Σ idx[i] · strides[i]` elements into its root buffer. Every dim
//! here is over the run-time symbols only (compile-time bindings are
//! substituted by the lowering), so two layouts are equal iff their dims'
//! normal forms are.

use kiln_ir::{Dim, DimError};

/// Offset and strides (in elements) of a view of `shape` over a root buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The view's shape.
    pub shape: Vec<Dim>,
    /// Elements to step per index of each axis (0 on a broadcast axis).
    pub strides: Vec<Dim>,
    /// Elements from the start of the root buffer to element `[0, …, 0]`.
    pub offset: Dim,
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[Dim]) -> Result<Vec<Dim>, DimError> {
    let mut strides = vec![Dim::constant(1); shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].mul(&shape[i + 1])?;
    }
    Ok(strides)
}

/// A value standing in for each run-time symbol when the lowering must decide
/// which of two symbolic products is the larger (the decision is then checked
/// by exact symbolic equality, so a wrong guess only costs a copy).
fn proxy(d: &Dim) -> Option<i128> {
    let mut env = std::collections::BTreeMap::new();
    for (i, s) in d.symbols().into_iter().enumerate() {
        env.insert(s, Dim::constant(1_000_003 + 2 * i as i64));
    }
    d.substitute(&env).ok()?.as_const().map(i128::from)
}

impl Layout {
    /// The whole of a contiguous buffer of `shape`.
    pub fn contiguous(shape: &[Dim]) -> Result<Layout, DimError> {
        Ok(Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape)?,
            offset: Dim::constant(0),
        })
    }

    /// Whether this layout is the whole of a contiguous buffer of its shape
    /// (strides of size-1 axes do not matter).
    pub fn is_contiguous(&self) -> bool {
        if !self.offset.is_const(0) {
            return false;
        }
        let Ok(row_major) = contiguous_strides(&self.shape) else {
            return false;
        };
        self.shape
            .iter()
            .zip(self.strides.iter().zip(&row_major))
            .all(|(d, (s, r))| d.is_const(1) || s == r)
    }

    /// This layout with the strides of its size-1 axes set to 0 (they never
    /// move the address), so layouts that address the same elements compare equal.
    pub fn normalized(&self) -> Layout {
        let mut out = self.clone();
        for (d, s) in out.shape.iter().zip(out.strides.iter_mut()) {
            if d.is_const(1) {
                *s = Dim::constant(0);
            }
        }
        out
    }

    /// When this layout reads every element of a contiguous buffer laid out
    /// as `whole` exactly once (a permutation of a reshape of it), the layout
    /// over `dst`'s buffer that writes, at each index of `whole`, where `dst`
    /// would receive that element: a producer of `whole` can then write
    /// straight into `dst` (this layout copied into `dst` otherwise).
    pub fn transfer(&self, whole: &Layout, dst: &Layout) -> Option<Layout> {
        if !self.offset.is_const(0) || dst.shape != self.shape {
            return None;
        }
        // Axes by decreasing stride: the order the buffer stores them in.
        let mut order: Vec<usize> = (0..self.shape.len()).collect();
        let keys: Vec<i128> = self
            .strides
            .iter()
            .zip(&self.shape)
            .map(|(s, d)| {
                if d.is_const(1) {
                    -1
                } else {
                    proxy(s).unwrap_or(-2)
                }
            })
            .collect();
        if keys.contains(&-2) {
            return None;
        }
        order.sort_by(|&a, &b| keys[b].cmp(&keys[a]));
        let stored = self.permute(&order);
        let numel = |shape: &[Dim]| {
            shape
                .iter()
                .try_fold(Dim::constant(1), |acc, d| acc.mul(d))
                .ok()
        };
        let contiguous = Layout::contiguous(&stored.shape).ok()?;
        if stored.normalized() != contiguous.normalized()
            || numel(&stored.shape)? != numel(&whole.shape)?
        {
            return None;
        }
        dst.permute(&order).reshape(&whole.shape)
    }

    /// Output axis `i` is axis `perm[i]` of this layout.
    pub fn permute(&self, perm: &[usize]) -> Layout {
        Layout {
            shape: perm.iter().map(|&p| self.shape[p].clone()).collect(),
            strides: perm.iter().map(|&p| self.strides[p].clone()).collect(),
            offset: self.offset.clone(),
        }
    }

    /// `start..end` along `axis`.
    pub fn slice(&self, axis: usize, start: &Dim, end: &Dim) -> Result<Layout, DimError> {
        let mut out = self.clone();
        out.offset = self.offset.add(&start.mul(&self.strides[axis])?)?;
        out.shape[axis] = end.sub(start)?;
        Ok(out)
    }

    /// Broadcast to `shape` (aligned on the right; size-1 axes and new leading
    /// axes get stride 0). The caller has checked that the shapes broadcast.
    pub fn broadcast_to(&self, shape: &[Dim]) -> Layout {
        let lead = shape.len().saturating_sub(self.shape.len());
        let mut strides = vec![Dim::constant(0); shape.len()];
        for (i, target) in shape.iter().enumerate().skip(lead) {
            let j = i - lead;
            let own = &self.shape[j];
            strides[i] = if own.is_const(1) && !target.is_const(1) {
                Dim::constant(0)
            } else {
                self.strides[j].clone()
            };
        }
        Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        }
    }

    /// The same elements under `shape`, when the strides allow it without a
    /// copy (each group of old axes that maps onto a group of new axes must be
    /// contiguous within itself); `None` when a copy is needed.
    pub fn reshape(&self, shape: &[Dim]) -> Option<Layout> {
        let old: Vec<(&Dim, &Dim)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| !d.is_const(1))
            .collect();
        let mut strides = vec![Dim::constant(0); shape.len()];
        let (mut i, mut j) = (0, 0);
        loop {
            while j < shape.len() && shape[j].is_const(1) {
                j += 1;
            }
            if i == old.len() || j == shape.len() {
                break;
            }
            // Grow the two groups until their products agree.
            let (mut gi, mut gj) = (i + 1, j + 1);
            let (mut po, mut pn) = (old[i].0.clone(), shape[j].clone());
            while po != pn {
                let grow_old = proxy(&po)? < proxy(&pn)?;
                if grow_old {
                    po = po.mul(old.get(gi)?.0).ok()?;
                    gi += 1;
                } else {
                    pn = pn.mul(shape.get(gj)?).ok()?;
                    gj += 1;
                }
            }
            for k in i..gi - 1 {
                if *old[k].1 != old[k + 1].1.mul(old[k + 1].0).ok()? {
                    return None;
                }
            }
            let mut cur = old[gi - 1].1.clone();
            for k in (j..gj).rev() {
                strides[k] = cur.clone();
                cur = cur.mul(&shape[k]).ok()?;
            }
            i = gi;
            j = gj;
        }
        // Every remaining axis on either side must be of size 1.
        if i != old.len() || shape[j..].iter().any(|d| !d.is_const(1)) {
            return None;
        }
        Some(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(s: &str) -> Vec<Dim> {
        s.split(',')
            .map(|p| kiln_ir::parse_dim(p.trim()).unwrap())
            .collect()
    }

    #[test]
    fn contiguous_reshapes_are_views() {
        let l = Layout::contiguous(&dims("B, T, 768")).unwrap();
        let r = l.reshape(&dims("B, T, 12, 64")).unwrap();
        assert_eq!(r.strides, dims("768 * T, 768, 64, 1"));
        let back = r.reshape(&dims("B * T, 768")).unwrap();
        assert_eq!(back.strides, dims("768, 1"));
        let ones = l.reshape(&dims("1, B, T, 1, 768")).unwrap();
        assert_eq!(ones.shape, dims("1, B, T, 1, 768"));
    }

    #[test]
    fn transposed_merges_need_a_copy_but_splits_do_not() {
        let l = Layout::contiguous(&dims("B, T, 12, 64"))
            .unwrap()
            .permute(&[0, 2, 1, 3]);
        assert!(l.reshape(&dims("B, T * 12, 64")).is_none());
        assert!(l.reshape(&dims("B, 12, T, 8, 8")).is_some());
    }

    #[test]
    fn broadcast_and_slice() {
        let l = Layout::contiguous(&dims("1, T")).unwrap();
        let b = l.broadcast_to(&dims("B, 4, T"));
        assert_eq!(b.strides, dims("0, 0, 1"));
        let s = Layout::contiguous(&dims("L, S, 8"))
            .unwrap()
            .slice(1, &Dim::constant(2), &Dim::sym("S"))
            .unwrap();
        assert_eq!(s.offset, Dim::constant(16));
        assert_eq!(s.shape, dims("L, S - 2, 8"));
    }
}

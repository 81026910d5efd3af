//! The context shape rules run in: compile-time symbol bindings, dim comparison,
//! broadcasting, and the [`ShapeError`] a rule reports.

use std::collections::BTreeMap;

use crate::dim::{Dim, DimError};
use crate::types::{shape_string, DType, TensorType};

/// Why a shape rule rejected its operands. The node that failed is added by the
/// caller (verifier or builder), which knows its printed form and source line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// Wrong number of operands.
    #[error("expects {expected} operand(s), got {got}")]
    Arity { expected: String, got: usize },
    /// An operand has a dtype the op does not accept.
    #[error("{what} must be {expected}, got {got}")]
    DType {
        what: String,
        expected: String,
        got: DType,
    },
    /// An operand has the wrong rank.
    #[error("{what} must have rank {expected}, got rank {got} ({ty})")]
    Rank {
        what: String,
        expected: String,
        got: usize,
        ty: String,
    },
    /// Two dims that the contract says are equal differ.
    #[error("{what}: {lhs} vs {rhs} ({lhs_ty} and {rhs_ty})")]
    DimMismatch {
        what: String,
        lhs: String,
        rhs: String,
        lhs_ty: String,
        rhs_ty: String,
    },
    /// Two shapes cannot be broadcast together.
    #[error("cannot broadcast {lhs} with {rhs}: axis {axis} is {a} vs {b} (neither is 1)")]
    Broadcast {
        lhs: String,
        rhs: String,
        axis: i64,
        a: String,
        b: String,
    },
    /// A reshape or expand that changes the number of elements.
    #[error(
        "reshape changes the element count: {from} has {from_count} elements, {to} has {to_count}"
    )]
    ElementCount {
        from: String,
        to: String,
        from_count: String,
        to_count: String,
    },
    /// An axis attribute outside `-rank..rank`.
    #[error("{what}: axis {axis} is out of range for rank {rank}")]
    Axis {
        what: String,
        axis: i64,
        rank: usize,
    },
    /// Size arithmetic that breaks the exact-division contract or overflows.
    #[error("{expr}: {source}")]
    Dim {
        expr: String,
        #[source]
        source: DimError,
    },
    /// An attribute value the op cannot accept.
    #[error("{0}")]
    Attribute(String),
}

/// Compile-time symbol bindings, resolved to values over run-time symbols.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShapeCx {
    env: BTreeMap<String, Dim>,
}

impl ShapeCx {
    /// A context with no bindings (every symbol is free).
    pub fn new() -> ShapeCx {
        ShapeCx::default()
    }

    /// Binds `name` to `value`, itself evaluated under the earlier bindings.
    pub fn bind(&mut self, name: &str, value: &Dim) -> Result<Dim, ShapeError> {
        let v = self.eval(value)?;
        self.env.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Whether `name` has a compile-time binding.
    pub fn is_bound(&self, name: &str) -> bool {
        self.env.contains_key(name)
    }

    /// The resolved bindings.
    pub fn bindings(&self) -> &BTreeMap<String, Dim> {
        &self.env
    }

    /// `d` with every bound symbol replaced by its value, divisions checked.
    pub fn eval(&self, d: &Dim) -> Result<Dim, ShapeError> {
        // Fully bound (every run-time size): plain integer arithmetic. An
        // error takes the symbolic path, which reports it the same way.
        if let Ok(Some(v)) = d.eval_const(&self.env) {
            return Ok(Dim::constant(v));
        }
        d.substitute(&self.env).map_err(|source| ShapeError::Dim {
            expr: d.to_string(),
            source,
        })
    }

    /// `d`'s value when every symbol it reads is bound to a number (`None`
    /// otherwise, or on an arithmetic error, which [`ShapeCx::eval`]
    /// reports): the allocation-free path of run-time sizes.
    pub fn value(&self, d: &Dim) -> Option<i64> {
        d.eval_const(&self.env).ok().flatten()
    }

    /// Whether two dims are equal under the bindings.
    pub fn same(&self, a: &Dim, b: &Dim) -> Result<bool, ShapeError> {
        Ok(a == b || self.eval(a)? == self.eval(b)?)
    }

    /// Whether `d` is the constant `n` under the bindings.
    pub fn is_const(&self, d: &Dim, n: i64) -> Result<bool, ShapeError> {
        Ok(self.eval(d)?.is_const(n))
    }

    /// A dim for an error message: `d=768` when binding changes it, else `d`.
    pub fn describe(&self, d: &Dim) -> String {
        match self.eval(d) {
            Ok(v) if v != *d => format!("{d}={v}"),
            _ => d.to_string(),
        }
    }

    /// Checks that two dims agree, or reports `what` with both dims and types.
    pub fn expect_same(
        &self,
        what: &str,
        a: &Dim,
        b: &Dim,
        a_ty: &TensorType,
        b_ty: &TensorType,
    ) -> Result<(), ShapeError> {
        if self.same(a, b)? {
            return Ok(());
        }
        Err(ShapeError::DimMismatch {
            what: what.to_string(),
            lhs: self.describe(a),
            rhs: self.describe(b),
            lhs_ty: a_ty.to_string(),
            rhs_ty: b_ty.to_string(),
        })
    }

    /// Numpy-style broadcast of two shapes (aligned on the right).
    pub fn broadcast(&self, a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, ShapeError> {
        let rank = a.len().max(b.len());
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let da = (i + a.len()).checked_sub(rank).map(|j| &a[j]);
            let db = (i + b.len()).checked_sub(rank).map(|j| &b[j]);
            let d = match (da, db) {
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (Some(x), Some(y)) => {
                    if self.same(x, y)? {
                        x.clone()
                    } else if self.is_const(x, 1)? {
                        y.clone()
                    } else if self.is_const(y, 1)? {
                        x.clone()
                    } else {
                        return Err(ShapeError::Broadcast {
                            lhs: shape_string(a),
                            rhs: shape_string(b),
                            axis: i as i64 - rank as i64,
                            a: self.describe(x),
                            b: self.describe(y),
                        });
                    }
                }
                (None, None) => Dim::constant(1),
            };
            out.push(d);
        }
        Ok(out)
    }

    /// The product of `dims`, for element counts.
    pub fn product(&self, dims: &[Dim]) -> Result<Dim, ShapeError> {
        let mut acc = Dim::constant(1);
        for d in dims {
            acc = acc.mul(&self.eval(d)?).map_err(|source| ShapeError::Dim {
                expr: shape_string(dims),
                source,
            })?;
        }
        Ok(acc)
    }
}

/// Resolves a possibly negative axis against `rank`.
pub fn normalize_axis(what: &str, axis: i64, rank: usize) -> Result<usize, ShapeError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(ShapeError::Axis {
            what: what.to_string(),
            axis,
            rank,
        });
    }
    Ok(a as usize)
}

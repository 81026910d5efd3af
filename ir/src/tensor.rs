//! Host tensors: a row-major shape plus typed element storage.
//!
//! A [`Tensor`] keeps its invariant (the storage holds exactly `numel()` elements
//! of its dtype) by construction: the fields are private and every constructor
//! checks the length. Storage is reference-counted, so cloning a tensor (a weight
//! bound into an executable, a reshape) copies no elements.

use std::fmt;
use std::sync::Arc;

use crate::types::DType;

/// A tensor that cannot be formed from the values given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The storage length differs from the shape's element count.
    #[error("shape {shape:?} of {dtype} needs {} elements, got {got}", checked_numel(shape).map_or("too many".to_string(), |n| n.to_string()))]
    Length {
        /// The shape.
        shape: Vec<usize>,
        /// The element type.
        dtype: DType,
        /// The number of elements given.
        got: usize,
    },
    /// Token rows of different lengths.
    #[error("token row {row} has {got} ids, but row 0 has {expected}")]
    RaggedTokens {
        /// The first row that differs.
        row: usize,
        /// The length of row 0.
        expected: usize,
        /// Its length.
        got: usize,
    },
    /// A dtype host tensors do not store.
    #[error("{what}: dtype {dtype} is not supported")]
    UnsupportedDType {
        /// What was asked.
        what: String,
        /// The dtype.
        dtype: DType,
    },
}

/// Typed element storage of a tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats (f16/bf16 weights are converted to this on load).
    F32(Arc<[f32]>),
    /// 32-bit signed integers.
    I32(Arc<[i32]>),
    /// 64-bit signed integers (token ids, positions).
    I64(Arc<[i64]>),
    /// Booleans (masks).
    Bool(Arc<[bool]>),
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// The number of elements stored.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(d) => d.len(),
            TensorData::I32(d) => d.len(),
            TensorData::I64(d) => d.len(),
            TensorData::Bool(d) => d.len(),
        }
    }

    /// Whether no elements are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An element type a [`Tensor`] can store; lets shape-moving code be written once.
pub trait Element: Copy + 'static {
    /// The kiln dtype of this element type.
    const DTYPE: DType;
    /// The elements of `data` when it holds this type.
    fn slice(data: &TensorData) -> Option<&[Self]>;
    /// Wraps a vector of this type as storage.
    fn wrap(values: Vec<Self>) -> TensorData;
}

macro_rules! element {
    ($t:ty, $variant:ident, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn slice(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$variant(d) => Some(d),
                    _ => None,
                }
            }
            fn wrap(values: Vec<Self>) -> TensorData {
                TensorData::$variant(values.into())
            }
        }
    };
}

element!(f32, F32, DType::F32);
element!(i32, I32, DType::I32);
element!(i64, I64, DType::I64);
element!(bool, Bool, DType::Bool);

/// The number of elements of `shape`, or `None` when it overflows `usize`.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Weights by parameter name (`@wte` is the key `"wte"`).
pub type Weights = std::collections::BTreeMap<String, Tensor>;

/// A dense host tensor: dtype, row-major shape and elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// A tensor from a shape and storage; the storage length must equal the element count.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Tensor, TensorError> {
        let expected = checked_numel(&shape);
        if expected != Some(data.len()) {
            return Err(TensorError::Length {
                shape,
                dtype: data.dtype(),
                got: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of any storable element type.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Tensor, TensorError> {
        Tensor::new(shape, T::wrap(values))
    }

    /// An f32 tensor; `values.len()` must equal the element count of `shape`.
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Result<Tensor, TensorError> {
        Tensor::from_vec(shape, values)
    }

    /// An i32 tensor; `values.len()` must equal the element count of `shape`.
    pub fn i32(shape: Vec<usize>, values: Vec<i32>) -> Result<Tensor, TensorError> {
        Tensor::from_vec(shape, values)
    }

    /// An i64 tensor; `values.len()` must equal the element count of `shape`.
    pub fn i64(shape: Vec<usize>, values: Vec<i64>) -> Result<Tensor, TensorError> {
        Tensor::from_vec(shape, values)
    }

    /// A bool tensor; `values.len()` must equal the element count of `shape`.
    pub fn bool(shape: Vec<usize>, values: Vec<bool>) -> Result<Tensor, TensorError> {
        Tensor::from_vec(shape, values)
    }

    /// A tensor of zeros (`false` for bool); f16/bf16 are not storable.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        let n = checked_numel(&shape).ok_or_else(|| TensorError::Length {
            shape: shape.clone(),
            dtype,
            got: 0,
        })?;
        let data = match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n].into()),
            DType::I32 => TensorData::I32(vec![0; n].into()),
            DType::I64 => TensorData::I64(vec![0; n].into()),
            DType::Bool => TensorData::Bool(vec![false; n].into()),
            DType::F16 | DType::BF16 => {
                return Err(TensorError::UnsupportedDType {
                    what: "Tensor::zeros".into(),
                    dtype,
                })
            }
        };
        Ok(Tensor { shape, data })
    }

    /// Token ids `i64[B, T]` from `B` rows of equal length `T`.
    pub fn from_tokens<R: AsRef<[i64]>>(rows: &[R]) -> Result<Tensor, TensorError> {
        let width = rows.first().map_or(0, |r| r.as_ref().len());
        let mut values = Vec::with_capacity(rows.len() * width);
        for (row, r) in rows.iter().enumerate() {
            let r = r.as_ref();
            if r.len() != width {
                return Err(TensorError::RaggedTokens {
                    row,
                    expected: width,
                    got: r.len(),
                });
            }
            values.extend_from_slice(r);
        }
        Tensor::i64(vec![rows.len(), width], values)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The shape, outermost axis first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of axes.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The typed storage.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The elements, when this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        f32::slice(&self.data)
    }

    /// The elements, when this is an i32 tensor.
    pub fn as_i32(&self) -> Option<&[i32]> {
        i32::slice(&self.data)
    }

    /// The elements, when this is an i64 tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        i64::slice(&self.data)
    }

    /// The elements, when this is a bool tensor.
    pub fn as_bool(&self) -> Option<&[bool]> {
        bool::slice(&self.data)
    }

    /// The same elements under another shape with the same element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        Tensor::new(shape, self.data.clone())
    }
}

/// Prints the type, e.g. `f32[2, 3]` (not the elements).
impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype(), self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_check_the_element_count() {
        let t = Tensor::f32(vec![2, 3], vec![0.0; 6]).unwrap();
        assert_eq!(
            (t.dtype(), t.shape(), t.numel()),
            (DType::F32, &[2usize, 3][..], 6)
        );
        assert_eq!(t.to_string(), "f32[2, 3]");
        let err = Tensor::f32(vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "shape [2, 3] of f32 needs 6 elements, got 5"
        );
        let s = Tensor::i64(vec![], vec![7]).unwrap();
        assert_eq!(s.as_i64(), Some(&[7i64][..]));
        assert_eq!(s.as_f32(), None);
    }

    #[test]
    fn zeros_and_tokens() {
        let z = Tensor::zeros(DType::Bool, vec![2, 2]).unwrap();
        assert_eq!(z.as_bool(), Some(&[false; 4][..]));
        assert!(Tensor::zeros(DType::F16, vec![1]).is_err());
        let t = Tensor::from_tokens(&[[1, 2, 3], [4, 5, 6]]).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_i64(), Some(&[1i64, 2, 3, 4, 5, 6][..]));
        let err = Tensor::from_tokens(&[vec![1, 2], vec![3]]).unwrap_err();
        assert_eq!(err.to_string(), "token row 1 has 1 ids, but row 0 has 2");
    }
}

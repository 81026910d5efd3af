//! Host tensors: a row-major shape plus bytes of one dtype.
//!
//! A [`Tensor`] keeps its invariant (the storage holds exactly `numel()` elements
//! of its dtype) by construction: the fields are private and every constructor
//! checks the length. Storage is bytes shared by reference count — an owned
//! allocation or a range of a memory-mapped weight file, read in place — so
//! cloning a tensor (a weight bound into an executable, a reshape) copies no
//! elements, and f16/bf16 weights stay 16-bit. Strided views are the lowered
//! Program's business (`kiln_backends::lower`); host tensors are contiguous.

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

// Tensor bytes are little-endian on disk (safetensors) and read in place.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "kiln reads weights in place and needs a little-endian target"
);

/// Bytes a tensor can live in: an owned allocation or a memory-mapped file.
///
/// # Safety
/// [`ByteSource::bytes`] must return the same slice (same address, length
/// and contents) on every call for as long as the source lives: a [`Buf`]
/// checks alignment and validity once and then reads the bytes in place.
pub unsafe trait ByteSource: Send + Sync + std::panic::RefUnwindSafe + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];

    /// A hint that `len` bytes at `offset` will not be read for a while (a
    /// backend copied them into its own layout): a mapped file may drop
    /// those pages from memory; reading them again brings them back.
    fn release(&self, _offset: usize, _len: usize) {}
}

/// An element type whose bytes can be read in place.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value,
/// except for `bool`, whose bytes [`Buf::from_source`] checks.
pub unsafe trait Pod:
    Copy + Send + Sync + std::panic::RefUnwindSafe + std::fmt::Debug + PartialEq + 'static
{
    /// The kiln dtype of this element type.
    const DTYPE: DType;
}

// SAFETY: every bit pattern is a valid f32, i32, i64, f16 and bf16; bool's
// bytes are checked where they come from outside Rust.
unsafe impl Pod for f32 {
    const DTYPE: DType = DType::F32;
}
unsafe impl Pod for i32 {
    const DTYPE: DType = DType::I32;
}
unsafe impl Pod for i64 {
    const DTYPE: DType = DType::I64;
}
unsafe impl Pod for half::f16 {
    const DTYPE: DType = DType::F16;
}
unsafe impl Pod for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
unsafe impl Pod for bool {
    const DTYPE: DType = DType::Bool;
}

/// An owned vector lent out as bytes.
struct VecBytes<T: Pod>(Vec<T>);

// SAFETY: the vector is never changed after it is wrapped, so `bytes` returns
// the same slice on every call.
unsafe impl<T: Pod> ByteSource for VecBytes<T> {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the vector's elements are plain data; viewing them as bytes
        // is always valid (u8 has no alignment or validity requirement).
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr().cast::<u8>(),
                std::mem::size_of_val(self.0.as_slice()),
            )
        }
    }
}

/// `len` elements of type `T` stored as bytes, shared (cloning copies no
/// element): in an owned allocation or in place in a mapped file.
#[derive(Clone)]
pub struct Buf<T: Pod> {
    source: Arc<dyn ByteSource>,
    offset: usize,
    len: usize,
    mapped: bool,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Pod> Buf<T> {
    /// `len` elements at byte `offset` of `source`, read in place when they
    /// are aligned for `T`, else copied (decoded little-endian). `None` when
    /// the range is outside the source, or a `bool` byte is neither 0 nor 1.
    pub fn from_source(source: Arc<dyn ByteSource>, offset: usize, len: usize) -> Option<Buf<T>> {
        let size = std::mem::size_of::<T>();
        let end = offset.checked_add(len.checked_mul(size)?)?;
        let bytes = source.bytes().get(offset..end)?;
        if T::DTYPE == DType::Bool && bytes.iter().any(|&b| b > 1) {
            return None;
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            let mut v: Vec<T> = Vec::with_capacity(len);
            for chunk in bytes.chunks_exact(size) {
                // SAFETY: `chunk` holds `size_of::<T>()` bytes of a valid `T`
                // (checked above for bool); read_unaligned has no alignment need.
                v.push(unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) });
            }
            return Some(Buf::from(v));
        }
        Some(Buf {
            source,
            offset,
            len,
            mapped: true,
            _elem: std::marker::PhantomData,
        })
    }

    /// Whether the elements are read in place from a shared source (a mapped
    /// file) rather than owned.
    pub fn is_borrowed(&self) -> bool {
        self.mapped
    }

    /// The elements as bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.source.bytes()[self.offset..self.offset + self.len * std::mem::size_of::<T>()]
    }

    /// Tells a mapped source its pages for these elements may be dropped
    /// (see [`ByteSource::release`]); nothing for an owned allocation.
    pub fn release(&self) {
        if self.mapped {
            self.source
                .release(self.offset, self.len * std::mem::size_of::<T>());
        }
    }
}

impl<T: Pod> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let bytes = self.bytes();
        // SAFETY: `from_source` and `From<Vec<T>>` only build a Buf over
        // bytes that are in range, aligned for `T` and valid `T` values.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), self.len) }
    }
}

impl<T: Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Buf<T> {
        let len = v.len();
        Buf {
            source: Arc::new(VecBytes(v)),
            offset: 0,
            len,
            mapped: false,
            _elem: std::marker::PhantomData,
        }
    }
}

impl<T: Pod> FromIterator<T> for Buf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Buf<T> {
        Buf::from(iter.into_iter().collect::<Vec<T>>())
    }
}

impl<T: Pod> PartialEq for Buf<T> {
    fn eq(&self, other: &Buf<T>) -> bool {
        **self == **other
    }
}

impl<T: Pod> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Typed element storage of a tensor, row-major: bytes of one dtype, owned or
/// read in place from a mapped file (see [`Buf`]).
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Buf<f32>),
    /// 16-bit IEEE floats, kept 16-bit (kernels widen them as they read).
    F16(Buf<half::f16>),
    /// bfloat16, kept 16-bit.
    BF16(Buf<half::bf16>),
    /// 32-bit signed integers.
    I32(Buf<i32>),
    /// 64-bit signed integers (token ids, positions).
    I64(Buf<i64>),
    /// Booleans (masks).
    Bool(Buf<bool>),
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// The number of elements stored.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(d) => d.len(),
            TensorData::F16(d) => d.len(),
            TensorData::BF16(d) => d.len(),
            TensorData::I32(d) => d.len(),
            TensorData::I64(d) => d.len(),
            TensorData::Bool(d) => d.len(),
        }
    }

    /// Whether no elements are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// See [`Buf::release`].
    pub fn release(&self) {
        match self {
            TensorData::F32(d) => d.release(),
            TensorData::F16(d) => d.release(),
            TensorData::BF16(d) => d.release(),
            TensorData::I32(d) => d.release(),
            TensorData::I64(d) => d.release(),
            TensorData::Bool(d) => d.release(),
        }
    }

    /// Whether the elements are read in place from a mapped file.
    pub fn is_borrowed(&self) -> bool {
        match self {
            TensorData::F32(d) => d.is_borrowed(),
            TensorData::F16(d) => d.is_borrowed(),
            TensorData::BF16(d) => d.is_borrowed(),
            TensorData::I32(d) => d.is_borrowed(),
            TensorData::I64(d) => d.is_borrowed(),
            TensorData::Bool(d) => d.is_borrowed(),
        }
    }

    /// `len` elements of `dtype` at byte `offset` of `source` (see
    /// [`Buf::from_source`]); `None` when out of range or not valid values.
    pub fn from_source(
        dtype: DType,
        source: Arc<dyn ByteSource>,
        offset: usize,
        len: usize,
    ) -> Option<TensorData> {
        Some(match dtype {
            DType::F32 => TensorData::F32(Buf::from_source(source, offset, len)?),
            DType::F16 => TensorData::F16(Buf::from_source(source, offset, len)?),
            DType::BF16 => TensorData::BF16(Buf::from_source(source, offset, len)?),
            DType::I32 => TensorData::I32(Buf::from_source(source, offset, len)?),
            DType::I64 => TensorData::I64(Buf::from_source(source, offset, len)?),
            DType::Bool => TensorData::Bool(Buf::from_source(source, offset, len)?),
        })
    }
}

/// An element type a [`Tensor`] can store; lets shape-moving code be written once.
pub trait Element: Pod {
    /// The elements of `data` when it holds this type.
    fn slice(data: &TensorData) -> Option<&[Self]>;
    /// Wraps a vector of this type as storage.
    fn wrap(values: Vec<Self>) -> TensorData;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
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

element!(f32, F32);
element!(i32, I32);
element!(i64, I64);
element!(bool, Bool);
element!(half::f16, F16);
element!(half::bf16, BF16);

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
            DType::F16 => TensorData::F16(vec![half::f16::ZERO; n].into()),
            DType::BF16 => TensorData::BF16(vec![half::bf16::ZERO; n].into()),
            DType::I32 => TensorData::I32(vec![0; n].into()),
            DType::I64 => TensorData::I64(vec![0; n].into()),
            DType::Bool => TensorData::Bool(vec![false; n].into()),
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

    /// The elements as f32: borrowed for an f32 tensor, widened (a copy) for
    /// f16 and bf16; `None` for other dtypes.
    pub fn to_f32(&self) -> Option<std::borrow::Cow<'_, [f32]>> {
        use std::borrow::Cow;
        match &self.data {
            TensorData::F32(d) => Some(Cow::Borrowed(&d[..])),
            TensorData::F16(d) => Some(Cow::Owned(d.iter().map(|x| x.to_f32()).collect())),
            TensorData::BF16(d) => Some(Cow::Owned(d.iter().map(|x| x.to_f32()).collect())),
            _ => None,
        }
    }

    /// Tells a mapped file that this tensor's pages may be dropped from
    /// memory (a backend holds its own copy); reading them again maps them
    /// back. Nothing for an owned tensor.
    pub fn release_pages(&self) {
        self.data().release();
    }

    /// Whether the elements are read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        self.data.is_borrowed()
    }

    /// The same elements in an allocation of their own: a tensor read in
    /// place from a mapped file is read into memory (the file may then
    /// change or go away), an owned one is copied.
    pub fn to_owned_copy(&self) -> Tensor {
        let data = match &self.data {
            TensorData::F32(d) => TensorData::F32(Buf::from(d.to_vec())),
            TensorData::F16(d) => TensorData::F16(Buf::from(d.to_vec())),
            TensorData::BF16(d) => TensorData::BF16(Buf::from(d.to_vec())),
            TensorData::I32(d) => TensorData::I32(Buf::from(d.to_vec())),
            TensorData::I64(d) => TensorData::I64(Buf::from(d.to_vec())),
            TensorData::Bool(d) => TensorData::Bool(Buf::from(d.to_vec())),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The elements' bytes (little-endian, row-major).
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(d) => d.bytes(),
            TensorData::F16(d) => d.bytes(),
            TensorData::BF16(d) => d.bytes(),
            TensorData::I32(d) => d.bytes(),
            TensorData::I64(d) => d.bytes(),
            TensorData::Bool(d) => d.bytes(),
        }
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
        let h = Tensor::zeros(DType::F16, vec![3]).unwrap();
        assert_eq!(h.to_f32().as_deref(), Some(&[0.0f32; 3][..]));
        let t = Tensor::from_tokens(&[[1, 2, 3], [4, 5, 6]]).unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.as_i64(), Some(&[1i64, 2, 3, 4, 5, 6][..]));
        let err = Tensor::from_tokens(&[vec![1, 2], vec![3]]).unwrap_err();
        assert_eq!(err.to_string(), "token row 1 has 1 ids, but row 0 has 2");
    }
}

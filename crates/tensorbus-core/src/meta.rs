//! Tensor metadata: what a producer writes into a slot header before publish,
//! and what a consumer validates before it hands out a view.

use crate::dtype::DType;
use std::fmt;

/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 8;
/// Size of the free-form user header carried with every tensor.
pub const USER_HEADER_LEN: usize = 64;

/// Why a shape, stride set or metadata record is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShapeError {
    /// More than [`MAX_DIMS`] dimensions.
    TooManyDims {
        /// Dimensions asked for.
        ndim: usize,
    },
    /// One extent does not fit the header's 32-bit field.
    DimTooLarge {
        /// Which dimension.
        axis: usize,
        /// Its extent.
        extent: usize,
    },
    /// The byte size overflows 64 bits.
    Overflow,
    /// Strides must be non-negative byte counts.
    NegativeStride {
        /// Which dimension.
        axis: usize,
    },
    /// The strided view would read past `nbytes`.
    OutOfBounds {
        /// Last byte the view would touch, plus one.
        span: u64,
        /// Bytes the tensor claims.
        nbytes: u64,
    },
    /// The tensor does not fit its slot.
    TooLarge {
        /// Bytes the tensor needs.
        nbytes: u64,
        /// Bytes the slot has.
        capacity: u64,
    },
    /// The stored dtype code is not a dtype.
    BadDType {
        /// Code found.
        code: u8,
    },
    /// The user header is longer than [`USER_HEADER_LEN`].
    UserHeaderTooLong {
        /// Length given.
        len: usize,
    },
    /// The strides given do not have one entry per dimension.
    StridesMismatch {
        /// Dimensions.
        ndim: usize,
        /// Strides given.
        strides: usize,
    },
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeError::TooManyDims { ndim } => {
                write!(
                    f,
                    "{ndim} dimensions given; at most {MAX_DIMS} are supported"
                )
            }
            ShapeError::DimTooLarge { axis, extent } => write!(
                f,
                "extent {extent} of axis {axis} exceeds the per-axis limit of {}",
                u32::MAX
            ),
            ShapeError::Overflow => f.write_str("tensor byte size overflows 64 bits"),
            ShapeError::NegativeStride { axis } => {
                write!(
                    f,
                    "stride of axis {axis} is negative; only non-negative strides are supported"
                )
            }
            ShapeError::OutOfBounds { span, nbytes } => write!(
                f,
                "strided view reaches byte {span} but the tensor has only {nbytes} bytes"
            ),
            ShapeError::TooLarge { nbytes, capacity } => write!(
                f,
                "tensor needs {nbytes} bytes but the slot holds {capacity}"
            ),
            ShapeError::BadDType { code } => write!(f, "dtype code {code} is not a known dtype"),
            ShapeError::UserHeaderTooLong { len } => write!(
                f,
                "user header is {len} bytes; at most {USER_HEADER_LEN} are carried"
            ),
            ShapeError::StridesMismatch { ndim, strides } => {
                write!(f, "{strides} strides given for {ndim} dimensions")
            }
        }
    }
}

impl std::error::Error for ShapeError {}

/// The metadata of one tensor, as a plain value (copied out of shared memory
/// once, then validated, so a concurrent writer cannot change it afterwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    /// Element type.
    pub dtype: DType,
    /// Number of dimensions (0 = scalar).
    pub ndim: u8,
    /// Extents; entries past `ndim` are 0.
    pub shape: [u32; MAX_DIMS],
    /// Byte strides; entries past `ndim` are 0.
    pub strides: [i64; MAX_DIMS],
    /// Bytes of payload that belong to the tensor.
    pub nbytes: u64,
    /// Per-producer sequence number, filled in at publish.
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds, filled in at publish.
    pub timestamp_ns: u64,
    /// Id of the publishing client.
    pub producer: u32,
    /// Bytes of `user` in use.
    pub user_len: u8,
    /// Free-form user header (frame id, camera id, pixel format, ...).
    pub user: [u8; USER_HEADER_LEN],
}

impl TensorMeta {
    /// A zero-dimensional `u8` placeholder with every field zero.
    pub const EMPTY: TensorMeta = TensorMeta {
        dtype: DType::U8,
        ndim: 0,
        shape: [0; MAX_DIMS],
        strides: [0; MAX_DIMS],
        nbytes: 0,
        seq: 0,
        timestamp_ns: 0,
        producer: 0,
        user_len: 0,
        user: [0; USER_HEADER_LEN],
    };

    /// Metadata of a C-contiguous tensor of `shape` and `dtype`.
    ///
    /// ```
    /// use tensorbus_core::{DType, TensorMeta};
    /// let m = TensorMeta::contiguous(DType::F32, &[2, 3]).unwrap();
    /// assert_eq!(m.nbytes, 24);
    /// assert_eq!(m.strides(), &[12, 4]);
    /// ```
    #[inline]
    pub fn contiguous(dtype: DType, shape: &[u32]) -> Result<TensorMeta, ShapeError> {
        if shape.len() > MAX_DIMS {
            return Err(ShapeError::TooManyDims { ndim: shape.len() });
        }
        let mut meta = TensorMeta {
            dtype,
            ndim: shape.len() as u8,
            shape: [0; MAX_DIMS],
            strides: [0; MAX_DIMS],
            nbytes: 0,
            seq: 0,
            timestamp_ns: 0,
            producer: 0,
            user_len: 0,
            user: [0; USER_HEADER_LEN],
        };
        let mut stride: u64 = dtype.itemsize() as u64;
        for axis in (0..shape.len()).rev() {
            let extent = shape[axis];
            meta.shape[axis] = extent;
            meta.strides[axis] = i64::try_from(stride).map_err(|_| ShapeError::Overflow)?;
            stride = stride
                .checked_mul(u64::from(extent))
                .ok_or(ShapeError::Overflow)?;
        }
        meta.nbytes = stride;
        Ok(meta)
    }

    /// Extents, one per dimension.
    pub fn shape(&self) -> &[u32] {
        &self.shape[..usize::from(self.ndim).min(MAX_DIMS)]
    }

    /// Byte strides, one per dimension.
    pub fn strides(&self) -> &[i64] {
        &self.strides[..usize::from(self.ndim).min(MAX_DIMS)]
    }

    /// Number of elements (saturating at `u64::MAX`: metadata that passed
    /// [`TensorMeta::validate`] never gets there, but garbage can ask for
    /// 2^256).
    pub fn numel(&self) -> u64 {
        self.checked_numel().unwrap_or(u64::MAX)
    }

    /// Number of elements, `None` when it does not fit 64 bits.
    fn checked_numel(&self) -> Option<u64> {
        let shape = self.shape();
        if shape.contains(&0) {
            return Some(0);
        }
        shape
            .iter()
            .try_fold(1u64, |n, &e| n.checked_mul(u64::from(e)))
    }

    /// The user header bytes in use.
    pub fn user_header(&self) -> &[u8] {
        &self.user[..usize::from(self.user_len).min(USER_HEADER_LEN)]
    }

    /// Sets the user header.
    pub fn set_user_header(&mut self, bytes: &[u8]) -> Result<(), ShapeError> {
        if bytes.len() > USER_HEADER_LEN {
            return Err(ShapeError::UserHeaderTooLong { len: bytes.len() });
        }
        self.user = [0; USER_HEADER_LEN];
        self.user[..bytes.len()].copy_from_slice(bytes);
        self.user_len = bytes.len() as u8;
        Ok(())
    }

    /// Whether the strides are the C-contiguous ones for the shape.
    #[inline]
    pub fn is_contiguous(&self) -> bool {
        let mut expect = self.dtype.itemsize() as i64;
        for axis in (0..self.shape().len()).rev() {
            if self.shape[axis] != 1 && self.strides[axis] != expect {
                return false;
            }
            expect = expect.saturating_mul(i64::from(self.shape[axis]));
        }
        true
    }

    /// Checks that every byte the strided view can touch lies within
    /// `nbytes`, and `nbytes` within `capacity` (the slot's payload size).
    #[inline]
    pub fn validate(&self, capacity: u64) -> Result<(), ShapeError> {
        let ndim = usize::from(self.ndim);
        if ndim > MAX_DIMS {
            return Err(ShapeError::TooManyDims { ndim });
        }
        if usize::from(self.user_len) > USER_HEADER_LEN {
            return Err(ShapeError::UserHeaderTooLong {
                len: usize::from(self.user_len),
            });
        }
        if self.nbytes > capacity {
            return Err(ShapeError::TooLarge {
                nbytes: self.nbytes,
                capacity,
            });
        }
        let span = self.span()?;
        // Zero strides let a few bytes describe any number of elements; a
        // count that does not fit 64 bits breaks every consumer that
        // multiplies extents (numel, buffer protocols), so it is refused.
        if self.checked_numel().is_none() {
            return Err(ShapeError::Overflow);
        }
        if span > self.nbytes {
            return Err(ShapeError::OutOfBounds {
                span,
                nbytes: self.nbytes,
            });
        }
        Ok(())
    }

    /// One past the last byte the strided view touches (0 for empty tensors).
    #[inline]
    pub fn span(&self) -> Result<u64, ShapeError> {
        let mut last: u64 = 0;
        for axis in 0..usize::from(self.ndim).min(MAX_DIMS) {
            let extent = u64::from(self.shape[axis]);
            if extent == 0 {
                return Ok(0);
            }
            let stride = self.strides[axis];
            if stride < 0 {
                return Err(ShapeError::NegativeStride { axis });
            }
            last = (extent - 1)
                .checked_mul(stride as u64)
                .and_then(|x| x.checked_add(last))
                .ok_or(ShapeError::Overflow)?;
        }
        last.checked_add(self.dtype.itemsize() as u64)
            .ok_or(ShapeError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_layout() {
        let m = TensorMeta::contiguous(DType::U8, &[1080, 1920, 3]).unwrap();
        assert_eq!(m.nbytes, 1080 * 1920 * 3);
        assert_eq!(m.strides(), &[1920 * 3, 3, 1]);
        assert!(m.is_contiguous());
        m.validate(m.nbytes).unwrap();
        assert!(matches!(
            m.validate(m.nbytes - 1),
            Err(ShapeError::TooLarge { .. })
        ));
    }

    #[test]
    fn scalar_and_empty() {
        let s = TensorMeta::contiguous(DType::F64, &[]).unwrap();
        assert_eq!(s.nbytes, 8);
        assert_eq!(s.numel(), 1);
        let e = TensorMeta::contiguous(DType::F32, &[0, 5]).unwrap();
        assert_eq!(e.nbytes, 0);
        e.validate(0).unwrap();
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            TensorMeta::contiguous(DType::U8, &[1; 9]),
            Err(ShapeError::TooManyDims { ndim: 9 })
        ));
        assert!(TensorMeta::contiguous(DType::U8, &[u32::MAX, u32::MAX, u32::MAX]).is_err());
        assert!(TensorMeta::contiguous(DType::F64, &[1 << 31, 1 << 31, 1 << 31]).is_err());
        let mut m = TensorMeta::contiguous(DType::U8, &[4, 4]).unwrap();
        m.strides[0] = 100;
        assert!(matches!(
            m.validate(1 << 20),
            Err(ShapeError::OutOfBounds { .. })
        ));
        m.strides[0] = -4;
        assert!(matches!(
            m.validate(1 << 20),
            Err(ShapeError::NegativeStride { axis: 0 })
        ));
        m.ndim = 200;
        assert!(m.validate(1 << 20).is_err());
        assert!(m.set_user_header(&[0; 65]).is_err());
    }

    /// Found by the `slot_header` fuzz target: zero strides let 8 bytes
    /// describe (2^32 - 1)^8 elements; `numel()` then overflowed (a panic in
    /// debug builds, a wrong count in release) on metadata that had passed
    /// validation. Validation now refuses element counts above 2^64 - 1 and
    /// `numel()` saturates on unvalidated metadata.
    #[test]
    fn zero_strides_cannot_claim_more_than_2_pow_64_elements() {
        let mut m = TensorMeta::contiguous(DType::U64, &[1; 8]).unwrap();
        m.shape = [u32::MAX; 8];
        m.strides = [0; 8];
        assert_eq!(m.span(), Ok(8), "every element is the same 8 bytes");
        assert_eq!(m.numel(), u64::MAX, "saturates instead of overflowing");
        assert_eq!(m.validate(8), Err(ShapeError::Overflow));
        // Broadcasting within 64 bits stays valid.
        m.shape = [u32::MAX, u32::MAX, 1, 1, 1, 1, 1, 1];
        assert_eq!(m.validate(8), Ok(()));
        assert_eq!(m.numel(), u64::from(u32::MAX) * u64::from(u32::MAX));
        // An empty tensor is empty whatever its other extents (found by the
        // round-trip property of the same target, against the first fix).
        m.shape = [u32::MAX, u32::MAX, u32::MAX, 0, 1, 1, 1, 1];
        assert_eq!((m.numel(), m.span(), m.validate(8)), (0, Ok(0), Ok(())));
    }
}

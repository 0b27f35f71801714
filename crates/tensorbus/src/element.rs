//! Rust element types that map onto tensor dtypes, for typed views.

use crate::error::TypeError;
use tensorbus_core::{DType, TensorMeta};

mod sealed {
    pub trait Sealed {}
}

/// A plain-old-data element type with a tensorbus dtype. Every bit pattern
/// is a valid value, so a typed view of untrusted bytes is sound.
pub trait Element: sealed::Sealed + Copy + 'static {
    /// The matching dtype.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

element!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
         u64 => U64, i64 => I64, f32 => F32, f64 => F64);

/// Checks that a tensor described by `meta` can be viewed as `[T]`: same
/// dtype and C-contiguous. Returns the element count.
pub(crate) fn check_typed<T: Element>(meta: &TensorMeta) -> Result<usize, TypeError> {
    if T::DTYPE != meta.dtype {
        return Err(TypeError::WrongDType {
            actual: meta.dtype,
            requested: T::DTYPE,
        });
    }
    if !meta.is_contiguous() {
        return Err(TypeError::NotContiguous);
    }
    Ok(meta.nbytes as usize)
}

/// A typed mutable view of the tensor at `ptr` described by `meta`.
///
/// # Safety
/// `ptr..ptr + meta.nbytes` must be valid for reads and writes for `'a`,
/// and no other reference to it may exist for `'a`.
pub(crate) unsafe fn typed_mut<'a, T: Element>(
    meta: &TensorMeta,
    ptr: *mut u8,
) -> Result<&'a mut [T], TypeError> {
    let len = check_typed::<T>(meta)?;
    // SAFETY: valid for reads (caller); `cast_slice` checks alignment and size.
    let s = unsafe { cast_slice::<T>(ptr, len) }.ok_or(TypeError::NotContiguous)?;
    // SAFETY: valid for writes and unaliased for 'a (caller); same range.
    Ok(unsafe { std::slice::from_raw_parts_mut(s.as_ptr() as *mut T, s.len()) })
}

/// Reinterprets `len` bytes at `ptr` as `[T]` if aligned and sized.
///
/// # Safety
/// `ptr..ptr+len` must be valid for reads for `'a` (and for writes if the
/// caller turns the result into `&mut`).
pub(crate) unsafe fn cast_slice<'a, T: Element>(ptr: *const u8, len: usize) -> Option<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if (ptr as usize) % std::mem::align_of::<T>() != 0 || len % size != 0 {
        return None;
    }
    // SAFETY: aligned (checked), in bounds (caller), and `T: Element` is POD
    // so any bytes are a valid `T`.
    Some(unsafe { std::slice::from_raw_parts(ptr as *const T, len / size) })
}

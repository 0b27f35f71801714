//! DLPack exports: `__dlpack__` capsules, legacy (`dltensor`) and versioned
//! 1.x (`dltensor_versioned`, with the read-only flag for received
//! tensors). CPU memory, no copy. Each capsule holds the tensor until its
//! consumer calls the deleter (or, unconsumed, until the capsule goes).

use crate::export::{Exported, Hold};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_void, CStr};
use tensorbus::{DType, MAX_DIMS};

/// `kDLCPU`.
pub(crate) const DL_CPU: i32 = 1;
/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const DLPACK_FLAG_READ_ONLY: u64 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// One DLPack export: the managed tensor (`M`: legacy or versioned) first,
/// then what it points into. Boxed; `manager_ctx` points to the box.
#[repr(C)]
struct DlExport<M> {
    managed: M,
    shape: [i64; MAX_DIMS],
    strides: [i64; MAX_DIMS],
    /// The export's hold on its tensor: dropped with the box.
    _hold: Hold,
}

/// A DLPack managed tensor struct: `DLManagedTensor` (legacy capsules) or
/// `DLManagedTensorVersioned`; what [`new_dl_capsule`], [`delete_export`]
/// and [`capsule_destructor`] need of either.
trait Managed: Sized {
    /// The capsule name of an unconsumed export.
    const NAME: &'static CStr;
    /// The managed tensor of `dl` (`read_only`: a received tensor), with
    /// [`delete_export`] as its deleter and no context yet.
    fn new(dl: DLTensor, read_only: bool) -> Self;
    /// The `manager_ctx` field.
    fn ctx(&mut self) -> &mut *mut c_void;
    /// The `dl_tensor` field.
    fn dl_tensor(&mut self) -> &mut DLTensor;
    /// The `deleter` field.
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)>;
}

impl Managed for DLManagedTensor {
    const NAME: &'static CStr = c"dltensor";
    fn new(dl: DLTensor, _read_only: bool) -> Self {
        DLManagedTensor {
            dl_tensor: dl,
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_export::<Self>),
        }
    }
    fn ctx(&mut self) -> &mut *mut c_void {
        &mut self.manager_ctx
    }
    fn dl_tensor(&mut self) -> &mut DLTensor {
        &mut self.dl_tensor
    }
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
}

impl Managed for DLManagedTensorVersioned {
    const NAME: &'static CStr = c"dltensor_versioned";
    fn new(dl: DLTensor, read_only: bool) -> Self {
        DLManagedTensorVersioned {
            version: DLPackVersion { major: 1, minor: 0 },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_export::<Self>),
            flags: if read_only { DLPACK_FLAG_READ_ONLY } else { 0 },
            dl_tensor: dl,
        }
    }
    fn ctx(&mut self) -> &mut *mut c_void {
        &mut self.manager_ctx
    }
    fn dl_tensor(&mut self) -> &mut DLTensor {
        &mut self.dl_tensor
    }
    fn deleter(&self) -> Option<unsafe extern "C" fn(*mut Self)> {
        self.deleter
    }
}

/// The DLPack type of a dtype; `None` for one DLPack cannot express.
fn dl_dtype(d: DType) -> Option<DLDataType> {
    let (code, bits) = match d {
        DType::Bool => (6, 8),
        DType::U8 => (1, 8),
        DType::I8 => (0, 8),
        DType::U16 => (1, 16),
        DType::I16 => (0, 16),
        DType::U32 => (1, 32),
        DType::I32 => (0, 32),
        DType::U64 => (1, 64),
        DType::I64 => (0, 64),
        DType::F16 => (2, 16),
        DType::BF16 => (4, 16),
        DType::F32 => (2, 32),
        DType::F64 => (2, 64),
        _ => return None,
    };
    Some(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

/// The deleter of an export: frees its box and ends the export.
unsafe extern "C" fn delete_export<M: Managed>(m: *mut M) {
    if m.is_null() {
        return;
    }
    // SAFETY: `m` is the first field of a `DlExport<M>` leaked by
    // `new_dl_capsule` (its `manager_ctx` points to that box), and the
    // DLPack contract calls the deleter exactly once. Dropping the box
    // drops its hold, which ends the export (taking the GIL if need be).
    drop(unsafe { Box::from_raw((*(*m).ctx()).cast::<DlExport<M>>()) });
}

/// Runs the deleter of an unconsumed capsule `cap` if it holds an `M`
/// (its name is `M::NAME`); whether it did.
///
/// # Safety
/// `cap` must be a capsule.
unsafe fn delete_unconsumed<M: Managed>(cap: *mut ffi::PyObject) -> bool {
    // SAFETY: `cap` is a capsule (the caller's contract); `PyCapsule_IsValid`
    // checks the name without raising, and a capsule of that name holds an
    // `M` made by `new_dl_capsule`.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, M::NAME.as_ptr()) != 1 {
            return false;
        }
        let p = ffi::PyCapsule_GetPointer(cap, M::NAME.as_ptr()).cast::<M>();
        if !p.is_null() {
            if let Some(d) = (*p).deleter() {
                d(p);
            }
        }
    }
    true
}

/// Capsule destructor: frees an export nobody consumed (a consumer renames
/// the capsule to `used_dltensor[_versioned]` and takes over the deleter).
unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    // SAFETY: CPython calls this on its own capsules.
    unsafe {
        let _ = delete_unconsumed::<DLManagedTensor>(cap)
            || delete_unconsumed::<DLManagedTensorVersioned>(cap);
    }
}

/// The DLPack capsule of one export: boxes `managed` with the arrays its
/// tensor points into and the export's `hold`; the capsule (or, once
/// consumed, the consumer) frees it through the deleter.
fn new_dl_capsule<M: Managed>(
    py: Python<'_>,
    managed: M,
    shape: [i64; MAX_DIMS],
    strides: [i64; MAX_DIMS],
    hold: Hold,
) -> PyResult<Bound<'_, PyAny>> {
    let b = Box::into_raw(Box::new(DlExport {
        managed,
        shape,
        strides,
        _hold: hold,
    }));
    // SAFETY: `b` is a fresh, valid box; the pointers we store point
    // into it, which stays put until the deleter frees it.
    unsafe {
        let shape = (*b).shape.as_mut_ptr();
        let strides = (*b).strides.as_mut_ptr();
        *(*b).managed.ctx() = b.cast();
        let dl = (*b).managed.dl_tensor();
        dl.shape = shape;
        dl.strides = strides;
    }
    // SAFETY: `b` is a valid managed tensor (its first field), `M::NAME` a
    // static C string, and the destructor matches the capsule's contents.
    let cap = unsafe { ffi::PyCapsule_New(b.cast(), M::NAME.as_ptr(), Some(capsule_destructor)) };
    if cap.is_null() {
        let err = PyErr::fetch(py);
        // SAFETY: the capsule was not made, so we still own the box.
        unsafe { delete_export::<M>(b.cast()) };
        return Err(err);
    }
    // SAFETY: `cap` is a new, non-NULL reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) })
}

/// Checks `__dlpack__`'s arguments: no stream (or -1), the CPU device, no
/// copy (a `BufferError` otherwise, as the DLPack protocol asks).
pub(crate) fn check_args(
    stream: Option<&Bound<'_, PyAny>>,
    dl_device: Option<(i32, i32)>,
    copy: Option<bool>,
) -> PyResult<()> {
    if let Some(s) = stream {
        if !s.is_none() {
            let v: Option<i64> = s.extract().ok();
            if v != Some(-1) {
                return Err(PyBufferError::new_err(
                    "tensorbus tensors are CPU memory: stream must be None",
                ));
            }
        }
    }
    if let Some(dev) = dl_device {
        if dev != (DL_CPU, 0) {
            return Err(PyBufferError::new_err(format!(
                "tensorbus tensors are CPU memory (device (1, 0)), not {dev:?}"
            )));
        }
    }
    if copy == Some(true) {
        return Err(PyBufferError::new_err(
            "tensorbus exports views only (copy=True): copy the resulting array instead",
        ));
    }
    Ok(())
}

/// The DLPack capsule of an export: versioned (`dltensor_versioned`, with
/// the read-only flag for tensors that are not writable) or legacy.
pub(crate) fn capsule(py: Python<'_>, e: Exported, versioned: bool) -> PyResult<Bound<'_, PyAny>> {
    let meta = e.meta;
    // On an error `e` (and so its hold) is dropped: the export ends.
    let dtype = dl_dtype(meta.dtype).ok_or_else(|| {
        PyBufferError::new_err(format!("DLPack has no type for dtype {}", meta.dtype))
    })?;
    let item = meta.dtype.itemsize() as i64;
    let mut shape = [0i64; MAX_DIMS];
    let mut strides = [0i64; MAX_DIMS];
    for (i, (&s, &st)) in meta.shape().iter().zip(meta.strides()).enumerate() {
        if st % item != 0 {
            return Err(PyBufferError::new_err(
                "strides are not a multiple of the element size; DLPack cannot express this tensor",
            ));
        }
        shape[i] = i64::from(s);
        strides[i] = st / item;
    }
    let dl = DLTensor {
        data: e.ptr as *mut c_void,
        device: DLDevice {
            device_type: DL_CPU,
            device_id: 0,
        },
        ndim: meta.shape().len() as i32,
        dtype,
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let read_only = !e.writable;
    if versioned {
        let m = DLManagedTensorVersioned::new(dl, read_only);
        new_dl_capsule(py, m, shape, strides, e.hold)
    } else {
        let m = DLManagedTensor::new(dl, read_only);
        new_dl_capsule(py, m, shape, strides, e.hold)
    }
}

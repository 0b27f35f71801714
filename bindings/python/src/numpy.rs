//! numpy exports: `__array__` (through an `_Export` object with an
//! `__array_interface__`) and `__array_struct__` (a `PyArrayInterface`
//! capsule, numpy's fast path). Each export holds the tensor until numpy
//! lets go of it.

use crate::export::{Exported, Hold};
use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use tensorbus::{DType, TensorMeta, MAX_DIMS};

/// The numpy type string of a dtype (bfloat16 as raw `uint16`); `None`
/// for a dtype numpy cannot show.
pub(crate) fn typestr(d: DType) -> Option<&'static str> {
    #[cfg(target_endian = "little")]
    macro_rules! e {
        ($s:literal) => {
            concat!("<", $s)
        };
    }
    #[cfg(target_endian = "big")]
    macro_rules! e {
        ($s:literal) => {
            concat!(">", $s)
        };
    }
    Some(match d {
        DType::Bool => "|b1",
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::U16 | DType::BF16 => e!("u2"),
        DType::I16 => e!("i2"),
        DType::U32 => e!("u4"),
        DType::I32 => e!("i4"),
        DType::U64 => e!("u8"),
        DType::I64 => e!("i8"),
        DType::F16 => e!("f2"),
        DType::F32 => e!("f4"),
        DType::F64 => e!("f8"),
        _ => return None,
    })
}

/// The type string of `d`, or the `ValueError` of a dtype numpy cannot show.
fn typestr_of(d: DType) -> PyResult<&'static str> {
    typestr(d).ok_or_else(|| PyValueError::new_err(format!("no numpy dtype for {d}")))
}

/// `numpy.asarray`, looked up once.
fn asarray(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static ASARRAY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    ASARRAY
        .get_or_try_init(py, || {
            py.import("numpy")?.getattr("asarray").map(|f| f.unbind())
        })
        .map(|f| f.bind(py))
}

/// The `__array_interface__` dict of an export.
fn interface<'py>(py: Python<'py>, e: &Exported) -> PyResult<Bound<'py, PyDict>> {
    let meta: &TensorMeta = &e.meta;
    let d = PyDict::new(py);
    let shape: Vec<u64> = meta.shape().iter().map(|&x| u64::from(x)).collect();
    d.set_item("version", 3)?;
    d.set_item("shape", PyTuple::new(py, shape)?)?;
    d.set_item("typestr", typestr_of(meta.dtype)?)?;
    d.set_item("strides", PyTuple::new(py, meta.strides())?)?;
    d.set_item("data", (e.ptr, !e.writable))?;
    Ok(d)
}

/// One numpy export of a tensor: the array's `base`. It holds the tensor
/// (and so the slot) until numpy lets go of it.
#[pyclass(frozen, module = "tensorbus", name = "_Export")]
pub struct Export {
    iface: Py<PyDict>,
    /// Ends the export when the array (its base: this object) goes.
    _hold: Hold,
}

impl Export {
    fn make(py: Python<'_>, e: Exported) -> PyResult<Bound<'_, Export>> {
        // On an error `e` (and so its hold) is dropped: the export ends.
        let iface = interface(py, &e)?.unbind();
        Bound::new(
            py,
            Export {
                iface,
                _hold: e.hold,
            },
        )
    }
}

#[pymethods]
impl Export {
    /// numpy's array interface of the slot.
    #[getter]
    fn __array_interface__(&self, py: Python<'_>) -> Py<PyDict> {
        self.iface.clone_ref(py)
    }
}

/// A numpy array viewing the export's bytes (`numpy.asarray(t)`).
pub(crate) fn view(py: Python<'_>, e: Exported) -> PyResult<Bound<'_, PyAny>> {
    asarray(py)?.call1((Export::make(py, e)?,))
}

/// `__array__(dtype, copy)`: the view, a converted array, or a copy.
pub(crate) fn array<'py>(
    py: Python<'py>,
    e: Exported,
    dtype: Option<&Bound<'py, PyAny>>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let export = Export::make(py, e)?;
    if copy == Some(true) {
        let kw = PyDict::new(py);
        kw.set_item("dtype", dtype)?;
        return py
            .import("numpy")?
            .getattr("array")?
            .call((export,), Some(&kw));
    }
    let arr = asarray(py)?.call1((export,))?;
    match dtype {
        None => Ok(arr),
        Some(d) => {
            let kw = PyDict::new(py);
            kw.set_item("copy", false)?;
            let conv = arr.call_method("astype", (d,), Some(&kw))?;
            if copy == Some(false) && !conv.is(&arr) {
                return Err(PyValueError::new_err(
                    "converting to that dtype needs a copy, but copy=False",
                ));
            }
            Ok(conv)
        }
    }
}

// ------------------------------------------------------ __array_struct__ ---

/// numpy's `PyArrayInterface` (numpy/ndarraytypes.h): what an
/// `__array_struct__` capsule points to (`two` is always 2).
#[repr(C)]
struct PyArrayInterface {
    two: c_int,
    nd: c_int,
    typekind: c_char,
    itemsize: c_int,
    flags: c_int,
    shape: *mut isize,
    strides: *mut isize,
    data: *mut c_void,
    descr: *mut ffi::PyObject,
}

const NPY_ARRAY_NOTSWAPPED: c_int = 0x0200;
const NPY_ARRAY_WRITEABLE: c_int = 0x0400;
const NPY_ARR_HAS_DESCR: c_int = 0x0800;

/// One `__array_struct__` export: the interface, the arrays it points
/// into, and the references it holds. Boxed; the capsule owns the box.
#[repr(C)]
struct StructExport {
    iface: PyArrayInterface,
    shape: [isize; MAX_DIMS],
    strides: [isize; MAX_DIMS],
    /// The numpy dtype (`iface.descr` points to it).
    descr: Option<Py<PyAny>>,
    /// The export's hold on its tensor (`None` for the probe).
    hold: Option<Hold>,
}

impl StructExport {
    /// The export of a C array at `data` with extents and byte strides
    /// `dims`; the interface's pointers into the box (and to `descr`) are
    /// set by [`new_struct_capsule`].
    fn new(
        data: *mut c_void,
        (typekind, itemsize, flags): (u8, usize, c_int),
        dims: impl ExactSizeIterator<Item = (isize, isize)>,
        descr: Option<Py<PyAny>>,
        hold: Option<Hold>,
    ) -> Box<StructExport> {
        let nd = dims.len() as c_int;
        let mut shape = [0isize; MAX_DIMS];
        let mut strides = [0isize; MAX_DIMS];
        for (i, (n, st)) in dims.enumerate() {
            shape[i] = n;
            strides[i] = st;
        }
        Box::new(StructExport {
            iface: PyArrayInterface {
                two: 2,
                nd,
                typekind: typekind as c_char,
                itemsize: itemsize as c_int,
                flags,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                data,
                descr: std::ptr::null_mut(),
            },
            shape,
            strides,
            descr,
            hold,
        })
    }
}

/// The numpy dtype of each tensorbus dtype, made once (bfloat16: uint16).
fn numpy_descr(py: Python<'_>, d: DType) -> PyResult<Py<PyAny>> {
    static DESCRS: PyOnceLock<Vec<(DType, Py<PyAny>)>> = PyOnceLock::new();
    let all = DESCRS.get_or_try_init(py, || {
        let dtype = py.import("numpy")?.getattr("dtype")?;
        DType::ALL
            .iter()
            .filter_map(|&d| typestr(d).map(|s| (d, s)))
            .map(|(d, s)| Ok((d, dtype.call1((s,))?.unbind())))
            .collect::<PyResult<Vec<_>>>()
    })?;
    match all.iter().find(|(x, _)| *x == d) {
        Some((_, descr)) => Ok(descr.clone_ref(py)),
        None => Err(PyValueError::new_err(format!("no numpy dtype for {d}"))),
    }
}

/// Set by the probe's capsule destructor.
static PROBE_DROPPED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" fn struct_capsule_destructor(cap: *mut ffi::PyObject) {
    // SAFETY: CPython calls this with its own capsule; `PyCapsule_IsValid`
    // checks it (name NULL) without raising. The pointer is the box leaked
    // by `new_struct_capsule`, freed here exactly once.
    let b = unsafe {
        if ffi::PyCapsule_IsValid(cap, std::ptr::null()) != 1 {
            return;
        }
        let p = ffi::PyCapsule_GetPointer(cap, std::ptr::null()).cast::<StructExport>();
        if p.is_null() {
            return;
        }
        Box::from_raw(p)
    };
    Python::attach(|_py| {
        let mut b = b;
        match b.hold.take() {
            Some(h) => drop(h), // ends the export
            None => PROBE_DROPPED.store(true, Ordering::SeqCst),
        }
        drop(b);
    });
}

/// A capsule named NULL (as numpy wants) that owns `b`.
fn new_struct_capsule(py: Python<'_>, b: Box<StructExport>) -> PyResult<Bound<'_, PyAny>> {
    let ptr = Box::into_raw(b);
    // SAFETY: `ptr` is a valid box; the interface's shape/strides/descr
    // pointers point into it or to objects it holds, which stay put until
    // the destructor frees the box.
    unsafe {
        (*ptr).iface.shape = (*ptr).shape.as_mut_ptr();
        (*ptr).iface.strides = (*ptr).strides.as_mut_ptr();
        (*ptr).iface.descr = (*ptr)
            .descr
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.as_ptr());
    }
    // SAFETY: a valid pointer, a NULL name (numpy's convention), and the
    // destructor that matches the contents.
    let cap = unsafe {
        ffi::PyCapsule_New(
            ptr.cast(),
            std::ptr::null(),
            Some(struct_capsule_destructor),
        )
    };
    if cap.is_null() {
        let err = PyErr::fetch(py);
        // SAFETY: the capsule was not made, so the box is still ours; its
        // drop ends the export.
        drop(unsafe { Box::from_raw(ptr) });
        return Err(err);
    }
    // SAFETY: `cap` is a new, non-NULL reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) })
}

/// The `__array_struct__` capsule of an export: it ends the export when
/// numpy drops it (with the array).
pub(crate) fn array_struct(py: Python<'_>, e: Exported) -> PyResult<Bound<'_, PyAny>> {
    let meta = e.meta;
    let descr = numpy_descr(py, meta.dtype)?;
    let typekind = typestr_of(meta.dtype)?.as_bytes()[1];
    let writable = if e.writable { NPY_ARRAY_WRITEABLE } else { 0 };
    let dims = meta.shape().iter().zip(meta.strides());
    let b = StructExport::new(
        e.ptr as *mut c_void,
        (
            typekind,
            meta.dtype.itemsize(),
            NPY_ARRAY_NOTSWAPPED | NPY_ARR_HAS_DESCR | writable,
        ),
        dims.map(|(&n, &st)| (n as isize, st as isize)),
        Some(descr),
        Some(e.hold),
    );
    new_struct_capsule(py, b)
}

/// An object with a one-byte `__array_struct__`, to see what numpy does
/// with the capsule.
#[pyclass(frozen, module = "tensorbus", name = "_StructProbe")]
pub struct StructProbe;

/// The probe's one byte.
static PROBE_BYTE: u8 = 7;

#[pymethods]
impl StructProbe {
    #[getter]
    fn __array_struct__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let b = StructExport::new(
            (&PROBE_BYTE as *const u8).cast_mut().cast(),
            (b'u', 1, NPY_ARRAY_NOTSWAPPED),
            std::iter::once((1, 1)),
            None,
            None,
        );
        new_struct_capsule(py, b)
    }
}

/// Whether this process's numpy keeps an `__array_struct__` capsule alive
/// exactly as long as the array made from it (numpy 2.x keeps it in the
/// array's `base`); probed once. Without numpy: false.
pub(crate) fn numpy_keeps_struct_capsule(py: Python<'_>) -> bool {
    static KEEPS: PyOnceLock<bool> = PyOnceLock::new();
    *KEEPS.get_or_init(py, || {
        let probe = || -> PyResult<bool> {
            let f = asarray(py)?;
            PROBE_DROPPED.store(false, Ordering::SeqCst);
            let arr = f.call1((Bound::new(py, StructProbe)?,))?;
            let ok = arr.get_item(0)?.extract::<u8>()? == PROBE_BYTE;
            let kept = !PROBE_DROPPED.load(Ordering::SeqCst);
            drop(arr);
            Ok(ok && kept && PROBE_DROPPED.load(Ordering::SeqCst))
        };
        probe().unwrap_or(false)
    })
}

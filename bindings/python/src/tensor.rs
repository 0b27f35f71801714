//! `Tensor`: a loaned, received or staged slot, and its lifecycle.
//!
//! A Python tensor owns the Rust tensor (`TensorMut`, `Tensor` or
//! `StagedTensor`), which owns its handle's core: it may outlive the Python
//! handle it came from, and its memory stays mapped while it lives.
//!
//! Every numpy array and DLPack capsule made from a tensor holds a strong
//! reference to it and counts as an *export* ([`crate::export`]).
//! `release()` refuses (with `BufferError`) while exports live; the end of
//! a `with` block defers the release to the last export's end. A loan
//! published (or a staged tensor forwarded) while exports live has given
//! its Rust tensor away: its [`Keeper`] (the handle, and through it the
//! mappings) stays until the last export ends. So no Python code can make
//! a view of memory that is unmapped or handed to another tensor.

use crate::convert::dtype_name;
use crate::errors::{forked_err, shape_err, tb_err};
use crate::export::{Exported, Exporter, Hold};
use crate::slot::{lock, StageHandle};
use crate::{dlpack, numpy};
use pyo3::exceptions::{PyAttributeError, PyBufferError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::sync::{Arc, Mutex};
use tensorbus::{Producer, Published, StagedTensor, Tensor, TensorMeta, TensorMut, TensorView};

/// The Rust tensor a Python tensor holds until it is released, published
/// or forwarded.
pub(crate) enum Live {
    /// A loan (writable; `publish()`).
    Loan(TensorMut),
    /// A received tensor (read-only).
    Recv(Tensor),
    /// A staged tensor (writable; `forward()`).
    Staged(StagedTensor),
}

/// Evaluates `$e` with `$t` bound to the tensor of whichever variant `$v`
/// (a `Live` or a reference to one) is: the accessors all three share.
macro_rules! on_live {
    ($v:expr, $t:ident => $e:expr) => {
        match $v {
            Live::Loan($t) => $e,
            Live::Recv($t) => $e,
            Live::Staged($t) => $e,
        }
    };
}

/// The handle of a loan or staged tensor, kept while its exports may still
/// view the slot after the Rust tensor was published or forwarded (it keeps
/// the mappings), and, for a staged tensor, to `forward(name)` through.
pub(crate) enum Keeper {
    /// A loan's producer.
    Producer(#[allow(dead_code)] Arc<Producer>),
    /// A staged tensor's stage.
    Stage(Arc<StageHandle>),
}

/// The Rust tensor while held, then its last metadata.
pub(crate) enum Body {
    Live(Live),
    Gone(TensorMeta),
}

/// What a tensor is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Loan,
    Received,
    Staged,
}

/// The mutable part of a tensor.
pub(crate) struct State {
    /// The tensor, until released, published or forwarded; then its metadata.
    pub(crate) body: Body,
    /// See [`Keeper`]: until the body is gone and no export is alive.
    pub(crate) keeper: Option<Keeper>,
    /// Live numpy arrays and DLPack capsules made from this tensor.
    exports: usize,
    /// Release when the last export ends (a `with` block ended under exports).
    release_pending: bool,
    /// Why the body is gone: "released", "published", "forwarded".
    pub(crate) gone: &'static str,
}

impl State {
    pub(crate) fn live(&self) -> Option<&Live> {
        match &self.body {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    pub(crate) fn live_mut(&mut self) -> Option<&mut Live> {
        match &mut self.body {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    fn has_live(&self) -> bool {
        matches!(self.body, Body::Live(_))
    }

    /// Puts back a tensor taken out by a publish or forward that was
    /// interrupted while it waited for room (it stays the caller's).
    pub(crate) fn restore(&mut self, live: Live, gone: &'static str) {
        self.body = Body::Live(live);
        self.gone = gone;
    }

    /// Takes the tensor out, keeping its metadata.
    pub(crate) fn take_live(&mut self) -> Option<Live> {
        let meta = match &self.body {
            Body::Live(v) => *on_live!(v, t => t.meta()),
            Body::Gone(_) => return None,
        };
        match std::mem::replace(&mut self.body, Body::Gone(meta)) {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    fn meta(&self) -> &TensorMeta {
        match &self.body {
            Body::Live(v) => on_live!(v, t => t.meta()),
            Body::Gone(m) => m,
        }
    }

    /// After the tensor was taken out to be published or forwarded: records
    /// why (`gone`) and hands out the keeper when no export needs it.
    pub(crate) fn retire(&mut self, gone: &'static str) -> Option<Keeper> {
        self.gone = gone;
        if self.exports == 0 {
            self.keeper.take()
        } else {
            None
        }
    }
}

/// `Released`: the tensor is gone (`gone`: why).
pub(crate) fn released(gone: &str) -> PyErr {
    tb_err("Released", format!("tensor already {gone}"))
}

/// A tensor in shared memory: a loan (writable, then `publish()`), a
/// received tensor (read-only) or a staged one (writable, then `forward()`).
///
/// `numpy.asarray(t)` and `numpy.from_dlpack(t)` are views of the slot's
/// bytes (no copy); while one is alive the slot stays held: `release()`
/// raises `BufferError`, and the end of a `with` block releases the slot
/// only when the last array or DLPack tensor made from it is gone.
/// float16 is numpy's float16; bfloat16 is shown to numpy as raw uint16.
#[pyclass(frozen, module = "tensorbus", name = "Tensor")]
pub struct PyTensor {
    pub(crate) state: Mutex<State>,
    kind: Kind,
    ptr: usize,
}

impl PyTensor {
    fn new_py(py: Python<'_>, live: Live, keeper: Option<Keeper>) -> PyResult<Py<PyTensor>> {
        let mut live = live;
        let (kind, ptr) = match &mut live {
            Live::Loan(t) => (Kind::Loan, t.as_mut_ptr() as usize),
            Live::Recv(t) => (Kind::Received, t.as_ptr() as usize),
            Live::Staged(t) => (Kind::Staged, t.as_mut_ptr() as usize),
        };
        Py::new(
            py,
            PyTensor {
                state: Mutex::new(State {
                    body: Body::Live(live),
                    keeper,
                    exports: 0,
                    release_pending: false,
                    gone: "released",
                }),
                kind,
                ptr,
            },
        )
    }

    /// The Python tensor of a loan of `producer`.
    pub(crate) fn loan(
        py: Python<'_>,
        t: TensorMut,
        producer: Arc<Producer>,
    ) -> PyResult<Py<PyTensor>> {
        PyTensor::new_py(py, Live::Loan(t), Some(Keeper::Producer(producer)))
    }

    /// The Python tensor of a received tensor.
    pub(crate) fn received(py: Python<'_>, t: Tensor) -> PyResult<Py<PyTensor>> {
        PyTensor::new_py(py, Live::Recv(t), None)
    }

    /// The Python tensor of a tensor staged by `stage`.
    pub(crate) fn staged(
        py: Python<'_>,
        t: StagedTensor,
        stage: Arc<StageHandle>,
    ) -> PyResult<Py<PyTensor>> {
        PyTensor::new_py(py, Live::Staged(t), Some(Keeper::Stage(stage)))
    }

    /// A copy of the metadata (make Python objects from it outside the
    /// lock: an allocation may run a collection that ends an export, which
    /// takes the lock).
    fn meta(&self) -> TensorMeta {
        *lock(&self.state).meta()
    }

    /// One field of the metadata, read under the lock without copying the
    /// rest (`f` must not allocate Python objects, see [`PyTensor::meta`]).
    fn with_meta<R>(&self, f: impl FnOnce(&TensorMeta) -> R) -> R {
        f(lock(&self.state).meta())
    }

    /// Starts an export; fails when the tensor is gone, or in a process
    /// forked after the tensor was taken (its bytes are the parent's).
    fn export(slf: &Bound<'_, PyTensor>) -> PyResult<Exported> {
        let this = slf.get();
        let meta = {
            let mut st = lock(&this.state);
            let Some(live) = st.live() else {
                return Err(released(&format!(
                    "{}; its bytes belong to someone else now",
                    st.gone
                )));
            };
            on_live!(live, t => t.fork_check()).map_err(forked_err)?;
            st.exports += 1;
            *st.meta()
        };
        Ok(Exported {
            meta,
            ptr: this.ptr,
            writable: this.writable(),
            hold: Hold::new(Box::new(slf.clone().unbind())),
        })
    }

    /// Ends an export: the last one performs a pending release and lets go
    /// of the keeper once the tensor is gone.
    fn end_export(&self) {
        let (live, keeper) = {
            let mut st = lock(&self.state);
            st.exports = st.exports.saturating_sub(1);
            if st.exports > 0 {
                return;
            }
            let live = if st.release_pending {
                st.release_pending = false;
                st.take_live()
            } else {
                None
            };
            let keeper = if st.has_live() {
                None
            } else {
                st.keeper.take()
            };
            (live, keeper)
        };
        // Outside the lock: the drops may close handles at the broker.
        drop(live);
        drop(keeper);
    }

    /// Releases now (`defer`: when the last export ends; else an error
    /// under exports).
    fn release_impl(&self, defer: bool) -> PyResult<()> {
        let (live, keeper) = {
            let mut st = lock(&self.state);
            if !st.has_live() {
                return Ok(());
            }
            if st.exports > 0 {
                if defer {
                    st.release_pending = true;
                    return Ok(());
                }
                return Err(PyBufferError::new_err(format!(
                    "cannot release: {} numpy array(s)/DLPack tensor(s) made from this tensor are alive; delete them first (or let the with block end: the slot is then released when the last one goes)",
                    st.exports
                )));
            }
            st.gone = "released";
            (st.take_live(), st.keeper.take())
        };
        drop(live);
        drop(keeper);
        Ok(())
    }

    fn writable(&self) -> bool {
        self.kind != Kind::Received
    }

    /// Records the stamps of a publish or forward in the tensor's metadata.
    pub(crate) fn stamp(&self, p: &Published) {
        let mut st = lock(&self.state);
        if let Body::Gone(m) = &mut st.body {
            m.seq = p.seq;
            m.timestamp_ns = p.timestamp_ns;
        }
    }
}

impl Exporter for Py<PyTensor> {
    fn end_export(&self) {
        self.get().end_export();
    }
}

#[pymethods]
impl PyTensor {
    /// Extents, a tuple of ints.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let m = self.meta();
        PyTuple::new(py, m.shape().iter().map(|&x| u64::from(x)))
    }

    /// Byte strides, a tuple of ints.
    #[getter]
    fn strides<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let m = self.meta();
        PyTuple::new(py, m.strides())
    }

    /// Number of dimensions.
    #[getter]
    fn ndim(&self) -> usize {
        self.with_meta(|m| m.shape().len())
    }

    /// Element type name: "uint8", "float32", "float16", "bfloat16", ...
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.with_meta(|m| m.dtype))
    }

    /// Bytes per element.
    #[getter]
    fn itemsize(&self) -> usize {
        self.with_meta(|m| m.dtype.itemsize())
    }

    /// Payload bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.with_meta(|m| m.nbytes)
    }

    /// The producer's sequence number (0, 1, 2, ... per producer; 0 for an
    /// unpublished loan).
    #[getter]
    fn seq(&self) -> u64 {
        self.with_meta(|m| m.seq)
    }

    /// CLOCK_MONOTONIC nanoseconds at publish (0 for an unpublished loan).
    #[getter]
    fn timestamp_ns(&self) -> u64 {
        self.with_meta(|m| m.timestamp_ns)
    }

    /// The client id of the publishing process.
    #[getter]
    fn producer(&self) -> u32 {
        self.with_meta(|m| m.producer)
    }

    /// The user header (up to 64 bytes of the producer's own metadata).
    #[getter]
    fn user_header<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let m = self.meta();
        PyBytes::new(py, m.user_header())
    }

    /// Sets the user header of a loan or staged tensor.
    #[setter]
    fn set_user_header(&self, value: &[u8]) -> PyResult<()> {
        let mut st = lock(&self.state);
        let gone = st.gone;
        let r = match st.live_mut() {
            Some(Live::Loan(t)) => t.set_user_header(value),
            Some(Live::Staged(t)) => t.set_user_header(value),
            Some(Live::Recv(_)) => {
                return Err(tb_err(
                    "ReadOnly",
                    "a received tensor's user header is read-only",
                ))
            }
            None => return Err(released(gone)),
        };
        r.map_err(shape_err)
    }

    /// Address of the first payload byte in this process (equal to the
    /// data pointer of every numpy array or DLPack tensor made from it).
    #[getter]
    fn address(&self) -> usize {
        self.ptr
    }

    /// Whether the bytes are writable (loans and staged tensors).
    #[getter(writable)]
    fn py_writable(&self) -> bool {
        self.writable()
    }

    /// "loan", "received" or "staged".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Loan => "loan",
            Kind::Received => "received",
            Kind::Staged => "staged",
        }
    }

    /// Whether the slot was released, published or forwarded.
    #[getter]
    fn released(&self) -> bool {
        !lock(&self.state).has_live()
    }

    /// Live numpy arrays and DLPack tensors made from this tensor.
    #[getter]
    fn exports(&self) -> usize {
        lock(&self.state).exports
    }

    /// (pool index, slot index, generation): equal ids are the same bytes.
    #[getter]
    fn slot(&self) -> PyResult<(u8, u32, u32)> {
        let st = lock(&self.state);
        let id = match st.live() {
            Some(v) => on_live!(v, t => t.slot_id()),
            None => return Err(released(st.gone)),
        };
        Ok((id.pool, id.index, id.generation))
    }

    /// Publishes a loan to the channel's subscribers and returns how many
    /// received it. The sequence number and timestamp it was stamped with
    /// are then `t.seq` and `t.timestamp_ns`. Numpy arrays of the loan stay
    /// valid memory but must not be written to any more: the bytes now
    /// belong to the consumers.
    ///
    /// While a `block` subscriber's queue is full, `publish()` waits with
    /// the GIL released (other threads, such as the consumer, run) and
    /// checks for signals every 50 ms: Ctrl-C raises `KeyboardInterrupt`
    /// and the tensor stays an unpublished loan.
    #[pyo3(signature = (user_header = None))]
    fn publish(&self, py: Python<'_>, user_header: Option<&[u8]>) -> PyResult<u32> {
        self.publish_impl(py, user_header)
    }

    /// Forwards a staged tensor — the very same slot — and returns how
    /// many received it. `to`: None (the stage's output channel), a channel
    /// name (the stage opens a producer for it on first use and keeps it)
    /// or a `Producer` of the same client (it may have loans out). The
    /// channel must use the slot's pool (else `InvalidArgument`, and the
    /// tensor stays staged: forward it elsewhere or release it). `t.seq`
    /// and `t.timestamp_ns` are then the stamps of the forward.
    #[pyo3(signature = (to = None))]
    fn forward(&self, py: Python<'_>, to: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
        self.forward_impl(py, to)
    }

    /// Gives the slot back now (a loan unpublished, a staged tensor
    /// unforwarded). Raises `BufferError` while numpy arrays or DLPack
    /// tensors made from it are alive. Releasing twice does nothing.
    fn release(&self) -> PyResult<()> {
        self.release_impl(false)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Ends the `with` block: releases the slot (unpublished loans and
    /// unforwarded staged tensors are given back), or, while exports are
    /// alive, when the last of them is gone.
    #[pyo3(signature = (_exc_type = None, _exc = None, _tb = None))]
    fn __exit__(
        &self,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.release_impl(true)?;
        Ok(false)
    }

    /// numpy's conversion hook: `numpy.asarray(t)` is a view of the slot
    /// (writable for loans and staged tensors, read-only for received ones).
    #[pyo3(signature = (dtype = None, copy = None))]
    fn __array__<'py>(
        slf: &Bound<'py, Self>,
        dtype: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        numpy::array(slf.py(), Self::export(slf)?, dtype, copy)
    }

    /// A numpy array viewing the slot (same as `numpy.asarray(t)`).
    fn numpy<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        numpy::view(slf.py(), Self::export(slf)?)
    }

    /// numpy's fast path (what `numpy.asarray(t)` uses): a capsule with a
    /// `PyArrayInterface` of the slot. numpy (2.x) keeps the capsule as
    /// long as the array (in the array's `base`), and the capsule's
    /// destructor ends the export. With a numpy that drops it at once (as
    /// older versions did; probed once) this attribute is absent and numpy
    /// falls back to `__array__`.
    #[getter]
    fn __array_struct__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        if !numpy::numpy_keeps_struct_capsule(py) {
            return Err(PyAttributeError::new_err(
                "__array_struct__ is not offered to this numpy (it does not keep the capsule alive); numpy.asarray uses __array__",
            ));
        }
        numpy::array_struct(py, Self::export(slf)?)
    }

    /// DLPack export: with `max_version=(1, x)` a versioned capsule
    /// (`dltensor_versioned`, read-only flag set for received tensors),
    /// otherwise a legacy `dltensor` capsule. CPU memory, no copy.
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        slf: &Bound<'py, Self>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        dlpack::check_args(stream, dl_device, copy)?;
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        dlpack::capsule(slf.py(), Self::export(slf)?, versioned)
    }

    /// `(1, 0)`: CPU memory.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (dlpack::DL_CPU, 0)
    }

    fn __repr__(&self) -> String {
        let st = lock(&self.state);
        let m = st.meta();
        format!(
            "tensorbus.Tensor({}, shape={:?}, dtype={}, seq={}{})",
            self.kind(),
            m.shape(),
            dtype_name(m.dtype),
            m.seq,
            if !st.has_live() {
                format!(", {}", st.gone)
            } else {
                String::new()
            }
        )
    }
}

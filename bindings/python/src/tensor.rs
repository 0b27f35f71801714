//! `Tensor`: a loaned, received or staged slot, its numpy and DLPack
//! exports, and the export counting that keeps the slot alive under them.

use crate::handles::{lock, ConsumerLease, ProducerCore, PyProducer, StageCore};
use crate::{dtype_name, tb_err};
use pyo3::exceptions::{PyAttributeError, PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tensorbus::{DType, PublishError, Published, StagedTensor, Tensor, TensorMeta, TensorMut};

/// A Rust view with its borrow of the owning handle erased (see
/// [`Owner`]): dropping it gives the slot back.
pub(crate) enum View {
    Loan(TensorMut<'static>),
    Recv(Tensor<'static>),
    Staged(StagedTensor<'static>),
}

/// The handle a view borrows, kept alive by this `Arc` until the view is gone.
pub(crate) enum Owner {
    Producer(Arc<ProducerCore>),
    /// Only held: releases go through the view; the lease's drop may end
    /// a closed consumer's subscription.
    #[allow(dead_code)]
    Consumer(ConsumerLease),
    Stage(Arc<StageCore>),
}

/// What a tensor is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Loan,
    Received,
    Staged,
}

/// Drops a view and then tells its handle that it may lend again.
fn end_view(view: View, owner: &Owner) {
    drop(view);
    match owner {
        Owner::Producer(p) => p.idle(),
        Owner::Stage(s) => s.idle(),
        Owner::Consumer(_) => {}
    }
}

/// Ends a view taken out of a tensor's state (if any), then lets go of the
/// handle (if taken): both outside the state's lock.
fn end_parts(view: Option<View>, owner: Option<Owner>) {
    if let (Some(v), Some(o)) = (view, owner.as_ref()) {
        end_view(v, o);
    }
    drop(owner);
}

/// Waits until `has_room(view, timeout)` says a publish or forward of
/// `view` would not wait for a full `block` queue: at once when it would not
/// (GIL held: the common case costs a few loads), else in slices of
/// [`crate::WAIT_SLICE`] with the GIL released, checking signals between
/// them (issue 11.3). A signal's error comes back with the view, which the
/// caller keeps.
fn wait_for_room<V>(
    py: Python<'_>,
    view: V,
    has_room: impl Fn(&V, std::time::Duration) -> bool + Sync,
) -> Result<V, (V, PyErr)> {
    if has_room(&view, std::time::Duration::ZERO) {
        return Ok(view);
    }
    let mut view = view;
    loop {
        let (v, ok) = crate::handles::detached(py, view, |v| {
            let ok = has_room(&v, crate::WAIT_SLICE);
            (v, ok)
        });
        view = v;
        if ok {
            return Ok(view);
        }
        if let Err(e) = py.check_signals() {
            return Err((view, e));
        }
    }
}

/// `Released`: the view is gone (`gone`: why).
fn released(gone: &str) -> PyErr {
    tb_err("Released", format!("tensor already {gone}"))
}

/// Evaluates `$e` with `$t` bound to the tensor of whichever variant `$v`
/// (a `View` or a reference to one) is: the accessors all three share.
macro_rules! on_view {
    ($v:expr, $t:ident => $e:expr) => {
        match $v {
            View::Loan($t) => $e,
            View::Recv($t) => $e,
            View::Staged($t) => $e,
        }
    };
}

impl View {
    fn meta(&self) -> &TensorMeta {
        on_view!(self, t => t.meta())
    }
}

/// The slot while held, then its last metadata (one or the other: a
/// tensor object stays small enough for Python's small-object allocator).
enum Body {
    Live(View),
    Gone(TensorMeta),
}

/// The mutable part of a tensor.
///
/// Field order matters: `body` is declared (and so dropped) before `owner`.
struct State {
    /// The slot, until released, published or forwarded; then its metadata.
    body: Body,
    /// The handle (and through it the shared-memory mapping), until the view
    /// is gone and no export is alive.
    owner: Option<Owner>,
    /// Live numpy arrays and DLPack capsules made from this tensor.
    exports: usize,
    /// Release when the last export ends (a `with` block ended under exports).
    release_pending: bool,
    /// Why the view is gone: "released", "published", "forwarded".
    gone: &'static str,
}

impl State {
    fn view(&self) -> Option<&View> {
        match &self.body {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    fn view_mut(&mut self) -> Option<&mut View> {
        match &mut self.body {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    fn has_view(&self) -> bool {
        matches!(self.body, Body::Live(_))
    }

    /// Puts back a view taken out by a publish or forward that was
    /// interrupted while it waited for room (it stays the caller's).
    fn restore(&mut self, view: View, gone: &'static str) {
        self.body = Body::Live(view);
        self.gone = gone;
    }

    /// Takes the view out, keeping its metadata.
    fn take_view(&mut self) -> Option<View> {
        let meta = match &self.body {
            Body::Live(v) => *v.meta(),
            Body::Gone(_) => return None,
        };
        match std::mem::replace(&mut self.body, Body::Gone(meta)) {
            Body::Live(v) => Some(v),
            Body::Gone(_) => None,
        }
    }

    fn meta(&self) -> &TensorMeta {
        match &self.body {
            Body::Live(v) => v.meta(),
            Body::Gone(m) => m,
        }
    }

    /// After the view was taken out to be published or forwarded: records
    /// why (`gone`) and hands out the handle when no export needs it.
    fn retire(&mut self, gone: &'static str) -> Option<Owner> {
        self.gone = gone;
        if self.exports == 0 {
            self.owner.take()
        } else {
            None
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if let (Some(v), Some(o)) = (self.take_view(), self.owner.as_ref()) {
            end_view(v, o);
        }
    }
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
    state: Mutex<State>,
    kind: Kind,
    ptr: usize,
}

// SAFETY: the views in `state` are only touched under its mutex; their raw
// pointers refer to shared-memory mappings kept alive by `owner`, valid from
// every thread, and the handle cores they borrow are `Send + Sync`.
unsafe impl Send for PyTensor {}
// SAFETY: as above.
unsafe impl Sync for PyTensor {}

impl PyTensor {
    pub(crate) fn new_py(py: Python<'_>, view: View, owner: Owner) -> PyResult<Py<PyTensor>> {
        let kind = match &view {
            View::Loan(_) => Kind::Loan,
            View::Recv(_) => Kind::Received,
            View::Staged(_) => Kind::Staged,
        };
        let ptr = on_view!(&view, t => t.as_ptr() as usize);
        Py::new(
            py,
            PyTensor {
                state: Mutex::new(State {
                    body: Body::Live(view),
                    owner: Some(owner),
                    exports: 0,
                    release_pending: false,
                    gone: "released",
                }),
                kind,
                ptr,
            },
        )
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

    /// Starts an export; fails when the view is gone, or in a process
    /// forked after the tensor was taken (its bytes are the parent's).
    fn begin_export(&self) -> PyResult<TensorMeta> {
        let mut st = lock(&self.state);
        let Some(view) = st.view() else {
            return Err(released(&format!(
                "{}; its bytes belong to someone else now",
                st.gone
            )));
        };
        on_view!(view, t => t.fork_check()).map_err(crate::handles::forked_err)?;
        st.exports += 1;
        Ok(*st.meta())
    }

    /// Ends an export: the last one performs a pending release and lets go
    /// of the handle once the view is gone.
    pub(crate) fn end_export(&self) {
        let (view, owner) = {
            let mut st = lock(&self.state);
            st.exports = st.exports.saturating_sub(1);
            if st.exports > 0 {
                return;
            }
            let view = if st.release_pending {
                st.release_pending = false;
                st.take_view()
            } else {
                None
            };
            let owner = if !st.has_view() {
                st.owner.take()
            } else {
                None
            };
            (view, owner)
        };
        end_parts(view, owner);
    }

    /// Releases now (`force`: error under exports) or when the last export ends.
    fn release_impl(&self, defer: bool) -> PyResult<()> {
        let (view, owner) = {
            let mut st = lock(&self.state);
            if !st.has_view() {
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
            (st.take_view(), st.owner.take())
        };
        end_parts(view, owner);
        Ok(())
    }

    fn writable(&self) -> bool {
        self.kind != Kind::Received
    }

    /// Records the stamps of a publish or forward in the tensor's metadata.
    fn stamp(&self, p: &Published) {
        let mut st = lock(&self.state);
        if let Body::Gone(m) = &mut st.body {
            m.seq = p.seq;
            m.timestamp_ns = p.timestamp_ns;
        }
    }

    /// The `__array_interface__` dict of the slot (`meta` from `begin_export`).
    fn interface<'py>(&self, py: Python<'py>, meta: &TensorMeta) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let shape: Vec<u64> = meta.shape().iter().map(|&x| u64::from(x)).collect();
        d.set_item("version", 3)?;
        d.set_item("shape", PyTuple::new(py, shape)?)?;
        d.set_item("typestr", typestr(meta.dtype))?;
        d.set_item("strides", PyTuple::new(py, meta.strides())?)?;
        d.set_item("data", (self.ptr, !self.writable()))?;
        Ok(d)
    }
}

/// The Python error of a publish or forward that failed.
fn forward_err(e: PublishError) -> PyErr {
    match e {
        PublishError::PoolNotAllowed { .. } | PublishError::ForeignClient => {
            tb_err("InvalidArgument", e.to_string())
        }
        PublishError::Shape(_) => tb_err("ShapeError", e.to_string()),
        PublishError::ForkedChild(_) => tb_err("ForkedChild", e.to_string()),
    }
}

/// The numpy type string of a dtype (bfloat16 as raw `uint16`).
fn typestr(d: DType) -> &'static str {
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
    match d {
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
        let r = match st.view_mut() {
            Some(View::Loan(t)) => t.set_user_header(value),
            Some(View::Staged(t)) => t.set_user_header(value),
            Some(View::Recv(_)) => {
                return Err(tb_err(
                    "ReadOnly",
                    "a received tensor's user header is read-only",
                ))
            }
            None => return Err(released(gone)),
        };
        r.map_err(|e| tb_err("ShapeError", e.to_string()))
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
        !lock(&self.state).has_view()
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
        let id = match st.view() {
            Some(v) => on_view!(v, t => t.slot_id()),
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
        let (t, core, gone) = {
            let mut st = lock(&self.state);
            let gone = st.gone;
            match st.view_mut() {
                Some(View::Loan(t)) => {
                    if let Some(h) = user_header {
                        t.set_user_header(h)
                            .map_err(|e| tb_err("ShapeError", e.to_string()))?;
                    }
                }
                Some(_) => {
                    return Err(tb_err(
                        "InvalidArgument",
                        "publish() is for loans (use forward() for staged tensors, release() for received ones)",
                    ))
                }
                None => return Err(released(gone)),
            }
            let Some(View::Loan(t)) = st.take_view() else {
                unreachable!("checked above")
            };
            let core = match &st.owner {
                Some(Owner::Producer(p)) => p.clone(),
                _ => unreachable!("loans are owned by producers"),
            };
            let gone = std::mem::replace(&mut st.gone, "being published (waiting for room)");
            (t, core, gone)
        };
        let t = match wait_for_room(py, t, |t, d| t.wait_for_room(d)) {
            Ok(t) => t,
            Err((t, e)) => {
                lock(&self.state).restore(View::Loan(t), gone);
                return Err(e);
            }
        };
        let owner = lock(&self.state).retire("published");
        let r = t.publish_stamped();
        core.idle();
        drop(owner);
        let p = r.map_err(forward_err)?;
        self.stamp(&p);
        Ok(p.outcome.delivered)
    }

    /// Forwards a staged tensor — the very same slot — and returns how
    /// many received it. `to`: None (the stage's output channel), a channel
    /// name (the stage opens a producer for it on first use and keeps it)
    /// or a `Producer` of the same client (`Busy` while it has a loan). The
    /// channel must use the slot's pool (else `InvalidArgument`, and the
    /// tensor stays staged: forward it elsewhere or release it). `t.seq`
    /// and `t.timestamp_ns` are then the stamps of the forward.
    #[pyo3(signature = (to = None))]
    fn forward(&self, py: Python<'_>, to: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
        enum Target {
            Output,
            Named(String),
            Producer(Arc<ProducerCore>),
        }
        let target = match to {
            None => Target::Output,
            Some(x) if x.is_none() => Target::Output,
            Some(x) => {
                if let Ok(name) = x.extract::<String>() {
                    Target::Named(name)
                } else if let Ok(p) = x.cast::<PyProducer>() {
                    Target::Producer(p.get().core()?)
                } else {
                    return Err(tb_err(
                        "InvalidArgument",
                        format!(
                            "forward(to=...) takes a channel name or a tensorbus.Producer, not {}",
                            x.get_type().name()?
                        ),
                    ));
                }
            }
        };
        // Everything that can fail without consuming the tensor comes first:
        // a busy producer, a channel that does not exist.
        let core =
            {
                let st = lock(&self.state);
                match (st.view(), &st.owner) {
                    (Some(View::Staged(_)), Some(Owner::Stage(s))) => s.clone(),
                    (Some(_), _) => return Err(tb_err(
                        "InvalidArgument",
                        "forward() is for tensors from Stage.recv_mut() (use publish() for loans)",
                    )),
                    (None, _) => return Err(released(st.gone)),
                }
            };
        if let Target::Named(name) = &target {
            if name != core.output_name() {
                core.open_extra(py, name)?;
            }
        }
        let mut claimed = match &target {
            Target::Producer(p) => Some(p.claim()?),
            _ => None,
        };
        let check = |t: &StagedTensor<'static>| match &target {
            Target::Output => t.check_forward(),
            Target::Named(name) if name == core.output_name() => t.check_forward(),
            Target::Named(name) => core.check_extra(t, name),
            Target::Producer(_) => match claimed.as_ref() {
                Some(c) => t.check_forward_to(c.producer_ref()),
                None => unreachable!("claimed above"),
            },
        };
        let (t, gone) = {
            let mut st = lock(&self.state);
            let gone = st.gone;
            match st.view() {
                Some(View::Staged(t)) => check(t).map_err(forward_err)?,
                _ => return Err(released(gone)),
            }
            let Some(View::Staged(t)) = st.take_view() else {
                unreachable!("checked above")
            };
            st.gone = "being forwarded (waiting for room)";
            (t, gone)
        };
        let waited = wait_for_room(py, t, |t, d| match &target {
            Target::Output => t.wait_for_room(d),
            Target::Named(name) if name == core.output_name() => t.wait_for_room(d),
            Target::Named(name) => core.wait_extra(name, d),
            Target::Producer(_) => claimed
                .as_ref()
                .is_none_or(|c| c.producer_ref().wait_for_room(d)),
        });
        let t = match waited {
            Ok(t) => t,
            Err((t, e)) => {
                lock(&self.state).restore(View::Staged(t), gone);
                return Err(e);
            }
        };
        let owner = lock(&self.state).retire("forwarded");
        let r = match &target {
            Target::Output => t.forward_stamped(),
            Target::Named(name) if name == core.output_name() => t.forward_stamped(),
            Target::Named(name) => core.forward_on(t, name),
            Target::Producer(_) => match claimed.as_mut() {
                Some(c) => t.forward_to_stamped(c.producer()),
                None => unreachable!("claimed above"),
            },
        };
        drop(claimed);
        core.idle();
        drop(owner);
        match r {
            Ok(p) => {
                self.stamp(&p);
                Ok(p.outcome.delivered)
            }
            Err(e) => {
                lock(&self.state).gone = "released (forward failed)";
                Err(forward_err(e))
            }
        }
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
        let py = slf.py();
        let export = Export::make(slf)?;
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

    /// A numpy array viewing the slot (same as `numpy.asarray(t)`).
    fn numpy<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        asarray(slf.py())?.call1((Export::make(slf)?,))
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
        if !numpy_keeps_struct_capsule(py) {
            return Err(PyAttributeError::new_err(
                "__array_struct__ is not offered to this numpy (it does not keep the capsule alive); numpy.asarray uses __array__",
            ));
        }
        array_struct(slf)
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
            if dev != (crate::tensor::DL_CPU, 0) {
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
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        dlpack_capsule(slf, versioned)
    }

    /// `(1, 0)`: CPU memory.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (DL_CPU, 0)
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
            if !st.has_view() {
                format!(", {}", st.gone)
            } else {
                String::new()
            }
        )
    }
}

// ---------------------------------------------------------------- numpy ---

/// One numpy export of a tensor: the array's `base`. It holds the tensor
/// (and so the slot) until numpy lets go of it.
#[pyclass(frozen, module = "tensorbus", name = "_Export")]
pub struct Export {
    tensor: Py<PyTensor>,
    iface: Py<PyDict>,
}

impl Export {
    fn make<'py>(t: &Bound<'py, PyTensor>) -> PyResult<Bound<'py, Export>> {
        let py = t.py();
        let this = t.get();
        let meta = this.begin_export()?;
        let iface = match this.interface(py, &meta) {
            Ok(d) => d.unbind(),
            Err(e) => {
                this.end_export();
                return Err(e);
            }
        };
        Bound::new(
            py,
            Export {
                tensor: t.clone().unbind(),
                iface,
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

impl Drop for Export {
    fn drop(&mut self) {
        self.tensor.get().end_export();
    }
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

// -------------------------------------------------- numpy: __array_struct__ ---

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
    shape: [isize; tensorbus::MAX_DIMS],
    strides: [isize; tensorbus::MAX_DIMS],
    /// The numpy dtype (`iface.descr` points to it).
    descr: Option<Py<PyAny>>,
    /// The exported tensor (`None` for the probe).
    tensor: Option<Py<PyTensor>>,
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
        tensor: Option<Py<PyTensor>>,
    ) -> Box<StructExport> {
        let nd = dims.len() as c_int;
        let mut shape = [0isize; tensorbus::MAX_DIMS];
        let mut strides = [0isize; tensorbus::MAX_DIMS];
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
            tensor,
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
            .map(|&d| Ok((d, dtype.call1((typestr(d),))?.unbind())))
            .collect::<PyResult<Vec<_>>>()
    })?;
    match all.iter().find(|(x, _)| *x == d) {
        Some((_, descr)) => Ok(descr.clone_ref(py)),
        None => Err(PyValueError::new_err(format!("no numpy dtype for {d:?}"))),
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
        match b.tensor.take() {
            Some(t) => t.get().end_export(),
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
        // SAFETY: the capsule was not made, so the box is still ours.
        let b = unsafe { Box::from_raw(ptr) };
        if let Some(t) = &b.tensor {
            t.get().end_export();
        }
        return Err(err);
    }
    // SAFETY: `cap` is a new, non-NULL reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) })
}

/// The `__array_struct__` capsule of a tensor: one export until numpy
/// drops it (with the array).
fn array_struct<'py>(t: &Bound<'py, PyTensor>) -> PyResult<Bound<'py, PyAny>> {
    let py = t.py();
    let this = t.get();
    let meta = this.begin_export()?;
    let descr = match numpy_descr(py, meta.dtype) {
        Ok(d) => d,
        Err(e) => {
            this.end_export();
            return Err(e);
        }
    };
    let writable = if this.writable() {
        NPY_ARRAY_WRITEABLE
    } else {
        0
    };
    let dims = meta.shape().iter().zip(meta.strides());
    let b = StructExport::new(
        this.ptr as *mut c_void,
        (
            typestr(meta.dtype).as_bytes()[1],
            meta.dtype.itemsize(),
            NPY_ARRAY_NOTSWAPPED | NPY_ARR_HAS_DESCR | writable,
        ),
        dims.map(|(&n, &st)| (n as isize, st as isize)),
        Some(descr),
        Some(t.clone().unbind()),
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
fn numpy_keeps_struct_capsule(py: Python<'_>) -> bool {
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

// --------------------------------------------------------------- DLPack ---

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
    shape: [i64; tensorbus::MAX_DIMS],
    strides: [i64; tensorbus::MAX_DIMS],
    tensor: Option<Py<PyTensor>>,
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

fn dl_dtype(d: DType) -> DLDataType {
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
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

/// Ends the export a DLPack context held (needs the GIL: it may run from a
/// consumer's thread without it).
fn end_dlpack_export(tensor: Option<Py<PyTensor>>) {
    if let Some(t) = tensor {
        Python::attach(|_py| {
            t.get().end_export();
            drop(t);
        });
    }
}

/// The deleter of an export: frees its box and ends the export.
unsafe extern "C" fn delete_export<M: Managed>(m: *mut M) {
    if m.is_null() {
        return;
    }
    // SAFETY: `m` is the first field of a `DlExport<M>` leaked by
    // `new_dl_capsule` (its `manager_ctx` points to that box), and the
    // DLPack contract calls the deleter exactly once.
    let b = unsafe { Box::from_raw((*(*m).ctx()).cast::<DlExport<M>>()) };
    let mut b = b;
    end_dlpack_export(b.tensor.take());
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
/// tensor points into and the exported `tensor`; the capsule (or, once
/// consumed, the consumer) frees it through the deleter.
fn new_dl_capsule<M: Managed>(
    py: Python<'_>,
    managed: M,
    shape: [i64; tensorbus::MAX_DIMS],
    strides: [i64; tensorbus::MAX_DIMS],
    tensor: Option<Py<PyTensor>>,
) -> PyResult<Bound<'_, PyAny>> {
    let b = Box::into_raw(Box::new(DlExport {
        managed,
        shape,
        strides,
        tensor,
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

fn dlpack_capsule<'py>(t: &Bound<'py, PyTensor>, versioned: bool) -> PyResult<Bound<'py, PyAny>> {
    let py = t.py();
    let this = t.get();
    let meta = this.begin_export()?;
    let item = meta.dtype.itemsize() as i64;
    let mut shape = [0i64; tensorbus::MAX_DIMS];
    let mut strides = [0i64; tensorbus::MAX_DIMS];
    for (i, (&s, &st)) in meta.shape().iter().zip(meta.strides()).enumerate() {
        if st % item != 0 {
            this.end_export();
            return Err(PyBufferError::new_err(
                "strides are not a multiple of the element size; DLPack cannot express this tensor",
            ));
        }
        shape[i] = i64::from(s);
        strides[i] = st / item;
    }
    let dl = DLTensor {
        data: this.ptr as *mut c_void,
        device: DLDevice {
            device_type: DL_CPU,
            device_id: 0,
        },
        ndim: meta.shape().len() as i32,
        dtype: dl_dtype(meta.dtype),
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    };
    let owner = Some(t.clone().unbind());
    let read_only = !this.writable();
    if versioned {
        let m = DLManagedTensorVersioned::new(dl, read_only);
        new_dl_capsule(py, m, shape, strides, owner)
    } else {
        let m = DLManagedTensor::new(dl, read_only);
        new_dl_capsule(py, m, shape, strides, owner)
    }
}

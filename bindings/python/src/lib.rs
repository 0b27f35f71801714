//! # tensorbus for Python
//!
//! The native module `tensorbus._tensorbus`, re-exported by the pure-Python
//! package `tensorbus`. It wraps the Rust client library:
//!
//! * `Client`, `Producer`, `Consumer`, `Stage` and an embeddable `Broker`.
//! * `Tensor`: a loaned, received or staged slot. `numpy.asarray(t)` and
//!   `numpy.from_dlpack(t)` are views of the very bytes in shared memory.
//!
//! ## Ownership
//!
//! The Rust handles (`Producer`, `Consumer`, `Stage`) and tensors
//! (`TensorMut`, `Tensor`, `StagedTensor`) own what they need and are
//! `Send + Sync`, so a Python object simply holds one: a handle in a
//! [`slot::Slot`] until `close()`, a tensor in its state until it is
//! released, published or forwarded. A tensor may outlive its Python
//! handle (and its client): its memory stays mapped while it lives, and
//! closing a consumer or stage under live tensors ends its deliveries at
//! once (the Rust library detaches it).
//!
//! Every numpy array and DLPack capsule made from a tensor holds a strong
//! reference to it and counts as an *export* ([`export`]). `release()`
//! refuses (with `BufferError`) while exports live; the end of a `with`
//! block defers the release to the last export's end. So no Python code can
//! make a view of memory that is unmapped or handed to another tensor.
//!
//! ## Modules
//!
//! * Handles: [`client`], [`broker`], [`producer`], [`consumer`] (with the
//!   asyncio readiness fd), [`stage`]; [`slot`] is what they share.
//! * Tensors: [`tensor`] (the object and its lifecycle), [`publish`]
//!   (`publish()` and `forward()`).
//! * Exports: [`export`] (the hold), [`numpy`] (`__array__`,
//!   `__array_struct__`), [`dlpack`] (`__dlpack__`, versioned 1.x).
//! * [`convert`] (arguments) and [`errors`] (exceptions).

mod broker;
mod client;
mod consumer;
mod convert;
mod dlpack;
mod errors;
mod export;
mod numpy;
mod producer;
mod publish;
mod slot;
mod stage;
mod tensor;

use pyo3::prelude::*;
use pyo3::types::{PyModule, PyTuple};
use tensorbus::{Client, DType};

/// The default broker socket path (`$TENSORBUS_SOCKET`, then
/// `$XDG_RUNTIME_DIR/tensorbus/broker.sock`, then `/tmp/tensorbus-$UID/broker.sock`).
#[pyfunction]
fn socket_path() -> std::path::PathBuf {
    Client::default_socket_path()
}

/// The native part of the `tensorbus` package.
#[pymodule]
fn _tensorbus(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<broker::PyBroker>()?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<producer::PyProducer>()?;
    m.add_class::<consumer::PyConsumer>()?;
    m.add_class::<stage::PyStage>()?;
    m.add_class::<tensor::PyTensor>()?;
    m.add_class::<numpy::Export>()?;
    m.add_class::<consumer::PyReadiness>()?;
    m.add_class::<numpy::StructProbe>()?;
    m.add_function(wrap_pyfunction!(socket_path, m)?)?;
    m.add("MAX_DIMS", tensorbus::MAX_DIMS)?;
    m.add("USER_HEADER_LEN", tensorbus::USER_HEADER_LEN)?;
    let names: Vec<&str> = DType::ALL.iter().map(|&d| convert::dtype_name(d)).collect();
    m.add("DTYPES", PyTuple::new(m.py(), names)?)?;
    Ok(())
}

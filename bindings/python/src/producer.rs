//! `Producer`: the writing end of a channel.

use crate::convert::{parse_dtype, parse_shape, WAIT_SLICE};
use crate::errors::loan_err;
use crate::slot::Slot;
use crate::tensor::PyTensor;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::error::LoanError;
use tensorbus::{DType, Producer, TensorMut};

/// The writing end of a channel: `loan()` a slot, write it through
/// `numpy.asarray(t)`, then `t.publish()`. Several loans may be out at once.
#[pyclass(frozen, module = "tensorbus", name = "Producer")]
pub struct PyProducer {
    slot: Arc<Slot<Producer>>,
    channel: String,
}

impl PyProducer {
    /// A Python producer of `producer`, and its slot (for the client to close).
    pub(crate) fn new(producer: Producer) -> (PyProducer, Arc<Slot<Producer>>) {
        let channel = producer.channel().to_owned();
        let slot = Slot::new(producer, "producer");
        (
            PyProducer {
                slot: slot.clone(),
                channel,
            },
            slot,
        )
    }

    /// The Rust producer (`Closed` after `close()`).
    pub(crate) fn handle(&self) -> PyResult<Arc<Producer>> {
        self.slot.get()
    }
}

#[pymethods]
impl PyProducer {
    /// The channel's name.
    #[getter]
    fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.is_closed()
    }

    /// Loans a slot for a C-contiguous tensor of `shape` and `dtype` and
    /// returns a writable `Tensor`. Raises `PoolExhausted` at once when
    /// every fitting slot is held, unless `timeout` (seconds) allows waiting
    /// (then `Timeout`). A producer may have several loans out at once.
    #[pyo3(signature = (shape, dtype = None, *, timeout = None))]
    fn loan(
        &self,
        py: Python<'_>,
        shape: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyTensor>> {
        let p = self.slot.get()?;
        let shape = parse_shape(shape)?;
        let dtype = match dtype {
            Some(d) => parse_dtype(d)?,
            None => DType::U8,
        };
        let timeout = crate::convert::timeout_of(timeout)?;
        let t = loan_with(py, &p, shape.as_slice(), dtype, timeout)?;
        PyTensor::loan(py, t, p)
    }

    /// Closes the producer. Loans still alive keep it open until they are
    /// published or released.
    fn close(&self) {
        self.slot.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!("tensorbus.Producer(channel={:?})", self.channel)
    }
}

/// One loan: at once (`timeout` None), else waiting in slices with the GIL
/// released, checking signals between them.
fn loan_with(
    py: Python<'_>,
    p: &Producer,
    shape: &[u32],
    dtype: DType,
    timeout: Option<Duration>,
) -> PyResult<TensorMut> {
    let Some(timeout) = timeout else {
        return p.loan(shape, dtype).map_err(loan_err);
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let slice = left.min(WAIT_SLICE);
        match py.detach(|| p.loan_timeout(shape, dtype, slice)) {
            Err(LoanError::Timeout { .. }) if !left.is_zero() && left > slice => {
                py.check_signals()?;
            }
            Err(LoanError::Timeout { channel, .. }) => {
                return Err(loan_err(LoanError::Timeout { channel, timeout }))
            }
            other => return other.map_err(loan_err),
        }
    }
}

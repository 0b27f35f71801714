//! `Stage`: takes tensors of a work-queue channel exclusively and writable,
//! to change in place and `forward()` downstream.

use crate::convert::{next_slice, recv_timeout, timeout_of};
use crate::errors::{closed, end_of_stream, recv_err, try_recv_err};
use crate::slot::{Slot, StageHandle};
use crate::tensor::PyTensor;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::error::{RecvError, TryRecvError};
use tensorbus::StagedTensor;

/// A work-queue stage: `recv_mut()` takes a tensor exclusively and
/// writable; `t.forward()` publishes the very same slot downstream.
#[pyclass(frozen, module = "tensorbus", name = "Stage")]
pub struct PyStage {
    slot: Arc<Slot<StageHandle>>,
    input: String,
    output: String,
}

impl PyStage {
    /// A Python stage of `handle` (input channel `input`), and its slot
    /// (for the client to close).
    pub(crate) fn new(handle: StageHandle, input: &str) -> (PyStage, Arc<Slot<StageHandle>>) {
        let output = handle.output_name().to_owned();
        let slot = Slot::new(handle, "stage");
        let py = PyStage {
            slot: slot.clone(),
            input: input.to_owned(),
            output,
        };
        (py, slot)
    }

    /// Waits up to `timeout` (None: forever) in slices, checking signals
    /// and `close()` between them.
    fn recv_mut_with(
        &self,
        py: Python<'_>,
        h: &StageHandle,
        timeout: Option<Duration>,
    ) -> PyResult<StagedTensor> {
        /// Why one slice got nothing.
        enum Failed {
            Try(TryRecvError),
            Recv(RecvError),
        }
        let start = Instant::now();
        loop {
            let (left, slice) = next_slice(start, timeout);
            // Also the zero slice without the GIL: taking a slot exclusively
            // may wait (briefly) for upstream to let go of it.
            let r = py.detach(|| {
                if slice.is_zero() {
                    h.stage.try_recv_mut().map_err(Failed::Try)
                } else {
                    // `close()` from another thread detaches the stage: this
                    // wait then ends within one park slice (`Detached`).
                    h.stage.recv_mut_timeout(slice).map_err(Failed::Recv)
                }
            });
            match r {
                Ok(t) => return Ok(t),
                Err(Failed::Try(TryRecvError::Empty) | Failed::Recv(RecvError::Timeout(_))) => {
                    if left.is_some_and(|l| l <= slice) {
                        return Err(recv_timeout(&self.input, timeout));
                    }
                    py.check_signals()?;
                    if self.slot.is_closed() {
                        return Err(closed("stage"));
                    }
                }
                Err(
                    Failed::Try(TryRecvError::EndOfStream) | Failed::Recv(RecvError::EndOfStream),
                ) => return Err(end_of_stream(&self.input)),
                Err(Failed::Recv(RecvError::Detached)) => return Err(closed("stage")),
                Err(Failed::Recv(e)) => return Err(recv_err(e)),
                Err(Failed::Try(e)) => return Err(try_recv_err(e)),
            }
        }
    }
}

#[pymethods]
impl PyStage {
    /// The input (work-queue) channel.
    #[getter]
    fn input(&self) -> &str {
        &self.input
    }

    /// The output channel `forward()` publishes on.
    #[getter]
    fn output(&self) -> &str {
        &self.output
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.is_closed()
    }

    /// Waits for the next input tensor (at most `timeout` seconds) and
    /// takes it exclusively: a writable `Tensor` to change in place and
    /// `forward()`. Raises `Timeout`, `EndOfStream` once the input's last
    /// producer closed cleanly and everything queued was received (unless
    /// opened with `end_of_stream=False`), or `Closed` when the stage is
    /// closed meanwhile. A stage may hold several staged tensors at once.
    #[pyo3(signature = (timeout = None))]
    fn recv_mut(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyTensor>> {
        let timeout = timeout_of(timeout)?;
        let h = self.slot.get()?;
        let t = self.recv_mut_with(py, &h, timeout)?;
        PyTensor::staged(py, t, h)
    }

    /// Closes the stage: its input subscription ends at once (nothing more
    /// is delivered to it, even while staged tensors are alive). Staged
    /// tensors still alive stay valid and can still be forwarded; the
    /// stage's handles close with the last of them.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.slot.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorbus.Stage(input={:?}, output={:?})",
            self.input, self.output
        )
    }
}

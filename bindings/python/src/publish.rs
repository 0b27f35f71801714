//! `Tensor.publish()` and `Tensor.forward()`: the two calls that hand a
//! slot on, waiting for room (GIL released, interruptible) first.

use crate::convert::WAIT_SLICE;
use crate::errors::{forked_err, publish_err, shape_err, tb_err};
use crate::producer::PyProducer;
use crate::slot::lock;
use crate::tensor::{released, Keeper, Live, PyTensor};
use pyo3::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tensorbus::{Producer, StagedTensor};

/// Waits until `has_room(t, timeout)` says a publish or forward of `t`
/// would not wait for a full `block` queue: at once when it would not (GIL
/// held: the common case costs a few loads), else in slices of
/// [`WAIT_SLICE`] with the GIL released, checking signals between them
/// (issue 11.3). A signal's error comes back with the tensor, which the
/// caller keeps.
fn wait_for_room<T: Send>(
    py: Python<'_>,
    t: T,
    has_room: impl Fn(&T, Duration) -> bool + Sync,
) -> Result<T, (T, PyErr)> {
    if has_room(&t, Duration::ZERO) {
        return Ok(t);
    }
    let mut t = t;
    loop {
        let (back, ok) = py.detach(|| {
            let ok = has_room(&t, WAIT_SLICE);
            (t, ok)
        });
        t = back;
        if ok {
            return Ok(t);
        }
        if let Err(e) = py.check_signals() {
            return Err((t, e));
        }
    }
}

/// Where a staged tensor goes.
enum Target {
    /// The stage's output channel.
    Output,
    /// A channel by name.
    Named(String),
    /// A Python producer's channel.
    Producer(Arc<Producer>),
}

impl Target {
    fn of(to: Option<&Bound<'_, PyAny>>) -> PyResult<Target> {
        let Some(x) = to.filter(|x| !x.is_none()) else {
            return Ok(Target::Output);
        };
        if let Ok(name) = x.extract::<String>() {
            Ok(Target::Named(name))
        } else if let Ok(p) = x.cast::<PyProducer>() {
            Ok(Target::Producer(p.get().handle()?))
        } else {
            Err(tb_err(
                "InvalidArgument",
                format!(
                    "forward(to=...) takes a channel name or a tensorbus.Producer, not {}",
                    x.get_type().name()?
                ),
            ))
        }
    }
}

impl PyTensor {
    /// `publish()`: see the Python method.
    pub(crate) fn publish_impl(&self, py: Python<'_>, user_header: Option<&[u8]>) -> PyResult<u32> {
        let (t, gone) = {
            let mut st = lock(&self.state);
            let gone = st.gone;
            match st.live_mut() {
                Some(Live::Loan(t)) => {
                    // A forked child's loan is the parent's: fail before waiting.
                    t.fork_check().map_err(forked_err)?;
                    if let Some(h) = user_header {
                        t.set_user_header(h).map_err(shape_err)?;
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
            let Some(Live::Loan(t)) = st.take_live() else {
                return Err(released(gone));
            };
            let gone = std::mem::replace(&mut st.gone, "being published (waiting for room)");
            (t, gone)
        };
        let t = match wait_for_room(py, t, |t, d| t.wait_for_room(d)) {
            Ok(t) => t,
            Err((t, e)) => {
                lock(&self.state).restore(Live::Loan(t), gone);
                return Err(e);
            }
        };
        let keeper = lock(&self.state).retire("published");
        let r = t.publish();
        drop(keeper);
        match r {
            Ok(p) => {
                self.stamp(&p);
                Ok(p.delivered)
            }
            Err(e) => {
                lock(&self.state).gone = "released (publish failed)";
                Err(publish_err(e))
            }
        }
    }

    /// `forward(to)`: see the Python method.
    pub(crate) fn forward_impl(
        &self,
        py: Python<'_>,
        to: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u32> {
        let target = Target::of(to)?;
        // Everything that can fail without consuming the tensor comes first:
        // a closed producer, a channel that does not exist, a wrong pool.
        let stage =
            {
                let st = lock(&self.state);
                match (st.live(), &st.keeper) {
                    (Some(Live::Staged(t)), Some(Keeper::Stage(s))) => {
                        t.fork_check().map_err(forked_err)?;
                        s.clone()
                    }
                    (Some(_), _) => return Err(tb_err(
                        "InvalidArgument",
                        "forward() is for tensors from Stage.recv_mut() (use publish() for loans)",
                    )),
                    (None, _) => return Err(released(st.gone)),
                }
            };
        // None: the stage's output.
        let dest: Option<Arc<Producer>> = match target {
            Target::Output => None,
            Target::Named(name) if name == stage.output_name() => None,
            Target::Named(name) => Some(stage.producer_for(py, &name)?),
            Target::Producer(p) => Some(p),
        };
        let (t, gone) = {
            let mut st = lock(&self.state);
            let gone = st.gone;
            match st.live() {
                Some(Live::Staged(t)) => match &dest {
                    None => t.check_forward(),
                    Some(p) => t.check_forward_to(p),
                }
                .map_err(publish_err)?,
                _ => return Err(released(gone)),
            }
            let Some(Live::Staged(t)) = st.take_live() else {
                return Err(released(gone));
            };
            st.gone = "being forwarded (waiting for room)";
            (t, gone)
        };
        let waited = wait_for_room(py, t, |t: &StagedTensor, d| match &dest {
            None => t.wait_for_room(d),
            Some(p) => p.wait_for_room(d),
        });
        let t = match waited {
            Ok(t) => t,
            Err((t, e)) => {
                lock(&self.state).restore(Live::Staged(t), gone);
                return Err(e);
            }
        };
        let keeper = lock(&self.state).retire("forwarded");
        let r = match &dest {
            None => t.forward(),
            Some(p) => t.forward_to(p),
        };
        drop(keeper);
        drop(stage);
        match r {
            Ok(p) => {
                self.stamp(&p);
                Ok(p.delivered)
            }
            Err(e) => {
                lock(&self.state).gone = "released (forward failed)";
                Err(publish_err(e))
            }
        }
    }
}

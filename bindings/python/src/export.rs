//! What a numpy or DLPack export needs of a tensor, and the hold that keeps
//! the tensor (and so its slot) alive until the export ends.
//!
//! [`crate::tensor`] starts an export (counting it) and hands out an
//! [`Exported`]; [`crate::numpy`] and [`crate::dlpack`] build their objects
//! from it without knowing the tensor type, and drop its [`Hold`] when the
//! array or capsule goes, which ends the export.

use pyo3::prelude::*;
use tensorbus::TensorMeta;

/// A tensor that counts its exports.
pub(crate) trait Exporter: Send + Sync {
    /// One export ended (the last one performs a pending release).
    fn end_export(&self);
}

/// One live export of a tensor: ends it when dropped (taking the GIL to
/// let go of the tensor object).
pub(crate) struct Hold(Option<Box<dyn Exporter>>);

impl Hold {
    /// The hold of an export just counted by `tensor`.
    pub(crate) fn new(tensor: Box<dyn Exporter>) -> Hold {
        Hold(Some(tensor))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            // May run on a thread without the GIL (a DLPack deleter).
            Python::attach(|_py| {
                t.end_export();
                drop(t);
            });
        }
    }
}

/// An export just started: the tensor's description and address, and the
/// hold that ends the export.
pub(crate) struct Exported {
    /// The tensor's metadata.
    pub(crate) meta: TensorMeta,
    /// Address of the first payload byte in this process.
    pub(crate) ptr: usize,
    /// Whether the bytes may be written (loans and staged tensors).
    pub(crate) writable: bool,
    /// Ends the export when dropped.
    pub(crate) hold: Hold,
}

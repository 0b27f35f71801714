//! The one read-only view shared by loans ([`crate::TensorMut`]), received
//! tensors ([`crate::Tensor`]) and staged tensors ([`crate::StagedTensor`]).

use crate::element::{cast_slice, check_typed, Element};
use crate::error::TypeError;
use tensorbus_core::{DType, TensorMeta};

/// Where a slot is: pool index, slot index, generation. Two views with equal
/// `SlotId`s are the very same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId {
    /// Pool index.
    pub pool: u8,
    /// Slot index in the pool.
    pub index: u32,
    /// Generation (bumped on every loan).
    pub generation: u32,
}

/// The address of a slot's first payload byte.
///
/// It points into a pool mapping owned by the client's `Inner`, which every
/// guard that carries a `SlotPtr` keeps alive through an `Arc`. Who may
/// read or write through it is decided by the slot's holder word, not by
/// this type: each guard's `Deref`/`DerefMut` argues that at its use site.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotPtr(pub(crate) *mut u8);

// SAFETY: a `SlotPtr` is an address, and moving an address to another
// thread is harmless. Every dereference happens in a guard (`TensorMut`,
// `Tensor`, `StagedTensor`) whose `Arc` keeps the mapping alive on any
// thread, and whose holder bit keeps other processes from loaning the slot
// meanwhile; writes go through `&mut` of that guard only.
unsafe impl Send for SlotPtr {}
// SAFETY: sharing `&SlotPtr` only shares the address (see `Send`); a guard
// shared between threads hands out `&[u8]` (reads of bytes nobody writes
// while the slot is held) and never `&mut [u8]` through `&self`.
unsafe impl Sync for SlotPtr {}

/// A tensor's place and description: what every guard carries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub id: SlotId,
    pub ptr: SlotPtr,
    pub meta: TensorMeta,
}

impl Placed {
    /// The tensor's bytes.
    ///
    /// # Safety
    /// `ptr..ptr + meta.nbytes` must lie inside a live mapping for `'a`, and
    /// nobody may write those bytes during `'a` (the caller's slot hold
    /// guarantees both).
    pub(crate) unsafe fn bytes<'a>(&self) -> &'a [u8] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts(self.ptr.0, self.meta.nbytes as usize) }
    }

    /// The tensor's bytes, writable.
    ///
    /// # Safety
    /// As [`Placed::bytes`], and the mapping must be writable and no other
    /// reference to the bytes may exist during `'a` (exclusive hold, `&mut`
    /// guard).
    pub(crate) unsafe fn bytes_mut<'a>(&self) -> &'a mut [u8] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.0, self.meta.nbytes as usize) }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::TensorMut {}
    impl Sealed for crate::Tensor {}
    impl Sealed for crate::StagedTensor {}
}

/// What every tensor handle lets you read: its metadata and its bytes
/// (through `Deref<Target = [u8]>`). Implemented by loans
/// ([`crate::TensorMut`]), received tensors ([`crate::Tensor`]) and staged
/// tensors ([`crate::StagedTensor`]), so one function can inspect any of
/// them:
///
/// ```no_run
/// use tensorbus::{DType, TensorView};
///
/// fn describe(t: &impl TensorView) -> String {
///     format!("{:?} {} seq {} ({} bytes)", t.shape(), t.dtype(), t.seq(), t.len())
/// }
/// # let client = tensorbus::Client::connect()?;
/// let producer = client.producer("camera/raw")?;
/// let consumer = client.consumer("camera/raw")?;
/// let loan = producer.loan(&[2, 3], DType::F32)?;
/// println!("{}", describe(&loan));
/// loan.publish()?;
/// println!("{}", describe(&consumer.recv()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait TensorView: std::ops::Deref<Target = [u8]> + sealed::Sealed {
    /// All metadata (for received tensors: validated against the slot at
    /// receive time).
    fn meta(&self) -> &TensorMeta;
    /// Where the slot is.
    fn slot_id(&self) -> SlotId;

    /// Extents, one per dimension.
    fn shape(&self) -> &[u32] {
        self.meta().shape()
    }
    /// Byte strides, one per dimension.
    fn strides(&self) -> &[i64] {
        self.meta().strides()
    }
    /// Element type.
    fn dtype(&self) -> DType {
        self.meta().dtype
    }
    /// The producer's sequence number (0 on a loan not yet published).
    fn seq(&self) -> u64 {
        self.meta().seq
    }
    /// CLOCK_MONOTONIC nanoseconds at publish (0 on a loan).
    fn timestamp_ns(&self) -> u64 {
        self.meta().timestamp_ns
    }
    /// Id of the publishing client (0 on a loan).
    fn producer_id(&self) -> u32 {
        self.meta().producer
    }
    /// The user header (at most [`crate::USER_HEADER_LEN`] bytes).
    fn user_header(&self) -> &[u8] {
        self.meta().user_header()
    }
    /// The tensor as a typed slice (dtype must match; contiguous and
    /// aligned).
    fn as_slice_of<T: Element>(&self) -> Result<&[T], TypeError> {
        let len = check_typed::<T>(self.meta())?;
        let bytes: &[u8] = self;
        if bytes.len() < len {
            return Err(TypeError::NotContiguous);
        }
        // SAFETY: `bytes` is a live shared borrow of at least `len` bytes
        // for the lifetime of `&self`; `cast_slice` checks alignment and
        // size, and `T: Element` accepts any bit pattern.
        unsafe { cast_slice::<T>(bytes.as_ptr(), len) }.ok_or(TypeError::NotContiguous)
    }
}

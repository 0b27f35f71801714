//! # tensorbus C API
//!
//! A stable C ABI over the `tensorbus` client library, built as
//! `libtensorbus.so` and `libtensorbus.a`; the header `include/tensorbus.h`
//! is generated from this crate by cbindgen (`make -C bindings/c header`).
//!
//! Shape of the API:
//!
//! * Opaque handles: `tb_client`, `tb_producer`, `tb_consumer`, `tb_stage`,
//!   `tb_tensor`. Every call returns a [`tb_status`]; on failure
//!   [`tb_last_error_message`] (thread-local) says why.
//! * No panic crosses the boundary: every entry point runs under
//!   `catch_unwind` and turns a panic into `TB_ERR_INTERNAL`.
//! * Handles are checked against a registry before they are touched: NULL,
//!   closed, released, foreign or wrong-kind pointers give
//!   `TB_ERR_INVALID_ARGUMENT`, never a crash. Releasing a tensor twice is
//!   reported as "tensor already released" (for the last 1024 closed or
//!   released handles; after that the address may belong to a new handle).
//! * Lifetimes: a tensor owns what it needs, so it may outlive the handle
//!   it came from. Closing a producer, consumer or stage whose tensors are
//!   alive succeeds and the tensors stay valid: a loan can still be
//!   published, a staged tensor forwarded, and their bytes stay readable
//!   (and writable) until they are published, forwarded or released. A
//!   closed consumer or stage receives nothing more from that moment on (it
//!   leaves its channel at once); its broker handle closes when its last
//!   tensor is released. A producer may have several loans at a time, a
//!   stage several staged tensors, a consumer many received tensors.
//!   Closing a client that still has open handles returns `TB_ERR_BUSY` and
//!   changes nothing (`tb_channel_remove` of a channel in use is the only
//!   other call that returns `TB_ERR_BUSY`).
//! * Options structs (`tb_channel_spec`, `tb_producer_options`,
//!   `tb_consumer_options`) start with `struct_size`, which the caller sets
//!   to `sizeof` the struct (the `*_INIT` macros do): every other field's
//!   zero is its default, fields a newer header appends read as 0 from a
//!   program built against an older one, and a program built against a
//!   newer header that sets fields this library does not know gets
//!   `TB_ERR_INVALID_ARGUMENT` instead of having them ignored.
//! * Threads: a client, producer, consumer or stage may be used from
//!   several threads at once. A tensor must be used by one thread at a time
//!   (it may move between threads). Closing a handle, or publishing,
//!   forwarding or releasing a tensor, while another thread is inside a
//!   call on it is a bug in the caller.
//! * `fork()`: a child's inherited handles are inert. Opening, loaning,
//!   publishing, receiving, forwarding and `tb_tensor_data` /
//!   `tb_tensor_const_data` on them return `TB_ERR_FORKED_CHILD`; the
//!   closes and `tb_release` succeed in the child and leave the parent's
//!   handles, subscriptions and held slots untouched (metadata getters
//!   still answer). A child connects a client of its own.

#![allow(non_camel_case_types)]

mod handle;
mod registry;
mod status;

pub use status::tb_status;
use status::*;

use handle::{client_shell, close, live_inner, open, register, Opened, Owner};
use registry::Kind;
use std::cell::UnsafeCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::{size_of, MaybeUninit};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize};
use std::time::Duration;
use tensorbus::error::{LoanError, RecvError, ShapeError, TryRecvError};
use tensorbus::{
    ChannelSpec, Client, Consumer, ConsumerOptions, DType, Mode, Policy, Producer, ProducerOptions,
    Published, Stage, StagedTensor, Tensor, TensorMeta, TensorMut, TensorView,
};

/// Element type of a tensor (one of the `TB_DTYPE_*` constants).
pub type tb_dtype = u32;
/// One byte, 0 or 1.
pub const TB_DTYPE_BOOL: tb_dtype = 1;
/// Unsigned 8-bit integer.
pub const TB_DTYPE_U8: tb_dtype = 2;
/// Signed 8-bit integer.
pub const TB_DTYPE_I8: tb_dtype = 3;
/// Unsigned 16-bit integer.
pub const TB_DTYPE_U16: tb_dtype = 4;
/// Signed 16-bit integer.
pub const TB_DTYPE_I16: tb_dtype = 5;
/// Unsigned 32-bit integer.
pub const TB_DTYPE_U32: tb_dtype = 6;
/// Signed 32-bit integer.
pub const TB_DTYPE_I32: tb_dtype = 7;
/// Unsigned 64-bit integer.
pub const TB_DTYPE_U64: tb_dtype = 8;
/// Signed 64-bit integer.
pub const TB_DTYPE_I64: tb_dtype = 9;
/// IEEE 754 half precision.
pub const TB_DTYPE_F16: tb_dtype = 10;
/// bfloat16.
pub const TB_DTYPE_BF16: tb_dtype = 11;
/// IEEE 754 single precision (`float`).
pub const TB_DTYPE_F32: tb_dtype = 12;
/// IEEE 754 double precision (`double`).
pub const TB_DTYPE_F64: tb_dtype = 13;

// The C dtype constants are the Rust codes (`DType::code`, the byte stored in
// slot headers): a compile-time check, so neither side can drift alone.
const _: () = {
    const fn same(c: tb_dtype, d: DType) -> bool {
        c == d.code() as tb_dtype
    }
    assert!(same(TB_DTYPE_BOOL, DType::Bool));
    assert!(same(TB_DTYPE_U8, DType::U8));
    assert!(same(TB_DTYPE_I8, DType::I8));
    assert!(same(TB_DTYPE_U16, DType::U16));
    assert!(same(TB_DTYPE_I16, DType::I16));
    assert!(same(TB_DTYPE_U32, DType::U32));
    assert!(same(TB_DTYPE_I32, DType::I32));
    assert!(same(TB_DTYPE_U64, DType::U64));
    assert!(same(TB_DTYPE_I64, DType::I64));
    assert!(same(TB_DTYPE_F16, DType::F16));
    assert!(same(TB_DTYPE_BF16, DType::BF16));
    assert!(same(TB_DTYPE_F32, DType::F32));
    assert!(same(TB_DTYPE_F64, DType::F64));
};

/// Backpressure policy of a subscription (one of the `TB_POLICY_*` constants).
pub type tb_policy = u32;
/// The channel's default policy.
pub const TB_POLICY_DEFAULT: tb_policy = 0;
/// Lossless: the producer waits for room.
pub const TB_POLICY_BLOCK: tb_policy = 1;
/// Real-time: the oldest queued tensor is dropped to make room.
pub const TB_POLICY_DROP_OLDEST: tb_policy = 2;
/// The new tensor is not delivered to this subscriber when its ring is full.
pub const TB_POLICY_DROP_NEWEST: tb_policy = 3;
/// Depth 1, always the newest tensor.
pub const TB_POLICY_LATEST: tb_policy = 4;

/// Most dimensions a tensor may have.
pub const TB_MAX_DIMS: usize = 8;
/// Largest user header in bytes.
pub const TB_USER_HEADER_LEN: usize = 64;
/// `timeout_ns` value that waits forever.
pub const TB_TIMEOUT_INFINITE: u64 = 0xFFFF_FFFF_FFFF_FFFF;

// The C limits are the Rust ones.
const _: () = assert!(TB_MAX_DIMS == tensorbus::MAX_DIMS);
const _: () = assert!(TB_USER_HEADER_LEN == tensorbus::USER_HEADER_LEN);

/// How a channel created at run time hands out tensors (one of the `TB_MODE_*` constants).
pub type tb_mode = u32;
/// Every subscriber receives every tensor (the default, 0).
pub const TB_MODE_BROADCAST: tb_mode = 0;
/// Each tensor goes to one of the subscribers (workers); a stage's input must be one.
pub const TB_MODE_WORKQUEUE: tb_mode = 1;

/// Bits of [`tb_consumer_options`]`.flags` (the `TB_CONSUMER_*` constants).
pub type tb_consumer_flags = u32;
/// Never report end of stream: once the last producer closed and the queue
/// is drained, receives keep returning `TB_ERR_TIMEOUT` (after their
/// timeout) and a producer that opens later is received from as usual. For
/// long-lived services that outlive their producers.
pub const TB_CONSUMER_NO_END_OF_STREAM: tb_consumer_flags = 1;
/// Every flag this library knows (others are `TB_ERR_INVALID_ARGUMENT`).
const TB_CONSUMER_KNOWN_FLAGS: tb_consumer_flags = TB_CONSUMER_NO_END_OF_STREAM;

/// Largest `struct_size` accepted (a bigger one is taken for an
/// uninitialised field rather than read).
const TB_MAX_STRUCT_SIZE: usize = 4096;

/// How to create a channel at run time when it does not exist yet
/// ([`tb_producer_options`]`.create`, [`tb_consumer_options`]`.create`).
/// Start from `TB_CHANNEL_SPEC_INIT` (or set `struct_size` to
/// `sizeof(tb_channel_spec)` and zero the rest): each zero field is the
/// default. Nothing in it is kept after the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tb_channel_spec {
    /// `sizeof(tb_channel_spec)`.
    pub struct_size: usize,
    /// Names of the pools the channel may loan from (`npools` NUL-terminated
    /// strings); NULL / 0: every pool of the broker.
    pub pools: *const *const c_char,
    /// How many names `pools` holds.
    pub npools: usize,
    /// `TB_MODE_BROADCAST` (0) or `TB_MODE_WORKQUEUE`.
    pub mode: tb_mode,
    /// Ring depth of subscribers that do not ask for one (0: the broker's default).
    pub depth: u32,
    /// Policy of subscribers that do not ask for one (`TB_POLICY_DEFAULT`: the broker's).
    pub policy: tb_policy,
    /// Keep the latest `history` tensors for subscribers that join later: a
    /// late subscriber first receives them, oldest first (all of them, its
    /// newest `depth` under drop_oldest, the newest one under latest). They
    /// hold slots of the channel's pools until newer ones replace them,
    /// also after their producer closed. Broadcast channels
    /// only, at most the broker's `limits.ring_capacity`; 0 keeps nothing.
    pub history: u32,
}

/// Options of [`tb_producer_open_with`]. Start from
/// `TB_PRODUCER_OPTIONS_INIT`; each zero field is the default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tb_producer_options {
    /// `sizeof(tb_producer_options)`.
    pub struct_size: usize,
    /// Create the channel with this spec if it does not exist yet (NULL:
    /// the channel must exist). An existing channel is opened as it is.
    pub create: *const tb_channel_spec,
}

/// Options of [`tb_consumer_open_with`] and [`tb_stage_open_with`] (for
/// the stage's input). Start from `TB_CONSUMER_OPTIONS_INIT`; each zero
/// field is the default.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct tb_consumer_options {
    /// `sizeof(tb_consumer_options)`.
    pub struct_size: usize,
    /// How long the open waits for a channel that does not exist yet:
    /// 0 fails at once with `TB_ERR_NO_CHANNEL`, `TB_TIMEOUT_INFINITE`
    /// waits forever, anything else waits up to that many nanoseconds and
    /// then fails with `TB_ERR_TIMEOUT` (nothing is left open). The
    /// subscription is registered at once, so the producer that creates the
    /// channel delivers to it from its first tensor on.
    pub wait_channel_ns: u64,
    /// Create the channel with this spec if it does not exist yet (NULL: do not).
    pub create: *const tb_channel_spec,
    /// `TB_POLICY_*`; `TB_POLICY_DEFAULT`: the channel's (for a stage:
    /// `TB_POLICY_BLOCK`, lossless, as `tb_stage_open`).
    pub policy: tb_policy,
    /// Ring depth (0: the channel's default).
    pub depth: u32,
    /// `TB_CONSUMER_*` bits (0: none).
    pub flags: tb_consumer_flags,
    /// Must be 0.
    pub reserved: u32,
}

/// An options struct that starts with its `struct_size` (a `usize`).
///
/// # Safety
/// Implementors are `repr(C)`, start with a `usize`, and every field is an
/// integer or a raw pointer: any bytes (all zeros in particular) are a valid value.
unsafe trait Versioned: Copy {
    /// The C name of the struct.
    const NAME: &'static str;
    /// All fields zero.
    fn zero() -> Self {
        // SAFETY: all-zero bytes are a valid value (the trait's contract).
        unsafe { MaybeUninit::<Self>::zeroed().assume_init() }
    }
}

// SAFETY: repr(C), `struct_size: usize` first, integers and raw pointers only.
unsafe impl Versioned for tb_channel_spec {
    const NAME: &'static str = "tb_channel_spec";
}
// SAFETY: as above.
unsafe impl Versioned for tb_producer_options {
    const NAME: &'static str = "tb_producer_options";
}
// SAFETY: as above.
unsafe impl Versioned for tb_consumer_options {
    const NAME: &'static str = "tb_consumer_options";
}

/// A connection to a broker (opaque).
pub struct tb_client {
    client: AtomicPtr<Client>,
    children: AtomicUsize,
}

/// The writing end of a channel (opaque).
pub struct tb_producer(Opened<Producer>);

/// The reading end of a channel: one subscription (opaque).
pub struct tb_consumer(Opened<Consumer>);

/// A work-queue subscription that edits slots in place and forwards them (opaque).
pub struct tb_stage(Opened<Stage>);

/// A loaned, received or staged tensor (opaque).
pub struct tb_tensor {
    view: UnsafeCell<Option<View>>,
}

/// What a `tb_tensor` holds: the Rust tensor, which owns what it needs
/// (it outlives the handle it came from).
enum View {
    Loan(TensorMut),
    Recv(Tensor),
    Staged(StagedTensor),
}

impl View {
    fn meta(&self) -> &TensorMeta {
        match self {
            View::Loan(t) => t.meta(),
            View::Recv(t) => t.meta(),
            View::Staged(t) => t.meta(),
        }
    }

    /// The tensor's bytes (read-only).
    fn bytes(&self) -> &[u8] {
        match self {
            View::Loan(t) => t,
            View::Recv(t) => t,
            View::Staged(t) => t,
        }
    }

    /// `TB_ERR_FORKED_CHILD` in a process forked after the tensor was
    /// taken: its bytes are the parent's to read and write.
    fn fork_check(&self) -> Res {
        match self {
            View::Loan(t) => t.fork_check(),
            View::Recv(t) => t.fork_check(),
            View::Staged(t) => t.fork_check(),
        }
        .map_err(Error::from)
    }
}

/// Frees a quarantined shell (its contents were dropped when it was closed).
pub(crate) fn free_shell(addr: usize, kind: Kind) {
    // SAFETY: `addr` came from `Box::into_raw` of the type `kind` names
    // (registered in `register`/`new_tensor`), it was retired so no call uses
    // it any more, and it is freed exactly once (it just left the quarantine).
    unsafe {
        match kind {
            Kind::Client => drop(Box::from_raw(addr as *mut tb_client)),
            Kind::Producer => drop(Box::from_raw(addr as *mut tb_producer)),
            Kind::Consumer => drop(Box::from_raw(addr as *mut tb_consumer)),
            Kind::Stage => drop(Box::from_raw(addr as *mut tb_stage)),
            Kind::Tensor => drop(Box::from_raw(addr as *mut tb_tensor)),
        }
    }
}

/// Wraps a view in a tensor handle (reusing an old shell when one is due).
fn new_tensor(view: View) -> *mut tb_tensor {
    let mut reg = registry::lock();
    let p = match reg.reuse_tensor_shell() {
        Some(addr) => {
            let p = addr as *mut tb_tensor;
            // SAFETY: `addr` is a retired tensor shell that just left the
            // quarantine under the registry lock: no handle refers to it, its
            // view is `None`, and we are its only user.
            unsafe { *(*p).view.get() = Some(view) };
            p
        }
        None => Box::into_raw(Box::new(tb_tensor {
            view: UnsafeCell::new(Some(view)),
        })),
    };
    reg.insert(p as usize, Kind::Tensor);
    p
}

/// Hands out a new tensor from a live handle: clears `out`, looks `owner`
/// up, runs `take` on its Rust object and writes the new tensor handle
/// through `out`.
///
/// # Safety
/// `out` is NULL or writable; `owner` is not closed meanwhile.
unsafe fn lend<T: Owner>(
    owner: *mut T,
    out: *mut *mut tb_tensor,
    take: impl FnOnce(&T::Inner) -> Res<View>,
) -> Res {
    // SAFETY: forwarded caller promises.
    unsafe { clear_out(out) }?;
    // SAFETY: checked by the registry; the caller keeps it open.
    let (_, inner) = unsafe { live_inner(owner) }?;
    let view = take(inner)?;
    let t = new_tensor(view);
    // SAFETY: checked non-NULL and writable by `clear_out`.
    unsafe { out.write(t) };
    Ok(())
}

/// Runs `f` on a live tensor's view.
///
/// # Safety
/// `t` must not be released by another thread meanwhile.
unsafe fn with_view<R>(t: *const tb_tensor, f: impl FnOnce(&mut View) -> Res<R>) -> Res<R> {
    registry::lock().check(t as usize, Kind::Tensor)?;
    // SAFETY: `t` is a live tensor shell (checked above) and, by the
    // threading contract, only this thread uses it now.
    let slot = unsafe { &mut *(*t).view.get() };
    let view = slot
        .as_mut()
        .ok_or_else(|| invalid("tensor already released"))?;
    f(view)
}

/// Takes the view out of a live tensor whose view `accept`s, and retires the handle.
///
/// # Safety
/// `t` must not be used by another thread meanwhile.
unsafe fn take_view(t: *mut tb_tensor, accept: impl FnOnce(&View) -> Res) -> Res<View> {
    let mut reg = registry::lock();
    reg.check(t as usize, Kind::Tensor)?;
    // SAFETY: live tensor shell, and the registry lock keeps every other
    // release of it out while we take its view.
    let slot = unsafe { &mut *(*t).view.get() };
    let view = slot
        .as_ref()
        .ok_or_else(|| invalid("tensor already released"))?;
    accept(view)?;
    let view = slot
        .take()
        .ok_or_else(|| invalid("tensor already released"))?;
    reg.retire(t as usize, Kind::Tensor, free_shell);
    Ok(view)
}

/// Publishes a loan (`staged` false) or forwards a staged tensor (`staged`
/// true) and ends its view; any other tensor fails with `wrong` and is left
/// as it was. Once accepted, the handle is consumed whatever the outcome;
/// `delivered_or_null` receives how many subscribers got it.
///
/// # Safety
/// `tensor` is not used by another thread meanwhile; `delivered_or_null` is
/// NULL or writable.
unsafe fn send(
    tensor: *mut tb_tensor,
    delivered_or_null: *mut u32,
    staged: bool,
    wrong: &str,
) -> Res {
    // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
    let view = unsafe {
        take_view(tensor, |v| match (v, staged) {
            (View::Loan(_), false) | (View::Staged(_), true) => Ok(()),
            _ => Err(invalid(wrong)),
        })
    }?;
    let published: Published = match view {
        View::Loan(t) => t.publish()?,
        View::Staged(t) => t.forward()?,
        // Refused by `take_view` above.
        View::Recv(_) => return Err(invalid(wrong)),
    };
    // SAFETY: NULL or writable (caller's promise).
    unsafe { put(delivered_or_null, published.delivered) };
    Ok(())
}

/// Fails when a required pointer is NULL.
fn need<T>(p: *const T, what: &str) -> Res {
    if p.is_null() {
        Err(invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// Writes `v` through `out` when it is not NULL.
///
/// # Safety
/// `out` is NULL or valid for writes.
unsafe fn put<T>(out: *mut T, v: T) {
    if !out.is_null() {
        // SAFETY: non-NULL, and the caller promises it is writable.
        unsafe { out.write(v) };
    }
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or a valid NUL-terminated string that outlives `'a`.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    need(p, what)?;
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// Reads `ndim` C extents into the `u32` extents a tensor header holds:
/// more than `TB_MAX_DIMS` dimensions, or an extent above `UINT32_MAX`, is
/// `TB_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `shape` points to `ndim` readable values (or is NULL when `ndim` is 0).
unsafe fn extents(ndim: usize, shape: *const usize) -> Res<([u32; TB_MAX_DIMS], usize)> {
    if ndim > TB_MAX_DIMS {
        return Err(invalid(format!(
            "ndim {ndim} exceeds TB_MAX_DIMS ({TB_MAX_DIMS})"
        )));
    }
    let mut dims = [0u32; TB_MAX_DIMS];
    if ndim > 0 {
        need(shape, "shape")?;
        // SAFETY: non-NULL and `ndim` readable values (caller's promise).
        let given = unsafe { std::slice::from_raw_parts(shape, ndim) };
        for (axis, (d, &extent)) in dims.iter_mut().zip(given).enumerate() {
            *d = u32::try_from(extent)
                .map_err(|_| LoanError::from(ShapeError::DimTooLarge { axis, extent }))?;
        }
    }
    Ok((dims, ndim))
}

/// Decodes a `TB_DTYPE_*` value.
fn dtype(code: tb_dtype) -> Res<DType> {
    u8::try_from(code)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| invalid(format!("unknown dtype {code} (use a TB_DTYPE_* constant)")))
}

/// Decodes a `TB_POLICY_*` value.
fn policy(code: tb_policy) -> Res<Option<Policy>> {
    Ok(match code {
        TB_POLICY_DEFAULT => None,
        TB_POLICY_BLOCK => Some(Policy::Block),
        TB_POLICY_DROP_OLDEST => Some(Policy::DropOldest),
        TB_POLICY_DROP_NEWEST => Some(Policy::DropNewest),
        TB_POLICY_LATEST => Some(Policy::Latest),
        other => {
            return Err(invalid(format!(
                "unknown policy {other} (use a TB_POLICY_* constant)"
            )))
        }
    })
}

/// The `dtype` code of a tensor.
fn dtype_code(d: DType) -> tb_dtype {
    tb_dtype::from(d.code())
}

/// Reads an options struct the caller filled (NULL: `None`): its first
/// `struct_size` bytes. Fields past the end of an older caller's struct
/// read as 0; bytes past the end of this library's struct (a newer header's
/// fields) must be 0, or the call is refused rather than half-understood.
///
/// # Safety
/// `p` is NULL or points to a struct whose `struct_size` bytes are readable.
unsafe fn read_versioned<T: Versioned>(p: *const T) -> Res<Option<T>> {
    if p.is_null() {
        return Ok(None);
    }
    let name = T::NAME;
    // SAFETY: non-NULL, and the struct starts with its `size_t struct_size`
    // (caller's promise); read unaligned in case the caller packed it.
    let size = unsafe { p.cast::<usize>().read_unaligned() };
    let known = size_of::<T>();
    if size < size_of::<usize>() || size > TB_MAX_STRUCT_SIZE {
        return Err(invalid(format!(
            "{name}.struct_size is {size}: set it to sizeof({name}) (start from the {}_INIT macro)",
            name.to_ascii_uppercase()
        )));
    }
    if size > known {
        // SAFETY: the caller's struct has `size` readable bytes.
        let newer = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(known), size - known) };
        if newer.iter().any(|&b| b != 0) {
            return Err(invalid(format!(
                "{name} of {size} bytes sets fields this libtensorbus ({} bytes, version {}) does not know: link the library that matches your tensorbus.h",
                known,
                env!("CARGO_PKG_VERSION")
            )));
        }
    }
    let mut v = MaybeUninit::new(T::zero());
    // SAFETY: `size.min(known)` bytes are readable at `p` (caller's promise)
    // and writable in `v`; the two do not overlap.
    unsafe {
        ptr::copy_nonoverlapping(p.cast::<u8>(), v.as_mut_ptr().cast::<u8>(), size.min(known))
    };
    // SAFETY: any bytes are a valid `T` (the `Versioned` contract), and all
    // of `v` was initialised by `zero` first.
    Ok(Some(unsafe { v.assume_init() }))
}

/// Decodes a `tb_channel_spec` (NULL: `None`).
///
/// # Safety
/// `p` is NULL or a filled `tb_channel_spec` whose `pools` holds `npools`
/// NUL-terminated strings.
unsafe fn channel_spec(p: *const tb_channel_spec) -> Res<Option<ChannelSpec>> {
    // SAFETY: forwarded caller promise.
    let Some(s) = (unsafe { read_versioned(p) })? else {
        return Ok(None);
    };
    let mode = match s.mode {
        TB_MODE_BROADCAST => Mode::Broadcast,
        TB_MODE_WORKQUEUE => Mode::Workqueue,
        other => {
            return Err(invalid(format!(
                "unknown tb_channel_spec.mode {other} (use a TB_MODE_* constant)"
            )))
        }
    };
    let mut spec = ChannelSpec::new(mode).history(s.history);
    if s.npools > 0 {
        need(s.pools, "tb_channel_spec.pools")?;
        // SAFETY: non-NULL and `npools` readable pointers (caller's promise).
        let names = unsafe { std::slice::from_raw_parts(s.pools, s.npools) };
        let names = names
            .iter()
            .enumerate()
            // SAFETY: each is NULL or NUL-terminated (caller's promise).
            .map(|(i, &n)| unsafe { text(n, &format!("tb_channel_spec.pools[{i}]")) })
            .collect::<Res<Vec<&str>>>()?;
        spec = spec.pools(&names);
    }
    if s.depth > 0 {
        spec = spec.depth(s.depth);
    }
    if let Some(p) = policy(s.policy)? {
        spec = spec.policy(p);
    }
    Ok(Some(spec))
}

/// Consumer options from a policy and depth (`TB_POLICY_DEFAULT` / 0: the
/// channel's; `stage`: a stage's default policy is `block`).
fn consumer_opts(policy: tb_policy, depth: u32, stage: bool) -> Res<ConsumerOptions> {
    let mut opts = ConsumerOptions::default();
    match self::policy(policy)? {
        Some(p) => opts = opts.policy(p),
        None if stage => opts = opts.policy(Policy::Block),
        None => {}
    }
    if depth > 0 {
        opts = opts.depth(depth);
    }
    Ok(opts)
}

/// `opts` waiting `wait_ns` for a missing channel (0: not at all,
/// `TB_TIMEOUT_INFINITE`: forever).
fn waiting(opts: ConsumerOptions, wait_ns: u64) -> ConsumerOptions {
    match wait_ns {
        0 => opts,
        TB_TIMEOUT_INFINITE => opts.wait_for_channel(Duration::MAX),
        ns => opts.wait_for_channel(Duration::from_nanos(ns)),
    }
}

/// Decodes `tb_consumer_options` (NULL: the defaults) for a consumer or,
/// with `stage`, a stage's input.
///
/// # Safety
/// `p` is NULL or a filled `tb_consumer_options` (see [`channel_spec`] for its `create`).
unsafe fn consumer_options(p: *const tb_consumer_options, stage: bool) -> Res<ConsumerOptions> {
    // SAFETY: forwarded caller promise.
    let o = unsafe { read_versioned(p) }?.unwrap_or_else(tb_consumer_options::zero);
    if o.flags & !TB_CONSUMER_KNOWN_FLAGS != 0 {
        return Err(invalid(format!(
            "unknown tb_consumer_options.flags bits {:#x} (use TB_CONSUMER_* constants)",
            o.flags & !TB_CONSUMER_KNOWN_FLAGS
        )));
    }
    if o.reserved != 0 {
        return Err(invalid("tb_consumer_options.reserved must be 0"));
    }
    let mut opts = waiting(consumer_opts(o.policy, o.depth, stage)?, o.wait_channel_ns);
    if o.flags & TB_CONSUMER_NO_END_OF_STREAM != 0 {
        opts = opts.end_of_stream(false);
    }
    // SAFETY: forwarded caller promise.
    if let Some(spec) = unsafe { channel_spec(o.create) }? {
        opts = opts.create(spec);
    }
    Ok(opts)
}

/// Receives with `timeout_ns` as the C API means it: 0 polls (`poll`),
/// `TB_TIMEOUT_INFINITE` waits forever (`wait`), anything else waits that
/// long (`wait_for`).
fn recv_within<S, T>(
    timeout_ns: u64,
    from: S,
    poll: fn(S) -> Result<T, TryRecvError>,
    wait: fn(S) -> Result<T, RecvError>,
    wait_for: fn(S, Duration) -> Result<T, RecvError>,
) -> Res<T> {
    Ok(match timeout_ns {
        0 => poll(from)?,
        TB_TIMEOUT_INFINITE => wait(from)?,
        ns => wait_for(from, Duration::from_nanos(ns))?,
    })
}

/// Clears an out-handle before anything can fail.
///
/// # Safety
/// `out` is NULL or valid for writes.
pub(crate) unsafe fn clear_out<T>(out: *mut *mut T) -> Res {
    need(out, "out")?;
    // SAFETY: non-NULL and writable (caller's promise).
    unsafe { out.write(ptr::null_mut()) };
    Ok(())
}

// ---------------------------------------------------------------- errors ---

/// The message of the last failed call on this thread ("" if none). The
/// string stays valid until the next failing call on this thread. Successful
/// calls leave it unchanged.
#[no_mangle]
pub extern "C" fn tb_last_error_message() -> *const c_char {
    std::panic::catch_unwind(last_error_ptr).unwrap_or(c"".as_ptr())
}

/// A static name for a status code (`"TB_ERR_TIMEOUT"`, ...).
#[no_mangle]
pub extern "C" fn tb_status_str(status: c_int) -> *const c_char {
    std::panic::catch_unwind(|| status_name(status).as_ptr()).unwrap_or(c"".as_ptr())
}

/// The library version (`"0.1.0"`).
#[no_mangle]
pub extern "C" fn tb_version() -> *const c_char {
    c"0.1.0".as_ptr()
}

// ---------------------------------------------------------------- client ---

/// Connects to the broker at `socket_or_null` (NULL: `$TENSORBUS_SOCKET` or
/// the default path) as `name` (shown by `tensorbus stat`).
///
/// # Safety
/// Strings are NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_client_connect(
    socket_or_null: *const c_char,
    name: *const c_char,
    out: *mut *mut tb_client,
) -> tb_status {
    guard(|| {
        // SAFETY: forwarded caller promises (see the function's contract).
        unsafe { clear_out(out) }?;
        // SAFETY: as above.
        let name = unsafe { text(name, "name") }?;
        let socket = if socket_or_null.is_null() {
            None
        } else {
            // SAFETY: as above.
            Some(Path::new(unsafe { text(socket_or_null, "socket") }?))
        };
        let client = Client::connect_to(socket, name)?;
        let shell = register(client_shell(client));
        // SAFETY: checked non-NULL and writable by `clear_out`.
        unsafe { out.write(shell) };
        Ok(())
    })
}

/// Closes a client. Fails with `TB_ERR_BUSY` while producers, consumers or
/// stages opened from it are still open (tensors of closed handles do not
/// count: they outlive their client too).
///
/// # Safety
/// No other thread may be using `client` during this call.
#[no_mangle]
pub unsafe extern "C" fn tb_client_close(client: *mut tb_client) -> tb_status {
    // SAFETY: the registry checks `client`; the caller uses it on one thread.
    guard(|| unsafe { close(client) })
}

/// This client's id at the broker (stored as the producer id of every tensor it publishes).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_client_id(client: *const tb_client, out: *mut u32) -> tb_status {
    guard(|| {
        need(out, "out")?;
        // SAFETY: checked by the registry; the caller keeps it open.
        let (_, c) = unsafe { live_inner(client) }?;
        // SAFETY: non-NULL (checked) and writable (caller's promise).
        unsafe { put(out, c.id()) };
        Ok(())
    })
}

/// Removes a channel that was created at run time (by a producer or
/// consumer with `create`, or `tensorbus pub --create`), so that it no
/// longer counts toward the broker's `limits.max_channels`; the tensors its
/// history kept are released. `TB_ERR_NO_CHANNEL` if there is no such
/// channel, `TB_ERR_BUSY` while any producer, consumer, stage or waiting
/// consumer (of any process) uses it, `TB_ERR_PERMISSION_DENIED` for a
/// channel the broker config declares (remove it there), and
/// `TB_ERR_INVALID_ARGUMENT` for any other refusal.
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `client` is not closed during the call.
#[no_mangle]
pub unsafe extern "C" fn tb_channel_remove(
    client: *mut tb_client,
    channel: *const c_char,
) -> tb_status {
    guard(|| {
        // SAFETY: checked by the registry; the caller keeps it open.
        let (_, c) = unsafe { live_inner(client) }?;
        // SAFETY: NULL or NUL-terminated (caller's promise).
        let channel = unsafe { text(channel, "channel") }?;
        Ok(c.remove_channel(channel)?)
    })
}

// -------------------------------------------------------------- producer ---

/// Opens a producer on an existing channel (`TB_ERR_NO_CHANNEL` if there
/// is none; [`tb_producer_open_with`] can create it).
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_producer_open(
    client: *mut tb_client,
    channel: *const c_char,
    out: *mut *mut tb_producer,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { tb_producer_open_with(client, channel, ptr::null(), out) }
}

/// Opens a producer with options (`options_or_null` NULL: as
/// [`tb_producer_open`]). With `options.create` set, a channel that does
/// not exist yet is created at run time from that spec (mode, pools,
/// default depth and policy, history; the spec is not kept); an existing
/// one is opened as it is. Consumers waiting for the channel
/// (`tb_consumer_open_wait`) receive from the first tensor on. A bad spec
/// (unknown pool, history on a work queue or above the ring capacity) is
/// `TB_ERR_INVALID_ARGUMENT`; the broker's channel limit
/// `TB_ERR_LIMIT_REACHED`. Remove such a channel with [`tb_channel_remove`].
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `options_or_null` is NULL or a
/// filled `tb_producer_options` (its `create` NULL or a filled
/// `tb_channel_spec`); `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_producer_open_with(
    client: *mut tb_client,
    channel: *const c_char,
    options_or_null: *const tb_producer_options,
    out: *mut *mut tb_producer,
) -> tb_status {
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let channel = unsafe { text(channel, "channel") }?;
            let mut opts = ProducerOptions::default();
            // SAFETY: NULL or filled (caller's promise).
            if let Some(o) = unsafe { read_versioned(options_or_null) }? {
                // SAFETY: as above.
                if let Some(spec) = unsafe { channel_spec(o.create) }? {
                    opts = opts.create(spec);
                }
            }
            Ok(c.producer_with(channel, opts)?)
        };
        // SAFETY: forwarded caller promises.
        unsafe { open(client, out, make) }
    })
}

/// Closes a producer. Its loans stay valid: publishing one still works
/// (the producer's broker handle closes when its last loan ends).
///
/// # Safety
/// No other thread may be using `producer` during this call.
#[no_mangle]
pub unsafe extern "C" fn tb_producer_close(producer: *mut tb_producer) -> tb_status {
    // SAFETY: the registry checks `producer`; the caller uses it on one thread.
    guard(|| unsafe { close(producer) })
}

/// Loans a slot for a C-contiguous tensor of `ndim` extents `shape` and
/// element type `dtype`, and returns a writable tensor. Fails at once with
/// `TB_ERR_POOL_EXHAUSTED` when every fitting slot is held. A producer may
/// have several loans at a time (each holds one slot until it is published
/// or released). Extents above `UINT32_MAX` (the header's per-axis limit)
/// or more than `TB_MAX_DIMS` of them are `TB_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `shape` points to `ndim` values (or is NULL when `ndim` is 0); `out` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_loan(
    producer: *mut tb_producer,
    dtype: tb_dtype,
    ndim: usize,
    shape: *const usize,
    out: *mut *mut tb_tensor,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { tb_loan_timeout(producer, dtype, ndim, shape, 0, out) }
}

/// Like [`tb_loan`], but waits up to `timeout_ns` (`TB_TIMEOUT_INFINITE`:
/// forever) for a slot to be freed; `TB_ERR_TIMEOUT` if none was.
///
/// # Safety
/// As for [`tb_loan`].
#[no_mangle]
pub unsafe extern "C" fn tb_loan_timeout(
    producer: *mut tb_producer,
    dtype: tb_dtype,
    ndim: usize,
    shape: *const usize,
    timeout_ns: u64,
    out: *mut *mut tb_tensor,
) -> tb_status {
    guard(|| {
        let take = |p: &Producer| {
            let dtype = self::dtype(dtype)?;
            // SAFETY: `ndim` readable values or NULL (caller's promise).
            let (dims, ndim) = unsafe { extents(ndim, shape) }?;
            let shape = &dims[..ndim];
            let loan = match timeout_ns {
                0 => p.loan(shape, dtype),
                t => p.loan_timeout(shape, dtype, Duration::from_nanos(t)),
            }?;
            Ok(View::Loan(loan))
        };
        // SAFETY: forwarded caller promises.
        unsafe { lend(producer, out, take) }
    })
}

/// Publishes a loaned tensor to the channel's subscribers and ends the loan
/// (also after its producer was closed); the handle is consumed whatever
/// the outcome. `delivered_or_null` receives how many subscribers got it.
///
/// # Safety
/// `delivered_or_null` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_publish(
    tensor: *mut tb_tensor,
    delivered_or_null: *mut u32,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    guard(|| unsafe {
        send(
            tensor,
            delivered_or_null,
            false,
            "tb_publish takes a loaned tensor (use tb_forward for staged, tb_release for received tensors)",
        )
    })
}

// -------------------------------------------------------------- consumer ---

/// Subscribes to an existing channel with `policy` (`TB_POLICY_DEFAULT`: the
/// channel's) and ring `depth` (0: the channel's default);
/// `TB_ERR_NO_CHANNEL` if there is none (see [`tb_consumer_open_wait`]).
/// Receives report `TB_END_OF_STREAM` (opt out with
/// [`tb_consumer_open_with`] and `TB_CONSUMER_NO_END_OF_STREAM`).
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_consumer_open(
    client: *mut tb_client,
    channel: *const c_char,
    policy: tb_policy,
    depth: u32,
    out: *mut *mut tb_consumer,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { tb_consumer_open_wait(client, channel, policy, depth, 0, out) }
}

/// Like [`tb_consumer_open`], but waits up to `timeout_ns` for a channel
/// that does not exist yet (`TB_TIMEOUT_INFINITE`: forever; 0: not at all,
/// `TB_ERR_NO_CHANNEL` at once), so a consumer may start before the
/// producer that creates the channel (`tb_producer_open_with` and
/// `create`, or `tensorbus pub --create`). The subscription is registered
/// at once: it receives every tensor from the channel's first on. Returns
/// when the channel exists, or `TB_ERR_TIMEOUT` when it did not appear in
/// time (nothing is left open, `*out` is NULL). The calling thread sleeps
/// meanwhile (it polls the broker, at most every 50 ms; the wait cannot be
/// cancelled, so give a finite timeout where it must end); other threads
/// may use the client meanwhile.
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_consumer_open_wait(
    client: *mut tb_client,
    channel: *const c_char,
    policy: tb_policy,
    depth: u32,
    timeout_ns: u64,
    out: *mut *mut tb_consumer,
) -> tb_status {
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let channel = unsafe { text(channel, "channel") }?;
            let opts = waiting(consumer_opts(policy, depth, false)?, timeout_ns);
            Ok(c.consumer_with(channel, opts)?)
        };
        // SAFETY: forwarded caller promises.
        unsafe { open(client, out, make) }
    })
}

/// Subscribes with options (`options_or_null` NULL: as [`tb_consumer_open`]):
/// policy, depth, waiting for a missing channel (`wait_channel_ns`, as
/// [`tb_consumer_open_wait`]), creating it (`create`), and
/// `TB_CONSUMER_NO_END_OF_STREAM`. Unknown flags, a non-zero `reserved`
/// or a bad `struct_size` are `TB_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `options_or_null` is NULL or a
/// filled `tb_consumer_options` (its `create` NULL or a filled
/// `tb_channel_spec`); `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_consumer_open_with(
    client: *mut tb_client,
    channel: *const c_char,
    options_or_null: *const tb_consumer_options,
    out: *mut *mut tb_consumer,
) -> tb_status {
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let channel = unsafe { text(channel, "channel") }?;
            // SAFETY: NULL or filled (caller's promise).
            let opts = unsafe { consumer_options(options_or_null, false) }?;
            Ok(c.consumer_with(channel, opts)?)
        };
        // SAFETY: forwarded caller promises.
        unsafe { open(client, out, make) }
    })
}

/// Closes a consumer. Tensors it received stay valid until released; the
/// subscription leaves its channel at once (nothing more is delivered to it;
/// what was queued for it is released, or handed to the other workers of a
/// work queue).
///
/// # Safety
/// No other thread may be using `consumer` during this call.
#[no_mangle]
pub unsafe extern "C" fn tb_consumer_close(consumer: *mut tb_consumer) -> tb_status {
    // SAFETY: the registry checks `consumer`; the caller uses it on one thread.
    guard(|| unsafe { close(consumer) })
}

/// Tensors producers dropped for this subscriber since it opened
/// (`TB_POLICY_DROP_OLDEST`, `_DROP_NEWEST`, `_LATEST`; always 0 under
/// block): the counter `tensorbus stat` shows, one atomic load.
///
/// # Safety
/// `out` is NULL or writable; `consumer` is not closed during the call.
#[no_mangle]
pub unsafe extern "C" fn tb_consumer_dropped(
    consumer: *const tb_consumer,
    out: *mut u64,
) -> tb_status {
    guard(|| {
        need(out, "out")?;
        // SAFETY: checked by the registry; the caller keeps it open.
        let (_, c) = unsafe { live_inner(consumer) }?;
        // SAFETY: non-NULL (checked) and writable (caller's promise).
        unsafe { put(out, c.dropped()) };
        Ok(())
    })
}

/// Receives the next tensor: a read-only view of the bytes the producer
/// wrote. `timeout_ns` 0 polls, `TB_TIMEOUT_INFINITE` waits forever;
/// `TB_ERR_TIMEOUT` if nothing arrived. Release it with [`tb_release`].
/// `TB_END_OF_STREAM` (at once, also from a wait) once the channel's last
/// producer closed cleanly and everything queued for this consumer was
/// received, unless it was opened with `TB_CONSUMER_NO_END_OF_STREAM`; a
/// producer that opens later starts a new stream.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_recv(
    consumer: *mut tb_consumer,
    timeout_ns: u64,
    out: *mut *mut tb_tensor,
) -> tb_status {
    guard(|| {
        let take = |c: &Consumer| {
            Ok(View::Recv(recv_within(
                timeout_ns,
                c,
                Consumer::try_recv,
                Consumer::recv,
                Consumer::recv_timeout,
            )?))
        };
        // SAFETY: forwarded caller promises.
        unsafe { lend(consumer, out, take) }
    })
}

/// Releases a tensor: a received one frees its hold on the slot, a loan is
/// given back unpublished, a staged one is given back unforwarded. Releasing
/// twice returns `TB_ERR_INVALID_ARGUMENT` ("tensor already released").
///
/// # Safety
/// No other thread may be using `tensor` during this call.
#[no_mangle]
pub unsafe extern "C" fn tb_release(tensor: *mut tb_tensor) -> tb_status {
    guard(|| {
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        drop(unsafe { take_view(tensor, |_| Ok(())) }?);
        Ok(())
    })
}

// ----------------------------------------------------------------- stage ---

/// Opens a stage: an exclusive, writable subscription to the work-queue
/// channel `input` (lossless) plus a producer on `output`.
///
/// # Safety
/// Strings are NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_stage_open(
    client: *mut tb_client,
    input: *const c_char,
    output: *const c_char,
    out: *mut *mut tb_stage,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { tb_stage_open_with(client, input, output, ptr::null(), out) }
}

/// Opens a stage with options for its input subscription
/// (`input_options_or_null` NULL: as [`tb_stage_open`]; see
/// [`tb_consumer_open_with`]): `wait_channel_ns` waits for the input
/// channel, `create` creates it (a work queue), `TB_CONSUMER_NO_END_OF_STREAM`
/// keeps [`tb_recv_mut`] from reporting end of stream. The output channel
/// must exist (it is opened, without waiting, once the input is). While the
/// stage is open or one of its staged tensors lives it is a producer of
/// `output`: closing it ends the output's stream when it was the last one.
///
/// # Safety
/// Strings are NULL or NUL-terminated; `input_options_or_null` is NULL or
/// a filled `tb_consumer_options`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_stage_open_with(
    client: *mut tb_client,
    input: *const c_char,
    output: *const c_char,
    input_options_or_null: *const tb_consumer_options,
    out: *mut *mut tb_stage,
) -> tb_status {
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let input = unsafe { text(input, "input") }?;
            // SAFETY: as above.
            let output = unsafe { text(output, "output") }?;
            // SAFETY: NULL or filled (caller's promise).
            let opts = unsafe { consumer_options(input_options_or_null, true) }?;
            Ok(c.stage_with(input, output, opts)?)
        };
        // SAFETY: forwarded caller promises.
        unsafe { open(client, out, make) }
    })
}

/// Closes a stage. Its staged tensors stay valid (forwarding one still
/// works); its input subscription leaves the work queue at once.
///
/// # Safety
/// No other thread may be using `stage` during this call.
#[no_mangle]
pub unsafe extern "C" fn tb_stage_close(stage: *mut tb_stage) -> tb_status {
    // SAFETY: the registry checks `stage`; the caller uses it on one thread.
    guard(|| unsafe { close(stage) })
}

/// Takes the next input tensor exclusively: its bytes are writable in place
/// (`tb_tensor_data`). Forward it with [`tb_forward`] or give it back with
/// [`tb_release`]. A stage may hold several tensors at a time. Timeouts as
/// for [`tb_recv`]; `TB_END_OF_STREAM` once the input's last producer
/// closed cleanly and the stage's queue is drained (unless its input was
/// opened with `TB_CONSUMER_NO_END_OF_STREAM`).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_recv_mut(
    stage: *mut tb_stage,
    timeout_ns: u64,
    out: *mut *mut tb_tensor,
) -> tb_status {
    guard(|| {
        let take = |s: &Stage| {
            Ok(View::Staged(recv_within(
                timeout_ns,
                s,
                Stage::try_recv_mut,
                Stage::recv_mut,
                Stage::recv_mut_timeout,
            )?))
        };
        // SAFETY: forwarded caller promises.
        unsafe { lend(stage, out, take) }
    })
}

/// Forwards a staged tensor — the very same slot, no copy — on the stage's
/// output channel (also after the stage was closed). The handle is consumed
/// whatever the outcome.
///
/// # Safety
/// `delivered_or_null` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_forward(
    tensor: *mut tb_tensor,
    delivered_or_null: *mut u32,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    guard(|| unsafe {
        send(
            tensor,
            delivered_or_null,
            true,
            "tb_forward takes a tensor from tb_recv_mut (use tb_publish for loans)",
        )
    })
}

// ---------------------------------------------------------------- tensor ---

/// The writable bytes of a loaned or staged tensor. Received tensors are
/// read-only: they return `TB_ERR_READ_ONLY` (use [`tb_tensor_const_data`]).
/// The pointer is valid until the tensor is published, forwarded or released.
/// On any error `*data` is set to NULL and `*nbytes_or_null` to 0, like the
/// out-handles of the other calls.
///
/// # Safety
/// `data` is NULL or writable; `nbytes_or_null` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_data(
    tensor: *mut tb_tensor,
    data: *mut *mut c_void,
    nbytes_or_null: *mut usize,
) -> tb_status {
    guard(|| {
        need(data, "data")?;
        // SAFETY: `data` is non-NULL (checked) and writable, `nbytes_or_null`
        // NULL or writable (caller's promise): cleared first, so an error
        // leaves NULL / 0 behind.
        unsafe {
            put(data, std::ptr::null_mut());
            put(nbytes_or_null, 0);
        }
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        let (p, n) = unsafe {
            with_view(tensor, |v| {
                v.fork_check()?;
                match v {
                    View::Loan(t) => Ok((t.as_mut_ptr(), t.len())),
                    View::Staged(t) => Ok((t.as_mut_ptr(), t.len())),
                    View::Recv(_) => Err(err(
                        TB_ERR_READ_ONLY,
                        "a received tensor is read-only (its pool is mapped PROT_READ); use tb_tensor_const_data",
                    )),
                }
            })
        }?;
        // SAFETY: non-NULL / NULL-or-writable (caller's promise).
        unsafe {
            put(data, p.cast::<c_void>());
            put(nbytes_or_null, n);
        }
        Ok(())
    })
}

/// The bytes of any tensor, read-only. Valid until the tensor is published,
/// forwarded or released.
///
/// # Safety
/// `data` is NULL or writable; `nbytes_or_null` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_const_data(
    tensor: *const tb_tensor,
    data: *mut *const c_void,
    nbytes_or_null: *mut usize,
) -> tb_status {
    guard(|| {
        need(data, "data")?;
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        let (p, n) = unsafe {
            with_view(tensor, |v| {
                v.fork_check()?;
                let b = v.bytes();
                Ok((b.as_ptr(), b.len()))
            })
        }?;
        // SAFETY: non-NULL / NULL-or-writable (caller's promise).
        unsafe {
            put(data, p.cast::<c_void>());
            put(nbytes_or_null, n);
        }
        Ok(())
    })
}

/// The tensor's extents: `*ndim` receives the number of dimensions and
/// `shape` (room for `capacity` values; NULL when `capacity` is 0) the
/// extents. `TB_ERR_INVALID_ARGUMENT` if `capacity < ndim` (`*ndim` is still set).
///
/// # Safety
/// `ndim` is NULL or writable; `shape` has room for `capacity` values.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_shape(
    tensor: *const tb_tensor,
    ndim: *mut usize,
    shape: *mut usize,
    capacity: usize,
) -> tb_status {
    guard(|| {
        need(ndim, "ndim")?;
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        let (n, dims) = unsafe {
            with_view(tensor, |v| {
                let mut dims = [0usize; TB_MAX_DIMS];
                let s = v.meta().shape();
                for (d, &x) in dims.iter_mut().zip(s) {
                    *d = x as usize;
                }
                Ok((s.len(), dims))
            })
        }?;
        // SAFETY: non-NULL and writable (caller's promise).
        unsafe { put(ndim, n) };
        if capacity < n {
            return Err(invalid(format!(
                "shape capacity {capacity} is less than ndim {n}"
            )));
        }
        if n > 0 {
            need(shape, "shape")?;
            // SAFETY: room for `capacity >= n` values (caller's promise).
            unsafe { ptr::copy_nonoverlapping(dims.as_ptr(), shape, n) };
        }
        Ok(())
    })
}

/// The tensor's element type (`TB_DTYPE_*`).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_dtype(
    tensor: *const tb_tensor,
    out: *mut tb_dtype,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { meta_field(tensor, out, |m| dtype_code(m.dtype)) }
}

/// The producer's sequence number (0, 1, 2, ... per producer; a loan gets
/// its number at publish, so a loan reports 0).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_seq(tensor: *const tb_tensor, out: *mut u64) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { meta_field(tensor, out, |m| m.seq) }
}

/// CLOCK_MONOTONIC nanoseconds at publish (0 for a loan).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_timestamp_ns(
    tensor: *const tb_tensor,
    out: *mut u64,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { meta_field(tensor, out, |m| m.timestamp_ns) }
}

/// The client id of the publishing process (see [`tb_client_id`]).
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_producer_id(
    tensor: *const tb_tensor,
    out: *mut u32,
) -> tb_status {
    // SAFETY: forwarded caller promises.
    unsafe { meta_field(tensor, out, |m| m.producer) }
}

/// Reads one metadata field into `out`.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn meta_field<T>(
    tensor: *const tb_tensor,
    out: *mut T,
    f: impl FnOnce(&TensorMeta) -> T,
) -> tb_status {
    guard(|| {
        need(out, "out")?;
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        let v = unsafe { with_view(tensor, |v| Ok(f(v.meta()))) }?;
        // SAFETY: non-NULL and writable (caller's promise).
        unsafe { put(out, v) };
        Ok(())
    })
}

/// The user header (up to `TB_USER_HEADER_LEN` bytes of the producer's own
/// metadata). The pointer is valid until the tensor is released or the
/// header is set again.
///
/// # Safety
/// `data` and `len_or_null` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_user_header(
    tensor: *const tb_tensor,
    data: *mut *const u8,
    len_or_null: *mut usize,
) -> tb_status {
    guard(|| {
        need(data, "data")?;
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        let (p, n) = unsafe {
            with_view(tensor, |v| {
                let h = v.meta().user_header();
                Ok((h.as_ptr(), h.len()))
            })
        }?;
        // SAFETY: NULL or writable (caller's promise).
        unsafe {
            put(data, p);
            put(len_or_null, n);
        }
        Ok(())
    })
}

/// Sets the user header of a loaned or staged tensor (at most
/// `TB_USER_HEADER_LEN` bytes; `len` 0 clears it).
///
/// # Safety
/// `data` points to `len` readable bytes (or is NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn tb_tensor_set_user_header(
    tensor: *mut tb_tensor,
    data: *const c_void,
    len: usize,
) -> tb_status {
    guard(|| {
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            need(data, "data")?;
            if len > TB_USER_HEADER_LEN {
                return Err(invalid(format!(
                    "user header of {len} bytes exceeds TB_USER_HEADER_LEN ({TB_USER_HEADER_LEN})"
                )));
            }
            // SAFETY: `len` readable bytes (caller's promise).
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
        };
        // SAFETY: the registry checks `tensor`; the caller uses it on one thread.
        unsafe {
            with_view(tensor, |v| match v {
                View::Loan(t) => t.set_user_header(bytes).map_err(|e| invalid(e.to_string())),
                View::Staged(t) => t.set_user_header(bytes).map_err(|e| invalid(e.to_string())),
                View::Recv(_) => Err(err(
                    TB_ERR_READ_ONLY,
                    "a received tensor's user header is read-only",
                )),
            })
        }
    })
}

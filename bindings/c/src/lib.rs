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
//!   changes nothing (the only call that returns `TB_ERR_BUSY`).
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
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize};
use std::time::Duration;
use tensorbus::error::{LoanError, RecvError, ShapeError, TryRecvError};
use tensorbus::{
    Client, Consumer, ConsumerOptions, DType, Policy, Producer, Published, Stage, StagedTensor,
    Tensor, TensorMeta, TensorMut, TensorView,
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

// -------------------------------------------------------------- producer ---

/// Opens a producer on an existing channel.
///
/// # Safety
/// `channel` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tb_producer_open(
    client: *mut tb_client,
    channel: *const c_char,
    out: *mut *mut tb_producer,
) -> tb_status {
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let channel = unsafe { text(channel, "channel") }?;
            Ok(c.producer(channel)?)
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

/// Subscribes to a channel with `policy` (`TB_POLICY_DEFAULT`: the
/// channel's) and ring `depth` (0: the channel's default).
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
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let channel = unsafe { text(channel, "channel") }?;
            let mut opts = ConsumerOptions::default();
            if let Some(p) = self::policy(policy)? {
                opts = opts.policy(p);
            }
            if depth > 0 {
                opts = opts.depth(depth);
            }
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
    guard(|| {
        let make = |c: &Client| {
            // SAFETY: NULL or NUL-terminated (caller's promise).
            let input = unsafe { text(input, "input") }?;
            // SAFETY: as above.
            let output = unsafe { text(output, "output") }?;
            Ok(c.stage(input, output)?)
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
/// [`tb_release`]. A stage may hold several tensors at a time.
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

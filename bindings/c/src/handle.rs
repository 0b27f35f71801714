//! What every handle kind shares: registry lookup, boxing, closing and
//! opening a handle from a client.
//!
//! A handle shell owns its Rust object (`Client`, `Producer`, `Consumer`,
//! `Stage`) through a boxed pointer that close swaps out and drops. Tensors
//! do not borrow that object (each owns what it needs), so only a client
//! refuses to close: while handles opened from it are open, since each of
//! them points back at it.

use crate::registry::{self, Kind};
use crate::status::{err, Res, TB_ERR_BUSY};
use crate::{free_shell, tb_client, tb_consumer, tb_producer, tb_stage, tb_tensor};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use tensorbus::{Client, Consumer, Producer, Stage};

/// A handle shell type and its registry kind.
pub(crate) trait Shell: Sized {
    const KIND: Kind;
}

impl Shell for tb_tensor {
    const KIND: Kind = Kind::Tensor;
}

/// A handle that owns a boxed Rust object, dropped on close.
pub(crate) trait Owner: Shell {
    type Inner;
    /// The boxed Rust object (NULL once closed).
    fn inner(&self) -> &AtomicPtr<Self::Inner>;
    /// The client this handle was opened from (NULL for a client).
    fn parent(&self) -> *const tb_client;
    /// Whether the handle may close now (a client: `TB_ERR_BUSY` while it
    /// has open handles).
    fn may_close(&self) -> Res {
        Ok(())
    }
}

/// A handle opened from a client.
pub(crate) trait Child: Owner {
    /// A fresh shell around `inner`, opened from `client`.
    fn new(client: *const tb_client, inner: Self::Inner) -> Self;
}

/// The fields of a producer, consumer or stage shell.
pub(crate) struct Opened<T> {
    client: *const tb_client,
    inner: AtomicPtr<T>,
}

impl Shell for tb_client {
    const KIND: Kind = Kind::Client;
}

impl Owner for tb_client {
    type Inner = Client;
    fn inner(&self) -> &AtomicPtr<Client> {
        &self.client
    }
    fn parent(&self) -> *const tb_client {
        ptr::null()
    }
    fn may_close(&self) -> Res {
        match self.children.load(Ordering::Acquire) {
            0 => Ok(()),
            open => Err(err(
                TB_ERR_BUSY,
                format!("client still has {open} open handle(s); close its producers, consumers and stages first"),
            )),
        }
    }
}

/// Implements the shell traits of a producer, consumer or stage shell
/// (`$shell` wraps an `Opened<$inner>`; `Kind::$inner` is its kind).
macro_rules! child_shell {
    ($shell:ident, $inner:ident) => {
        impl Shell for $shell {
            const KIND: Kind = Kind::$inner;
        }
        impl Owner for $shell {
            type Inner = $inner;
            fn inner(&self) -> &AtomicPtr<$inner> {
                &self.0.inner
            }
            fn parent(&self) -> *const tb_client {
                self.0.client
            }
        }
        impl Child for $shell {
            fn new(client: *const tb_client, inner: $inner) -> Self {
                $shell(Opened {
                    client,
                    inner: AtomicPtr::new(Box::into_raw(Box::new(inner))),
                })
            }
        }
    };
}

child_shell!(tb_producer, Producer);
child_shell!(tb_consumer, Consumer);
child_shell!(tb_stage, Stage);

/// A fresh client shell.
pub(crate) fn client_shell(client: Client) -> tb_client {
    tb_client {
        client: AtomicPtr::new(Box::into_raw(Box::new(client))),
        children: AtomicUsize::new(0),
    }
}

/// Boxes a handle shell and records it as live.
pub(crate) fn register<T: Shell>(shell: T) -> *mut T {
    let p = Box::into_raw(Box::new(shell));
    registry::lock().insert(p as usize, T::KIND);
    p
}

/// Returns a reference to a live handle, or an error if `p` is not one.
///
/// # Safety
/// The handle must not be closed by another thread while the reference is used.
pub(crate) unsafe fn live<'a, T: Shell>(p: *const T) -> Res<&'a T> {
    registry::lock().check(p as usize, T::KIND)?;
    // SAFETY: the registry says `p` is a live handle of this kind, i.e. a
    // `Box<T>` that has not been retired; the caller keeps it from being
    // closed meanwhile.
    Ok(unsafe { &*p })
}

/// Looks up a live handle and returns it with its Rust object.
///
/// # Safety
/// See [`live`].
pub(crate) unsafe fn live_inner<'a, T: Owner>(p: *const T) -> Res<(&'a T, &'a T::Inner)> {
    // SAFETY: forwarded contract.
    let shell = unsafe { live(p) }?;
    // SAFETY: a live handle's box is set (from `Box::into_raw`) until close,
    // which the caller excludes; the Rust objects are `Sync`, so other
    // threads may hold shared references at the same time.
    Ok((shell, unsafe { &*shell.inner().load(Ordering::Acquire) }))
}

/// Closes a handle: retires the shell, drops its Rust object (a consumer or
/// stage whose tensors are alive detaches from its channel then; the
/// tensors keep what they need) and tells the client it was opened from. A
/// client with open handles refuses (`TB_ERR_BUSY`, nothing changes).
///
/// # Safety
/// No other thread may be using `p` during this call.
pub(crate) unsafe fn close<T: Owner>(p: *mut T) -> Res {
    let mut reg = registry::lock();
    reg.check(p as usize, T::KIND)?;
    // SAFETY: live shell (checked under the lock we hold).
    let shell = unsafe { &*p };
    shell.may_close()?;
    let parent = shell.parent();
    let inner = shell.inner().swap(ptr::null_mut(), Ordering::AcqRel);
    reg.retire(p as usize, T::KIND, free_shell);
    drop(reg);
    if !inner.is_null() {
        // SAFETY: from `Box::into_raw` when the handle was opened and
        // swapped out once; no call uses it any more (the shell is retired
        // and the caller runs no other call on it meanwhile).
        drop(unsafe { Box::from_raw(inner) });
    }
    if !parent.is_null() {
        // SAFETY: a client cannot be closed while it has open handles, so the
        // one this handle was opened from is still open.
        unsafe { (*parent).children.fetch_sub(1, Ordering::AcqRel) };
    }
    Ok(())
}

/// Opens a handle from a live client: clears `out`, looks the client up,
/// runs `make` on it and hands the registered shell out through `out`.
///
/// # Safety
/// `out` is NULL or writable; the caller keeps `client` open meanwhile.
pub(crate) unsafe fn open<T: Child>(
    client: *mut tb_client,
    out: *mut *mut T,
    make: impl FnOnce(&Client) -> Res<T::Inner>,
) -> Res {
    // SAFETY: forwarded caller promises.
    unsafe { crate::clear_out(out) }?;
    // SAFETY: as above.
    let (shell, c) = unsafe { live_inner(client) }?;
    let inner = make(c)?;
    shell.children.fetch_add(1, Ordering::AcqRel);
    let p = register(T::new(client, inner));
    // SAFETY: checked non-NULL and writable by `clear_out`.
    unsafe { out.write(p) };
    Ok(())
}

//! What every handle kind shares: registry lookup, boxing, closing (with the
//! live-children check) and opening a handle from a client.

use crate::registry::{self, Kind};
use crate::status::{err, Res, TB_ERR_BUSY};
use crate::{free_shell, tb_client, tb_consumer, tb_producer, tb_stage, tb_tensor};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use tensorbus::{Client, Consumer, Producer, Stage};

/// A handle shell type and its registry kind.
pub(crate) trait Shell: Sized {
    const KIND: Kind;
}

impl Shell for tb_tensor {
    const KIND: Kind = Kind::Tensor;
}

/// A handle that owns a boxed Rust object (freed on close) and refuses to
/// close while something borrows it.
pub(crate) trait Owner: Shell {
    type Inner;
    /// The boxed Rust object (NULL once closed).
    fn inner(&self) -> &AtomicPtr<Self::Inner>;
    /// The client this handle was opened from (NULL for a client).
    fn parent(&self) -> *const tb_client;
    /// `TB_ERR_BUSY` (with the kind's own message) while something borrows it.
    fn idle(&self) -> Res;
}

/// A handle opened from a client, whose tensors borrow it.
pub(crate) trait Child: Owner {
    /// A fresh shell around `inner`, opened from `client`.
    fn new(client: *const tb_client, inner: Self::Inner) -> Self;
    /// Tells the handle that one of its tensors ended.
    fn tensor_done(&self);
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
    fn idle(&self) -> Res {
        match self.children.load(Ordering::Acquire) {
            0 => Ok(()),
            open => Err(err(
                TB_ERR_BUSY,
                format!("client still has {open} open handle(s); close its producers, consumers and stages first"),
            )),
        }
    }
}

impl Shell for tb_producer {
    const KIND: Kind = Kind::Producer;
}

impl Owner for tb_producer {
    type Inner = Producer;
    fn inner(&self) -> &AtomicPtr<Producer> {
        &self.producer
    }
    fn parent(&self) -> *const tb_client {
        self.client
    }
    fn idle(&self) -> Res {
        if self.loaned.load(Ordering::Acquire) {
            return Err(err(
                TB_ERR_BUSY,
                "producer has a loaned tensor; publish or release it first",
            ));
        }
        Ok(())
    }
}

impl Child for tb_producer {
    fn new(client: *const tb_client, inner: Producer) -> Self {
        tb_producer {
            client,
            producer: AtomicPtr::new(Box::into_raw(Box::new(inner))),
            loaned: AtomicBool::new(false),
        }
    }
    fn tensor_done(&self) {
        self.loaned.store(false, Ordering::Release);
    }
}

impl Shell for tb_consumer {
    const KIND: Kind = Kind::Consumer;
}

impl Owner for tb_consumer {
    type Inner = Consumer;
    fn inner(&self) -> &AtomicPtr<Consumer> {
        &self.consumer
    }
    fn parent(&self) -> *const tb_client {
        self.client
    }
    fn idle(&self) -> Res {
        match self.live.load(Ordering::Acquire) {
            0 => Ok(()),
            live => Err(err(
                TB_ERR_BUSY,
                format!("consumer still has {live} received tensor(s); tb_release them first"),
            )),
        }
    }
}

impl Child for tb_consumer {
    fn new(client: *const tb_client, inner: Consumer) -> Self {
        tb_consumer {
            client,
            consumer: AtomicPtr::new(Box::into_raw(Box::new(inner))),
            live: AtomicUsize::new(0),
        }
    }
    fn tensor_done(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shell for tb_stage {
    const KIND: Kind = Kind::Stage;
}

impl Owner for tb_stage {
    type Inner = Stage;
    fn inner(&self) -> &AtomicPtr<Stage> {
        &self.stage
    }
    fn parent(&self) -> *const tb_client {
        self.client
    }
    fn idle(&self) -> Res {
        if self.busy.load(Ordering::Acquire) {
            return Err(err(
                TB_ERR_BUSY,
                "stage holds a tensor; forward or release it first",
            ));
        }
        Ok(())
    }
}

impl Child for tb_stage {
    fn new(client: *const tb_client, inner: Stage) -> Self {
        tb_stage {
            client,
            stage: AtomicPtr::new(Box::into_raw(Box::new(inner))),
            busy: AtomicBool::new(false),
        }
    }
    fn tensor_done(&self) {
        self.busy.store(false, Ordering::Release);
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
    // SAFETY: a live handle's box is set until close, which the caller excludes.
    Ok((shell, unsafe { &*shell.inner().load(Ordering::Acquire) }))
}

/// Closes a handle: refuses while it is borrowed (`TB_ERR_BUSY`, nothing
/// changes), else retires the shell, frees its Rust object and tells the
/// client it was opened from.
///
/// # Safety
/// No other thread may be using `p` during this call.
pub(crate) unsafe fn close<T: Owner>(p: *mut T) -> Res {
    let mut reg = registry::lock();
    reg.check(p as usize, T::KIND)?;
    // SAFETY: live shell (checked under the lock we hold).
    let shell = unsafe { &*p };
    shell.idle()?;
    let parent = shell.parent();
    let inner = shell.inner().swap(ptr::null_mut(), Ordering::AcqRel);
    reg.retire(p as usize, T::KIND, free_shell);
    drop(reg);
    if !inner.is_null() {
        // SAFETY: from `Box::into_raw` when the handle was opened, swapped
        // out once, and nothing borrows it (`idle` checked above).
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

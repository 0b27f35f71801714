//! Sealed anonymous memory files (`memfd_create(2)`).
//!
//! A [`Memfd`] backs one shared-memory segment. It is created with a fixed
//! size and then sealed with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so
//! no process holding the descriptor can truncate or grow it afterwards.
//! This matters for safety: if a peer could shrink the file, every other
//! process with a mapping of it would take `SIGBUS` on its next access.
//!
//! Consumers that should only read a segment can be handed the descriptor
//! from [`Memfd::reopen_read_only`], whose open file description is
//! read-only, so `mmap(PROT_WRITE, MAP_SHARED)` on it fails with `EACCES`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use crate::{cvt, invalid_input};

/// Size of the huge pages requested by `Memfd::create(.., hugetlb: true)`.
const HUGE_2MB: usize = 2 * 1024 * 1024;

/// The seals added by [`Memfd::create`].
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// An owned memfd: an anonymous, size-sealed memory file.
///
/// ```
/// use tensorbus_shm::Memfd;
///
/// let fd = Memfd::create("example", 4096, false)?;
/// assert_eq!(fd.len()?, 4096);
/// let seals = fd.seals()?;
/// assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// Creates a memfd named `name` (visible in `/proc/PID/fd` as
    /// `memfd:NAME`), sets its size to `len` bytes and seals it against
    /// shrinking, growing and further sealing.
    ///
    /// The descriptor is close-on-exec. Where the kernel supports it
    /// (Linux 6.3+), the memfd is also created with `MFD_NOEXEC_SEAL`; on
    /// older kernels it falls back to creating it without that flag.
    ///
    /// With `hugetlb == true` the file is backed by 2 MiB huge pages
    /// (`MFD_HUGETLB | MFD_HUGE_2MB`). Then `len` must be a multiple of 2 MiB
    /// (otherwise `InvalidInput`), and creation can fail with the kernel's
    /// error (`EINVAL` when hugetlbfs is unavailable, `ENOMEM`/`ENOSPC` when
    /// no huge pages are reserved, ...); it is returned unchanged so the
    /// caller can fall back to normal pages. Some kernels do not support
    /// sealing hugetlb memfds: in that case, and only for hugetlb memfds, a
    /// failure of `F_ADD_SEALS` is ignored and the memfd is returned
    /// unsealed (check [`Memfd::seals`] if it matters). For normal memfds a
    /// sealing failure is an error.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `name` contains a NUL byte, `len` does not fit in
    /// `off_t` or (hugetlb) is not a multiple of 2 MiB; otherwise the OS
    /// error of `memfd_create`, `ftruncate` or `fcntl(F_ADD_SEALS)`.
    pub fn create(name: &str, len: usize, hugetlb: bool) -> io::Result<Memfd> {
        let cname = CString::new(name)
            .map_err(|_| invalid_input(format!("memfd name {name:?} contains a NUL byte")))?;
        let size = libc::off_t::try_from(len)
            .map_err(|_| invalid_input(format!("memfd length {len} is too large")))?;
        if hugetlb && len % HUGE_2MB != 0 {
            return Err(invalid_input(format!(
                "hugetlb memfd length {len} is not a multiple of 2 MiB"
            )));
        }

        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugetlb {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        let fd = match memfd_create(&cname, flags | libc::MFD_NOEXEC_SEAL) {
            Ok(fd) => fd,
            // Kernels before 6.3 reject the unknown MFD_NOEXEC_SEAL flag.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => memfd_create(&cname, flags)?,
            Err(e) => return Err(e),
        };

        // SAFETY: `fd` is an open descriptor owned by this function; ftruncate
        // has no memory-safety preconditions.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;

        // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of
        // ours; `fd` is open.
        let sealed = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) });
        match sealed {
            Ok(_) => {}
            // Documented: hugetlb memfds may be unsealable on some kernels.
            Err(_) if hugetlb => {}
            Err(e) => return Err(e),
        }
        Ok(Memfd { fd })
    }

    /// Wraps an existing descriptor (for example one received over a socket)
    /// without checking that it is a memfd.
    pub fn from_fd(fd: OwnedFd) -> Memfd {
        Memfd { fd }
    }

    /// Borrows the descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Returns the owned descriptor, consuming `self`.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Returns the current size of the file in bytes (`fstat` `st_size`).
    ///
    /// # Errors
    ///
    /// The OS error of `fstat`.
    pub fn len(&self) -> io::Result<usize> {
        fd_len(self.fd.as_fd())
    }

    /// Returns `true` if the file is 0 bytes long.
    ///
    /// # Errors
    ///
    /// The OS error of `fstat`.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Returns the seals of the file (`fcntl(F_GET_SEALS)`), a bit set of
    /// `libc::F_SEAL_*`.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl` (`EINVAL` if the descriptor does not support
    /// sealing).
    pub fn seals(&self) -> io::Result<i32> {
        // SAFETY: F_GET_SEALS takes no argument and touches no memory of
        // ours; the descriptor is open for the lifetime of `self`.
        cvt(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) })
    }

    /// Opens the same file again through `/proc/self/fd/N` with
    /// `O_RDONLY | O_CLOEXEC`, giving a new descriptor with its own,
    /// read-only open file description.
    ///
    /// A process that receives only this descriptor cannot create a writable
    /// shared mapping with it: `mmap(PROT_WRITE, MAP_SHARED)` fails with
    /// `EACCES`, and `write(2)` fails with `EBADF`.
    ///
    /// This protects against mistakes and against peers that play by the
    /// rules; it is not a security boundary against a hostile peer running
    /// as the same user, which can open `/proc/PID/fd/N` itself (or its own
    /// `/proc/self/fd/M` for the received descriptor) with `O_RDWR`, since
    /// memfd inodes are owned by the creating user.
    ///
    /// ```
    /// use tensorbus_shm::Memfd;
    ///
    /// let fd = Memfd::create("ro-example", 4096, false)?;
    /// let ro = fd.reopen_read_only()?;
    /// assert_eq!(tensorbus_shm::fd_len(std::os::fd::AsFd::as_fd(&ro))?, 4096);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The OS error of `open` (for example if `/proc` is not mounted).
    pub fn reopen_read_only(&self) -> io::Result<OwnedFd> {
        self.reopen(libc::O_RDONLY)
    }

    /// A new, read-write open file description of the same memory, even
    /// when this descriptor is read-only: a broker that adopts a bus is
    /// handed read-only pool descriptors by consumers and needs writable
    /// ones for producers. (The memfd's inode admits its owner to write;
    /// only the open file description was read-only.)
    ///
    /// ```
    /// use tensorbus_shm::Memfd;
    /// let fd = Memfd::create("example-rw", 4096, false)?;
    /// let ro = Memfd::from_fd(fd.reopen_read_only()?);
    /// let rw = ro.reopen_read_write()?;
    /// assert_eq!(tensorbus_shm::fd_identity(std::os::fd::AsFd::as_fd(&rw))?,
    ///            tensorbus_shm::fd_identity(fd.as_fd())?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The OS error of `open` (`EACCES` for a file of another user).
    pub fn reopen_read_write(&self) -> io::Result<OwnedFd> {
        self.reopen(libc::O_RDWR)
    }

    fn reopen(&self, access: libc::c_int) -> io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let cpath = CString::new(path).map_err(|_| invalid_input("NUL in /proc path"))?;
        // SAFETY: `cpath` is a valid NUL-terminated string that outlives the
        // call; open does not retain the pointer.
        let raw = cvt(unsafe { libc::open(cpath.as_ptr(), access | libc::O_CLOEXEC) })?;
        // SAFETY: open just returned this descriptor and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Memfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Memfd {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Memfd> for OwnedFd {
    fn from(m: Memfd) -> OwnedFd {
        m.fd
    }
}

impl From<OwnedFd> for Memfd {
    fn from(fd: OwnedFd) -> Memfd {
        Memfd { fd }
    }
}

/// Calls `memfd_create(2)` and wraps the result.
fn memfd_create(name: &CString, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // memfd_create does not retain the pointer.
    let raw = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Returns the size in bytes of the file behind `fd` (`fstat` `st_size`).
///
/// ```
/// let m = tensorbus_shm::Memfd::create("len-example", 8192, false)?;
/// assert_eq!(tensorbus_shm::fd_len(m.as_fd())?, 8192);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The OS error of `fstat`, or `InvalidData` if the reported size is
/// negative or does not fit in `usize`.
pub fn fd_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let st = fstat(fd)?;
    usize::try_from(st.st_size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file size {} out of range", st.st_size),
        )
    })
}

/// The (`st_dev`, `st_ino`) of the file behind `fd`: two descriptors of
/// one memfd have the same, descriptors of different memfds never.
///
/// # Errors
///
/// The OS error of `fstat`.
pub fn fd_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// `fstat(2)` on a borrowed descriptor.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory large enough for a `stat`; the
    // descriptor is valid for the duration of the borrow.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it fully initialised `st`.
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_sets_len_and_seals() {
        let m = Memfd::create("tb-test", 3 * 4096, false).unwrap();
        assert_eq!(m.len().unwrap(), 3 * 4096);
        let seals = m.seals().unwrap();
        assert_eq!(seals & SEALS, SEALS);
        // Sealed: cannot shrink or grow.
        // SAFETY: the descriptor is open; ftruncate touches no memory.
        let r = unsafe { libc::ftruncate(m.as_raw_fd(), 4096) };
        assert_eq!(r, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        // SAFETY: as above.
        let r = unsafe { libc::ftruncate(m.as_raw_fd(), 8 * 4096) };
        assert_eq!(r, -1);
        // Cannot add more seals (F_SEAL_SEAL).
        // SAFETY: F_ADD_SEALS takes an int and touches no memory.
        let r = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
    }

    #[test]
    fn create_is_cloexec() {
        let m = Memfd::create("tb-cloexec", 4096, false).unwrap();
        // SAFETY: F_GETFD takes no argument; the descriptor is open.
        let flags = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn nul_in_name_is_invalid_input() {
        let e = Memfd::create("a\0b", 4096, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn hugetlb_len_must_be_multiple_of_2mb() {
        let e = Memfd::create("tb-huge", 4096, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn hugetlb_either_works_or_returns_error() {
        // Huge pages may not be reserved on the test machine: both outcomes
        // are fine as long as nothing panics.
        match Memfd::create("tb-huge", HUGE_2MB, true) {
            Ok(m) => assert_eq!(m.len().unwrap(), HUGE_2MB),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }

    #[test]
    fn zero_len_is_allowed() {
        let m = Memfd::create("tb-empty", 0, false).unwrap();
        assert_eq!(m.len().unwrap(), 0);
        assert!(m.is_empty().unwrap());
    }

    #[test]
    fn reopen_read_only_rejects_writable_shared_mapping() {
        let m = Memfd::create("tb-ro", 4096, false).unwrap();
        let ro = m.reopen_read_only().unwrap();
        assert_eq!(fd_len(ro.as_fd()).unwrap(), 4096);
        // SAFETY: F_GETFL takes no argument; the descriptor is open.
        let fl = unsafe { libc::fcntl(ro.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
        assert_ne!(
            // SAFETY: F_GETFD takes no argument; the descriptor is open.
            unsafe { libc::fcntl(ro.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC,
            0
        );
        // SAFETY: mmap with a null hint creates a fresh mapping and touches no
        // existing memory; the result is checked and unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                ro.as_raw_fd(),
                0,
            )
        };
        assert_eq!(p, libc::MAP_FAILED);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EACCES)
        );
        // A read-only mapping works.
        // SAFETY: as above.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                ro.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` is the 4096-byte mapping created just above.
        unsafe { libc::munmap(p, 4096) };
    }

    #[test]
    fn from_and_into_fd_round_trip() {
        let m = Memfd::create("tb-rt", 4096, false).unwrap();
        let raw = m.as_raw_fd();
        let fd = m.into_fd();
        assert_eq!(fd.as_raw_fd(), raw);
        let m = Memfd::from_fd(fd);
        assert_eq!(m.len().unwrap(), 4096);
    }
}

//! Shared memory mappings (`mmap(2)`) of memfds, optionally aligned.
//!
//! [`Mapping::map`] maps the first `len` bytes of a file descriptor with
//! `MAP_SHARED`, read-only or read-write, at an address aligned to a
//! caller-chosen power of two (for example 2 MiB so that huge pages and
//! large DMA-friendly alignments are possible). Alignments above the page
//! size are obtained by reserving `len + align` bytes of address space with
//! an inaccessible anonymous mapping, mapping the file with `MAP_FIXED` at
//! the first aligned address inside it, and unmapping the unused head and
//! tail of the reservation.
//!
//! A [`Mapping`] unmaps itself on drop. It hands out a raw pointer only:
//! the memory is shared with other processes, which may write to it at any
//! time, so turning it into Rust references is the caller's (unsafe)
//! responsibility.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};

use crate::invalid_input;
use crate::memfd::fstat;

/// Largest alignment accepted by [`Mapping::map`] (1 GiB).
pub const MAX_ALIGN: usize = 1 << 30;

/// Access mode of a [`Mapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `PROT_READ`: writes through the mapping fault (`SIGSEGV`).
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`: requires a descriptor opened for writing.
    ReadWrite,
}

impl Access {
    fn prot(self) -> libc::c_int {
        match self {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// A shared memory mapping, unmapped on drop.
///
/// ```
/// use tensorbus_shm::{Access, Mapping, Memfd};
///
/// let fd = Memfd::create("mapping-example", 1 << 20, false)?;
/// let map = Mapping::map(fd.as_fd(), 1 << 20, Access::ReadWrite, 2 << 20)?;
/// assert_eq!(map.as_ptr() as usize % (2 << 20), 0);
/// // SAFETY (example): the mapping is 1 MiB long and writable.
/// unsafe { map.as_ptr().write(42) };
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    access: Access,
}

// SAFETY: a Mapping is a region of process memory that stays mapped until
// drop; it holds no thread-affine state, and it only exposes a raw pointer,
// so any data race on the contents is the responsibility of the (unsafe)
// code that dereferences it, exactly as for memory shared with another
// process.
unsafe impl Send for Mapping {}
// SAFETY: see the `Send` impl; `&Mapping` only gives access to the address,
// length and access mode, which are immutable.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `fd` with `MAP_SHARED` and the
    /// protection given by `access`, at an address that is a multiple of
    /// `align`.
    ///
    /// `align` must be a power of two no larger than 1 GiB ([`MAX_ALIGN`]);
    /// values up to the page size simply give page alignment. For
    /// [`Access::ReadWrite`] the descriptor must be open for writing.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `len` is 0, `align` is not a power of two or is
    /// larger than 1 GiB, or `fd` is a regular file shorter than `len`
    /// (touching pages past the end of a file raises `SIGBUS`); otherwise
    /// the OS error of `mmap` (`EACCES` for a writable mapping of a
    /// read-only descriptor, `ENOMEM`, ...).
    pub fn map(
        fd: BorrowedFd<'_>,
        len: usize,
        access: Access,
        align: usize,
    ) -> io::Result<Mapping> {
        if len == 0 {
            return Err(invalid_input("cannot map 0 bytes"));
        }
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(invalid_input(format!(
                "mapping alignment {align} is not a power of two between 1 and 1 GiB"
            )));
        }
        let st = fstat(fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            let file_len = u64::try_from(st.st_size).unwrap_or(0);
            if file_len < len as u64 {
                return Err(invalid_input(format!(
                    "cannot map {len} bytes of a file of {file_len} bytes"
                )));
            }
        }

        let page = crate::page_size();
        let map_len = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| invalid_input(format!("mapping length {len} is too large")))?;
        let prot = access.prot();

        if align <= page {
            // SAFETY: a null hint without MAP_FIXED lets the kernel choose a
            // free range, so no existing mapping is affected; the descriptor
            // is valid for the duration of the borrow.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            return Self::from_mmap_result(p, len, access);
        }

        let res_len = map_len
            .checked_add(align)
            .ok_or_else(|| invalid_input(format!("mapping length {len} is too large")))?;
        // SAFETY: a fresh anonymous PROT_NONE reservation at a kernel-chosen
        // address; no existing mapping is affected.
        let res = unsafe {
            libc::mmap(
                ptr::null_mut(),
                res_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if res == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let res_start = res as usize;
        let start = (res_start + align - 1) & !(align - 1);
        let head = start - res_start;
        // `res_start` is page aligned and `align` a multiple of the page
        // size, so `head <= align - page` and the mapping fits.
        let tail = res_len - head - map_len;

        // SAFETY: [start, start + map_len) lies inside the reservation made
        // above, which this function exclusively owns, so MAP_FIXED replaces
        // only our own PROT_NONE pages.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: unmapping the whole reservation we own; after a failed
            // MAP_FIXED the range holds at most our own pages.
            unsafe { libc::munmap(res, res_len) };
            return Err(err);
        }
        if head > 0 {
            // SAFETY: [res_start, start) is the unused head of our own
            // reservation; nothing refers to it.
            unsafe { libc::munmap(res, head) };
        }
        if tail > 0 {
            // SAFETY: [start + map_len, res_start + res_len) is the unused
            // tail of our own reservation; nothing refers to it.
            unsafe { libc::munmap((start + map_len) as *mut libc::c_void, tail) };
        }
        Self::from_mmap_result(p, len, access)
    }

    /// Creates an anonymous shared read-write mapping of `len` bytes
    /// (`MAP_SHARED | MAP_ANONYMOUS`), zero-filled. It is shared with
    /// children created by `fork`, which makes it handy for tests.
    ///
    /// ```
    /// let map = tensorbus_shm::Mapping::anonymous(4096)?;
    /// // SAFETY (example): the mapping is 4096 bytes long and zero-filled.
    /// assert_eq!(unsafe { map.as_ptr().read() }, 0);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `len` is 0; otherwise the OS error of `mmap`.
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(invalid_input("cannot map 0 bytes"));
        }
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address; no
        // existing mapping is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_mmap_result(p, len, Access::ReadWrite)
    }

    fn from_mmap_result(p: *mut libc::c_void, len: usize, access: Access) -> io::Result<Mapping> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(Mapping { ptr, len, access })
    }

    /// Returns the start address of the mapping.
    ///
    /// The memory is shared: other processes may read or write it
    /// concurrently. Writing through the pointer of an
    /// [`Access::ReadOnly`] mapping raises `SIGSEGV`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Returns the length in bytes requested when mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns `true` if the mapping is empty (never: a zero-length mapping
    /// cannot be created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the access mode the mapping was created with.
    pub fn access(&self) -> Access {
        self.access
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: [ptr, ptr + len) is exactly the range this Mapping mapped
        // (the reservation's head and tail were already unmapped), and no
        // safe code can reach it after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Memfd;

    #[test]
    fn writes_are_visible_through_another_mapping() {
        let m = Memfd::create("tb-map", 64 * 1024, false).unwrap();
        let a = Mapping::map(m.as_fd(), 64 * 1024, Access::ReadWrite, 1).unwrap();
        let b = Mapping::map(m.as_fd(), 64 * 1024, Access::ReadOnly, 4096).unwrap();
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(b.access(), Access::ReadOnly);
        // SAFETY: both mappings are 64 KiB long; `a` is writable.
        unsafe {
            a.as_ptr().add(1234).write_volatile(0xAB);
            assert_eq!(b.as_ptr().add(1234).read_volatile(), 0xAB);
        }
    }

    #[test]
    fn large_alignment_is_honoured() {
        let len = 3 * 4096 + 17;
        let m = Memfd::create("tb-align", len, false).unwrap();
        for align in [2 << 20, 1 << 30] {
            let map = Mapping::map(m.as_fd(), len, Access::ReadWrite, align).unwrap();
            assert_eq!(map.as_ptr() as usize % align, 0);
            assert_eq!(map.len(), len);
            assert!(!map.is_empty());
            // SAFETY: the mapping is `len` bytes long and writable.
            unsafe { map.as_ptr().add(len - 1).write_volatile(7) };
        }
    }

    #[test]
    fn aligned_mapping_has_exact_extent() {
        let len = 4096;
        let align = 2 << 20;
        let m = Memfd::create("tb-align2", len, false).unwrap();
        let map = Mapping::map(m.as_fd(), len, Access::ReadWrite, align).unwrap();
        let start = map.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // The memfd mapping is its own VMA, [start, start + len), backed by
        // the memfd (not by the anonymous reservation).
        let line = maps
            .lines()
            .find(|l| {
                let lo = l.split('-').next().unwrap();
                usize::from_str_radix(lo, 16).unwrap() == start
            })
            .unwrap();
        let range = line.split_whitespace().next().unwrap();
        let (_, hi) = range.split_once('-').unwrap();
        assert_eq!(
            usize::from_str_radix(hi, 16).unwrap(),
            start + len,
            "{line}"
        );
        assert!(line.contains("rw-s"), "{line}");
        assert!(line.contains("memfd:tb-align2"), "{line}");
    }

    #[test]
    fn invalid_arguments() {
        let m = Memfd::create("tb-inval", 4096, false).unwrap();
        let kind = |r: io::Result<Mapping>| r.unwrap_err().kind();
        assert_eq!(
            kind(Mapping::map(m.as_fd(), 0, Access::ReadOnly, 1)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(Mapping::map(m.as_fd(), 4096, Access::ReadOnly, 3)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(Mapping::map(m.as_fd(), 4096, Access::ReadOnly, 0)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(Mapping::map(m.as_fd(), 4096, Access::ReadOnly, 2 << 30)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(Mapping::map(m.as_fd(), 8192, Access::ReadOnly, 1)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(kind(Mapping::anonymous(0)), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn read_write_on_read_only_fd_is_eacces() {
        let m = Memfd::create("tb-eacces", 4096, false).unwrap();
        let ro = m.reopen_read_only().unwrap();
        use std::os::fd::AsFd;
        let e = Mapping::map(ro.as_fd(), 4096, Access::ReadWrite, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let e = Mapping::map(ro.as_fd(), 4096, Access::ReadWrite, 2 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        Mapping::map(ro.as_fd(), 4096, Access::ReadOnly, 2 << 20).unwrap();
    }

    #[test]
    fn anonymous_is_zeroed_and_writable() {
        let map = Mapping::anonymous(8192).unwrap();
        // SAFETY: the mapping is 8192 bytes long and writable.
        unsafe {
            assert_eq!(map.as_ptr().add(8191).read(), 0);
            map.as_ptr().add(8191).write(1);
            assert_eq!(map.as_ptr().add(8191).read(), 1);
        }
    }

    #[test]
    fn mapping_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Mapping>();
    }

    #[test]
    fn write_through_read_only_mapping_faults() {
        let m = Memfd::create("tb-segv", 4096, false).unwrap();
        let map = Mapping::map(m.as_fd(), 4096, Access::ReadOnly, 1).unwrap();
        let p = map.as_ptr();
        // SAFETY: fork has no memory-safety preconditions. The child only
        // calls async-signal-safe functions (setrlimit, a volatile store,
        // _exit) and never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
        if pid == 0 {
            // Child. Avoid writing a core file for the expected crash.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `no_core` is a valid rlimit; `p` points into a live
            // PROT_READ mapping, so the store faults with SIGSEGV (which is
            // the point of the test) instead of corrupting memory; _exit
            // never returns.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                p.write_volatile(1);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSEGV);
    }
}

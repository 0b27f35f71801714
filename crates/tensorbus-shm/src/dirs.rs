//! Runtime directories for sockets.
//!
//! [`prepare_socket_dir`] creates the directory a socket will live in, or
//! checks an existing one. Only directories it creates itself get a mode
//! chosen by the caller (0700 for a private broker, 0711 when other users
//! are admitted); an existing directory is never changed: it is checked
//! (owner, mode) and used as it is, or refused with advice. So `/tmp` stays
//! 1777 and the working directory stays as it was.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::memfd::fstat;
use crate::{cvt, invalid_input, with_context};

/// What [`prepare_socket_dir`] found or made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketDir {
    /// The directories it created, outermost first (empty if `path`
    /// existed). Each has exactly the mode that was asked for.
    pub created: Vec<PathBuf>,
    /// Permission bits of `path` now (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner of `path`.
    pub uid: u32,
    /// Group of `path`.
    pub gid: u32,
}

/// Makes sure `path` is a directory where a socket can safely live.
///
/// * Missing directories (`path` and any missing parents) are created and
///   then given exactly `mode` (with `fchmod`, so the umask does not
///   matter); they are listed in [`SocketDir::created`].
/// * A directory that already exists is checked and **never changed**: it
///   must be a directory (a symbolic link to one is followed only if the
///   link itself belongs to the effective uid or root), owned by the
///   effective uid or by root, and not writable by group or others unless it has the
///   sticky bit (like `/tmp`). Otherwise another user could replace the
///   socket in it, so it is refused with an error that says what to do.
///
/// The deepest directory that already existed (the one the new ones are
/// created in) is checked the same way.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("tb-doc-{}", std::process::id()));
/// let made = tensorbus_shm::prepare_socket_dir(&dir, 0o700)?;
/// assert_eq!(made.created, vec![dir.clone()]);
/// assert_eq!(made.mode, 0o700);
/// // The second time it exists: checked, used, not changed.
/// assert!(tensorbus_shm::prepare_socket_dir(&dir, 0o711)?.created.is_empty());
/// # std::fs::remove_dir(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// `PermissionDenied` (with advice) if an existing directory is owned by
/// another non-root user or is group/world-writable without the sticky bit;
/// an error naming the path if it exists but is not a directory or is a
/// symbolic link; `InvalidInput` if the path contains a NUL byte or `mode`
/// has bits outside 0o777; otherwise the OS error of `mkdir`, `open`,
/// `fstat` or `fchmod`, with the path in the message.
pub fn prepare_socket_dir(path: &Path, mode: u32) -> io::Result<SocketDir> {
    if mode & !0o777 != 0 {
        return Err(invalid_input(format!(
            "directory mode {mode:#o} has bits outside 0o777"
        )));
    }
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    // The missing directories, innermost first, and the deepest one that exists.
    let mut missing: Vec<&Path> = Vec::new();
    let mut existing: Option<&Path> = None;
    for p in path.ancestors() {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        match std::fs::symlink_metadata(p) {
            Ok(_) => {
                existing = Some(p);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p),
            Err(e) => return Err(with_context(e, format!("cannot look at {}", p.display()))),
        }
    }
    if let Some(base) = existing {
        check_existing(base)?;
    }
    let mut created = Vec::new();
    for p in missing.iter().rev() {
        let cpath = c_path(p)?;
        // SAFETY: `cpath` is a valid NUL-terminated string that outlives the
        // call; mkdir does not retain the pointer.
        match cvt(unsafe { libc::mkdir(cpath.as_ptr(), 0o700) }) {
            Ok(_) => {
                let dir = open_dir(p)?;
                // SAFETY: `dir` is an open descriptor; fchmod touches no memory.
                cvt(unsafe { libc::fchmod(dir.as_raw_fd(), mode as libc::mode_t) }).map_err(
                    |e| with_context(e, format!("cannot chmod {mode:o} {}", p.display())),
                )?;
                created.push(p.to_path_buf());
            }
            // Someone else made it meanwhile: it is not ours, check it instead.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_existing(p)?,
            Err(e) => {
                return Err(with_context(
                    e,
                    format!("cannot create directory {}", p.display()),
                ))
            }
        }
    }
    let st = std::fs::metadata(path)
        .map_err(|e| with_context(e, format!("cannot stat {}", path.display())))?;
    use std::os::unix::fs::MetadataExt;
    Ok(SocketDir {
        created,
        mode: st.mode() & 0o7777,
        uid: st.uid(),
        gid: st.gid(),
    })
}

/// Makes sure `path` is a directory for a socket only the current user
/// (and root) may reach: [`prepare_socket_dir`] with mode 0700.
///
/// Only directories created here are made 0700; an existing directory is
/// checked as [`prepare_socket_dir`] describes and left as it is.
///
/// # Errors
///
/// As [`prepare_socket_dir`].
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    prepare_socket_dir(path, 0o700).map(|_| ())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| invalid_input(format!("path {} contains a NUL byte", path.display())))
}

/// Opens `path` as a directory without following a final symbolic link.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let shown = path.display();
    let cpath = c_path(path)?;
    // SAFETY: `cpath` is a valid NUL-terminated string that outlives the
    // call; open does not retain the pointer.
    let raw = cvt(unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
    .map_err(|e| {
        // With O_DIRECTORY | O_NOFOLLOW a symbolic link gives ENOTDIR (or
        // ELOOP), so look at the path itself to say what is wrong.
        let link = std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_symlink())
            .map(|_| std::fs::read_link(path).map(|t| t.display().to_string()));
        match e.raw_os_error() {
            _ if link.is_some() => with_context(
                e,
                format!(
                    "{shown} is a symbolic link (to {}), not a directory; give the directory itself",
                    link.and_then(Result::ok).unwrap_or_else(|| "?".into())
                ),
            ),
            Some(libc::ENOTDIR) => {
                with_context(e, format!("{shown} exists but is not a directory"))
            }
            _ => with_context(e, format!("cannot open directory {shown}")),
        }
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Checks a directory that already existed: a directory (a symbolic link
/// to one is followed only if the link itself belongs to us or root),
/// owned by us or root, not writable by others unless sticky. Never
/// changes it.
fn check_existing(path: &Path) -> io::Result<()> {
    let shown = path.display();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| with_context(e, format!("cannot look at {shown}")))?;
    let dir = if meta.file_type().is_symlink() {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{shown} is a symbolic link owned by uid {}, neither the current user (uid {euid}) \
                     nor root; it is not followed: give the directory itself",
                    meta.uid()
                ),
            ));
        }
        let cpath = c_path(path)?;
        // SAFETY: `cpath` is a valid NUL-terminated string that outlives the
        // call; open does not retain the pointer.
        let raw = cvt(unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
        .map_err(|e| {
            with_context(
                e,
                format!("{shown} is a symbolic link, but not to a directory"),
            )
        })?;
        // SAFETY: open just returned this descriptor; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(raw) }
    } else {
        open_dir(path)?
    };
    let st = fstat(dir.as_fd()).map_err(|e| with_context(e, format!("cannot stat {shown}")))?;
    let mode = st.st_mode & 0o7777;
    if st.st_uid != euid && st.st_uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "directory {shown} is owned by uid {}, neither the current user (uid {euid}) nor root; \
                 that user could replace the socket, so it is not used: pick a socket path in a \
                 directory of your own (for example /tmp/tensorbus-{euid}/broker.sock)",
                st.st_uid
            ),
        ));
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "directory {shown} (mode {mode:04o}) is writable by {} and has no sticky bit, so \
                 other users could replace the socket in it; it is not used and not changed: \
                 pick a socket path in a directory of your own, or fix the directory \
                 (`chmod go-w {shown}` or `chmod +t {shown}`)",
                if mode & 0o002 != 0 {
                    "everyone"
                } else {
                    "its group"
                }
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tb-dirs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_with_the_mode_asked_for_including_parents() {
        let root = scratch("create");
        let dir = root.join("a/b");
        let made = prepare_socket_dir(&dir, 0o711).unwrap();
        assert_eq!(
            made.created,
            vec![root.clone(), root.join("a"), dir.clone()]
        );
        for p in &made.created {
            assert_eq!(mode(p), 0o711, "{p:?}");
        }
        // Idempotent, and the second call creates nothing.
        assert!(prepare_socket_dir(&dir, 0o700).unwrap().created.is_empty());
        assert_eq!(mode(&dir), 0o711);
        fs::remove_dir_all(&root).unwrap();
    }

    /// issue 12.2: an existing directory is checked and used, never chmod'ed.
    #[test]
    fn existing_directories_are_never_changed() {
        let dir = scratch("keep");
        for m in [0o755, 0o1777, 0o711, 0o750] {
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(m)).unwrap();
            let got = prepare_socket_dir(&dir, 0o700).unwrap();
            assert!(got.created.is_empty());
            assert_eq!(got.mode, m);
            assert_eq!(mode(&dir), m, "mode {m:o} was changed");
            ensure_private_dir(&dir).unwrap();
            assert_eq!(mode(&dir), m, "mode {m:o} was changed");
        }
        // A new directory inside a sticky world-writable one: the parent stays.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let inner = dir.join("inner");
        prepare_socket_dir(&inner, 0o700).unwrap();
        assert_eq!(mode(&dir), 0o1777);
        assert_eq!(mode(&inner), 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// issue 12.2: a group/world-writable directory without the sticky bit is
    /// refused with advice (and not changed), also as the parent of new ones.
    #[test]
    fn writable_non_sticky_directory_is_refused() {
        let dir = scratch("writable");
        for m in [0o777, 0o770] {
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(m)).unwrap();
            let e = prepare_socket_dir(&dir, 0o700).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            let msg = e.to_string();
            assert!(msg.contains(&dir.display().to_string()), "{msg}");
            assert!(msg.contains("sticky") && msg.contains("chmod"), "{msg}");
            assert_eq!(mode(&dir), m);
            let e = prepare_socket_dir(&dir.join("sub"), 0o700).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(!dir.join("sub").exists());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_file_and_foreign_symlink_follows_own_symlink() {
        let root = scratch("reject");
        fs::create_dir(&root).unwrap();
        let file = root.join("file");
        fs::write(&file, b"x").unwrap();
        let e = prepare_socket_dir(&file, 0o700).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let target = root.join("target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // Our own link to our own directory: followed, nothing changed.
        assert_eq!(prepare_socket_dir(&link, 0o700).unwrap().mode, 0o755);
        let dangling = root.join("dangling");
        std::os::unix::fs::symlink(root.join("nowhere"), &dangling).unwrap();
        let e = prepare_socket_dir(&dangling, 0o700).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // A link planted by another user is not followed.
            let c = CString::new(link.as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is a valid path string; lchown touches no memory of ours.
            assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
            let e = prepare_socket_dir(&link, 0o700).unwrap_err();
            assert!(
                e.to_string().contains("symbolic link owned by uid 65534"),
                "{e}"
            );
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn rejects_directory_of_other_user() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            eprintln!(
                "rejects_directory_of_other_user: needs root to chown (CI runs as root); not run"
            );
            return;
        }
        let dir = scratch("other");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = prepare_socket_dir(&dir, 0o700).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert_eq!(mode(&dir), 0o755);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_owned_directory_is_accepted() {
        // "/" is owned by root and not writable by others.
        assert!(prepare_socket_dir(Path::new("/"), 0o700)
            .unwrap()
            .created
            .is_empty());
    }
}

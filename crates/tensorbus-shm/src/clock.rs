//! A cheap monotonic clock.
//!
//! [`monotonic_ns`] reads `CLOCK_MONOTONIC` through libc's `clock_gettime`,
//! which on Linux is served by the vDSO without entering the kernel. The
//! clock is system-wide, so timestamps taken in different processes on the
//! same machine are directly comparable (useful for latency measurements
//! across a shared-memory channel).

/// Returns nanoseconds of `CLOCK_MONOTONIC` (time since an unspecified
/// point, typically boot, not counting suspend).
///
/// `clock_gettime(CLOCK_MONOTONIC)` cannot fail on Linux; if it ever did,
/// this returns 0 rather than panicking.
///
/// ```
/// let a = tensorbus_shm::monotonic_ns();
/// let b = tensorbus_shm::monotonic_ns();
/// assert!(b >= a);
/// ```
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call;
    // clock_gettime writes only into it.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if ret != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_advances() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(a > 0);
        assert!(b - a >= 2_000_000, "a={a} b={b}");
    }
}

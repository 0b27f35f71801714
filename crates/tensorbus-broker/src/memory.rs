//! What the machine has, as the broker counts it (its start-up check and
//! `tensorbus doctor` use the same figures).

/// Bytes of physical memory (RAM plus swap) of this machine; `None` if
/// `sysinfo` fails.
pub fn machine_memory() -> Option<u64> {
    // SAFETY: sysinfo only writes into the struct we pass; zeroed is a valid
    // initial value for this plain C struct.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram as u64 + info.totalswap as u64).saturating_mul(unit))
}

/// Huge page size the broker uses for `hugetlb = true` pools.
pub const HUGE_PAGE: u64 = 2 << 20;

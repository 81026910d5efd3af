//! What the machine can give a run, asked before anything is allocated: a
//! request whose working memory exceeds it is refused with both figures
//! instead of aborting the process half-way (an allocation failure in Rust
//! aborts, it does not return an error).
//!
//! Available memory is the kernel's `MemAvailable` (`/proc/meminfo`), lowered
//! to what the process's cgroup (v2) still allows and to the room left under
//! its address-space limit (`ulimit -v`); `KILN_MEMORY_LIMIT`
//! (bytes, with an optional `K`/`M`/`G` suffix) overrides both, for tests
//! and for users who want a tighter bound. Where none of these can be read,
//! nothing is refused here (the per-tensor and per-arena caps still apply).

use crate::RunError;

/// Bytes of memory a run may still allocate, when known.
pub fn available_bytes() -> Option<u64> {
    if let Some(v) = std::env::var("KILN_MEMORY_LIMIT")
        .ok()
        .and_then(|s| parse_bytes(&s))
    {
        return Some(v);
    }
    // A decode step checks its buffers on every call: the system's figure is
    // read at most every FRESH.
    static LAST: std::sync::Mutex<Option<(std::time::Instant, Option<u64>)>> =
        std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, v)) = *last {
        if at.elapsed() < FRESH {
            return v;
        }
    }
    let v = system_available();
    *last = Some((std::time::Instant::now(), v));
    v
}

/// How long a reading of the system's available memory is reused.
const FRESH: std::time::Duration = std::time::Duration::from_millis(100);

/// `MemAvailable`, capped by the cgroup's and the address space's room.
fn system_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        .checked_mul(1024)?;
    Some(
        [cgroup_room(), address_space_room()]
            .into_iter()
            .flatten()
            .fold(avail, u64::min),
    )
}

/// The address-space limit (`ulimit -v`) less what the process has mapped,
/// when there is a limit.
fn address_space_room() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line
        .trim_start_matches("Max address space")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?; // "unlimited": no limit
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let size_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(soft.saturating_sub(size_kb.saturating_mul(1024)))
}

/// `memory.max − memory.current` of this process's cgroup (v2), when it
/// has a limit.
fn cgroup_room() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let cur: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(cur))
}

/// `123`, `64K`, `512M`, `2G` (powers of 1024).
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

/// `1.50 GB`, `12.0 MB`, `512 bytes`.
pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

/// Refuses `need` bytes for `what` (`@f with B=1, T=4096`) when the machine
/// cannot give them; `detail` says what the figure is made of.
pub(crate) fn check(what: &str, need: u64, detail: &str) -> Result<(), RunError> {
    match available_bytes() {
        Some(avail) if need > avail => Err(RunError::Memory {
            what: what.to_string(),
            need: human(need),
            detail: detail.to_string(),
            available: human(avail),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        assert_eq!(parse_bytes(" 2G "), Some(2 << 30));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("99999999999999999G"), None);
        assert_eq!(human(3 << 30), "3.00 GB");
        assert_eq!(human(12 << 20), "12.0 MB");
        assert_eq!(human(500), "500 bytes");
    }
}

//! The guest's clock: the TSC rate its kernel is told.
//!
//! QEMU's guests read the host's time stamp counter: under TCG `rdtsc` returns the
//! host's ticks unscaled, and under KVM the guest TSC runs at the host's rate. The guest
//! kernel is given that rate on its command line (`tsc_early_khz`, with `tsc=reliable`)
//! instead of calibrating it, which under emulation costs boot time and comes out wrong.
//! A wrong rate makes every guest clock wrong: with 2 GHz claimed on a 2.3 GHz host, a
//! guest `sleep 10` took 8.6 s.
//!
//! The rate is measured once per host boot (rdtsc against `CLOCK_MONOTONIC_RAW` over
//! 20 ms) and kept in the run directory, keyed by the kernel's boot id. A host whose TSC
//! is not invariant (no `constant_tsc` and `nonstop_tsc`) gets no rate: its guests
//! calibrate for themselves.
//!
//! With the rate, and the kernel's tick rate (`CONFIG_HZ`, known for vmhost's own
//! kernel), the guest is also given its delay-loop constant (`lpj`). The first vCPU
//! derives it from the TSC rate anyway, but every other one measured it for itself:
//! ~90 ms of each boot with two vCPUs under TCG.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The host's TSC rate in kHz, when it is invariant and could be measured.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let base = crate::vm::run_dir::run_base();
        // The cache is trusted only in the user's private run directory.
        let khz = match crate::unix::ensure_private_dir(&base) {
            Ok(()) => cached_or_measured(&base.join("tsc-khz")),
            Err(_) => measure_if_invariant(),
        };
        log::debug!("host TSC: {khz:?} kHz");
        khz
    })
}

/// The kernel parameters that give the guest the host's TSC rate (none when unknown),
/// and its delay-loop constant when the kernel's tick rate `hz` is known too.
pub fn kernel_args(hz: Option<u32>) -> Vec<String> {
    let Some(khz) = host_tsc_khz() else { return Vec::new() };
    let mut args = vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()];
    if let Some(hz) = hz.filter(|h| *h > 0) {
        // Loops per jiffy of the TSC delay loop: what the kernel computes from the rate.
        args.push(format!("lpj={}", u64::from(khz) * 1000 / u64::from(hz)));
    }
    args
}

/// TSC rates outside 100 MHz to 10 GHz are taken for failed measurements.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u32> = 100_000..=10_000_000;

fn cached_or_measured(cache: &Path) -> Option<u32> {
    let Ok(boot_id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return measure_if_invariant();
    };
    let boot_id = boot_id.trim();
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Some((id, khz)) = text.trim().split_once(' ') {
            if id == boot_id {
                if khz == "none" {
                    return None;
                }
                if let Some(k) = khz.parse().ok().filter(|k| PLAUSIBLE_KHZ.contains(k)) {
                    return Some(k);
                }
            }
        }
    }
    let invariant = invariant_tsc(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    let khz = if invariant { measure_tsc_khz(Duration::from_millis(20)) } else { None };
    // Remembered: a rate, or that the TSC is not invariant. A failed measurement is not,
    // so the next VM measures again.
    let value = match khz {
        Some(k) => k.to_string(),
        None if !invariant => "none".to_string(),
        None => return None,
    };
    // Written whole under another name and renamed: a concurrent reader sees all or nothing.
    let tmp = cache.with_extension(format!("{}.tmp", std::process::id()));
    if std::fs::write(&tmp, format!("{boot_id} {value}\n"))
        .and_then(|()| std::fs::rename(&tmp, cache))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
    khz
}

fn measure_if_invariant() -> Option<u32> {
    if invariant_tsc(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()) {
        measure_tsc_khz(Duration::from_millis(20))
    } else {
        None
    }
}

/// Whether /proc/cpuinfo's flags say the TSC ticks at one rate in every power state.
fn invariant_tsc(cpuinfo: &str) -> bool {
    cpuinfo.lines().find(|l| l.starts_with("flags")).is_some_and(|l| {
        let flags: Vec<&str> = l.split_whitespace().collect();
        flags.contains(&"constant_tsc") && flags.contains(&"nonstop_tsc")
    })
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64 (it reads a counter).
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
}

fn monotonic_raw_ns() -> u128 {
    let mut t = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC_RAW, &mut t) };
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

/// Counts TSC ticks over `span` of CLOCK_MONOTONIC_RAW. Each end is a clock reading
/// between two TSC readings; an end whose pair is far apart (the thread was preempted)
/// is read again.
#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz(span: Duration) -> Option<u32> {
    let sample = || {
        for _ in 0..100 {
            let (a, t, b) = (rdtsc(), monotonic_raw_ns(), rdtsc());
            if b.wrapping_sub(a) < 20_000 {
                return Some((a / 2 + b / 2, t));
            }
        }
        None
    };
    let (c0, t0) = sample()?;
    std::thread::sleep(span);
    let (c1, t1) = sample()?;
    let ns = t1.checked_sub(t0).filter(|ns| *ns > 0)?;
    let khz = (c1.checked_sub(c0)? as u128 * 1_000_000 / ns) as u64;
    u32::try_from(khz).ok().filter(|k| PLAUSIBLE_KHZ.contains(k))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz(_span: Duration) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invariant_tsc_needs_both_flags() {
        assert!(invariant_tsc("processor : 0\nflags : fpu tsc constant_tsc nonstop_tsc sse\n"));
        assert!(!invariant_tsc("flags : fpu tsc constant_tsc\n"));
        assert!(!invariant_tsc("flags : fpu tsc nonstop_tsc\n"));
        assert!(!invariant_tsc(""));
    }

    #[test]
    fn the_measured_rate_agrees_with_itself_and_is_cached_per_boot() {
        if !invariant_tsc(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()) {
            eprintln!("skipped: this host's TSC is not invariant");
            return;
        }
        let a = measure_tsc_khz(Duration::from_millis(20)).unwrap();
        let b = measure_tsc_khz(Duration::from_millis(20)).unwrap();
        // Two measurements of one fixed rate: within 0.5 % of each other (preemption
        // between a TSC and a clock reading is filtered out).
        assert!(a.abs_diff(b) as f64 <= a as f64 * 0.005, "{a} vs {b} kHz");
        let dir = crate::test_dir::TempDir::new("tsc");
        let cache = dir.join("tsc-khz");
        let measured = cached_or_measured(&cache).unwrap();
        assert!(measured.abs_diff(a) as f64 <= a as f64 * 0.005);
        // Later calls read the file: a value planted for this boot is returned as is.
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        std::fs::write(&cache, format!("{} 1234567\n", boot_id.trim())).unwrap();
        assert_eq!(cached_or_measured(&cache), Some(1234567));
        // One from another boot is measured again, and so is a value out of range.
        for stale in ["another-boot 1234567".to_string(), format!("{} 0", boot_id.trim())] {
            std::fs::write(&cache, format!("{stale}\n")).unwrap();
            assert!(cached_or_measured(&cache).unwrap().abs_diff(a) as f64 <= a as f64 * 0.005, "{stale}");
        }
        // A host without an invariant TSC is remembered as such.
        std::fs::write(&cache, format!("{} none\n", boot_id.trim())).unwrap();
        assert_eq!(cached_or_measured(&cache), None);
    }
}

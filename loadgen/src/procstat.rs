//! CPU and memory of another process (the server under test), read from /proc.

use std::time::Instant;

use serde::Serialize;

/// A point-in-time reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    cpu_ticks: u64,
    user_ticks: u64,
    pub rss_bytes: u64,
}

/// What a process used over a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// CPU time over wall time, in percent of one core (200 = two cores busy).
    pub cpu_percent: f64,
    /// The part of `cpu_percent` spent in user space (the rest is the kernel's, on the
    /// process's behalf: syscalls, and for a server over loopback much of the TCP path):
    /// what tells a program's own work from the network's cost it shares with its peers.
    pub user_percent: f64,
    /// Largest resident set size seen.
    pub max_rss_bytes: u64,
}

pub fn sample(pid: i32) -> Option<Sample> {
    let p = procfs::process::Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let page = procfs::page_size();
    Some(Sample {
        at: Instant::now(),
        cpu_ticks: stat.utime + stat.stime,
        user_ticks: stat.utime,
        rss_bytes: stat.rss * page,
    })
}

/// Usage between two samples, with the largest RSS of `samples`.
pub fn usage(first: &Sample, last: &Sample, max_rss_bytes: u64) -> Usage {
    let wall = last.at.duration_since(first.at).as_secs_f64().max(1e-9);
    let percent = |ticks: u64| ticks as f64 / procfs::ticks_per_second() as f64 / wall * 100.0;
    Usage {
        cpu_percent: percent(last.cpu_ticks.saturating_sub(first.cpu_ticks)),
        user_percent: percent(last.user_ticks.saturating_sub(first.user_ticks)),
        max_rss_bytes: max_rss_bytes.max(first.rss_bytes).max(last.rss_bytes),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        let s = super::sample(std::process::id() as i32).unwrap();
        assert!(s.rss_bytes > 0);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let t = super::sample(std::process::id() as i32).unwrap();
        let u = super::usage(&s, &t, 0);
        assert!(u.cpu_percent >= 0.0 && u.max_rss_bytes > 0);
        assert!(u.user_percent >= 0.0 && u.user_percent <= u.cpu_percent);
    }
}

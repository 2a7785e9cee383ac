//! Free disk space: refuse writes before the disk is full, and keep a reserve that lets
//! compaction, deletes and a restart proceed when it is.
//!
//! Why: on a full disk RocksDB fails every write (each caller saw `unavailable` and
//! retried), and after a restart its recovery flushes the WAL into a new table file,
//! which needs the space that is gone: the server could not even start to serve reads.
//! Like TiKV (`storage.reserve-space`) and etcd (`NOSPACE`), the engine:
//!
//! - checks the data directory's free space (`statvfs`, a few microseconds) every
//!   `check_interval` and after every failed write;
//! - below `min_free_bytes` refuses writes before they reach RocksDB
//!   (`StoreError::StorageFull`: the client is told to come back later, not to retry
//!   at once); deletes, reads and compaction go on;
//! - keeps a reserve file of `reserve_bytes` in the data directory, deleted the moment
//!   space runs low (and before opening on a low disk), so what frees space (compaction,
//!   deletes) and a restart's recovery find room; it is written back, and writes resume,
//!   once the disk has `min_free_bytes` free *besides* the reserve (so the two never
//!   chase each other).
//!
//! [`SpaceGuard`] holds the state; the engine asks it before each write and reports its
//! failures to it; a thread of the engine calls [`SpaceGuard::check`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use capkv_store::StoreError;

/// Name of the reserve file in the data directory.
pub const RESERVE_FILE: &str = "capkv.reserve";

/// How much room to keep, and how often to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceOptions {
    /// Below this many free bytes writes are refused; 0 turns the check off.
    pub min_free_bytes: u64,
    /// Size of the reserve file; 0 = none.
    pub reserve_bytes: u64,
    /// How often free space is measured (also after every failed write).
    pub check_interval: Duration,
}

impl Default for SpaceOptions {
    fn default() -> Self {
        Self {
            min_free_bytes: 256 << 20,
            reserve_bytes: 64 << 20,
            check_interval: Duration::from_secs(1),
        }
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The space state of one data directory (see the module docs).
#[derive(Debug)]
pub struct SpaceGuard {
    dir: PathBuf,
    opts: SpaceOptions,
    free: AtomicU64,
    /// Writes are refused (free space below the watermark, or a write failed for space).
    low: AtomicBool,
    /// Writes refused for space since open.
    refused: AtomicU64,
    /// Serializes transitions (check runs on the engine's thread and after failed writes).
    transition: Mutex<()>,
}

impl SpaceGuard {
    /// Measures `dir` now; on a low disk deletes the reserve at once (before the engine
    /// opens, so its recovery has room). It starts as if space were low, so a restart
    /// after the reserve was released takes writes only once the reserve fits back (the
    /// same rule as at run time: a restart does not undo the hysteresis).
    pub fn new(dir: &Path, opts: SpaceOptions) -> Self {
        let enabled = opts.min_free_bytes > 0;
        let guard = Self {
            dir: dir.to_path_buf(),
            opts,
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(enabled),
            refused: AtomicU64::new(0),
            transition: Mutex::new(()),
        };
        guard.check_as(true);
        if guard.is_low() {
            guard.release_reserve();
            tracing::warn!(
                dir = %guard.dir.display(), free_bytes = guard.free_bytes(),
                min_free_bytes = guard.opts.min_free_bytes,
                "disk space low at start: writes are refused until there is room (reads, deletes and compaction go on)"
            );
        }
        guard
    }

    fn enabled(&self) -> bool {
        self.opts.min_free_bytes > 0
    }

    pub fn check_interval(&self) -> Duration {
        self.opts.check_interval
    }

    /// Free bytes at the last check.
    pub fn free_bytes(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Writes refused for space so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether writes are refused for space right now.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Acquire)
    }

    fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// The reserve file's size, 0 if it is missing.
    pub fn reserve_held_bytes(&self) -> u64 {
        std::fs::metadata(self.reserve_path()).map_or(0, |m| m.len())
    }

    /// `Err(StorageFull)` while space is low (counted); a write that frees space (a
    /// delete) should not ask.
    pub fn admit_write(&self) -> Result<(), StoreError> {
        if !self.is_low() {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(StoreError::StorageFull(format!(
            "free space on the data directory's disk fell below storage.min_free_bytes ({}); \
             writes resume once {} bytes are free besides the reserve ({} free now)",
            self.opts.min_free_bytes,
            self.opts.min_free_bytes,
            self.free_bytes()
        )))
    }

    /// A write failed for lack of space: refuse writes from now on and free the reserve.
    pub fn write_failed_for_space(&self) {
        let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        if !self.low.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                dir = %self.dir.display(),
                "disk full: a write failed for space; writes are refused until there is room"
            );
        }
        self.release_reserve();
        drop(_t);
        self.check();
    }

    /// Measures free space and moves between the two states (see the module docs).
    pub fn check(&self) {
        self.check_as(false);
    }

    fn check_as(&self, starting: bool) {
        if !self.enabled() {
            return;
        }
        let _t = self.transition.lock().unwrap_or_else(|p| p.into_inner());
        let free = match free_bytes(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot measure free space");
                return;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let min = self.opts.min_free_bytes;
        if !self.is_low() {
            if free < min {
                self.low.store(true, Ordering::Release);
                tracing::warn!(
                    dir = %self.dir.display(), free_bytes = free, min_free_bytes = min,
                    "disk space low: writes are refused (reads, deletes and compaction go on); the reserve is released"
                );
                self.release_reserve();
            } else if self.reserve_held_bytes() < self.opts.reserve_bytes
                && free >= min.saturating_add(self.opts.reserve_bytes)
            {
                // Someone removed it.
                self.restore_reserve();
            }
            return;
        }
        // Low: resume once the reserve is back with the watermark still met. Without the
        // reserve there would be nothing to release the next time the disk fills.
        let missing = self
            .opts
            .reserve_bytes
            .saturating_sub(self.reserve_held_bytes());
        if free >= min.saturating_add(missing) && self.restore_reserve() {
            let free = free_bytes(&self.dir).unwrap_or(free);
            self.free.store(free, Ordering::Relaxed);
            self.low.store(false, Ordering::Release);
            if starting {
                return;
            }
            tracing::info!(
                dir = %self.dir.display(), free_bytes = free,
                reserve_bytes = self.reserve_held_bytes(),
                "disk space back: writes resume; the reserve is restored"
            );
        }
    }

    fn release_reserve(&self) {
        let path = self.reserve_path();
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(file = %path.display(), "reserve file released"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot release the reserve file")
            }
        }
    }

    /// The reserve at full size: written now (allocated blocks, not a sparse file) unless
    /// it already is. On failure removes what was written, so that a half reserve never
    /// holds space the engine needs, and returns false.
    fn restore_reserve(&self) -> bool {
        if self.reserve_held_bytes() >= self.opts.reserve_bytes {
            return true;
        }
        let path = self.reserve_path();
        let tmp = self.dir.join(format!("{RESERVE_FILE}.tmp"));
        let written = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            let chunk = vec![0u8; 1 << 20];
            let mut left = self.opts.reserve_bytes;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        match written {
            Ok(()) => true,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(file = %path.display(), error = %e, "cannot write the reserve file");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roomy_disk_gets_its_reserve_and_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let g = SpaceGuard::new(
            dir.path(),
            SpaceOptions {
                min_free_bytes: 1,
                reserve_bytes: 4096,
                check_interval: Duration::from_millis(10),
            },
        );
        assert!(!g.is_low());
        assert!(g.admit_write().is_ok());
        assert_eq!(g.reserve_held_bytes(), 4096);
        assert!(g.free_bytes() > 0);
    }

    #[test]
    fn a_watermark_above_the_free_space_refuses_writes_and_releases_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESERVE_FILE), [0u8; 100]).unwrap();
        let g = SpaceGuard::new(
            dir.path(),
            SpaceOptions {
                min_free_bytes: u64::MAX,
                reserve_bytes: 100,
                check_interval: Duration::from_millis(10),
            },
        );
        assert!(g.is_low());
        assert!(matches!(g.admit_write(), Err(StoreError::StorageFull(_))));
        assert_eq!(g.refused(), 1);
        assert_eq!(g.reserve_held_bytes(), 0, "released");
    }

    #[test]
    fn a_failed_write_refuses_until_the_check_sees_room() {
        let dir = tempfile::tempdir().unwrap();
        let g = SpaceGuard::new(
            dir.path(),
            SpaceOptions {
                min_free_bytes: 1,
                reserve_bytes: 1024,
                check_interval: Duration::from_millis(10),
            },
        );
        // The check right after the failure sees room (this disk is not full) and
        // resumes; the reserve is back.
        g.write_failed_for_space();
        assert!(!g.is_low());
        assert_eq!(g.reserve_held_bytes(), 1024);
    }
}

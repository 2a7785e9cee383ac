//! The log's files, in one directory:
//! - `log-<seq>`: segments of a fixed size, made whole (zero-filled and synced) before they
//!   are used and then written in place, so a sync after an append writes data pages only
//!   (a growing file makes `fdatasync` write its inode too: on this machine's ext4 a growing
//!   file synced 3-5k times/s, a full-sized one 6-8k). Each holds group records:
//!   `[length u32][crc32c u32][revision u64][effects]`, integers little-endian, `length`
//!   counting the revision and the effects, the checksum over the segment's number, the
//!   revision and the effects (so a record left from another segment never passes). A
//!   length of 0 ends a segment; the first record that does not hold ends the log.
//! - `snapshot-<seq>`: the state as of the start of segment `seq`, as frames
//!   `[length u32][crc32c u32][kind u8][payload]` (a header, chunks of effects, an end);
//!   written as `.tmp`, synced, then renamed, so a snapshot file is whole or absent.
//! - `next.tmp`: the next segment, being prepared by a background thread.
//! - `secret`: the instance secret (session tokens outlive restarts); `LOCK`: held while
//!   open, so two servers never share a log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes before a record's body: length, checksum.
const RECORD_HEADER_BYTES: usize = 8;
/// A record's body starts with its revision.
const REVISION_BYTES: usize = 8;
const NEXT: &str = "next.tmp";
/// How much of a segment is zeroed per write while it is prepared.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// How often a next segment that could not be made is tried again.
const RETRY_PREPARE: Duration = Duration::from_secs(1);

pub(crate) const FRAME_HEADER: u8 = 1;
pub(crate) const FRAME_EFFECTS: u8 = 2;
pub(crate) const FRAME_END: u8 = 3;

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("log-{seq:020}"))
}

pub(crate) fn snapshot_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("snapshot-{seq:020}"))
}

/// The sequence numbers of the files named `<prefix><seq>` in `dir`, ascending.
pub(crate) fn numbered(dir: &Path, prefix: &str) -> io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix(prefix)
            .and_then(|s| s.parse::<u64>().ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Bytes of segments and snapshots in `dir` (0 when it cannot be listed).
pub(crate) fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("log-") || n.starts_with("snapshot-")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A record's or a snapshot frame's first 8 bytes: `[length u32][crc32c u32]`.
fn length_and_checksum(header: [u8; 8]) -> (usize, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]) as usize,
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

fn checksum(seq: u64, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), body)
}

/// One record read back from a segment.
pub(crate) struct Found<'a> {
    pub(crate) revision: u64,
    pub(crate) effects: &'a [u8],
}

/// The records of segment `seq` (its whole contents in `buf`), up to the first that does not
/// hold; with the offset after the last good one, and why reading stopped there when it was
/// not the segment's clean end (a zero length or its last byte).
pub(crate) fn records(seq: u64, buf: &[u8]) -> (Vec<Found<'_>>, usize, Option<String>) {
    let mut found = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(header) = buf
            .get(at..at + RECORD_HEADER_BYTES)
            .and_then(|h| <[u8; RECORD_HEADER_BYTES]>::try_from(h).ok())
        else {
            return (found, at, None);
        };
        let (len, crc) = length_and_checksum(header);
        if len == 0 {
            return (found, at, None);
        }
        let start = at + RECORD_HEADER_BYTES;
        let Some(body) = buf
            .get(start..start + len)
            .filter(|_| len >= REVISION_BYTES)
        else {
            return (
                found,
                at,
                Some(format!("a record at {at} runs past the segment")),
            );
        };
        if checksum(seq, body) != crc {
            return (
                found,
                at,
                Some(format!("the record at {at} fails its checksum")),
            );
        }
        let (revision, effects) = body.split_at(REVISION_BYTES);
        found.push(Found {
            revision: u64::from_le_bytes(revision.try_into().unwrap_or([0; 8])),
            effects,
        });
        at = start + len;
    }
}

/// Makes `path` a zero-filled, synced file of `bytes` (written, not just allocated: an
/// allocated-but-unwritten extent costs a metadata write at the first sync of each part).
pub(crate) fn zero_filled(path: &Path, bytes: u64) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(ZERO_CHUNK_BYTES as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

/// Zeroes `buf`'s bytes from `end` up to the last non-zero one, in `file` (what a torn
/// record left after the log's end, so that nothing after a later, shorter record can be
/// read as part of the log).
pub(crate) fn zero_tail(file: &File, buf: &[u8], end: usize) -> io::Result<()> {
    let Some(last) = buf[end..].iter().rposition(|&b| b != 0) else {
        return Ok(());
    };
    file.write_all_at(&vec![0u8; last + 1], end as u64)?;
    file.sync_data()
}

/// Appends group records to the current segment, moving to the next when one does not fit.
pub(crate) struct Writer {
    dir: PathBuf,
    seq: u64,
    file: File,
    offset: u64,
    size: u64,
    segment_bytes: u64,
    next: Next,
    buf: Vec<u8>,
    /// Tests: while set, making the next segment fails (a full disk).
    #[cfg(test)]
    pub(crate) fail_prepare: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The next segment (`next.tmp`).
enum Next {
    /// Being zero-filled in the background.
    Preparing(JoinHandle<io::Result<()>>),
    Ready,
    /// The last preparation failed (a full disk), at this time.
    Failed(Instant),
}

impl Writer {
    /// Writes on at `offset` of segment `seq`, which exists.
    pub(crate) fn resume(
        dir: &Path,
        seq: u64,
        offset: u64,
        segment_bytes: u64,
    ) -> io::Result<Self> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let size = file.metadata()?.len();
        let mut w = Self {
            dir: dir.to_path_buf(),
            seq,
            file,
            offset,
            size,
            segment_bytes,
            next: Next::Ready,
            buf: Vec::new(),
            #[cfg(test)]
            fail_prepare: None,
        };
        w.prepare_next();
        Ok(w)
    }

    /// Makes segment `seq` (zero-filled) and writes from its start.
    pub(crate) fn create(dir: &Path, seq: u64, segment_bytes: u64) -> io::Result<Self> {
        zero_filled(&segment_path(dir, seq), segment_bytes)?;
        sync_dir(dir)?;
        Self::resume(dir, seq, 0, segment_bytes)
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes left in the current segment.
    pub(crate) fn room(&self) -> u64 {
        self.size.saturating_sub(self.offset)
    }

    /// Whether the next segment is made, waiting for one being made. One that could not be
    /// made is tried again in the background at most once a second (space may have been
    /// freed), and is not ready until such a try has ended well: a group applied in the
    /// belief that a segment will be there must find it, or the log fails.
    pub(crate) fn next_is_ready(&mut self) -> bool {
        if matches!(self.next, Next::Preparing(_)) {
            self.next = match std::mem::replace(&mut self.next, Next::Ready) {
                Next::Preparing(h) => Self::joined(h),
                other => other,
            };
        }
        match self.next {
            Next::Ready => true,
            Next::Failed(at) => {
                if at.elapsed() >= RETRY_PREPARE {
                    self.prepare_next();
                }
                false
            }
            Next::Preparing(_) => false,
        }
    }

    fn joined(h: JoinHandle<io::Result<()>>) -> Next {
        match h.join() {
            Ok(Ok(())) => Next::Ready,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "preparing the next log segment failed");
                Next::Failed(Instant::now())
            }
            Err(_) => Next::Failed(Instant::now()),
        }
    }

    /// Tests: whether making a segment is to fail now (a full disk).
    #[cfg(test)]
    fn making_fails(&self) -> bool {
        self.fail_prepare
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn prepare_next(&mut self) {
        #[cfg(test)]
        if self.making_fails() {
            self.next = Next::Failed(Instant::now());
            return;
        }
        let path = self.dir.join(NEXT);
        let bytes = self.segment_bytes;
        self.next = Next::Preparing(std::thread::spawn(move || zero_filled(&path, bytes)));
    }

    /// Frames and writes one group record (not synced: [`Self::sync`]).
    pub(crate) fn append(&mut self, revision: u64, effects: &[u8]) -> io::Result<()> {
        let len = REVISION_BYTES + effects.len();
        let whole = (RECORD_HEADER_BYTES + len) as u64;
        if whole > self.room() {
            self.roll(whole)?;
        }
        let len32 = u32::try_from(len).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "a group record over 4 GiB")
        })?;
        self.buf.clear();
        self.buf.extend_from_slice(&len32.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&revision.to_le_bytes());
        self.buf.extend_from_slice(effects);
        let crc = checksum(self.seq, &self.buf[RECORD_HEADER_BYTES..]);
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&self.buf, self.offset)?;
        self.offset += whole;
        // A large group's buffer is not kept.
        if self.buf.capacity() > 4 * ZERO_CHUNK_BYTES {
            self.buf = Vec::new();
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Moves to the next segment, with room for `need` bytes. The current one is synced
    /// first, so a segment is whole before its successor exists.
    pub(crate) fn roll(&mut self, need: u64) -> io::Result<()> {
        self.file.sync_data()?;
        let seq = self.seq + 1;
        let path = segment_path(&self.dir, seq);
        let next = match std::mem::replace(&mut self.next, Next::Failed(Instant::now())) {
            Next::Preparing(h) => Self::joined(h),
            other => other,
        };
        if matches!(next, Next::Ready) && need <= self.segment_bytes {
            fs::rename(self.dir.join(NEXT), &path)?;
        } else {
            // A record larger than a segment gets a segment of its own size.
            let bytes = need.max(self.segment_bytes);
            #[cfg(test)]
            if self.making_fails() {
                return Err(io::Error::other("injected: no room for a segment"));
            }
            if let Err(e) = zero_filled(&path, bytes) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        }
        // From here the new segment exists: if it cannot be used, it goes again, so that a
        // log whose writer stayed on this segment never has a later one after it (recovery
        // would take this segment's torn end for corruption).
        let opened = sync_dir(&self.dir).and_then(|()| {
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        });
        let (file, size) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = fs::remove_file(&path);
                let _ = sync_dir(&self.dir);
                return Err(e);
            }
        };
        self.size = size;
        self.file = file;
        self.seq = seq;
        self.offset = 0;
        self.prepare_next();
        Ok(())
    }
}

/// Writes a snapshot: frames into `.tmp`, then synced and renamed by [`Self::finish`].
pub(crate) struct SnapshotWriter {
    file: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl SnapshotWriter {
    pub(crate) fn create(dir: &Path, seq: u64) -> io::Result<Self> {
        let path = snapshot_path(dir, seq);
        let tmp = path.with_extension("tmp");
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        Ok(Self { file, tmp, path })
    }

    pub(crate) fn frame(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a frame over 4 GiB"))?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(&crc.to_le_bytes())?;
        self.file.write_all(&[kind])?;
        self.file.write_all(payload)
    }

    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.frame(FRAME_END, &[])?;
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&self.tmp, &self.path)?;
        match self.path.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }

    /// Removes what was written (a snapshot that failed).
    pub(crate) fn abandon(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Reads a snapshot's frames in order, handing each `(kind, payload)` to `each`; an error
/// for a frame that does not hold or a file without its end frame.
pub(crate) fn read_snapshot(
    path: &Path,
    mut each: impl FnMut(u8, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // A damaged header may declare up to 4 GiB: what is left of the file bounds it, before
    // anything is allocated for it (the checksum can only be checked once it is read).
    let mut left = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 8];
        r.read_exact(&mut header)
            .map_err(|e| format!("{}: ends without its end frame ({e})", path.display()))?;
        let (len, crc) = length_and_checksum(header);
        if len == 0 {
            return Err(format!("{}: a frame of length 0", path.display()));
        }
        left = left.saturating_sub(8);
        if len as u64 > left {
            return Err(format!(
                "{}: a frame declares {len} bytes, past the file's end ({left} left)",
                path.display()
            ));
        }
        left -= len as u64;
        payload.resize(len, 0);
        r.read_exact(&mut payload)
            .map_err(|e| format!("{}: a frame runs past the file ({e})", path.display()))?;
        if crc32c::crc32c(&payload) != crc {
            return Err(format!("{}: a frame fails its checksum", path.display()));
        }
        let kind = payload[0];
        if kind == FRAME_END {
            return Ok(());
        }
        each(kind, &payload[1..])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_the_first_bad_one_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), 7, 4096).unwrap();
        w.append(1, b"one").unwrap();
        w.append(2, b"two!").unwrap();
        w.sync().unwrap();
        let buf = fs::read(segment_path(dir.path(), 7)).unwrap();
        let (found, end, why) = records(7, &buf);
        assert_eq!(found.len(), 2);
        assert_eq!((found[1].revision, found[1].effects), (2, &b"two!"[..]));
        assert_eq!(end, 2 * 16 + 3 + 4);
        assert!(why.is_none(), "zero length is a clean end");
        // The same bytes as another segment's do not pass.
        let (other, _, why) = records(8, &buf);
        assert!(other.is_empty() && why.is_some());
        // A record torn at any byte: the log ends before it, with the reason.
        for cut in 19..end {
            let mut torn = buf.clone();
            torn[cut..].iter_mut().for_each(|b| *b = 0xAA);
            let (found, at, why) = records(7, &torn);
            assert_eq!((found.len(), at), (1, 19), "cut at {cut}");
            assert!(why.is_some());
        }
    }

    #[test]
    fn a_record_larger_than_a_segment_gets_one_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), 1, 4096).unwrap();
        w.append(1, &[7u8; 10_000]).unwrap();
        w.append(2, b"after").unwrap();
        w.sync().unwrap();
        assert_eq!(numbered(dir.path(), "log-").unwrap(), vec![1, 2, 3]);
        let big = fs::read(segment_path(dir.path(), 2)).unwrap();
        assert_eq!(records(2, &big).0.len(), 1);
    }

    #[test]
    fn a_snapshot_without_its_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SnapshotWriter::create(dir.path(), 3).unwrap();
        s.frame(FRAME_HEADER, b"h").unwrap();
        s.frame(FRAME_EFFECTS, b"e").unwrap();
        s.finish().unwrap();
        let path = snapshot_path(dir.path(), 3);
        let mut seen = Vec::new();
        read_snapshot(&path, |k, p| {
            seen.push((k, p.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (FRAME_HEADER, b"h".to_vec()),
                (FRAME_EFFECTS, b"e".to_vec())
            ]
        );
        let whole = fs::read(&path).unwrap();
        fs::write(&path, &whole[..whole.len() - 9]).unwrap();
        assert!(read_snapshot(&path, |_, _| Ok(())).is_err());
    }

    #[test]
    fn a_frame_longer_than_the_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_path(dir.path(), 4);
        // A header declaring 4 GiB - 1, then a few bytes: refused by the file's size, not
        // by reading (and allocating) what it declares.
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(b"short");
        fs::write(&path, &bytes).unwrap();
        let e = read_snapshot(&path, |_, _| Ok(())).unwrap_err();
        assert!(e.contains("past the file's end (5 left)"), "{e}");
    }
}

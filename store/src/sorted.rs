//! [`Sorted`]: the memory engine's ordered index, a sorted list of handles kept in
//! fixed-size chunks (a B-tree of two levels whose leaves are large).
//!
//! Why not `BTreeSet`: its nodes hold 11 handles of 8 bytes beside their own header and
//! are about half full under ascending inserts (a load), about 20 bytes per key at 1M keys
//! (bench/keyspace.sh). A chunk here holds [`CHUNK`] handles in one allocation of exactly
//! that many (a 2 KiB size class), and a load in ascending order fills each chunk before
//! starting the next, so the index costs about 8 bytes a key plus 24 per chunk; random
//! inserts split full chunks in halves (each ends up 1/2 to full). What this gives up: an
//! insert moves up to a chunk of handles (2 KiB, a few dozen ns) and a split moves the
//! chunk list (24 bytes a chunk: ~100 KiB at 1M keys, once per ~128 new keys). Point
//! reads do not use it (the hash index answers them); scans and writes of new keys do.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ops::Bound;

/// Handles per chunk: a power of two, so a chunk's buffer is an exact allocator size class.
pub(crate) const CHUNK: usize = 256;

/// Sorted, unique by key; see the module docs.
#[derive(Debug)]
pub(crate) struct Sorted<T> {
    /// Never an empty chunk; every chunk's keys come before the next chunk's.
    chunks: Vec<Vec<T>>,
}

impl<T> Default for Sorted<T> {
    fn default() -> Self {
        Self { chunks: Vec::new() }
    }
}

impl<T: Borrow<[u8]>> Sorted<T> {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// The chunk where `key` is or would go: the first whose last key is not below it,
    /// else the last chunk (`None` when there are no chunks).
    fn chunk_for(&self, key: &[u8]) -> Option<usize> {
        let last = self.chunks.len().checked_sub(1)?;
        let i = self.chunks.partition_point(|c| match c.last() {
            Some(t) => t.borrow() < key,
            None => true,
        });
        Some(i.min(last))
    }

    /// Inserts `item`, replacing the item of the same key if there is one (returned).
    pub(crate) fn replace(&mut self, item: T) -> Option<T> {
        let Some(ci) = self.chunk_for(item.borrow()) else {
            let mut chunk = Vec::with_capacity(CHUNK);
            chunk.push(item);
            self.chunks.push(chunk);
            return None;
        };
        let chunks_len = self.chunks.len();
        let chunk = &mut self.chunks[ci];
        let at = match chunk.binary_search_by(|t| t.borrow().cmp(item.borrow())) {
            Ok(at) => return Some(std::mem::replace(&mut chunk[at], item)),
            Err(at) => at,
        };
        if chunk.len() < CHUNK {
            chunk.insert(at, item);
            return None;
        }
        // Full. At the very end of the index (a load in ascending order), start a new chunk
        // and leave this one full; anywhere else split it in halves.
        if at == CHUNK && ci + 1 == chunks_len {
            let mut next = Vec::with_capacity(CHUNK);
            next.push(item);
            self.chunks.push(next);
            return None;
        }
        let mut right = Vec::with_capacity(CHUNK);
        right.extend(chunk.drain(CHUNK / 2..));
        if at <= CHUNK / 2 {
            chunk.insert(at, item);
        } else {
            right.insert(at - CHUNK / 2, item);
        }
        self.chunks.insert(ci + 1, right);
        None
    }

    /// Removes the item of `key`; `None` if there is none.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<T> {
        let ci = self.chunk_for(key)?;
        let chunk = &mut self.chunks[ci];
        let at = chunk.binary_search_by(|t| t.borrow().cmp(key)).ok()?;
        let item = chunk.remove(at);
        if chunk.is_empty() {
            self.chunks.remove(ci);
        } else if chunk.len() < CHUNK / 4 {
            // Keep chunks from thinning out under deletes: fold a small chunk into a
            // neighbour when both fit in half a chunk.
            let n = chunk.len();
            if ci > 0 && self.chunks[ci - 1].len() + n <= CHUNK / 2 {
                let this = self.chunks.remove(ci);
                self.chunks[ci - 1].extend(this);
            } else if ci + 1 < self.chunks.len() && n + self.chunks[ci + 1].len() <= CHUNK / 2 {
                let right = self.chunks.remove(ci + 1);
                self.chunks[ci].extend(right);
            }
        }
        Some(item)
    }

    /// Every item in key order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    /// The items from `start` (included) up to `end`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        start: &[u8],
        end: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = &'a T> + 'a {
        let (ci, at) = match self.chunk_for(start) {
            Some(ci) => (
                ci,
                self.chunks[ci].partition_point(|t| t.borrow().cmp(start) == Ordering::Less),
            ),
            None => (0, 0),
        };
        let first = self.chunks.get(ci).map_or(&[][..], |c| &c[at..]);
        let rest = self.chunks.get(ci + 1..).unwrap_or(&[]);
        first
            .iter()
            .chain(rest.iter().flatten())
            .take_while(move |t| match end {
                Bound::Included(end) => <T as Borrow<[u8]>>::borrow(t) <= end,
                Bound::Excluded(end) => <T as Borrow<[u8]>>::borrow(t) < end,
                Bound::Unbounded => true,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    fn key(n: u32) -> Vec<u8> {
        format!("k{n:06}").into_bytes()
    }

    fn check(s: &Sorted<Vec<u8>>, model: &BTreeSet<Vec<u8>>) {
        assert_eq!(s.len(), model.len());
        assert!(s.iter().eq(model.iter()));
        assert!(s.chunks.iter().all(|c| !c.is_empty() && c.len() <= CHUNK));
        assert!(s.chunks.iter().all(|c| c.capacity() == CHUNK));
    }

    #[test]
    fn matches_an_ordered_set_under_random_inserts_removes_and_ranges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut s = Sorted::default();
        let mut model = BTreeSet::new();
        for round in 0..20_000u32 {
            let k = key(rng.random_range(0..3_000));
            if rng.random_range(0..3) == 0 {
                assert_eq!(s.remove(&k).is_some(), model.remove(&k), "{round}");
            } else {
                assert_eq!(s.replace(k.clone()).is_some(), !model.insert(k), "{round}");
            }
            if round % 1_000 == 0 {
                check(&s, &model);
                let a = key(rng.random_range(0..3_100));
                let b = key(rng.random_range(0..3_100));
                let got: Vec<_> = s.range(&a, Bound::Excluded(&b)).collect();
                let want: Vec<_> = if a < b {
                    model
                        .range::<[u8], _>((Bound::Included(&a[..]), Bound::Excluded(&b[..])))
                        .collect()
                } else {
                    Vec::new()
                };
                assert_eq!(got, want);
                let got: Vec<_> = s.range(&a, Bound::Unbounded).collect();
                let want: Vec<_> = model
                    .range::<[u8], _>((Bound::Included(&a[..]), Bound::Unbounded))
                    .collect();
                assert_eq!(got, want);
            }
        }
        check(&s, &model);
        // Everything out again: no chunk left behind.
        for k in model.clone() {
            assert!(s.remove(&k).is_some());
        }
        assert_eq!(s.len(), 0);
        assert!(s.chunks.is_empty());
        assert_eq!(s.range(b"", Bound::Unbounded).count(), 0);
    }

    #[test]
    fn an_ascending_load_fills_every_chunk_but_the_last() {
        let mut s = Sorted::default();
        let n = CHUNK as u32 * 10 + 3;
        for i in 0..n {
            assert!(s.replace(key(i)).is_none());
        }
        assert_eq!(s.chunks.len(), 11);
        assert!(s.chunks[..10].iter().all(|c| c.len() == CHUNK));
        assert_eq!(s.range(&key(n - 2), Bound::Unbounded).count(), 2);
        assert_eq!(s.range(&key(5), Bound::Included(&key(9))).count(), 5);
    }

    #[test]
    fn deletes_fold_thin_chunks_together() {
        let mut s = Sorted::default();
        for i in 0..CHUNK as u32 * 8 {
            s.replace(key(i));
        }
        // Keep one key in sixteen.
        for i in 0..CHUNK as u32 * 8 {
            if i % 16 != 0 {
                s.remove(&key(i));
            }
        }
        assert_eq!(s.len(), CHUNK / 2);
        assert!(s.chunks.len() <= 4, "{} chunks", s.chunks.len());
        assert!(s.iter().map(|k| k.as_slice()).is_sorted());
    }
}

//! What to send: the request mix, the key distribution, keys and values.
//!
//! Everything is derived from a seed, so a run can be repeated exactly, and the same
//! generator drives every target (capkv and Redis) so that a comparison measures servers,
//! not generators.

use std::fmt;
use std::str::FromStr;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Share of reads in the request mix, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub read_percent: u8,
}

impl Mix {
    pub const READ_HEAVY: Mix = Mix { read_percent: 95 };
    pub const MIXED: Mix = Mix { read_percent: 50 };
    pub const WRITE_HEAVY: Mix = Mix { read_percent: 5 };
}

impl FromStr for Mix {
    type Err = String;

    /// `read` (95/5), `mixed` (50/50), `write` (5/95), `get` (100/0), `put` (0/100), or
    /// the read percentage as a number 0-100.
    fn from_str(s: &str) -> Result<Self, String> {
        let read_percent = match s {
            "read" => 95,
            "mixed" => 50,
            "write" => 5,
            "get" => 100,
            "put" => 0,
            n => n.parse::<u8>().ok().filter(|p| *p <= 100).ok_or_else(|| {
                format!("mix must be read|mixed|write|get|put or 0-100, not {s:?}")
            })?,
        };
        Ok(Mix { read_percent })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.read_percent, 100 - self.read_percent)
    }
}

/// How keys are picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyDist {
    Uniform,
    /// Zipfian with exponent `s` (YCSB uses 0.99): a few keys get most of the traffic.
    Zipf(f64),
}

impl FromStr for KeyDist {
    type Err = String;

    /// `uniform`, `zipf` (s = 0.99) or `zipf:S`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(KeyDist::Uniform),
            "zipf" => Ok(KeyDist::Zipf(0.99)),
            _ => s
                .strip_prefix("zipf:")
                .and_then(|x| x.parse::<f64>().ok())
                .filter(|x| *x > 0.0 && x.is_finite())
                .map(KeyDist::Zipf)
                .ok_or_else(|| format!("dist must be uniform, zipf or zipf:S, not {s:?}")),
        }
    }
}

impl fmt::Display for KeyDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyDist::Uniform => f.write_str("uniform"),
            KeyDist::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// The key for index `i`: the same shape as redis-benchmark's `key:__rand_int__`.
pub fn key(i: u64) -> Vec<u8> {
    // `format!("key:{i:012}")` without `fmt`: the generator makes one or more per call.
    const WIDTH: usize = 12;
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(i).as_bytes();
    let mut k = Vec::with_capacity(4 + WIDTH.max(digits.len()));
    k.extend_from_slice(b"key:");
    k.resize(4 + WIDTH.saturating_sub(digits.len()), b'0');
    k.extend_from_slice(digits);
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Put,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Get => "get",
            OpKind::Put => "put",
        }
    }
}

/// Distinct values handed out round robin: enough variety that values are not all equal,
/// few enough that generating them costs nothing during the run.
pub const VALUE_POOL: usize = 64;

/// A seeded stream of operations.
pub struct OpGen {
    rng: SmallRng,
    mix: Mix,
    keys: u64,
    zipf: Option<Zipf<f64>>,
    values: Vec<Vec<u8>>,
    next_value: usize,
}

impl OpGen {
    pub fn new(seed: u64, mix: Mix, keys: u64, dist: KeyDist, value_size: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let values = (0..VALUE_POOL)
            .map(|_| {
                let mut v = vec![0u8; value_size];
                rng.fill_bytes(&mut v);
                v
            })
            .collect();
        let zipf = match dist {
            KeyDist::Uniform => None,
            // Zipf::new fails only for n < 1 or a bad exponent, both excluded by parsing
            // and by `keys.max(1)`; fall back to uniform rather than panic.
            KeyDist::Zipf(s) => Zipf::new(keys.max(1) as f64, s).ok(),
        };
        Self {
            rng,
            mix,
            keys: keys.max(1),
            zipf,
            values,
            next_value: 0,
        }
    }

    pub fn key_index(&mut self) -> u64 {
        match &self.zipf {
            // Zipf samples 1..=n; rank 1 is the hottest key.
            Some(z) => (z.sample(&mut self.rng) as u64)
                .saturating_sub(1)
                .min(self.keys - 1),
            None => self.rng.random_range(0..self.keys),
        }
    }

    pub fn kind(&mut self) -> OpKind {
        if self.rng.random_range(0..100u8) < self.mix.read_percent {
            OpKind::Get
        } else {
            OpKind::Put
        }
    }

    pub fn value(&mut self) -> &[u8] {
        self.next_value = (self.next_value + 1) % self.values.len();
        &self.values[self.next_value]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse() {
        assert_eq!("read".parse::<Mix>().unwrap().read_percent, 95);
        assert_eq!("70".parse::<Mix>().unwrap().read_percent, 70);
        assert!("101".parse::<Mix>().is_err());
        assert!("sideways".parse::<Mix>().is_err());
        assert_eq!("zipf:1.2".parse::<KeyDist>().unwrap(), KeyDist::Zipf(1.2));
        assert!("zipf:-1".parse::<KeyDist>().is_err());
    }

    #[test]
    fn same_seed_same_stream_and_mix_is_respected() {
        let mut a = OpGen::new(7, Mix::READ_HEAVY, 1000, KeyDist::Uniform, 10);
        let mut b = OpGen::new(7, Mix::READ_HEAVY, 1000, KeyDist::Uniform, 10);
        let mut reads = 0;
        for _ in 0..10_000 {
            let (ka, kb) = (a.key_index(), b.key_index());
            assert_eq!(ka, kb);
            assert!(ka < 1000);
            let kind = a.kind();
            assert_eq!(kind, b.kind());
            reads += (kind == OpKind::Get) as u32;
        }
        assert!(
            (9_300..=9_700).contains(&reads),
            "{reads} reads of 10000 at 95%"
        );
    }

    #[test]
    fn zipf_concentrates_on_few_keys() {
        let mut g = OpGen::new(1, Mix::MIXED, 100_000, KeyDist::Zipf(0.99), 10);
        let hot = (0..10_000).filter(|_| g.key_index() < 100).count();
        assert!(hot > 3_000, "{hot} of 10000 hit the 100 hottest keys");
        assert_eq!(key(42), b"key:000000000042");
        assert_eq!(key(0), b"key:000000000000");
        // Past twelve digits the key grows, as `{:012}` does.
        assert_eq!(key(u64::MAX), format!("key:{:012}", u64::MAX).into_bytes());
        assert_eq!(key(999_999_999_999), b"key:999999999999");
    }
}

//! Bearer-token check for `Gateway.open` and `Gateway.admin`, with rotation.
//!
//! Tokens are hashed with SHA-256 and the digests compared in constant time: hashing
//! first means neither the content nor the length of the expected token leaks through
//! timing. A token is kept only as its digest. After a reload replaces the token, the
//! previous one stays valid for an overlap window, so clients can move over one by one.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Debug)]
pub struct Auth {
    current: Option<[u8; 32]>,
    /// The token before the last rotation, and when it stops being accepted.
    previous: Option<([u8; 32], Instant)>,
}

impl Auth {
    /// `None` disables the check (any token is accepted).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            current: token.map(digest),
            previous: None,
        }
    }

    /// The check after a reload set `token`: a changed token starts an overlap window in
    /// which the old one is still accepted; an unchanged one keeps any running window.
    /// Turning auth on takes effect at once (there was no old token to honour).
    pub fn rotate(&self, token: Option<&str>, overlap: Duration) -> Self {
        let new = token.map(digest);
        if new == self.current {
            return self.clone();
        }
        let previous = match self.current {
            Some(old) if !overlap.is_zero() && new.is_some() => {
                Some((old, Instant::now() + overlap))
            }
            _ => None,
        };
        Self {
            current: new,
            previous,
        }
    }

    /// Whether a token is required at all.
    pub fn is_enabled(&self) -> bool {
        self.current.is_some()
    }

    /// Whether a rotation's old token is still accepted.
    pub fn in_overlap(&self) -> bool {
        self.previous
            .is_some_and(|(_, until)| Instant::now() < until)
    }

    pub fn check(&self, given: &str) -> bool {
        let Some(current) = &self.current else {
            return true;
        };
        let given = digest(given);
        let ok_current: bool = given.ct_eq(current).into();
        let ok_previous = match &self.previous {
            Some((old, until)) if Instant::now() < *until => bool::from(given.ct_eq(old)),
            _ => false,
        };
        ok_current | ok_previous
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::Auth;
    use std::time::Duration;

    #[test]
    fn checks_tokens() {
        let a = Auth::new(Some("s3cret"));
        assert!(a.check("s3cret"));
        assert!(!a.check("s3cre"));
        assert!(!a.check(""));
        assert!(Auth::new(None).check("anything"));
    }

    #[test]
    fn rotation_keeps_the_old_token_for_the_overlap_only() {
        let a = Auth::new(Some("old"));
        let b = a.rotate(Some("new"), Duration::from_secs(60));
        assert!(b.check("new") && b.check("old") && !b.check("other"));
        assert!(b.in_overlap());
        // The same token again keeps the running window.
        let c = b.rotate(Some("new"), Duration::from_secs(60));
        assert!(c.check("old"));
        // No overlap: the old token ends at once.
        let d = a.rotate(Some("new"), Duration::ZERO);
        assert!(d.check("new") && !d.check("old"));
        // An ended window.
        let e = a.rotate(Some("new"), Duration::from_nanos(1));
        std::thread::yield_now();
        let later = std::time::Instant::now() + Duration::from_millis(1);
        while std::time::Instant::now() < later {
            std::hint::spin_loop();
        }
        assert!(!e.check("old"));
        // Turning auth on is immediate; turning it off accepts anything.
        let on = Auth::new(None).rotate(Some("t"), Duration::from_secs(60));
        assert!(on.check("t") && !on.check("x"));
        assert!(a.rotate(None, Duration::from_secs(60)).check("x"));
    }
}

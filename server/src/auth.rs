//! Bearer-token check for `Gateway.open`.
//!
//! Both tokens are hashed with SHA-256 and the digests compared in constant time: hashing
//! first means neither the content nor the length of the expected token leaks through
//! timing. The token itself is kept only as its digest.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone)]
pub struct Auth {
    expected_sha256: Option<[u8; 32]>,
}

impl Auth {
    /// `None` disables the check (any token is accepted).
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected_sha256: token.map(digest),
        }
    }

    pub fn check(&self, given: &str) -> bool {
        match &self.expected_sha256 {
            None => true,
            Some(expected) => bool::from(digest(given).ct_eq(expected)),
        }
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::Auth;

    #[test]
    fn checks_tokens() {
        let a = Auth::new(Some("s3cret"));
        assert!(a.check("s3cret"));
        assert!(!a.check("s3cre"));
        assert!(!a.check(""));
        assert!(Auth::new(None).check("anything"));
    }
}

//! Session tokens: what `KvStore.session` issues and `resumeSession` accepts.
//!
//! A token is 16 random bytes and a 16-byte tag, SHA-256(instance secret || nonce)
//! truncated. The secret belongs to the store's data (`Store::instance_secret`), so tokens
//! stay valid across restarts exactly as long as the idempotency records they scope, and
//! no state per session is kept: a token this data did not issue fails the tag check.
//! (A fixed-length input and a truncated tag leave no room for length extension.)

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const TOKEN_BYTES: usize = 32;

pub struct SessionTokens {
    secret: [u8; 32],
}

impl SessionTokens {
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; 16] {
        let digest = Sha256::new()
            .chain_update(self.secret)
            .chain_update(nonce)
            .finalize();
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&digest[..16]);
        tag
    }

    /// A new, unguessable token (128 random bits from the thread's CSPRNG).
    pub fn issue(&self) -> [u8; TOKEN_BYTES] {
        let nonce: [u8; 16] = rand::random();
        let mut token = [0u8; TOKEN_BYTES];
        token[..16].copy_from_slice(&nonce);
        token[16..].copy_from_slice(&self.tag(&nonce));
        token
    }

    /// Whether `token` was issued with this secret (constant time in the tag).
    pub fn verify(&self, token: &[u8]) -> bool {
        token.len() == TOKEN_BYTES && bool::from(self.tag(&token[..16]).ct_eq(&token[16..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_others_do_not() {
        let t = SessionTokens::new([7; 32]);
        let a = t.issue();
        assert!(t.verify(&a));
        assert_ne!(a, t.issue(), "random");
        let mut forged = a;
        forged[20] ^= 1;
        assert!(!t.verify(&forged));
        assert!(!t.verify(&a[..31]));
        assert!(
            !SessionTokens::new([8; 32]).verify(&a),
            "another store's token"
        );
    }
}

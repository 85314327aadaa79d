//! Keyed pseudonyms: `HMAC-SHA256(key, domain || value)`.
//!
//! Each kind of identifier has its own domain prefix, so an NHS number and a
//! practice code that happened to share digits could never share a pseudonym,
//! and a pseudonym of one kind cannot be replayed as another. The HMAC key
//! state is built once (ring precomputes the padded inner and outer blocks)
//! and reused for every value; collection hashes each distinct NHS number
//! once per practice batch.
//!
//! Without the key a pseudonym cannot be reversed or recomputed, so the key
//! never leaves the practice side; the store records only a key id derived
//! through the same HMAC, from which the key cannot be recovered.

use ring::hmac;

use super::key::CollectionKey;
use crate::nhs_number::NhsNumber;

/// Domain prefix for NHS numbers (docs/design.md §3).
pub const NHS_NUMBER_DOMAIN: &[u8] = b"gpdp/v1/nhs_number\0";
/// Domain prefix for practice ODS codes.
pub const PRACTICE_DOMAIN: &[u8] = b"gpdp/v1/practice\0";
const KEY_ID_DOMAIN: &[u8] = b"gpdp/v1/key-id\0";

pub type Pseudonym = [u8; 32];

#[derive(Clone)]
pub struct Pseudonymiser {
    key: hmac::Key,
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser(<keyed>)")
    }
}

impl Pseudonymiser {
    pub fn new(key: &CollectionKey) -> Pseudonymiser {
        Pseudonymiser {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.bytes()),
        }
    }

    fn sign(&self, domain: &[u8], value: &[u8]) -> Pseudonym {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(domain);
        ctx.update(value);
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    pub fn patient(&self, nhs: &NhsNumber) -> Pseudonym {
        self.sign(NHS_NUMBER_DOMAIN, nhs.as_bytes())
    }

    pub fn practice(&self, ods: &str) -> Pseudonym {
        self.sign(PRACTICE_DOMAIN, ods.as_bytes())
    }

    /// A public identifier of the key: 16 hex digits of SHA-256 over an HMAC
    /// of a fixed label. Tells stores and receipts apart by key without
    /// revealing anything about the key.
    pub fn key_id(&self) -> String {
        let derived = self.sign(KEY_ID_DOMAIN, b"");
        crate::digest::sha256_hex(&derived)[..16].to_owned()
    }
}

/// A pseudonym from the first 32 bytes of `bytes` (a `FixedSizeBinary(32)`
/// value read back from the store).
pub fn from_slice(bytes: &[u8]) -> Pseudonym {
    let mut p = [0u8; 32];
    p.copy_from_slice(&bytes[..32]);
    p
}

/// The TRE's counting key of a pseudonym: its first 8 bytes as a number.
pub fn patient_key(id: &Pseudonym) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id[..8]);
    i64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(byte: u8) -> CollectionKey {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, [byte; 32]).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        CollectionKey::load(&path).unwrap()
    }

    #[test]
    fn matches_the_formula_in_the_design() {
        // HMAC-SHA256 computed independently with the RustCrypto-free ring one-shot API.
        let k = key(7);
        let nhs = NhsNumber::parse(b"9434765919").unwrap();
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]),
            b"gpdp/v1/nhs_number\x009434765919",
        );
        assert_eq!(Pseudonymiser::new(&k).patient(&nhs), expected.as_ref());
    }

    #[test]
    fn domains_and_keys_separate_pseudonyms() {
        let (a, b) = (Pseudonymiser::new(&key(1)), Pseudonymiser::new(&key(2)));
        let nhs = NhsNumber::parse(b"9434765919").unwrap();
        assert_ne!(a.patient(&nhs), b.patient(&nhs));
        assert_ne!(a.patient(&nhs), a.practice("9434765919"));
        assert_ne!(a.key_id(), b.key_id());
        assert_eq!(a.key_id().len(), 16);
        assert!(!a.key_id().contains(&crate::digest::hex(&[1u8; 8])));
    }

    proptest! {
        /// Stable (same input, same pseudonym, from any instance) and
        /// distinct (different valid numbers, different pseudonyms).
        #[test]
        fn stable_and_distinct(a in 0u32..1_000_000_000, b in 0u32..1_000_000_000) {
            let (p, again) = (Pseudonymiser::new(&key(9)), Pseudonymiser::new(&key(9)));
            if let (Some(x), Some(y)) = (NhsNumber::from_prefix(a), NhsNumber::from_prefix(b)) {
                prop_assert_eq!(p.patient(&x), again.patient(&x));
                prop_assert_eq!(p.patient(&x) == p.patient(&y), x == y);
            }
        }
    }
}

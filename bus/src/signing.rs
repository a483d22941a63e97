//! Signed messages: the publisher signs each AMQP message body with Ed25519 and puts the
//! key id and signature in its headers; subscribers holding the publishers' public keys
//! verify them before decoding anything. Anyone who can write to the broker can then
//! still not inject or alter changes: an unsigned, forged or altered message is
//! dead-lettered with the reason, and a replayed genuine one is a duplicate.
//!
//! Why Ed25519 rather than HMAC: a subscriber (a laptop, another team's service) holds
//! only a public key, which cannot sign; with a shared HMAC key every subscriber could
//! forge messages for all the others. Key ids let keys rotate: subscribers list the old
//! and the new public key while the publisher switches. `ring` does the arithmetic (it is
//! in the build already, through rustls).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::collections::{BTreeMap, HashMap};

/// Header naming the key a message is signed with.
pub const KEY_HEADER: &str = "x-kausal-key";
/// Header holding the Ed25519 signature of the message body (base64).
pub const SIG_HEADER: &str = "x-kausal-sig";

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(
        "signing key {key_id:?}: {reason}; a signing key is the base64 of 32 random bytes, \
         as `kausal keygen` prints it"
    )]
    BadSecret { key_id: String, reason: String },
    #[error(
        "public key {key_id:?} in signing.keys: {reason}; use the public key `kausal keygen` \
         printed for it (base64 of 32 bytes)"
    )]
    BadPublic { key_id: String, reason: String },
}

/// The publisher's signing key. Its secret half is never printed.
pub struct Signer {
    key_id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({:?}, secret ***)", self.key_id)
    }
}

impl Signer {
    /// From the base64 seed `kausal keygen` prints.
    pub fn from_secret(key_id: &str, secret_base64: &str) -> Result<Signer, SigningError> {
        let bad = |reason: &str| SigningError::BadSecret {
            key_id: key_id.to_string(),
            reason: reason.to_string(),
        };
        let seed = B64
            .decode(secret_base64.trim())
            .map_err(|_| bad("not base64"))?;
        if seed.len() != 32 {
            return Err(bad(&format!("{} bytes, not 32", seed.len())));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| bad("rejected"))?;
        Ok(Signer {
            key_id: key_id.to_string(),
            pair,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature of `body`, base64.
    pub fn sign(&self, body: &[u8]) -> String {
        B64.encode(self.pair.sign(body).as_ref())
    }

    /// The public key (base64) subscribers list under this key id.
    pub fn public_key(&self) -> String {
        B64.encode(self.pair.public_key().as_ref())
    }
}

/// A new key: (secret, public), both base64.
pub fn generate() -> (String, String) {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .expect("the system's random source works");
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("32 bytes are a seed");
    (B64.encode(seed), B64.encode(pair.public_key().as_ref()))
}

/// The public keys a subscriber accepts, by key id.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    keys: HashMap<String, Vec<u8>>,
}

impl Verifier {
    pub fn new(keys: &BTreeMap<String, String>) -> Result<Verifier, SigningError> {
        let mut out = HashMap::new();
        for (id, b64) in keys {
            let bad = |reason: &str| SigningError::BadPublic {
                key_id: id.clone(),
                reason: reason.to_string(),
            };
            let key = B64.decode(b64.trim()).map_err(|_| bad("not base64"))?;
            if key.len() != 32 {
                return Err(bad(&format!("{} bytes, not 32", key.len())));
            }
            out.insert(id.clone(), key);
        }
        Ok(Verifier { keys: out })
    }

    /// Checks a message: `Err` is the reason it is not accepted.
    pub fn verify(&self, body: &[u8], signature: Option<&(String, String)>) -> Result<(), String> {
        let Some((key_id, sig)) = signature else {
            return Err(format!(
                "unsigned message: this app accepts only messages signed with one of its \
                 signing.keys ({})",
                self.names()
            ));
        };
        let Some(key) = self.keys.get(key_id) else {
            return Err(format!(
                "signed with key {key_id:?}, which is not among this app's signing.keys ({}): \
                 add its public key when the publisher rotates keys",
                self.names()
            ));
        };
        let sig = B64
            .decode(sig.trim())
            .map_err(|_| format!("signature of key {key_id:?} is not base64: forged or corrupt"))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(body, &sig)
            .map_err(|_| {
                format!(
                    "signature does not verify with key {key_id:?}: the message was forged or \
                     altered after signing"
                )
            })
    }

    fn names(&self) -> String {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(id: &str) -> (Signer, Verifier) {
        let (secret, public) = generate();
        let signer = Signer::from_secret(id, &secret).unwrap();
        assert_eq!(signer.public_key(), public);
        let verifier = Verifier::new(&BTreeMap::from([(id.to_string(), public)])).unwrap();
        (signer, verifier)
    }

    #[test]
    fn a_signed_body_verifies_and_any_change_is_caught() {
        let (signer, verifier) = pair("k1");
        let body = b"KSL\x01{\"envelopes\":[]}".to_vec();
        let sig = (signer.key_id().to_string(), signer.sign(&body));
        assert!(verifier.verify(&body, Some(&sig)).is_ok());
        let mut altered = body.clone();
        altered[5] ^= 1;
        assert!(verifier
            .verify(&altered, Some(&sig))
            .unwrap_err()
            .contains("forged or altered"));
        assert!(verifier
            .verify(&body, None)
            .unwrap_err()
            .contains("unsigned"));
        let (other, _) = pair("k1");
        let forged = ("k1".to_string(), other.sign(&body));
        assert!(verifier
            .verify(&body, Some(&forged))
            .unwrap_err()
            .contains("does not verify"));
        let unknown = ("k9".to_string(), signer.sign(&body));
        assert!(verifier
            .verify(&body, Some(&unknown))
            .unwrap_err()
            .contains("\"k9\""));
    }

    #[test]
    fn bad_keys_are_named_without_printing_them() {
        let err = Signer::from_secret("k1", "c2hvcnQ=")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("5 bytes, not 32") && !err.contains("c2hvcnQ"),
            "{err}"
        );
        let err = Verifier::new(&BTreeMap::from([("k1".into(), "%%".into())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        let (signer, _) = pair("k1");
        assert_eq!(format!("{signer:?}"), "Signer(\"k1\", secret ***)");
    }
}

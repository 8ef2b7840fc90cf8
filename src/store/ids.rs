//! De-identified storage of shoppers' ids (the `id_key` setting).
//!
//! With a key, every user id and session id is stored encrypted
//! deterministically with AES-SIV (RFC 5297, AES-SIV-CMAC-256 as RustCrypto's
//! `Aes256Siv`): the same id always gives the same stored text, so equality
//! lookups, grouping and unique keys work on the stored values as they did
//! on the clear ones, while a copy of the database does not show which
//! shopper did what. The code above the store only ever sees the shop's own
//! ids: they are encrypted on the way in (values written and values looked
//! for) and decrypted on the way out.
//!
//! Keys: the setting is 256 bits (64 hex digits). HKDF-SHA256 derives from
//! it the 512-bit AES-SIV key (two 256-bit halves: the CMAC key and the CTR
//! key) and, separately, a fingerprint the store keeps to recognise the key
//! it was written with. Neither reveals the other or the setting.
//!
//! Stored form: `~` followed by the synthetic IV and the ciphertext in URL-
//! safe base64 without padding. The id is padded with NUL bytes (which no
//! id holds: ids have no control characters) to a multiple of 16 bytes
//! before encryption, so that the stored text tells an id's length only to
//! within 16 bytes (an id of up to 16 bytes takes 44 characters). User ids
//! and session ids are encrypted with different associated data, so equal
//! strings in the two columns do not match.

use std::fmt;
use std::sync::Arc;

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hkdf::Hkdf;
use serde::{Deserialize, Deserializer};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Ids are padded to a multiple of this many bytes before encryption.
const PAD: usize = 16;

/// What encrypted ids start with (the shop's own may too: the store's
/// fingerprint, not the text, says whether its ids are encrypted).
pub const PREFIX: char = '~';

const SALT: &[u8] = b"recd id_key";
const CIPHER_INFO: &[u8] = b"recd shopper ids: AES-SIV-CMAC-256 key";
const FINGERPRINT_INFO: &[u8] = b"recd id_key fingerprint";

/// The kind of id, bound into its ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    User,
    Session,
}

impl IdKind {
    fn associated_data(self) -> &'static [u8] {
        match self {
            IdKind::User => b"user_id",
            IdKind::Session => b"session_id",
        }
    }
}

/// The `id_key` setting: 256 bits, a secret. It never prints (Debug shows
/// `IdKey(***)`), and its bytes are wiped when dropped.
#[derive(Clone)]
pub struct IdKey(Zeroizing<[u8; 32]>);

impl IdKey {
    /// 64 hex digits (either case; surrounding blanks ignored).
    pub fn parse(text: &str) -> Result<IdKey, String> {
        let text = text.trim();
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, &mut key[..])
            .map_err(|_| "id_key must be 256 bits written as 64 hex digits".to_owned())?;
        Ok(IdKey(key))
    }

    /// What the store keeps to recognise this key: 32 bytes derived from it
    /// with HKDF-SHA256 (another derivation than the cipher's key), in hex.
    pub fn fingerprint(&self) -> String {
        let mut out = [0u8; 32];
        Hkdf::<Sha256>::new(Some(SALT), &self.0[..])
            .expand(FINGERPRINT_INFO, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        hex::encode(out)
    }

    fn cipher_key(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        Hkdf::<Sha256>::new(Some(SALT), &self.0[..])
            .expand(CIPHER_INFO, &mut out[..])
            .expect("64 bytes is a valid HKDF-SHA256 length");
        out
    }
}

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(***)")
    }
}

/// The setting as written: a string, or anything else (a key of decimal
/// digits only, read from the environment, comes as a number), which is
/// refused without being shown.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawKey {
    Text(String),
    Other(serde::de::IgnoredAny),
}

fn key_text<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    match RawKey::deserialize(d)? {
        RawKey::Text(text) => Ok(Zeroizing::new(text)),
        RawKey::Other(_) => Err(serde::de::Error::custom(
            "id_key must be 64 hex digits written as a string (a key of decimal digits only is read as a number: \
             quote it)",
        )),
    }
}

impl<'de> Deserialize<'de> for IdKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IdKey::parse(&key_text(d)?).map_err(serde::de::Error::custom)
    }
}

/// An empty `id_key` (the default) means none.
pub fn optional_id_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IdKey>, D::Error> {
    let text = key_text(d)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    IdKey::parse(&text).map(Some).map_err(serde::de::Error::custom)
}

/// A stored id that does not decrypt with the store's key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a stored {0:?} id does not decrypt with id_key")]
pub struct Undecryptable(pub IdKind);

/// How the store writes and reads shoppers' ids: as they are, or encrypted.
#[derive(Clone, Default)]
pub struct Ids(Option<Arc<Cipher>>);

pub struct Cipher {
    key: Zeroizing<[u8; 64]>,
    fingerprint: String,
}

impl fmt::Debug for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Ids(clear)"),
            Some(_) => f.write_str("Ids(encrypted)"),
        }
    }
}

impl Ids {
    pub fn new(key: Option<&IdKey>) -> Ids {
        Ids(key.map(|key| {
            Arc::new(Cipher {
                key: key.cipher_key(),
                fingerprint: key.fingerprint(),
            })
        }))
    }

    /// Whether ids are encrypted.
    pub fn encrypted(&self) -> bool {
        self.0.is_some()
    }

    /// The key's fingerprint, when there is a key.
    pub fn fingerprint(&self) -> Option<&str> {
        self.0.as_ref().map(|c| c.fingerprint.as_str())
    }

    /// The stored form of an id.
    pub fn seal(&self, kind: IdKind, id: &str) -> String {
        match &self.0 {
            None => id.to_owned(),
            Some(cipher) => {
                let mut padded = id.as_bytes().to_vec();
                padded.resize(id.len().div_ceil(PAD).max(1) * PAD, 0);
                let mut siv = Aes256Siv::new((&*cipher.key).into());
                let sealed = siv
                    .encrypt([kind.associated_data()], &padded)
                    .expect("AES-SIV encrypts any id");
                let mut text = String::with_capacity(1 + sealed.len().div_ceil(3) * 4);
                text.push(PREFIX);
                URL_SAFE_NO_PAD.encode_string(&sealed, &mut text);
                text
            }
        }
    }

    /// The stored form of an optional id.
    pub fn seal_opt(&self, kind: IdKind, id: Option<&str>) -> Option<String> {
        id.map(|id| self.seal(kind, id))
    }

    /// The shop's id from its stored form.
    pub fn open(&self, kind: IdKind, stored: String) -> Result<String, Undecryptable> {
        let Some(cipher) = &self.0 else {
            return Ok(stored);
        };
        let bytes = stored
            .strip_prefix(PREFIX)
            .and_then(|b64| URL_SAFE_NO_PAD.decode(b64).ok())
            .ok_or(Undecryptable(kind))?;
        let mut siv = Aes256Siv::new((&*cipher.key).into());
        let mut clear = siv
            .decrypt([kind.associated_data()], &bytes)
            .map_err(|_| Undecryptable(kind))?;
        let len = clear.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
        clear.truncate(len);
        String::from_utf8(clear).map_err(|_| Undecryptable(kind))
    }

    pub fn open_opt(&self, kind: IdKind, stored: Option<String>) -> Result<Option<String>, Undecryptable> {
        stored.map(|s| self.open(kind, s)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const OTHER: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn keys_parse_and_never_print() {
        let key = IdKey::parse(KEY).unwrap();
        assert_eq!(format!("{key:?}"), "IdKey(***)");
        assert!(IdKey::parse("abc").is_err());
        assert!(IdKey::parse(&KEY.replace('0', "g")).is_err());
        assert!(IdKey::parse(&format!("{KEY}00")).is_err());
        let ids = Ids::new(Some(&key));
        assert_eq!(format!("{ids:?}"), "Ids(encrypted)");
    }

    #[test]
    fn deterministic_and_reversible() {
        let ids = Ids::new(Some(&IdKey::parse(KEY).unwrap()));
        let a = ids.seal(IdKind::User, "alice@example.com");
        assert_eq!(a, ids.seal(IdKind::User, "alice@example.com"));
        assert!(a.starts_with(PREFIX) && !a.contains("alice"), "{a}");
        assert_ne!(a, ids.seal(IdKind::User, "bob"));
        assert_ne!(a, ids.seal(IdKind::Session, "alice@example.com"));
        assert_eq!(ids.open(IdKind::User, a.clone()).unwrap(), "alice@example.com");
        // Not under another kind, nor under another key.
        assert!(ids.open(IdKind::Session, a.clone()).is_err());
        let other = Ids::new(Some(&IdKey::parse(OTHER).unwrap()));
        assert_ne!(other.seal(IdKind::User, "alice@example.com"), a);
        assert!(other.open(IdKind::User, a).is_err());
        assert!(ids.open(IdKind::User, "alice".into()).is_err());
    }

    #[test]
    fn lengths_show_only_to_within_16_bytes() {
        let ids = Ids::new(Some(&IdKey::parse(KEY).unwrap()));
        let len = |id: &str| ids.seal(IdKind::User, id).len();
        assert_eq!(len("a"), len("abcdefghijklmnop"));
        assert_eq!(len("a"), 1 + (16 + 16usize).div_ceil(3) * 4 - 1);
        assert!(len("abcdefghijklmnopq") > len("a"));
        for id in [
            "a",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
            "ünïcødé-1",
            &"x".repeat(128),
        ] {
            assert_eq!(ids.open(IdKind::User, ids.seal(IdKind::User, id)).unwrap(), id);
        }
    }

    #[test]
    fn clear_without_a_key() {
        let ids = Ids::default();
        assert_eq!(ids.seal(IdKind::User, "u1"), "u1");
        assert_eq!(ids.open(IdKind::User, "u1".into()).unwrap(), "u1");
        assert_eq!(ids.fingerprint(), None);
    }

    #[test]
    fn fingerprints_differ_per_key_and_from_the_cipher_key() {
        let a = IdKey::parse(KEY).unwrap();
        let b = IdKey::parse(OTHER).unwrap();
        assert_eq!(
            a.fingerprint(),
            IdKey::parse(&KEY.to_uppercase()).unwrap().fingerprint()
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        assert!(!hex::encode(&a.cipher_key()[..]).contains(&a.fingerprint()));
    }
}

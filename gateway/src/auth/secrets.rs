//! Secrets: API keys, session tokens and one-time codes are random, shown once, and stored
//! only as their SHA-256.

use sha2::{Digest as _, Sha256};

/// Every API key starts with this, so a leaked key is recognisable (secret scanners).
pub const KEY_PREFIX: &str = "sk-maas-";
/// Every session token starts with this.
pub const SESSION_PREFIX: &str = "maas_st_";
/// Characters of a key shown in lists, the prefix included.
pub const VISIBLE_KEY_CHARS: usize = 16;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `len` characters of base62 from the operating system's random source (version 4
/// UUIDs carry 122 random bits each; rejection sampling keeps every character uniform).
fn random_base62(len: usize) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for byte in uuid::Uuid::new_v4().into_bytes() {
            // 248 = 4 * 62: bytes at or above it would bias the first characters.
            if byte < 248 && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(byte % 62)]));
            }
        }
    }
    out
}

/// A new API key: `sk-maas-` and 40 base62 characters (about 238 bits).
pub fn new_api_key() -> String {
    format!("{KEY_PREFIX}{}", random_base62(40))
}

/// A new session token.
pub fn new_session_token() -> String {
    format!("{SESSION_PREFIX}{}", random_base62(40))
}

/// A six-digit one-time code.
pub fn new_code() -> String {
    let mut digits = String::with_capacity(6);
    while digits.len() < 6 {
        for byte in uuid::Uuid::new_v4().into_bytes() {
            if byte < 250 && digits.len() < 6 {
                digits.push(char::from(b'0' + byte % 10));
            }
        }
    }
    digits
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The part of a key shown in lists and errors.
pub fn visible_prefix(key: &str) -> String {
    key.chars().take(VISIBLE_KEY_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_their_shape_and_differ() {
        let key = new_api_key();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 40, "{key}");
        assert!(key[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(new_api_key(), key);
        assert!(new_session_token().starts_with(SESSION_PREFIX));
        let code = new_code();
        assert!(code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()), "{code}");
        assert_eq!(visible_prefix(&key).len(), VISIBLE_KEY_CHARS);
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}

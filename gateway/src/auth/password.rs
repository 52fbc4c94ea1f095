//! Passwords: argon2id hashes (the PHC string format, so parameters can change later and
//! old hashes still verify), and a strength check by zxcvbn with the estimator's own
//! feedback as the reason.

use std::fmt::Write as _;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// The longest password accepted (argon2 takes any length; this bounds the work).
pub const MAX_PASSWORD_BYTES: usize = 256;

/// Why a password was refused; the message is shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WeakPassword(pub String);

/// Refuses a password scoring under `min_score` (zxcvbn's 0 to 4), saying why and what to
/// do, in the estimator's words where it has them. `user_inputs` (the email, the name)
/// count against the password.
pub fn check_strength(password: &str, min_score: u8, user_inputs: &[&str]) -> Result<(), WeakPassword> {
    if password.len() < 8 {
        return Err(WeakPassword("a password needs at least 8 characters".into()));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(WeakPassword(format!("a password may have at most {MAX_PASSWORD_BYTES} bytes")));
    }
    let estimate = zxcvbn::zxcvbn(password, user_inputs);
    let score = u8::from(estimate.score());
    if score >= min_score {
        return Ok(());
    }
    let mut reason = format!("this password is too easy to guess (strength {score} of 4, {min_score} needed)");
    if let Some(feedback) = estimate.feedback() {
        if let Some(warning) = feedback.warning() {
            let _ = write!(reason, ": {warning}");
        }
        let suggestions: Vec<String> = feedback.suggestions().iter().map(ToString::to_string).collect();
        if !suggestions.is_empty() {
            let _ = write!(reason, "; {}", suggestions.join(" "));
        }
    }
    Err(WeakPassword(reason))
}

/// An argon2id hash with a random salt, in PHC string form. CPU-heavy (tens of
/// milliseconds): call it from `spawn_blocking`.
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_default()
}

/// Whether `password` matches `stored` (a PHC string). CPU-heavy, like [`hash`].
pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let first = hash("correct horse battery staple");
        assert!(first.starts_with("$argon2id$"), "{first}");
        assert!(verify("correct horse battery staple", &first));
        assert!(!verify("correct horse battery stapler", &first));
        assert_ne!(hash("correct horse battery staple"), first);
        assert!(!verify("anything", "not a phc string"));
    }

    #[test]
    fn weak_passwords_are_refused_with_a_reason() {
        let cases: &[(&str, u8, &[&str], Option<&str>)] = &[
            ("short", 0, &[], Some("at least 8 characters")),
            ("password", 3, &[], Some("too easy to guess")),
            ("12345678", 3, &[], Some("too easy to guess")),
            ("alice@example.com", 3, &["alice@example.com"], Some("too easy to guess")),
            ("password", 0, &[], None),
            ("plum-Harbour-sings-92-quietly", 3, &[], None),
        ];
        for (password, min, inputs, expected) in cases {
            let result = check_strength(password, *min, inputs);
            match expected {
                None => assert!(result.is_ok(), "{password}: {result:?}"),
                Some(text) => {
                    let err = result.expect_err(password);
                    assert!(err.0.contains(text), "{password}: {err}");
                }
            }
        }
        assert!(check_strength(&"x".repeat(300), 0, &[]).is_err());
    }
}

//! The cluster secret: loaded from a file or the environment, never printed.

use std::path::Path;

use crate::LinkError;

/// Least accepted secret length in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Environment variable holding the secret when no file is given.
pub const SECRET_ENV: &str = "FTVM_FT_SECRET";

const HOW: &str = "make one with `head -c 32 /dev/urandom | base64 > /etc/ftvm/secret` \
                   and copy the same file to both nodes";

/// The cluster secret both nodes share (at least [`MIN_SECRET_LEN`] bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Checks the length of `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, LinkError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(LinkError::Secret(format!(
                "the cluster secret is {} bytes; use at least {MIN_SECRET_LEN} ({HOW})",
                bytes.len()
            )));
        }
        Ok(Secret(bytes))
    }

    /// Reads the secret from `file` (surrounding whitespace trimmed) or, without one, from
    /// `FTVM_FT_SECRET`; `flag` names the command-line option in the error.
    pub fn load(file: Option<&Path>, flag: &str) -> Result<Secret, LinkError> {
        let raw = match file {
            Some(f) => std::fs::read(f).map_err(|e| {
                LinkError::Secret(format!(
                    "cannot read the cluster secret {}: {e}",
                    f.display()
                ))
            })?,
            None => match std::env::var(SECRET_ENV) {
                Ok(s) => s.into_bytes(),
                Err(_) => {
                    return Err(LinkError::Secret(format!(
                        "this needs the cluster secret: {flag} PATH or {SECRET_ENV} ({HOW})"
                    )))
                }
            },
        };
        Secret::new(raw.trim_ascii())
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secret_refused_and_never_printed() {
        let e = Secret::new(&b"short"[..]).unwrap_err().to_string();
        assert!(e.contains("at least 16") && e.contains("urandom"), "{e}");
        let s = Secret::new(&b"0123456789abcdef"[..]).unwrap();
        assert!(!format!("{s:?}").contains("0123"));
    }

    #[test]
    fn file_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("ftvm-link-secret-{}", std::process::id()));
        std::fs::write(&dir, b"  0123456789abcdef\n").unwrap();
        let s = Secret::load(Some(&dir), "--secret-file").unwrap();
        assert_eq!(s.as_bytes(), b"0123456789abcdef");
        std::fs::remove_file(&dir).unwrap();
    }
}

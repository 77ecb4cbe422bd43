//! Who may use the admin API: bearer tokens read from `ADMIN_TOKEN_FILE`.
//!
//! The file has one token per line, optionally named `<operator>:<token>` (the name is what the
//! logs say did an action; a bare token is operator `admin`). Empty lines and lines starting with
//! `#` are ignored. A token must be at least [`MIN_TOKEN_LEN`] characters.
//!
//! **Invariant:** a presented token is compared with every configured one in constant time (of
//! their SHA-256 digests, so neither the length nor the content of a token leaks through timing),
//! and no token, presented or configured, is ever logged.

use aws_lc_rs::digest::{SHA256, digest};
use std::path::Path;

/// The shortest token accepted in the file.
pub const MIN_TOKEN_LEN: usize = 16;

/// The configured tokens, as digests.
pub struct Tokens {
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("operators", &self.entries.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .finish()
    }
}

/// Why a request was refused (the metric label and the log's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <token>`.
    Malformed,
    /// A token that is not in the file.
    UnknownToken,
}

impl Refusal {
    /// A short stable name.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownToken => "unknown_token",
        }
    }
}

fn sha256(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, s.as_bytes()).as_ref());
    out
}

impl Tokens {
    /// Reads and checks the token file; the error names the file and the line, never a token.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("ADMIN_TOKEN_FILE {}: cannot read it: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("ADMIN_TOKEN_FILE {}: {e}", path.display()))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = match line.split_once(':') {
                Some((name, token)) => (name.trim(), token.trim()),
                None => ("admin", line),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c)) {
                return Err(format!(
                    "line {}: the operator name must be letters, digits, . _ @ or -",
                    n + 1
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: a token must be at least {MIN_TOKEN_LEN} characters",
                    n + 1
                ));
            }
            entries.push((name.to_owned(), sha256(token)));
        }
        if entries.is_empty() {
            return Err("no token in the file".into());
        }
        Ok(Self { entries })
    }

    /// The operator whose token `authorization` (the header's value) carries.
    pub fn check(&self, authorization: Option<&str>) -> Result<&str, Refusal> {
        let value = authorization.ok_or(Refusal::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Malformed)?;
        let presented = sha256(token);
        // Every entry is compared, whatever matched, so the time does not tell which one did.
        let mut found = None;
        for (name, expected) in &self.entries {
            if aws_lc_rs::constant_time::verify_slices_are_equal(expected, &presented).is_ok() && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found.ok_or(Refusal::UnknownToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_bare_tokens_are_recognised_and_others_refused() {
        let tokens = Tokens::parse("# operators\nalice:0123456789abcdef0123\n\nfedcba9876543210fedc\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tokens.check(Some("Bearer 0123456789abcdef0123")), Ok("alice"));
        assert_eq!(tokens.check(Some("Bearer fedcba9876543210fedc")), Ok("admin"));
        assert_eq!(
            tokens.check(Some("Bearer 0123456789abcdef012")),
            Err(Refusal::UnknownToken)
        );
        assert_eq!(tokens.check(Some("Basic abc")), Err(Refusal::Malformed));
        assert_eq!(tokens.check(Some("Bearer ")), Err(Refusal::Malformed));
        assert_eq!(tokens.check(None), Err(Refusal::Missing));
    }

    #[test]
    fn short_tokens_bad_names_and_empty_files_are_refused_without_echoing_the_token() {
        let short = Tokens::parse("alice:short").unwrap_err();
        assert!(short.contains("line 1") && !short.contains("short"), "{short}");
        assert!(Tokens::parse("al ice:0123456789abcdef0123").is_err());
        assert!(Tokens::parse("# nothing\n\n").is_err());
        let debug = format!(
            "{:?}",
            Tokens::parse("bob:0123456789abcdef0123").unwrap_or_else(|e| panic!("{e}"))
        );
        assert!(debug.contains("bob") && !debug.contains("0123456789"), "{debug}");
    }
}

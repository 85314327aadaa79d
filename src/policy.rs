//! Policies: the typed, validated form of the TOML files in `policies/`.
//!
//! A policy is parsed and checked once, here; every later stage receives
//! these values, never raw TOML. Errors carry the file and line so that an
//! information-governance officer editing a policy can fix it without
//! reading code.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Classify, ExitStatus};

/// The policy shipped in `policies/collection.toml`, compiled in so that
/// `gpdp demo` and `gpdp synth` work from any directory.
pub const DEFAULT_COLLECTION_POLICY: &str = include_str!("../policies/collection.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl Classify for PolicyError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::BadInput
    }
}

/// How a Type 1 opt-out is recorded in the GP record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type1Codes {
    pub dissent: Vec<String>,
    pub withdrawn: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CollectionPolicy {
    pub type1: Type1Codes,
    /// SHA-256 of the policy text, recorded with every batch it governs.
    pub sha256: String,
}

#[derive(Deserialize)]
struct RawCollection {
    version: u32,
    type1: RawType1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType1 {
    dissent_codes: Vec<String>,
    withdrawn_codes: Vec<String>,
}

impl CollectionPolicy {
    /// Loads `path`, or the compiled-in default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<CollectionPolicy, PolicyError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                CollectionPolicy::parse(&text, path)
            }
            None => CollectionPolicy::parse(
                DEFAULT_COLLECTION_POLICY,
                Path::new("policies/collection.toml (built in)"),
            ),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<CollectionPolicy, PolicyError> {
        let raw: RawCollection = toml::from_str(text).map_err(|e| syntax_error(e, text, path))?;
        let invalid = |message: String| PolicyError::Invalid {
            path: path.to_owned(),
            message,
        };
        if raw.version != 1 {
            return Err(invalid(format!(
                "unsupported policy version {} (this gpdp reads version 1)",
                raw.version
            )));
        }
        let t = raw.type1;
        if t.dissent_codes.is_empty() || t.withdrawn_codes.is_empty() {
            return Err(invalid(
                "[type1] needs at least one dissent code and one withdrawn code".into(),
            ));
        }
        for code in t.dissent_codes.iter().chain(&t.withdrawn_codes) {
            if code.is_empty() || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!(
                    "[type1] code {code:?} is not a SNOMED CT concept id (digits only)"
                )));
            }
        }
        if let Some(both) = t
            .dissent_codes
            .iter()
            .find(|c| t.withdrawn_codes.contains(c))
        {
            return Err(invalid(format!(
                "[type1] code {both} is listed both as dissent and as withdrawn"
            )));
        }
        Ok(CollectionPolicy {
            type1: Type1Codes {
                dissent: t.dissent_codes,
                withdrawn: t.withdrawn_codes,
            },
            sha256: sha256_hex(text.as_bytes()),
        })
    }
}

fn syntax_error(e: toml::de::Error, text: &str, path: &Path) -> PolicyError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(0);
    PolicyError::Syntax {
        path: path.to_owned(),
        line,
        message: e.message().to_owned(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_parses() {
        let p = CollectionPolicy::load(None).unwrap();
        assert_eq!(p.type1.dissent, ["827241000000103"]);
        assert_eq!(p.type1.withdrawn, ["827261000000102"]);
        assert_eq!(p.sha256.len(), 64);
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let text = "version = 1\n[type1]\ndissent_codes = [\"1\"]\nwithdrawn_codes = [\"2\"]\nsurprise = 3\n";
        let err = CollectionPolicy::parse(text, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.toml:5:"), "{err}");
        assert!(err.contains("surprise"), "{err}");
        let both = "version = 1\n[type1]\ndissent_codes = [\"1\"]\nwithdrawn_codes = [\"1\"]\n";
        let err = CollectionPolicy::parse(both, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both as dissent and as withdrawn"), "{err}");
    }
}

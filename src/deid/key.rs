//! The collection key: 32 random bytes that make pseudonyms unguessable.
//!
//! `patient_id = HMAC-SHA256(key, "gpdp/v1/nhs_number\0" || nhs_number)`.
//! Whoever holds the key can re-identify by hashing candidate NHS numbers,
//! so the key stays on the practice side: it never enters the store, a log
//! or an error message, and the file must not be readable by group or world.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Classify, ExitStatus};

pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{} already exists; gpdp keygen never overwrites a key (pseudonyms made with it would become unmatchable)", .0.display())]
    Exists(PathBuf),
    #[error("cannot write key file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {} holds {len} bytes; a collection key is exactly {KEY_LEN} bytes (make one with `gpdp keygen`)", path.display())]
    WrongLength { path: PathBuf, len: usize },
    #[error("key file {} is readable by group or others (mode {mode:o}); run `chmod 600` on it", path.display())]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("the system random number generator failed")]
    Random,
}

impl Classify for KeyError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            KeyError::Random => ExitStatus::Internal,
            _ => ExitStatus::BadInput,
        }
    }
}

/// Secret key bytes. `Debug` never shows them.
pub struct CollectionKey([u8; KEY_LEN]);

impl std::fmt::Debug for CollectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CollectionKey(<secret>)")
    }
}

impl CollectionKey {
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Reads a key file, refusing one of the wrong size or one that others can read.
    pub fn load(path: &Path) -> Result<CollectionKey, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let key: [u8; KEY_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::WrongLength {
                    path: path.to_owned(),
                    len: bytes.len(),
                })?;
        Ok(CollectionKey(key))
    }
}

/// Writes 32 bytes from the operating system's CSPRNG to a new file with
/// mode 0600. Refuses to overwrite anything.
pub fn generate(path: &Path) -> Result<(), KeyError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| KeyError::Random)?;
    let write = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_owned()),
            _ => write(e),
        })?;
    // The umask can only remove bits; set 0600 explicitly anyway.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write)?;
    file.write_all(&key).map_err(write)?;
    file.sync_all().map_err(write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = CollectionKey::load(&path).unwrap();
        assert_ne!(key.bytes(), &[0u8; KEY_LEN]);
        assert!(matches!(generate(&path), Err(KeyError::Exists(_))));
        assert_eq!(CollectionKey::load(&path).unwrap().bytes(), key.bytes());
        assert_eq!(format!("{key:?}"), "CollectionKey(<secret>)");
    }

    #[test]
    fn refuses_open_or_short_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, [1u8; KEY_LEN]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            CollectionKey::load(&path),
            Err(KeyError::TooOpen { .. })
        ));
        std::fs::write(&path, [1u8; 5]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            CollectionKey::load(&path),
            Err(KeyError::WrongLength { len: 5, .. })
        ));
    }
}

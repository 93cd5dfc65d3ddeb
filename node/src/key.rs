//! The node's ed25519 key: it signs receipts and node records and is the libp2p identity,
//! so the `PeerId` carries the public key that verifies them.
//!
//! Key files are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the format of
//! `openssl genpkey -algorithm ed25519`, created with mode 0600.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use libp2p::PeerId;
use libp2p::identity::Keypair;

/// Errors of reading and writing key files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key file {path} not found; create one with `expertnet-node keygen --out {path}`")]
    NotFound { path: PathBuf },
    #[error(
        "key file {path} is not a PKCS#8 PEM ed25519 private key ({reason}); the file was left unchanged: fix it, or point --key at another path to create a new key"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error("key file {path} already exists; it was left unchanged")]
    Exists { path: PathBuf },
    #[error("cannot access key file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// A node's secret key with its derived libp2p identity.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
    keypair: Keypair,
    peer_id: PeerId,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// Generates a key from the operating system's random source.
    ///
    /// # Errors
    /// [`KeyError::Random`] when the random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_secret(secret))
    }

    /// Builds a key from a 32-byte ed25519 secret; tests use fixed secrets.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&secret);
        let mut copy = secret;
        // `ed25519_from_bytes` only fails for inputs that are not 32 bytes long.
        let keypair = Keypair::ed25519_from_bytes(&mut copy)
            .unwrap_or_else(|_| unreachable!("a 32-byte secret is always a valid ed25519 key"));
        let peer_id = keypair.public().to_peer_id();
        Self {
            signing,
            keypair,
            peer_id,
        }
    }

    /// Reads a key file.
    ///
    /// # Errors
    /// [`KeyError::NotFound`], [`KeyError::Malformed`] or [`KeyError::Io`].
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    path: path.to_owned(),
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                return Err(KeyError::Malformed {
                    path: path.to_owned(),
                    reason: "the file is not UTF-8 text".to_owned(),
                });
            }
            Err(source) => {
                return Err(KeyError::Io {
                    path: path.to_owned(),
                    error: source,
                });
            }
        };

        let malformed = |reason: String| KeyError::Malformed {
            path: path.to_owned(),
            reason,
        };
        if text.trim().is_empty() {
            return Err(malformed("the file is empty".to_owned()));
        }
        if !text.contains("-----BEGIN PRIVATE KEY-----") {
            return Err(malformed(
                "the file has no '-----BEGIN PRIVATE KEY-----' line".to_owned(),
            ));
        }
        let signing = SigningKey::from_pkcs8_pem(&text)
            .map_err(|error| malformed(format!("the key inside cannot be decoded: {error}")))?;
        warn_if_readable_by_others(path);
        Ok(Self::from_secret(signing.to_bytes()))
    }

    /// Writes the key to a new file with mode 0600, creating missing parent folders.
    ///
    /// # Errors
    /// [`KeyError::Exists`] when the file exists (it is never overwritten), [`KeyError::Io`].
    pub fn save_new(&self, path: &Path) -> Result<(), KeyError> {
        let io_error = |source| KeyError::Io {
            path: path.to_owned(),
            error: source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }

        let pem = self
            .signing
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|error| KeyError::Malformed {
                path: path.to_owned(),
                reason: error.to_string(),
            })?;

        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io_error(source)
            }
        })?;
        file.write_all(pem.as_bytes()).map_err(io_error)?;
        file.sync_all().map_err(io_error)
    }

    /// Reads the key file, or creates it with a new key when it does not exist. Returns the
    /// key and whether it was created. A file that exists but cannot be parsed is an error
    /// and is never replaced.
    ///
    /// # Errors
    /// As [`NodeKey::load`] and [`NodeKey::save_new`], except [`KeyError::NotFound`].
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        match Self::load(path) {
            Ok(key) => Ok((key, false)),
            Err(KeyError::NotFound { .. }) => {
                let key = Self::generate()?;
                match key.save_new(path) {
                    Ok(()) => Ok((key, true)),
                    // Another process created it first: use theirs.
                    Err(KeyError::Exists { .. }) => Ok((Self::load(path)?, false)),
                    Err(error) => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The libp2p keypair built from the same secret.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;

    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "key file is readable by other users; run `chmod 600` on it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_embeds_the_signing_key() {
        let key = NodeKey::from_secret([3; 32]);
        let public =
            libp2p::identity::PublicKey::try_decode_protobuf(key.peer_id().as_ref().digest())
                .unwrap();
        let embedded = public.try_into_ed25519().unwrap().to_bytes();
        assert_eq!(&embedded, key.verifying_key().as_bytes());
    }

    #[test]
    fn missing_file_is_created_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let (key, created) = NodeKey::load_or_create(&path).unwrap();
        assert!(created);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        let (again, created) = NodeKey::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.peer_id(), key.peer_id());
    }

    #[test]
    fn malformed_file_is_rejected_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let cases: [&[u8]; 3] = [
            b"not a key\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            &[0xff, 0xfe, 0x00, 0x01],
        ];
        for content in cases {
            std::fs::write(&path, content).unwrap();
            let error = NodeKey::load_or_create(&path).unwrap_err();
            assert!(matches!(error, KeyError::Malformed { .. }), "{error}");
            assert!(error.to_string().contains("node.key"), "{error}");
            assert_eq!(std::fs::read(&path).unwrap(), content);
        }
    }

    #[test]
    fn save_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        NodeKey::from_secret([1; 32]).save_new(&path).unwrap();
        let error = NodeKey::from_secret([2; 32]).save_new(&path).unwrap_err();
        assert!(matches!(error, KeyError::Exists { .. }));
        assert_eq!(
            NodeKey::load(&path).unwrap().peer_id(),
            NodeKey::from_secret([1; 32]).peer_id()
        );
    }
}

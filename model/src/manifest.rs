//! Model manifests: the blake3 digest of every expert's weights and of `config.json`, made
//! once per checkpoint and shipped beside it. The model id is derived from the manifest, so
//! two checkpoints with different weights never share a name.

use std::path::{Path, PathBuf};

use expertnet_proto::Digest;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::TensorRef;
use crate::{Checkpoint, ModelError};

/// File name of the manifest inside a checkpoint folder.
pub const MANIFEST_FILE: &str = "expertnet-manifest.json";

const FORMAT_VERSION: u32 = 1;
const EXPERT_DIGEST_DOMAIN: &[u8] = b"expertnet/expert/v1\0";
const MANIFEST_DIGEST_DOMAIN: &[u8] = b"expertnet/manifest/v1\0";

/// Number of hex characters of the manifest digest in a model id (128 bits).
const MODEL_ID_HEX_CHARS: usize = 32;

/// The manifest of one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub model_type: String,
    pub config_digest: Digest,
    pub num_layers: u32,
    pub num_experts: u32,
    /// `(layer, expert, digest)` sorted by layer, then expert.
    experts: Vec<(u32, u32, Digest)>,
}

/// The JSON form. Unknown fields are rejected so that two readers can never disagree on
/// what the digest covers.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    format: u32,
    model_type: String,
    config_digest: String,
    num_layers: u32,
    num_experts: u32,
    experts: Vec<ExpertEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpertEntry {
    layer: u32,
    expert: u32,
    digest: String,
}

/// Hashes the weights of one expert: a domain prefix, then for the gate, up and down
/// tensors in that order their dtype, rank, dimensions and raw bytes. Hashing the stored
/// bytes makes the digest independent of the dtype a node computes in.
pub(crate) fn digest_expert(tensors: &[TensorRef; 3]) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(EXPERT_DIGEST_DOMAIN);
    for tensor in tensors {
        hasher.update(tensor.dtype().as_str().as_bytes());
        hasher.update(&[tensor.shape().len() as u8]);
        for &dim in tensor.shape() {
            hasher.update(&(dim as u64).to_le_bytes());
        }
        // Expert tensors are megabytes to gigabytes; the rayon hasher uses every core.
        hasher.update_rayon(tensor.data());
    }
    Digest::from(hasher.finalize())
}

impl Manifest {
    /// Hashes every expert of every MoE layer of a checkpoint.
    ///
    /// # Errors
    /// The first [`ModelError`] met while reading an expert.
    pub fn create(checkpoint: &Checkpoint) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        let keys: Vec<(u32, u32)> = config
            .moe_layers()
            .into_iter()
            .flat_map(|layer| (0..config.num_experts()).map(move |expert| (layer, expert)))
            .collect();

        let experts = keys
            .par_iter()
            .map(|&(layer, expert)| {
                checkpoint
                    .expert_digest(layer, expert)
                    .map(|digest| (layer, expert, digest))
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Self {
            model_type: config.model_type.clone(),
            config_digest: checkpoint.config_digest(),
            num_layers: config.num_hidden_layers as u32,
            num_experts: config.num_experts(),
            experts,
        })
    }

    /// The default path of a checkpoint's manifest.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Reads a manifest file.
    ///
    /// # Errors
    /// [`ModelError::ManifestMissing`] when the file does not exist, [`ModelError::Io`] for
    /// other read errors, [`ModelError::Manifest`] when the content is invalid.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::ManifestMissing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(ModelError::Io {
                    path: path.to_owned(),
                    error: source,
                });
            }
        };
        Self::from_json(&text).map_err(|reason| ModelError::Manifest {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses the JSON form.
    ///
    /// # Errors
    /// A message naming the invalid field.
    pub fn from_json(text: &[u8]) -> Result<Self, String> {
        let file: ManifestFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if file.format != FORMAT_VERSION {
            return Err(format!(
                "manifest format {} is not supported; this version reads format {FORMAT_VERSION}",
                file.format
            ));
        }

        let config_digest = Digest::from_hex(&file.config_digest)?;
        let mut experts = Vec::with_capacity(file.experts.len());
        for entry in &file.experts {
            let digest = Digest::from_hex(&entry.digest)
                .map_err(|e| format!("layer {} expert {}: {e}", entry.layer, entry.expert))?;
            experts.push((entry.layer, entry.expert, digest));
        }
        experts.sort_by_key(|&(layer, expert, _)| (layer, expert));
        if let Some(pair) = experts
            .windows(2)
            .find(|pair| (pair[0].0, pair[0].1) == (pair[1].0, pair[1].1))
        {
            return Err(format!(
                "layer {} expert {} is listed twice",
                pair[0].0, pair[0].1
            ));
        }

        Ok(Self {
            model_type: file.model_type,
            config_digest,
            num_layers: file.num_layers,
            num_experts: file.num_experts,
            experts,
        })
    }

    /// The canonical JSON form; the model id is a digest of these bytes.
    pub fn to_json(&self) -> String {
        let file = ManifestFile {
            format: FORMAT_VERSION,
            model_type: self.model_type.clone(),
            config_digest: self.config_digest.to_hex(),
            num_layers: self.num_layers,
            num_experts: self.num_experts,
            experts: self
                .experts
                .iter()
                .map(|&(layer, expert, digest)| ExpertEntry {
                    layer,
                    expert,
                    digest: digest.to_hex(),
                })
                .collect(),
        };
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(&file).unwrap_or_default()
    }

    /// Writes the canonical JSON form to `path`, followed by a newline.
    ///
    /// # Errors
    /// [`ModelError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        })
    }

    /// blake3 of the canonical JSON form.
    pub fn digest(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(MANIFEST_DIGEST_DOMAIN);
        hasher.update(self.to_json().as_bytes());
        Digest::from(hasher.finalize())
    }

    /// The model id: `model_type`, a dash and the first 32 hex characters of the manifest
    /// digest, such as `mixtral-3f9c...`.
    pub fn model_id(&self) -> String {
        let hex = self.digest().to_hex();
        format!("{}-{}", self.model_type, &hex[..MODEL_ID_HEX_CHARS])
    }

    /// The listed digest of one expert.
    pub fn expert_digest(&self, layer: u32, expert: u32) -> Option<Digest> {
        self.experts
            .binary_search_by_key(&(layer, expert), |&(l, e, _)| (l, e))
            .ok()
            .map(|index| self.experts[index].2)
    }

    /// Number of experts listed.
    pub fn expert_count(&self) -> usize {
        self.experts.len()
    }

    /// Checks that the manifest describes this checkpoint's config.
    ///
    /// # Errors
    /// [`ModelError::ConfigMismatch`] when `config.json` differs from the one the manifest
    /// was made from.
    pub fn check_config(&self, checkpoint: &Checkpoint) -> Result<(), ModelError> {
        if self.config_digest != checkpoint.config_digest()
            || self.model_type != checkpoint.config().model_type
        {
            return Err(ModelError::ConfigMismatch {
                dir: checkpoint.dir().to_owned(),
                expected: self.config_digest,
                actual: checkpoint.config_digest(),
            });
        }
        Ok(())
    }

    /// Hashes one expert in the checkpoint and compares it with the manifest.
    ///
    /// # Errors
    /// [`ModelError::NotInManifest`] or [`ModelError::DigestMismatch`], or an error reading
    /// the expert.
    pub fn verify_expert(
        &self,
        checkpoint: &Checkpoint,
        layer: u32,
        expert: u32,
    ) -> Result<Digest, ModelError> {
        let expected = self
            .expert_digest(layer, expert)
            .ok_or(ModelError::NotInManifest { layer, expert })?;
        let actual = checkpoint.expert_digest(layer, expert)?;
        if actual != expected {
            return Err(ModelError::DigestMismatch {
                layer,
                expert,
                expected,
                actual,
            });
        }
        Ok(actual)
    }
}

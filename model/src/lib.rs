//! Hugging Face MoE checkpoints for expertnet: reading configs and safetensors shards,
//! manifests of expert digests, the SwiGLU expert computation, and a generator of small
//! seeded checkpoints.
//!
//! ```no_run
//! use expertnet_model::{Checkpoint, Manifest};
//! use expertnet_proto::DType;
//!
//! # fn main() -> Result<(), expertnet_model::ModelError> {
//! let checkpoint = Checkpoint::open("checkpoints/mixtral")?;
//! let manifest = Manifest::load(&Manifest::path_in(checkpoint.dir()))?;
//! manifest.check_config(&checkpoint)?;
//! manifest.verify_expert(&checkpoint, 0, 3)?;
//! let expert = checkpoint.load_expert(0, 3, DType::F32, &candle_core::Device::Cpu)?;
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod codec;
mod config;
pub mod dense;
mod expert;
pub mod gate;
pub mod generate;
mod kernels;
pub mod layout;
mod manifest;
mod moe;
pub mod rng;
pub mod tokenizer;

use std::path::PathBuf;

pub use checkpoint::{Checkpoint, TensorRef};
pub use config::{Family, ModelConfig};
pub use dense::{DenseModel, KvCache};
pub use expert::{
    Expert, INPUT_LEFT_MIN_TOKENS, MatmulLayout, SMALL_BATCH_MAX, max_row_relative_error,
};
pub use expertnet_proto::Digest;
pub use generate::{GeneratorOptions, generate_checkpoint};
pub use manifest::{MANIFEST_FILE, Manifest};
pub use moe::{LocalMoeLayer, accumulate};

/// Errors of checkpoint reading, manifests and expert computation. Each names the file,
/// tensor or expert involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("invalid tensor index {path}: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("no weights in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("tensor {name} not found in checkpoint {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error(
        "invalid safetensors file {path}: {reason}; the file is damaged or incomplete: download or generate it again"
    )]
    Safetensors { path: PathBuf, reason: String },
    #[error(
        "checkpoint folder {dir} does not exist; pass the folder that holds config.json, or make one with `expertnet-sim make-checkpoint --out DIR`"
    )]
    NoCheckpoint { dir: PathBuf },
    #[error(
        "{path} is a file, not a checkpoint folder; pass the folder that holds config.json and the safetensors files"
    )]
    NotAFolder { path: PathBuf },
    #[error(
        "{dir} has no config.json, so it is not a Hugging Face checkpoint folder; pass the folder that holds config.json and the safetensors files"
    )]
    NoConfig { dir: PathBuf },
    #[error("tensor {name} has dtype {dtype}; expertnet reads f32, bf16 and f16")]
    UnsupportedDType { name: String, dtype: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?} from config.json")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "layer {layer} expert {expert} does not exist: the model has {layers} layers and {experts} experts per MoE layer"
    )]
    NoSuchExpert {
        layer: u32,
        expert: u32,
        layers: usize,
        experts: u32,
    },
    #[error(
        "manifest not found at {path}; create it with `expertnet-node manifest --checkpoint DIR` or copy it from the checkpoint's publisher"
    )]
    ManifestMissing { path: PathBuf },
    #[error("invalid manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "config.json in {dir} does not match the manifest (digest {actual}, manifest lists {expected}); use the manifest made for this checkpoint"
    )]
    ConfigMismatch {
        dir: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error("layer {layer} expert {expert} is not listed in the manifest")]
    NotInManifest { layer: u32, expert: u32 },
    #[error(
        "layer {layer} expert {expert}: weight digest {actual} differs from the manifest's {expected}; the checkpoint files were changed or belong to another model. Restore the original files, or, if the change is intended, make a new manifest with `expertnet-node manifest --checkpoint DIR --force` (the model id changes with it)"
    )]
    DigestMismatch {
        layer: u32,
        expert: u32,
        expected: Digest,
        actual: Digest,
    },
    #[error("cannot generate checkpoint: {reason}")]
    Generate { reason: String },
    #[error("tensor conversion failed: {reason}")]
    Codec { reason: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid tokenizer {path}: {reason}; remove it to use one token per byte")]
    Tokenizer { path: PathBuf, reason: String },
}

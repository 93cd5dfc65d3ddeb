//! Reading Hugging Face checkpoints: `config.json` plus `model.safetensors`, or shards
//! listed in `model.safetensors.index.json`. Shards are memory-mapped when first needed, so
//! a node that hosts a few experts touches only the shards that hold them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use expertnet_proto::{DType, Digest};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::layout::{ExpertRole, expert_tensor_name, gate_tensor_name};
use crate::{Expert, Family, ModelConfig, ModelError};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened checkpoint folder. Cheap to open: only `config.json` and the index are read
/// until a tensor is requested.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    family: Family,
    config_digest: Digest,
    /// Tensor name to shard file name, relative to `dir`.
    weight_map: BTreeMap<String, String>,
    shards: Mutex<HashMap<String, Arc<Shard>>>,
}

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section in the file: 8 bytes of header length plus the header.
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("path", &self.path).finish()
    }
}

/// A tensor inside a mapped shard: its dtype, shape and raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorRef {
    shard: Arc<Shard>,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl TensorRef {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes, straight from the mapped file.
    pub fn data(&self) -> &[u8] {
        &self.shard.mmap[self.start..self.end]
    }

    /// Copies the tensor into a candle tensor of dtype `dtype` on `device`.
    ///
    /// # Errors
    /// [`ModelError::Candle`] when candle cannot convert the data.
    pub fn load(&self, dtype: candle_core::DType, device: &Device) -> Result<Tensor, ModelError> {
        let tensor = Tensor::from_raw_buffer(
            self.data(),
            crate::codec::candle_dtype(self.dtype),
            &self.shape,
            device,
        )?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

impl Checkpoint {
    /// Opens a checkpoint folder and reads its config and tensor index.
    ///
    /// # Errors
    /// [`ModelError::Io`] or [`ModelError::Config`] for a missing or invalid `config.json`,
    /// [`ModelError::Index`] for an invalid index, [`ModelError::NoWeights`] when the folder
    /// has neither `model.safetensors` nor `model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_owned();
        if dir.is_file() {
            return Err(ModelError::NotAFolder { path: dir });
        }
        if !dir.is_dir() {
            return Err(ModelError::NoCheckpoint { dir });
        }
        let config_path = dir.join(CONFIG_FILE);
        let config_bytes = std::fs::read(&config_path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::NoConfig { dir: dir.clone() }
            } else {
                ModelError::Io {
                    path: config_path.clone(),
                    error: source,
                }
            }
        })?;
        let config =
            ModelConfig::from_json(&config_bytes).map_err(|reason| ModelError::Config {
                path: config_path.clone(),
                reason,
            })?;
        let family = config.family().ok_or_else(|| ModelError::Config {
            path: config_path,
            reason: format!("model_type {:?} is not supported", config.model_type),
        })?;
        let config_digest = Digest::from(blake3::hash(&config_bytes));

        let checkpoint = Self {
            weight_map: BTreeMap::new(),
            shards: Mutex::new(HashMap::new()),
            dir,
            config,
            family,
            config_digest,
        };
        checkpoint.with_weight_map()
    }

    fn with_weight_map(mut self) -> Result<Self, ModelError> {
        let index_path = self.dir.join(INDEX_FILE);
        let single_path = self.dir.join(SINGLE_FILE);

        if index_path.exists() {
            self.weight_map = read_index(&index_path)?;
        } else if single_path.exists() {
            let shard = self.shard(SINGLE_FILE)?;
            self.weight_map = shard
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, SINGLE_FILE.to_owned()))
                .collect();
        } else {
            return Err(ModelError::NoWeights {
                dir: self.dir.clone(),
            });
        }
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// blake3 of the raw bytes of `config.json`.
    pub fn config_digest(&self) -> Digest {
        self.config_digest
    }

    /// Whether the index lists a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.weight_map.contains_key(name)
    }

    /// The names of all tensors in the index, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weight_map.keys().map(String::as_str)
    }

    /// The shard file (relative to the folder) that holds a tensor.
    pub fn shard_of(&self, name: &str) -> Option<&str> {
        self.weight_map.get(name).map(String::as_str)
    }

    /// Finds a tensor and maps its shard if needed.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when the index does not list it,
    /// [`ModelError::Io`] or [`ModelError::Safetensors`] when its shard cannot be read,
    /// [`ModelError::UnsupportedDType`] for dtypes other than f32, bf16 and f16.
    pub fn tensor(&self, name: &str) -> Result<TensorRef, ModelError> {
        let file = self
            .weight_map
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: self.dir.clone(),
            })?;
        let shard = self.shard(file)?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::Safetensors {
                path: shard.path.clone(),
                reason: format!("the index places tensor {name} in this file, but it is not there"),
            })?;
        tensor_ref(&shard, name, info)
    }

    /// Finds a tensor and checks its shape.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`], plus [`ModelError::Shape`] when the shape differs.
    pub fn tensor_with_shape(&self, name: &str, shape: &[usize]) -> Result<TensorRef, ModelError> {
        let tensor = self.tensor(name)?;
        if tensor.shape() != shape {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                actual: tensor.shape().to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Checks that `layer` is an MoE layer and `expert` exists in it.
    ///
    /// # Errors
    /// [`ModelError::NoSuchExpert`] naming the valid ranges.
    pub fn check_expert(&self, layer: u32, expert: u32) -> Result<(), ModelError> {
        if !self.config.is_moe_layer(layer as usize) || expert >= self.config.num_experts() {
            return Err(ModelError::NoSuchExpert {
                layer,
                expert,
                layers: self.config.num_hidden_layers,
                experts: self.config.num_experts(),
            });
        }
        Ok(())
    }

    /// The gate, up and down weights of one expert, with shapes checked against the config.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor_with_shape`], and [`ModelError::NoSuchExpert`].
    pub fn expert_tensors(&self, layer: u32, expert: u32) -> Result<[TensorRef; 3], ModelError> {
        self.check_expert(layer, expert)?;
        let hidden = self.config.hidden_size;
        let ffn = self.config.expert_ffn();
        let load = |role: ExpertRole| {
            let name = expert_tensor_name(self.family, layer, expert, role);
            self.tensor_with_shape(&name, &role.shape(hidden, ffn))
        };
        Ok([
            load(ExpertRole::Gate)?,
            load(ExpertRole::Up)?,
            load(ExpertRole::Down)?,
        ])
    }

    /// The digest of one expert's weights, as the manifest lists it.
    ///
    /// # Errors
    /// As [`Checkpoint::expert_tensors`].
    pub fn expert_digest(&self, layer: u32, expert: u32) -> Result<Digest, ModelError> {
        Ok(crate::manifest::digest_expert(
            &self.expert_tensors(layer, expert)?,
        ))
    }

    /// Loads one expert for computation in `compute_dtype`.
    ///
    /// # Errors
    /// As [`Checkpoint::expert_tensors`], and [`ModelError::Candle`].
    pub fn load_expert(
        &self,
        layer: u32,
        expert: u32,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Expert, ModelError> {
        let [gate, up, down] = self.expert_tensors(layer, expert)?;
        let dtype = crate::codec::candle_dtype(compute_dtype);
        Expert::new(
            gate.load(dtype, device)?,
            up.load(dtype, device)?,
            down.load(dtype, device)?,
        )
    }

    /// Loads a layer's gate weight `[experts, hidden]`.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor_with_shape`].
    pub fn load_gate(
        &self,
        layer: u32,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let name = gate_tensor_name(self.family, layer);
        let shape = [self.config.num_experts() as usize, self.config.hidden_size];
        self.tensor_with_shape(&name, &shape)?.load(dtype, device)
    }

    fn shard(&self, file: &str) -> Result<Arc<Shard>, ModelError> {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shard) = shards.get(file) {
            return Ok(Arc::clone(shard));
        }

        let shard = Arc::new(Shard::open(&self.dir.join(file))?);
        shards.insert(file.to_owned(), Arc::clone(&shard));
        Ok(shard)
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let io_error = |source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is read-only. Changing the file while it is mapped is undefined
        // behaviour, as for every memory-mapped checkpoint reader; the node documents that
        // checkpoint files must not be modified while it runs.
        #[allow(unsafe_code)]
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_error)?;

        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|error| {
                ModelError::Safetensors {
                    path: path.to_owned(),
                    reason: error.to_string(),
                }
            })?;
        Ok(Self {
            path: path.to_owned(),
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }
}

fn tensor_ref(shard: &Arc<Shard>, name: &str, info: &TensorInfo) -> Result<TensorRef, ModelError> {
    let dtype = match info.dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F16 => DType::F16,
        other => {
            return Err(ModelError::UnsupportedDType {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    };

    // `read_metadata` has checked that the offsets are contiguous and inside the file.
    let (begin, end) = info.data_offsets;
    Ok(TensorRef {
        shard: Arc::clone(shard),
        name: name.to_owned(),
        dtype,
        shape: info.shape.clone(),
        start: shard.data_start + begin,
        end: shard.data_start + end,
    })
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, ModelError> {
    let text = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        error: source,
    })?;
    let index: IndexFile = serde_json::from_slice(&text).map_err(|error| ModelError::Index {
        path: path.to_owned(),
        reason: error.to_string(),
    })?;

    // Shard names come from a file that may be hostile: keep them inside the folder.
    for file in index.weight_map.values() {
        let plain = Path::new(file)
            .components()
            .all(|part| matches!(part, std::path::Component::Normal(_)));
        if !plain || file.is_empty() {
            return Err(ModelError::Index {
                path: path.to_owned(),
                reason: format!("shard name {file:?} is not a plain file name inside the folder"),
            });
        }
    }
    Ok(index.weight_map)
}

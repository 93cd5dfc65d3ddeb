//! Seeded random checkpoints in the Hugging Face layout, for tests, demos and benchmarks.
//!
//! A generated folder contains `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`) and `expertnet-manifest.json`. It has every tensor a full
//! forward pass needs: embeddings, attention, norms, gates, experts and the LM head.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use expertnet_proto::DType;
use serde_json::json;

use crate::layout::{ExpertRole, expert_tensor_name, gate_tensor_name};
use crate::rng::SplitMix64;
use crate::{Checkpoint, Family, Manifest, ModelError};

/// Options of the checkpoint generator. [`GeneratorOptions::default`] is a small Mixtral-layout model that
/// generates in well under a second.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    /// [`Family::Mixtral`], [`Family::Qwen2Moe`] or [`Family::Qwen3Moe`].
    pub family: Family,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    /// Width of each expert's hidden layer.
    pub ffn: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seed: u64,
    /// Storage dtype of every tensor.
    pub dtype: DType,
    /// Largest shard in bytes; a checkpoint that fits is written as one `model.safetensors`.
    pub max_shard_bytes: u64,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        Self {
            family: Family::Mixtral,
            layers: 4,
            experts: 8,
            top_k: 2,
            hidden: 128,
            ffn: 352,
            vocab: 512,
            heads: 4,
            kv_heads: 2,
            seed: 0,
            dtype: DType::F32,
            max_shard_bytes: 2 << 30,
        }
    }
}

/// A tensor to generate: its name, shape and how to fill it.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
}

#[derive(Clone, Copy)]
enum Fill {
    /// Uniform with this standard deviation.
    Random { std: f32 },
    /// Every element is 1, as trained RMSNorm weights start.
    Ones,
}

impl TensorSpec {
    fn elements(&self) -> u64 {
        self.shape
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d as u64))
    }
}

/// Writes a checkpoint into `dir` (created if missing) and returns it opened.
///
/// # Errors
/// [`ModelError::Generate`] for invalid options, sizes above the generator's limits or a
/// folder that is not empty, [`ModelError::Io`] for write errors.
pub fn generate_checkpoint(
    dir: &Path,
    options: &GeneratorOptions,
) -> Result<Checkpoint, ModelError> {
    validate(options)?;
    let specs = tensor_specs(options);
    check_size(&specs, options)?;

    let non_empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if non_empty {
        let what = if dir.join(crate::checkpoint::CONFIG_FILE).exists() {
            "already contains a checkpoint"
        } else {
            "is not empty"
        };
        return Err(ModelError::Generate {
            reason: format!(
                "{} {what}; choose an empty or new folder, or remove it first",
                dir.display()
            ),
        });
    }
    let created_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_owned(),
        error: source,
    })?;

    let result = write_checkpoint(dir, &specs, options);
    if result.is_err() {
        // Leave no partial checkpoint behind: the folder was empty before.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if created_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
    result
}

fn write_checkpoint(
    dir: &Path,
    specs: &[TensorSpec],
    options: &GeneratorOptions,
) -> Result<Checkpoint, ModelError> {
    let shards = assign_shards(specs, options);
    let weight_map = write_shards(dir, specs, &shards, options)?;
    if shards.len() > 1 {
        write_index(dir, &weight_map, specs, options)?;
    }
    write_json(
        &dir.join(crate::checkpoint::CONFIG_FILE),
        &config_json(options),
    )?;
    if options.vocab >= 256 {
        crate::tokenizer::write_byte_tokenizer(dir, options.vocab)?;
    }

    let checkpoint = Checkpoint::open(dir)?;
    let manifest = Manifest::create(&checkpoint)?;
    manifest.save(&Manifest::path_in(dir))?;
    Ok(checkpoint)
}

/// Largest checkpoint the generator writes, in bytes.
pub const MAX_GENERATED_BYTES: u64 = 64 << 30;

/// Largest single tensor the generator writes, in bytes; each is built in memory.
pub const MAX_GENERATED_TENSOR_BYTES: u64 = 4 << 30;

fn check_size(specs: &[TensorSpec], options: &GeneratorOptions) -> Result<(), ModelError> {
    let element_bytes = options.dtype.size_in_bytes() as u64;
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    if let Some(largest) = specs.iter().max_by_key(|spec| spec.elements()) {
        let bytes = largest.elements().saturating_mul(element_bytes);
        if bytes > MAX_GENERATED_TENSOR_BYTES {
            return Err(ModelError::Generate {
                reason: format!(
                    "tensor {} would take {:.1} GiB, above the generator's limit of {:.0} GiB per tensor; choose smaller sizes",
                    largest.name,
                    gib(bytes),
                    gib(MAX_GENERATED_TENSOR_BYTES)
                ),
            });
        }
    }
    let total: u64 = specs
        .iter()
        .map(|spec| spec.elements().saturating_mul(element_bytes))
        .fold(0, u64::saturating_add);
    if total > MAX_GENERATED_BYTES {
        return Err(ModelError::Generate {
            reason: format!(
                "the checkpoint would take {:.1} GiB, above the generator's limit of {:.0} GiB; choose smaller sizes",
                gib(total),
                gib(MAX_GENERATED_BYTES)
            ),
        });
    }
    Ok(())
}

fn validate(options: &GeneratorOptions) -> Result<(), ModelError> {
    let invalid = |reason: String| Err(ModelError::Generate { reason });
    if !matches!(
        options.family,
        Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe
    ) {
        return invalid(format!(
            "layout {} cannot be generated; use mixtral, qwen2-moe or qwen3-moe",
            options.family.model_type()
        ));
    }
    for (name, value) in [
        ("layers", options.layers),
        ("experts", options.experts),
        ("hidden", options.hidden),
        ("ffn", options.ffn),
        ("vocab", options.vocab),
        ("heads", options.heads),
        ("kv-heads", options.kv_heads),
        ("top-k", options.top_k),
    ] {
        if value == 0 {
            return invalid(format!("--{name} is 0; it must be at least 1"));
        }
    }
    if options.top_k > options.experts {
        return invalid(format!(
            "--top-k {} is larger than --experts {}",
            options.top_k, options.experts
        ));
    }
    if !options.hidden.is_multiple_of(options.heads) {
        return invalid(format!(
            "--hidden {} is not a multiple of --heads {}",
            options.hidden, options.heads
        ));
    }
    if !options.heads.is_multiple_of(options.kv_heads) {
        return invalid(format!(
            "--heads {} is not a multiple of --kv-heads {}",
            options.heads, options.kv_heads
        ));
    }
    if !(options.hidden / options.heads).is_multiple_of(2) {
        return invalid(format!(
            "head size {} (hidden / heads) is odd; rotary embeddings need an even head size",
            options.hidden / options.heads
        ));
    }
    Ok(())
}

fn tensor_specs(options: &GeneratorOptions) -> Vec<TensorSpec> {
    let family = options.family;
    let hidden = options.hidden;
    let head_dim = hidden / options.heads;
    let q_width = options.heads * head_dim;
    let kv_width = options.kv_heads * head_dim;
    let std_in = |fan_in: usize| Fill::Random {
        std: 1.0 / (fan_in as f32).sqrt(),
    };

    let mut specs = vec![TensorSpec {
        name: "model.embed_tokens.weight".to_owned(),
        shape: vec![options.vocab, hidden],
        fill: Fill::Random { std: 1.0 },
    }];
    for layer in 0..options.layers {
        let prefix = format!("model.layers.{layer}");
        let mut add = |name: String, shape: Vec<usize>, fill: Fill| {
            specs.push(TensorSpec { name, shape, fill });
        };

        add(
            format!("{prefix}.input_layernorm.weight"),
            vec![hidden],
            Fill::Ones,
        );
        add(
            format!("{prefix}.self_attn.q_proj.weight"),
            vec![q_width, hidden],
            std_in(hidden),
        );
        add(
            format!("{prefix}.self_attn.k_proj.weight"),
            vec![kv_width, hidden],
            std_in(hidden),
        );
        add(
            format!("{prefix}.self_attn.v_proj.weight"),
            vec![kv_width, hidden],
            std_in(hidden),
        );
        add(
            format!("{prefix}.self_attn.o_proj.weight"),
            vec![hidden, q_width],
            std_in(q_width),
        );
        if family == Family::Qwen2Moe {
            for (name, width) in [
                ("q_proj", q_width),
                ("k_proj", kv_width),
                ("v_proj", kv_width),
            ] {
                add(
                    format!("{prefix}.self_attn.{name}.bias"),
                    vec![width],
                    Fill::Random { std: 0.1 },
                );
            }
        }
        if family == Family::Qwen3Moe {
            add(
                format!("{prefix}.self_attn.q_norm.weight"),
                vec![head_dim],
                Fill::Ones,
            );
            add(
                format!("{prefix}.self_attn.k_norm.weight"),
                vec![head_dim],
                Fill::Ones,
            );
        }
        add(
            format!("{prefix}.post_attention_layernorm.weight"),
            vec![hidden],
            Fill::Ones,
        );
        add(
            gate_tensor_name(family, layer as u32),
            vec![options.experts, hidden],
            std_in(hidden),
        );
        if family == Family::Qwen2Moe {
            let shared_ffn = shared_expert_ffn(options);
            for role in ExpertRole::ALL {
                let (name, fan_in) = match role {
                    ExpertRole::Gate => ("gate_proj", hidden),
                    ExpertRole::Up => ("up_proj", hidden),
                    ExpertRole::Down => ("down_proj", shared_ffn),
                };
                add(
                    format!("{prefix}.mlp.shared_expert.{name}.weight"),
                    role.shape(hidden, shared_ffn).to_vec(),
                    std_in(fan_in),
                );
            }
            add(
                format!("{prefix}.mlp.shared_expert_gate.weight"),
                vec![1, hidden],
                std_in(hidden),
            );
        }
        for expert in 0..options.experts {
            for role in ExpertRole::ALL {
                let fan_in = match role {
                    ExpertRole::Gate | ExpertRole::Up => hidden,
                    ExpertRole::Down => options.ffn,
                };
                add(
                    expert_tensor_name(family, layer as u32, expert as u32, role),
                    role.shape(hidden, options.ffn).to_vec(),
                    std_in(fan_in),
                );
            }
        }
    }
    specs.push(TensorSpec {
        name: "model.norm.weight".to_owned(),
        shape: vec![hidden],
        fill: Fill::Ones,
    });
    specs.push(TensorSpec {
        name: "lm_head.weight".to_owned(),
        shape: vec![options.vocab, hidden],
        fill: std_in(hidden),
    });
    specs
}

/// Splits the tensors, in order, into shards of at most `max_shard_bytes` each (a single
/// larger tensor gets a shard of its own), as `save_pretrained` does.
fn assign_shards(specs: &[TensorSpec], options: &GeneratorOptions) -> Vec<Vec<usize>> {
    let element_bytes = options.dtype.size_in_bytes() as u64;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (index, spec) in specs.iter().enumerate() {
        let bytes = spec.elements() * element_bytes;
        let full = current > 0 && current + bytes > options.max_shard_bytes;
        if full {
            shards.push(Vec::new());
            current = 0;
        }
        if let Some(shard) = shards.last_mut() {
            shard.push(index);
        }
        current += bytes;
    }
    shards
}

fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        crate::checkpoint::SINGLE_FILE.to_owned()
    } else {
        format!("model-{:05}-of-{count:05}.safetensors", index + 1)
    }
}

/// A generated tensor ready for serialization.
struct Generated {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Generated {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn write_shards(
    dir: &Path,
    specs: &[TensorSpec],
    shards: &[Vec<usize>],
    options: &GeneratorOptions,
) -> Result<BTreeMap<String, String>, ModelError> {
    let mut weight_map = BTreeMap::new();
    for (shard_index, members) in shards.iter().enumerate() {
        let file = shard_file_name(shard_index, shards.len());
        let tensors: Vec<(String, Generated)> = members
            .iter()
            .map(|&index| {
                let spec = &specs[index];
                (spec.name.clone(), generate_tensor(spec, options))
            })
            .collect();

        let path = dir.join(&file);
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_owned(),
            "pt".to_owned(),
        )]));
        safetensors::serialize_to_file(
            tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)),
            metadata,
            &path,
        )
        .map_err(|error| ModelError::Safetensors {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        make_readable(&path)?;

        for (name, _) in tensors {
            weight_map.insert(name, file.clone());
        }
    }
    Ok(weight_map)
}

/// Fills one tensor from a stream seeded by the checkpoint seed and the tensor's name, so
/// a tensor's values do not depend on sharding or on which other tensors exist.
fn generate_tensor(spec: &TensorSpec, options: &GeneratorOptions) -> Generated {
    let mut seed_hasher = blake3::Hasher::new();
    seed_hasher.update(&options.seed.to_le_bytes());
    seed_hasher.update(spec.name.as_bytes());
    let seed_bytes = seed_hasher.finalize();
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&seed_bytes.as_bytes()[..8]);
    let mut rng = SplitMix64::new(u64::from_le_bytes(seed));

    let count = spec.elements() as usize;
    let values = (0..count).map(|_| match spec.fill {
        // A uniform variable on [-a, a] has standard deviation a / sqrt(3).
        Fill::Random { std } => (rng.next_unit() * 2.0 - 1.0) * std * 3f32.sqrt(),
        Fill::Ones => 1.0,
    });

    let mut data = Vec::with_capacity(count * options.dtype.size_in_bytes());
    let dtype = match options.dtype {
        DType::F32 => {
            values.for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
            safetensors::Dtype::F32
        }
        DType::BF16 => {
            values.for_each(|v| data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()));
            safetensors::Dtype::BF16
        }
        DType::F16 => {
            values.for_each(|v| data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()));
            safetensors::Dtype::F16
        }
    };
    Generated {
        dtype,
        shape: spec.shape.clone(),
        data,
    }
}

fn write_index(
    dir: &Path,
    weight_map: &BTreeMap<String, String>,
    specs: &[TensorSpec],
    options: &GeneratorOptions,
) -> Result<(), ModelError> {
    let element_bytes = options.dtype.size_in_bytes() as u64;
    let total_size: u64 = specs
        .iter()
        .map(|spec| spec.elements() * element_bytes)
        .sum();
    let index = json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    write_json(&dir.join(crate::checkpoint::INDEX_FILE), &index)
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    }
}

/// Width of Qwen2-MoE's shared expert: as wide as the routed experts a token passes through,
/// as in Qwen1.5-MoE-A2.7B (4 x 1408 = 5632).
fn shared_expert_ffn(options: &GeneratorOptions) -> usize {
    options.ffn * options.top_k
}

fn config_json(options: &GeneratorOptions) -> serde_json::Value {
    let head_dim = options.hidden / options.heads;
    let common = json!({
        "hidden_size": options.hidden,
        "num_hidden_layers": options.layers,
        "num_attention_heads": options.heads,
        "num_key_value_heads": options.kv_heads,
        "num_experts_per_tok": options.top_k,
        "vocab_size": options.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": torch_dtype(options.dtype),
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    let specific = match options.family {
        Family::Qwen3Moe => json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "head_dim": head_dim,
            "intermediate_size": options.ffn * options.top_k,
            "moe_intermediate_size": options.ffn,
            "num_experts": options.experts,
            "norm_topk_prob": true,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": false,
            "rope_theta": 1_000_000.0,
        }),
        Family::Qwen2Moe => json!({
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "intermediate_size": shared_expert_ffn(options),
            "moe_intermediate_size": options.ffn,
            "shared_expert_intermediate_size": shared_expert_ffn(options),
            "num_experts": options.experts,
            "norm_topk_prob": false,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": false,
            "rope_theta": 1_000_000.0,
        }),
        _ => json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": options.ffn,
            "num_local_experts": options.experts,
            "rope_theta": 1_000_000.0,
            "sliding_window": null,
        }),
    };

    let mut config = common;
    if let (Some(target), serde_json::Value::Object(extra)) = (config.as_object_mut(), specific) {
        target.extend(extra);
    }
    config
}

/// Sets mode 0644: safetensors writes shards readable by their owner only, but weights are
/// not secret, and a node may run as another user.
fn make_readable(path: &Path) -> Result<(), ModelError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(
            |error| ModelError::Io {
                path: path.to_owned(),
                error,
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|source| ModelError::Io {
        path: PathBuf::from(path),
        error: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit() {
        let options = GeneratorOptions {
            max_shard_bytes: 200_000,
            ..GeneratorOptions::default()
        };
        let specs = tensor_specs(&options);
        let shards = assign_shards(&specs, &options);
        assert!(shards.len() > 1);
        for shard in &shards {
            let bytes: u64 = shard.iter().map(|&i| specs[i].elements() * 4).sum();
            assert!(shard.len() == 1 || bytes <= options.max_shard_bytes);
        }
        let total: usize = shards.iter().map(Vec::len).sum();
        assert_eq!(total, specs.len());
    }
}

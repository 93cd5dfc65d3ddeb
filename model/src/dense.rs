//! The dense part of a Mixtral-architecture transformer, which the client runs: token
//! embeddings, RMSNorm, attention with rotary embeddings, grouped-query heads and a KV
//! cache, and the LM head. The MoE blocks are left to the caller, local or remote.

use candle_core::{DType, Device, Tensor};

use crate::{Checkpoint, Family, ModelConfig, ModelError};

/// The weights of one decoder layer outside its MoE block.
#[derive(Debug, Clone)]
struct DenseLayer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// Per-head RMSNorm of queries and keys (Qwen3-MoE).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
}

/// Keys and values of the positions seen so far, per layer, `[1, kv_heads, positions,
/// head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(Option::as_ref)
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything of a Mixtral-architecture model except the experts, in f32 on the CPU.
#[derive(Debug, Clone)]
pub struct DenseModel {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<DenseLayer>,
    norm: Tensor,
    lm_head: Tensor,
    /// Rotary frequencies, `head_dim / 2` values.
    inv_freq: Vec<f32>,
}

impl DenseModel {
    /// Loads the dense weights of a checkpoint: embeddings, attention, norms, LM head.
    /// Expert weights are not read.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for families other than Mixtral and Qwen3-MoE or for a
    /// dense MLP layer, and the errors of reading tensors, such as
    /// [`ModelError::MissingTensor`] with the tensor's name.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self, ModelError> {
        let config = checkpoint.config().clone();
        let family = checkpoint.family();
        if !matches!(family, Family::Mixtral | Family::Qwen3Moe) {
            return Err(ModelError::Unsupported(format!(
                "the client-side forward pass supports Mixtral and Qwen3-MoE checkpoints, not model_type {:?}",
                config.model_type
            )));
        }
        if let Some(layer) = (0..config.num_hidden_layers).find(|&l| !config.is_moe_layer(l)) {
            return Err(ModelError::Unsupported(format!(
                "layer {layer} has a dense MLP, which the client-side forward pass does not support yet"
            )));
        }
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let heads = config.num_attention_heads;
        let kv_heads = config.num_key_value_heads();
        let load = |name: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
            checkpoint
                .tensor_with_shape(name, shape)?
                .load(DType::F32, &Device::Cpu)
        };

        let embed = load("model.embed_tokens.weight", &[config.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let qk_norm = family == Family::Qwen3Moe;
            layers.push(DenseLayer {
                input_norm: load(&format!("{p}.input_layernorm.weight"), &[hidden])?,
                q: load(
                    &format!("{p}.self_attn.q_proj.weight"),
                    &[heads * head_dim, hidden],
                )?,
                k: load(
                    &format!("{p}.self_attn.k_proj.weight"),
                    &[kv_heads * head_dim, hidden],
                )?,
                v: load(
                    &format!("{p}.self_attn.v_proj.weight"),
                    &[kv_heads * head_dim, hidden],
                )?,
                o: load(
                    &format!("{p}.self_attn.o_proj.weight"),
                    &[hidden, heads * head_dim],
                )?,
                q_norm: qk_norm
                    .then(|| load(&format!("{p}.self_attn.q_norm.weight"), &[head_dim]))
                    .transpose()?,
                k_norm: qk_norm
                    .then(|| load(&format!("{p}.self_attn.k_norm.weight"), &[head_dim]))
                    .transpose()?,
                post_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?,
            });
        }
        let norm = load("model.norm.weight", &[hidden])?;
        let lm_head = if checkpoint.has_tensor("lm_head.weight") || !config.tie_word_embeddings {
            load("lm_head.weight", &[config.vocab_size, hidden])?
        } else {
            embed.clone()
        };
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / config.rope_theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Creates an empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
        }
    }

    /// Looks up the embeddings of `tokens`, `[tokens, hidden]`.
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for a token id outside the vocabulary.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, ModelError> {
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Unsupported(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// Runs the attention half of layer `layer` on `x` (`[tokens, hidden]`, the positions
    /// after those in `cache`) and appends their keys and values to the cache. Returns the
    /// residual stream after attention and the MoE block's input (its RMSNorm); the layer's
    /// output is the residual plus the MoE block's output.
    ///
    /// # Errors
    /// Candle errors on shape mismatches; `layer` must be below the layer count.
    pub fn attention(
        &self,
        layer: usize,
        x: &Tensor,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let weights = self
            .layers
            .get(layer)
            .ok_or_else(|| ModelError::Unsupported(format!("layer {layer} does not exist")))?;
        let config = &self.config;
        let (tokens, _) = x.dims2()?;
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.num_key_value_heads(),
            config.head_dim(),
        );
        let eps = config.rms_norm_eps as f32;
        let offset = cache.layers[layer].as_ref().map_or(0, |(k, _)| k.dims()[2]);

        let normed = candle_nn::ops::rms_norm(x, &weights.input_norm, eps)?;
        let project = |w: &Tensor, n_heads: usize| -> candle_core::Result<Tensor> {
            normed
                .matmul(&w.t()?)?
                .reshape((tokens, n_heads, head_dim))?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .contiguous()
        };
        let mut q = project(&weights.q, heads)?;
        let mut k = project(&weights.k, kv_heads)?;
        let v = project(&weights.v, kv_heads)?;
        if let (Some(q_norm), Some(k_norm)) = (&weights.q_norm, &weights.k_norm) {
            q = candle_nn::ops::rms_norm(&q, q_norm, eps)?;
            k = candle_nn::ops::rms_norm(&k, k_norm, eps)?;
        }
        let (cos, sin) = self.rotary(offset, tokens)?;
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;

        let (k, v) = match cache.layers[layer].take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[&past_k, &k], 2)?,
                Tensor::cat(&[&past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        cache.layers[layer] = Some((k.clone(), v.clone()));
        let total = offset + tokens;

        // Grouped-query attention: each key/value head serves `heads / kv_heads` queries.
        let group = heads / kv_heads.max(1);
        let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
            if group == 1 {
                return Ok(t.clone());
            }
            t.unsqueeze(2)?
                .expand((1, kv_heads, group, total, head_dim))?
                .reshape((1, heads, total, head_dim))
        };
        let k = repeat(&k)?;
        let v = repeat(&v)?;
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let mask: Vec<f32> = (0..tokens)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tokens, total), &Device::Cpu)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let attended = probs
            .matmul(&v.contiguous()?)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((tokens, heads * head_dim))?;
        let residual = (x + attended.matmul(&weights.o.t()?)?)?;
        let moe_input = candle_nn::ops::rms_norm(&residual, &weights.post_norm, eps)?;
        Ok((residual, moe_input))
    }

    /// Computes the logits of every row of `x` (`[tokens, hidden]`), `[tokens, vocab]`.
    ///
    /// # Errors
    /// Candle errors on shape mismatches.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let normed = candle_nn::ops::rms_norm(x, &self.norm, self.config.rms_norm_eps as f32)?;
        Ok(normed.matmul(&self.lm_head.t()?)?)
    }

    /// Computes the rotary cosines and sines of positions `offset..offset + tokens`, each
    /// `[tokens, head_dim / 2]`.
    fn rotary(&self, offset: usize, tokens: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for position in offset..offset + tokens {
            for &freq in &self.inv_freq {
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (tokens, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (tokens, half), &Device::Cpu)?,
        ))
    }
}

/// Samples a token from one row of logits: the arg max at temperature 0, else from the
/// softmax of `logits / temperature` with `uniform` in [0, 1).
pub fn sample(logits: &[f32], temperature: f32, uniform: f32) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i as u32);
    if temperature <= 0.0 {
        return argmax;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let mut target = uniform * total;
    for (index, weight) in weights.iter().enumerate() {
        target -= weight;
        if target < 0.0 {
            return index as u32;
        }
    }
    argmax
}

/// Returns the last row of `[tokens, vocab]` logits.
///
/// # Errors
/// Candle errors when `logits` is not a non-empty matrix.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>, ModelError> {
    let (tokens, _) = logits.dims2()?;
    Ok(logits.get(tokens.saturating_sub(1))?.to_vec1::<f32>()?)
}

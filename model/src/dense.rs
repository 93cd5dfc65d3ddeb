//! The dense part of a Mixtral-architecture transformer, which the client runs: token
//! embeddings, RMSNorm, attention with rotary embeddings, grouped-query heads and a KV
//! cache, Qwen2-MoE's shared expert, and the LM head. The routed experts of the MoE blocks
//! are left to the caller, local or remote.

use candle_core::{DType, Device, Tensor};

use crate::{Checkpoint, Expert, Family, ModelConfig, ModelError};

/// The weights of one decoder layer outside its MoE block.
#[derive(Debug, Clone)]
struct DenseLayer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// Biases of the query, key, value and output projections (Qwen2-MoE has the first
    /// three, Qwen3-MoE with `attention_bias` all four).
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o_bias: Option<Tensor>,
    /// Per-head RMSNorm of queries and keys (Qwen3-MoE).
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    shared_expert: Option<SharedExpert>,
}

/// Qwen2-MoE's shared expert: a SwiGLU MLP that every token passes through, scaled by a
/// sigmoid gate and added to the routed experts' output.
#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: Expert,
    /// `[1, hidden]`.
    gate: Tensor,
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
    /// [`ModelError::Unsupported`] for families other than Mixtral, Qwen2-MoE and Qwen3-MoE
    /// or for a dense MLP layer, and the errors of reading tensors, such as
    /// [`ModelError::MissingTensor`] with the tensor's name.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self, ModelError> {
        let config = checkpoint.config().clone();
        let family = checkpoint.family();
        if !matches!(
            family,
            Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe
        ) {
            return Err(ModelError::Unsupported(format!(
                "the client-side forward pass supports Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints, not model_type {:?}",
                config.model_type
            )));
        }
        if let Some(scaling) = config.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            return Err(ModelError::Unsupported(format!(
                "config.json sets rope_scaling to {scaling}; the client-side forward pass has only \
                 plain rotary embeddings, so it cannot run this checkpoint"
            )));
        }
        if config.use_sliding_window == Some(true) {
            return Err(ModelError::Unsupported(
                "config.json sets use_sliding_window to true; the client-side forward pass has \
                 only full attention, so it does not support this checkpoint yet (editing \
                 config.json would change the model id, and nodes would no longer match)"
                    .to_owned(),
            ));
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

        let all_biases = config.attention_bias == Some(true);
        let qkv_bias = (family == Family::Qwen2Moe && config.qkv_bias != Some(false)) || all_biases;
        // NOTE: generated checkpoints never set attention_bias, so the output-projection
        // bias is loaded and added only for real checkpoints, untested here.
        let o_bias = all_biases && family != Family::Qwen2Moe;
        let shared_ffn = match (family, config.shared_expert_intermediate_size) {
            (Family::Qwen2Moe, Some(0) | None) => {
                return Err(ModelError::Unsupported(
                    "config.json has model_type qwen2_moe but no shared_expert_intermediate_size \
                     above 0; add the shared expert's width as the original checkpoint gives it, \
                     or check that the folder holds a Qwen2-MoE checkpoint"
                        .to_owned(),
                ));
            }
            (Family::Qwen2Moe, Some(width)) => Some(width),
            _ => None,
        };

        let embed = load("model.embed_tokens.weight", &[config.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let qk_norm = family == Family::Qwen3Moe;
            let bias = |on: bool, name: &str, width: usize| {
                on.then(|| load(&format!("{p}.self_attn.{name}.bias"), &[width]))
                    .transpose()
            };
            let shared_expert = shared_ffn
                .map(|ffn| -> Result<SharedExpert, ModelError> {
                    let mlp = |name: &str, shape: &[usize]| {
                        load(&format!("{p}.mlp.shared_expert.{name}.weight"), shape)
                    };
                    Ok(SharedExpert {
                        mlp: Expert::new(
                            mlp("gate_proj", &[ffn, hidden])?,
                            mlp("up_proj", &[ffn, hidden])?,
                            mlp("down_proj", &[hidden, ffn])?,
                        )?,
                        gate: load(&format!("{p}.mlp.shared_expert_gate.weight"), &[1, hidden])?,
                    })
                })
                .transpose()?;
            layers.push(DenseLayer {
                q_bias: bias(qkv_bias, "q_proj", heads * head_dim)?,
                k_bias: bias(qkv_bias, "k_proj", kv_heads * head_dim)?,
                v_bias: bias(qkv_bias, "v_proj", kv_heads * head_dim)?,
                o_bias: bias(o_bias, "o_proj", hidden)?,
                shared_expert,
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
        let project =
            |w: &Tensor, bias: &Option<Tensor>, n_heads: usize| -> candle_core::Result<Tensor> {
                let mut y = normed.matmul(&w.t()?)?;
                if let Some(bias) = bias {
                    y = y.broadcast_add(bias)?;
                }
                y.reshape((tokens, n_heads, head_dim))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .contiguous()
            };
        let mut q = project(&weights.q, &weights.q_bias, heads)?;
        let mut k = project(&weights.k, &weights.k_bias, kv_heads)?;
        let v = project(&weights.v, &weights.v_bias, kv_heads)?;
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
        let mut projected = attended.matmul(&weights.o.t()?)?;
        if let Some(bias) = &weights.o_bias {
            projected = projected.broadcast_add(bias)?;
        }
        let residual = (x + projected)?;
        let moe_input = candle_nn::ops::rms_norm(&residual, &weights.post_norm, eps)?;
        Ok((residual, moe_input))
    }

    /// Computes the shared expert's part of layer `layer`'s MoE block for `moe_input`
    /// (`[tokens, hidden]`, from [`DenseModel::attention`]): `sigmoid(x · gateᵀ) * mlp(x)`,
    /// to add to the routed experts' output. `None` for families without a shared expert.
    ///
    /// # Errors
    /// Candle errors on shape mismatches; `layer` must be below the layer count.
    pub fn shared_expert(
        &self,
        layer: usize,
        moe_input: &Tensor,
    ) -> Result<Option<Tensor>, ModelError> {
        let weights = self
            .layers
            .get(layer)
            .ok_or_else(|| ModelError::Unsupported(format!("layer {layer} does not exist")))?;
        let Some(shared) = &weights.shared_expert else {
            return Ok(None);
        };
        let scale = candle_nn::ops::sigmoid(&moe_input.matmul(&shared.gate.t()?)?)?;
        let output = shared.mlp.forward(moe_input)?.broadcast_mul(&scale)?;
        Ok(Some(output))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GeneratorOptions, generate_checkpoint, max_row_relative_error};

    fn qwen2_moe() -> (tempfile::TempDir, Checkpoint) {
        tiny(Family::Qwen2Moe)
    }

    fn tiny(family: Family) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        let options = GeneratorOptions {
            family,
            layers: 1,
            experts: 4,
            hidden: 16,
            ffn: 24,
            vocab: 8,
            heads: 4,
            kv_heads: 2,
            ..GeneratorOptions::default()
        };
        let checkpoint = generate_checkpoint(dir.path(), &options).unwrap();
        (dir, checkpoint)
    }

    fn load(checkpoint: &Checkpoint, name: &str) -> Tensor {
        checkpoint
            .tensor(name)
            .unwrap()
            .load(DType::F32, &Device::Cpu)
            .unwrap()
    }

    #[test]
    fn shared_expert_is_gated_swiglu() {
        let (_dir, checkpoint) = qwen2_moe();
        let model = DenseModel::load(&checkpoint).unwrap();
        let mut rng = crate::rng::SplitMix64::new(9);
        let x = Tensor::from_vec(rng.normal_vec(3 * 16), (3, 16), &Device::Cpu).unwrap();

        let p = "model.layers.0.mlp";
        let mlp = Expert::new(
            load(&checkpoint, &format!("{p}.shared_expert.gate_proj.weight")),
            load(&checkpoint, &format!("{p}.shared_expert.up_proj.weight")),
            load(&checkpoint, &format!("{p}.shared_expert.down_proj.weight")),
        )
        .unwrap();
        let gate = load(&checkpoint, &format!("{p}.shared_expert_gate.weight"));
        let y = mlp.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let logits = x
            .matmul(&gate.t().unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let expected: Vec<f32> = y
            .iter()
            .zip(&logits)
            .flat_map(|(row, logit)| {
                let scale = 1.0 / (1.0 + (-logit[0]).exp());
                row.iter().map(move |v| v * scale)
            })
            .collect();
        let expected = Tensor::from_vec(expected, (3, 16), &Device::Cpu).unwrap();

        let got = model.shared_expert(0, &x).unwrap().unwrap();
        assert!(max_row_relative_error(&got, &expected).unwrap() < 1e-5);
    }

    /// At the first position a token attends only to itself, so attention returns its value
    /// projection, bias included, through the output projection.
    #[test]
    fn first_position_attention_adds_value_bias() {
        let (_dir, checkpoint) = qwen2_moe();
        let model = DenseModel::load(&checkpoint).unwrap();
        let config = model.config().clone();
        let mut rng = crate::rng::SplitMix64::new(4);
        let x = Tensor::from_vec(rng.normal_vec(16), (1, 16), &Device::Cpu).unwrap();

        let p = "model.layers.0";
        let norm = load(&checkpoint, &format!("{p}.input_layernorm.weight"));
        let normed = candle_nn::ops::rms_norm(&x, &norm, config.rms_norm_eps as f32).unwrap();
        let v = normed
            .matmul(
                &load(&checkpoint, &format!("{p}.self_attn.v_proj.weight"))
                    .t()
                    .unwrap(),
            )
            .unwrap()
            .broadcast_add(&load(&checkpoint, &format!("{p}.self_attn.v_proj.bias")))
            .unwrap();
        // Each of the 2 key/value heads of width 4 serves 2 of the 4 query heads.
        let v = v.reshape((2, 1, 4)).unwrap();
        let attended = Tensor::cat(&[&v, &v], 1).unwrap().reshape((1, 16)).unwrap();
        let o = load(&checkpoint, &format!("{p}.self_attn.o_proj.weight"));
        let expected = (&x + attended.matmul(&o.t().unwrap()).unwrap()).unwrap();

        let mut cache = model.new_cache();
        let (residual, _) = model.attention(0, &x, &mut cache).unwrap();
        assert!(max_row_relative_error(&residual, &expected).unwrap() < 1e-5);
    }

    #[test]
    fn unsupported_attention_settings_are_named() {
        for (field, value) in [
            ("use_sliding_window", serde_json::json!(true)),
            (
                "rope_scaling",
                serde_json::json!({"type": "yarn", "factor": 4.0}),
            ),
        ] {
            let (dir, _) = qwen2_moe();
            let path = dir.path().join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            config[field] = value;
            std::fs::write(&path, config.to_string()).unwrap();

            let error = DenseModel::load(&Checkpoint::open(dir.path()).unwrap()).unwrap_err();
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn mixtral_has_no_shared_expert() {
        let (_dir, checkpoint) = tiny(Family::Mixtral);
        let model = DenseModel::load(&checkpoint).unwrap();
        let x = Tensor::zeros((1, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(model.shared_expert(0, &x).unwrap().is_none());
    }
}

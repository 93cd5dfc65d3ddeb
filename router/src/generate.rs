//! Text generation: the dense model on the client, every MoE block on the network or,
//! for the reference, computed locally.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use expertnet_model::dense::{last_row, sample};
use expertnet_model::rng::SplitMix64;
use expertnet_model::{Checkpoint, DenseModel, KvCache, LocalMoeLayer, Manifest, ModelError};

use crate::layer::{LayerError, RemoteMoeLayer, RoutingTrace};
use crate::router::Router;

/// Errors of a forward pass or of generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("MoE layer {layer}: {error}")]
    Layer { layer: u32, error: LayerError },
    #[error("the prompt is empty; give at least one token")]
    EmptyPrompt,
    #[error("the prompt and new tokens add up to {total} positions, above the model's {max}")]
    TooLong { total: usize, max: usize },
}

impl From<candle_core::Error> for GenerateError {
    fn from(error: candle_core::Error) -> Self {
        Self::Model(ModelError::Candle(error))
    }
}

/// The place a model's MoE blocks are computed: the network or this process.
#[derive(Debug)]
enum MoeBlocks {
    Remote(Vec<RemoteMoeLayer>),
    Local(Vec<LocalMoeLayer>),
}

/// A Mixtral-architecture model whose MoE blocks run on the network or locally.
#[derive(Debug)]
pub struct MoeModel {
    dense: DenseModel,
    blocks: MoeBlocks,
}

/// The network activity of one forward pass.
#[derive(Debug, Clone, Default)]
pub struct PassStats {
    /// One trace per MoE layer, in layer order; empty for local blocks.
    pub traces: Vec<RoutingTrace>,
    /// Time spent in MoE blocks.
    pub moe: Duration,
}

impl MoeModel {
    /// Builds the model with every MoE block on the network.
    ///
    /// # Errors
    /// Errors reading the dense weights or building a remote layer.
    pub fn remote(
        router: &Router,
        checkpoint: &Checkpoint,
        manifest: &Manifest,
    ) -> Result<Self, GenerateError> {
        Self::remote_with(DenseModel::load(checkpoint)?, router, checkpoint, manifest)
    }

    /// As [`MoeModel::remote`], with dense weights loaded beforehand, so that a caller can
    /// check the checkpoint before joining the network.
    ///
    /// # Errors
    /// Errors building a remote layer.
    pub fn remote_with(
        dense: DenseModel,
        router: &Router,
        checkpoint: &Checkpoint,
        manifest: &Manifest,
    ) -> Result<Self, GenerateError> {
        let layers = (0..dense.config().num_hidden_layers as u32)
            .map(|layer| {
                RemoteMoeLayer::new(router, checkpoint, manifest, layer)
                    .map_err(|error| GenerateError::Layer { layer, error })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            dense,
            blocks: MoeBlocks::Remote(layers),
        })
    }

    /// Builds the reference: the same model with every expert computed locally.
    ///
    /// # Errors
    /// Errors reading the weights, such as a missing tensor named in the message.
    pub fn local(checkpoint: &Checkpoint) -> Result<Self, GenerateError> {
        let dense = DenseModel::load(checkpoint)?;
        let layers = (0..dense.config().num_hidden_layers as u32)
            .map(|layer| LocalMoeLayer::load(checkpoint, layer))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            dense,
            blocks: MoeBlocks::Local(layers),
        })
    }

    pub fn dense(&self) -> &DenseModel {
        &self.dense
    }

    /// Runs `tokens` (the positions after those in `cache`) through the model and returns
    /// their logits, `[tokens, vocab]`.
    ///
    /// # Errors
    /// A token outside the vocabulary, and the first failed MoE layer.
    pub async fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<(Tensor, PassStats), GenerateError> {
        let mut x = self.dense.embed(tokens)?;
        let mut stats = PassStats::default();
        for layer in 0..self.dense.config().num_hidden_layers {
            let (residual, moe_input) = self.dense.attention(layer, &x, cache)?;
            let started = Instant::now();
            let moe_output = match &self.blocks {
                MoeBlocks::Remote(layers) => {
                    let out = layers[layer].forward(&moe_input).await.map_err(|error| {
                        GenerateError::Layer {
                            layer: layer as u32,
                            error,
                        }
                    })?;
                    stats.traces.push(out.trace);
                    out.output
                }
                MoeBlocks::Local(layers) => layers[layer].forward(&moe_input)?,
            };
            stats.moe += started.elapsed();
            x = (residual + moe_output)?;
            if let Some(shared) = self.dense.shared_expert(layer, &moe_input)? {
                x = (x + shared)?;
            }
        }
        Ok((self.dense.logits(&x)?, stats))
    }
}

/// Settings of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    pub seed: u64,
}

/// The result of [`generate`].
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub prompt: Vec<u32>,
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// The logits each new token was sampled from.
    pub logits: Vec<Vec<f32>>,
    /// The routing traces of every pass, in order.
    pub traces: Vec<RoutingTrace>,
    pub moe: Duration,
    pub elapsed: Duration,
}

/// Generates up to `max_new_tokens` tokens after `prompt`, calling `on_token` with each as
/// it is produced.
///
/// # Errors
/// [`GenerateError::EmptyPrompt`], [`GenerateError::TooLong`], and the errors of
/// [`MoeModel::forward`].
pub async fn generate(
    model: &MoeModel,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let max = model
        .dense
        .config()
        .max_position_embeddings
        .unwrap_or(usize::MAX);
    let total = prompt.len() + options.max_new_tokens;
    if total > max {
        return Err(GenerateError::TooLong { total, max });
    }
    let started = Instant::now();
    let mut rng = SplitMix64::new(options.seed);
    let mut cache = model.dense.new_cache();
    let mut generation = Generation {
        prompt: prompt.to_vec(),
        ..Generation::default()
    };
    let mut input = prompt.to_vec();
    for _ in 0..options.max_new_tokens {
        let (logits, stats) = model.forward(&input, &mut cache).await?;
        let row = last_row(&logits)?;
        let token = sample(&row, options.temperature, rng.next_unit());
        on_token(token);
        generation.tokens.push(token);
        generation.logits.push(row);
        generation.traces.extend(stats.traces);
        generation.moe += stats.moe;
        input = vec![token];
    }
    generation.elapsed = started.elapsed();
    Ok(generation)
}

/// The comparison of the network's logits with the local reference's.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceCheck {
    /// Largest `max |network - local| / max |local|` over the generated positions.
    pub max_rel_error: f32,
    /// Positions whose greedy choice differs although the reference's top two logits are
    /// further apart than the tolerance allows.
    pub choice_mismatches: Vec<usize>,
    pub positions: usize,
}

impl ReferenceCheck {
    pub fn passed(&self, tolerance: f32) -> bool {
        self.max_rel_error <= tolerance && self.choice_mismatches.is_empty()
    }
}

/// Runs the local reference on the generated sequence, teacher-forced in one pass so that
/// a near tie cannot fork the two runs, and compares its logits at every generated
/// position with the network's.
///
/// # Errors
/// The errors of [`MoeModel::forward`].
pub async fn check_against_reference(
    reference: &MoeModel,
    generation: &Generation,
    tolerance: f32,
) -> Result<ReferenceCheck, GenerateError> {
    let mut sequence = generation.prompt.clone();
    sequence.extend_from_slice(&generation.tokens);
    // The last new token is never fed back, so it has no logits of its own to compare.
    sequence.pop();
    let mut cache = reference.dense.new_cache();
    let (logits, _) = reference.forward(&sequence, &mut cache).await?;
    let local = logits.to_vec2::<f32>()?;
    let first = generation.prompt.len().saturating_sub(1);

    let mut check = ReferenceCheck {
        max_rel_error: 0.0,
        choice_mismatches: Vec::new(),
        positions: generation.logits.len(),
    };
    for (step, network) in generation.logits.iter().enumerate() {
        let Some(expected) = local.get(first + step) else {
            continue;
        };
        let scale = expected
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let difference = network.iter().zip(expected).fold(0f32, |m, (a, b)| {
            if a.is_finite() {
                m.max((a - b).abs())
            } else {
                f32::INFINITY
            }
        });
        check.max_rel_error = check.max_rel_error.max(difference / scale);

        let mut sorted = expected.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let top = sorted.first().copied().unwrap_or(0.0);
        let gap = (top - sorted.get(1).copied().unwrap_or(f32::NEG_INFINITY)) / scale;
        if gap > tolerance && sample(network, 0.0, 0.0) != sample(expected, 0.0, 0.0) {
            check.choice_mismatches.push(step);
        }
    }
    Ok(check)
}

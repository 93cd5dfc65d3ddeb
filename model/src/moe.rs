//! A whole MoE layer computed in one process: the reference that remote layers are
//! compared with.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use expertnet_proto::DType;
use rayon::prelude::*;

use crate::gate::{GateRule, TokenGate, gate_tokens};
use crate::{Checkpoint, Expert, ModelError};

/// The routed experts of one MoE layer with their gate, in f32.
///
/// Qwen2-MoE's shared expert is not part of it: it is dense, and
/// [`crate::DenseModel::shared_expert`] computes it.
#[derive(Debug, Clone)]
pub struct LocalMoeLayer {
    layer: u32,
    rule: GateRule,
    top_k: usize,
    gate: Tensor,
    experts: Vec<Expert>,
}

impl LocalMoeLayer {
    /// Loads layer `layer`'s gate and every expert from a checkpoint, in f32.
    ///
    /// # Errors
    /// [`ModelError::NoSuchExpert`] when the layer does not exist or is dense, and the
    /// errors of reading tensors.
    pub fn load(checkpoint: &Checkpoint, layer: u32) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        if !config.is_moe_layer(layer as usize) {
            return Err(ModelError::NoSuchExpert {
                layer,
                expert: 0,
                layers: config.num_hidden_layers,
                experts: config.num_experts(),
            });
        }
        let gate = checkpoint.load_gate(layer, candle_core::DType::F32, &Device::Cpu)?;
        let experts = (0..config.num_experts())
            .map(|expert| checkpoint.load_expert(layer, expert, DType::F32, &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            layer,
            rule: GateRule::from_config(config),
            top_k: config.num_experts_per_tok,
            gate,
            experts,
        })
    }

    pub fn layer(&self) -> u32 {
        self.layer
    }

    pub fn rule(&self) -> GateRule {
        self.rule
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Returns the gate weight, `[experts, hidden]`.
    pub fn gate(&self) -> &Tensor {
        &self.gate
    }

    pub fn expert(&self, expert: u32) -> Option<&Expert> {
        self.experts.get(expert as usize)
    }

    /// Computes each token's gate result for `hidden` (`[tokens, hidden]`).
    ///
    /// # Errors
    /// A candle error when the width differs from the gate's.
    pub fn gates(&self, hidden: &Tensor) -> Result<Vec<TokenGate>, ModelError> {
        Ok(gate_tokens(hidden, &self.gate)?)
    }

    /// Computes the layer's output for `hidden` (`[tokens, hidden]`): per token, the gate-weighted
    /// sum of its top k experts' outputs. Tokens are grouped per expert, as a remote layer
    /// groups them.
    ///
    /// # Errors
    /// A candle error when the shape differs from `[tokens, hidden_size]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let (tokens, width) = hidden.dims2()?;
        let hidden = hidden.to_dtype(candle_core::DType::F32)?;
        let gates = self.gates(&hidden)?;

        let mut by_expert: BTreeMap<u32, Vec<(usize, f32)>> = BTreeMap::new();
        for (token, gate) in gates.iter().enumerate() {
            let chosen = gate.top_k(self.top_k);
            let weights = self.rule.weights(&gate.logits, chosen);
            for (&expert, weight) in chosen.iter().zip(weights) {
                by_expert.entry(expert).or_default().push((token, weight));
            }
        }

        // Experts run in parallel on the rayon pool, as nodes run them side by side. The
        // sum is then taken in expert order, so the result does not depend on scheduling.
        let groups: Vec<(u32, Vec<(usize, f32)>)> = by_expert.into_iter().collect();
        let outputs: Vec<Option<Vec<Vec<f32>>>> = groups
            .par_iter()
            .map(|(expert, routed)| -> Result<_, ModelError> {
                let Some(weights) = self.experts.get(*expert as usize) else {
                    return Ok(None);
                };
                let rows: Vec<u32> = routed.iter().map(|&(token, _)| token as u32).collect();
                let index = Tensor::new(rows.as_slice(), &Device::Cpu)?;
                let x = hidden.index_select(&index, 0)?;
                Ok(Some(weights.forward(&x)?.to_vec2::<f32>()?))
            })
            .collect::<Result<_, _>>()?;

        let mut output = vec![0f32; tokens * width];
        for ((_, routed), y) in groups.iter().zip(outputs) {
            let Some(y) = y else { continue };
            for (&(token, weight), row) in routed.iter().zip(&y) {
                accumulate(&mut output[token * width..(token + 1) * width], weight, row);
            }
        }
        Ok(Tensor::from_vec(output, (tokens, width), &Device::Cpu)?)
    }
}

/// Adds `weight * row` to `out`: the combination step of an MoE layer.
pub fn accumulate(out: &mut [f32], weight: f32, row: &[f32]) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o += weight * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GeneratorOptions, generate_checkpoint};

    #[test]
    fn forward_sums_weighted_top_experts() {
        let dir = tempfile::tempdir().unwrap();
        let options = GeneratorOptions {
            layers: 1,
            experts: 4,
            hidden: 16,
            ffn: 24,
            vocab: 8,
            ..GeneratorOptions::default()
        };
        generate_checkpoint(dir.path(), &options).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let layer = LocalMoeLayer::load(&checkpoint, 0).unwrap();

        let mut rng = crate::rng::SplitMix64::new(5);
        let hidden = Tensor::from_vec(rng.normal_vec(3 * 16), (3, 16), &Device::Cpu).unwrap();
        let output = layer.forward(&hidden).unwrap();

        // Token by token, expert by expert, without grouping.
        let gates = layer.gates(&hidden).unwrap();
        for (token, gate) in gates.iter().enumerate() {
            let x = hidden.narrow(0, token, 1).unwrap();
            let chosen = gate.top_k(layer.top_k());
            let weights = layer.rule().weights(&gate.logits, chosen);
            let mut expected = vec![0f32; 16];
            for (&expert, weight) in chosen.iter().zip(weights) {
                let y = layer
                    .expert(expert)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                accumulate(&mut expected, weight, &y[0]);
            }
            let expected = Tensor::from_vec(expected, (1, 16), &Device::Cpu).unwrap();
            let got = output.narrow(0, token, 1).unwrap();
            let error = crate::max_row_relative_error(&got, &expected).unwrap();
            assert!(error < 1e-5, "token {token}: {error}");
        }
    }
}

//! The gate of an MoE layer: which experts each token goes to, and with what weight.

use crate::{Family, ModelConfig};
use candle_core::Tensor;

/// The rule by which a family turns gate logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRule {
    /// The weights of the chosen experts sum to 1: Mixtral (a softmax over the top-k
    /// logits) and Qwen-MoE or OLMoE with `norm_topk_prob` set (a softmax over all logits,
    /// renormalized over the top k). Both give `exp(l_i) / sum over chosen j of exp(l_j)`.
    Normalized,
    /// The weights are the chosen experts' probabilities under a softmax over all logits,
    /// without renormalization: Qwen2-MoE and OLMoE with `norm_topk_prob` unset.
    Softmax,
}

impl GateRule {
    /// Returns the rule of a checkpoint's family and settings.
    pub fn from_config(config: &ModelConfig) -> Self {
        match config.family() {
            Some(Family::Mixtral) | None => GateRule::Normalized,
            Some(Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe) => {
                if config.norm_topk_prob.unwrap_or(false) {
                    GateRule::Normalized
                } else {
                    GateRule::Softmax
                }
            }
        }
    }

    /// Computes the weights of `chosen` experts from one token's logits over all experts,
    /// for the top k and for any set that replaces an expert that failed.
    pub fn weights(self, logits: &[f32], chosen: &[u32]) -> Vec<f32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp = |expert: u32| (logits[expert as usize] - max).exp();
        let chosen_exp: Vec<f32> = chosen.iter().map(|&e| exp(e)).collect();
        let denominator = match self {
            GateRule::Normalized => chosen_exp.iter().sum::<f32>(),
            GateRule::Softmax => logits.iter().map(|&l| (l - max).exp()).sum::<f32>(),
        };
        chosen_exp.iter().map(|&e| e / denominator).collect()
    }

    /// The weights of the experts that `served` a token whose gate picked its `top_k`
    /// best. When some of the top k could not be used, the served set is weighed as the
    /// rule weighs a chosen set, then scaled so the served weights sum to what the top k's
    /// would have: 1 under [`GateRule::Normalized`], the top k's probability mass under
    /// [`GateRule::Softmax`].
    pub fn served_weights(self, gate: &TokenGate, top_k: usize, served: &[u32]) -> Vec<f32> {
        let weights = self.weights(&gate.logits, served);
        let top = gate.top_k(top_k);
        let same_set = served.len() == top.len() && served.iter().all(|e| top.contains(e));
        if self == GateRule::Normalized || same_set {
            return weights;
        }
        let target: f32 = self.weights(&gate.logits, top).iter().sum();
        let sum: f32 = weights.iter().sum();
        if sum > 0.0 {
            weights.iter().map(|w| w * target / sum).collect()
        } else {
            weights
        }
    }
}

/// One token's gate result: every expert ranked by logit, best first, with the logits
/// kept to weigh any replacement set.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenGate {
    pub ranking: Vec<u32>,
    pub logits: Vec<f32>,
}

impl TokenGate {
    /// Ranks experts by logit, breaking ties by the lower expert index.
    pub fn from_logits(logits: Vec<f32>) -> Self {
        let mut ranking: Vec<u32> = (0..logits.len() as u32).collect();
        ranking.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        Self { ranking, logits }
    }

    /// Returns the `k` best experts.
    pub fn top_k(&self, k: usize) -> &[u32] {
        &self.ranking[..k.min(self.ranking.len())]
    }
}

/// Computes the gate for each token of `hidden` (`[tokens, hidden]`) with the gate weight
/// `gate` (`[experts, hidden]`).
///
/// # Errors
/// A candle error when the shapes do not match.
pub fn gate_tokens(hidden: &Tensor, gate: &Tensor) -> candle_core::Result<Vec<TokenGate>> {
    let logits = hidden
        .to_dtype(candle_core::DType::F32)?
        .matmul(&gate.to_dtype(candle_core::DType::F32)?.t()?)?;
    Ok(logits
        .to_vec2::<f32>()?
        .into_iter()
        .map(TokenGate::from_logits)
        .collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn normalized_rule_is_softmax_over_the_chosen_logits() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let gate = TokenGate::from_logits(logits.to_vec());
        assert_eq!(gate.top_k(2), &[1, 2]);
        let weights = GateRule::Normalized.weights(&logits, gate.top_k(2));
        let expected = [
            1.0 / (1.0 + (-1.0f32).exp()),
            (-1.0f32).exp() / (1.0 + (-1.0f32).exp()),
        ];
        for (w, e) in weights.iter().zip(expected) {
            assert!((w - e).abs() < 1e-6, "{weights:?}");
        }
    }

    #[test]
    fn softmax_rule_keeps_the_full_softmax_probabilities() {
        let logits = [0.0, 0.0, 0.0, 0.0];
        let weights = GateRule::Softmax.weights(&logits, &[0, 3]);
        assert_eq!(weights, vec![0.25, 0.25]);
    }

    #[test]
    fn replacement_keeps_the_top_k_mass() {
        let gate = TokenGate::from_logits(vec![2.0, 1.0, 0.5, 0.0]);
        let top: f32 = GateRule::Softmax
            .weights(&gate.logits, &[0, 1])
            .iter()
            .sum();
        let served = GateRule::Softmax.served_weights(&gate, 2, &[0, 2]);
        assert!(
            (served.iter().sum::<f32>() - top).abs() < 1e-6,
            "{served:?}"
        );
        assert!(
            served[0] > served[1],
            "the better expert keeps the larger weight"
        );

        let served = GateRule::Normalized.served_weights(&gate, 2, &[2]);
        assert_eq!(served, vec![1.0]);
    }

    #[test]
    fn ties_rank_the_lower_index_first() {
        let gate = TokenGate::from_logits(vec![0.5, 0.9, 0.9, 0.1]);
        assert_eq!(gate.ranking, vec![1, 2, 0, 3]);
    }

    proptest! {
        #[test]
        fn top_k_is_distinct_and_normalized(
            logits in proptest::collection::vec(-20.0f32..20.0, 2..64),
            k in 1usize..8,
        ) {
            let gate = TokenGate::from_logits(logits.clone());
            let k = k.min(logits.len());
            let chosen = gate.top_k(k);
            prop_assert_eq!(chosen.len(), k);
            let mut distinct = chosen.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), k);

            // No expert left out scores above one that was chosen.
            let worst_chosen = chosen.iter().map(|&e| logits[e as usize]).fold(f32::INFINITY, f32::min);
            for expert in &gate.ranking[k..] {
                prop_assert!(logits[*expert as usize] <= worst_chosen);
            }

            let weights = GateRule::Normalized.weights(&logits, chosen);
            let sum: f32 = weights.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-5, "weights {:?} sum to {}", weights, sum);
            prop_assert!(weights.iter().all(|w| w.is_finite() && *w >= 0.0));
        }
    }
}

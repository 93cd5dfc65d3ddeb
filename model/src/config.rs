//! `config.json` of a Hugging Face MoE checkpoint, reduced to what expertnet needs.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The model families whose experts expertnet can serve. They differ in tensor names and in
/// the gate's top-k rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `model_type: "mixtral"`: experts under `block_sparse_moe`, weights `w1`, `w2`, `w3`;
    /// the gate takes a softmax over the top-k logits.
    Mixtral,
    /// `model_type: "qwen2_moe"`: experts under `mlp`, plus a shared expert on the client.
    Qwen2Moe,
    /// `model_type: "qwen3_moe"`.
    Qwen3Moe,
    /// `model_type: "olmoe"`.
    Olmoe,
}

impl Family {
    /// Parses a `model_type` value.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mixtral" => Some(Self::Mixtral),
            "qwen2_moe" => Some(Self::Qwen2Moe),
            "qwen3_moe" => Some(Self::Qwen3Moe),
            "olmoe" => Some(Self::Olmoe),
            _ => None,
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Qwen3Moe => "qwen3_moe",
            Self::Olmoe => "olmoe",
        }
    }
}

/// The fields of `config.json` that expertnet reads. Unknown fields are ignored, so real
/// checkpoints with extra settings load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    /// Width of the dense MLP, and of each expert in Mixtral and OLMoE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// Width of each expert in Qwen2-MoE and Qwen3-MoE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    /// Experts per MoE layer (Mixtral's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_local_experts: Option<usize>,
    /// Experts per MoE layer (Qwen-MoE's and OLMoE's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// Every `decoder_sparse_step`-th layer is an MoE layer (Qwen-MoE); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_sparse_step: Option<usize>,
    /// Layers that use a dense MLP instead of experts (Qwen-MoE).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mlp_only_layers: Vec<usize>,
    pub vocab_size: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Biases on the query, key, value and output projections (Qwen3-MoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Biases on the query, key and value projections (Qwen2-MoE); true when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// Rotary scaling settings such as YaRN, which the client-side forward pass lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Sliding-window attention (Qwen-MoE), which the client-side forward pass lacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] when the file cannot be read, [`ModelError::Config`] when it is not
    /// valid JSON or describes no supported MoE model.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            error: source,
        })?;
        Self::from_json(&text).map_err(|reason| ModelError::Config {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses and validates the JSON text of a config.
    ///
    /// # Errors
    /// A message naming the field that is missing or out of range.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let config: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let family = self.family().ok_or_else(|| {
            format!(
                "model_type {:?} is not supported; expertnet serves mixtral, qwen2_moe, \
                 qwen3_moe and olmoe checkpoints",
                self.model_type
            )
        })?;
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported; the experts must use silu (SwiGLU)",
                self.hidden_act
            ));
        }

        let positive = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("vocab_size", self.vocab_size),
            ("num_attention_heads", self.num_attention_heads),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} is 0; it must be positive"));
            }
        }

        let experts = self.num_experts_raw().ok_or_else(|| match family {
            Family::Mixtral => "num_local_experts is missing".to_owned(),
            _ => "num_experts is missing".to_owned(),
        })?;
        if experts == 0 || experts > u32::MAX as usize {
            return Err(format!("the expert count {experts} is out of range"));
        }
        if self.num_experts_per_tok > experts {
            return Err(format!(
                "num_experts_per_tok ({}) is larger than the expert count ({experts})",
                self.num_experts_per_tok
            ));
        }
        match self.expert_ffn_raw() {
            Some(0) | None => {
                let field = match family {
                    Family::Qwen2Moe | Family::Qwen3Moe => "moe_intermediate_size",
                    Family::Mixtral | Family::Olmoe => "intermediate_size",
                };
                return Err(format!("{field} is missing or 0"));
            }
            Some(_) => {}
        }
        if self.decoder_sparse_step == Some(0) {
            return Err("decoder_sparse_step is 0; it must be at least 1".to_owned());
        }

        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads();
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({heads}); set head_dim",
                self.hidden_size
            ));
        }
        Ok(())
    }

    /// The family named by `model_type`.
    pub fn family(&self) -> Option<Family> {
        Family::from_model_type(&self.model_type)
    }

    fn num_experts_raw(&self) -> Option<usize> {
        self.num_local_experts.or(self.num_experts)
    }

    fn expert_ffn_raw(&self) -> Option<usize> {
        match self.family() {
            Some(Family::Qwen2Moe | Family::Qwen3Moe) => self.moe_intermediate_size,
            _ => self.intermediate_size,
        }
    }

    /// Experts per MoE layer.
    pub fn num_experts(&self) -> u32 {
        self.num_experts_raw().unwrap_or(0) as u32
    }

    /// Width of one expert's hidden layer.
    pub fn expert_ffn(&self) -> usize {
        self.expert_ffn_raw().unwrap_or(0)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `layer` has experts (rather than a dense MLP).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        if layer >= self.num_hidden_layers {
            return false;
        }
        match self.family() {
            Some(Family::Qwen2Moe | Family::Qwen3Moe) => {
                let step = self.decoder_sparse_step.unwrap_or(1).max(1);
                !self.mlp_only_layers.contains(&layer) && (layer + 1).is_multiple_of(step)
            }
            _ => true,
        }
    }

    /// The indices of the MoE layers in increasing order.
    pub fn moe_layers(&self) -> Vec<u32> {
        (0..self.num_hidden_layers)
            .filter(|&layer| self.is_moe_layer(layer))
            .map(|layer| layer as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL: &str = r#"{
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "vocab_size": 32000, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "hidden_act": "silu",
        "router_aux_loss_coef": 0.02, "sliding_window": null, "torch_dtype": "bfloat16"
    }"#;

    const QWEN2_MOE: &str = r#"{
        "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
        "hidden_act": "silu", "rope_theta": 1000000.0, "rms_norm_eps": 1e-06
    }"#;

    #[test]
    fn mixtral_config_parses() {
        let config = ModelConfig::from_json(MIXTRAL.as_bytes()).unwrap();
        assert_eq!(config.family(), Some(Family::Mixtral));
        assert_eq!(config.num_experts(), 8);
        assert_eq!(config.expert_ffn(), 14336);
        assert_eq!(config.head_dim(), 128);
        assert_eq!(config.moe_layers().len(), 32);
    }

    #[test]
    fn qwen2_moe_config_parses() {
        let config = ModelConfig::from_json(QWEN2_MOE.as_bytes()).unwrap();
        assert_eq!(config.family(), Some(Family::Qwen2Moe));
        assert_eq!(config.num_experts(), 60);
        assert_eq!(config.expert_ffn(), 1408);
        assert_eq!(config.norm_topk_prob, Some(false));
    }

    #[test]
    fn sparse_step_and_dense_layers_apply() {
        let mut config = ModelConfig::from_json(QWEN2_MOE.as_bytes()).unwrap();
        config.num_hidden_layers = 6;
        config.decoder_sparse_step = Some(2);
        config.mlp_only_layers = vec![3];
        assert_eq!(config.moe_layers(), vec![1, 5]);
    }

    #[test]
    fn unsupported_configs_are_rejected() {
        let llama = MIXTRAL.replace("\"mixtral\"", "\"llama\"");
        let error = ModelConfig::from_json(llama.as_bytes()).unwrap_err();
        assert!(error.contains("\"llama\""), "{error}");

        let no_experts = MIXTRAL.replace("\"num_local_experts\": 8,", "");
        let error = ModelConfig::from_json(no_experts.as_bytes()).unwrap_err();
        assert!(error.contains("num_local_experts"), "{error}");

        let too_many = MIXTRAL.replace("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9");
        let error = ModelConfig::from_json(too_many.as_bytes()).unwrap_err();
        assert!(error.contains("num_experts_per_tok"), "{error}");

        let gelu = MIXTRAL.replace("\"silu\"", "\"gelu\"");
        let error = ModelConfig::from_json(gelu.as_bytes()).unwrap_err();
        assert!(error.contains("gelu"), "{error}");
    }
}

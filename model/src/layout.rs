//! Tensor names of the supported families in the Hugging Face layout.

use crate::Family;

/// The three weight matrices of a SwiGLU expert: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertRole {
    /// `[ffn, hidden]`; Mixtral's `w1`, Qwen's `gate_proj`.
    Gate,
    /// `[ffn, hidden]`; Mixtral's `w3`, Qwen's `up_proj`.
    Up,
    /// `[hidden, ffn]`; Mixtral's `w2`, Qwen's `down_proj`.
    Down,
}

impl ExpertRole {
    /// The roles in the order the expert digest hashes them.
    pub const ALL: [ExpertRole; 3] = [ExpertRole::Gate, ExpertRole::Up, ExpertRole::Down];

    /// The expected shape for an expert of the given sizes.
    pub fn shape(self, hidden: usize, ffn: usize) -> [usize; 2] {
        match self {
            ExpertRole::Gate | ExpertRole::Up => [ffn, hidden],
            ExpertRole::Down => [hidden, ffn],
        }
    }
}

/// The name of one expert weight, such as
/// `model.layers.3.block_sparse_moe.experts.5.w1.weight` for Mixtral or
/// `model.layers.3.mlp.experts.5.gate_proj.weight` for Qwen-MoE and OLMoE.
pub fn expert_tensor_name(family: Family, layer: u32, expert: u32, role: ExpertRole) -> String {
    match family {
        Family::Mixtral => {
            let weight = match role {
                ExpertRole::Gate => "w1",
                ExpertRole::Down => "w2",
                ExpertRole::Up => "w3",
            };
            format!("model.layers.{layer}.block_sparse_moe.experts.{expert}.{weight}.weight")
        }
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => {
            let weight = match role {
                ExpertRole::Gate => "gate_proj",
                ExpertRole::Up => "up_proj",
                ExpertRole::Down => "down_proj",
            };
            format!("model.layers.{layer}.mlp.experts.{expert}.{weight}.weight")
        }
    }
}

/// The name of a layer's gate (router) weight, shape `[experts, hidden]`.
pub fn gate_tensor_name(family: Family, layer: u32) -> String {
    match family {
        Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe.gate.weight"),
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => {
            format!("model.layers.{layer}.mlp.gate.weight")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_hugging_face() {
        assert_eq!(
            expert_tensor_name(Family::Mixtral, 3, 5, ExpertRole::Gate),
            "model.layers.3.block_sparse_moe.experts.5.w1.weight"
        );
        assert_eq!(
            expert_tensor_name(Family::Mixtral, 0, 7, ExpertRole::Down),
            "model.layers.0.block_sparse_moe.experts.7.w2.weight"
        );
        assert_eq!(
            expert_tensor_name(Family::Qwen3Moe, 1, 2, ExpertRole::Up),
            "model.layers.1.mlp.experts.2.up_proj.weight"
        );
        assert_eq!(
            gate_tensor_name(Family::Olmoe, 4),
            "model.layers.4.mlp.gate.weight"
        );
    }
}

//! The experts a node hosts: selected by the spec, checked against the manifest, loaded in
//! the compute dtype.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use expertnet_model::{Checkpoint, Expert, Manifest, ModelConfig};
use expertnet_proto::{DType, Digest, LayerExperts};

use crate::{ExpertSpec, NodeError};

/// One hosted expert.
#[derive(Debug)]
pub(crate) struct HostedExpert {
    pub(crate) layer: u32,
    pub(crate) expert: u32,
    /// The manifest's digest, which every receipt for this expert signs.
    pub(crate) digest: Digest,
    pub(crate) weights: Expert,
}

/// The model a node serves and the experts it hosts, indexed by slot.
#[derive(Debug)]
pub(crate) struct HostedModel {
    pub(crate) model_id: String,
    pub(crate) config: ModelConfig,
    pub(crate) compute_dtype: DType,
    pub(crate) experts: Vec<HostedExpert>,
    slots: HashMap<(u32, u32), usize>,
}

impl HostedModel {
    /// Opens the checkpoint, checks config and hosted experts against the manifest and
    /// loads the experts. Blocking: it reads and hashes every hosted expert.
    pub(crate) fn load(
        checkpoint_dir: &Path,
        manifest_path: Option<&Path>,
        spec: &ExpertSpec,
        compute_dtype: DType,
    ) -> Result<Self, NodeError> {
        let started = Instant::now();
        if compute_dtype == DType::BF16 {
            return Err(NodeError::Config(
                "compute dtype bf16 is not supported on CPU (candle has no bf16 matmul kernel); \
                 use f32 or f16"
                    .to_owned(),
            ));
        }

        let checkpoint = Checkpoint::open(checkpoint_dir)?;
        let manifest_path = manifest_path
            .map(Path::to_owned)
            .unwrap_or_else(|| Manifest::path_in(checkpoint_dir));
        let manifest = Manifest::load(&manifest_path)?;
        manifest.check_config(&checkpoint)?;
        let model_id = manifest.model_id();

        let selected = spec.resolve(checkpoint.config())?;
        let mut experts = Vec::with_capacity(selected.len());
        let mut slots = HashMap::with_capacity(selected.len());
        for (layer, expert) in selected {
            let digest = manifest.verify_expert(&checkpoint, layer, expert)?;
            let weights = checkpoint.load_expert(layer, expert, compute_dtype, &Device::Cpu)?;
            slots.insert((layer, expert), experts.len());
            experts.push(HostedExpert {
                layer,
                expert,
                digest,
                weights,
            });
        }

        tracing::info!(
            model_id,
            experts = experts.len(),
            spec = %spec,
            compute_dtype = %compute_dtype,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "loaded and verified experts"
        );
        Ok(Self {
            model_id,
            config: checkpoint.config().clone(),
            compute_dtype,
            experts,
            slots,
        })
    }

    /// The slot of a hosted expert.
    pub(crate) fn slot(&self, layer: u32, expert: u32) -> Option<usize> {
        self.slots.get(&(layer, expert)).copied()
    }

    pub(crate) fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Whether the node hosts any expert of this layer.
    pub(crate) fn hosts_layer(&self, layer: u32) -> bool {
        self.experts.iter().any(|e| e.layer == layer)
    }

    /// The hosted experts as ranges per layer, in layer order.
    pub(crate) fn layer_sets(&self) -> Vec<LayerExperts> {
        let mut by_layer: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
        for hosted in &self.experts {
            by_layer
                .entry(hosted.layer)
                .or_default()
                .push(hosted.expert);
        }
        by_layer
            .into_iter()
            .map(|(layer, experts)| LayerExperts::from_experts(layer, experts))
            .collect()
    }
}

//! Generated checkpoints read back through the same code that reads real ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType as CandleDType, Device, Tensor};
use expertnet_model::layout::{ExpertRole, expert_tensor_name};
use expertnet_model::{
    Checkpoint, DenseModel, Family, GeneratorOptions, Manifest, ModelError, generate_checkpoint,
    max_row_relative_error,
};
use expertnet_proto::DType;

fn small(family: Family, dtype: DType) -> GeneratorOptions {
    GeneratorOptions {
        family,
        layers: 2,
        experts: 4,
        hidden: 32,
        ffn: 48,
        vocab: 64,
        heads: 4,
        kv_heads: 2,
        dtype,
        ..GeneratorOptions::default()
    }
}

#[test]
fn generated_mixtral_checkpoint_opens() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = generate_checkpoint(dir.path(), &small(Family::Mixtral, DType::F32)).unwrap();

    assert_eq!(checkpoint.family(), Family::Mixtral);
    assert_eq!(checkpoint.config().num_experts(), 4);
    assert!(dir.path().join("model.safetensors").exists());
    assert!(!dir.path().join("model.safetensors.index.json").exists());
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(checkpoint.has_tensor(name), "{name} missing");
    }

    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    assert_eq!(manifest.expert_count(), 8);
    manifest.check_config(&checkpoint).unwrap();
    manifest.verify_expert(&checkpoint, 1, 3).unwrap();
    assert!(manifest.model_id().starts_with("mixtral-"));
}

#[test]
fn qwen2_moe_layout_has_shared_expert() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = generate_checkpoint(dir.path(), &small(Family::Qwen2Moe, DType::F32)).unwrap();
    assert_eq!(checkpoint.family(), Family::Qwen2Moe);
    assert!(checkpoint.has_tensor("model.layers.0.mlp.experts.2.gate_proj.weight"));
    assert!(checkpoint.has_tensor("model.layers.1.self_attn.q_proj.bias"));
    assert!(checkpoint.has_tensor("model.layers.1.mlp.shared_expert.down_proj.weight"));
    assert!(checkpoint.has_tensor("model.layers.1.mlp.shared_expert_gate.weight"));
    assert_eq!(
        checkpoint.config().norm_topk_prob,
        Some(false),
        "qwen2_moe keeps the softmax weights of the top k"
    );

    // The manifest covers the routed experts; the shared expert is part of the dense model.
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    manifest.verify_expert(&checkpoint, 1, 3).unwrap();
    assert!(manifest.model_id().starts_with("qwen2_moe-"));
    assert!(DenseModel::load(&checkpoint).is_ok());
}

#[test]
fn qwen3_moe_layout_uses_mlp_names() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint =
        generate_checkpoint(dir.path(), &small(Family::Qwen3Moe, DType::BF16)).unwrap();
    assert_eq!(checkpoint.family(), Family::Qwen3Moe);
    assert!(checkpoint.has_tensor("model.layers.0.mlp.experts.2.gate_proj.weight"));
    assert!(checkpoint.has_tensor("model.layers.1.self_attn.q_norm.weight"));
    assert_eq!(
        checkpoint.config().norm_topk_prob,
        Some(true),
        "qwen3_moe renormalizes the top-k weights"
    );

    let expert = checkpoint
        .load_expert(1, 2, DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(expert.hidden_size(), 32);
    assert_eq!(expert.ffn_size(), 48);
}

#[test]
fn same_seed_gives_same_model_id() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let options = small(Family::Mixtral, DType::F32);
    generate_checkpoint(a.path(), &options).unwrap();
    generate_checkpoint(b.path(), &options).unwrap();
    generate_checkpoint(c.path(), &GeneratorOptions { seed: 1, ..options }).unwrap();

    let id = |dir: &std::path::Path| Manifest::load(&Manifest::path_in(dir)).unwrap().model_id();
    assert_eq!(id(a.path()), id(b.path()));
    assert_ne!(id(a.path()), id(c.path()));
}

#[test]
fn sharded_checkpoint_needs_only_the_hosted_shards() {
    let dir = tempfile::tempdir().unwrap();
    let options = GeneratorOptions {
        max_shard_bytes: 20_000,
        ..small(Family::Mixtral, DType::F32)
    };
    let checkpoint = generate_checkpoint(dir.path(), &options).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").exists());

    let shards_of = |layer: u32, expert: u32| -> Vec<String> {
        ExpertRole::ALL
            .iter()
            .map(|&role| {
                let name = expert_tensor_name(Family::Mixtral, layer, expert, role);
                checkpoint.shard_of(&name).unwrap().to_owned()
            })
            .collect()
    };
    let needed = shards_of(1, 2);
    let elsewhere = shards_of(0, 0)
        .into_iter()
        .find(|file| !needed.contains(file))
        .expect("layer 0 expert 0 lies in another shard");
    let expected = checkpoint.expert_digest(1, 2).unwrap();
    drop(checkpoint);

    // Keep config, index, manifest and only the shards that hold layer 1 expert 2.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if file.ends_with(".safetensors") && !needed.contains(&file) {
            std::fs::remove_file(dir.path().join(&file)).unwrap();
        }
    }

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();
    manifest.check_config(&checkpoint).unwrap();
    assert_eq!(manifest.verify_expert(&checkpoint, 1, 2).unwrap(), expected);

    let error = checkpoint.expert_digest(0, 0).unwrap_err();
    assert!(
        matches!(&error, ModelError::Io { path, .. } if path.ends_with(&elsewhere)),
        "{error}"
    );
}

#[test]
fn altered_expert_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small(Family::Mixtral, DType::F32)).unwrap();
    let manifest = Manifest::load(&Manifest::path_in(dir.path())).unwrap();

    // Rewrite one expert tensor with different values but the same shape.
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    let altered = (tensors[name].clone() * 1.01).unwrap();
    tensors.insert(name.to_owned(), altered);
    candle_core::safetensors::save(&tensors, &path).unwrap();

    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    manifest.verify_expert(&checkpoint, 1, 1).unwrap();
    let error = manifest.verify_expert(&checkpoint, 1, 2).unwrap_err();
    assert!(
        matches!(
            error,
            ModelError::DigestMismatch {
                layer: 1,
                expert: 2,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("layer 1 expert 2"), "{error}");
}

#[test]
fn expert_dtypes_agree_with_f32() {
    let dir32 = tempfile::tempdir().unwrap();
    let dir16 = tempfile::tempdir().unwrap();
    let c32 = generate_checkpoint(dir32.path(), &small(Family::Mixtral, DType::F32)).unwrap();
    let c16 = generate_checkpoint(dir16.path(), &small(Family::Mixtral, DType::F16)).unwrap();

    let x = Tensor::randn(0f32, 1.0, (5, 32), &Device::Cpu).unwrap();
    let reference = c32.load_expert(0, 1, DType::F32, &Device::Cpu).unwrap();
    let y32 = reference.forward(&x).unwrap();

    let half = c16.load_expert(0, 1, DType::F32, &Device::Cpu).unwrap();
    let y16 = half.forward(&x).unwrap();
    // f16 storage rounds each weight to 11 significant bits.
    let error = max_row_relative_error(&y16, &y32).unwrap();
    assert!(error < 1e-2, "f16 weights: relative error {error}");

    let computed_in_f16 = c16.load_expert(0, 1, DType::F16, &Device::Cpu).unwrap();
    let y = computed_in_f16
        .forward(&x.to_dtype(CandleDType::F16).unwrap())
        .unwrap();
    let error = max_row_relative_error(&y, &y32).unwrap();
    assert!(error < 2e-2, "f16 compute: relative error {error}");
}

#[test]
fn bad_folders_give_clear_errors() {
    let empty = tempfile::tempdir().unwrap();
    let error = Checkpoint::open(empty.path()).unwrap_err();
    assert!(error.to_string().contains("config.json"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small(Family::Mixtral, DType::F32)).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let error = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(error, ModelError::Safetensors { .. }), "{error}");

    let dir = tempfile::tempdir().unwrap();
    generate_checkpoint(dir.path(), &small(Family::Mixtral, DType::F32)).unwrap();
    std::fs::remove_file(Manifest::path_in(dir.path())).unwrap();
    let error = Manifest::load(&Manifest::path_in(dir.path())).unwrap_err();
    assert!(
        error.to_string().contains("expertnet-node manifest"),
        "{error}"
    );

    let error = generate_checkpoint(dir.path(), &small(Family::Mixtral, DType::F32)).unwrap_err();
    assert!(
        error.to_string().contains("already contains a checkpoint"),
        "{error}"
    );
}

#[test]
fn generator_rejects_what_it_cannot_write() {
    let parent = tempfile::tempdir().unwrap();
    let target = parent.path().join("huge");
    let huge = GeneratorOptions {
        hidden: 100_000_000,
        ffn: 100_000_000,
        heads: 1,
        kv_heads: 1,
        ..GeneratorOptions::default()
    };
    let error = generate_checkpoint(&target, &huge).unwrap_err().to_string();
    assert!(error.contains("per tensor"), "{error}");
    assert!(
        !target.exists(),
        "a rejected checkpoint must leave no folder"
    );

    let many = GeneratorOptions {
        hidden: 8192,
        ffn: 8192,
        layers: 64,
        experts: 64,
        heads: 64,
        kv_heads: 8,
        ..GeneratorOptions::default()
    };
    let error = generate_checkpoint(&target, &many).unwrap_err().to_string();
    assert!(
        error.contains("GiB, above the generator's limit"),
        "{error}"
    );

    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("notes.txt"), "keep me").unwrap();
    let error = generate_checkpoint(&target, &small(Family::Mixtral, DType::F32))
        .unwrap_err()
        .to_string();
    assert!(error.contains("is not empty"), "{error}");
    assert_eq!(
        std::fs::read_to_string(target.join("notes.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn missing_folders_are_named() {
    let parent = tempfile::tempdir().unwrap();
    let error = Checkpoint::open(parent.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("does not exist"), "{error}");

    let error = Checkpoint::open(parent.path()).unwrap_err().to_string();
    assert!(error.contains("has no config.json"), "{error}");

    let file = parent.path().join("config.json");
    std::fs::write(&file, "{}").unwrap();
    let error = Checkpoint::open(&file).unwrap_err().to_string();
    assert!(
        error.contains("is a file, not a checkpoint folder"),
        "{error}"
    );
}

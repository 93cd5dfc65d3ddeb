//! The `expertnet-sim` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use expertnet_model::{Checkpoint, Family, Manifest};

const BINARY: &str = env!("CARGO_BIN_EXE_expertnet-sim");

#[test]
fn make_checkpoint_writes_a_complete_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let output = Command::new(BINARY)
        .args([
            "make-checkpoint",
            "--layers",
            "2",
            "--experts",
            "4",
            "--hidden",
            "32",
            "--ffn",
            "64",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let model_id = String::from_utf8(output.stdout).unwrap();

    let manifest = Manifest::load(&Manifest::path_in(&out)).unwrap();
    assert_eq!(model_id.trim(), manifest.model_id());
    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_eq!(checkpoint.config().num_experts(), 4);

    let again = Command::new(BINARY)
        .arg("make-checkpoint")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let stderr = String::from_utf8(again.stderr).unwrap();
    assert!(stderr.contains("already contains a checkpoint"), "{stderr}");
}

#[test]
fn make_checkpoint_writes_qwen3_moe_shards() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qwen");
    let output = Command::new(BINARY)
        .args([
            "make-checkpoint",
            "--layout",
            "qwen3-moe",
            "--dtype",
            "bf16",
            "--max-shard-bytes",
            "100000",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(out.join("model.safetensors.index.json").exists());
    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_eq!(checkpoint.family(), Family::Qwen3Moe);
    assert_eq!(checkpoint.config().torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn make_checkpoint_writes_qwen2_moe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qwen2");
    let output = Command::new(BINARY)
        .args(["make-checkpoint", "--layout", "qwen2-moe", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_eq!(checkpoint.family(), Family::Qwen2Moe);
    assert!(checkpoint.has_tensor("model.layers.0.mlp.shared_expert_gate.weight"));
}

#[test]
fn bad_options_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (vec!["--heads", "3"], "not a multiple of --heads"),
        (vec!["--top-k", "9"], "larger than --experts"),
        (vec!["--dtype", "int8"], "unknown dtype"),
    ];
    for (args, fragment) in cases {
        let output = Command::new(BINARY)
            .arg("make-checkpoint")
            .args(&args)
            .arg("--out")
            .arg(dir.path().join("x"))
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
    }
}

#[test]
fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("demo");
    for run in ["first run makes the checkpoint", "second run reuses it"] {
        let output = Command::new(BINARY)
            .args(["demo", "--tokens", "4"])
            .arg("--checkpoint")
            .arg(&checkpoint)
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(output.status.success(), "{run}: {stderr}");
        assert!(
            stdout.contains("8 layer calls of 4 tokens"),
            "{run}: {stdout}"
        );
        assert!(stdout.contains(", 0 failed"), "{run}: {stdout}");
        assert!(stdout.contains("every receipt verified"), "{run}: {stdout}");
        assert!(
            stdout.contains("nodes banned for wrong results: 1"),
            "{run}: {stdout}"
        );
        assert!(stderr.contains("killing node 1"), "{run}: {stderr}");
        assert!(stdout.contains("32 tokens in"), "{run}: {stdout}");
    }
}

fn run_virtual(scenario: &std::path::Path) -> std::process::Output {
    Command::new(BINARY)
        .args(["virtual", "--json", "--scenario"])
        .arg(scenario)
        .output()
        .unwrap()
}

#[test]
fn virtual_run_is_reproducible_and_checks_its_expectations() {
    let scenario =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/virtual-small.toml");
    let reports: Vec<Vec<serde_json::Value>> = (0..2)
        .map(|_| {
            let output = run_virtual(&scenario);
            assert!(output.status.success(), "{output:?}");
            let mut runs: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
            for run in &mut runs {
                run.as_object_mut().unwrap().remove("wall_s");
            }
            runs
        })
        .collect();
    assert_eq!(
        reports[0], reports[1],
        "the same seed gave different reports"
    );
    assert_eq!(
        reports[0].len(),
        4,
        "two replications times two churn rates"
    );
    for run in &reports[0] {
        assert!(run["token_success"].as_f64().unwrap() >= 0.9, "{run}");
        assert_eq!(run["tokens"], 20_000);
    }
    // More replicas, lower latency: the policy uses them.
    assert!(reports[0][2]["p99_ms"].as_f64().unwrap() < reports[0][0]["p99_ms"].as_f64().unwrap());

    // An expectation the run cannot meet fails the command, naming the figure.
    let dir = tempfile::tempdir().unwrap();
    let strict = dir.path().join("strict.toml");
    let text = std::fs::read_to_string(&scenario)
        .unwrap()
        .replace("max_p99_ms = 1000", "max_p99_ms = 1");
    std::fs::write(&strict, text).unwrap();
    let output = run_virtual(&strict);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("p99") && stderr.contains("above 1 ms"),
        "{stderr}"
    );

    // A bad value is named with its accepted range.
    let broken = dir.path().join("broken.toml");
    let text = std::fs::read_to_string(&scenario)
        .unwrap()
        .replace("nodes = 500", "nodes = 0");
    std::fs::write(&broken, text).unwrap();
    let output = run_virtual(&broken);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("network.nodes is 0; give 1 to 100000"),
        "{stderr}"
    );
}

/// The shipped scenarios with real nodes, one after another, each checking the figures
/// its file promises.
#[test]
fn shipped_scenarios_keep_their_promises() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["churn", "straggler", "dishonest", "bootstrap-restart"] {
        let scenario =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml"));
        let plot = dir.path().join(format!("{name}.svg"));
        let output = Command::new(BINARY)
            .args(["run", "--json", "--scenario"])
            .arg(&scenario)
            .arg("--plot")
            .arg(&plot)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}: {stderr}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["failed_tokens"], 0, "{name}: {report}");
        assert!(
            report["misses"].as_array().unwrap().is_empty(),
            "{name}: {report}"
        );
        assert!(
            std::fs::read_to_string(&plot).unwrap().starts_with("<svg"),
            "{name}"
        );
    }
}

#[test]
fn scenario_errors_name_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let base = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/churn.toml"),
    )
    .unwrap();
    for (from, to, fragment) in [
        (
            "replication = 2",
            "replication = 20",
            "network.replication must be 1 to network.nodes",
        ),
        (
            "node = 5",
            "node = 50",
            "a kill fault names node 50, but the nodes are 0 (the bootstrap node) to 12",
        ),
        (
            "action = \"restart\"",
            "action = \"explode\"",
            "unknown variant `explode`",
        ),
    ] {
        std::fs::write(&path, base.replacen(from, to, 1)).unwrap();
        let output = Command::new(BINARY)
            .args(["run", "--scenario"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{from}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(fragment), "{from}: {stderr}");
    }
}

#[test]
fn node_benchmark_reports_every_figure() {
    let output = Command::new(BINARY)
        .args(["bench", "node", "--sizes", "64x128", "--batches", "1,5"])
        .args(["--seconds", "0.05", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let latency = report["latency"].as_array().unwrap();
    assert_eq!(latency.len(), 2);
    for row in latency {
        for field in ["local_ms", "local_between_calls_ms", "node_ms", "echo_ms"] {
            let value = row[field].as_f64().unwrap();
            assert!(
                value > 0.0 && value.is_finite(),
                "{field} = {value} in {row}"
            );
        }
    }
    let throughput = &report["throughput"][0];
    assert!(throughput.is_object(), "{report}");
    for field in [
        "node_tokens_per_s",
        "local_batched_tokens_per_s",
        "echo_requests_per_s",
        "node_cpu_us_per_token",
    ] {
        let value = throughput[field].as_f64().unwrap();
        assert!(value.is_finite(), "{field} = {value}");
        assert!(value > 0.0, "{field} = {value}");
    }
}

#[test]
fn node_benchmark_rejects_bad_options() {
    let cases = [
        (vec!["--batches", "0"], "got 0"),
        (vec!["--batches", "5000"], "got 5000"),
        (vec!["--sizes", "64"], "in --sizes is invalid"),
        (
            vec!["--sizes", "512x1408,0x0"],
            "\"0x0\" in --sizes is invalid",
        ),
        (vec!["--seconds", "-1"], "got -1"),
        (vec!["--seconds", "0"], "--seconds must be"),
    ];
    for (args, fragment) in cases {
        let output = Command::new(BINARY)
            .args(["bench", "node"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

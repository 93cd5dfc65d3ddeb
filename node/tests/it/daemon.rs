//! The `expertnet-node` binary as an operator runs it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use expertnet_proto::DType;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common;

pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_expertnet-node");

pub(crate) fn node_command() -> Command {
    let mut command = Command::new(BINARY);
    command.env("RUST_LOG", "info").env_remove("XDG_DATA_HOME");
    command
}

/// A daemon started by a test; killed on drop if still running.
pub(crate) struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    pub(crate) fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a log line containing `fragment`, returning it.
    pub(crate) fn wait_for(&self, fragment: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no log line containing {fragment:?}"));
            if line.contains(fragment) {
                return line;
            }
        }
    }

    pub(crate) fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    pub(crate) fn wait_exit(mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon did not exit within 60 s");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn grpc_address(line: &str) -> String {
    let start = line.find("grpc=").unwrap() + "grpc=".len();
    line[start..].split_whitespace().next().unwrap().to_owned()
}

fn run_command(checkpoint: &Path, key: &Path) -> Command {
    let mut command = node_command();
    command.args([
        "run",
        "--grpc-listen",
        "127.0.0.1:0",
        "--experts",
        "0:0",
        "--batch-wait-us",
        "500000",
        "--p2p-listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    command
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--key")
        .arg(key);
    command
}

#[test]
fn keygen_and_id_agree() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let output = node_command()
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let peer_id = String::from_utf8(output.stdout).unwrap();
    assert!(peer_id.trim().starts_with("12D3KooW"), "{peer_id}");

    let output = node_command()
        .arg("id")
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), peer_id);

    let output = node_command()
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("already exists"), "{stderr}");
}

#[test]
fn manifest_command_writes_the_model_id() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let expected = expertnet_model::Manifest::load(&expertnet_model::Manifest::path_in(dir.path()))
        .unwrap()
        .model_id();

    let output = node_command()
        .arg("manifest")
        .arg("--checkpoint")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "an existing manifest must not be replaced silently"
    );

    let out = dir.path().join("copy.json");
    let output = node_command()
        .arg("manifest")
        .arg("--checkpoint")
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), expected);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(expertnet_model::Manifest::path_in(dir.path())).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let key = dir.path().join("keys/node.key");

    let daemon = Daemon::spawn(&mut run_command(dir.path(), &key));
    let line = daemon.wait_for("node is serving");
    let address = grpc_address(&line);
    // The key file is written once the node has started.
    daemon.wait_for("saved the node key generated at start");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a created key file must be private");
    }

    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = expertnet_proto::pb::expert_service_client::ExpertServiceClient::new(channel);
    let info = client
        .info(expertnet_proto::pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let model_id = info.models[0].model_id.clone();

    // The node holds this request for its 500 ms gathering window; SIGTERM arrives
    // meanwhile, and the request must still complete.
    let request = common::forward_request(&model_id, 0, &[(0, 3)], DType::F32);
    let in_flight = tokio::spawn(async move { client.forward(request).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    daemon.signal(Signal::SIGTERM);

    let response = in_flight.await.unwrap();
    assert!(response.is_ok(), "in-flight request failed: {response:?}");
    daemon.wait_for("node stopped");
    let status = tokio::task::spawn_blocking(move || daemon.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn sigint_stops_an_idle_node() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let key = dir.path().join("node.key");

    let daemon = Daemon::spawn(&mut run_command(dir.path(), &key));
    daemon.wait_for("node is serving");
    daemon.signal(Signal::SIGINT);
    assert!(daemon.wait_exit().success());
}

#[test]
fn malformed_key_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let key = dir.path().join("node.key");
    std::fs::write(&key, "garbage\n").unwrap();

    let output = run_command(dir.path(), &key).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("node.key"), "{stderr}");
    assert!(
        stderr.contains("not a PKCS#8 PEM ed25519 private key"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "garbage\n");
}

#[test]
fn config_file_supplies_options() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "checkpoint = {:?}\nexperts = \"*:1\"\ngrpc_listen = \"127.0.0.1:0\"\nkey = {:?}\nmax_batch_tokens = 64\np2p_listen = [\"/ip4/127.0.0.1/tcp/0\"]\n",
            dir.path(),
            dir.path().join("node.key")
        ),
    )
    .unwrap();

    let daemon = Daemon::spawn(node_command().arg("run").arg("--config").arg(&config));
    let line = daemon.wait_for("loaded and verified experts");
    assert!(line.contains("experts=2"), "{line}");
    daemon.wait_for("node is serving");
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());

    std::fs::write(&config, "checkpoint = \"x\"\nunknown_option = 1\n").unwrap();
    let output = node_command()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("unknown_option"), "{stderr}");
}

#[test]
fn failed_start_leaves_no_key_behind() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    let output = node_command()
        .args(["run", "--experts", "*", "--grpc-listen", "127.0.0.1:0"])
        .arg("--checkpoint")
        .arg(dir.path().join("missing"))
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !key.exists(),
        "a node that failed to start created a key file"
    );
}

#[test]
fn config_paths_are_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "checkpoint = \".\"\nexperts = \"0:0\"\ngrpc_listen = \"127.0.0.1:0\"\nkey = \"keys/node.key\"\np2p_listen = [\"/ip4/127.0.0.1/tcp/0\"]\n",
    )
    .unwrap();

    // Started from another working directory, the node still finds its files.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut command = node_command();
    command
        .current_dir(elsewhere.path())
        .arg("run")
        .arg("--config")
        .arg(&config);
    let daemon = Daemon::spawn(&mut command);
    daemon.wait_for("node is serving");
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());
    assert!(dir.path().join("keys/node.key").exists());
}

#[test]
fn bad_run_options_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    common::checkpoint(dir.path(), DType::F32);
    let cases: [(&[&str], &str); 9] = [
        (
            &["--fault", "slow"],
            "unknown fault \"slow\"; known faults: delay=DURATION",
        ),
        (
            &["--fault", "delay"],
            "fault delay needs a value, such as delay=200ms",
        ),
        (
            &["--compute-dtype", "f64"],
            "invalid --compute-dtype \"f64\"",
        ),
        (&["--max-message-bytes", "10"], "must be at least 65536"),
        (&["--grpc-listen", "nowhere"], "is not IP:PORT or HOST:PORT"),
        (&["--grpc-listen", "127.0.0.1:99999"], "port 99999"),
        (
            &["--batch-wait-us", "99999999999"],
            "it must be at most 10000000 µs",
        ),
        (
            &["--threads", "0"],
            "--threads (threads in a config file) is 0",
        ),
        (
            &["--record-ttl", "10", "--republish-interval", "20"],
            "must be shorter than --record-ttl",
        ),
    ];
    for (args, fragment) in cases {
        let output = node_command()
            .args(["run", "--experts", "*"])
            .arg("--checkpoint")
            .arg(dir.path())
            .arg("--key")
            .arg(dir.path().join("node.key"))
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(fragment), "{args:?}: {stderr}");
    }
}

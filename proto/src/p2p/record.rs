//! Node records: what a node serves and where, signed with the node's key.
//!
//! The signature covers the encoded `NodeRecord` bytes as published, so readers verify the
//! exact bytes and never re-encode before checking.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use prost::Message;

use crate::{LayerExperts, MAX_MODEL_ID_BYTES, pb};

/// Prefix of every signed node record, so a record signature can never be replayed as a
/// signature of another message type made with the same key.
pub const NODE_RECORD_DOMAIN: &[u8] = b"expertnet/node-record/v1\0";

/// Largest signed node record accepted, in bytes. A node hosting all 64 experts of all 32
/// layers needs about 250 bytes for its experts; every other expert of such a model (2,048
/// single-expert ranges) about 6 KiB. Kademlia messages of this protocol are limited to
/// 64 KiB.
pub const MAX_NODE_RECORD_BYTES: usize = 12 * 1024;

const MAX_ENDPOINTS: usize = 8;
const MAX_P2P_ADDRS: usize = 16;
const MAX_ENDPOINT_BYTES: usize = 256;
const MAX_VERSION_BYTES: usize = 64;

/// Limits a node enforces, as published in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeLimits {
    pub max_message_bytes: u64,
    pub max_tokens_per_request: u32,
    pub max_queued_tokens: u32,
    pub max_batch_tokens: u32,
}

/// A validated node record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub peer_id: PeerId,
    /// gRPC endpoints such as `http://127.0.0.1:50051`.
    pub grpc_endpoints: Vec<String>,
    pub p2p_addrs: Vec<Multiaddr>,
    pub model_id: String,
    /// Hosted experts per layer, in layer order; empty when `withdrawn`.
    pub layers: Vec<LayerExperts>,
    pub capacity_tokens: u32,
    pub load_tokens: u32,
    pub version: String,
    /// Increases with every record the node publishes (wall-clock milliseconds).
    pub sequence: u64,
    /// The node's wall clock when it made the record, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub limits: NodeLimits,
    /// The node shut down and withdraws its experts.
    pub withdrawn: bool,
}

/// Why a node record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("node record of {size} bytes is above the maximum of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("node record cannot be decoded: {0}")]
    Malformed(String),
    #[error("node record peer id {record} does not match the peer {expected} it is published for")]
    PeerMismatch { expected: PeerId, record: String },
    #[error("node record of {peer} has a signature that does not verify against its peer id")]
    BadSignature { peer: PeerId },
    #[error(
        "node record of {peer} is dated {ahead_ms} ms in the future, above the allowed clock skew"
    )]
    FromTheFuture { peer: PeerId, ahead_ms: u64 },
    #[error("node record of {peer} is {age_ms} ms old, beyond the record TTL")]
    Stale { peer: PeerId, age_ms: u64 },
    #[error("node record of {peer} is invalid: {reason}")]
    Invalid { peer: PeerId, reason: String },
}

impl RecordError {
    /// A short label for counters, such as `bad_signature`.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::TooLarge { .. } => "too_large",
            RecordError::Malformed(_) => "malformed",
            RecordError::PeerMismatch { .. } => "peer_mismatch",
            RecordError::BadSignature { .. } => "bad_signature",
            RecordError::FromTheFuture { .. } => "future_timestamp",
            RecordError::Stale { .. } => "stale",
            RecordError::Invalid { .. } => "invalid",
        }
    }
}

/// When a record counts as acceptable in time.
#[derive(Debug, Clone, Copy)]
pub struct RecordClock {
    /// The reader's wall clock, milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// How far in the future a record's timestamp may be.
    pub max_skew: Duration,
    /// How old a record may be; `None` accepts any age.
    pub max_age: Option<Duration>,
}

impl NodeRecord {
    /// Encodes and signs the record with the node's keypair, which must be the key of
    /// `self.peer_id`.
    ///
    /// # Errors
    /// A message when the keypair cannot sign (only hardware-backed keys can fail).
    pub fn sign(&self, keypair: &Keypair) -> Result<Vec<u8>, String> {
        let record = self.to_wire().encode_to_vec();
        let mut message = NODE_RECORD_DOMAIN.to_vec();
        message.extend_from_slice(&record);
        let signature = keypair.sign(&message).map_err(|e| e.to_string())?;
        Ok(pb::SignedNodeRecord {
            record: record.into(),
            signature: signature.into(),
        }
        .encode_to_vec())
    }

    /// Checks a signed record published for `expected_peer` and decodes it: size, encoding,
    /// peer id, signature against the key embedded in the peer id, timestamp within
    /// `clock`, and field limits.
    ///
    /// # Errors
    /// The first [`RecordError`] found.
    pub fn verify(
        bytes: &[u8],
        expected_peer: &PeerId,
        clock: RecordClock,
    ) -> Result<Self, RecordError> {
        if bytes.len() > MAX_NODE_RECORD_BYTES {
            return Err(RecordError::TooLarge {
                size: bytes.len(),
                max: MAX_NODE_RECORD_BYTES,
            });
        }
        let signed = pb::SignedNodeRecord::decode(bytes)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        let wire = pb::NodeRecord::decode(signed.record.as_ref())
            .map_err(|e| RecordError::Malformed(e.to_string()))?;

        let record_peer =
            PeerId::from_bytes(&wire.peer_id).map_err(|_| RecordError::PeerMismatch {
                expected: *expected_peer,
                record: format!("{:?} (not a peer id)", wire.peer_id),
            })?;
        if record_peer != *expected_peer {
            return Err(RecordError::PeerMismatch {
                expected: *expected_peer,
                record: record_peer.to_string(),
            });
        }

        let mut message = NODE_RECORD_DOMAIN.to_vec();
        message.extend_from_slice(&signed.record);
        let public =
            libp2p::identity::PublicKey::try_decode_protobuf(expected_peer.as_ref().digest())
                .map_err(|_| RecordError::BadSignature {
                    peer: *expected_peer,
                })?;
        if !public.verify(&message, &signed.signature) {
            return Err(RecordError::BadSignature {
                peer: *expected_peer,
            });
        }

        let record = Self::from_wire(wire, record_peer)?;
        record.check_time(clock)?;
        Ok(record)
    }

    fn check_time(&self, clock: RecordClock) -> Result<(), RecordError> {
        let skew_ms = clock.max_skew.as_millis() as u64;
        if self.timestamp_ms > clock.now_ms.saturating_add(skew_ms) {
            return Err(RecordError::FromTheFuture {
                peer: self.peer_id,
                ahead_ms: self.timestamp_ms - clock.now_ms,
            });
        }
        if let Some(max_age) = clock.max_age {
            let age_ms = clock.now_ms.saturating_sub(self.timestamp_ms);
            if age_ms > max_age.as_millis() as u64 + skew_ms {
                return Err(RecordError::Stale {
                    peer: self.peer_id,
                    age_ms,
                });
            }
        }
        Ok(())
    }

    fn to_wire(&self) -> pb::NodeRecord {
        pb::NodeRecord {
            peer_id: self.peer_id.to_bytes().into(),
            grpc_endpoints: self.grpc_endpoints.clone(),
            p2p_addrs: self.p2p_addrs.iter().map(|a| a.to_vec().into()).collect(),
            model_id: self.model_id.clone(),
            layers: self.layers.iter().map(LayerExperts::to_wire).collect(),
            capacity_tokens: self.capacity_tokens,
            load_tokens: self.load_tokens,
            version: self.version.clone(),
            sequence: self.sequence,
            timestamp_ms: self.timestamp_ms,
            limits: Some(pb::Limits {
                max_message_bytes: self.limits.max_message_bytes,
                max_tokens_per_request: self.limits.max_tokens_per_request,
                max_queued_tokens: self.limits.max_queued_tokens,
                max_batch_tokens: self.limits.max_batch_tokens,
            }),
            withdrawn: self.withdrawn,
        }
    }

    fn from_wire(wire: pb::NodeRecord, peer_id: PeerId) -> Result<Self, RecordError> {
        let invalid = |reason: String| RecordError::Invalid {
            peer: peer_id,
            reason,
        };

        if wire.model_id.is_empty() || wire.model_id.len() > MAX_MODEL_ID_BYTES {
            return Err(invalid(format!(
                "model id of {} bytes",
                wire.model_id.len()
            )));
        }
        if wire.grpc_endpoints.len() > MAX_ENDPOINTS {
            return Err(invalid(format!(
                "{} gRPC endpoints, above {MAX_ENDPOINTS}",
                wire.grpc_endpoints.len()
            )));
        }
        if let Some(endpoint) = wire.grpc_endpoints.iter().find(|e| !valid_endpoint(e)) {
            return Err(invalid(format!(
                "gRPC endpoint {endpoint:?} is not http://HOST:PORT"
            )));
        }
        if wire.p2p_addrs.len() > MAX_P2P_ADDRS {
            return Err(invalid(format!(
                "{} p2p addresses, above {MAX_P2P_ADDRS}",
                wire.p2p_addrs.len()
            )));
        }
        if wire.version.len() > MAX_VERSION_BYTES {
            return Err(invalid(format!("version of {} bytes", wire.version.len())));
        }
        let p2p_addrs = wire
            .p2p_addrs
            .iter()
            .map(|bytes| Multiaddr::try_from(bytes.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("p2p address: {e}")))?;

        let mut layers: Vec<LayerExperts> =
            wire.layers.iter().map(LayerExperts::from_wire).collect();
        layers.sort_by_key(|set| set.layer);
        if layers.windows(2).any(|pair| pair[0].layer == pair[1].layer) {
            return Err(invalid("a layer is listed twice".to_owned()));
        }
        let limits = wire.limits.unwrap_or_default();

        Ok(Self {
            peer_id,
            grpc_endpoints: wire.grpc_endpoints,
            p2p_addrs,
            model_id: wire.model_id,
            layers,
            capacity_tokens: wire.capacity_tokens,
            load_tokens: wire.load_tokens,
            version: wire.version,
            sequence: wire.sequence,
            timestamp_ms: wire.timestamp_ms,
            limits: NodeLimits {
                max_message_bytes: limits.max_message_bytes,
                max_tokens_per_request: limits.max_tokens_per_request,
                max_queued_tokens: limits.max_queued_tokens,
                max_batch_tokens: limits.max_batch_tokens,
            },
            withdrawn: wire.withdrawn,
        })
    }

    /// The hosted experts of one layer, if any.
    pub fn layer(&self, layer: u32) -> Option<&LayerExperts> {
        self.layers.iter().find(|set| set.layer == layer)
    }
}

/// Whether `endpoint` is `http://HOST:PORT` with a non-empty host, a port, and nothing else.
fn valid_endpoint(endpoint: &str) -> bool {
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return false;
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return false;
    };
    !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    fn record(keypair: &Keypair, layers: Vec<LayerExperts>) -> NodeRecord {
        NodeRecord {
            peer_id: keypair.public().to_peer_id(),
            grpc_endpoints: vec!["http://127.0.0.1:50051".to_owned()],
            p2p_addrs: vec!["/ip4/127.0.0.1/tcp/4100".parse().unwrap()],
            model_id: "mixtral-0123456789abcdef0123456789abcdef".to_owned(),
            layers,
            capacity_tokens: 16_384,
            load_tokens: 12,
            version: "0.1.0".to_owned(),
            sequence: 1_780_000_000_000,
            timestamp_ms: 1_780_000_000_000,
            limits: NodeLimits::default(),
            withdrawn: false,
        }
    }

    fn clock(now_ms: u64) -> RecordClock {
        RecordClock {
            now_ms,
            max_skew: Duration::from_secs(30),
            max_age: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn signed_record_verifies() {
        let keypair = Keypair::generate_ed25519();
        let original = record(&keypair, vec![LayerExperts::from_experts(2, [0, 1, 2])]);
        let bytes = original.sign(&keypair).unwrap();
        let decoded =
            NodeRecord::verify(&bytes, &original.peer_id, clock(original.timestamp_ms)).unwrap();
        assert_eq!(decoded, original);
    }

    #[test]
    fn record_of_every_expert_is_small() {
        let keypair = Keypair::generate_ed25519();
        let all = (0..32)
            .map(|layer| LayerExperts::from_experts(layer, 0..64))
            .collect();
        let every_other = (0..32)
            .map(|layer| LayerExperts::from_experts(layer, (0..64).filter(|e| e % 2 == 0)))
            .collect();
        let all_bytes = record(&keypair, all).sign(&keypair).unwrap().len();
        let sparse_bytes = record(&keypair, every_other).sign(&keypair).unwrap().len();
        assert!(all_bytes < 1024, "{all_bytes} bytes");
        assert!(sparse_bytes < MAX_NODE_RECORD_BYTES, "{sparse_bytes} bytes");
    }

    #[test]
    fn bad_records_are_rejected() {
        let keypair = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let good = record(&keypair, vec![LayerExperts::from_experts(0, [1])]);
        let now = good.timestamp_ms;

        // Signed by a key that is not the record's peer id.
        let forged = good.sign(&other).unwrap();
        let error = NodeRecord::verify(&forged, &good.peer_id, clock(now)).unwrap_err();
        assert_eq!(error.reason(), "bad_signature");

        // Published under another peer's key.
        let bytes = good.sign(&keypair).unwrap();
        let error =
            NodeRecord::verify(&bytes, &other.public().to_peer_id(), clock(now)).unwrap_err();
        assert_eq!(error.reason(), "peer_mismatch");

        // Dated an hour ahead.
        let error = NodeRecord::verify(&bytes, &good.peer_id, clock(now - 3_600_000)).unwrap_err();
        assert_eq!(error.reason(), "future_timestamp");

        // Older than the TTL.
        let error = NodeRecord::verify(&bytes, &good.peer_id, clock(now + 3_600_000)).unwrap_err();
        assert_eq!(error.reason(), "stale");

        let oversized = vec![0u8; MAX_NODE_RECORD_BYTES + 1];
        let error = NodeRecord::verify(&oversized, &good.peer_id, clock(now)).unwrap_err();
        assert_eq!(error.reason(), "too_large");

        let error = NodeRecord::verify(b"\xff\xff\xff", &good.peer_id, clock(now)).unwrap_err();
        assert_eq!(error.reason(), "malformed");

        let mut bad_endpoint = good.clone();
        bad_endpoint.grpc_endpoints = vec!["ftp://x".to_owned()];
        let bytes = bad_endpoint.sign(&keypair).unwrap();
        let error = NodeRecord::verify(&bytes, &good.peer_id, clock(now)).unwrap_err();
        assert_eq!(error.reason(), "invalid");
    }

    #[test]
    fn tampered_bytes_fail_the_signature() {
        let keypair = Keypair::generate_ed25519();
        let good = record(&keypair, vec![LayerExperts::from_experts(0, [1])]);
        let mut signed =
            pb::SignedNodeRecord::decode(good.sign(&keypair).unwrap().as_slice()).unwrap();
        let mut wire = pb::NodeRecord::decode(signed.record.as_ref()).unwrap();
        wire.load_tokens += 1;
        signed.record = wire.encode_to_vec().into();
        let error = NodeRecord::verify(
            &signed.encode_to_vec(),
            &good.peer_id,
            clock(good.timestamp_ms),
        )
        .unwrap_err();
        assert_eq!(error.reason(), "bad_signature");
    }

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "http://127.0.0.1:50051",
            "http://[::1]:1",
            "http://node-3:50051",
        ] {
            assert!(valid_endpoint(good), "{good}");
        }
        for bad in [
            "127.0.0.1:50051",
            "http://:1",
            "http://h:0",
            "http://h:x",
            "http://h/p:1",
            "https://h:1",
        ] {
            assert!(!valid_endpoint(bad), "{bad}");
        }
    }
}

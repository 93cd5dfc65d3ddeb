//! Receipts: a node's ed25519 signature over what it computed for one expert of one request.
//!
//! The signed bytes are a fixed layout (see [`ReceiptBody::signed_bytes`]) rather than the
//! protobuf encoding, so signer and verifier never depend on how an encoder orders fields.

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{Digest, MAX_MODEL_ID_BYTES, RequestId, pb};

/// Prefix of every signed receipt, so a receipt signature can never be replayed as a
/// signature of another message type made with the same key.
pub const RECEIPT_DOMAIN: &[u8] = b"expertnet/receipt/v1\0";

/// The signed fields of a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptBody {
    pub request_id: RequestId,
    pub model_id: String,
    pub layer: u32,
    pub expert: u32,
    /// Digest of the expert's weights as listed in the model manifest.
    pub weight_digest: Digest,
    /// [`WireTensor::digest`](crate::WireTensor::digest) of the input the client sent.
    pub input_digest: Digest,
    /// [`WireTensor::digest`](crate::WireTensor::digest) of the output the node sent.
    pub output_digest: Digest,
    /// The signer's wall clock, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl ReceiptBody {
    /// Encodes the fields in the canonical layout that the signature covers: the domain
    /// prefix, the 16-byte request id, the model id as a little-endian u16 length and its
    /// UTF-8 bytes, layer and expert as little-endian u32, the three 32-byte digests, and
    /// the timestamp as little-endian u64.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let model_id = self.model_id.as_bytes();
        let mut out =
            Vec::with_capacity(RECEIPT_DOMAIN.len() + 16 + 2 + model_id.len() + 8 + 96 + 8);
        out.extend_from_slice(RECEIPT_DOMAIN);
        out.extend_from_slice(self.request_id.as_bytes());
        // The model id length is bounded by MAX_MODEL_ID_BYTES, far below u16::MAX; a longer
        // id is cut to its first u16::MAX bytes here and rejected on decode.
        let length = model_id.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&(length as u16).to_le_bytes());
        out.extend_from_slice(&model_id[..length]);
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.expert.to_le_bytes());
        out.extend_from_slice(self.weight_digest.as_bytes());
        out.extend_from_slice(self.input_digest.as_bytes());
        out.extend_from_slice(self.output_digest.as_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out
    }

    /// Signs the body.
    pub fn sign(self, key: &SigningKey) -> Receipt {
        let signature = key.sign(&self.signed_bytes());
        Receipt {
            body: self,
            signature,
        }
    }
}

/// A receipt body with its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub body: ReceiptBody,
    pub signature: Signature,
}

/// Why a receipt was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("receipt is missing")]
    Missing,
    #[error("receipt field {field} has {actual} bytes, expected {expected}")]
    FieldLength {
        field: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("receipt model id has {length} bytes, above the maximum of {MAX_MODEL_ID_BYTES}")]
    ModelIdTooLong { length: usize },
    #[error("receipt signature does not verify against node key {node_key}")]
    BadSignature { node_key: String },
}

impl Receipt {
    /// Checks the signature against the node's public key. It uses strict verification,
    /// which also rejects malleable and small-order signatures.
    ///
    /// # Errors
    /// [`ReceiptError::BadSignature`] when the signature does not match.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), ReceiptError> {
        key.verify_strict(&self.body.signed_bytes(), &self.signature)
            .map_err(|_| ReceiptError::BadSignature {
                node_key: hex_prefix(key.as_bytes()),
            })
    }

    /// Converts into the generated message.
    pub fn into_wire(self) -> pb::Receipt {
        pb::Receipt {
            request_id: Bytes::copy_from_slice(self.body.request_id.as_bytes()),
            model_id: self.body.model_id,
            layer: self.body.layer,
            expert: self.body.expert,
            weight_digest: Bytes::copy_from_slice(self.body.weight_digest.as_bytes()),
            input_digest: Bytes::copy_from_slice(self.body.input_digest.as_bytes()),
            output_digest: Bytes::copy_from_slice(self.body.output_digest.as_bytes()),
            timestamp_ms: self.body.timestamp_ms,
            signature: Bytes::copy_from_slice(&self.signature.to_bytes()),
        }
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], ReceiptError> {
    bytes.try_into().map_err(|_| ReceiptError::FieldLength {
        field,
        expected: N,
        actual: bytes.len(),
    })
}

impl TryFrom<pb::Receipt> for Receipt {
    type Error = ReceiptError;

    fn try_from(receipt: pb::Receipt) -> Result<Self, Self::Error> {
        if receipt.model_id.len() > MAX_MODEL_ID_BYTES {
            return Err(ReceiptError::ModelIdTooLong {
                length: receipt.model_id.len(),
            });
        }

        let body = ReceiptBody {
            request_id: RequestId(fixed("request_id", &receipt.request_id)?),
            model_id: receipt.model_id,
            layer: receipt.layer,
            expert: receipt.expert,
            weight_digest: Digest(fixed("weight_digest", &receipt.weight_digest)?),
            input_digest: Digest(fixed("input_digest", &receipt.input_digest)?),
            output_digest: Digest(fixed("output_digest", &receipt.output_digest)?),
            timestamp_ms: receipt.timestamp_ms,
        };
        let signature = Signature::from_bytes(&fixed("signature", &receipt.signature)?);
        Ok(Receipt { body, signature })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn body() -> ReceiptBody {
        ReceiptBody {
            request_id: RequestId([7; 16]),
            model_id: "mixtral-0123456789abcdef0123456789abcdef".to_owned(),
            layer: 3,
            expert: 5,
            weight_digest: Digest([1; 32]),
            input_digest: Digest([2; 32]),
            output_digest: Digest([3; 32]),
            timestamp_ms: 1_780_000_000_000,
        }
    }

    #[test]
    fn signed_receipt_verifies() {
        let key = key(9);
        let receipt = body().sign(&key);
        assert_eq!(receipt.verify(&key.verifying_key()), Ok(()));
    }

    #[test]
    fn wrong_key_fails() {
        let receipt = body().sign(&key(9));
        assert!(matches!(
            receipt.verify(&key(10).verifying_key()),
            Err(ReceiptError::BadSignature { .. })
        ));
    }

    #[test]
    fn wire_roundtrip_still_verifies() {
        let key = key(9);
        let receipt = body().sign(&key);
        let back = Receipt::try_from(receipt.clone().into_wire()).unwrap();
        assert_eq!(back, receipt);
        assert_eq!(back.verify(&key.verifying_key()), Ok(()));
    }

    #[test]
    fn truncated_signature_is_rejected() {
        let mut wire = body().sign(&key(9)).into_wire();
        wire.signature = wire.signature.slice(..63);
        assert_eq!(
            Receipt::try_from(wire),
            Err(ReceiptError::FieldLength {
                field: "signature",
                expected: 64,
                actual: 63
            })
        );
    }

    #[test]
    fn short_digest_is_rejected() {
        let mut wire = body().sign(&key(9)).into_wire();
        wire.input_digest = Bytes::from_static(&[0; 31]);
        assert!(matches!(
            Receipt::try_from(wire),
            Err(ReceiptError::FieldLength {
                field: "input_digest",
                ..
            })
        ));
    }

    /// One way of changing a signed field.
    #[derive(Debug, Clone)]
    enum Tamper {
        RequestId(usize, u8),
        ModelId(String),
        Layer(u32),
        Expert(u32),
        WeightDigest(usize, u8),
        InputDigest(usize, u8),
        OutputDigest(usize, u8),
        Timestamp(u64),
    }

    fn tamper() -> impl Strategy<Value = Tamper> {
        let byte = (0usize..32, 1u8..=255);
        prop_oneof![
            (0usize..16, 1u8..=255).prop_map(|(i, x)| Tamper::RequestId(i, x)),
            "[a-z0-9-]{0,40}".prop_map(Tamper::ModelId),
            any::<u32>().prop_map(Tamper::Layer),
            any::<u32>().prop_map(Tamper::Expert),
            byte.clone().prop_map(|(i, x)| Tamper::WeightDigest(i, x)),
            byte.clone().prop_map(|(i, x)| Tamper::InputDigest(i, x)),
            byte.prop_map(|(i, x)| Tamper::OutputDigest(i, x)),
            any::<u64>().prop_map(Tamper::Timestamp),
        ]
    }

    /// Applies the change; returns false when it would leave the body as it was.
    fn apply(body: &mut ReceiptBody, tamper: &Tamper) -> bool {
        let before = body.clone();
        match tamper {
            Tamper::RequestId(i, x) => body.request_id.0[*i] ^= x,
            Tamper::ModelId(id) => body.model_id.clone_from(id),
            Tamper::Layer(layer) => body.layer = *layer,
            Tamper::Expert(expert) => body.expert = *expert,
            Tamper::WeightDigest(i, x) => body.weight_digest.0[*i] ^= x,
            Tamper::InputDigest(i, x) => body.input_digest.0[*i] ^= x,
            Tamper::OutputDigest(i, x) => body.output_digest.0[*i] ^= x,
            Tamper::Timestamp(t) => body.timestamp_ms = *t,
        }
        *body != before
    }

    proptest! {
        #[test]
        fn changing_any_signed_field_fails(tamper in tamper()) {
            let key = key(9);
            let mut receipt = body().sign(&key);
            prop_assume!(apply(&mut receipt.body, &tamper));
            prop_assert!(receipt.verify(&key.verifying_key()).is_err());
        }

        #[test]
        fn changing_any_signature_bit_fails(index in 0usize..64, bit in 0u8..8) {
            let key = key(9);
            let receipt = body().sign(&key);
            let mut bytes = receipt.signature.to_bytes();
            bytes[index] ^= 1 << bit;
            let tampered = Receipt { body: receipt.body, signature: Signature::from_bytes(&bytes) };
            prop_assert!(tampered.verify(&key.verifying_key()).is_err());
        }
    }
}

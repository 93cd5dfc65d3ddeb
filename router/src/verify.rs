//! Checks on every expert result a node returns, before anything uses it.

use ed25519_dalek::VerifyingKey;
use expertnet_proto::{Digest, ExpertInput, ExpertOutput, ForwardCall, ReceiptError};

/// Why an expert result was rejected. Any of these counts as a failure of the node that
/// sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("response has {actual} outputs for {expected} inputs")]
    OutputCount { expected: usize, actual: usize },
    #[error("output {index} is for expert {actual}, expected expert {expected}")]
    WrongExpert {
        index: usize,
        expected: u32,
        actual: u32,
    },
    #[error("expert {expert}: malformed output: {reason}")]
    Malformed { expert: u32, reason: String },
    #[error("expert {expert}: {error}")]
    Receipt { expert: u32, error: ReceiptError },
    #[error("expert {expert}: receipt field {field} does not match the request")]
    ReceiptField { expert: u32, field: &'static str },
    #[error("expert {expert}: receipt input digest does not match the tokens sent")]
    InputDigest { expert: u32 },
    #[error("expert {expert}: receipt output digest does not match the output received")]
    OutputDigest { expert: u32 },
    #[error("expert {expert}: weight digest {actual} differs from the manifest's {expected}")]
    WeightDigest {
        expert: u32,
        expected: Digest,
        actual: Digest,
    },
    #[error("expert {expert}: output shape {actual:?}, expected {expected:?}")]
    Shape {
        expert: u32,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("expert {expert}: output dtype {actual}, expected {expected}")]
    DType {
        expert: u32,
        expected: expertnet_proto::DType,
        actual: expertnet_proto::DType,
    },
    #[error("expert {expert}: output has a NaN or infinite value at row {row}, column {column}")]
    NonFinite {
        expert: u32,
        row: usize,
        column: usize,
    },
}

impl VerifyError {
    /// A short label for counters and traces, such as `bad_signature`.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::OutputCount { .. } | VerifyError::WrongExpert { .. } => "wrong_outputs",
            VerifyError::Malformed { .. } => "malformed",
            VerifyError::Receipt {
                error: ReceiptError::BadSignature { .. },
                ..
            } => "bad_signature",
            VerifyError::Receipt { .. } => "malformed_receipt",
            VerifyError::ReceiptField { .. } => "receipt_mismatch",
            VerifyError::InputDigest { .. } => "input_digest",
            VerifyError::OutputDigest { .. } => "output_digest",
            VerifyError::WeightDigest { .. } => "weight_digest",
            VerifyError::Shape { .. } => "wrong_shape",
            VerifyError::DType { .. } => "wrong_dtype",
            VerifyError::NonFinite { .. } => "non_finite",
        }
    }
}

/// Verifies one output against the input it answers: the receipt's signature under the
/// node's key, every signed field against the request, both digests recomputed from the
/// tensors, the weight digest against the manifest (when `expected_weights` is given),
/// shape, dtype and finite values.
///
/// # Errors
/// The first [`VerifyError`] found.
pub fn verify_output(
    call: &ForwardCall,
    input: &ExpertInput,
    output: &ExpertOutput,
    node_key: &VerifyingKey,
    expected_weights: Option<Digest>,
) -> Result<(), VerifyError> {
    let expert = input.expert;
    if output.expert != expert {
        return Err(VerifyError::WrongExpert {
            index: 0,
            expected: expert,
            actual: output.expert,
        });
    }

    let tensor = &output.output;
    if tensor.shape() != input.hidden.shape() {
        return Err(VerifyError::Shape {
            expert,
            expected: input.hidden.shape().to_vec(),
            actual: tensor.shape().to_vec(),
        });
    }
    if tensor.dtype() != input.hidden.dtype() {
        return Err(VerifyError::DType {
            expert,
            expected: input.hidden.dtype(),
            actual: tensor.dtype(),
        });
    }

    let body = &output.receipt.body;
    let fields = [
        ("request_id", body.request_id == call.request_id),
        ("model_id", body.model_id == call.model_id),
        ("layer", body.layer == call.layer),
        ("expert", body.expert == expert),
    ];
    if let Some((field, _)) = fields.iter().find(|(_, matches)| !matches) {
        return Err(VerifyError::ReceiptField { expert, field });
    }
    if body.input_digest != input.hidden.digest() {
        return Err(VerifyError::InputDigest { expert });
    }
    if body.output_digest != tensor.digest() {
        return Err(VerifyError::OutputDigest { expert });
    }
    if let Some(expected) = expected_weights.filter(|&d| d != body.weight_digest) {
        return Err(VerifyError::WeightDigest {
            expert,
            expected,
            actual: body.weight_digest,
        });
    }
    output
        .receipt
        .verify(node_key)
        .map_err(|source| VerifyError::Receipt {
            expert,
            error: source,
        })?;

    if let Some(index) = tensor.first_non_finite() {
        let columns = tensor.shape().get(1).copied().unwrap_or(1).max(1);
        return Err(VerifyError::NonFinite {
            expert,
            row: index / columns,
            column: index % columns,
        });
    }
    Ok(())
}

/// Converts a response's outputs and verifies each against its input, in order.
///
/// # Errors
/// The first [`VerifyError`] found.
pub fn verify_response(
    call: &ForwardCall,
    outputs: Vec<expertnet_proto::pb::ExpertOutput>,
    node_key: &VerifyingKey,
    expected_weights: impl Fn(u32, u32) -> Option<Digest>,
) -> Result<Vec<ExpertOutput>, VerifyError> {
    if outputs.len() != call.inputs.len() {
        return Err(VerifyError::OutputCount {
            expected: call.inputs.len(),
            actual: outputs.len(),
        });
    }

    let mut verified = Vec::with_capacity(outputs.len());
    for (index, (input, output)) in call.inputs.iter().zip(outputs).enumerate() {
        let output = ExpertOutput::try_from(output).map_err(|error| VerifyError::Malformed {
            expert: input.expert,
            reason: error.to_string(),
        })?;
        verify_output(
            call,
            input,
            &output,
            node_key,
            expected_weights(call.layer, input.expert),
        )
        .map_err(|error| match error {
            VerifyError::WrongExpert {
                expected, actual, ..
            } => VerifyError::WrongExpert {
                index,
                expected,
                actual,
            },
            other => other,
        })?;
        verified.push(output);
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ed25519_dalek::SigningKey;
    use expertnet_proto::{DType, ReceiptBody, RequestId, WireTensor};

    use super::*;

    fn tensor(values: &[f32]) -> WireTensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        WireTensor::new(vec![1, values.len()], DType::F32, Bytes::from(data)).unwrap()
    }

    fn call() -> ForwardCall {
        ForwardCall {
            request_id: RequestId::from_bytes([4; 16]),
            model_id: "mixtral-test".to_owned(),
            layer: 2,
            inputs: vec![ExpertInput {
                expert: 5,
                hidden: tensor(&[0.5, -1.0, 2.0]),
            }],
        }
    }

    /// A correctly signed output of `values` for the call's only input.
    fn signed_output(call: &ForwardCall, values: &[f32], key: &SigningKey) -> ExpertOutput {
        let output = tensor(values);
        let receipt = ReceiptBody {
            request_id: call.request_id,
            model_id: call.model_id.clone(),
            layer: call.layer,
            expert: 5,
            weight_digest: Digest::from_bytes([8; 32]),
            input_digest: call.inputs[0].hidden.digest(),
            output_digest: output.digest(),
            timestamp_ms: 1,
        }
        .sign(key);
        ExpertOutput {
            expert: 5,
            output,
            receipt,
        }
    }

    #[test]
    fn honest_output_verifies() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let call = call();
        let output = signed_output(&call, &[1.0, 2.0, 3.0], &key);
        let expected = Some(Digest::from_bytes([8; 32]));
        assert_eq!(
            verify_output(
                &call,
                &call.inputs[0],
                &output,
                &key.verifying_key(),
                expected
            ),
            Ok(())
        );
    }

    #[test]
    fn each_kind_of_bad_output_is_caught() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other_key = SigningKey::from_bytes(&[2; 32]);
        let call = call();
        let honest = signed_output(&call, &[1.0, 2.0, 3.0], &key);

        let mut swapped_output = honest.clone();
        swapped_output.output = tensor(&[1.0, 2.0, 3.5]);
        let mut replayed = honest.clone();
        replayed.receipt.body.request_id = RequestId::from_bytes([9; 16]);
        let mut wrong_input = honest.clone();
        wrong_input.receipt.body.input_digest = tensor(&[0.0, 0.0, 0.0]).digest();
        let nan = signed_output(&call, &[1.0, f32::NAN, 3.0], &key);
        let mut short = honest.clone();
        short.output = tensor(&[1.0, 2.0]);
        let foreign = signed_output(&call, &[1.0, 2.0, 3.0], &other_key);

        let cases: [(&str, ExpertOutput, &str); 6] = [
            (
                "output changed after signing",
                swapped_output,
                "output_digest",
            ),
            ("receipt of another request", replayed, "receipt_mismatch"),
            ("receipt of another input", wrong_input, "input_digest"),
            ("NaN output", nan, "non_finite"),
            ("wrong shape", short, "wrong_shape"),
            ("signed by another key", foreign, "bad_signature"),
        ];
        for (name, output, kind) in cases {
            let error = verify_output(&call, &call.inputs[0], &output, &key.verifying_key(), None)
                .expect_err(name);
            assert_eq!(error.kind(), kind, "{name}: {error}");
        }

        let error = verify_output(
            &call,
            &call.inputs[0],
            &honest,
            &key.verifying_key(),
            Some(Digest::from_bytes([7; 32])),
        )
        .unwrap_err();
        assert_eq!(error.kind(), "weight_digest");
    }

    /// Each signed field changed on an honest receipt, left with its old signature, and
    /// again re-signed by the node: both are rejected, one by the field checks and one by
    /// the signature.
    #[test]
    fn altering_any_signed_field_is_caught() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let call = call();
        let honest = signed_output(&call, &[1.0, 2.0, 3.0], &key);
        type Alteration = fn(&mut ReceiptBody);
        let alterations: [(&str, Alteration); 8] = [
            ("request_id", |b| {
                b.request_id = RequestId::from_bytes([5; 16])
            }),
            ("model_id", |b| b.model_id.push('x')),
            ("layer", |b| b.layer += 1),
            ("expert", |b| b.expert += 1),
            ("weight_digest", |b| {
                b.weight_digest = Digest::from_bytes([9; 32])
            }),
            ("input_digest", |b| {
                b.input_digest = Digest::from_bytes([9; 32])
            }),
            ("output_digest", |b| {
                b.output_digest = Digest::from_bytes([9; 32])
            }),
            ("timestamp_ms", |b| b.timestamp_ms += 1),
        ];
        let expected = Some(Digest::from_bytes([8; 32]));
        for (field, alter) in alterations {
            let mut unsigned = honest.clone();
            alter(&mut unsigned.receipt.body);
            let result = verify_output(
                &call,
                &call.inputs[0],
                &unsigned,
                &key.verifying_key(),
                expected,
            );
            assert!(
                result.is_err(),
                "{field} changed without signing was accepted"
            );

            // Re-signed by the node itself, the receipt is genuine but describes
            // something else; only the timestamp is the node's own to choose.
            let mut body = honest.receipt.body.clone();
            alter(&mut body);
            let resigned = ExpertOutput {
                receipt: body.sign(&key),
                ..honest.clone()
            };
            let result = verify_output(
                &call,
                &call.inputs[0],
                &resigned,
                &key.verifying_key(),
                expected,
            );
            if field == "timestamp_ms" {
                assert_eq!(result, Ok(()));
            } else {
                assert!(
                    result.is_err(),
                    "{field} changed and re-signed was accepted"
                );
            }
        }
    }

    #[test]
    fn truncated_signature_and_replayed_receipt_are_rejected() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let call = call();
        let honest = signed_output(&call, &[1.0, 2.0, 3.0], &key);

        let mut wire = honest.clone().into_wire();
        if let Some(receipt) = wire.receipt.as_mut() {
            receipt.signature = receipt.signature.slice(..63);
        }
        let error =
            verify_response(&call, vec![wire], &key.verifying_key(), |_, _| None).unwrap_err();
        assert_eq!(error.kind(), "malformed", "{error}");

        // A genuine response to an earlier request with the same tokens, replayed.
        let mut later = call.clone();
        later.request_id = RequestId::from_bytes([6; 16]);
        let error = verify_response(
            &later,
            vec![honest.into_wire()],
            &key.verifying_key(),
            |_, _| None,
        )
        .unwrap_err();
        assert_eq!(error.kind(), "receipt_mismatch", "{error}");
    }

    #[test]
    fn response_with_missing_outputs_is_rejected() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let error =
            verify_response(&call(), Vec::new(), &key.verifying_key(), |_, _| None).unwrap_err();
        assert_eq!(
            error,
            VerifyError::OutputCount {
                expected: 1,
                actual: 0
            }
        );
    }
}

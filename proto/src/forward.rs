//! Validated forms of the `Forward` request and response.

use crate::{MAX_MODEL_ID_BYTES, Receipt, ReceiptError, RequestId, TensorError, WireTensor, pb};

/// Why a `Forward` request or response was rejected before any expert saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("request_id has {actual} bytes, expected 16")]
    RequestIdLength { actual: usize },
    #[error("model_id is empty")]
    EmptyModelId,
    #[error("model_id has {length} bytes, above the maximum of {MAX_MODEL_ID_BYTES}")]
    ModelIdTooLong { length: usize },
    #[error("request has no expert inputs; send at least one")]
    NoInputs,
    #[error("expert {expert} appears more than once; merge its tokens into one input")]
    DuplicateExpert { expert: u32 },
    #[error("input for expert {expert}: {error}")]
    Tensor { expert: u32, error: TensorError },
    #[error("input for expert {expert} has zero tokens; leave the expert out instead")]
    ZeroTokens { expert: u32 },
    #[error("output for expert {expert}: {error}")]
    OutputTensor { expert: u32, error: TensorError },
    #[error("output for expert {expert}: {error}")]
    Receipt { expert: u32, error: ReceiptError },
}

/// The tokens of one expert: a `[tokens, hidden_size]` matrix with at least one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertInput {
    pub expert: u32,
    pub hidden: WireTensor,
}

impl ExpertInput {
    /// Number of tokens (rows).
    pub fn tokens(&self) -> usize {
        self.hidden.shape()[0]
    }

    /// Hidden size (columns).
    pub fn hidden_size(&self) -> usize {
        self.hidden.shape()[1]
    }
}

/// A validated `Forward` request: a 16-byte request id, a model id of bounded length, and
/// one or more expert inputs for distinct experts, each a non-empty rank-2 tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardCall {
    pub request_id: RequestId,
    pub model_id: String,
    pub layer: u32,
    pub inputs: Vec<ExpertInput>,
}

impl ForwardCall {
    /// Total number of token rows over all inputs.
    pub fn total_tokens(&self) -> usize {
        self.inputs.iter().map(ExpertInput::tokens).sum()
    }

    /// Converts into the generated message.
    pub fn into_wire(self) -> pb::ForwardRequest {
        pb::ForwardRequest {
            request_id: bytes::Bytes::copy_from_slice(self.request_id.as_bytes()),
            model_id: self.model_id,
            layer: self.layer,
            inputs: self
                .inputs
                .into_iter()
                .map(|input| pb::ExpertInput {
                    expert: input.expert,
                    hidden: Some(input.hidden.into_wire()),
                })
                .collect(),
        }
    }
}

pub(crate) fn check_model_id(model_id: &str) -> Result<(), ForwardError> {
    if model_id.is_empty() {
        return Err(ForwardError::EmptyModelId);
    }
    if model_id.len() > MAX_MODEL_ID_BYTES {
        return Err(ForwardError::ModelIdTooLong {
            length: model_id.len(),
        });
    }
    Ok(())
}

impl TryFrom<pb::ForwardRequest> for ForwardCall {
    type Error = ForwardError;

    fn try_from(request: pb::ForwardRequest) -> Result<Self, Self::Error> {
        let request_id = RequestId::try_from(&request.request_id[..]).map_err(|_| {
            ForwardError::RequestIdLength {
                actual: request.request_id.len(),
            }
        })?;
        check_model_id(&request.model_id)?;
        if request.inputs.is_empty() {
            return Err(ForwardError::NoInputs);
        }

        let mut inputs = Vec::with_capacity(request.inputs.len());
        for input in request.inputs {
            let expert = input.expert;
            if inputs
                .iter()
                .any(|seen: &ExpertInput| seen.expert == expert)
            {
                return Err(ForwardError::DuplicateExpert { expert });
            }

            let hidden = input
                .hidden
                .ok_or(TensorError::Missing)
                .and_then(WireTensor::try_from)
                .map_err(|source| ForwardError::Tensor {
                    expert,
                    error: source,
                })?;
            let (tokens, _) = hidden
                .matrix_dims()
                .map_err(|source| ForwardError::Tensor {
                    expert,
                    error: source,
                })?;
            if tokens == 0 {
                return Err(ForwardError::ZeroTokens { expert });
            }
            inputs.push(ExpertInput { expert, hidden });
        }

        Ok(ForwardCall {
            request_id,
            model_id: request.model_id,
            layer: request.layer,
            inputs,
        })
    }
}

/// One expert's result as the client received it: output tensor and receipt, both
/// structurally valid but not yet checked against the request or the node's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertOutput {
    pub expert: u32,
    pub output: WireTensor,
    pub receipt: Receipt,
}

impl ExpertOutput {
    /// Converts into the generated message.
    pub fn into_wire(self) -> pb::ExpertOutput {
        pb::ExpertOutput {
            expert: self.expert,
            output: Some(self.output.into_wire()),
            receipt: Some(self.receipt.into_wire()),
        }
    }
}

impl TryFrom<pb::ExpertOutput> for ExpertOutput {
    type Error = ForwardError;

    fn try_from(output: pb::ExpertOutput) -> Result<Self, Self::Error> {
        let expert = output.expert;
        let tensor = output
            .output
            .ok_or(TensorError::Missing)
            .and_then(WireTensor::try_from)
            .map_err(|source| ForwardError::OutputTensor {
                expert,
                error: source,
            })?;
        let receipt = output
            .receipt
            .ok_or(ReceiptError::Missing)
            .and_then(Receipt::try_from)
            .map_err(|source| ForwardError::Receipt {
                expert,
                error: source,
            })?;
        Ok(ExpertOutput {
            expert,
            output: tensor,
            receipt,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn input(expert: u32, rows: u64) -> pb::ExpertInput {
        pb::ExpertInput {
            expert,
            hidden: Some(pb::Tensor {
                shape: vec![rows, 2],
                dtype: pb::DType::DtypeF32 as i32,
                data: Bytes::from(vec![0u8; rows as usize * 8]),
            }),
        }
    }

    fn request(inputs: Vec<pb::ExpertInput>) -> pb::ForwardRequest {
        pb::ForwardRequest {
            request_id: Bytes::from(vec![1u8; 16]),
            model_id: "m".to_owned(),
            layer: 0,
            inputs,
        }
    }

    #[test]
    fn valid_request_converts() {
        let call = ForwardCall::try_from(request(vec![input(0, 3), input(2, 1)])).unwrap();
        assert_eq!(call.total_tokens(), 4);
        assert_eq!(call.inputs[1].expert, 2);
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let mut short_id = request(vec![input(0, 1)]);
        short_id.request_id = Bytes::from_static(b"short");
        let mut no_model = request(vec![input(0, 1)]);
        no_model.model_id.clear();
        let mut long_model = request(vec![input(0, 1)]);
        long_model.model_id = "x".repeat(MAX_MODEL_ID_BYTES + 1);
        let mut missing_tensor = request(vec![input(0, 1)]);
        missing_tensor.inputs[0].hidden = None;
        let mut rank_three = request(vec![input(0, 1)]);
        if let Some(hidden) = rank_three.inputs[0].hidden.as_mut() {
            hidden.shape = vec![1, 1, 2];
        }

        let cases = [
            (short_id, ForwardError::RequestIdLength { actual: 5 }),
            (no_model, ForwardError::EmptyModelId),
            (
                long_model,
                ForwardError::ModelIdTooLong {
                    length: MAX_MODEL_ID_BYTES + 1,
                },
            ),
            (request(vec![]), ForwardError::NoInputs),
            (
                request(vec![input(1, 1), input(1, 1)]),
                ForwardError::DuplicateExpert { expert: 1 },
            ),
            (
                request(vec![input(4, 0)]),
                ForwardError::ZeroTokens { expert: 4 },
            ),
            (
                missing_tensor,
                ForwardError::Tensor {
                    expert: 0,
                    error: TensorError::Missing,
                },
            ),
            (
                rank_three,
                ForwardError::Tensor {
                    expert: 0,
                    error: TensorError::Rank {
                        rank: 3,
                        expected: 2,
                    },
                },
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(ForwardCall::try_from(message), Err(expected));
        }
    }
}

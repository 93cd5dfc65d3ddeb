//! Conversions between wire tensors and candle tensors.

use bytes::Bytes;
use candle_core::{Device, Tensor};
use expertnet_proto::{DType, WireTensor};

use crate::ModelError;

/// The candle dtype of a wire dtype.
pub fn candle_dtype(dtype: DType) -> candle_core::DType {
    match dtype {
        DType::F32 => candle_core::DType::F32,
        DType::BF16 => candle_core::DType::BF16,
        DType::F16 => candle_core::DType::F16,
    }
}

/// The wire dtype of a candle dtype, if it has one.
pub fn wire_dtype(dtype: candle_core::DType) -> Option<DType> {
    match dtype {
        candle_core::DType::F32 => Some(DType::F32),
        candle_core::DType::BF16 => Some(DType::BF16),
        candle_core::DType::F16 => Some(DType::F16),
        _ => None,
    }
}

/// Copies a wire tensor into a candle tensor of dtype `dtype`.
///
/// # Errors
/// [`ModelError::Candle`] when candle rejects the data.
pub fn to_candle(
    tensor: &WireTensor,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let raw = Tensor::from_raw_buffer(
        tensor.data(),
        candle_dtype(tensor.dtype()),
        tensor.shape(),
        device,
    )?;
    Ok(raw.to_dtype(dtype)?)
}

/// Converts a candle tensor into a wire tensor of dtype `dtype`.
///
/// # Errors
/// [`ModelError::Candle`] when candle cannot convert or read the tensor.
pub fn from_candle(tensor: &Tensor, dtype: DType) -> Result<WireTensor, ModelError> {
    let converted = tensor.to_dtype(candle_dtype(dtype))?.flatten_all()?;
    let data = match dtype {
        DType::F32 => le_bytes(converted.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::BF16 => le_bytes(converted.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::F16 => le_bytes(converted.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
    };
    let shape = tensor.dims().to_vec();
    WireTensor::new(shape, dtype, Bytes::from(data)).map_err(|error| ModelError::Codec {
        reason: error.to_string(),
    })
}

fn le_bytes<T, const N: usize>(values: Vec<T>, to_bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for value in values {
        out.extend_from_slice(&to_bytes(value));
    }
    out
}

/// Builds a wire tensor from f32 values, converting to `dtype`.
///
/// # Errors
/// [`ModelError::Codec`] when `values` does not fill `shape`.
pub fn wire_from_f32(
    values: &[f32],
    shape: &[usize],
    dtype: DType,
) -> Result<WireTensor, ModelError> {
    let data = match dtype {
        DType::F32 => le_bytes(values.to_vec(), f32::to_le_bytes),
        DType::BF16 => le_bytes(
            values.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            half::bf16::to_le_bytes,
        ),
        DType::F16 => le_bytes(
            values.iter().map(|&v| half::f16::from_f32(v)).collect(),
            half::f16::to_le_bytes,
        ),
    };
    WireTensor::new(shape.to_vec(), dtype, Bytes::from(data)).map_err(|error| ModelError::Codec {
        reason: error.to_string(),
    })
}

/// Reads a wire tensor's elements as f32.
pub fn wire_to_f32(tensor: &WireTensor) -> Vec<f32> {
    let data = tensor.data();
    match tensor.dtype() {
        DType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_candle_roundtrip_for_each_dtype() {
        let values = [0.5f32, -1.25, 3.0, 0.0, 2.5, -0.125];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let wire = wire_from_f32(&values, &[2, 3], dtype).unwrap();
            let tensor = to_candle(&wire, candle_core::DType::F32, &Device::Cpu).unwrap();
            assert_eq!(tensor.dims(), &[2, 3]);
            let back = from_candle(&tensor, dtype).unwrap();
            assert_eq!(back, wire, "{dtype}");
            assert_eq!(wire_to_f32(&back), values, "{dtype}");
        }
    }
}

//! Tensors as they travel: shape, dtype and little-endian bytes, validated on the way in.

use std::fmt;

use bytes::Bytes;

use crate::pb;

/// Highest rank a wire tensor may have. Hidden states are rank 2; the slack leaves room for
/// batched attention tensors without letting a peer send a shape vector of any length.
pub const MAX_RANK: usize = 4;

/// Element type of a wire tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The lowercase name used in configs, CLIs and safetensors headers (`f32`, `bf16`, `f16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// The code used on the wire.
    pub fn to_wire(self) -> pb::DType {
        match self {
            DType::F32 => pb::DType::DtypeF32,
            DType::BF16 => pb::DType::DtypeBf16,
            DType::F16 => pb::DType::DtypeF16,
        }
    }

    /// Parses the wire code of a dtype.
    ///
    /// # Errors
    /// [`TensorError::UnspecifiedDType`] for code 0 and [`TensorError::UnknownDType`] for a
    /// code this version does not know.
    pub fn from_wire(code: i32) -> Result<Self, TensorError> {
        match pb::DType::try_from(code) {
            Ok(pb::DType::DtypeF32) => Ok(DType::F32),
            Ok(pb::DType::DtypeBf16) => Ok(DType::BF16),
            Ok(pb::DType::DtypeF16) => Ok(DType::F16),
            Ok(pb::DType::DtypeUnspecified) => Err(TensorError::UnspecifiedDType),
            Err(_) => Err(TensorError::UnknownDType { code }),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            _ => Err(format!("unknown dtype {s:?}; expected f32, bf16 or f16")),
        }
    }
}

/// Why a wire tensor was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    #[error("tensor is missing")]
    Missing,
    #[error("tensor dtype is unspecified (code 0); set it to f32, bf16 or f16")]
    UnspecifiedDType,
    #[error("unknown tensor dtype code {code}; this node understands f32 (1), bf16 (2), f16 (3)")]
    UnknownDType { code: i32 },
    #[error("tensor has rank {rank}, expected {expected}")]
    Rank { rank: usize, expected: usize },
    #[error("tensor has rank {rank}, above the maximum of {max}")]
    RankTooHigh { rank: usize, max: usize },
    #[error("tensor shape {shape:?} has too many elements to address")]
    ShapeOverflow { shape: Vec<u64> },
    #[error("tensor data is {actual} bytes but shape {shape:?} in {dtype} needs {expected} bytes")]
    ByteLength {
        shape: Vec<usize>,
        dtype: DType,
        expected: usize,
        actual: usize,
    },
}

/// A validated tensor in wire form: `data` holds exactly `shape.product() * dtype.size()`
/// little-endian bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct WireTensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Bytes,
}

impl fmt::Debug for WireTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireTensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl WireTensor {
    /// Builds a tensor after checking that `data` matches `shape` and `dtype`.
    ///
    /// # Errors
    /// [`TensorError::RankTooHigh`], [`TensorError::ShapeOverflow`] or
    /// [`TensorError::ByteLength`].
    pub fn new(shape: Vec<usize>, dtype: DType, data: Bytes) -> Result<Self, TensorError> {
        if shape.len() > MAX_RANK {
            return Err(TensorError::RankTooHigh {
                rank: shape.len(),
                max: MAX_RANK,
            });
        }

        let expected = byte_length(&shape, dtype).ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.iter().map(|&d| d as u64).collect(),
        })?;
        if data.len() != expected {
            return Err(TensorError::ByteLength {
                shape,
                dtype,
                expected,
                actual: data.len(),
            });
        }

        Ok(Self { shape, dtype, data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The little-endian element bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that the tensor has rank 2 and returns `(rows, columns)`.
    ///
    /// # Errors
    /// [`TensorError::Rank`] for any other rank.
    pub fn matrix_dims(&self) -> Result<(usize, usize), TensorError> {
        match self.shape[..] {
            [rows, columns] => Ok((rows, columns)),
            _ => Err(TensorError::Rank {
                rank: self.shape.len(),
                expected: 2,
            }),
        }
    }

    /// Finds the first element that is NaN or infinite, as a flat index.
    pub fn first_non_finite(&self) -> Option<usize> {
        let size = self.dtype.size_in_bytes();
        self.data
            .chunks_exact(size)
            .position(|bytes| !element_is_finite(self.dtype, bytes))
    }

    /// Computes the digest that receipts sign: blake3 over a domain prefix, the dtype, the
    /// shape and the data, so two tensors with equal bytes but different shapes differ.
    pub fn digest(&self) -> crate::Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(TENSOR_DIGEST_DOMAIN);
        hasher.update(&[self.dtype.to_wire() as u8, self.shape.len() as u8]);
        for &dim in &self.shape {
            hasher.update(&(dim as u64).to_le_bytes());
        }
        hasher.update(&self.data);
        crate::Digest(*hasher.finalize().as_bytes())
    }

    /// Converts into the generated message.
    pub fn into_wire(self) -> pb::Tensor {
        pb::Tensor {
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            dtype: self.dtype.to_wire() as i32,
            data: self.data,
        }
    }
}

const TENSOR_DIGEST_DOMAIN: &[u8] = b"expertnet/tensor/v1\0";

fn byte_length(shape: &[usize], dtype: DType) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &dim| acc.checked_mul(dim))
}

fn element_is_finite(dtype: DType, bytes: &[u8]) -> bool {
    // An IEEE value is NaN or infinite exactly when all exponent bits are set.
    match (dtype, bytes) {
        (DType::F32, &[b0, b1, b2, b3]) => f32::from_le_bytes([b0, b1, b2, b3]).is_finite(),
        (DType::BF16, &[b0, b1]) => u16::from_le_bytes([b0, b1]) & 0x7f80 != 0x7f80,
        (DType::F16, &[b0, b1]) => u16::from_le_bytes([b0, b1]) & 0x7c00 != 0x7c00,
        _ => false,
    }
}

impl TryFrom<pb::Tensor> for WireTensor {
    type Error = TensorError;

    fn try_from(tensor: pb::Tensor) -> Result<Self, Self::Error> {
        let dtype = DType::from_wire(tensor.dtype)?;
        if tensor.shape.len() > MAX_RANK {
            return Err(TensorError::RankTooHigh {
                rank: tensor.shape.len(),
                max: MAX_RANK,
            });
        }

        let shape = tensor
            .shape
            .iter()
            .map(|&dim| usize::try_from(dim))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TensorError::ShapeOverflow {
                shape: tensor.shape.clone(),
            })?;

        WireTensor::new(shape, dtype, tensor.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(shape: Vec<usize>, values: &[f32]) -> WireTensor {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        WireTensor::new(shape, DType::F32, Bytes::from(data)).unwrap()
    }

    #[test]
    fn wire_roundtrip_keeps_tensor() {
        let tensor = f32_tensor(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let back = WireTensor::try_from(tensor.clone().into_wire()).unwrap();
        assert_eq!(back, tensor);
    }

    #[test]
    fn byte_length_mismatch_is_rejected() {
        let message = pb::Tensor {
            shape: vec![2, 3],
            dtype: pb::DType::DtypeF32 as i32,
            data: Bytes::from(vec![0u8; 20]),
        };
        let error = WireTensor::try_from(message).unwrap_err();
        assert_eq!(
            error,
            TensorError::ByteLength {
                shape: vec![2, 3],
                dtype: DType::F32,
                expected: 24,
                actual: 20
            }
        );
    }

    #[test]
    fn dtype_codes_are_checked() {
        for (code, expected) in [
            (0, TensorError::UnspecifiedDType),
            (7, TensorError::UnknownDType { code: 7 }),
            (-1, TensorError::UnknownDType { code: -1 }),
        ] {
            let message = pb::Tensor {
                shape: vec![1],
                dtype: code,
                data: Bytes::from(vec![0u8; 4]),
            };
            assert_eq!(WireTensor::try_from(message).unwrap_err(), expected);
        }
    }

    #[test]
    fn huge_shape_overflows_instead_of_panicking() {
        let message = pb::Tensor {
            shape: vec![u64::MAX, u64::MAX],
            dtype: pb::DType::DtypeF32 as i32,
            data: Bytes::new(),
        };
        assert!(matches!(
            WireTensor::try_from(message),
            Err(TensorError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn rank_above_maximum_is_rejected() {
        let message = pb::Tensor {
            shape: vec![1; MAX_RANK + 1],
            dtype: pb::DType::DtypeF32 as i32,
            data: Bytes::from(vec![0u8; 4]),
        };
        assert_eq!(
            WireTensor::try_from(message).unwrap_err(),
            TensorError::RankTooHigh {
                rank: MAX_RANK + 1,
                max: MAX_RANK
            }
        );
    }

    #[test]
    fn non_finite_values_are_found() {
        let tensor = f32_tensor(vec![4], &[0.0, 1.0, f32::NAN, 2.0]);
        assert_eq!(tensor.first_non_finite(), Some(2));

        let tensor = f32_tensor(vec![2], &[0.0, f32::NEG_INFINITY]);
        assert_eq!(tensor.first_non_finite(), Some(1));

        let half_bits = [
            (DType::BF16, 0x7fc0u16, false),
            (DType::BF16, 0x3f80, true),
            (DType::F16, 0x7c00, false),
            (DType::F16, 0x3c00, true),
        ];
        for (dtype, bits, finite) in half_bits {
            let tensor =
                WireTensor::new(vec![1], dtype, Bytes::from(bits.to_le_bytes().to_vec())).unwrap();
            assert_eq!(
                tensor.first_non_finite().is_none(),
                finite,
                "{dtype} {bits:#x}"
            );
        }
    }

    #[test]
    fn digest_covers_shape_and_dtype() {
        let values = [1.0, 2.0, 3.0, 4.0];
        let a = f32_tensor(vec![2, 2], &values);
        let b = f32_tensor(vec![4, 1], &values);
        assert_ne!(a.digest(), b.digest());

        let c = WireTensor::new(vec![2, 4], DType::F16, a.data().clone()).unwrap();
        assert_ne!(a.digest(), c.digest());
    }
}

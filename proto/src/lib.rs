//! Wire types of expertnet: the gRPC `ExpertService`, the tensor codec and signed receipts.
//!
//! The generated protobuf types live in [`pb`]. Every message that arrives from the network
//! is converted with `TryFrom` into a validated domain type ([`ForwardCall`],
//! [`ExpertOutput`], [`WireTensor`], [`Receipt`]) before anything uses it; the conversions
//! return typed errors and never panic.
//!
//! ```
//! use ed25519_dalek::SigningKey;
//! use expertnet_proto::{Digest, ReceiptBody, RequestId};
//!
//! let key = SigningKey::from_bytes(&[7; 32]);
//! let receipt = ReceiptBody {
//!     request_id: RequestId::from_bytes([1; 16]),
//!     model_id: "mixtral-00".into(),
//!     layer: 0,
//!     expert: 3,
//!     weight_digest: Digest::from_bytes([0; 32]),
//!     input_digest: Digest::from_bytes([1; 32]),
//!     output_digest: Digest::from_bytes([2; 32]),
//!     timestamp_ms: 0,
//! }
//! .sign(&key);
//! assert!(receipt.verify(&key.verifying_key()).is_ok());
//! ```

#![forbid(unsafe_code)]

mod experts;
mod forward;
#[cfg(feature = "p2p")]
pub mod p2p;
mod receipt;
mod tensor;

use std::fmt;

pub use experts::{ExpertRange, LayerExperts};
pub use forward::{ExpertInput, ExpertOutput, ForwardCall, ForwardError};
pub use receipt::{RECEIPT_DOMAIN, Receipt, ReceiptBody, ReceiptError};
pub use tensor::{DType, MAX_RANK, TensorError, WireTensor};

/// Generated protobuf messages and the tonic client and server of `ExpertService`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/expertnet.v1.rs"));
}

/// Maximum length of a model id in bytes. Ids made from a manifest are about 45 bytes.
pub const MAX_MODEL_ID_BYTES: usize = 128;

/// The software version nodes report in `Info` and in their records.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A 32-byte blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub(crate) [u8; 32]);

impl Digest {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex characters.
    ///
    /// # Errors
    /// A message naming the input when it is not 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let invalid = || format!("invalid digest {text:?}: expected 64 hex characters");
        if text.len() != 64 || !text.is_ascii() {
            return Err(invalid());
        }

        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
        }
        Ok(Self(bytes))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A 16-byte id that a client chooses per request and every receipt of the response signs,
/// so a receipt cannot be replayed as the answer to another request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub(crate) [u8; 16]);

impl RequestId {
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl TryFrom<&[u8]> for RequestId {
    type Error = std::array::TryFromSliceError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Ok(Self(bytes.try_into()?))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_hex_roundtrip() {
        let digest = Digest([0xab; 32]);
        assert_eq!(Digest::from_hex(&digest.to_hex()), Ok(digest));
        assert!(Digest::from_hex("abc").is_err());
        assert!(Digest::from_hex(&"zz".repeat(32)).is_err());
    }
}

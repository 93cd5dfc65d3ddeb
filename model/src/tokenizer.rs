//! A byte-level tokenizer: token id `b` is the byte `b`. Generated checkpoints use it, so
//! they need no tokenizer file.
//!
//! NOTE: a checkpoint's own `tokenizer.json` is not read yet; prompts of real checkpoints
//! are encoded as bytes, which their vocabularies do not match.

/// Encodes text as its UTF-8 bytes.
pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Decodes token ids: ids below 256 are bytes (invalid UTF-8 is shown as U+FFFD), others
/// are written as `<id>`.
pub fn decode_bytes(tokens: &[u32]) -> String {
    let mut text = String::new();
    let mut bytes = Vec::new();
    for &token in tokens {
        match u8::try_from(token) {
            Ok(byte) => bytes.push(byte),
            Err(_) => {
                text.push_str(&String::from_utf8_lossy(&bytes));
                bytes.clear();
                text.push_str(&format!("<{token}>"));
            }
        }
    }
    text.push_str(&String::from_utf8_lossy(&bytes));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let tokens = encode_bytes("héllo");
        assert_eq!(tokens.len(), 6);
        assert_eq!(decode_bytes(&tokens), "héllo");
        assert_eq!(decode_bytes(&[104, 300, 105]), "h<300>i");
    }
}

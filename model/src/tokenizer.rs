//! Text to token ids and back: a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`)
//! when it has one, else one token per byte.

use std::path::{Path, PathBuf};

use crate::ModelError;

/// File name of a Hugging Face tokenizer in a checkpoint folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A tokenizer for a checkpoint.
#[derive(Debug, Clone)]
pub enum TextTokenizer {
    /// Token id `b` is the byte `b`.
    Bytes,
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a checkpoint folder, or the byte tokenizer when the
    /// folder has none.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] naming the file when it exists but cannot be read.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.exists() {
            return Ok(Self::Bytes);
        }
        tokenizers::Tokenizer::from_file(&path)
            .map(|t| Self::HuggingFace(Box::new(t)))
            .map_err(|error| ModelError::Tokenizer {
                path,
                reason: error.to_string(),
            })
    }

    /// Encodes text without adding special tokens.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match self {
            Self::Bytes => Ok(encode_bytes(text)),
            Self::HuggingFace(tokenizer) => tokenizer
                .encode(text, false)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|error| ModelError::Tokenizer {
                    path: PathBuf::from(TOKENIZER_FILE),
                    reason: format!("cannot encode the prompt: {error}"),
                }),
        }
    }

    /// Decodes token ids; ids the tokenizer does not know are written as `<id>`.
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self {
            Self::Bytes => decode_bytes(tokens),
            Self::HuggingFace(tokenizer) => tokenizer
                .decode(tokens, false)
                .unwrap_or_else(|_| tokens.iter().map(|t| format!("<{t}>")).collect()),
        }
    }
}

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

/// Returns the characters GPT-2-style byte-level tokenizers use for the 256 byte values:
/// printable Latin-1 characters stand for themselves, the others for code points from 256
/// up, in byte order.
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 256;
    (0..=255u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

/// Writes a byte-level `tokenizer.json` whose token id `b` is the byte `b`, so generated
/// checkpoints come with a tokenizer that the Hugging Face library reads. Ids from 256 up
/// to `vocab_size` become tokens `<extra_ID>`, which encoding never produces and
/// decoding writes out, so every id the model can emit shows in the text.
///
/// # Errors
/// [`ModelError::Io`] when the file cannot be written.
pub fn write_byte_tokenizer(dir: &Path, vocab_size: usize) -> Result<(), ModelError> {
    let mut vocab: serde_json::Map<String, serde_json::Value> = byte_level_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), serde_json::Value::from(id)))
        .collect();
    for id in 256..vocab_size {
        vocab.insert(format!("<extra_{id}>"), serde_json::Value::from(id));
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": false
    });
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    });
    let path = dir.join(TOKENIZER_FILE);
    let text = serde_json::to_string_pretty(&tokenizer).unwrap_or_default();
    std::fs::write(&path, text).map_err(|error| ModelError::Io { path, error })
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

    #[test]
    fn written_tokenizer_encodes_bytes() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_tokenizer(dir.path(), 300).unwrap();
        let tokenizer = TextTokenizer::load(dir.path()).unwrap();
        assert!(matches!(tokenizer, TextTokenizer::HuggingFace(_)));
        let text = "Mixture of experts, ½ €";
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, encode_bytes(text));
        assert_eq!(tokenizer.decode(&ids), text);
        // Ids above the bytes decode to visible tokens, never to nothing.
        assert_eq!(tokenizer.decode(&[104, 299, 105]), "h<extra_299>i");
    }

    #[test]
    fn damaged_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), "{ not json").unwrap();
        let error = TextTokenizer::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("tokenizer.json"), "{error}");
    }
}

//! Node identities: the ed25519 key inside a libp2p `PeerId`.

use ed25519_dalek::VerifyingKey;
use libp2p::PeerId;

/// Extracts the ed25519 public key embedded in a `PeerId`. Peer ids of ed25519 keys embed
/// the key itself (an identity multihash), so no lookup is needed.
///
/// # Errors
/// A message when the peer id holds no ed25519 key: ids of RSA and secp256k1 keys are
/// hashes, and expertnet nodes always use ed25519.
pub fn verifying_key_of(peer_id: &PeerId) -> Result<VerifyingKey, String> {
    let public = libp2p::identity::PublicKey::try_decode_protobuf(peer_id.as_ref().digest())
        .map_err(|e| format!("peer id {peer_id} embeds no public key: {e}"))?;
    let ed25519 = public
        .try_into_ed25519()
        .map_err(|_| format!("peer id {peer_id} is not an ed25519 key"))?;
    VerifyingKey::from_bytes(&ed25519.to_bytes())
        .map_err(|e| format!("peer id {peer_id} holds an invalid ed25519 key: {e}"))
}

/// The short form of a peer id for tables and logs: its last 8 characters, which differ
/// between peers (the leading characters of ed25519 peer ids are all `12D3KooW`).
pub fn short_peer_id(peer_id: &PeerId) -> String {
    let text = peer_id.to_base58();
    text[text.len().saturating_sub(8)..].to_owned()
}

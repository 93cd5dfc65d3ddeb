//! DHT keys. Each is a readable string, hashed by Kademlia into its key space.

use libp2p::PeerId;
use libp2p::kad::RecordKey;

const PREFIX: &str = "expertnet/v1";

/// The provider key of one layer of one model: a node provides it when it hosts any expert
/// of that layer, so a node costs one provider key per hosted layer, not one per expert.
pub fn layer_key(model_id: &str, layer: u32) -> RecordKey {
    RecordKey::new(&format!("{PREFIX}/layer/{model_id}/{layer}"))
}

/// The key under which a node publishes its signed node record.
pub fn node_record_key(peer_id: &PeerId) -> RecordKey {
    RecordKey::new(&format!("{PREFIX}/node/{peer_id}"))
}

/// The peer a node record key belongs to, or `None` for any other key.
pub fn parse_node_record_key(key: &RecordKey) -> Option<PeerId> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    text.strip_prefix(PREFIX)?
        .strip_prefix("/node/")?
        .parse()
        .ok()
}

/// Whether the key is one this protocol uses for provider records.
pub fn is_provider_key(key: &RecordKey) -> bool {
    std::str::from_utf8(key.as_ref()).is_ok_and(|text| {
        text == format!("{PREFIX}/nodes")
            || text
                .strip_prefix(PREFIX)
                .is_some_and(|rest| rest.starts_with("/layer/"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_keys_roundtrip() {
        let peer = PeerId::random();
        assert_eq!(parse_node_record_key(&node_record_key(&peer)), Some(peer));
        assert_eq!(parse_node_record_key(&layer_key("m", 0)), None);
        assert_eq!(
            parse_node_record_key(&RecordKey::new(&"expertnet/v1/node/x")),
            None
        );
    }

    #[test]
    fn provider_keys_are_recognized() {
        assert!(is_provider_key(&layer_key("mixtral-00", 3)));
        assert!(!is_provider_key(&node_record_key(&PeerId::random())));
        assert!(!is_provider_key(&RecordKey::new(&"something else")));
    }
}

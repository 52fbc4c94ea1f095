//! What crosses the network: the cluster message a node's transport sends to a peer's
//! [`super::inbound::RaftPeerActor`], and the batch encoding of raft messages inside it.
//!
//! A batch is a format version byte ([`WIRE_VERSION`]) followed by raft messages, each a
//! big-endian `u32` length and raft's own protobuf encoding of the message. A node that
//! receives a version it does not know drops the batch and says so; raft retries.

use protobuf::Message as _;
use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use raft::prelude::Message;

/// The batch encoding's format version.
pub(crate) const WIRE_VERSION: u8 = 1;

/// Bytes a batch adds to its messages: the version byte and a length per message.
pub(crate) const BATCH_HEADER_BYTES: usize = 1;
pub(crate) const MESSAGE_HEADER_BYTES: usize = 4;

/// The message type of a node's raft endpoint actor. The variant names are the tags on
/// the wire: adding a variant is compatible, renaming one is not.
#[derive(RactorClusterMessage)]
pub(crate) enum RaftWire {
    /// Raft messages in the batch encoding, delivered without an answer.
    Batch(Vec<u8>),
    /// One `MsgSnapshot` in the batch encoding; the answer says whether it was handed to
    /// the receiving raft node, which the sender reports to its own raft node.
    #[rpc]
    Snapshot(Vec<u8>, RpcReplyPort<bool>),
}

/// One raft message in raft's protobuf encoding.
pub(crate) fn encode_message(message: &Message) -> Result<Vec<u8>, protobuf::ProtobufError> {
    message.write_to_bytes()
}

/// Packs encoded messages into batches of at most `limit_bytes` each. A message too
/// large for any batch is returned in the second list, untouched.
pub(crate) fn pack(encoded: Vec<Vec<u8>>, limit_bytes: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut batches = Vec::new();
    let mut oversized = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    for message in encoded {
        let framed = MESSAGE_HEADER_BYTES + message.len();
        if BATCH_HEADER_BYTES + framed > limit_bytes || u32::try_from(message.len()).is_err() {
            oversized.push(message);
            continue;
        }
        if !current.is_empty() && current.len() + framed > limit_bytes {
            batches.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push(WIRE_VERSION);
        }
        let length = u32::try_from(message.len()).expect("checked above");
        current.extend_from_slice(&length.to_be_bytes());
        current.extend_from_slice(&message);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    (batches, oversized)
}

/// Why a received batch could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("the batch is empty")]
    Empty,
    #[error(
        "the batch has wire format version {0}, but this build reads only version {WIRE_VERSION}; run the same maas release on every node"
    )]
    UnknownVersion(u8),
    #[error("the batch is cut short")]
    Truncated,
    #[error("a raft message does not decode: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
}

/// Reads a batch made by [`pack`].
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let (&version, mut rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let mut messages = Vec::new();
    while !rest.is_empty() {
        let (length, tail) = rest.split_first_chunk::<MESSAGE_HEADER_BYTES>().ok_or(DecodeError::Truncated)?;
        let length = usize::try_from(u32::from_be_bytes(*length)).map_err(|_| DecodeError::Truncated)?;
        if tail.len() < length {
            return Err(DecodeError::Truncated);
        }
        let (message, tail) = tail.split_at(length);
        messages.push(Message::parse_from_bytes(message)?);
        rest = tail;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use raft::prelude::{Entry, MessageType};

    use super::*;

    fn message(to: u64, payload_bytes: usize) -> Message {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgAppend);
        message.to = to;
        message.from = 1;
        message.term = 7;
        let entry = Entry { data: vec![0xab; payload_bytes].into(), ..Entry::default() };
        message.entries = vec![entry].into();
        message
    }

    fn encoded(messages: &[Message]) -> Vec<Vec<u8>> {
        messages.iter().map(|m| encode_message(m).unwrap()).collect()
    }

    #[test]
    fn batches_round_trip_and_respect_the_limit() {
        let messages: Vec<Message> = (0..50).map(|i| message(2, 100 * i)).collect();
        let (batches, oversized) = pack(encoded(&messages), 16 * 1024);
        assert!(oversized.is_empty());
        assert!(batches.len() > 1, "50 messages of up to 5 KB do not fit one 16 KiB batch");
        assert!(batches.iter().all(|b| b.len() <= 16 * 1024));
        let decoded: Vec<Message> = batches.iter().flat_map(|b| decode(b).unwrap()).collect();
        assert_eq!(decoded, messages);
    }

    #[test]
    fn a_message_over_the_limit_is_set_aside() {
        let messages = vec![message(2, 10), message(2, 5000), message(3, 10)];
        let (batches, oversized) = pack(encoded(&messages), 1024);
        assert_eq!(oversized.len(), 1);
        let decoded: Vec<Message> = batches.iter().flat_map(|b| decode(b).unwrap()).collect();
        assert_eq!(decoded, vec![messages[0].clone(), messages[2].clone()]);
    }

    #[test]
    fn bad_batches_are_refused() {
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
        assert!(matches!(decode(&[9, 0, 0, 0, 0]), Err(DecodeError::UnknownVersion(9))));
        let (batches, _) = pack(encoded(&[message(2, 10)]), 1024);
        let cut = &batches[0][..batches[0].len() - 1];
        assert!(matches!(decode(cut), Err(DecodeError::Truncated)));
        assert!(matches!(decode(&[WIRE_VERSION, 0, 0]), Err(DecodeError::Truncated)));
    }
}

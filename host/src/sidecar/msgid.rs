//! Every id the sidecar makes up, in one place: the deduplication id of each message it
//! publishes and the envelope ids it assigns (fan-out children, unparseable input).
//!
//! All of them are deterministic functions of the input, so a redelivered input republishes
//! its outputs under the same ids and a deduplicating broker drops the copies.

use std::fmt;

/// Namespace for the uuid-v5 ids the sidecar assigns.
const ID_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6173_7961_2d66_616e_2d6f_7574_2d69_6473);

/// The deduplication id of one outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsgId<'a> {
    /// The input envelope's id (for unparseable input: [`MsgId::unparseable`]'s id).
    input: &'a str,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Frame `index` of hop `hop`: `<id>:<hop>:<index>`.
    Frame { hop: usize, index: usize },
    /// Frame `index` sent to x-sump (route rules, policy): `<id>:<hop>:<index>:sump`.
    FrameSump { hop: usize, index: usize },
    /// The input sent to x-sump at hop `hop`: `<id>:<hop>:sump`.
    Sump { hop: usize },
    /// The input sent to x-sink past its deadline: `<id>:<hop>:expired`.
    Expired { hop: usize },
    /// The input sent to x-sink because the handler returned nothing: `<id>:<hop>:abort`.
    Abort { hop: usize },
    /// The input sent to its `_on_error` actor at hop `hop`: `<id>:<hop>:on_error`.
    OnError { hop: usize },
    /// Bytes that are not an envelope, sent to x-sump: `<uuid of the bytes>:sump`.
    Unparseable,
}

impl<'a> MsgId<'a> {
    pub fn frame(input: &'a str, hop: usize, index: usize) -> Self {
        MsgId {
            input,
            kind: Kind::Frame { hop, index },
        }
    }

    /// The x-sump message that replaces frame `index` (the frame broke a rule).
    pub fn frame_sump(input: &'a str, hop: usize, index: usize) -> Self {
        MsgId {
            input,
            kind: Kind::FrameSump { hop, index },
        }
    }

    pub fn sump(input: &'a str, hop: usize) -> Self {
        MsgId {
            input,
            kind: Kind::Sump { hop },
        }
    }

    pub fn expired(input: &'a str, hop: usize) -> Self {
        MsgId {
            input,
            kind: Kind::Expired { hop },
        }
    }

    pub fn abort(input: &'a str, hop: usize) -> Self {
        MsgId {
            input,
            kind: Kind::Abort { hop },
        }
    }

    pub fn on_error(input: &'a str, hop: usize) -> Self {
        MsgId {
            input,
            kind: Kind::OnError { hop },
        }
    }

    /// The x-sump message of bytes that are not an envelope; `envelope_id` is
    /// [`unparseable_envelope_id`] of those bytes.
    pub fn unparseable(envelope_id: &'a str) -> Self {
        MsgId {
            input: envelope_id,
            kind: Kind::Unparseable,
        }
    }

    /// The id of a fan-out child: derived from this (frame) message id, so a redelivered
    /// input produces the same children.
    pub fn child_id(&self) -> String {
        uuid::Uuid::new_v5(&ID_NS, self.to_string().as_bytes()).to_string()
    }
}

impl fmt::Display for MsgId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.input;
        match self.kind {
            Kind::Frame { hop, index } => write!(f, "{id}:{hop}:{index}"),
            Kind::FrameSump { hop, index } => write!(f, "{id}:{hop}:{index}:sump"),
            Kind::Sump { hop } => write!(f, "{id}:{hop}:sump"),
            Kind::Expired { hop } => write!(f, "{id}:{hop}:expired"),
            Kind::Abort { hop } => write!(f, "{id}:{hop}:abort"),
            Kind::OnError { hop } => write!(f, "{id}:{hop}:on_error"),
            Kind::Unparseable => write!(f, "{id}:sump"),
        }
    }
}

/// The envelope id given to bytes that are not an envelope: a redelivered copy of the same
/// bytes gets the same id (and is deduplicated).
pub(crate) fn unparseable_envelope_id(body: &[u8]) -> String {
    uuid::Uuid::new_v5(&ID_NS, body).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_renders_as_before() {
        assert_eq!(MsgId::frame("e", 2, 0).to_string(), "e:2:0");
        assert_eq!(MsgId::frame_sump("e", 2, 3).to_string(), "e:2:3:sump");
        assert_eq!(MsgId::sump("e", 1).to_string(), "e:1:sump");
        assert_eq!(MsgId::expired("e", 0).to_string(), "e:0:expired");
        assert_eq!(MsgId::abort("e", 4).to_string(), "e:4:abort");
        assert_eq!(MsgId::on_error("e", 4).to_string(), "e:4:on_error");
        assert_eq!(MsgId::unparseable("u").to_string(), "u:sump");
    }

    #[test]
    fn child_ids_are_deterministic_and_distinct_per_frame() {
        let a = MsgId::frame("e", 0, 0).child_id();
        assert_eq!(a, MsgId::frame("e", 0, 0).child_id());
        assert_ne!(a, MsgId::frame("e", 0, 1).child_id());
        assert_ne!(a, MsgId::frame("e", 1, 0).child_id());
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 5);
        // The same value the host has always assigned (ids stay stable across upgrades).
        assert_eq!(
            a,
            uuid::Uuid::new_v5(&ID_NS, b"e:0:0").to_string(),
            "child id is uuid-v5 of the frame's message id"
        );
    }

    #[test]
    fn unparseable_ids_follow_the_bytes() {
        assert_eq!(unparseable_envelope_id(b"x"), unparseable_envelope_id(b"x"));
        assert_ne!(unparseable_envelope_id(b"x"), unparseable_envelope_id(b"y"));
    }
}

//! Every id the sidecar makes up, in one place: the deduplication id of each message it
//! publishes and the envelope ids it assigns (fan-out children, unparseable input).
//!
//! All of them are deterministic functions of the input message — its envelope id **and** a
//! digest of its bytes — so a redelivered input republishes its outputs under the same ids
//! and a deduplicating broker drops the copies, while a different message that reuses an
//! envelope id (three producers each sending `order-42`) gets ids of its own and is not
//! dropped as a duplicate.

use std::fmt;

#[cfg(test)]
use crate::envelope::unparseable_envelope_id;
use crate::envelope::ID_NS;

/// A digest of the input message's bytes: XXH3-64, a specified algorithm, so a redelivery
/// handled by another replica (or another version of the host) yields the same ids. Fast
/// (tens of nanoseconds for a 1 KB envelope, against microseconds for SHA-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Digest(u64);

impl Digest {
    pub fn of(body: &[u8]) -> Digest {
        Digest(xxhash_rust::xxh3::xxh3_64(body))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The deduplication id of one outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsgId<'a> {
    /// The input envelope's id (for unparseable input: [`MsgId::unparseable`]'s id).
    input: &'a str,
    /// Of the input message's bytes (`None` for unparseable input: its id is a digest).
    digest: Option<Digest>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Frame `index` of hop `hop`: `<id>:<digest>:<hop>:<index>`.
    Frame { hop: usize, index: usize },
    /// Frame `index` sent to x-sump (route rules, policy): `<id>:<digest>:<hop>:<index>:sump`.
    FrameSump { hop: usize, index: usize },
    /// The input sent to x-sump at hop `hop`: `<id>:<digest>:<hop>:sump`.
    Sump { hop: usize },
    /// The input sent to x-sink past its deadline: `<id>:<digest>:<hop>:expired`.
    Expired { hop: usize },
    /// The input sent to x-sink because the handler returned nothing:
    /// `<id>:<digest>:<hop>:abort`.
    Abort { hop: usize },
    /// The input sent to its `_on_error` actor at hop `hop`: `<id>:<digest>:<hop>:on_error`.
    OnError { hop: usize },
    /// Bytes that are not an envelope, sent to x-sump: `<uuid of the bytes>:sump`.
    Unparseable,
    /// The input of a canceled task sent to x-sink: `<id>:<digest>:<hop>:canceled`.
    Canceled { hop: usize },
}

impl<'a> MsgId<'a> {
    pub fn frame(input: &'a str, digest: Digest, hop: usize, index: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::Frame { hop, index },
        }
    }

    /// The x-sump message that replaces frame `index` (the frame broke a rule).
    pub fn frame_sump(input: &'a str, digest: Digest, hop: usize, index: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::FrameSump { hop, index },
        }
    }

    pub fn sump(input: &'a str, digest: Digest, hop: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::Sump { hop },
        }
    }

    pub fn expired(input: &'a str, digest: Digest, hop: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::Expired { hop },
        }
    }

    pub fn abort(input: &'a str, digest: Digest, hop: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::Abort { hop },
        }
    }

    pub fn on_error(input: &'a str, digest: Digest, hop: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::OnError { hop },
        }
    }

    pub fn canceled(input: &'a str, digest: Digest, hop: usize) -> Self {
        MsgId {
            input,
            digest: Some(digest),
            kind: Kind::Canceled { hop },
        }
    }

    /// The x-sump message of bytes that are not an envelope; `envelope_id` is
    /// [`crate::envelope::unparseable_envelope_id`] of those bytes.
    pub fn unparseable(envelope_id: &'a str) -> Self {
        MsgId {
            input: envelope_id,
            digest: None,
            kind: Kind::Unparseable,
        }
    }

    /// The id of a fan-out child: derived from this (frame) message id, so a redelivered
    /// input produces the same children.
    pub fn child_id(&self) -> String {
        uuid::Uuid::new_v5(&ID_NS, self.render().as_bytes()).to_string()
    }
}

impl MsgId<'_> {
    /// The id as text. Written by hand rather than through `fmt` (two of these per
    /// delivery: the formatting machinery was ~5% of a hop's instructions).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(self.input.len() + 40);
        s.push_str(self.input);
        if let Some(Digest(d)) = self.digest {
            s.push(':');
            for shift in (0..16).rev() {
                let nibble = ((d >> (shift * 4)) & 0xf) as u8;
                s.push(char::from(if nibble < 10 {
                    b'0' + nibble
                } else {
                    b'a' + nibble - 10
                }));
            }
        }
        let (hop, index, suffix) = match self.kind {
            Kind::Frame { hop, index } => (Some(hop), Some(index), ""),
            Kind::FrameSump { hop, index } => (Some(hop), Some(index), "sump"),
            Kind::Sump { hop } => (Some(hop), None, "sump"),
            Kind::Expired { hop } => (Some(hop), None, "expired"),
            Kind::Abort { hop } => (Some(hop), None, "abort"),
            Kind::Unparseable => (None, None, "sump"),
            Kind::OnError { hop } => (Some(hop), None, "on_error"),
            Kind::Canceled { hop } => (Some(hop), None, "canceled"),
        };
        let mut digits = itoa::Buffer::new();
        for n in [hop, index].into_iter().flatten() {
            s.push(':');
            s.push_str(digits.format(n));
        }
        if !suffix.is_empty() {
            s.push(':');
            s.push_str(suffix);
        }
        s
    }
}

impl fmt::Display for MsgId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(body: &str) -> Digest {
        Digest::of(body.as_bytes())
    }

    #[test]
    fn every_scheme_names_id_digest_hop_and_kind() {
        let g = d("m");
        assert_eq!(MsgId::frame("e", g, 2, 0).to_string(), format!("e:{g}:2:0"));
        assert_eq!(
            MsgId::frame_sump("e", g, 2, 3).to_string(),
            format!("e:{g}:2:3:sump")
        );
        assert_eq!(MsgId::sump("e", g, 1).to_string(), format!("e:{g}:1:sump"));
        assert_eq!(
            MsgId::expired("e", g, 0).to_string(),
            format!("e:{g}:0:expired")
        );
        assert_eq!(
            MsgId::abort("e", g, 4).to_string(),
            format!("e:{g}:4:abort")
        );
        assert_eq!(
            MsgId::on_error("e", g, 4).to_string(),
            format!("e:{g}:4:on_error")
        );
        assert_eq!(
            MsgId::canceled("e", g, 1).to_string(),
            format!("e:{g}:1:canceled")
        );
        assert_eq!(MsgId::unparseable("u").to_string(), "u:sump");
        assert_eq!(g.to_string().len(), 16);
        // XXH3-64 as specified (its published test vector for the empty input): the
        // digest must not change between versions, or redeliveries would not deduplicate.
        assert_eq!(d("").to_string(), "2d06800538d394c2");
    }

    /// A redelivery (same bytes) gets the same ids; another message reusing the envelope
    /// id does not (issue #12 item 2: three `order-42`s must all arrive).
    #[test]
    fn ids_follow_the_message_not_only_its_envelope_id() {
        let a = r#"{"id":"order-42","payload":1}"#;
        let b = r#"{"id":"order-42","payload":2}"#;
        assert_eq!(d(a), d(a));
        assert_ne!(d(a), d(b));
        assert_ne!(
            MsgId::frame("order-42", d(a), 0, 0).to_string(),
            MsgId::frame("order-42", d(b), 0, 0).to_string()
        );
        assert_ne!(
            MsgId::frame("order-42", d(a), 0, 1).child_id(),
            MsgId::frame("order-42", d(b), 0, 1).child_id()
        );
    }

    #[test]
    fn child_ids_are_deterministic_and_distinct_per_frame() {
        let g = d("m");
        let a = MsgId::frame("e", g, 0, 0).child_id();
        assert_eq!(a, MsgId::frame("e", g, 0, 0).child_id());
        assert_ne!(a, MsgId::frame("e", g, 0, 1).child_id());
        assert_ne!(a, MsgId::frame("e", g, 1, 0).child_id());
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 5);
        assert_eq!(
            a,
            uuid::Uuid::new_v5(&ID_NS, format!("e:{g}:0:0").as_bytes()).to_string(),
            "child id is uuid-v5 of the frame's message id"
        );
    }

    #[test]
    fn unparseable_ids_follow_the_bytes() {
        assert_eq!(unparseable_envelope_id(b"x"), unparseable_envelope_id(b"x"));
        assert_ne!(unparseable_envelope_id(b"x"), unparseable_envelope_id(b"y"));
    }
}

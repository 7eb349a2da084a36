//! The envelope (SPEC §2): parse and serialise preserving unknown fields, validation, the
//! route rules and status handling.
//!
//! The payload is kept as raw JSON text ([`RawValue`]): the host never looks inside it, so it
//! is neither parsed into a tree nor re-formatted on the way through.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Header that carries the trace id across hops.
pub const HEADER_TRACE_ID: &str = "trace_id";
/// W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// The route of an envelope: processed actors, the actor that must process it, the rest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Route {
    #[serde(default)]
    pub prev: Vec<String>,
    pub curr: String,
    #[serde(default)]
    pub next: Vec<String>,
}

impl Route {
    /// The route after `curr` has processed the envelope: `curr` joins `prev`, `next[0]`
    /// becomes `curr` (or `""` at the end of the route).
    pub fn shifted(&self) -> Route {
        let mut prev = Vec::with_capacity(self.prev.len() + 1);
        prev.extend(self.prev.iter().cloned());
        prev.push(self.curr.clone());
        let mut next = self.next.iter().cloned();
        let curr = next.next().unwrap_or_default();
        Route {
            prev,
            curr,
            next: next.collect(),
        }
    }

    /// True when no actor is left to process the envelope.
    pub fn is_finished(&self) -> bool {
        self.curr.is_empty()
    }

    /// Route rules (SPEC §2): `out` is a legal successor of `self` — processed steps are
    /// history, so `out.prev` must be exactly `self.prev + [self.curr]`. `out.curr` and
    /// `out.next` are free (a handler or a policy may add, remove or replace future actors).
    pub fn check_successor(&self, out: &Route) -> Result<(), RouteViolation> {
        let n = self.prev.len();
        let ok =
            out.prev.len() == n + 1 && out.prev[..n] == self.prev[..] && out.prev[n] == self.curr;
        if ok {
            Ok(())
        } else {
            Err(RouteViolation {
                expected_prev: {
                    let mut p = self.prev.clone();
                    p.push(self.curr.clone());
                    p
                },
                got_prev: out.prev.clone(),
            })
        }
    }

    /// Every actor named by the route, in order.
    pub fn actors(&self) -> impl Iterator<Item = &str> {
        self.prev
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.curr.as_str()).filter(|c| !c.is_empty()))
            .chain(self.next.iter().map(String::as_str))
    }
}

/// A route that rewrites history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route rewrites processed steps: prev must be {expected_prev:?}, got {got_prev:?}")]
pub struct RouteViolation {
    pub expected_prev: Vec<String>,
    pub got_prev: Vec<String>,
}

/// Lifecycle phase of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Processing,
    Retrying,
    Succeeded,
    Failed,
    Paused,
    Canceled,
}

/// Why an envelope reached its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    Completed,
    RuntimeError,
    Timeout,
    ParseError,
    ValidationError,
    RouteMismatch,
    PolicyRejected,
    MaxRetriesExhausted,
    NonRetryableFailure,
}

impl Reason {
    /// The x-sump payload's `error` for a failure the host found itself (upstream's
    /// snake_case codes; `status.reason` itself keeps the variant's name).
    pub fn code(self) -> &'static str {
        match self {
            Reason::Completed => "completed",
            Reason::RuntimeError => "runtime_error",
            Reason::Timeout => "timeout",
            Reason::ParseError => "parse_error",
            Reason::ValidationError => "validation_error",
            Reason::RouteMismatch => "route_mismatch",
            Reason::PolicyRejected => "policy_rejected",
            Reason::MaxRetriesExhausted => "max_retries_exhausted",
            Reason::NonRetryableFailure => "non_retryable_failure",
        }
    }
}

/// The error carried by a failed envelope (the runtime's 500 body, or the host's own).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ErrorInfo {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mro: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
}

impl ErrorInfo {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo {
            message: message.into(),
            kind: kind.into(),
            mro: Vec::new(),
            traceback: None,
        }
    }
}

/// `status` of an envelope. Unknown fields are preserved as raw JSON text (an integer beyond
/// 64 bits comes back exactly as it went in).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Status {
    pub phase: Option<Phase>,
    pub reason: Option<Reason>,
    pub actor: Option<String>,
    pub attempt: Option<u32>,
    pub max_attempts: Option<u32>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub deadline_at: Option<String>,
    pub error: Option<ErrorInfo>,
    pub extra: RawMap,
}

// By hand, not derived: a derived `flatten` serialises through serde's flattening adapter
// (twice per hop: half the cost of writing an envelope's status).
impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(v) = &self.phase {
            m.serialize_entry("phase", v)?;
        }
        if let Some(v) = &self.reason {
            m.serialize_entry("reason", v)?;
        }
        if let Some(v) = &self.actor {
            m.serialize_entry("actor", v)?;
        }
        if let Some(v) = &self.attempt {
            m.serialize_entry("attempt", v)?;
        }
        if let Some(v) = &self.max_attempts {
            m.serialize_entry("max_attempts", v)?;
        }
        if let Some(v) = &self.created_at {
            m.serialize_entry("created_at", v)?;
        }
        if let Some(v) = &self.updated_at {
            m.serialize_entry("updated_at", v)?;
        }
        if let Some(v) = &self.deadline_at {
            m.serialize_entry("deadline_at", v)?;
        }
        if let Some(v) = &self.error {
            m.serialize_entry("error", v)?;
        }
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Status {
    /// The JSON text `Serialize` gives, written directly ([`Envelope::to_vec`]).
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut sep = b'{';
        if let Some(v) = &self.phase {
            json::key(out, &mut sep, b"phase");
            json::serde(out, v);
        }
        if let Some(v) = &self.reason {
            json::key(out, &mut sep, b"reason");
            json::serde(out, v);
        }
        if let Some(v) = &self.actor {
            json::key(out, &mut sep, b"actor");
            json::string(out, v);
        }
        let counts = [
            (&b"attempt"[..], self.attempt),
            (b"max_attempts", self.max_attempts),
        ];
        for (name, v) in counts {
            if let Some(v) = v {
                json::key(out, &mut sep, name);
                out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            }
        }
        let times = [
            (&b"created_at"[..], &self.created_at),
            (b"updated_at", &self.updated_at),
            (b"deadline_at", &self.deadline_at),
        ];
        for (name, v) in times {
            if let Some(v) = v {
                json::key(out, &mut sep, name);
                json::string(out, v);
            }
        }
        if let Some(v) = &self.error {
            json::key(out, &mut sep, b"error");
            json::serde(out, v);
        }
        json::raw_entries(out, &mut sep, &self.extra);
        json::end_object(out, sep);
    }
}

/// Pieces of JSON text written straight into a buffer (the envelope writer's). An object
/// is written with a separator that starts as `{` and becomes `,` after the first member.
mod json {
    use super::RawMap;

    /// A JSON string: as is between quotes when nothing in it needs escaping (no `"`, `\\`
    /// or control character — what serde_json escapes), else through serde_json.
    pub fn string(out: &mut Vec<u8>, s: &str) {
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.reserve(s.len() + 2);
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        } else {
            serde(out, s);
        }
    }

    pub fn strings(out: &mut Vec<u8>, items: &[String]) {
        out.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, s);
        }
        out.push(b']');
    }

    /// `<sep>"name":` for a member whose name needs no escaping.
    pub fn key(out: &mut Vec<u8>, sep: &mut u8, name: &[u8]) {
        out.push(*sep);
        *sep = b',';
        out.push(b'"');
        out.extend_from_slice(name);
        out.extend_from_slice(b"\":");
    }

    /// `<sep>"name":<raw JSON>` for every entry of `map`.
    pub fn raw_entries(out: &mut Vec<u8>, sep: &mut u8, map: &RawMap) {
        for (k, v) in map {
            out.push(*sep);
            *sep = b',';
            string(out, k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
    }

    /// The end of an object begun with separator `{` (`{}` when no member was written).
    pub fn end_object(out: &mut Vec<u8>, sep: u8) {
        if sep == b'{' {
            out.push(b'{');
        }
        out.push(b'}');
    }

    /// Anything else, through serde_json (rare or tiny: enums, the error object).
    pub fn serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
        serde_json::to_writer(out, v).expect("writing JSON into memory cannot fail");
    }
}

// By hand, not derived: a derived `flatten` buffers unknown fields in serde's own value
// type, which cannot hold raw JSON text (and loses integers beyond 64 bits).
impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Status;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Status, A::Error> {
                let mut st = Status::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "phase" => st.phase = map.next_value()?,
                        "reason" => st.reason = map.next_value()?,
                        "actor" => st.actor = map.next_value()?,
                        "attempt" => st.attempt = map.next_value()?,
                        "max_attempts" => st.max_attempts = map.next_value()?,
                        "created_at" => st.created_at = map.next_value()?,
                        "updated_at" => st.updated_at = map.next_value()?,
                        "deadline_at" => st.deadline_at = map.next_value()?,
                        "error" => st.error = map.next_value()?,
                        _ => {
                            st.extra.insert(key.into_owned(), map.next_value()?);
                        }
                    }
                }
                Ok(st)
            }
        }
        d.deserialize_map(V)
    }
}

/// An envelope. Unknown top-level fields live in `extra` and are written back unchanged.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub parent_id: Option<String>,
    pub route: Route,
    pub headers: Headers,
    pub payload: Box<RawValue>,
    pub status: Option<Status>,
    pub extra: RawMap,
}

/// Longest envelope id (and `parent_id`) accepted, in bytes.
pub const MAX_ID_BYTES: usize = 1024;

/// Why bytes are not a usable envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, not an object, or a known field of the wrong type.
    #[error("not an envelope: {0}")]
    Parse(#[from] serde_json::Error),
    /// Well-formed JSON whose id cannot be used (missing, too long, control characters).
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

impl EnvelopeError {
    /// `parse_error` or `validation_error` (the metric reason).
    pub fn is_parse(&self) -> bool {
        matches!(self, EnvelopeError::Parse(_))
    }

    /// The status reason of such bytes in x-sump.
    pub fn reason(&self) -> Reason {
        if self.is_parse() {
            Reason::ParseError
        } else {
            Reason::ValidationError
        }
    }
}

fn null_payload() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

impl Envelope {
    /// A new envelope (used by the gateway, tests and the host's own error envelopes).
    pub fn new(id: impl Into<String>, route: Route, payload: Box<RawValue>) -> Self {
        Envelope {
            id: id.into(),
            parent_id: None,
            route,
            headers: Headers::new(),
            payload,
            status: None,
            extra: RawMap::new(),
        }
    }

    /// Parse and validate bytes received from a queue.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let env: Envelope = from_json_bytes(bytes)?;
        env.validate()?;
        Ok(env)
    }

    /// The rules without which the envelope cannot even be handled as itself: its id (and
    /// `parent_id`) become message ids, header values and log fields, so they must be
    /// non-empty, at most [`MAX_ID_BYTES`], and free of control characters.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        check_id("id", &self.id).map_err(EnvelopeError::Invalid)?;
        if let Some(p) = &self.parent_id {
            check_id("parent_id", p).map_err(EnvelopeError::Invalid)?;
        }
        Ok(())
    }

    /// The rules an actor checks before processing (SPEC §5 step 1; a breach is a
    /// `validation_error`, the envelope goes to x-sump as it is): a `deadline_at` that
    /// parses, actor names in `curr` and `next` that can be queue names, and at most
    /// `max_hops` processed steps. Returns what is wrong, in one line.
    pub fn check(&self, max_hops: usize) -> Result<(), String> {
        if let Some(d) = self.deadline_at() {
            if chrono::DateTime::parse_from_rfc3339(d).is_err() {
                return Err(format!(
                    "status.deadline_at {d:?} is not an RFC 3339 time (e.g. 2030-01-01T00:00:00Z)"
                ));
            }
        }
        if !self.route.curr.is_empty() {
            crate::queue::check_name("actor", &self.route.curr)
                .map_err(|e| format!("route.curr: {e}"))?;
        }
        for (i, a) in self.route.next.iter().enumerate() {
            crate::queue::check_name("actor", a).map_err(|e| format!("route.next[{i}]: {e}"))?;
        }
        if self.route.prev.len() > max_hops {
            return Err(format!(
                "route.prev has {} processed steps, more than ASYA_MAX_HOPS ({max_hops}): a handler that keeps re-adding actors?",
                self.route.prev.len()
            ));
        }
        Ok(())
    }

    /// The envelope's JSON text: the same bytes as `serde_json::to_vec(self)` (a test holds
    /// the two together), written directly — field names as constants, raw values copied,
    /// strings escaped only when they need it. Every envelope a hop sends is written here,
    /// and through serde's map serialiser this cost ~4.7 k instructions per envelope
    /// (callgrind), about a third of it the status's handful of fields.
    pub fn to_vec(&self) -> Vec<u8> {
        // Sized for the payload and a typical rest (route, headers, status) at once: one
        // allocation, not a series of doublings that copy the payload each time.
        let mut out = Vec::with_capacity(self.payload.get().len() + 1024);
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"id\":");
        json::string(out, &self.id);
        if let Some(p) = &self.parent_id {
            out.extend_from_slice(b",\"parent_id\":");
            json::string(out, p);
        }
        out.extend_from_slice(b",\"route\":{\"prev\":");
        json::strings(out, &self.route.prev);
        out.extend_from_slice(b",\"curr\":");
        json::string(out, &self.route.curr);
        out.extend_from_slice(b",\"next\":");
        json::strings(out, &self.route.next);
        out.push(b'}');
        if !self.headers.is_empty() {
            out.extend_from_slice(b",\"headers\":");
            let mut sep = b'{';
            json::raw_entries(out, &mut sep, &self.headers.0);
            json::end_object(out, sep);
        }
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.get().as_bytes());
        if let Some(st) = &self.status {
            out.extend_from_slice(b",\"status\":");
            st.write_json(out);
        }
        json::raw_entries(out, &mut b',', &self.extra);
        out.push(b'}');
    }

    /// The `trace_id` header, or "" (a non-string one counts as absent).
    pub fn trace_id(&self) -> Cow<'_, str> {
        self.headers.str(HEADER_TRACE_ID).unwrap_or_default()
    }

    pub fn status_mut(&mut self) -> &mut Status {
        self.status.get_or_insert_with(Status::default)
    }

    pub fn deadline_at(&self) -> Option<&str> {
        self.status.as_ref()?.deadline_at.as_deref()
    }

    /// The deadline as a time, when set and valid RFC 3339.
    pub fn deadline(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let s = self.deadline_at()?;
        chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc))
    }
}

/// `serde_json::from_slice`, with the bytes checked as UTF-8 once, up front: parsed from a
/// `&str`, serde_json takes the text as valid, while from bytes it validates every string
/// and raw value on its own (a hop's 1 KB payload: once in the input, once in the runtime's
/// frames; ~2 k instructions per hop, callgrind). Bytes that are not UTF-8 are not JSON
/// either way.
pub(crate) fn from_json_bytes<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        de::Error::custom(format!(
            "not UTF-8 text (an invalid byte after {} valid ones)",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str(text)
}

/// Unknown fields of an envelope or its status: raw JSON text, written back unchanged.
pub type RawMap = std::collections::BTreeMap<String, RawJson>;

/// Envelope headers (SPEC §2): any JSON value per name, each kept as its text so that it
/// leaves a hop exactly as it came (an integer beyond 64 bits, a float's digits), read and
/// written through typed accessors. Ordered by name, like the rest of the envelope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(RawMap);

impl Headers {
    pub fn new() -> Self {
        Headers::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The value's JSON text.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(RawJson::get)
    }

    /// A string header's value (borrowed unless it has escapes); `None` when absent or not
    /// a string.
    pub fn str(&self, key: &str) -> Option<Cow<'_, str>> {
        let raw = self.raw(key)?;
        // Valid JSON text: between the quotes of a string without a backslash is the value.
        if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            if !inner.contains('\\') {
                return Some(Cow::Borrowed(inner));
            }
        }
        match serde_json::from_str::<&str>(raw) {
            Ok(s) => Some(Cow::Borrowed(s)),
            Err(_) => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
        }
    }

    /// The value as a JSON tree, for reading structured headers (an integer beyond 64 bits
    /// becomes a float here; the header itself is untouched).
    pub fn value(&self, key: &str) -> Option<Value> {
        serde_json::from_str(self.raw(key)?).ok()
    }

    pub fn insert_str(&mut self, key: impl Into<String>, value: &str) {
        self.insert_value(key, &Value::from(value));
    }

    pub fn insert_value(&mut self, key: impl Into<String>, value: &Value) {
        let raw = serde_json::value::to_raw_value(value).expect("a JSON value serialises");
        self.0.insert(key.into(), RawJson(raw));
    }

    /// Insert `key` with `value` unless it is present.
    pub fn insert_missing(&mut self, key: &str, value: &RawJson) {
        if !self.0.contains_key(key) {
            self.0.insert(key.to_owned(), value.clone());
        }
    }

    pub fn get(&self, key: &str) -> Option<&RawJson> {
        self.0.get(key)
    }

    pub fn remove(&mut self, key: &str) -> Option<RawJson> {
        self.0.remove(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawJson)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl From<Map<String, Value>> for Headers {
    fn from(m: Map<String, Value>) -> Self {
        let mut h = Headers::new();
        for (k, v) in m {
            h.insert_value(k, &v);
        }
        h
    }
}

/// A JSON value kept as its text (compared by text).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<RawValue>);

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

fn check_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("missing or empty {field}"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "{field} is {} bytes long, more than {MAX_ID_BYTES}",
            id.len()
        ));
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Err(format!("{field} contains the control character {c:?}"));
    }
    Ok(())
}

/// The W3C `traceparent` (version `00`) for messages sent by a hop whose span id is
/// `span_id`: the trace id and flags of `parent`, the hop's span as the new parent span.
/// `None` when `parent` is not a valid version-00 traceparent (it is then passed on as is).
pub fn child_traceparent(parent: &str, span_id: u64) -> Option<String> {
    let mut parts = parent.split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    if !(hex(trace, 32) && nonzero(trace) && hex(span, 16) && hex(flags, 2)) || span_id == 0 {
        return None;
    }
    Some(format!("00-{trace}-{span_id:016x}-{flags}"))
}

/// Current time as RFC 3339 UTC with millisecond precision.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        if let Some(p) = &self.parent_id {
            m.serialize_entry("parent_id", p)?;
        }
        m.serialize_entry("route", &self.route)?;
        if !self.headers.is_empty() {
            m.serialize_entry("headers", &self.headers)?;
        }
        m.serialize_entry("payload", &self.payload)?;
        if let Some(st) = &self.status {
            m.serialize_entry("status", st)?;
        }
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Envelope;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an envelope object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
                let mut id: Option<String> = None;
                let mut parent_id = None;
                let mut route: Option<Route> = None;
                let mut headers = None;
                let mut payload = None;
                let mut status = None;
                let mut extra = RawMap::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "id" => id = Some(map.next_value()?),
                        "parent_id" => parent_id = map.next_value()?,
                        "route" => route = Some(map.next_value()?),
                        "headers" => {
                            headers = map.next_value::<Option<Headers>>()?;
                        }
                        "payload" => payload = Some(map.next_value()?),
                        "status" => status = map.next_value()?,
                        _ => {
                            let v: RawJson = map.next_value()?;
                            extra.insert(key.into_owned(), v);
                        }
                    }
                }
                Ok(Envelope {
                    id: id.unwrap_or_default(),
                    parent_id,
                    route: route.ok_or_else(|| de::Error::missing_field("route"))?,
                    headers: headers.unwrap_or_default(),
                    payload: payload.unwrap_or_else(null_payload),
                    status,
                    extra,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// One output of a runtime call (SPEC §3): the route is already shifted by the runtime.
#[derive(Debug, Clone, Deserialize)]
pub struct Frame {
    pub route: Route,
    #[serde(default = "null_payload")]
    pub payload: Box<RawValue>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub status: Option<Status>,
}

impl Frame {
    /// The outgoing envelope for this frame: identity, unknown fields and the deadline of
    /// `input`; route, payload and (when given) headers and status of the frame.
    pub fn into_envelope(self, input: &Envelope) -> Envelope {
        let mut status = self.status.or_else(|| input.status.clone());
        // The deadline is set once and carried unchanged across every hop.
        if let Some(d) = input.deadline_at() {
            status.get_or_insert_with(Status::default).deadline_at = Some(d.to_owned());
        }
        let mut headers = self.headers.unwrap_or_else(|| input.headers.clone());
        for key in [HEADER_TRACE_ID, HEADER_TRACEPARENT] {
            if let Some(v) = input.headers.get(key) {
                headers.insert_missing(key, v);
            }
        }
        Envelope {
            id: input.id.clone(),
            parent_id: input.parent_id.clone(),
            route: self.route,
            headers,
            payload: self.payload,
            status,
            extra: input.extra.clone(),
        }
    }
}

/// Namespace of the uuid-v5 ids the host assigns (fan-out children, bytes that are not an
/// envelope).
pub(crate) const ID_NS: uuid::Uuid =
    uuid::Uuid::from_u128(0x6173_7961_2d66_616e_2d6f_7574_2d69_6473);

/// The envelope id given to bytes that are not an envelope: a redelivered copy of the same
/// bytes gets the same id (and is deduplicated).
pub fn unparseable_envelope_id(body: &[u8]) -> String {
    uuid::Uuid::new_v5(&ID_NS, body).to_string()
}

/// An envelope carrying `body` as received (a JSON string payload) and `error`, with an id
/// derived from the bytes and the headers salvaged from them when they are an object: how
/// bytes that cannot be handled as an envelope reach x-sump.
pub fn raw_envelope(body: &[u8], error: ErrorInfo) -> Envelope {
    let text = String::from_utf8_lossy(body);
    let payload = RawValue::from_string(serde_json::to_string(&text).expect("a string serialises"))
        .expect("a JSON string is JSON");
    let mut env = Envelope::new(unparseable_envelope_id(body), Route::default(), payload);
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::Object(h)) = obj.get("headers") {
            env.headers = h.clone().into();
        }
    }
    env.status_mut().error = Some(error);
    env
}

/// The x-sump envelope for bytes that are not an envelope: [`raw_envelope`] with the parse
/// or validation error.
pub fn unparseable_envelope(body: &[u8], e: &EnvelopeError) -> Envelope {
    let kind = if e.is_parse() {
        "ParseError"
    } else {
        "ValidationError"
    };
    raw_envelope(body, ErrorInfo::new(kind, e.to_string()))
}

/// Upstream's x-sump payload around `original` (kept as its raw text): `{"error": code,
/// "details": {message, type, mro, traceback} or null, "original_payload": original}`.
pub fn sump_payload(code: &str, error: Option<&ErrorInfo>, original: &RawValue) -> Box<RawValue> {
    let details = error.map(|e| {
        serde_json::json!({
            "message": e.message,
            "type": e.kind,
            "mro": e.mro,
            "traceback": e.traceback,
        })
    });
    let text = format!(
        r#"{{"error":{},"details":{},"original_payload":{}}}"#,
        Value::from(code),
        details.unwrap_or(Value::Null),
        original.get()
    );
    RawValue::from_string(text).expect("parts that are JSON make JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prev: &[&str], curr: &str, next: &[&str]) -> Route {
        Route {
            prev: prev.iter().map(|s| s.to_string()).collect(),
            curr: curr.into(),
            next: next.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `to_vec` writes the envelope by hand; `Serialize` (the gateway's, the tests') goes
    /// through serde. The two must write the same bytes, escapes and every optional part
    /// included.
    #[test]
    fn the_envelope_writer_writes_what_serde_writes() {
        let texts = [
            r#"{"id":"e","route":{"prev":[],"curr":"a","next":[]},"payload":null}"#,
            r#"{"id":"e\"1é","parent_id":"p\\q","route":{"prev":["x","y"],"curr":"a\tb","next":["n"]},"headers":{"trace_id":"t","big":123456789012345678901234,"q\"k":{"a":[1,2]}},"payload":{"text":"x\ny","n":1.50},"status":{"phase":"failed","reason":"RuntimeError","actor":"a\u0001","attempt":2,"max_attempts":3,"created_at":"2026-01-01T00:00:00.000Z","updated_at":"u","deadline_at":"2030-01-01T00:00:00Z","error":{"message":"m\n","type":"ValueError","mro":["ValueError","Exception"],"traceback":"tb"},"zz":[1],"a\"":true},"x-extra":{"k":1},"aa":"z\u0000"}"#,
            r#"{"id":"e","route":{"prev":[],"curr":"","next":[]},"payload":[],"status":{}}"#,
            r#"{"id":"e","route":{"prev":[],"curr":"a","next":[]},"headers":{},"payload":"s","status":{"custom":1}}"#,
        ];
        for text in texts {
            let env = Envelope::parse(text.as_bytes()).unwrap();
            let by_hand = String::from_utf8(env.to_vec()).unwrap();
            let by_serde = serde_json::to_string(&env).unwrap();
            assert_eq!(by_hand, by_serde, "from {text}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_a_parse_error_that_says_so() {
        let mut bytes =
            br#"{"id":"e","route":{"prev":[],"curr":"a","next":[]},"payload":"ab"}"#.to_vec();
        let at = bytes.len() - 3;
        bytes[at] = 0xff;
        let err = Envelope::parse(&bytes).unwrap_err();
        assert!(err.is_parse(), "{err}");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        assert!(
            err.to_string().contains(&format!("after {at} valid")),
            "{err}"
        );
    }

    #[test]
    fn headers_keep_their_json_text_and_read_as_typed_values() {
        let text = r#"{"id":"e","route":{"prev":[],"curr":"a","next":[]},"headers":{"big":-123456789012345678901234,"f":1.10,"s":"a\"b","t":"plain","o":{"k":[1]}},"payload":1}"#;
        let env = Envelope::parse(text.as_bytes()).unwrap();
        let h = &env.headers;
        assert_eq!(h.raw("big"), Some("-123456789012345678901234"));
        assert_eq!(h.raw("f"), Some("1.10"));
        assert_eq!(h.str("s").as_deref(), Some("a\"b"), "escapes decoded");
        assert!(matches!(h.str("t"), Some(Cow::Borrowed("plain"))));
        assert_eq!(h.str("big"), None, "not a string");
        assert_eq!(h.value("o").unwrap()["k"][0], 1);
        let once = env.to_vec();
        let text_once = String::from_utf8(once.clone()).unwrap();
        assert!(
            text_once.contains(r#""big":-123456789012345678901234"#),
            "{text_once}"
        );
        assert!(text_once.contains(r#""f":1.10"#), "{text_once}");
        assert_eq!(Envelope::parse(&once).unwrap().to_vec(), once, "stable");
        let mut h = Headers::new();
        h.insert_str("a", "x\ny");
        h.insert_missing("a", &RawJson(RawValue::from_string("1".into()).unwrap()));
        assert_eq!(
            h.raw("a"),
            Some(r#""x\ny""#),
            "insert_missing keeps the value"
        );
    }

    #[test]
    fn round_trip_preserves_unknown_fields_and_payload_text() {
        let text = r#"{"id":"e1","route":{"prev":[],"curr":"a","next":["b"]},"payload":{"k": [1, 2.50]},"custom":{"x":1},"status":{"deadline_at":"2030-01-01T00:00:00Z","mine":true}}"#;
        let env = Envelope::parse(text.as_bytes()).unwrap();
        assert_eq!(env.payload.get(), r#"{"k": [1, 2.50]}"#);
        let back: Value = serde_json::from_slice(&env.to_vec()).unwrap();
        assert_eq!(back["custom"]["x"], 1);
        assert_eq!(back["status"]["mine"], true);
        assert_eq!(back["status"]["deadline_at"], "2030-01-01T00:00:00Z");
    }

    #[test]
    fn missing_id_is_a_validation_error_and_garbage_a_parse_error() {
        let e = Envelope::parse(br#"{"route":{"curr":"a"},"payload":1}"#).unwrap_err();
        assert!(!e.is_parse(), "{e}");
        let e = Envelope::parse(br#"{"id":"","route":{"curr":"a"}}"#).unwrap_err();
        assert!(!e.is_parse());
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"id":1,"route":{"curr":"a"}}"#,
        ] {
            assert!(Envelope::parse(bad).unwrap_err().is_parse());
        }
        assert!(Envelope::parse(br#"{"id":"x"}"#).unwrap_err().is_parse());
    }

    #[test]
    fn ids_must_be_short_printable_and_present() {
        let with_id = |id: &str| {
            let text = serde_json::json!({"id": id, "route": {"curr": "a"}}).to_string();
            Envelope::parse(text.as_bytes())
        };
        for bad in ["a\rb", "a\nb", "tab\there", "nul\u{0}", "\u{85}next-line"] {
            let e = with_id(bad).unwrap_err();
            assert!(!e.is_parse(), "{bad:?}: {e}");
            assert!(e.to_string().contains("control character"), "{e}");
        }
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(with_id(&long).unwrap_err().to_string().contains("1024"));
        assert!(with_id(&long[1..]).is_ok());
        assert!(with_id("ordinary-id_42:ünïcode").is_ok());
        let e =
            Envelope::parse(br#"{"id":"e","parent_id":"p\r","route":{"curr":"a"}}"#).unwrap_err();
        assert!(e.to_string().contains("parent_id"), "{e}");
    }

    #[test]
    fn check_names_what_is_wrong() {
        let env = |text: &str| Envelope::parse(text.as_bytes()).unwrap();
        let ok = env(
            r#"{"id":"e","route":{"prev":["a"],"curr":"b","next":["c"]},"status":{"deadline_at":"2030-01-01T00:00:00Z"}}"#,
        );
        assert_eq!(ok.check(1), Ok(()));
        let e = ok.check(0).unwrap_err();
        assert!(e.contains("ASYA_MAX_HOPS (0)"), "{e}");
        for (text, says) in [
            (
                r#"{"id":"e","route":{"curr":"b"},"status":{"deadline_at":"tomorrow"}}"#,
                "deadline_at \"tomorrow\"",
            ),
            (
                r#"{"id":"e","route":{"curr":"b","next":["c",""]}}"#,
                "route.next[1]",
            ),
            (
                r#"{"id":"e","route":{"curr":"b","next":["a.b"]}}"#,
                "route.next[0]",
            ),
            (
                r#"{"id":"e","route":{"curr":"b","next":[">"]}}"#,
                "route.next[0]",
            ),
            (r#"{"id":"e","route":{"curr":"b c"}}"#, "route.curr"),
        ] {
            let e = env(text).check(256).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        // the end of the route is not an actor name
        assert_eq!(
            env(r#"{"id":"e","route":{"prev":["a"],"curr":""}}"#).check(9),
            Ok(())
        );
    }

    #[test]
    fn integers_beyond_64_bits_in_status_and_unknown_fields_come_back_exactly() {
        let text = r#"{"id":"e","route":{"curr":"a"},"payload":123456789012345678901234,"status":{"n":123456789012345678901234,"f":1.000000000000000000001},"top":{"n":-123456789012345678901234}}"#;
        let once = Envelope::parse(text.as_bytes()).unwrap().to_vec();
        let s = String::from_utf8(once.clone()).unwrap();
        for n in [
            "123456789012345678901234,",
            r#""n":123456789012345678901234"#,
            "1.000000000000000000001",
            "-123456789012345678901234",
        ] {
            assert!(s.contains(n), "{n} lost in {s}");
        }
        assert_eq!(Envelope::parse(&once).unwrap().to_vec(), once);
    }

    #[test]
    fn shift_and_route_rules() {
        let r = route(&["a"], "b", &["c", "d"]);
        assert_eq!(r.shifted(), route(&["a", "b"], "c", &["d"]));
        assert_eq!(route(&[], "a", &[]).shifted(), route(&["a"], "", &[]));
        // next may change freely, curr of the successor too
        assert!(r.check_successor(&route(&["a", "b"], "x", &["y"])).is_ok());
        assert!(r.check_successor(&route(&["a", "b"], "", &[])).is_ok());
        // history may not
        assert!(r.check_successor(&route(&["a"], "b", &["c"])).is_err());
        assert!(r.check_successor(&route(&["z", "b"], "c", &[])).is_err());
        assert!(r
            .check_successor(&route(&["a", "b", "c"], "d", &[]))
            .is_err());
    }

    #[test]
    fn child_traceparent_keeps_trace_and_flags_and_replaces_the_span() {
        let p = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            child_traceparent(p, 0xabc).as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01")
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(child_traceparent(bad, 1), None, "{bad}");
        }
        assert_eq!(child_traceparent(p, 0), None);
    }

    #[test]
    fn frame_keeps_identity_deadline_and_trace() {
        let input = Envelope::parse(
            br#"{"id":"e1","parent_id":"p","route":{"curr":"a"},"headers":{"trace_id":"t-1"},"payload":1,"status":{"deadline_at":"2030-01-01T00:00:00Z"},"z":1}"#,
        )
        .unwrap();
        let frame: Frame = serde_json::from_str(
            r#"{"route":{"prev":["a"],"curr":""},"payload":2,"headers":{"h":1},"status":{"phase":"processing"}}"#,
        )
        .unwrap();
        let out = frame.into_envelope(&input);
        assert_eq!(out.id, "e1");
        assert_eq!(out.parent_id.as_deref(), Some("p"));
        assert_eq!(out.trace_id(), "t-1");
        assert_eq!(out.deadline_at(), Some("2030-01-01T00:00:00Z"));
        assert_eq!(out.extra["z"].get(), "1");
        assert_eq!(out.payload.get(), "2");
    }
}

//! `asya-host plugin new policy|transport NAME`: a plugin crate to start from.
//!
//! The crate stands alone (its own `[workspace]`, so it builds wherever it is created),
//! depends on `asya-sdk` by git (this repository; the SDK is not on crates.io) or by path
//! (development of the SDK itself), builds for `wasm32-wasip2` with the size-optimised
//! release profile the shipped plugins use, and has a native `#[test]`, a README with its
//! configuration table and a `.gitignore`.
//!
//! - A **policy** is complete: it builds, its tests pass and `asya-host plugin check`
//!   accepts it as generated.
//! - A **transport** is a skeleton: it builds, its tests pass and `plugin check` accepts it,
//!   but every broker operation returns an error starting with `TODO:` until it is
//!   written, so `asya-host plugin test` fails every case with that text.

use std::fmt;
use std::path::{Path, PathBuf};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A route policy (world `route-policy-plugin`).
    Policy,
    /// A queue transport (world `transport-plugin`).
    Transport,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Policy => "policy",
            Kind::Transport => "transport",
        })
    }
}

/// Where the generated crate gets `asya-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// A git dependency on this repository (`rev` pins a commit, tag or branch-free rev).
    Git { url: String, rev: Option<String> },
    /// A path dependency on a checkout's `sdk/` directory.
    Path(PathBuf),
}

impl SdkSource {
    /// The dependency line of `Cargo.toml`.
    fn dependency(&self) -> String {
        match self {
            SdkSource::Git { url, rev: None } => format!("asya-sdk = {{ git = {url:?} }}"),
            SdkSource::Git {
                url,
                rev: Some(rev),
            } => format!("asya-sdk = {{ git = {url:?}, rev = {rev:?} }}"),
            SdkSource::Path(p) => {
                format!("asya-sdk = {{ path = {:?} }}", p.display().to_string())
            }
        }
    }
}

/// A `plugin new` request.
#[derive(Debug, Clone)]
pub struct NewPlugin {
    pub kind: Kind,
    /// Crate name (`my-policy`): lower-case letters, digits, `-`; starts with a letter.
    pub name: String,
    /// Parent directory; the crate is created in `dir/name`.
    pub dir: PathBuf,
    pub sdk: SdkSource,
}

/// Why a crate could not be created. Messages name the argument or file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("plugin name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{} already exists: choose another name or --dir", path.display())]
    Exists { path: PathBuf },
    #[error("--sdk-path {}: no Cargo.toml of asya-sdk there (give the sdk/ directory of a checkout)", path.display())]
    NotAnSdk { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was created.
#[derive(Debug, Clone)]
pub struct Created {
    pub kind: Kind,
    /// The crate directory.
    pub dir: PathBuf,
    /// Files written, relative to `dir`.
    pub files: Vec<&'static str>,
    /// The component a release build produces, relative to `dir`.
    pub wasm: String,
}

impl fmt::Display for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.dir.display();
        writeln!(
            f,
            "created {} crate {d}: {}",
            self.kind,
            self.files.join(", ")
        )?;
        writeln!(f, "next:")?;
        writeln!(f, "  cd {d}")?;
        writeln!(
            f,
            "  cargo test                                         # native tests"
        )?;
        writeln!(
            f,
            "  cargo build --target wasm32-wasip2 --release      # the component"
        )?;
        writeln!(f, "  asya-host plugin check {}", self.wasm)?;
        if self.kind == Kind::Transport {
            writeln!(
                f,
                "  asya-host plugin test {} --config '{{\"addr\": \"127.0.0.1:7000\"}}' --allow 127.0.0.1:7000",
                self.wasm
            )?;
            writeln!(
                f,
                "(a skeleton: every operation fails with TODO until written; see its README)"
            )?;
        }
        Ok(())
    }
}

/// Check a crate name: what cargo accepts and what gives a predictable `.wasm` name.
pub fn validate_name(name: &str) -> Result<(), ScaffoldError> {
    let bad = |why| {
        Err(ScaffoldError::InvalidName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("must start with a lower-case letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return bad("may contain only lower-case letters, digits and '-'");
    }
    if name.ends_with('-') || name.contains("--") {
        return bad("must not end with '-' or contain '--'");
    }
    if matches!(name, "asya-sdk" | "test" | "core" | "std" | "alloc") {
        return bad("is reserved (it would clash with a dependency or the standard library)");
    }
    Ok(())
}

/// `my-policy` → `MyPolicy`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// Create the crate; nothing is overwritten (an existing directory is an error).
pub fn create(req: &NewPlugin) -> Result<Created, ScaffoldError> {
    validate_name(&req.name)?;
    if let SdkSource::Path(p) = &req.sdk {
        let manifest = std::fs::read_to_string(p.join("Cargo.toml")).unwrap_or_default();
        if !manifest.contains("name = \"asya-sdk\"") {
            return Err(ScaffoldError::NotAnSdk { path: p.clone() });
        }
    }
    let dir = req.dir.join(&req.name);
    if dir.exists() {
        return Err(ScaffoldError::Exists { path: dir });
    }
    let snake = req.name.replace('-', "_");
    let fill = |t: &str| {
        t.replace("{{name}}", &req.name)
            .replace("{{snake}}", &snake)
            .replace("{{Type}}", &type_name(&req.name))
            .replace("{{sdk_dependency}}", &req.sdk.dependency())
    };
    let (lib, readme, description) = match req.kind {
        Kind::Policy => (POLICY_LIB, POLICY_README, "Asya route policy"),
        Kind::Transport => (TRANSPORT_LIB, TRANSPORT_README, "Asya queue transport"),
    };
    let manifest = fill(MANIFEST).replace("{{description}}", description);
    let files: [(&'static str, String); 4] = [
        ("Cargo.toml", manifest),
        ("src/lib.rs", fill(lib)),
        ("README.md", fill(readme)),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (rel, text) in &files {
        write(&dir.join(rel), text)?;
    }
    Ok(Created {
        kind: req.kind,
        dir,
        files: files.iter().map(|(f, _)| *f).collect(),
        wasm: format!("target/wasm32-wasip2/release/{snake}.wasm"),
    })
}

fn write(path: &Path, text: &str) -> Result<(), ScaffoldError> {
    let err = |source| ScaffoldError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::write(path, text).map_err(err)
}

const MANIFEST: &str = r#"[package]
name = "{{name}}"
description = "{{description}}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib: the component; rlib: native unit tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
# asya-sdk lives in the asya-host repository (not on crates.io). Pin a rev for reproducible
# builds; to build against a local checkout, use `asya-sdk = { path = "…/sdk" }` or a
# [patch] section (see the SDK's README).
{{sdk_dependency}}

# Size-optimised component (what the shipped plugins use: about half the size of the
# default release profile, and the host compiles it at startup).
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true

# A crate of its own, even when created inside another workspace's directory.
[workspace]
"#;

const POLICY_LIB: &str = r##"//! `{{name}}`: a route policy. When the frame's payload number at `field` is at least
//! `min`, the `actor` runs next (the actor that was next moves to the front of `next`).
//! Change `decide` to your rule; the configuration keys are in README.md.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

/// The policy's configuration, read once per instance.
pub struct {{Type}} {
    actor: String,
    field: String,
    min: f64,
}

impl RoutePolicy for {{Type}} {
    fn configure(config: &Config) -> Result<Self, Error> {
        let actor = config.str_or("actor", "priority-handler")?;
        if actor.is_empty() {
            return Err(Error::new("config \"actor\" must not be empty"));
        }
        Ok({{Type}} {
            actor,
            field: config.str_or("field", "priority")?,
            min: config.f64_or("min", 1.0)?,
        })
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        // Read only what the decision needs: each accessor is one call into the host.
        match frame.payload_f64(&self.field) {
            Some(v) if v >= self.min => {}
            _ => return Ok(Decision::Keep),
        }
        let curr = frame.route_curr();
        if curr == self.actor {
            return Ok(Decision::Keep);
        }
        // `prev` is history and stays; a policy chooses who runs now and after.
        let mut next = Vec::new();
        if !curr.is_empty() {
            next.push(curr);
        }
        next.extend(frame.route_next());
        Ok(Decision::ReplaceRoute {
            curr: self.actor.clone(),
            next,
        })
    }
}

asya_sdk::export_route_policy!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use asya_sdk::serde_json::json;
    use asya_sdk::{LocalEnvelope, Route};

    fn policy(config: &str) -> Result<{{Type}}, Error> {
        {{Type}}::configure(&Config::parse(config)?)
    }

    #[test]
    fn a_frame_at_or_above_min_goes_to_the_actor_first() {
        let p = policy(r#"{"actor": "fast-lane", "min": 5}"#).unwrap();
        let input = LocalEnvelope::new("e1", Route::new(&[], "a", &["b", "c"]), json!({}));
        let urgent = LocalEnvelope::new("e1", Route::new(&["a"], "b", &["c"]), json!({"priority": 7}));
        assert_eq!(
            p.decide(&input.view(), &urgent.view()).unwrap(),
            Decision::ReplaceRoute {
                curr: "fast-lane".into(),
                next: vec!["b".into(), "c".into()],
            }
        );
        for payload in [json!({"priority": 2}), json!({"priority": "7"}), json!({})] {
            let frame = LocalEnvelope::new("e1", Route::new(&["a"], "b", &[]), payload);
            assert_eq!(p.decide(&input.view(), &frame.view()).unwrap(), Decision::Keep);
        }
    }

    #[test]
    fn a_bad_config_is_an_error() {
        assert!(policy(r#"{"min": "high"}"#).is_err());
        assert!(policy(r#"{"actor": ""}"#).is_err());
        assert!(policy("null").is_ok());
    }
}
"##;

const POLICY_README: &str = r#"# {{name}}

An Asya route policy (a WebAssembly component, world `route-policy-plugin`). When a frame's
payload number at `field` is at least `min`, `actor` processes the frame next: its `curr`
becomes `actor` and the old `curr` moves to the front of `next`. A missing field or a
value that is not a number (`"7"` is a string) leaves the frame as it is.

## Configuration

```json
{"actor": "priority-handler", "field": "priority", "min": 1}
```

| key | default | meaning |
|---|---|---|
| `actor` | `"priority-handler"` | the actor to run next (non-empty) |
| `field` | `"priority"` | dot-separated path of a payload field (`"meta.priority"`) |
| `min` | `1` | the number at or above which the frame goes to `actor` |

A wrong type (`"min": "high"`) fails `configure`: the sidecar stops at startup with the
message.

## Build, test, check, load

```sh
cargo test                                      # native unit tests (LocalEnvelope)
cargo build --target wasm32-wasip2 --release    # needs: rustup target add wasm32-wasip2
asya-host plugin check target/wasm32-wasip2/release/{{snake}}.wasm
ASYA_ROUTE_POLICIES='[{"path": "/plugins/{{snake}}.wasm", "config": {"actor": "priority-handler"}}]' \
  asya-host sidecar
```

The API of `asya-sdk`: `cargo doc --open` (documents the SDK with this crate).
"#;

const TRANSPORT_LIB: &str = r##"//! `{{name}}`: a queue transport — a SKELETON. It builds and passes `asya-host plugin
//! check`, but every broker operation returns an error starting with `TODO:`, so
//! `asya-host plugin test` fails each case with that text until the operations are written.
//! What each operation must do: docs/writing-a-transport.md in the asya-host repository.

use std::time::Duration;

use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{Config, Error};

/// The transport's configuration (`ASYA_TRANSPORT_CONFIG`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Broker address `ip:port` (it must be in the operator's `ASYA_TRANSPORT_ALLOW`).
    pub addr: String,
    /// A delivery not settled for this long is redelivered to another consumer. The host
    /// reads the same key and calls `in_progress` every `ack_wait_ms / 2` while a handler
    /// works on a delivery.
    pub ack_wait_ms: u64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings, Error> {
        let s = Settings {
            addr: config.str_or("addr", "127.0.0.1:7000")?,
            ack_wait_ms: config.u64_or("ack_wait_ms", 30_000)?,
        };
        if s.ack_wait_ms < 100 {
            return Err(Error::new("config \"ack_wait_ms\" must be at least 100"));
        }
        Ok(s)
    }
}

/// One connection to the broker (the host creates one instance per connection).
pub struct {{Type}} {
    settings: Settings,
}

impl Transport for {{Type}} {
    fn connect(config: &Config) -> Result<Self, Error> {
        let settings = Settings::from_config(config)?;
        // TODO: open the connection: std::net::TcpStream::connect(settings.addr.as_str()),
        // returning Error::retryable(..) when the broker is unreachable.
        Ok({{Type}} { settings })
    }

    fn receive(&mut self, queue: &str, max: u32, wait: Duration) -> Result<Vec<Delivery>, Error> {
        let _ = (queue, max, wait, &self.settings);
        // TODO: up to `max` messages of `queue`, waiting at most `wait` for the first;
        // delivery_count and message_id decoded with `unframe` if the broker has neither.
        Err(todo_op("receive"))
    }

    fn send(&mut self, messages: Vec<Outgoing>) -> Result<(), Error> {
        let _ = messages;
        // TODO: publish every message (body framed with `frame` if the broker has no
        // message ids), drop a repeated message id, return once the broker accepted all.
        Err(todo_op("send"))
    }

    fn ack(&mut self, tag: &str) -> Result<(), Error> {
        let _ = tag;
        // TODO: settle the delivery; fail when this connection no longer owns it.
        Err(todo_op("ack"))
    }

    fn nack(&mut self, tag: &str, delay: Duration) -> Result<(), Error> {
        let _ = (tag, delay);
        // TODO: deliver it again after `delay`, with delivery_count + 1.
        Err(todo_op("nack"))
    }

    fn in_progress(&mut self, tag: &str) -> Result<(), Error> {
        let _ = tag;
        // TODO: push the delivery's redelivery deadline `ack_wait_ms` into the future.
        Err(todo_op("in_progress"))
    }

    fn close(&mut self) {
        // TODO: close the connection; unsettled deliveries must come back from the broker.
    }
}

fn todo_op(op: &str) -> Error {
    Error::new(format!(
        "TODO: {op} is not written yet in {{name}} (see its README and docs/writing-a-transport.md)"
    ))
}

/// For a broker that keeps only bytes: a message id and a delivery count carried in front
/// of the body (`<count>\n<id>\n<body>`; ids never contain a newline).
pub fn frame(message_id: &str, delivery_count: u32, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{delivery_count}\n{message_id}\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// The inverse of [`frame`]: `(message_id, delivery_count, body)`.
pub fn unframe(data: &[u8]) -> Result<(String, u32, &[u8]), Error> {
    let bad = || Error::new("message is not framed as <count>\\n<id>\\n<body>");
    let nl = data.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let count = std::str::from_utf8(&data[..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let rest = &data[nl + 1..];
    let nl = rest.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let id = std::str::from_utf8(&rest[..nl]).map_err(|_| bad())?;
    Ok((id.to_owned(), count, &rest[nl + 1..]))
}

asya_sdk::export_transport!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_have_defaults_and_reject_wrong_types() {
        let s = Settings::from_config(&Config::parse("{}").unwrap()).unwrap();
        assert_eq!(s.addr, "127.0.0.1:7000");
        assert_eq!(s.ack_wait_ms, 30_000);
        assert!(Settings::from_config(&Config::parse(r#"{"ack_wait_ms": "1s"}"#).unwrap()).is_err());
        assert!(Settings::from_config(&Config::parse(r#"{"ack_wait_ms": 5}"#).unwrap()).is_err());
    }

    #[test]
    fn framing_round_trips() {
        let data = frame("input-1:2:0", 3, b"{\"id\": \"e1\"}\n");
        let (id, count, body) = unframe(&data).unwrap();
        assert_eq!((id.as_str(), count, body), ("input-1:2:0", 3, &b"{\"id\": \"e1\"}\n"[..]));
        assert!(unframe(b"no framing").is_err());
    }

    #[test]
    fn unwritten_operations_say_todo() {
        let mut t = {{Type}}::connect(&Config::parse("{}").unwrap()).unwrap();
        let err = t.receive("asya-ns-a", 1, Duration::ZERO).unwrap_err();
        assert!(err.message.starts_with("TODO: receive"), "{}", err.message);
    }
}
"##;

const TRANSPORT_README: &str = r#"# {{name}}

An Asya queue transport (`ASYA_TRANSPORT=wasm`, a WebAssembly component of world
`transport-plugin`). **This is a skeleton**: it builds and passes `asya-host plugin check`,
but `receive`, `send`, `ack`, `nack` and `in_progress` return errors starting with `TODO:`,
so `asya-host plugin test` fails every case with that text until they are written. What each
operation must do (message ids and delivery counts on a broker that has neither, acks of
deliveries taken over by another consumer, where a nack re-enters the queue, `close`, how
long the conformance suite waits): `docs/writing-a-transport.md` in the asya-host
repository. `frame` / `unframe` in `src/lib.rs` carry a message id and a delivery count in
front of the body for a broker that keeps only bytes.

## Configuration (`ASYA_TRANSPORT_CONFIG`, a JSON object)

| key | default | meaning |
|---|---|---|
| `addr` | `"127.0.0.1:7000"` | broker address `ip:port`; it must be listed in `ASYA_TRANSPORT_ALLOW` |
| `ack_wait_ms` | `30000` | a delivery not settled for this long goes to another consumer; the host reads this key too and calls `in_progress` every `ack_wait_ms / 2` while a handler works |

A wrong type fails `connect`: the sidecar stops at startup with the message.

## Build, test, check, run

```sh
cargo test                                      # native unit tests
cargo build --target wasm32-wasip2 --release    # needs: rustup target add wasm32-wasip2
asya-host plugin check target/wasm32-wasip2/release/{{snake}}.wasm
asya-host plugin test target/wasm32-wasip2/release/{{snake}}.wasm \
  --config '{"addr": "127.0.0.1:7000", "ack_wait_ms": 1500}' --allow 127.0.0.1:7000
ASYA_TRANSPORT=wasm ASYA_TRANSPORT_PLUGIN=/plugins/{{snake}}.wasm \
  ASYA_TRANSPORT_CONFIG='{"addr": "10.0.0.5:7000"}' ASYA_TRANSPORT_ALLOW=10.0.0.5:7000 \
  asya-host sidecar
```

`plugin test` prints its waits and per-case timeout first; add `--no-dedup` if the broker
cannot drop a repeated message id. The API of `asya-sdk`: `cargo doc --open`.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["p", "my-policy", "redis-list2"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "", "My", "1st", "a_b", "a-", "a--b", "a b", "asya-sdk", "../x",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(type_name("redis-list2"), "RedisList2");
    }

    #[test]
    fn creates_files_and_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let req = NewPlugin {
            kind: Kind::Transport,
            name: "my-broker".into(),
            dir: tmp.path().to_owned(),
            sdk: SdkSource::Git {
                url: "https://example.com/asya.git".into(),
                rev: Some("abc123".into()),
            },
        };
        let created = create(&req).unwrap();
        let manifest = std::fs::read_to_string(created.dir.join("Cargo.toml")).unwrap();
        assert!(manifest
            .contains(r#"asya-sdk = { git = "https://example.com/asya.git", rev = "abc123" }"#));
        let lib = std::fs::read_to_string(created.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("export_transport!(MyBroker)"));
        assert!(!lib.contains("{{"), "every placeholder filled");
        assert_eq!(created.wasm, "target/wasm32-wasip2/release/my_broker.wasm");
        let again = create(&req).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        let no_sdk = create(&NewPlugin {
            name: "other".into(),
            sdk: SdkSource::Path(tmp.path().to_owned()),
            ..req
        })
        .unwrap_err()
        .to_string();
        assert!(no_sdk.starts_with("--sdk-path"), "{no_sdk}");
    }
}

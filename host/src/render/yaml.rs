//! A YAML emitter for JSON values: block style for maps and lists; a string is written plain
//! only when it cannot be read as anything else (`[A-Za-z_/][A-Za-z0-9_./:-]*`, not ending
//! in `:`, not a YAML 1.1 boolean or null word), multi-line strings as literal blocks, every
//! other string as a JSON double-quoted scalar (JSON's escapes are a subset of YAML's).
//!
//! Why not a YAML crate: `serde_yaml` is deprecated and unmaintained since 2024 and its forks
//! (`serde_yaml_ng`, `serde_norway`) are young single-maintainer projects; we only ever
//! *emit* YAML, from values built with serde, and this conservative quoting reads back as the
//! same value in every YAML 1.1/1.2 parser (`no`, `on`, `1e3`, `0o17`, `$G` stay strings;
//! the render tests read the output back with PyYAML and compare).

use serde_json::Value;

/// One YAML document (no `---` marker) ending with a newline.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => list(&mut out, a, 0),
        other => {
            scalar(&mut out, other, 0);
            out.push('\n');
        }
    }
    out
}

/// Several documents separated by `---` (the input of `kubectl apply -f -`).
pub fn to_yaml_stream<'a>(docs: impl IntoIterator<Item = &'a Value>) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&to_yaml(d));
    }
    out
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn key(out: &mut String, k: &str) {
    string(out, k);
}

/// A one-line string: plain when unambiguous, else double-quoted.
fn string(out: &mut String, s: &str) {
    if plain_ok(s) {
        out.push_str(s);
    } else {
        out.push_str(&Value::String(s.to_owned()).to_string());
    }
}

/// Words YAML 1.1 reads as booleans or null (PyYAML, older kubectl).
const RESERVED: [&str; 11] = [
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "=",
];

fn plain_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '/')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | ':' | '-'))
        && !s.ends_with(':')
        && !RESERVED.contains(&s.to_ascii_lowercase().as_str())
}

fn map(out: &mut String, m: &serde_json::Map<String, Value>, ind: usize) {
    let mut first = true;
    for (k, v) in m {
        // The first key of a map inside a list item follows the `- ` on the same line.
        if !first || !out.ends_with("- ") {
            indent(out, ind);
        }
        first = false;
        key(out, k);
        out.push(':');
        value_after_key(out, v, ind);
    }
}

fn value_after_key(out: &mut String, v: &Value, ind: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            map(out, m, ind + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            list(out, a, ind);
        }
        other => {
            out.push(' ');
            scalar(out, other, ind + 2);
            out.push('\n');
        }
    }
}

fn list(out: &mut String, a: &[Value], ind: usize) {
    for v in a {
        indent(out, ind);
        match v {
            Value::Object(m) if !m.is_empty() => {
                out.push_str("- ");
                map(out, m, ind + 2)
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push_str("-\n");
                list(out, inner, ind + 2);
            }
            other => {
                out.push_str("- ");
                scalar(out, other, ind + 2);
                out.push('\n');
            }
        }
    }
}

/// A scalar (or an empty map / list) on the current line; a literal block's lines are
/// indented by `ind`.
fn scalar(out: &mut String, v: &Value, ind: usize) {
    match v {
        Value::String(s) if literal_ok(s) => {
            let trailing = s.len() - s.trim_end_matches('\n').len();
            out.push_str(match trailing {
                0 => "|-",
                1 => "|",
                _ => "|+",
            });
            let body = s.strip_suffix('\n').unwrap_or(s);
            for line in body.split('\n') {
                out.push('\n');
                if !line.is_empty() {
                    indent(out, ind);
                    out.push_str(line);
                }
            }
        }
        Value::String(s) => string(out, s),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
        other => out.push_str(&other.to_string()),
    }
}

/// A multi-line string that a literal block reproduces exactly: the first line starts with
/// a visible character (it sets the block's indentation), no control characters but
/// newlines, no YAML 1.1 line breaks (U+0085, U+2028, U+2029) or byte-order marks, no line
/// of blanks only, no trailing blanks (editors strip them).
fn literal_ok(s: &str) -> bool {
    s.contains('\n')
        && s.chars().next().is_some_and(|c| !c.is_whitespace())
        && s.chars().all(|c| {
            c == '\n'
                || !(c.is_control() || matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}'))
        })
        && s.split('\n')
            .all(|l| !l.ends_with(' ') && (l.is_empty() || !l.trim().is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn block_layout() {
        let v = json!({
            "a": 1,
            "b": "no",
            "c": {"d": [1, {"e": "f", "g": []}, [true, null]], "h": {}},
            "text": "x = 1\n[t]\n",
        });
        let y = to_yaml(&v);
        let want = r#"a: 1
b: "no"
c:
  d:
  - 1
  - e: f
    g: []
  -
    - true
    - null
  h: {}
text: |
  x = 1
  [t]
"#;
        assert_eq!(y, want);
    }

    #[test]
    fn literal_blocks_only_when_exact() {
        assert!(literal_ok("a\nb"));
        assert!(literal_ok("{\n  \"k\": 1\n}\n"));
        assert!(!literal_ok("one line"));
        assert!(!literal_ok(" a\nb"));
        assert!(!literal_ok("a \nb"));
        assert!(!literal_ok("a\n  \nb"));
        assert!(!literal_ok("a\tb\nc"));
        assert!(!literal_ok("a\u{2028}b\nc"));
        let y = to_yaml(&json!({"k": "a\n\nb\n\n"}));
        assert_eq!(y, "k: |+\n  a\n\n  b\n\n");
    }

    #[test]
    fn plain_only_when_unambiguous() {
        for plain in [
            "apps/v1",
            "asya-host:0.1.0",
            "nats://nats:4222",
            "app.kubernetes.io/name",
            "/var/run/asya",
            "_x",
        ] {
            assert!(plain_ok(plain), "{plain}");
        }
        for quoted in [
            "", "no", "On", "NULL", "y", "1", "0.5", "1e3", "0o17", "$G", "a b", "a:", "-x",
            ".inf", "*", "a#b", "\u{e9}",
        ] {
            assert!(!plain_ok(quoted), "{quoted}");
        }
    }
}

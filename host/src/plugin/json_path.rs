//! Find one field of a JSON document by a dot-separated key path without building a tree:
//! the policy hot path (`payload-field`) reads one field of a payload it never parses.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Longest path accepted (a guest-controlled value).
const MAX_PATH: usize = 1024;

/// The JSON text of the value at `path` (`"a.b"`; `""` = the whole document), or `None`
/// when a step is missing, not an object, or the text is not JSON.
pub(crate) fn field<'a>(json: &'a str, path: &str) -> Option<&'a str> {
    if path.len() > MAX_PATH {
        return None;
    }
    if path.is_empty() {
        return Some(json);
    }
    let mut cur = json;
    for key in path.split('.') {
        cur = lookup(cur, key)?;
    }
    Some(cur)
}

fn lookup<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let mut de = serde_json::Deserializer::from_str(obj);
    Seek(key).deserialize(&mut de).ok().flatten()
}

struct Seek<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = Option<&'de str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = Option<&'de str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(k) = map.next_key::<Cow<'de, str>>()? {
            if found.is_none() && k == self.0 {
                let v: &'de RawValue = map.next_value()?;
                found = Some(v.get());
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn finds_nested_fields_as_text() {
        let doc = r#"{"a": {"b": [1, 2], "c": "x\"y"}, "priority": "high", "n": null}"#;
        assert_eq!(field(doc, "priority"), Some(r#""high""#));
        assert_eq!(field(doc, "a.b"), Some("[1, 2]"));
        assert_eq!(field(doc, "a.c"), Some(r#""x\"y""#));
        assert_eq!(field(doc, "n"), Some("null"));
        assert_eq!(field(doc, ""), Some(doc));
        assert_eq!(field(doc, "missing"), None);
        assert_eq!(field(doc, "a.b.c"), None);
        assert_eq!(field("[1]", "a"), None);
        assert_eq!(field("not json", "a"), None);
    }
}

//! JSON intake that refuses duplicate object keys at any depth.
//!
//! serde_json keeps the last of two equal keys; the router (or any other
//! reader of the same bytes) may keep the first, so one body could mean two
//! assignments. The check runs inside the one parse: a serde visitor builds
//! the same [`Value`] serde_json would and notes the first key that an
//! object already held (`Map::insert` says so at no extra cost). A duplicate
//! does not stop the parse, so an array of assignments still yields every
//! element, each with its own verdict.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};
use std::fmt;

/// A parsed value and the first duplicate key found in it, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The value, as serde_json would build it (the last duplicate wins).
    pub value: Value,
    /// The first key that appeared twice in one object, at any depth.
    pub duplicate: Option<String>,
}

impl Checked {
    /// The value, or the duplicate key as an error message.
    pub fn into_result(self) -> Result<Value, String> {
        match self.duplicate {
            None => Ok(self.value),
            Some(k) => Err(format!("duplicate key {}", short(&k))),
        }
    }
}

/// Parses `bytes` as one JSON document; `Err` for invalid JSON or a duplicate key.
pub fn from_slice_unique(bytes: &[u8]) -> Result<Value, String> {
    let checked: Checked = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    checked.into_result()
}

/// A key for a message: at most 64 characters, quoted.
fn short(k: &str) -> String {
    if k.chars().count() <= 64 {
        format!("{k:?}")
    } else {
        let head: String = k.chars().take(64).collect();
        format!("{head:?}…")
    }
}

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

fn plain(value: Value) -> Checked {
    Checked {
        value,
        duplicate: None,
    }
}

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Checked, E> {
        Ok(plain(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Checked, E> {
        Ok(plain(Value::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Checked, E> {
        Ok(plain(Value::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Checked, E> {
        Ok(plain(
            Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Checked, E> {
        Ok(plain(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Checked, E> {
        Ok(plain(Value::String(v)))
    }

    fn visit_none<E>(self) -> Result<Checked, E> {
        Ok(plain(Value::Null))
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(plain(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Checked, D::Error> {
        Checked::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        let mut duplicate = None;
        while let Some(c) = seq.next_element::<Checked>()? {
            if duplicate.is_none() {
                duplicate = c.duplicate;
            }
            items.push(c.value);
        }
        Ok(Checked {
            value: Value::Array(items),
            duplicate,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        let mut out = Map::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            let c: Checked = map.next_value()?;
            if duplicate.is_none() {
                duplicate = c.duplicate;
            }
            // One lookup either way; an occupied entry names the duplicate.
            match out.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(c.value);
                }
                Entry::Occupied(mut o) => {
                    if duplicate.is_none() {
                        duplicate = Some(o.key().clone());
                    }
                    o.insert(c.value);
                }
            }
        }
        Ok(Checked {
            value: Value::Object(out),
            duplicate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicates_are_found_at_any_depth() {
        let dup = |t: &str| from_slice_unique(t.as_bytes()).unwrap_err();
        assert!(dup(r#"{"a":1,"a":2}"#).contains("\"a\""));
        assert!(dup(r#"{"x":{"y":[{"k":1,"k":1}]}}"#).contains("\"k\""));
        assert!(dup(r#"[{"b":1},{"c":1,"c":{}}]"#).contains("\"c\""));
        assert!(from_slice_unique(b"{\"a\":").is_err());
    }

    #[test]
    fn values_match_serde_json() {
        for t in [
            r#"{"a":[1,-2,3.5,1e300,"s\u00e9",true,null,{}],"b":{"c":18446744073709551615}}"#,
            "[]",
            "\"x\"",
            "0",
        ] {
            let ours = from_slice_unique(t.as_bytes()).unwrap();
            let theirs: Value = serde_json::from_str(t).unwrap();
            assert_eq!(ours, theirs, "{t}");
        }
        assert_eq!(
            from_slice_unique(br#"{"a":{"b":1},"b":{"a":1}}"#).unwrap(),
            json!({"a":{"b":1},"b":{"a":1}})
        );
    }
}

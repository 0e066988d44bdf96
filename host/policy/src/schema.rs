//! The document as written: serde structs mirroring the incumbent's schema,
//! before any check beyond YAML shape. `load` turns them into a [`Policy`].
//!
//! Every value we check later is `Spanned` so its error can name a line.
//! Keys we know but do not support are fields here, so refusing them names
//! them (an unknown key is refused by serde with the list of known ones).
//!
//! [`Policy`]: crate::Policy

use std::fmt;

use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

/// An optional key: `None` when absent, `Some(None)` when present but null.
/// Null is kept apart from absent because `binaries: ~` must not quietly
/// mean "any binary".
pub(crate) type Opt<T> = Option<Spanned<Option<T>>>;

/// A key we know but do not support yet: any presence, even null, is refused.
pub(crate) type Unsupported = Option<Spanned<IgnoredAny>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDocument {
    pub version: Spanned<Integer>,
    #[serde(default, deserialize_with = "present")]
    pub network_policies: Opt<RawRules>,
    #[serde(default, deserialize_with = "present")]
    pub filesystem_policy: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub landlock: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub process: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub network_middlewares: Unsupported,
}

/// `network_policies`, in document order with each key's position. (A map
/// keyed by `Spanned<String>` is impossible: it has no `Ord`.) Duplicate
/// keys are refused by the YAML parser.
pub(crate) struct RawRules(pub Vec<(Spanned<String>, Spanned<RawRule>)>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    #[serde(default, deserialize_with = "present")]
    pub name: Opt<String>,
    pub endpoints: Spanned<Option<Vec<Spanned<RawEndpoint>>>>,
    #[serde(default, deserialize_with = "present")]
    pub binaries: Opt<Vec<Spanned<RawBinary>>>,
}

/// `{ path: ... }`. A bare path is a common slip, refused with the fix.
pub(crate) struct RawBinary {
    pub path: Spanned<Option<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinaryMap {
    path: Spanned<Option<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "endpoint")]
pub(crate) struct RawEndpoint {
    pub host: Spanned<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub port: Opt<Integer>,
    #[serde(default, deserialize_with = "present")]
    pub ports: Opt<Vec<Spanned<Integer>>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_ips: Opt<Vec<Spanned<String>>>,
    // L7 fields: part of the schema, implemented with HTTP inspection.
    #[serde(default, deserialize_with = "present")]
    pub path: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub protocol: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub tls: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub enforcement: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub access: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub rules: Unsupported,
    #[serde(default, deserialize_with = "present")]
    pub deny_rules: Unsupported,
}

/// A scalar that should be an integer: `None` when it is some other scalar
/// (`"443"`, `4.5`, `true`, null, out of range), so the loader can say which
/// field wants an integer instead of the YAML library's bare "invalid i64".
pub(crate) struct Integer(pub Option<i64>);

/// For `#[serde(default, deserialize_with = "present")]`: a key that is
/// present yields `Some`, even when its value is null (serde's `Option`
/// would make that `None`, indistinguishable from absent).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for RawRules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = RawRules;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from rule key to rule")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawRules, A::Error> {
                let mut rules = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    rules.push(entry);
                }
                Ok(RawRules(rules))
            }
        }
        d.deserialize_map(Visit)
    }
}

impl<'de> Deserialize<'de> for RawBinary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = RawBinary;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a binary, `{ path: /absolute/path }`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBinary, E> {
                let shown = crate::error::excerpt(v, crate::error::VALUE_CHARS);
                Err(E::custom(format!(
                    "write a binary as `{{ path: {shown} }}`, not a bare path"
                )))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawBinary, A::Error> {
                let raw = RawBinaryMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBinary { path: raw.path })
            }
        }
        d.deserialize_any(Visit)
    }
}

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl de::Visitor<'_> for Visit {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(Some(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Integer, E> {
                Ok(Integer(i64::try_from(v).ok()))
            }
            fn visit_i128<E>(self, _: i128) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_u128<E>(self, _: u128) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_unit<E>(self) -> Result<Integer, E> {
                Ok(Integer(None))
            }
        }
        d.deserialize_any(Visit)
    }
}

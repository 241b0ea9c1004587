//! The TOC's JSON streamed into a [`Builder`]: entries go in as serde parses them, so
//! no [`Toc`](crate::Toc) or entry list is ever held whole.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Builder;
use crate::error::Error;
use crate::toc::TocEntry;

/// The TOC document, its entries handed to the builder as they are parsed.
pub(super) struct TocSeed<'a, 'c> {
    pub(super) builder: &'a mut Builder<'c>,
    /// The builder's own error, which serde can only carry as text.
    pub(super) failed: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for TocSeed<'_, '_> {
    type Value = i64;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<i64, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TocSeed<'_, '_> {
    type Value = i64;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> std::result::Result<i64, M::Error> {
        let (mut version, mut entries) = (None, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" if version.is_none() => version = Some(map.next_value::<i64>()?),
                "entries" if !entries => {
                    entries = true;
                    map.next_value_seed(EntriesSeed {
                        builder: &mut *self.builder,
                        failed: &mut *self.failed,
                    })?;
                }
                "version" | "entries" => {
                    return Err(de::Error::custom(format!("duplicate field `{key}`")));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        version.ok_or_else(|| de::Error::missing_field("version"))
    }
}

struct EntriesSeed<'a, 'c> {
    builder: &'a mut Builder<'c>,
    failed: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> std::result::Result<(), S::Error> {
        while let Some(entry) = seq.next_element::<TocEntry>()? {
            if let Err(e) = self.builder.push(&entry) {
                let text = e.to_string();
                *self.failed = Some(e);
                return Err(de::Error::custom(text));
            }
        }
        Ok(())
    }
}

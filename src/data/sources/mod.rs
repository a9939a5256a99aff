//! Source readers: each turns its dataset's published records into interactions (one prompt with
//! the completions labelled desirable or undesirable), reporting bad records to the tally.
pub mod generic;
pub mod hh_rlhf;
pub mod oasst;
pub mod shp;

use super::format::{Msg, Turns};
use super::reader::{Loc, RawRecord};
use super::report::{reason, Tally};
use anyhow::Result;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// One completion of an interaction with its KTO label and where it came from.
#[derive(Debug, Clone)]
pub struct Item {
    pub completion: Turns,
    pub label: bool,
    /// Which of the interaction's preference comparisons this completion is a side of (numbered
    /// from 0 within the interaction); None for an unpaired record.
    pub pair: Option<u32>,
    pub loc: Loc,
    pub field: String,
}

/// One prompt with its labelled completions (a preference pair contributes two).
#[derive(Debug, Clone)]
pub struct Interaction {
    pub prompt: Turns,
    pub items: Vec<Item>,
    /// Preference comparisons this interaction holds (0 for unpaired records).
    pub pairs: usize,
    /// The first record of the interaction.
    pub loc: Loc,
}

/// Groups records that share a prompt into one interaction, in order of first appearance: an
/// interaction is a prompt, so two records with the same prompt must not end up on both sides of
/// the train/validation split.
#[derive(Default)]
pub struct ByPrompt {
    buckets: HashMap<u64, Vec<usize>>,
    pub list: Vec<Interaction>,
}

impl ByPrompt {
    pub(crate) fn add(&mut self, prompt: Turns, items: Vec<Item>, pairs: usize, loc: &Loc) {
        if items.is_empty() {
            return;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        prompt.hash(&mut h);
        let bucket = self.buckets.entry(h.finish()).or_default();
        if let Some(&i) = bucket.iter().find(|&&i| self.list[i].prompt == prompt) {
            // The comparisons of a later record follow those already in the interaction.
            let offset = self.list[i].pairs as u32;
            let renumbered = items.into_iter().map(|mut it| {
                it.pair = it.pair.map(|k| k + offset);
                it
            });
            self.list[i].items.extend(renumbered);
            self.list[i].pairs += pairs;
            return;
        }
        bucket.push(self.list.len());
        self.list.push(Interaction {
            prompt,
            items,
            pairs,
            loc: loc.clone(),
        });
    }
}

/// A bad field: what to report.
pub struct Bad {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl Bad {
    pub fn new(field: impl Into<String>, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason,
            message: message.into(),
        }
    }

    pub fn report(self, tally: &mut Tally, loc: &Loc) -> Result<()> {
        tally.bad(loc, &self.field, self.reason, self.message)
    }
}

pub(crate) use crate::util::json::type_name;

/// The record as a JSON object, or the bad-record report for a line that is not one.
pub fn object(rec: &RawRecord) -> std::result::Result<&Map<String, Value>, Bad> {
    match &rec.value {
        Err(msg) => Err(Bad::new("(line)", reason::MALFORMED, msg.clone())),
        Ok(Value::Object(m)) => Ok(m),
        Ok(v) => Err(Bad::new(
            "(record)",
            reason::MALFORMED,
            format!("expected a JSON object, found {}", type_name(v)),
        )),
    }
}

pub fn field<'a>(obj: &'a Map<String, Value>, prefix: &str, key: &str) -> Result<&'a Value, Bad> {
    obj.get(key)
        .ok_or_else(|| Bad::new(join(prefix, key), reason::MISSING_FIELD, "missing"))
}

pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

pub(crate) fn str_field<'a>(
    obj: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<&'a str, Bad> {
    match field(obj, prefix, key)? {
        Value::String(s) => Ok(s),
        v => Err(Bad::new(
            join(prefix, key),
            reason::WRONG_TYPE,
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

/// An optional field: absent and null are both None.
pub fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A string or a list of `{role, content}` messages (TRL's standard and conversational formats).
pub(crate) fn turns(v: &Value, field: &str) -> Result<Turns, Bad> {
    match v {
        Value::String(s) => Ok(Turns::Text(s.clone())),
        Value::Array(list) => {
            let mut msgs = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let f = format!("{field}[{i}]");
                let Value::Object(o) = m else {
                    return Err(Bad::new(
                        f,
                        reason::WRONG_TYPE,
                        format!(
                            "expected a {{role, content}} message object, found {}",
                            type_name(m)
                        ),
                    ));
                };
                let role = str_field(o, &f, "role")?;
                let role = match role {
                    "system" | "user" | "assistant" => role,
                    other => {
                        return Err(Bad::new(
                            join(&f, "role"),
                            reason::BAD_VALUE,
                            format!("role `{other}`: allowed are system, user, assistant"),
                        ))
                    }
                };
                let content = str_field(o, &f, "content")?;
                msgs.push(Msg::new(role, content));
            }
            Ok(Turns::Messages(msgs))
        }
        v => Err(Bad::new(
            field,
            reason::WRONG_TYPE,
            format!(
                "expected a string or a list of messages, found {}",
                type_name(v)
            ),
        )),
    }
}

pub(crate) fn is_blank(t: &Turns) -> bool {
    match t {
        Turns::Text(s) | Turns::Dialogue(s) => s.trim().is_empty(),
        Turns::Messages(m) => m.iter().all(|m| m.content.trim().is_empty()),
    }
}

//! TRL's dataset formats: preference records (prompt, chosen, rejected) and unpaired KTO records
//! (prompt, completion, label, or a whole `messages` conversation with its label), each text a
//! string or a list of `{role, content}` messages; `columns` renames the fields.
use super::super::format::Turns;
use super::super::reader::RawRecord;
use super::super::report::{filter, reason, Tally};
use super::{field, is_blank, object, turns, type_name, Bad, ByPrompt, Interaction, Item};
use crate::config::SourceConfig;
use anyhow::Result;
use serde_json::Value;

/// TRL's `extract_prompt` for records without a prompt: the shared beginning of chosen and
/// rejected is the prompt (whole messages for conversations; characters for strings, leaving a
/// space that ends the shared part to the completions).
/// The prompt, or the record's error when it is empty (both record layouts skip such records).
fn non_blank_prompt(prompt: Turns, field: &str) -> Result<Turns, Bad> {
    if is_blank(&prompt) {
        return Err(Bad::new(
            field,
            reason::EMPTY_PROMPT,
            "the prompt is empty; record skipped",
        ));
    }
    Ok(prompt)
}

fn implicit_prompt(
    chosen: Turns,
    rejected: Turns,
    prompt_field: &str,
) -> Result<(Turns, Turns, Turns), Bad> {
    match (chosen, rejected) {
        (Turns::Messages(c), Turns::Messages(r)) => {
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if n == 0 {
                return Err(Bad::new(
                    prompt_field,
                    reason::MISSING_FIELD,
                    "missing, and chosen and rejected share no first message to take it from",
                ));
            }
            Ok((
                Turns::Messages(c[..n].to_vec()),
                Turns::Messages(c[n..].to_vec()),
                Turns::Messages(r[n..].to_vec()),
            ))
        }
        (Turns::Text(c), Turns::Text(r)) => {
            let mut cut = c
                .char_indices()
                .zip(r.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(c.len().min(r.len()));
            if cut > 0 && c[..cut].ends_with(' ') {
                cut -= 1;
            }
            if cut == 0 {
                return Err(Bad::new(
                    prompt_field,
                    reason::MISSING_FIELD,
                    "missing, and chosen and rejected share no beginning to take it from",
                ));
            }
            Ok((
                Turns::Text(c[..cut].to_string()),
                Turns::Text(c[cut..].to_string()),
                Turns::Text(r[cut..].to_string()),
            ))
        }
        _ => Err(Bad::new(
            "rejected",
            reason::WRONG_TYPE,
            "chosen and rejected must both be strings or both message lists",
        )),
    }
}

pub(crate) fn load_preference(
    records: Vec<RawRecord>,
    src: &SourceConfig,
    tally: &mut Tally,
) -> Result<Vec<Interaction>> {
    let (p, c, r) = (
        src.column("prompt"),
        src.column("chosen"),
        src.column("rejected"),
    );
    let mut group = ByPrompt::default();
    for rec in records {
        tally.records_read += 1;
        let loc = &rec.loc;
        let parsed = (|| -> Result<(Turns, Turns, Turns), Bad> {
            let obj = object(&rec)?;
            let chosen = turns(field(obj, "", c)?, c)?;
            let rejected = turns(field(obj, "", r)?, r)?;
            let (prompt, chosen, rejected) = match obj.get(p) {
                None => implicit_prompt(chosen, rejected, p)?,
                Some(v) => (turns(v, p)?, chosen, rejected),
            };
            Ok((non_blank_prompt(prompt, p)?, chosen, rejected))
        })();
        let (prompt, chosen, rejected) = match parsed {
            Ok(t) => t,
            Err(b) => {
                b.report(tally, loc)?;
                continue;
            }
        };
        if chosen == rejected {
            tally.filtered(filter::IDENTICAL_COMPLETIONS, 1);
            continue;
        }
        let mut items = Vec::with_capacity(2);
        for (c, label, f) in [(chosen, true, c), (rejected, false, r)] {
            if is_blank(&c) {
                Bad::new(
                    f,
                    reason::EMPTY_COMPLETION,
                    "the completion is empty; this example is skipped",
                )
                .report(tally, loc)?;
                continue;
            }
            items.push(Item {
                completion: c,
                label,
                pair: Some(0),
                loc: loc.clone(),
                field: f.to_string(),
            });
        }
        group.add(prompt, items, 1, loc);
    }
    Ok(group.list)
}

pub(crate) fn load_unpaired(
    records: Vec<RawRecord>,
    src: &SourceConfig,
    tally: &mut Tally,
) -> Result<Vec<Interaction>> {
    let mut group = ByPrompt::default();
    let (p, c, l) = (
        src.column("prompt"),
        src.column("completion"),
        src.column("label"),
    );
    let messages = src.column("messages");
    for rec in records {
        tally.records_read += 1;
        let loc = &rec.loc;
        let parsed = (|| -> Result<(Turns, Turns, bool), Bad> {
            let obj = object(&rec)?;
            let (prompt, completion) = match (obj.get(p), obj.get(messages)) {
                (None, Some(m)) => split_messages(turns(m, messages)?, messages)?,
                _ => (turns(field(obj, "", p)?, p)?, turns(field(obj, "", c)?, c)?),
            };
            let label = match field(obj, "", l)? {
                Value::Bool(b) => *b,
                v => {
                    return Err(Bad::new(
                        l,
                        reason::WRONG_TYPE,
                        format!(
                            "expected a boolean (true = desirable), found {}",
                            type_name(v)
                        ),
                    ))
                }
            };
            Ok((non_blank_prompt(prompt, p)?, completion, label))
        })();
        let (prompt, completion, label) = match parsed {
            Ok(t) => t,
            Err(b) => {
                b.report(tally, loc)?;
                continue;
            }
        };
        if is_blank(&completion) {
            Bad::new(
                c,
                reason::EMPTY_COMPLETION,
                "the completion is empty; record skipped",
            )
            .report(tally, loc)?;
            continue;
        }
        let item = Item {
            completion,
            label,
            pair: None,
            loc: loc.clone(),
            field: c.to_string(),
        };
        group.add(prompt, vec![item], 0, loc);
    }
    Ok(group.list)
}

/// A `messages` record (a whole conversation with its label): the completion is the final
/// assistant turn, the prompt everything before it.
fn split_messages(conversation: Turns, field: &str) -> Result<(Turns, Turns), Bad> {
    let Turns::Messages(msgs) = conversation else {
        return Err(Bad::new(
            field,
            reason::WRONG_TYPE,
            "expected a list of {role, content} messages",
        ));
    };
    match msgs.last() {
        Some(last) if last.role == "assistant" && msgs.len() >= 2 => {
            let n = msgs.len() - 1;
            Ok((
                Turns::Messages(msgs[..n].to_vec()),
                Turns::Messages(msgs[n..].to_vec()),
            ))
        }
        _ => Err(Bad::new(
            field,
            reason::BAD_VALUE,
            "the conversation must end with an assistant message (the completion) after at \
             least one other message (the prompt)",
        )),
    }
}

//! Anthropic HH-RLHF: `{"chosen": dialogue, "rejected": dialogue}` per record.
//!
//! The prompt is the dialogue up to and including its last `\n\nAssistant:`; the completions are
//! the text after it (with its leading space, as TRL keeps it). Rule for records whose two
//! dialogues differ before the last reply: such a record compares replies to different
//! conversations, so it is not a preference pair; it is skipped and counted as `prompt_mismatch`.
use super::super::format::{Turns, ASSISTANT};
use super::super::reader::RawRecord;
use super::super::report::{filter, reason, Tally};
use super::{object, str_field, Bad, ByPrompt, Interaction, Item};
use anyhow::Result;

/// Splits a dialogue after its last `\n\nAssistant:` into (prompt, final reply).
pub fn split_last_reply(dialogue: &str) -> Option<(&str, &str)> {
    let i = dialogue.rfind(ASSISTANT)? + ASSISTANT.len();
    Some((&dialogue[..i], &dialogue[i..]))
}

pub fn load(records: Vec<RawRecord>, tally: &mut Tally) -> Result<Vec<Interaction>> {
    let mut group = ByPrompt::default();
    for rec in records {
        tally.records_read += 1;
        let loc = &rec.loc;
        let obj = match object(&rec) {
            Ok(o) => o,
            Err(b) => {
                b.report(tally, loc)?;
                continue;
            }
        };
        let (chosen, rejected) =
            match (str_field(obj, "", "chosen"), str_field(obj, "", "rejected")) {
                (Ok(c), Ok(r)) => (c, r),
                (Err(b), _) | (_, Err(b)) => {
                    b.report(tally, loc)?;
                    continue;
                }
            };
        let no_turn = |f: &str| {
            Bad::new(
                f,
                reason::NO_ASSISTANT_TURN,
                "the dialogue has no \"\\n\\nAssistant:\" turn, so there is no reply to learn from",
            )
        };
        let Some((pc, cc)) = split_last_reply(chosen) else {
            no_turn("chosen").report(tally, loc)?;
            continue;
        };
        let Some((pr, cr)) = split_last_reply(rejected) else {
            no_turn("rejected").report(tally, loc)?;
            continue;
        };
        if pc != pr {
            let at = pc
                .char_indices()
                .zip(pr.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(pc.len().min(pr.len()));
            Bad::new(
                "rejected",
                reason::PROMPT_MISMATCH,
                format!(
                    "the chosen and rejected dialogues differ before their last reply (from byte {at}), \
                     so they do not share a prompt; record skipped"
                ),
            )
            .report(tally, loc)?;
            continue;
        }
        if cc == cr {
            tally.filtered(filter::IDENTICAL_COMPLETIONS, 1);
            continue;
        }
        let mut items = Vec::with_capacity(2);
        for (text, label, f) in [(cc, true, "chosen"), (cr, false, "rejected")] {
            if text.trim().is_empty() {
                Bad::new(
                    f,
                    reason::EMPTY_COMPLETION,
                    format!("the final reply is empty ({text:?}); this example is skipped"),
                )
                .report(tally, loc)?;
                continue;
            }
            items.push(Item {
                completion: Turns::Text(text.to_string()),
                label,
                pair: Some(0),
                loc: loc.clone(),
                field: f.to_string(),
            });
        }
        group.add(Turns::Dialogue(pc.to_string()), items, 1, loc);
    }
    Ok(group.list)
}

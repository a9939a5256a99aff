//! Stanford Human Preferences (SHP, SHP-2): one row per comment pair of a Reddit post.
//!
//! Row: post_id, domain, upvote_ratio, history (the post), c_root_id_A/B, created_at_utc_A/B,
//! score_A/B, human_ref_A/B (the comments), labels (1 = A preferred), seconds_difference,
//! score_ratio. One interaction is one post (post_id) with its comment pairs. The SHP authors'
//! recommendations are config keys: a minimum score_ratio (default 2) and at most N pairs per
//! post (default 5; the pairs with the highest score ratio are kept).
use super::super::format::{Msg, Turns};
use super::super::reader::RawRecord;
use super::super::report::{filter, reason, Tally};
use super::{field, object, str_field, type_name, Bad, Interaction, Item};
use crate::config::SourceConfig;
use anyhow::Result;
use serde_json::Value;
use std::collections::HashMap;

struct Pair {
    ratio: f64,
    items: [Item; 2],
    complete: bool,
}

struct Post {
    history: String,
    loc: super::super::reader::Loc,
    pairs: Vec<Pair>,
}

pub fn load(
    records: Vec<RawRecord>,
    src: &SourceConfig,
    tally: &mut Tally,
) -> Result<Vec<Interaction>> {
    let min_ratio = src.min_score_ratio();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut posts: Vec<Post> = Vec::new();
    for rec in records {
        tally.records_read += 1;
        let loc = &rec.loc;
        let (post_id, history, pair) = match parse_row(&rec, min_ratio) {
            Err(b) => {
                b.report(tally, loc)?;
                continue;
            }
            Ok(None) => {
                tally.filtered(filter::SCORE_RATIO, 1);
                continue;
            }
            Ok(Some(p)) => p,
        };
        if pair.items[0].completion == pair.items[1].completion {
            tally.filtered(filter::IDENTICAL_COMPLETIONS, 1);
            continue;
        }
        if !pair.complete {
            for it in &pair.items {
                if super::is_blank(&it.completion) {
                    Bad::new(
                        it.field.clone(),
                        reason::EMPTY_COMPLETION,
                        "the comment is empty; this example is skipped",
                    )
                    .report(tally, loc)?;
                }
            }
        }
        let i = *index.entry(post_id).or_insert_with(|| {
            posts.push(Post {
                history,
                loc: loc.clone(),
                pairs: Vec::new(),
            });
            posts.len() - 1
        });
        posts[i].pairs.push(pair);
    }
    let max_pairs = src.max_pairs_per_post();
    Ok(posts
        .into_iter()
        .filter_map(|post| post_interaction(post, max_pairs, tally))
        .collect())
}

/// (post_id, history, pair) of one row; None when its score ratio is below `min_ratio`.
fn parse_row(rec: &RawRecord, min_ratio: f64) -> Result<Option<(String, String, Pair)>, Bad> {
    let obj = object(rec)?;
    let post_id = str_field(obj, "", "post_id")?;
    let history = str_field(obj, "", "history")?;
    let a = str_field(obj, "", "human_ref_A")?;
    let b = str_field(obj, "", "human_ref_B")?;
    let a_wins = match field(obj, "", "labels")? {
        Value::Number(n) if n.as_i64() == Some(1) => true,
        Value::Number(n) if n.as_i64() == Some(0) => false,
        Value::Bool(x) => *x,
        Value::Number(n) => {
            return Err(Bad::new(
                "labels",
                reason::BAD_VALUE,
                format!("labels = {n}: must be 1 (A preferred) or 0 (B preferred)"),
            ))
        }
        v => {
            return Err(Bad::new(
                "labels",
                reason::WRONG_TYPE,
                format!("expected 0 or 1, found {}", type_name(v)),
            ))
        }
    };
    let ratio = match field(obj, "", "score_ratio")? {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        v => {
            return Err(Bad::new(
                "score_ratio",
                reason::WRONG_TYPE,
                format!("expected a number, found {}", type_name(v)),
            ))
        }
    };
    if history.trim().is_empty() {
        return Err(Bad::new(
            "history",
            reason::EMPTY_PROMPT,
            "the post text is empty; record skipped",
        ));
    }
    if ratio.is_nan() || ratio < min_ratio {
        return Ok(None);
    }
    let (good, good_f, bad, bad_f) = if a_wins {
        (a, "human_ref_A", b, "human_ref_B")
    } else {
        (b, "human_ref_B", a, "human_ref_A")
    };
    let item = |text: &str, label, f: &str| Item {
        completion: Turns::Messages(vec![Msg::new("assistant", text)]),
        label,
        pair: None, // numbered by post_interaction
        loc: rec.loc.clone(),
        field: f.to_string(),
    };
    Ok(Some((
        post_id.to_string(),
        history.to_string(),
        Pair {
            ratio,
            complete: !good.trim().is_empty() && !bad.trim().is_empty(),
            items: [item(good, true, good_f), item(bad, false, bad_f)],
        },
    )))
}

/// A post's interaction: at most `max_pairs` pairs (the highest score ratios), without empty
/// comments; None when nothing is left.
fn post_interaction(mut post: Post, max_pairs: usize, tally: &mut Tally) -> Option<Interaction> {
    if post.pairs.len() > max_pairs {
        // Stable: equal ratios keep file order.
        let mut order: Vec<usize> = (0..post.pairs.len()).collect();
        order.sort_by(|&x, &y| post.pairs[y].ratio.total_cmp(&post.pairs[x].ratio));
        let mut keep = vec![false; post.pairs.len()];
        order.iter().take(max_pairs).for_each(|&i| keep[i] = true);
        tally.filtered(filter::PAIRS_PER_POST, post.pairs.len() - max_pairs);
        let mut k = keep.into_iter();
        post.pairs.retain(|_| k.next().unwrap());
    }
    let pairs = post.pairs.len();
    let items: Vec<Item> = post
        .pairs
        .into_iter()
        .enumerate()
        .flat_map(|(k, p)| {
            p.items.map(|mut it| {
                it.pair = Some(k as u32);
                it
            })
        })
        .filter(|it| !super::is_blank(&it.completion))
        .collect();
    if items.is_empty() {
        return None;
    }
    Some(Interaction {
        prompt: Turns::Messages(vec![Msg::new("user", post.history)]),
        items,
        pairs,
        loc: post.loc,
    })
}

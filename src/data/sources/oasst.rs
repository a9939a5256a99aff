//! OpenAssistant (oasst1, oasst2): flat message rows or the nested message-trees export.
//!
//! A prompt is the conversation path from a tree's root to a prompter message; its ranked
//! assistant replies (rank 0 is best) give the pairs: every two with different ranks by default,
//! or the best against each worse one (`best_vs_rest`), or the best against the worst
//! (`best_vs_worst`). Messages failing the filters (deleted, review_result, lang) are left out
//! together with everything below them; a message whose parent is absent is skipped and counted
//! (`missing_parent`, checked before the filters), as are its descendants (`ancestor_skipped`).
use super::super::format::{Msg, Turns};
use super::super::reader::{Loc, RawRecord};
use super::super::report::{filter, reason, Tally};
use super::{join, object, opt, str_field, type_name, Bad, Interaction, Item};
use crate::config::{OasstPairs, ReviewFilter, SourceConfig};
use anyhow::Result;
use serde_json::{Map, Value};
use std::collections::HashMap;

struct Node {
    id: String,
    parent: Option<String>,
    assistant: bool,
    text: String,
    rank: Option<i64>,
    loc: Loc,
    /// The field path of this message inside its record (empty for flat rows).
    path: String,
    /// Why this message itself is left out by a filter.
    own_filter: Option<&'static str>,
}

struct Filters<'a> {
    langs: Option<&'a [String]>,
    include_deleted: bool,
    review: ReviewFilter,
}

fn parse_node(
    obj: &Map<String, Value>,
    path: &str,
    parent: Option<String>,
    flat: bool,
    f: &Filters,
    loc: &Loc,
) -> Result<Node, Bad> {
    let id = str_field(obj, path, "message_id")?.to_string();
    let parent = if flat {
        // Exports written with --exclude-nulls leave out a root's null parent_id.
        match opt(obj, "parent_id") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                return Err(Bad::new(
                    join(path, "parent_id"),
                    reason::WRONG_TYPE,
                    format!("expected a string or null, found {}", type_name(v)),
                ))
            }
        }
    } else {
        parent
    };
    let assistant = match str_field(obj, path, "role")? {
        "assistant" => true,
        "prompter" => false,
        other => {
            return Err(Bad::new(
                join(path, "role"),
                reason::BAD_VALUE,
                format!("role `{other}`: allowed are prompter, assistant"),
            ))
        }
    };
    let text = str_field(obj, path, "text")?;
    let rank = match opt(obj, "rank") {
        None => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        // pandas-written Parquet/JSON stores the nullable rank column as float (0.0, 1.0).
        Some(Value::Number(n)) if n.as_f64().is_some_and(|x| x.fract() == 0.0) => {
            n.as_f64().map(|x| x as i64)
        }
        Some(v) => {
            return Err(Bad::new(
                join(path, "rank"),
                reason::WRONG_TYPE,
                format!("expected an integer or null, found {}", type_name(v)),
            ))
        }
    };
    let flag = |key: &str| -> Result<Option<bool>, Bad> {
        match opt(obj, key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Bad::new(
                join(path, key),
                reason::WRONG_TYPE,
                format!("expected a boolean or null, found {}", type_name(v)),
            )),
        }
    };
    let deleted = flag("deleted")?.unwrap_or(false);
    let review = flag("review_result")?;
    let lang = match opt(obj, "lang") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(v) => {
            return Err(Bad::new(
                join(path, "lang"),
                reason::WRONG_TYPE,
                format!("expected a string, found {}", type_name(v)),
            ))
        }
    };
    if text.trim().is_empty() {
        let r = if assistant {
            reason::EMPTY_COMPLETION
        } else {
            reason::EMPTY_PROMPT
        };
        return Err(Bad::new(
            join(path, "text"),
            r,
            "the message text is empty; message skipped",
        ));
    }
    let own_filter = if deleted && !f.include_deleted {
        Some(filter::DELETED)
    } else if match f.review {
        ReviewFilter::Passed => review != Some(true),
        ReviewFilter::NotFailed => review == Some(false),
        ReviewFilter::Any => false,
    } {
        Some(filter::REVIEW)
    } else if f
        .langs
        .is_some_and(|ls| !lang.is_some_and(|l| ls.iter().any(|x| x == l)))
    {
        Some(filter::LANG)
    } else {
        None
    };
    Ok(Node {
        id,
        parent,
        assistant,
        text: text.to_string(),
        rank,
        loc: loc.clone(),
        path: path.to_string(),
        own_filter,
    })
}

/// A message-trees record: `{"message_tree_id", "tree_state", "prompt": {message, "replies": [...]}}`.
fn parse_tree(
    prompt: &Map<String, Value>,
    f: &Filters,
    loc: &Loc,
    nodes: &mut Vec<Node>,
    tally: &mut Tally,
) -> Result<()> {
    // Depth-first, parents before children; a bad message takes its subtree with it.
    let mut stack: Vec<(&Map<String, Value>, String, Option<String>)> =
        vec![(prompt, "prompt".to_string(), None)];
    while let Some((obj, path, parent)) = stack.pop() {
        let node = match parse_node(obj, &path, parent, false, f, loc) {
            Ok(n) => n,
            Err(b) => {
                b.report(tally, loc)?;
                let below = count_below(obj);
                tally.filtered(filter::ANCESTOR_SKIPPED, below);
                continue;
            }
        };
        let id = node.id.clone();
        nodes.push(node);
        if let Some(replies) = opt(obj, "replies") {
            let Value::Array(list) = replies else {
                Bad::new(
                    join(&path, "replies"),
                    reason::WRONG_TYPE,
                    format!("expected an array, found {}", type_name(replies)),
                )
                .report(tally, loc)?;
                continue;
            };
            for (i, r) in list.iter().enumerate().rev() {
                let rp = format!("{path}.replies[{i}]");
                match r {
                    Value::Object(o) => stack.push((o, rp, Some(id.clone()))),
                    v => Bad::new(
                        rp,
                        reason::WRONG_TYPE,
                        format!("expected a message object, found {}", type_name(v)),
                    )
                    .report(tally, loc)?,
                }
            }
        }
    }
    Ok(())
}

fn count_below(obj: &Map<String, Value>) -> usize {
    match obj.get("replies") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|r| r.as_object().map_or(1, |o| 1 + count_below(o)))
            .sum(),
        _ => 0,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Unknown,
    Visiting,
    Usable,
    Skipped,
}

pub fn load(
    records: Vec<RawRecord>,
    src: &SourceConfig,
    tally: &mut Tally,
) -> Result<Vec<Interaction>> {
    let filters = Filters {
        langs: src.langs.as_deref(),
        include_deleted: src.include_deleted(),
        review: src.review_filter(),
    };
    let (nodes, bad_ids) = read_nodes(records, &filters, tally)?;
    let tree = Tree::new(&nodes, tally)?;
    let state = tree.usable(&bad_ids, tally);
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, st) in state.iter().enumerate() {
        if *st == State::Usable {
            if let Some(Some(p)) = tree.parent_of(i) {
                children.entry(p).or_default().push(i);
            }
        }
    }
    let mut out = Vec::new();
    for (p, node) in nodes.iter().enumerate() {
        if node.assistant || state[p] != State::Usable {
            continue;
        }
        let replies = children.get(&p).map(Vec::as_slice).unwrap_or_default();
        let mut pairs = ranked_pairs(&nodes, replies, src.oasst_pairs());
        let before = pairs.len();
        pairs.retain(|&(a, b)| nodes[a].text != nodes[b].text);
        tally.filtered(filter::IDENTICAL_COMPLETIONS, before - pairs.len());
        if !pairs.is_empty() {
            out.push(tree.interaction(p, &pairs));
        }
    }
    Ok(out)
}

/// Every message of the records (flat rows, or trees flattened), and the ids of messages that
/// were themselves bad records (their replies are counted as ancestor_skipped, not as orphans).
fn read_nodes(
    records: Vec<RawRecord>,
    filters: &Filters,
    tally: &mut Tally,
) -> Result<(Vec<Node>, std::collections::HashSet<String>)> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut bad_ids: std::collections::HashSet<String> = Default::default();
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
        if let Some(prompt) = obj
            .get("prompt")
            .filter(|_| !obj.contains_key("message_id"))
        {
            match prompt {
                Value::Object(p) => parse_tree(p, filters, loc, &mut nodes, tally)?,
                v => Bad::new(
                    "prompt",
                    reason::WRONG_TYPE,
                    format!("expected a message object, found {}", type_name(v)),
                )
                .report(tally, loc)?,
            }
            continue;
        }
        match parse_node(obj, "", None, true, filters, loc) {
            Ok(n) => nodes.push(n),
            Err(b) => {
                if let Some(Value::String(id)) = obj.get("message_id") {
                    bad_ids.insert(id.clone());
                }
                b.report(tally, loc)?
            }
        }
    }
    Ok((nodes, bad_ids))
}

/// The messages linked by their parent ids; a repeated message_id is reported, and its later
/// occurrences take no part.
struct Tree<'a> {
    nodes: &'a [Node],
    by_id: HashMap<&'a str, usize>,
    duplicate: Vec<bool>,
}

impl<'a> Tree<'a> {
    fn new(nodes: &'a [Node], tally: &mut Tally) -> Result<Self> {
        let mut by_id: HashMap<&str, usize> = HashMap::with_capacity(nodes.len());
        let mut duplicate = vec![false; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            if by_id.contains_key(n.id.as_str()) {
                duplicate[i] = true;
            } else {
                by_id.insert(&n.id, i);
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            if duplicate[i] {
                Bad::new(
                    join(&n.path, "message_id"),
                    reason::BAD_VALUE,
                    format!(
                        "message_id {} appears twice; the later one is skipped",
                        n.id
                    ),
                )
                .report(tally, &n.loc)?;
            }
        }
        Ok(Self {
            nodes,
            by_id,
            duplicate,
        })
    }

    /// None for a root; Some(None) when the parent id names no message.
    fn parent_of(&self, i: usize) -> Option<Option<usize>> {
        self.nodes[i]
            .parent
            .as_deref()
            .map(|p| self.by_id.get(p).copied())
    }

    /// Whether each message's whole path to the root is present and passes the filters; each
    /// left-out message is counted once, under its first reason.
    fn usable(&self, bad_ids: &std::collections::HashSet<String>, tally: &mut Tally) -> Vec<State> {
        let nodes = self.nodes;
        let mut state = vec![State::Unknown; nodes.len()];
        for start in 0..nodes.len() {
            if self.duplicate[start] || state[start] != State::Unknown {
                continue;
            }
            let mut chain = vec![start];
            state[start] = State::Visiting;
            // Walk up until a message whose state is known (or a root / a missing parent).
            let (top, why) = loop {
                let i = *chain.last().unwrap();
                // An absent parent is checked before the filters: a message that cannot be
                // placed in its tree is counted as such even when a filter would also leave it
                // out.
                let parent = self.parent_of(i);
                if parent == Some(None) {
                    let why = if bad_ids.contains(nodes[i].parent.as_deref().unwrap_or("")) {
                        filter::ANCESTOR_SKIPPED
                    } else {
                        filter::MISSING_PARENT
                    };
                    break (i, Some(why));
                }
                if let Some(r) = nodes[i].own_filter {
                    break (i, Some(r));
                }
                match parent {
                    None => break (i, None),
                    Some(None) => unreachable!("handled above"),
                    Some(Some(p)) => match state[p] {
                        State::Usable => break (i, None),
                        State::Skipped => break (i, Some(filter::ANCESTOR_SKIPPED)),
                        // A cycle in parent links cannot reach a root.
                        State::Visiting => break (i, Some(filter::MISSING_PARENT)),
                        State::Unknown => {
                            state[p] = State::Visiting;
                            chain.push(p);
                        }
                    },
                }
            };
            // The top of the chain gets its own verdict; everything below it inherits it.
            for &i in &chain {
                state[i] = if why.is_some() {
                    State::Skipped
                } else {
                    State::Usable
                };
                if let Some(r) = why {
                    let r = if i == top {
                        r
                    } else {
                        filter::ANCESTOR_SKIPPED
                    };
                    tally.filtered(r, 1);
                }
            }
        }
        state
    }

    /// The interaction of prompter message `p`: the conversation from the root to it, and the
    /// pairs of its replies (better one desirable).
    fn interaction(&self, p: usize, pairs: &[(usize, usize)]) -> Interaction {
        let nodes = self.nodes;
        let mut path = vec![p];
        while let Some(Some(q)) = self.parent_of(*path.last().unwrap()) {
            path.push(q);
        }
        let prompt: Vec<Msg> = path
            .iter()
            .rev()
            .map(|&i| {
                let role = if nodes[i].assistant {
                    "assistant"
                } else {
                    "user"
                };
                Msg::new(role, nodes[i].text.clone())
            })
            .collect();
        let item = |c: usize, label: bool, k: usize| Item {
            completion: Turns::Messages(vec![Msg::new("assistant", nodes[c].text.clone())]),
            label,
            pair: Some(k as u32),
            loc: nodes[c].loc.clone(),
            field: join(&nodes[c].path, "text"),
        };
        let items = pairs
            .iter()
            .enumerate()
            .flat_map(|(k, &(a, b))| [item(a, true, k), item(b, false, k)])
            .collect();
        Interaction {
            prompt: Turns::Messages(prompt),
            items,
            pairs: pairs.len(),
            loc: nodes[p].loc.clone(),
        }
    }
}

/// (better, worse) reply pairs by rank (rank 0 is best), as `mode` selects them.
fn ranked_pairs(nodes: &[Node], replies: &[usize], mode: OasstPairs) -> Vec<(usize, usize)> {
    let mut ranked: Vec<usize> = replies
        .iter()
        .copied()
        .filter(|&c| nodes[c].assistant && nodes[c].rank.is_some())
        .collect();
    // Stable: equal ranks keep file order.
    ranked.sort_by_key(|&c| nodes[c].rank);
    let rank = |c: usize| nodes[c].rank.unwrap();
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    if let (Some(&first), Some(&last)) = (ranked.first(), ranked.last()) {
        let (best, worst) = (rank(first), rank(last));
        for (x, &a) in ranked.iter().enumerate() {
            for &b in &ranked[x + 1..] {
                let keep = rank(a) < rank(b)
                    && match mode {
                        OasstPairs::All => true,
                        OasstPairs::BestVsRest => rank(a) == best,
                        OasstPairs::BestVsWorst => rank(a) == best && rank(b) == worst,
                    };
                if keep {
                    pairs.push((a, b));
                }
            }
        }
    }
    pairs
}

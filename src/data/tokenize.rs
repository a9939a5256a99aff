//! Tokenization as TRL does it: prompt and completion encoded separately without special tokens,
//! EOS appended to the completion. The final cut of prompt + completion to max_length is left to
//! the batcher, because TRL cuts after the KL completions are rotated.
use super::fasttok::{FastEncoder, WordCache};
use super::format::Renderer;
use super::report::{drop, reason};
use super::sources::Interaction;
use anyhow::Result;
use rayon::prelude::*;

pub struct Limits {
    pub eos: u32,
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
}

pub struct TokItem {
    pub completion_ids: Vec<u32>,
    pub label: bool,
    pub pair: Option<u32>,
}

pub struct TokInteraction {
    pub prompt_ids: Vec<u32>,
    pub items: Vec<TokItem>,
    pub pairs: usize,
}

/// A bad-input report produced in parallel, filed in order afterwards.
pub struct LateIssue {
    pub loc: super::reader::Loc,
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

pub struct Outcome {
    pub kept: Option<TokInteraction>,
    pub issues: Vec<LateIssue>,
    pub dropped: Vec<(&'static str, usize)>,
}

fn one(
    it: &Interaction,
    r: &Renderer,
    enc: &FastEncoder,
    cache: &mut WordCache,
    lim: &Limits,
) -> Result<Outcome> {
    let mut out = Outcome {
        kept: None,
        issues: Vec::new(),
        dropped: Vec::new(),
    };
    let prompt = match r.prompt(&it.prompt) {
        Ok(p) => p,
        Err(e) => {
            out.issues.push(LateIssue {
                loc: it.loc.clone(),
                field: "prompt".into(),
                reason: reason::TEMPLATE,
                message: format!("{e:#}; the interaction is skipped"),
            });
            return Ok(out);
        }
    };
    let mut prompt_ids = enc.encode(&prompt.text, cache)?;
    if let Some(m) = lim.max_prompt_length {
        if prompt_ids.len() > m {
            // Keep the end: it holds the turn the completion answers.
            prompt_ids.drain(..prompt_ids.len() - m);
        }
    }
    if prompt_ids.len() >= lim.max_length {
        out.dropped.push((drop::PROMPT_TOO_LONG, it.items.len()));
        return Ok(out);
    }
    let mut items = Vec::with_capacity(it.items.len());
    for item in &it.items {
        let text = match r.completion(&prompt, &item.completion) {
            Ok(t) => t,
            Err(e) => {
                out.issues.push(LateIssue {
                    loc: item.loc.clone(),
                    field: item.field.clone(),
                    reason: reason::TEMPLATE,
                    message: format!("{e:#}; this example is skipped"),
                });
                continue;
            }
        };
        let mut ids = enc.encode(&text, cache)?;
        ids.push(lim.eos);
        if let Some(m) = lim.max_completion_length {
            ids.truncate(m);
        }
        items.push(TokItem {
            completion_ids: ids,
            label: item.label,
            pair: item.pair,
        });
    }
    if !items.is_empty() {
        out.kept = Some(TokInteraction {
            prompt_ids,
            items,
            pairs: it.pairs,
        });
    }
    Ok(out)
}

/// Tokenizes interactions in parallel, results in input order. Each parallel chunk keeps its own
/// word cache (no locking); chunks are large enough for the cache to pay off.
pub(crate) fn tokenize_all(
    its: &[Interaction],
    r: &Renderer,
    enc: &FastEncoder,
    lim: &Limits,
) -> Result<Vec<Outcome>> {
    let chunk = (its.len() / (rayon::current_num_threads() * 4)).max(64);
    let parts: Vec<Vec<Outcome>> = its
        .par_chunks(chunk)
        .map(|part| {
            let mut cache = WordCache::default();
            part.iter()
                .map(|it| one(it, r, enc, &mut cache, lim))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    Ok(parts.into_iter().flatten().collect())
}

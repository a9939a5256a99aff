//! Encoding without special tokens, `Tokenizer::encode(text, false)` ids exactly, faster.
//!
//! For byte-level BPE tokenizers (GPT-2's pre-tokenizer, optionally after a digit split, as in
//! SmolLM2, StarCoder, GPT-2, Qwen-1.x-style configs) most of `encode`'s time goes to bookkeeping
//! this pipeline never reads: per-byte offset alignments, an `Encoding` with offsets and token
//! strings per token, and fancy-regex backtracking for one lookahead. This encoder does the same
//! steps directly: split on added tokens (leftmost-longest, like tokenizers' Aho-Corasick pass),
//! split digits, split with the GPT-2 pattern (its `\s+(?!\S)` rewritten as `\s+` minus the last
//! character when a non-space follows, which is what the backtracking does), map bytes to
//! GPT-2's byte alphabet, and run the tokenizer's own BPE model on each word, remembering words
//! already seen. Any other configuration (a normalizer, another pre-tokenizer, BPE dropout, added
//! tokens with strip or single-word rules) uses `encode` itself. Tests compare both on the
//! samples.
use anyhow::{anyhow, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use tokenizers::{Model, Tokenizer};

/// Per-thread memory of encoded words (keyed by the word before byte mapping).
#[derive(Default)]
pub struct WordCache {
    map: HashMap<String, Vec<u32>>,
}

/// Bounds the memory a cache holds; natural text reuses far fewer distinct words.
const MAX_CACHED_WORDS: usize = 200_000;

struct Plan {
    /// Some(individual) when a Digits pre-tokenizer precedes the byte-level one.
    digits: Option<bool>,
    /// Added tokens matched on the raw text, then those matched on the remaining pieces
    /// (tokenizers' non-normalized and normalized passes; there is no normalizer here).
    added: [Option<(Regex, HashMap<String, u32>)>; 2],
    split: Regex,
    byte_char: [char; 256],
}

pub struct FastEncoder<'a> {
    tok: &'a Tokenizer,
    plan: Option<Plan>,
}

/// GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n.
fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    map
}

fn is_gpt2_byte_level(v: &Value) -> bool {
    v["type"] == "ByteLevel" && v["add_prefix_space"] == false && v["use_regex"] != false
}

/// Reads the pre-tokenizer's shape from its serialized form (Sequence's parts are private).
fn digits_then_byte_level(pt: &Value) -> Option<Option<bool>> {
    if is_gpt2_byte_level(pt) {
        return Some(None);
    }
    if pt["type"] != "Sequence" {
        return None;
    }
    let parts = pt["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [b] if is_gpt2_byte_level(b) => Some(None),
        [d, b] if d["type"] == "Digits" && is_gpt2_byte_level(b) => {
            Some(Some(d["individual_digits"].as_bool()?))
        }
        _ => None,
    }
}

fn added_matcher(tokens: &[(String, u32)]) -> Option<(Regex, HashMap<String, u32>)> {
    if tokens.is_empty() {
        return None;
    }
    let mut sorted: Vec<&(String, u32)> = tokens.iter().collect();
    // Longest first: a leftmost-first alternation of literals is then leftmost-longest.
    sorted.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    let pattern = sorted
        .iter()
        .map(|(c, _)| regex::escape(c))
        .collect::<Vec<_>>()
        .join("|");
    let re = Regex::new(&pattern).ok()?;
    Some((re, tokens.iter().cloned().collect()))
}

fn plan_for(tok: &Tokenizer) -> Option<Plan> {
    if tok.get_normalizer().is_some() || tok.get_encode_special_tokens() {
        return None;
    }
    let tokenizers::ModelWrapper::BPE(bpe) = tok.get_model() else {
        return None;
    };
    if bpe.dropout.is_some_and(|d| d > 0.0) {
        return None;
    }
    let pt = serde_json::to_value(tok.get_pre_tokenizer()?).ok()?;
    let digits = digits_then_byte_level(&pt)?;
    let mut passes: [Vec<(String, u32)>; 2] = [Vec::new(), Vec::new()];
    for (id, t) in tok.get_added_tokens_decoder() {
        if t.single_word || t.lstrip || t.rstrip || t.content.is_empty() {
            return None;
        }
        passes[usize::from(t.normalized)].push((t.content.clone(), id));
    }
    let split =
        Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+").ok()?;
    Some(Plan {
        digits,
        added: [added_matcher(&passes[0]), added_matcher(&passes[1])],
        split,
        byte_char: byte_chars(),
    })
}

impl<'a> FastEncoder<'a> {
    /// `tok` must have no truncation or padding (they do not apply to single words anyway, but
    /// the fallback path calls `encode`).
    pub fn new(tok: &'a Tokenizer) -> Self {
        FastEncoder {
            tok,
            plan: plan_for(tok),
        }
    }

    /// Whether the direct path is used (false: `Tokenizer::encode_fast`).
    pub fn is_fast(&self) -> bool {
        self.plan.is_some()
    }

    /// The ids of `tokenizer.encode(text, false)`.
    pub fn encode(&self, text: &str, cache: &mut WordCache) -> Result<Vec<u32>> {
        let Some(plan) = &self.plan else {
            return self
                .tok
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow!("tokenizer failed: {e}"));
        };
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.added_pass(plan, 0, text, cache, &mut out)?;
        Ok(out)
    }

    fn added_pass(
        &self,
        plan: &Plan,
        pass: usize,
        text: &str,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if pass == plan.added.len() {
            return self.pieces(plan, text, cache, out);
        }
        let Some((re, ids)) = &plan.added[pass] else {
            return self.added_pass(plan, pass + 1, text, cache, out);
        };
        let mut last = 0;
        for m in re.find_iter(text) {
            if m.start() > last {
                self.added_pass(plan, pass + 1, &text[last..m.start()], cache, out)?;
            }
            out.push(ids[m.as_str()]);
            last = m.end();
        }
        if last < text.len() {
            self.added_pass(plan, pass + 1, &text[last..], cache, out)?;
        }
        Ok(())
    }

    /// The Digits split (Isolated: each digit alone; Contiguous: digit runs), then the regex.
    fn pieces(
        &self,
        plan: &Plan,
        text: &str,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let Some(individual) = plan.digits else {
            return self.words(plan, text, cache, out);
        };
        let mut start = 0;
        let mut iter = text.char_indices().peekable();
        while let Some((i, c)) = iter.next() {
            if !c.is_numeric() {
                continue;
            }
            if i > start {
                self.words(plan, &text[start..i], cache, out)?;
            }
            let mut end = i + c.len_utf8();
            if !individual {
                while let Some(&(j, d)) = iter.peek() {
                    if !d.is_numeric() {
                        break;
                    }
                    end = j + d.len_utf8();
                    iter.next();
                }
            }
            self.words(plan, &text[i..end], cache, out)?;
            start = end;
        }
        if start < text.len() {
            self.words(plan, &text[start..], cache, out)?;
        }
        Ok(())
    }

    fn words(
        &self,
        plan: &Plan,
        text: &str,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < text.len() {
            let (start, mut end) = match plan.split.find_at(text, pos) {
                Some(m) => (m.start(), m.end()),
                None => (text.len(), text.len()),
            };
            if start > pos {
                // The pattern covers every character; kept for safety, as tokenizers would.
                self.word(plan, &text[pos..start], cache, out)?;
            }
            if start == end {
                break;
            }
            let m = &text[start..end];
            if end < text.len()
                && m.starts_with(char::is_whitespace)
                && m.chars().all(char::is_whitespace)
            {
                // `\s+(?!\S)`: a whitespace run followed by a non-space gives up its last
                // character (to the next word, ` ?\p{L}+` and the like); a single one stays.
                let last = m.char_indices().last().map(|(i, _)| i).unwrap_or(0);
                if last > 0 {
                    end = start + last;
                }
            }
            self.word(plan, &text[start..end], cache, out)?;
            pos = end;
        }
        Ok(())
    }

    fn word(
        &self,
        plan: &Plan,
        word: &str,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(ids) = cache.map.get(word) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        let mapped: String = word.bytes().map(|b| plan.byte_char[b as usize]).collect();
        let ids: Vec<u32> = self
            .tok
            .get_model()
            .tokenize(&mapped)
            .map_err(|e| anyhow!("tokenizer failed on {word:?}: {e}"))?
            .into_iter()
            .map(|t| t.id)
            .collect();
        out.extend_from_slice(&ids);
        if cache.map.len() >= MAX_CACHED_WORDS {
            cache.map.clear();
        }
        cache.map.insert(word.to_string(), ids);
        Ok(())
    }
}

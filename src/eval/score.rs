//! `kto-train score`: completion log-probs of JSONL records with the same code training uses.
use crate::model::logprobs::{completion_logps, Sequence};
use crate::model::{Llama, PassMode};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;

/// One record of the input: text or token ids.
fn parse_record(
    v: &Value,
    tok: Option<&tokenizers::Tokenizer>,
    append_eos: Option<u32>,
    where_: &str,
) -> Result<Sequence> {
    let ids = |k: &str| -> Result<Option<Vec<u32>>> {
        match v.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&n| n <= u32::MAX as u64)
                        .map(|n| n as u32)
                        .with_context(|| format!("{where_}: field `{k}` must hold token ids"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => bail!("{where_}: field `{k}` must be a list of token ids"),
        }
    };
    let text = |k: &str| -> Result<Option<String>> {
        match v.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => bail!("{where_}: field `{k}` must be a string"),
        }
    };
    let (prompt, mut completion) = match (ids("prompt_ids")?, ids("completion_ids")?) {
        (Some(p), Some(c)) => (p, c),
        (None, None) => {
            let p = text("prompt")?.with_context(|| {
                format!("{where_}: missing field `prompt` (or `prompt_ids` and `completion_ids`)")
            })?;
            let c = text("completion")?
                .with_context(|| format!("{where_}: missing field `completion`"))?;
            let tok = tok.with_context(|| format!("{where_}: text records need a tokenizer"))?;
            let enc = |s: &str| -> Result<Vec<u32>> {
                Ok(tok
                    .encode(s, false)
                    .map_err(|e| anyhow::anyhow!("{where_}: cannot tokenize: {e}"))?
                    .get_ids()
                    .to_vec())
            };
            (enc(&p)?, enc(&c)?)
        }
        (Some(_), None) => bail!("{where_}: missing field `completion_ids`"),
        (None, Some(_)) => bail!("{where_}: missing field `prompt_ids`"),
    };
    if let Some(e) = append_eos {
        completion.push(e);
    }
    Ok(Sequence {
        prompt_len: prompt.len(),
        tokens: prompt.into_iter().chain(completion).collect(),
    })
}

/// Reads `input` (JSONL), scores every record, writes one JSON line per record to `out`.
pub fn score_jsonl(
    model: &Llama,
    tok: Option<&tokenizers::Tokenizer>,
    input: &Path,
    out: &mut dyn Write,
    batch_size: usize,
    append_eos: Option<u32>,
) -> Result<usize> {
    let f = std::fs::File::open(input)
        .with_context(|| format!("cannot open input {}", input.display()))?;
    let mut seqs = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{}:{}", input.display(), i + 1);
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{where_}: not valid JSON"))?;
        let s = parse_record(&v, tok, append_eos, &where_)?;
        let vocab = model.cfg().vocab_size;
        if let Some(id) = s.tokens.iter().find(|&&id| id as usize >= vocab) {
            bail!(
                "{where_}: token id {id} is outside the model's vocabulary ({vocab} tokens: ids 0 to {})",
                vocab - 1
            );
        }
        if s.tokens.len() > model.cfg().max_position_embeddings {
            bail!(
                "{where_}: {} tokens exceed the model's max_position_embeddings {}",
                s.tokens.len(),
                model.cfg().max_position_embeddings
            );
        }
        seqs.push(s);
    }
    for chunk in seqs.chunks(batch_size.max(1)) {
        let lp = completion_logps(model, chunk, PassMode::POLICY_EVAL, false)?;
        let tokens: Vec<f64> = lp.token_logps.to_dtype(DType::F64)?.to_vec1()?;
        let mut k = 0;
        for c in &lp.counts {
            let t = &tokens[k..k + c];
            k += c;
            let line = serde_json::json!({
                "logp": t.iter().sum::<f64>(),
                "token_logps": t,
                "n_tokens": c,
            });
            writeln!(out, "{line}")?;
        }
    }
    Ok(seqs.len())
}

//! Text generation with a KV cache: greedy (temperature 0, as transformers' `do_sample=False`) or
//! sampled with temperature and nucleus (top-p) filtering, stopping at an end-of-sequence token or
//! after `max_new_tokens`. The prompt is run once; each new token then costs one position.
use crate::data::{ChatTemplate, Msg};
use crate::model::{Llama, PassMode};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0: greedy. Otherwise logits / temperature are sampled.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1: all).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these (the token itself is part of the output).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 42,
            stop_ids: Vec::new(),
        }
    }
}

/// A prompt as generation takes it.
pub enum Prompt {
    /// Encoded as it is, with the tokenizer's special tokens (as a transformers pipeline does).
    Text(String),
    /// Rendered with the chat template and its generation prompt; the rendered text carries its
    /// special tokens, so it is encoded without adding any.
    Messages(Vec<Msg>),
}

/// What [`complete`] returns.
pub struct Completion {
    /// The new tokens decoded, the stop token left out.
    pub text: String,
    /// New tokens generated, the stop token included.
    pub tokens: usize,
    /// A stop token ended it (else `max_new_tokens` did).
    pub stopped: bool,
}

/// `prompt` encoded (through `template` when it is messages), completed by [`generate`], and
/// decoded: what `kto-train generate` and `train.sample_prompts` write.
pub fn complete(
    model: &Llama,
    tok: &tokenizers::Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &Prompt,
    opts: &GenerateOptions,
) -> Result<Completion> {
    let (text, special) = match prompt {
        Prompt::Text(t) => (t.clone(), true),
        Prompt::Messages(m) => match template {
            Some(t) => (t.render(m, true)?, false),
            None => bail!("the model has no chat template to render a message-list prompt with"),
        },
    };
    let ids = tok
        .encode(text.as_str(), special)
        .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let new = generate(model, &ids, opts)?;
    let stopped = new.last().is_some_and(|t| opts.stop_ids.contains(t));
    let shown = &new[..new.len() - usize::from(stopped)];
    let text = tok
        .decode(shown, false)
        .map_err(|e| anyhow::anyhow!("cannot decode: {e}"))?;
    Ok(Completion {
        text,
        tokens: new.len(),
        stopped,
    })
}

/// The new token ids after `prompt` (the stop token included when one ended it).
pub fn generate(model: &Llama, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("generate: the prompt has no tokens");
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0)
        || opts.temperature.is_nan()
        || opts.temperature < 0.0
    {
        bail!(
            "generate: temperature must be >= 0 and top_p in (0, 1] (got {} and {})",
            opts.temperature,
            opts.top_p
        );
    }
    let dev = model.device();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut kv = Vec::new();
    let mut next_input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < opts.max_new_tokens {
        let ids = Tensor::from_vec(next_input.clone(), (1, next_input.len()), dev)?;
        let (hidden, cache) = model.hidden_states_extending(&ids, PassMode::POLICY_EVAL, &kv)?;
        kv = cache;
        let last = hidden.narrow(1, next_input.len() - 1, 1)?.squeeze(0)?;
        let logits: Vec<f32> = model
            .logits(&last)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let token = if opts.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample(&logits, opts.temperature, opts.top_p, &mut rng)
        };
        out.push(token);
        if opts.stop_ids.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(out)
}

/// The first index of the largest logit (torch.argmax's tie rule).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// softmax(logits / temperature) restricted to the top-p nucleus, then one draw.
fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(u32, f64)> = scaled
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, (l - max).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let mut u = rng.random::<f64>() * mass;
    for p in nucleus {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    nucleus[kept - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_sampling_follows_the_probabilities() {
        // probabilities 0.5, 0.3, 0.2 (log-space logits): top_p 0.6 keeps the first two.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut counts = [0usize; 3];
        let n = 20000;
        for _ in 0..n {
            counts[sample(&logits, 1.0, 0.6, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0, "outside the nucleus");
        let f0 = counts[0] as f64 / n as f64;
        // Renormalized nucleus: 0.5 / 0.8 = 0.625 (binomial s.e. 0.0034).
        assert!((f0 - 0.625).abs() < 0.02, "{f0}");
        // top_p 1 with temperature 1: the full distribution.
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[sample(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        let f2 = counts[2] as f64 / n as f64;
        assert!((f2 - 0.2).abs() < 0.02, "{f2}");
    }
}

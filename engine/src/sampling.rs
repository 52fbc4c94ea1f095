//! Choosing the next token from logits: a pure function of the logits, the parameters,
//! the tokens so far and a seeded generator (the same seed and logits give the same token).
//!
//! Order, as vLLM and Hugging Face apply them: penalties on the raw logits, then
//! temperature, then top-k, then top-p, then a draw from what is left. Temperature 0 is
//! greedy (the argmax of the penalised logits, the lowest id on a tie).
//!
//! - `repetition_penalty` (CTRL, as Hugging Face): every token seen in the prompt or the
//!   output has its logit divided by the penalty when positive, multiplied when negative.
//! - `presence_penalty` / `frequency_penalty` (OpenAI): a token that occurs `n > 0` times in
//!   the output loses `presence + n * frequency` from its logit.
//!
//! Log-probabilities are those of the model: the log-softmax of the raw logits, before
//! penalties, temperature and truncation.

use std::collections::{HashMap, HashSet};

use rand::Rng;
use rand::rngs::StdRng;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
    /// 1 keeps all.
    pub top_p: f32,
    /// Only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// 1 is none; above 1 discourages tokens already seen.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The same seed and prompt give the same output. None draws a fresh seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    /// Names the first parameter out of range.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be 0 or more, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be above 0, got {}", self.repetition_penalty));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if !value.is_finite() || !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be in [-2, 2], got {value}"));
            }
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 1e-6
    }
}

/// The tokens penalties look at: all seen (prompt and output) and the output's counts.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    seen: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        TokenHistory { seen: prompt.iter().copied().collect(), output_counts: HashMap::new() }
    }

    /// Records a generated token.
    pub fn push_output(&mut self, token: u32) {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
    }
}

/// The chosen token and, when asked, its log-probability and the top alternatives (most
/// likely first).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Applies the penalties of `params` to `logits` in place.
// Counts are small; the conversion to f32 is exact for them.
#[allow(clippy::cast_precision_loss)]
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory) {
    if (params.repetition_penalty - 1.0).abs() > f32::EPSILON {
        for &token in &history.seen {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit =
                    if *logit > 0.0 { *logit / params.repetition_penalty } else { *logit * params.repetition_penalty };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        for (&token, &count) in &history.output_counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= params.presence_penalty + params.frequency_penalty * count as f32;
            }
        }
    }
}

/// The candidates sampling may draw from, with their probabilities (most likely first),
/// after temperature, top-k and top-p. Greedy parameters give the single argmax.
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    if logits.is_empty() {
        return Vec::new();
    }
    if params.is_greedy() {
        return vec![(argmax(logits), 1.0)];
    }
    let inverse_temperature = 1.0 / params.temperature;
    let maximum = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |logit: f32| ((logit - maximum) * inverse_temperature).exp();
    let mut order: Vec<u32> = (0..u32::try_from(logits.len()).unwrap_or(u32::MAX)).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut keep = order.len();
    if params.top_k > 0 && params.top_k < keep {
        keep = params.top_k;
        order.select_nth_unstable_by(keep - 1, by_logit);
        order.truncate(keep);
    }
    let total: f32 = order.iter().map(|&token| weight(logits[token as usize])).sum();
    if params.top_p < 1.0 {
        // Most of the mass sits in a few tokens: sort a prefix first, all only if needed.
        const PREFIX: usize = 1024;
        if order.len() > PREFIX {
            order.select_nth_unstable_by(PREFIX - 1, by_logit);
            let prefix_mass: f32 = order[..PREFIX].iter().map(|&token| weight(logits[token as usize])).sum();
            if prefix_mass / total >= params.top_p {
                order.truncate(PREFIX);
            }
        }
        order.sort_unstable_by(by_logit);
        let mut cumulative = 0.0;
        let mut cut = order.len();
        for (index, &token) in order.iter().enumerate() {
            cumulative += weight(logits[token as usize]) / total;
            if cumulative >= params.top_p {
                cut = index + 1;
                break;
            }
        }
        order.truncate(cut);
    } else {
        order.sort_unstable_by(by_logit);
    }
    let kept: f32 = order.iter().map(|&token| weight(logits[token as usize])).sum();
    order.into_iter().map(|token| (token, weight(logits[token as usize]) / kept)).collect()
}

/// Chooses the next token. `logits` are the model's raw logits for one position.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    history: &TokenHistory,
    rng: &mut StdRng,
    top_logprobs: Option<usize>,
) -> Sampled {
    let mut penalised = logits.to_vec();
    apply_penalties(&mut penalised, params, history);
    let candidates = candidates(&penalised, params);
    let token_id = if candidates.len() == 1 {
        candidates[0].0
    } else {
        let mut draw: f32 = rng.random::<f32>();
        let mut chosen = candidates.last().map_or(0, |c| c.0);
        for &(token, probability) in &candidates {
            if draw < probability {
                chosen = token;
                break;
            }
            draw -= probability;
        }
        chosen
    };
    let (logprob, top) = match top_logprobs {
        Some(count) => {
            let (logprob, top) = logprobs(logits, token_id, count);
            (Some(logprob), top)
        }
        None => (None, Vec::new()),
    };
    Sampled { token_id, logprob, top_logprobs: top }
}

/// The log-softmax of `logits` at `token`, and the `count` most likely tokens with theirs.
pub fn logprobs(logits: &[f32], token: u32, count: usize) -> (f32, Vec<(u32, f32)>) {
    let maximum = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = maximum + logits.iter().map(|&logit| (logit - maximum).exp()).sum::<f32>().ln();
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&logit| logit - log_total);
    let count = count.min(logits.len());
    let mut order: Vec<u32> = (0..u32::try_from(logits.len()).unwrap_or(u32::MAX)).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if count > 0 && count < order.len() {
        order.select_nth_unstable_by(count - 1, by_logit);
    }
    order.truncate(count);
    order.sort_unstable_by(by_logit);
    (chosen, order.into_iter().map(|token| (token, logits[token as usize] - log_total)).collect())
}

/// The index of the largest logit (the lowest index on a tie).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    u32::try_from(best).unwrap_or(u32::MAX)
}

//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, with a seeded RNG per request.
//!
//! The chain follows llama.cpp's default order: repetition penalty → top-k →
//! top-p → min-p → temperature → draw. Greedy is an exact argmax (ties go to
//! the lower id). The candidate buffer is allocated once per request and
//! reused, so sampling does not allocate per token.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set with cumulative probability ≥ p (1 = all).
    pub top_p: f32,
    /// Drop tokens with probability < min_p × the top probability (0 = off).
    pub min_p: f32,
    /// Penalty for tokens seen in the last `repeat_last_n` tokens (1 = off).
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition penalty.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks ranges; a bad value is an input error.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidInput(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad(format!(
                "repeat penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// Index of the largest value; ties go to the lower index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A per-request sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// (vocab) candidates (id, logit → prob), reused every token.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(params: SamplingParams, vocab: usize) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        let cap = if params.is_greedy() { 0 } else { vocab };
        Sampler {
            params,
            rng,
            cand: Vec::with_capacity(cap),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (vocab), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalize = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        if p.is_greedy() && !penalize {
            return argmax(logits);
        }
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if penalize {
            let start = history.len().saturating_sub(p.repeat_last_n);
            for &t in &history[start..] {
                if let Some(c) = self.cand.get_mut(t as usize) {
                    // Only once per distinct token: mark by checking against the original.
                    if c.1 == logits[t as usize] {
                        c.1 = if c.1 > 0.0 {
                            c.1 / p.repeat_penalty
                        } else {
                            c.1 * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.is_greedy() {
            let mut best = 0;
            for i in 0..self.cand.len() {
                if self.cand[i].1 > self.cand[best].1 {
                    best = i;
                }
            }
            return self.cand[best].0;
        }
        // Sort descending by logit, ties by lower id.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if p.top_k == 0 {
            self.cand.len()
        } else {
            p.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_logit);
            self.cand.truncate(k);
        }
        self.cand.sort_unstable_by(by_logit);
        self.finish()
    }

    /// Picks the next token from the `k` best candidates of a row, as the
    /// device's `top_k_rows` returns them (descending by logit, ties to the
    /// lower id): the same result and RNG use as [`Self::sample`] on the
    /// full row with `top_k = k`, for a request without repetition penalty.
    /// values, ids: (k).
    pub fn sample_candidates(&mut self, values: &[f32], ids: &[u32]) -> u32 {
        let p = &self.params;
        if p.is_greedy() {
            return ids.first().copied().unwrap_or(0);
        }
        self.cand.clear();
        let k = if p.top_k == 0 {
            ids.len()
        } else {
            p.top_k.min(ids.len())
        };
        self.cand
            .extend(ids.iter().copied().zip(values.iter().copied()).take(k));
        if self.cand.is_empty() {
            return 0;
        }
        self.finish()
    }

    /// Top-p, min-p, temperature and the draw over `self.cand`, sorted
    /// descending by logit.
    fn finish(&mut self) -> u32 {
        let p = &self.params;
        // Softmax (at temperature 1, as llama.cpp's top-p/min-p see it).
        let max = self.cand[0].1;
        let mut sum = 0f32;
        for c in self.cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        for c in self.cand.iter_mut() {
            c.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut cum = 0f32;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                cum += c.1;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = self.cand[0].1 * p.min_p;
            let keep = self.cand.iter().take_while(|c| c.1 >= floor).count();
            self.cand.truncate(keep.max(1));
        }
        // Temperature on the survivors: p_i^(1/T), renormalised.
        let inv_t = 1.0 / p.temperature;
        let mut sum = 0f64;
        for c in self.cand.iter_mut() {
            c.1 = c.1.powf(inv_t);
            sum += c.1 as f64;
        }
        let mut r = self.rng.random::<f64>() * sum;
        for c in &self.cand {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        self.cand.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests;

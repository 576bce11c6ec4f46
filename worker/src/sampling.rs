//! Next-token sampling: penalties, then greedy or temperature with top-k, top-p and min-p,
//! from a seeded generator so a seed reproduces the same tokens.

use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub min_p: f32,
    /// 1 is off; > 1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred.
    pub presence_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the parameter and its limit.
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let invalid = |param, message| Err(InvalidSampling { param, message });
        let finite = |param: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                invalid(param, format!("{param} must be a finite number, got {v}"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        if self.temperature < 0.0 {
            let message = format!("temperature must be ≥ 0, got {}", self.temperature);
            return invalid("temperature", message);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        if self.repetition_penalty <= 0.0 {
            let message = format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            );
            return invalid("repetition_penalty", message);
        }
        Ok(())
    }
}

/// A sampling parameter out of range: which one (its name in `SamplingParams`, the proto
/// and the OpenAI API alike) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSampling {
    pub param: &'static str,
    pub message: String,
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// A token sampled on a GPU (`kernels/sampling.cu`) with the CPU sampler's semantics: the
/// parameters, and the uniform draw the CPU sampler would take for this token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceDraw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub uniform: f64,
}

/// What a sequence needs from a GPU pass: nothing (the pass does not complete it), its
/// last row's logits (sampled on the host), or its next token sampled on the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Want {
    Nothing,
    Logits,
    Token(DeviceDraw),
}

/// What a forward pass gives a sequence: the logits of its last row, or (sampled on the
/// GPU) its next token.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Logits(Vec<f32>),
    Token(u32),
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        // Without a seed each sampler still differs (time-seeded), as users expect.
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Sampler {
            params,
            rng: Rng::new(seed),
        }
    }

    /// The next token's draw, for sampling on a GPU; it takes the uniform number `sample`
    /// would, so the seed's stream is the same wherever each token is sampled. None when a
    /// penalty needs the token history (those are sampled here).
    pub fn device_draw(&mut self) -> Option<DeviceDraw> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return None;
        }
        Some(DeviceDraw {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: if p.temperature == 0.0 {
                0.0
            } else {
                self.rng.next_f64()
            },
        })
    }

    /// The next token given this step's logits and every token so far (prompt and output;
    /// only read when a penalty is set).
    pub fn sample<'a>(
        &mut self,
        logits: &[f32],
        history: impl IntoIterator<Item = &'a u32>,
    ) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, history);
        if self.params.temperature == 0.0 {
            return argmax(&logits);
        }
        let mut candidates = self.filtered_probabilities(&logits);
        let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
        let mut target = self.rng.next_f64() * total;
        let last = candidates.last().map_or(0, |&(t, _)| t);
        for (token, p) in candidates.drain(..) {
            if target < p {
                return token;
            }
            target -= p;
        }
        last
    }

    fn apply_penalties<'a>(&self, logits: &mut [f32], history: impl IntoIterator<Item = &'a u32>) {
        let p = &self.params;
        if p.repetition_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0 {
            return;
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in history {
            *counts.entry(t).or_default() += 1;
        }
        for (&token, &count) in &counts {
            let Some(logit) = logits.get_mut(token as usize) else {
                continue;
            };
            // The CTRL rule: shrink positive logits, push negative ones further down.
            *logit = if *logit > 0.0 {
                *logit / p.repetition_penalty
            } else {
                *logit * p.repetition_penalty
            };
            *logit -= p.frequency_penalty * count as f32 + p.presence_penalty;
        }
    }

    /// `(token, probability)` that survive top-k, top-p and min-p, most likely first.
    fn filtered_probabilities(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&l| f64::from(l) / f64::from(p.temperature))
            .collect();
        let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(u32, f64)> = scaled
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l - max).exp()))
            .collect();
        let sum: f64 = probs.iter().map(|&(_, e)| e).sum();
        probs.iter_mut().for_each(|(_, e)| *e /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, prob)| {
                    cumulative += prob;
                    cumulative >= f64::from(p.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0].1 * f64::from(p.min_p);
            probs.retain(|&(_, prob)| prob >= floor);
        }
        probs
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(SamplingParams {
            seed: Some(7),
            ..params
        })
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
        assert_eq!(argmax(&[1.0, 1.0]), 0);
    }

    #[test]
    fn a_seed_reproduces_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let run = || {
            let mut s = sampler(params.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let distinct: std::collections::HashSet<u32> = run().into_iter().collect();
        assert!(
            distinct.len() > 3,
            "temperature 1 should spread: {distinct:?}"
        );
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_candidates() {
        let logits = [5.0, 4.0, 1.0, 0.0];
        let draw = |params: SamplingParams| {
            let mut s = sampler(SamplingParams {
                temperature: 1.0,
                ..params
            });
            (0..2000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<std::collections::HashSet<u32>>()
        };
        assert_eq!(
            draw(SamplingParams {
                top_k: 2,
                ..Default::default()
            }),
            [0, 1].into()
        );
        assert_eq!(
            draw(SamplingParams {
                top_p: 0.5,
                ..Default::default()
            }),
            [0].into()
        );
        assert_eq!(
            draw(SamplingParams {
                min_p: 0.2,
                ..Default::default()
            }),
            [0, 1].into()
        );
        assert_eq!(draw(SamplingParams::default()).len(), 4);
    }

    #[test]
    fn sampled_frequencies_follow_the_distribution() {
        let logits = [0.0f32, 2f32.ln()]; // probabilities 1/3, 2/3
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            ..Default::default()
        });
        let ones = (0..30_000).filter(|_| s.sample(&logits, &[]) == 1).count();
        assert!((ones as f64 / 30_000.0 - 2.0 / 3.0).abs() < 0.01, "{ones}");
    }

    #[test]
    fn penalties_discourage_repeats() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = sampler(SamplingParams {
            repetition_penalty: 1.2,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0]), 1);
        let mut s = sampler(SamplingParams {
            frequency_penalty: 0.1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0]), 0);
        assert_eq!(s.sample(&logits, &[0, 0]), 1);
        let mut s = sampler(SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0, 99]), 1);
    }

    #[test]
    fn device_draws_and_host_samples_share_one_stream() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.3).cos()).collect();
        let params = SamplingParams {
            temperature: 0.9,
            ..Default::default()
        };
        let (mut a, mut b) = (sampler(params.clone()), sampler(params));
        let draw = a.device_draw().unwrap();
        assert_eq!(draw.uniform, Rng::new(7).next_f64());
        b.sample(&logits, &[]);
        // the next token comes out the same whether the first was drawn for a GPU or here
        assert_eq!(a.sample(&logits, &[]), b.sample(&logits, &[]));
        let mut greedy = sampler(SamplingParams::default());
        assert_eq!(greedy.device_draw().unwrap().uniform, 0.0);
        let mut penalised = sampler(SamplingParams {
            repetition_penalty: 1.1,
            ..Default::default()
        });
        assert_eq!(penalised.device_draw(), None);
    }

    #[test]
    fn invalid_parameters_name_the_field_and_limit() {
        let check = |p: SamplingParams| p.validate().unwrap_err().to_string();
        assert_eq!(
            check(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }),
            "temperature must be ≥ 0, got -1"
        );
        assert_eq!(
            check(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }),
            "top_p must be in (0, 1], got 0"
        );
        assert!(
            check(SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            })
            .starts_with("temperature must be a finite number")
        );
        assert!(
            check(SamplingParams {
                min_p: 2.0,
                ..Default::default()
            })
            .starts_with("min_p")
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}

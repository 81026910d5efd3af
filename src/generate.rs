//! Token generation: greedy decoding and seeded sampling (temperature, top-k,
//! top-p), for causal LMs and encoder–decoder models.
//!
//! Causal LMs decode with a KV cache by default: the `kv-cache` pass splits the
//! model into `prefill` (the prompt, returning the cache) and `decode` (one token
//! per row plus the cache of length `S`, returning the cache of length `S + 1`),
//! so a step costs O(S) in attention. For encoder–decoder models the decoder's
//! self-attention is cached and the encoder runs once, in `prefill`. With
//! `kv_cache: false` every step re-runs the whole prefix.

use kiln_backends::{Executable, Session, Tensor};

use kiln_passes::PassManager;

use crate::{Error, Model, RunInputs, Target};

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// A draw from the filtered, tempered distribution, reproducible by `seed`.
    Sample {
        /// Logits are divided by this (> 0).
        temperature: f64,
        /// Keep only the `k` most likely tokens (0: no limit).
        top_k: usize,
        /// Keep the smallest set of most likely tokens whose probability reaches
        /// `top_p` (1.0: no limit).
        top_p: f64,
        /// Seed of the generator.
        seed: u64,
    },
}

/// Options of [`Model::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to produce per row.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampling: Sampling,
    /// Stop a row once it produced one of the model's `eos_token_id`s.
    pub stop_at_eos: bool,
    /// Decode causal LMs with a KV cache (prefill once, then one token per step).
    pub kv_cache: bool,
    /// Where to run.
    pub backend: Target,
}

/// A small, fast, seeded generator (xorshift64*), so runs are reproducible
/// without pulling in a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> i64 {
    match sampling {
        Sampling::Greedy => {
            let mut best = 0;
            for (i, &x) in logits.iter().enumerate() {
                if x > logits[best] {
                    best = i;
                }
            }
            best as i64
        }
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            // Subtract the maximum before dividing by the temperature, so a tiny
            // temperature tends to greedy instead of overflowing to NaN.
            let top = logits
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let mut order: Vec<(f64, usize)> = logits
                .iter()
                .enumerate()
                .map(|(i, &x)| ((x as f64 - top) / temperature, i))
                .collect();
            order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            if *top_k > 0 {
                order.truncate(*top_k);
            }
            let mut probs: Vec<f64> = order
                .iter()
                .map(|(x, _)| if x.is_nan() { 0.0 } else { x.exp() })
                .collect();
            let mass: f64 = probs.iter().sum();
            if mass.is_nan() || mass <= 0.0 {
                // Non-finite logits: fall back to the most likely token.
                return order.first().map_or(0, |o| o.1 as i64);
            }
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
            if *top_p < 1.0 {
                let mut acc = 0.0;
                let mut keep = probs.len();
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if acc >= *top_p {
                        keep = i + 1;
                        break;
                    }
                }
                probs.truncate(keep);
                let total: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= total);
            }
            let mut u = rng.next_f64();
            for (p, (_, id)) in probs.iter().zip(&order) {
                if u < *p {
                    return *id as i64;
                }
                u -= p;
            }
            order[probs.len().saturating_sub(1)].1 as i64
        }
    }
}

impl Model {
    /// Generates up to `opts.max_new_tokens` tokens after each prompt row;
    /// returns the new tokens of each row. For encoder–decoder models the prompt
    /// is the encoder input and decoding starts from `decoder_start_token_id`.
    pub fn generate(
        &self,
        prompt: &RunInputs,
        opts: &GenerateOptions,
    ) -> Result<Vec<Vec<i64>>, Error> {
        self.generate_streaming(prompt, opts, &mut |_| {})
    }

    /// [`Model::generate`], calling `on_step` with every row's new tokens so
    /// far after each step (a terminal streams the text from it).
    pub fn generate_streaming(
        &self,
        prompt: &RunInputs,
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(&[Vec<i64>]),
    ) -> Result<Vec<Vec<i64>>, Error> {
        let info = self.generative_info("generation")?;
        if let Sampling::Sample {
            temperature, top_p, ..
        } = opts.sampling
        {
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(Error::Input(format!(
                    "--temperature must be positive, got {temperature}"
                )));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::Input(format!(
                    "--top-p must be in (0, 1], got {top_p}"
                )));
            }
        }
        if let Some(out) =
            self.per_ragged_row(prompt, |row| self.generate_streaming(row, opts, on_step))
        {
            return out;
        }
        let encoder_decoder = info.decoder_start_token_id.is_some();
        let rows = prompt.tokens.len();
        // Check ids, lengths and masks before anything runs (also when no
        // token is asked for).
        self.prepare_inputs(prompt)?;
        let takes_mask = self.main().is_ok_and(|g| {
            g.inputs().iter().any(|v| matches!(&g.node(*v).kind, kiln_ir::NodeKind::Input { name } if name == "attention_mask"))
        });
        if !takes_mask
            && prompt
                .attention_mask
                .as_ref()
                .is_some_and(|m| m.iter().flatten().any(|&x| x == 0))
        {
            return Err(Error::Input(format!(
                "{}: padded prompts cannot be continued (new tokens would follow the padding); generate rows of equal length",
                self.origin()
            )));
        }
        let growing_len = match (&prompt.decoder_tokens, encoder_decoder) {
            (Some(d), true) => d.first().map_or(0, |r| r.len()),
            (None, true) => 1,
            (_, false) => prompt.tokens.first().map_or(0, |r| r.len()),
        };
        // The positions the caches must hold: the last new token is produced
        // but never fed back.
        let needed = growing_len
            .checked_add(opts.max_new_tokens)
            .map(|n| n.saturating_sub(1))
            .ok_or_else(|| {
                Error::Input(format!(
                    "--max-new-tokens {} is too large: {growing_len} + {} positions overflow",
                    opts.max_new_tokens, opts.max_new_tokens
                ))
            })?;
        let capacity = needed.max(growing_len);
        if let Some(max) = info.max_positions {
            if needed as i64 > max || i64::try_from(needed).is_err() {
                return Err(Error::Input(format!(
                    "{growing_len} tokens + {} new ones need {needed} positions, more than the model's {max} ({} in config.json)",
                    opts.max_new_tokens,
                    info.family.positions_key()
                )));
            }
        }
        let mut rng = match opts.sampling {
            Sampling::Sample { seed, .. } => Rng::new(seed),
            Sampling::Greedy => Rng::new(0),
        };
        let mut picker = Picker {
            sampling: &opts.sampling,
            rng: &mut rng,
            new_tokens: vec![Vec::new(); rows],
            done: vec![false; rows],
            stop: if opts.stop_at_eos {
                info.eos_token_ids.clone()
            } else {
                Vec::new()
            },
            on_step,
        };
        // A model the kv-cache pass cannot split exactly (see its contract) is
        // decoded without a cache: slower, never different.
        let split = match opts.kv_cache {
            true => match self.kv_split() {
                Ok(split) => Some(split),
                Err(Error::Pass(kiln_passes::PassError::Failed { .. })) => None,
                Err(e) => return Err(e),
            },
            false => None,
        };
        let ran = match split {
            Some(split) => split.generate_cached(
                prompt,
                opts,
                info.decoder_start_token_id,
                capacity,
                &mut picker,
            ),
            None => self.generate_uncached(
                prompt,
                opts.backend,
                opts.max_new_tokens,
                info.decoder_start_token_id,
                &mut picker,
            ),
        };
        ran.map_err(|e| match e {
            Error::NonFinite { what, .. } => Error::NonFinite {
                what: format!("{}: {what}", self.origin()),
                cause: crate::non_finite_weights(self.weights()),
            },
            e => e,
        })?;
        Ok(picker.new_tokens)
    }

    /// The model's family and token limits, when it generates tokens (`what`
    /// names the request in the error otherwise).
    pub(crate) fn generative_info(&self, what: &str) -> Result<kiln_frontends::ModelInfo, Error> {
        let info = self.info().cloned().ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: {what} needs a model from a frontend (a Hugging Face folder or the demo)",
                self.origin()
            ))
        })?;
        if !info.family.is_generative() {
            return Err(Error::Unsupported(format!(
                "{}: a {:?} encoder does not generate tokens",
                self.origin(),
                info.family
            )));
        }
        Ok(info)
    }

    /// Each step runs the whole model on the whole prefix.
    fn generate_uncached(
        &self,
        prompt: &RunInputs,
        backend: Target,
        max_new_tokens: usize,
        decoder_start: Option<i64>,
        picker: &mut Picker<'_>,
    ) -> Result<(), Error> {
        let rows = prompt.tokens.len();
        let mut exe = self.compile(backend)?;
        let mut inputs = prompt.clone();
        if let (Some(start), None) = (decoder_start, &inputs.decoder_tokens) {
            inputs.decoder_tokens = Some(vec![vec![start]; rows]);
        }
        for _ in 0..max_new_tokens {
            let logits = last_logits(self, exe.as_mut(), &inputs)?;
            let next = picker.pick_all(&logits)?;
            for (r, t) in next.into_iter().enumerate() {
                match (decoder_start, inputs.decoder_tokens.as_mut()) {
                    (Some(_), Some(d)) => d[r].push(t),
                    _ => inputs.tokens[r].push(t),
                }
            }
            if picker.all_done() {
                break;
            }
        }
        Ok(())
    }

    /// The model split into `@prefill` and `@decode` by the `kv-cache` pass
    /// (after attention fusion), or the pass's reason why it cannot be.
    pub fn kv_split(&self) -> Result<Model, Error> {
        if self.module().funcs.iter().any(|g| g.name == "decode") {
            return Ok(self.clone());
        }
        Ok(self
            .apply_passes(&PassManager::from_names(&[
                "attention-fusion",
                "dce",
                "kv-cache",
            ])?)?
            .0)
    }

    /// A [`Session`] over `@prefill` and `@decode` of a model already split
    /// by [`Model::kv_split`], on `target`, with caches of `capacity` positions.
    pub fn session(&self, target: Target, capacity: usize) -> Result<Box<dyn Session>, Error> {
        let funcs = [
            self.function("prefill")?.clone(),
            self.function("decode")?.clone(),
        ];
        let none = kiln_backends::Weights::new();
        let weights = self.weights().unwrap_or(&none);
        Ok(target.backend().session(&funcs, weights, capacity)?)
    }

    /// Prefill once, then one `decode` step per token, in a session whose
    /// backend keeps the caches (on a model already split by
    /// [`Model::kv_split`]). The signatures say which inputs are caches and
    /// carried values; the one data input of `@decode` takes the new tokens.
    fn generate_cached(
        &self,
        prompt: &RunInputs,
        opts: &GenerateOptions,
        decoder_start: Option<i64>,
        capacity: usize,
        picker: &mut Picker<'_>,
    ) -> Result<(), Error> {
        let mut first_inputs = prompt.clone();
        if let (Some(start), None) = (decoder_start, &first_inputs.decoder_tokens) {
            first_inputs.decoder_tokens = Some(vec![vec![start]; prompt.tokens.len()]);
        }
        let first = self.prepare_inputs(&first_inputs)?;
        let decode = self.function("decode")?;
        let data_inputs = decode
            .inputs()
            .iter()
            .filter(|&&v| *decode.input_role(v) == kiln_ir::InputRole::Data)
            .count();
        if data_inputs != 1 {
            return Err(Error::Unsupported(format!(
                "@decode takes {data_inputs} data inputs; generation feeds it exactly one (the new tokens)"
            )));
        }
        let mut session = self.session(opts.backend, capacity)?;
        let mut logits = take_logits(session.call("prefill", &first)?)?;
        for step in 0..opts.max_new_tokens {
            let next = picker.pick_all(&logits)?;
            if picker.all_done() || step + 1 == opts.max_new_tokens {
                break;
            }
            let tokens = Tensor::from_tokens(&next.iter().map(|t| vec![*t]).collect::<Vec<_>>())
                .map_err(kiln_backends::RunError::from)?;
            logits = take_logits(session.call("decode", &[tokens])?)?;
        }
        Ok(())
    }
}

/// The `logits` output of a session call.
fn take_logits(outs: Vec<(String, Tensor)>) -> Result<Tensor, Error> {
    outs.into_iter()
        .find(|(n, _)| n == "logits")
        .map(|(_, t)| t)
        .ok_or_else(|| Error::Unsupported("the split model has no `logits` output".into()))
}

/// Chooses tokens row by row and collects them until each row is done.
struct Picker<'a> {
    sampling: &'a Sampling,
    rng: &'a mut Rng,
    new_tokens: Vec<Vec<i64>>,
    done: Vec<bool>,
    stop: Vec<i64>,
    /// Told the new tokens after every step.
    on_step: &'a mut dyn FnMut(&[Vec<i64>]),
}

impl Picker<'_> {
    /// Picks the next token of every row from the last position of `logits`
    /// `[B, T, V]`, records it for rows not yet done, and returns all of them.
    fn pick_all(&mut self, logits: &Tensor) -> Result<Vec<i64>, Error> {
        let &[rows, len, vocab] = logits.shape() else {
            return Err(Error::Unsupported(format!(
                "logits must be [B, T, V], got {logits}"
            )));
        };
        if len == 0 || vocab == 0 || rows != self.done.len() {
            return Err(Error::Input(format!(
                "cannot pick a token from logits {logits}"
            )));
        }
        let data = logits
            .as_f32()
            .ok_or_else(|| Error::Unsupported("logits are not f32".into()))?;
        let mut next = Vec::with_capacity(rows);
        for r in 0..rows {
            let row = &data[(r * len + len - 1) * vocab..(r * len + len) * vocab];
            // NaN, or nothing finite to choose from: an error, not token 0
            // forever (the caller names the weights at fault).
            if row.iter().any(|x| x.is_nan()) || !row.iter().any(|x| x.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!(
                        "the logits of row {r} at new token {}",
                        self.new_tokens[r].len() + 1
                    ),
                    cause: String::new(),
                });
            }
            let t = pick(row, self.sampling, self.rng);
            if !self.done[r] {
                self.new_tokens[r].push(t);
                self.done[r] = self.stop.contains(&t);
            }
            next.push(t);
        }
        (self.on_step)(&self.new_tokens);
        Ok(next)
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }
}

/// Runs the model and returns its `logits` output `[B, T, V]`.
fn last_logits(
    model: &Model,
    exe: &mut dyn Executable,
    inputs: &RunInputs,
) -> Result<Tensor, Error> {
    let outs = model.run_with(exe, inputs)?;
    outs.into_iter()
        .find(|(n, t)| n == "logits" && t.rank() == 3)
        .map(|(_, t)| t)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: the model has no `logits: f32[B, T, V]` output",
                model.origin()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_temperature_samples_the_most_likely_token() {
        let s = Sampling::Sample {
            temperature: 1e-320,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
        };
        let mut rng = Rng::new(1);
        assert_eq!(pick(&[0.1, 3.0, 2.9, -1.0], &s, &mut rng), 1);
        assert_eq!(pick(&[f32::NAN, 1.0], &s, &mut rng), 1);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = Rng::new(1);
        assert_eq!(pick(&[0.1, 3.0, 3.0, -1.0], &Sampling::Greedy, &mut rng), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        let s = Sampling::Sample {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |seed: u64| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| pick(&logits, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().all(|&t| t == 3 || t == 4));
        assert!(draw(7).contains(&3) && draw(7).contains(&4));
        let p = Sampling::Sample {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 7,
        };
        let mut rng = Rng::new(3);
        assert!((0..50).all(|_| pick(&logits, &p, &mut rng) == 4));
    }
}

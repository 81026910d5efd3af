//! Beam search, as transformers' `generate(num_beams=K, do_sample=False)`
//! does it (its default `early_stopping=False`):
//!
//! - Each step, every running beam's next-token log-probabilities
//!   (`log_softmax` of the last logits) are added to the beam's score; of all
//!   `K·V` continuations the best `max(2, 1 + #eos)·K` are kept, best first
//!   (equal scores: the lower beam, then the lower token).
//! - A kept continuation that ends in an end-of-sequence token, or reaches
//!   the length limit, is finished when it ranks among the first `K`; its
//!   score is `sum of log-probs / generated_len ^ length_penalty` (`generated_len`
//!   counts the new tokens, the end-of-sequence token included), and it joins
//!   the `K` best finished hypotheses if it beats one of them.
//! - The best `K` continuations that did not finish run on.
//! - Search stops at the length limit, when every kept continuation
//!   finished, or once all `K` hypotheses are finished and the best running
//!   beam, at its current length, could not beat the worst of them.
//!
//! Scores are accumulated in f32 as transformers does; the log-softmax is
//! computed in f64 and rounded to f32. Each step re-runs the model on the
//! `K` beams' whole sequences (one batch of `K` rows); a prompt of several
//! rows is searched row by row.

use kiln_backends::Tensor;

use crate::{Error, Model, RunInputs, Target};

/// Options of [`Model::beam_search`].
#[derive(Clone, Debug, PartialEq)]
pub struct BeamOptions {
    /// Beams kept per step (`num_beams`), at least 1.
    pub num_beams: usize,
    /// The exponent of the generated length dividing a finished beam's
    /// summed log-probability (`length_penalty`; 1.0 by default, > 0 favours
    /// longer sequences).
    pub length_penalty: f64,
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// End beams at the model's `eos_token_id`s.
    pub stop_at_eos: bool,
    /// Where to run.
    pub backend: Target,
}

/// One returned hypothesis.
#[derive(Clone, Debug, PartialEq)]
pub struct Beam {
    /// The new tokens (the end-of-sequence token included when it ended so).
    pub tokens: Vec<i64>,
    /// Its score: summed log-probabilities over `len ^ length_penalty`.
    pub score: f64,
}

/// Scores at or below this are the "impossible" of transformers' `-1e9`.
const NEG: f32 = -1.0e9;

/// `log_softmax` of one row, in f64, rounded to f32.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_sum = sum.ln();
    row.iter()
        .map(|&x| (x as f64 - max - log_sum) as f32)
        .collect()
}

/// The indices of the `k` largest `scores`, best first; equal scores by
/// ascending index.
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

struct Candidate {
    tokens: Vec<i64>,
    score: f32,
    hits_stop: bool,
}

impl Model {
    /// Beam search after each prompt row (see the module documentation):
    /// per row, the finished hypotheses, best first (`num_beams` of them
    /// unless every continuation ended first).
    pub fn beam_search(
        &self,
        prompt: &RunInputs,
        opts: &BeamOptions,
    ) -> Result<Vec<Vec<Beam>>, Error> {
        let info = self.generative_info("beam search")?;
        if opts.num_beams == 0 || opts.num_beams > 256 {
            return Err(Error::Input(format!(
                "--num-beams must be between 1 and 256, got {}",
                opts.num_beams
            )));
        }
        if !opts.length_penalty.is_finite() {
            return Err(Error::Input(format!(
                "--length-penalty must be a finite number, got {}",
                opts.length_penalty
            )));
        }
        if let Some(out) = self.per_ragged_row(prompt, |row| self.beam_search(row, opts)) {
            return out;
        }
        self.prepare_inputs(prompt)?;
        if prompt.decoder_tokens.is_some() {
            return Err(Error::Input(
                "beam search decodes from decoder_start_token_id; --decoder-tokens is not taken"
                    .into(),
            ));
        }
        if prompt
            .attention_mask
            .as_ref()
            .is_some_and(|m| m.iter().flatten().any(|&x| x == 0))
            && info.decoder_start_token_id.is_none()
        {
            return Err(Error::Input(format!(
                "{}: padded prompts cannot be continued (new tokens would follow the padding); search rows of equal length",
                self.origin()
            )));
        }
        let prompt_len = match info.decoder_start_token_id {
            Some(_) => 1,
            None => prompt.tokens.first().map_or(0, |r| r.len()),
        };
        let needed = prompt_len
            .checked_add(opts.max_new_tokens)
            .map(|n| n.saturating_sub(1))
            .ok_or_else(|| {
                Error::Input(format!(
                    "--max-new-tokens {} is too large",
                    opts.max_new_tokens
                ))
            })?;
        if let Some(max) = info.max_positions {
            if needed as i64 > max {
                return Err(Error::Input(format!(
                    "{prompt_len} tokens + {} new ones need {needed} positions, more than the model's {max} ({} in config.json)",
                    opts.max_new_tokens,
                    info.family.positions_key()
                )));
            }
        }
        let eos: Vec<i64> = if opts.stop_at_eos {
            info.eos_token_ids.clone()
        } else {
            Vec::new()
        };
        let mut exe = self.compile(opts.backend)?;
        let mut out = Vec::with_capacity(prompt.tokens.len());
        for r in 0..prompt.tokens.len() {
            let row = RunInputs {
                tokens: vec![prompt.tokens[r].clone()],
                attention_mask: prompt.attention_mask.as_ref().map(|m| vec![m[r].clone()]),
                token_type_ids: prompt.token_type_ids.as_ref().map(|m| vec![m[r].clone()]),
                decoder_tokens: None,
            };
            let beams = self
                .search_row(
                    exe.as_mut(),
                    &row,
                    info.decoder_start_token_id,
                    &eos,
                    prompt_len,
                    opts,
                )
                .map_err(|e| match e {
                    Error::NonFinite { what, .. } => Error::NonFinite {
                        what: format!("{}: {what}", self.origin()),
                        cause: crate::non_finite_weights(self.weights()),
                    },
                    e => e,
                })?;
            out.push(beams);
        }
        Ok(out)
    }

    /// The K beams' model inputs: the prompt row repeated, each beam's new
    /// tokens after the prompt (or after the decoder start).
    fn beam_inputs(&self, row: &RunInputs, start: Option<i64>, running: &[Vec<i64>]) -> RunInputs {
        let k = running.len();
        let rep = |m: &Option<Vec<Vec<i64>>>| m.as_ref().map(|m| vec![m[0].clone(); k]);
        match start {
            Some(s) => RunInputs {
                tokens: vec![row.tokens[0].clone(); k],
                attention_mask: rep(&row.attention_mask),
                token_type_ids: rep(&row.token_type_ids),
                decoder_tokens: Some(
                    running
                        .iter()
                        .map(|b| std::iter::once(s).chain(b.iter().copied()).collect())
                        .collect(),
                ),
            },
            None => RunInputs {
                tokens: running
                    .iter()
                    .map(|b| row.tokens[0].iter().chain(b).copied().collect())
                    .collect(),
                attention_mask: None,
                token_type_ids: None,
                decoder_tokens: None,
            },
        }
    }

    fn search_row(
        &self,
        exe: &mut dyn kiln_backends::Executable,
        row: &RunInputs,
        start: Option<i64>,
        eos: &[i64],
        prompt_len: usize,
        opts: &BeamOptions,
    ) -> Result<Vec<Beam>, Error> {
        let k = opts.num_beams;
        let keep = 2usize.max(1 + eos.len()) * k;
        let lp = opts.length_penalty;
        let max_len = prompt_len + opts.max_new_tokens;
        let mut running: Vec<Vec<i64>> = vec![Vec::new(); k];
        let mut running_scores = vec![NEG; k];
        running_scores[0] = 0.0;
        // The K best finished hypotheses: (tokens, score, finished).
        let mut finished: Vec<(Vec<i64>, f32, bool)> = vec![(Vec::new(), NEG, false); k];
        let mut improvable = true;
        let mut cur_len = prompt_len;
        if opts.max_new_tokens == 0 {
            return Ok(Vec::new());
        }
        loop {
            let inputs = self.beam_inputs(row, start, &running);
            let outs = self.run_with(exe, &inputs)?;
            let logits = outs
                .into_iter()
                .find(|(n, t)| n == "logits" && t.rank() == 3)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    Error::Unsupported("the model has no `logits: f32[B, T, V]` output".into())
                })?;
            let (len, vocab, data) = last_positions(&logits, k)?;
            let mut scores = Vec::with_capacity(k * vocab);
            for (b, &beam_score) in running_scores.iter().enumerate() {
                let last = &data[(b * len + len - 1) * vocab..(b * len + len) * vocab];
                if last.iter().any(|x| x.is_nan()) || !last.iter().any(|x| x.is_finite()) {
                    return Err(Error::NonFinite {
                        what: format!(
                            "the logits of beam {b} at new token {}",
                            cur_len - prompt_len + 1
                        ),
                        cause: String::new(),
                    });
                }
                scores.extend(log_softmax(last).into_iter().map(|l| l + beam_score));
            }
            let at_limit = cur_len + 1 >= max_len;
            let cands: Vec<Candidate> = top_k(&scores, keep)
                .into_iter()
                .map(|i| {
                    let (b, t) = (i / vocab, (i % vocab) as i64);
                    let mut tokens = running[b].clone();
                    tokens.push(t);
                    Candidate {
                        tokens,
                        score: scores[i],
                        hits_stop: at_limit || eos.contains(&t),
                    }
                })
                .collect();
            // The beams that run on: the best K that did not stop.
            let run_scores: Vec<f32> = cands
                .iter()
                .map(|c| c.score + if c.hits_stop { NEG } else { 0.0 })
                .collect();
            let next = top_k(&run_scores, k);
            running = next.iter().map(|&i| cands[i].tokens.clone()).collect();
            running_scores = next.iter().map(|&i| run_scores[i]).collect();
            // The finished hypotheses: the best K of the old ones and the
            // continuations among the first K that stopped.
            let denom = ((cur_len + 1 - prompt_len) as f64).powf(lp);
            let mut merged: Vec<(Vec<i64>, f32, bool)> = std::mem::take(&mut finished);
            for (i, c) in cands.iter().enumerate() {
                let just_finished = c.hits_stop && i < k;
                let mut s = (c.score as f64 / denom) as f32;
                if !improvable {
                    s += NEG;
                }
                if !just_finished {
                    s += NEG;
                }
                merged.push((c.tokens.clone(), s, just_finished));
            }
            let merged_scores: Vec<f32> = merged.iter().map(|m| m.1).collect();
            finished = top_k(&merged_scores, k)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();
            cur_len += 1;
            // Could the best running beam, at its current length, still beat
            // the worst finished hypothesis?
            let best_possible =
                (running_scores[0] as f64 / ((cur_len - prompt_len) as f64).powf(lp)) as f32;
            let worst = finished.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
            improvable = improvable
                && finished
                    .iter()
                    .any(|f| best_possible > if f.2 { worst } else { NEG });
            if !improvable || cands.iter().all(|c| c.hits_stop) {
                break;
            }
        }
        Ok(finished
            .into_iter()
            .filter(|f| f.2)
            .map(|(tokens, score, _)| Beam {
                tokens,
                score: score as f64,
            })
            .collect())
    }
}

/// `[K, T, V]` logits: `T`, `V` and the data, checked.
fn last_positions(logits: &Tensor, k: usize) -> Result<(usize, usize, &[f32]), Error> {
    let &[rows, len, vocab] = logits.shape() else {
        return Err(Error::Unsupported(format!(
            "logits must be [B, T, V], got {logits}"
        )));
    };
    if rows != k || len == 0 || vocab == 0 {
        return Err(Error::Input(format!(
            "cannot search beams in logits {logits}"
        )));
    }
    let data = logits
        .as_f32()
        .ok_or_else(|| Error::Unsupported("logits are not f32".into()))?;
    Ok((len, vocab, data))
}

#[cfg(test)]
mod tests {
    use super::{log_softmax, top_k};

    #[test]
    fn top_k_is_best_first_with_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 3), vec![1, 2, 4]);
        assert_eq!(top_k(&[0.5, -1.0], 5), vec![0, 1]);
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}

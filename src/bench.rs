//! `kiln bench`: timings of a decode step with the KV cache (in a session, the
//! cache kept by the backend) against the same step without it (the whole
//! prefix re-run), measured in the same process on the same model and backend,
//! so the ratios are meaningful on any machine.

use std::time::Instant;

use kiln_backends::Tensor;

use crate::{Error, Model, Target};

/// One cache length's timings, in milliseconds (medians over the iterations).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeTiming {
    /// Tokens already in the cache.
    pub cache_len: usize,
    /// One `decode` step (one new token per row) with the cache.
    pub decode_ms: f64,
    /// The peer: the full forward over `cache_len + 1` tokens, which is what a
    /// step costs without a cache.
    pub full_ms: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// Times a decode step at each cache length (batch 1, token ids `i % vocab`).
pub fn bench_decode(
    model: &Model,
    target: Target,
    cache_lengths: &[usize],
    iters: usize,
) -> Result<Vec<DecodeTiming>, Error> {
    let info = model
        .info()
        .cloned()
        .ok_or_else(|| Error::Unsupported("bench needs a model from a frontend".into()))?;
    if info.decoder_start_token_id.is_some() || !info.family.is_generative() {
        return Err(Error::Unsupported(format!(
            "bench times decoder-only models (gpt2, llama); {} is a {:?} model",
            model.origin(),
            info.family
        )));
    }
    let iters = iters.max(1);
    if let Some(max) = info.max_positions {
        let too_long = cache_lengths
            .iter()
            .find(|&&l| l.checked_add(iters).is_none_or(|n| n as i64 > max));
        if let Some(&too_long) = too_long {
            return Err(Error::Input(format!(
                "cache length {too_long} + {iters} timed steps exceeds the model's {max} positions"
            )));
        }
    }
    let split = model.kv_split()?;
    let mut full = model.compile(target)?;
    let vocab = info.vocab_size.max(1);
    let mut rows = Vec::new();
    for &len in cache_lengths {
        let prompt: Vec<i64> = (0..len as i64).map(|i| (i * 7 + 3) % vocab).collect();
        // The cache holds the prompt and every timed step; each step appends
        // one position in place (on backends that keep the cache).
        let mut session = split.session(target, len + iters)?;
        session.call(
            "prefill",
            &[Tensor::from_tokens(std::slice::from_ref(&prompt))
                .map_err(kiln_backends::RunError::from)?],
        )?;
        let next = Tensor::from_tokens(&[[1i64]]).map_err(kiln_backends::RunError::from)?;
        let mut longer = prompt.clone();
        longer.push(1);
        let longer = Tensor::from_tokens(&[longer]).map_err(kiln_backends::RunError::from)?;
        let mut d = Vec::new();
        let mut f = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            session.call("decode", std::slice::from_ref(&next))?;
            d.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            full.run(std::slice::from_ref(&longer))?;
            f.push(t.elapsed().as_secs_f64() * 1e3);
        }
        rows.push(DecodeTiming {
            cache_len: len,
            decode_ms: median(d),
            full_ms: median(f),
        });
    }
    Ok(rows)
}

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

/// What `kiln bench --output json` measures: compile time, then throughput
/// (medians over the repetitions after one warm-up), and the process's peak
/// resident memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    /// The backend's name.
    pub backend: &'static str,
    /// Threads of the backend (1 for the single-threaded executors).
    pub threads: usize,
    /// Seconds to optimize, lower and compile the entry points.
    pub compile_s: f64,
    /// A causal LM: prompt tokens per second through `prefill` (all rows).
    pub prefill_tok_s: Option<f64>,
    /// A causal LM: new tokens per second through greedy `decode` steps with
    /// the cache (all rows).
    pub decode_tok_s: Option<f64>,
    /// An encoder: sequences per second through the forward.
    pub forward_seq_s: Option<f64>,
    /// The process's peak resident set, in MB (`None` where unknown).
    pub peak_rss_mb: Option<f64>,
    /// A causal LM: row 0's first greedy tokens (the prefill's, then each
    /// decode step's; at most 8), to check runtimes agree.
    pub first_tokens: Vec<i64>,
}

impl Throughput {
    /// One JSON object: `{"backend", "threads", "compile_s", …}`.
    pub fn to_json(&self) -> String {
        let mut o = serde_json::Map::new();
        o.insert("backend".into(), self.backend.into());
        o.insert("threads".into(), self.threads.into());
        o.insert("compile_s".into(), self.compile_s.into());
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                o.insert(k.into(), v.into());
            }
        };
        put("prefill_tok_s", self.prefill_tok_s);
        put("decode_tok_s", self.decode_tok_s);
        put("forward_seq_s", self.forward_seq_s);
        o.insert(
            "peak_rss_mb".into(),
            self.peak_rss_mb.map_or(serde_json::Value::Null, Into::into),
        );
        if !self.first_tokens.is_empty() {
            o.insert("first_tokens".into(), self.first_tokens.clone().into());
        }
        serde_json::Value::Object(o).to_string()
    }
}

/// The workload of [`bench_throughput`].
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Rows.
    pub batch: usize,
    /// Prompt (or sequence) length.
    pub prompt_len: usize,
    /// Greedy decode steps after the prompt (causal LMs).
    pub decode: usize,
    /// Timed repetitions (after one warm-up).
    pub reps: usize,
}

/// The process's peak resident set in MB, from `/proc/self/status`.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Compile time and throughput of `model` on `target`: prefill and decode
/// tokens/s of a causal LM (through the session generation uses), or
/// sequences/s of an encoder's forward.
pub fn bench_throughput(model: &Model, target: Target, w: &Workload) -> Result<Throughput, Error> {
    let info = model
        .info()
        .cloned()
        .ok_or_else(|| Error::Unsupported("bench needs a model from a frontend".into()))?;
    if w.batch == 0 || w.prompt_len == 0 {
        return Err(Error::Input(
            "--batch and --prompt-len must be at least 1".into(),
        ));
    }
    let decode = if info.family.is_generative() {
        w.decode
    } else {
        0
    };
    let positions = w.prompt_len.saturating_add(decode);
    if let Some(max) = info.max_positions {
        if positions as i64 > max {
            return Err(Error::Input(format!(
                "--prompt-len {} + --decode {} needs {positions} positions, more than the model's {max}",
                w.prompt_len, w.decode
            )));
        }
    }
    let threads = match target {
        Target::Cpu { threads: 0 } => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Target::Cpu { threads } => threads,
        _ => 1,
    };
    let vocab = info.vocab_size.max(1);
    let rows: Vec<Vec<i64>> = (0..w.batch)
        .map(|r| {
            (0..w.prompt_len as i64)
                .map(|i| (i * 7 + r as i64 * 13 + 3) % vocab)
                .collect()
        })
        .collect();
    let reps = w.reps.max(1);
    let started = Instant::now();
    let optimized = model.optimize(crate::OptLevel::O2)?;
    let run_err = kiln_backends::RunError::from;
    if !info.family.is_generative() {
        let mut exe = optimized.compile(target)?;
        let compile_s = started.elapsed().as_secs_f64();
        let inputs = crate::RunInputs::tokens(rows);
        let mut times = Vec::new();
        for rep in 0..=reps {
            let t = Instant::now();
            optimized.run_with(exe.as_mut(), &inputs)?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        return Ok(Throughput {
            backend: target.name(),
            threads,
            compile_s,
            prefill_tok_s: None,
            decode_tok_s: None,
            forward_seq_s: Some(w.batch as f64 / median(times).max(1e-12)),
            peak_rss_mb: peak_rss_mb(),
            first_tokens: Vec::new(),
        });
    }
    if info.decoder_start_token_id.is_some() {
        return Err(Error::Unsupported(format!(
            "bench --output json times decoder-only models and encoders; {} is an encoder–decoder",
            model.origin()
        )));
    }
    let split = optimized.kv_split()?;
    let mut session = split.session(target, positions)?;
    let compile_s = started.elapsed().as_secs_f64();
    let prompt = Tensor::from_tokens(&rows).map_err(run_err)?;
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut first_tokens = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        let outs = session.call("prefill", std::slice::from_ref(&prompt))?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut logits = outs
            .into_iter()
            .find(|(n, _)| n == "logits")
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Unsupported("no logits output".into()))?;
        let t = Instant::now();
        for step in 0..=w.decode {
            let next = greedy_last(&logits)?;
            if rep == 0 && first_tokens.len() < 8 {
                first_tokens.push(next[0]);
            }
            if step == w.decode {
                break;
            }
            let tokens = Tensor::from_tokens(&next.iter().map(|&t| [t]).collect::<Vec<_>>())
                .map_err(run_err)?;
            let outs = session.call("decode", &[tokens])?;
            logits = outs
                .into_iter()
                .find(|(n, _)| n == "logits")
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Unsupported("no logits output".into()))?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(prefill_s);
            decode.push(decode_s);
        }
    }
    let tokens = |n: usize, s: Vec<f64>| (w.batch * n) as f64 / median(s).max(1e-12);
    Ok(Throughput {
        backend: target.name(),
        threads,
        compile_s,
        prefill_tok_s: Some(tokens(w.prompt_len, prefill)),
        decode_tok_s: (w.decode > 0).then(|| tokens(w.decode, decode)),
        forward_seq_s: None,
        peak_rss_mb: peak_rss_mb(),
        first_tokens,
    })
}

/// The greedy next token of every row from the last position of `[B, T, V]` logits.
fn greedy_last(logits: &Tensor) -> Result<Vec<i64>, Error> {
    let &[b, t, v] = logits.shape() else {
        return Err(Error::Unsupported(format!(
            "logits must be [B, T, V], got {logits}"
        )));
    };
    let data = logits
        .as_f32()
        .ok_or_else(|| Error::Unsupported("logits are not f32".into()))?;
    Ok((0..b)
        .map(|r| {
            let row = &data[(r * t + t - 1) * v..(r * t + t) * v];
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as i64
        })
        .collect())
}

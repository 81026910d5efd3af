//! candle on the CPU, a peer of `kiln bench --output json` and of the whole
//! `kiln generate` process (benches/compare.py).
//!
//! ```text
//! peer_candle bench <folder> [--batch B] [--prompt-len T] [--decode N] [--reps R] [--threads N]
//! peer_candle generate <folder> --tokens 3,10,17,... [--max-new-tokens N] [--ignore-eos] [--threads N]
//! ```
//!
//! `bench` mirrors benches/peer_torch.py: the same token ids, workloads and JSON
//! keys, with "backend": "candle". A LLaMA folder
//! (candle_transformers::models::llama): prefill of B x T tokens (the model
//! computes the last position's logits only), then N greedy decode steps with
//! the KV cache; a BERT folder (candle_transformers::models::bert, plus the
//! pooler, which candle's BertModel leaves out and PyTorch's runs): forward of
//! B x T with an all-ones mask. Medians over --reps after one warm-up;
//! compile_s is the load (config, safetensors into memory, model build).
//!
//! `generate` does what `kiln generate <folder> --tokens <ids>
//! --max-new-tokens N` does, for timing the whole process: load, prefill the
//! row, then greedy tokens with the KV cache, stopping at the model's
//! eos_token_id (unless --ignore-eos) or after N tokens; prints
//! `{"tokens": [...], "load_s", "prefill_s", "decode_s"}`.
//!
//! Threads: candle's CPU kernels (gemm, and its rayon-parallel ops) take their
//! thread count from RAYON_NUM_THREADS; --threads (default 2) sets it before
//! anything runs, unless RAYON_NUM_THREADS is set already, which then wins.
//! "threads" in the JSON is the count candle reports
//! (candle_core::utils::get_num_threads).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{bert, llama};
use serde_json::{json, Value};

const FIRST_TOKENS: usize = 8;

struct Args {
    mode: String,
    model: PathBuf,
    batch: usize,
    prompt_len: usize,
    decode: usize,
    reps: usize,
    threads: usize,
    tokens: Vec<u32>,
    max_new_tokens: usize,
    ignore_eos: bool,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let usage = "usage: peer_candle bench|generate <model folder> [--batch B] [--prompt-len T] [--decode N] \
                 [--reps R] [--threads N] [--tokens IDS] [--max-new-tokens N] [--ignore-eos]";
    let mode = it.next().context(usage)?;
    if mode != "bench" && mode != "generate" {
        bail!("{usage}");
    }
    let model = PathBuf::from(it.next().context(usage)?);
    let mut a = Args {
        mode,
        model,
        batch: 1,
        prompt_len: 128,
        decode: 64,
        reps: 3,
        threads: 2,
        tokens: Vec::new(),
        max_new_tokens: 16,
        ignore_eos: false,
    };
    while let Some(flag) = it.next() {
        if flag == "--ignore-eos" {
            a.ignore_eos = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<usize>().with_context(|| format!("{flag} {value}: not a number"));
        match flag.as_str() {
            "--batch" => a.batch = num()?,
            "--prompt-len" => a.prompt_len = num()?,
            "--decode" => a.decode = num()?,
            "--reps" => a.reps = num()?,
            "--threads" => a.threads = num()?,
            "--max-new-tokens" => a.max_new_tokens = num()?,
            "--tokens" => {
                a.tokens = value
                    .split(',')
                    .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: {s:?}")))
                    .collect::<Result<_>>()?
            }
            _ => bail!("unknown option {flag}\n{usage}"),
        }
    }
    if a.batch == 0 || a.prompt_len == 0 || a.reps == 0 || a.threads == 0 {
        bail!("--batch, --prompt-len, --reps and --threads must be at least 1");
    }
    Ok(a)
}

/// The same ids as benches/peer_torch.py: row r, position i -> (7 i + 13 r + 3) mod vocab.
fn prompt_ids(batch: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..batch)
        .flat_map(|r| (0..len).map(move |i| ((i * 7 + r * 13 + 3) % vocab) as u32))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn read_config(model: &Path) -> Result<Value> {
    let path = model.join("config.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn var_builder(model: &Path, dev: &Device) -> Result<VarBuilder<'static>> {
    let path = model.join("model.safetensors");
    // SAFETY: the file is not modified while it is mapped (candle copies the tensors out).
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, dev)? })
}

struct Llama {
    model: llama::Llama,
    cfg: llama::Config,
    eos: Vec<u32>,
}

fn load_llama(model: &Path, cfg_json: &Value, dev: &Device) -> Result<Llama> {
    let lc: llama::LlamaConfig = serde_json::from_value(cfg_json.clone())?;
    let cfg = lc.into_config(false);
    let eos = match &cfg.eos_token_id {
        Some(llama::LlamaEosToks::Single(t)) => vec![*t],
        Some(llama::LlamaEosToks::Multiple(ts)) => ts.clone(),
        None => vec![],
    };
    let model = llama::Llama::load(var_builder(model, dev)?, &cfg)?;
    Ok(Llama { model, cfg, eos })
}

impl Llama {
    fn cache(&self, dev: &Device) -> Result<llama::Cache> {
        Ok(llama::Cache::new(true, DType::F32, &self.cfg, dev)?)
    }
}

struct Bert {
    model: bert::BertModel,
    pooler: Option<candle_nn::Linear>,
}

fn load_bert(model: &Path, cfg_json: &Value, dev: &Device) -> Result<Bert> {
    let cfg: bert::Config = serde_json::from_value(cfg_json.clone())?;
    let vb = var_builder(model, dev)?;
    let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
    let pooler = if vb.contains_tensor("pooler.dense.weight") {
        Some(candle_nn::linear(cfg.hidden_size, cfg.hidden_size, vb.pp("pooler.dense"))?)
    } else {
        None
    };
    let model = bert::BertModel::load(vb, &cfg)?;
    Ok(Bert { model, pooler })
}

fn bench(a: &Args, dev: &Device) -> Result<Value> {
    let started = Instant::now();
    let cfg_json = read_config(&a.model)?;
    let model_type = cfg_json["model_type"].as_str().unwrap_or("").to_string();
    let vocab = cfg_json["vocab_size"].as_u64().context("config.json: vocab_size")? as usize;
    let ids = prompt_ids(a.batch, a.prompt_len, vocab);
    let ids = Tensor::from_vec(ids, (a.batch, a.prompt_len), dev)?;
    let mut out = json!({
        "backend": "candle",
        "threads": candle_core::utils::get_num_threads(),
    });
    match model_type.as_str() {
        "llama" => {
            let m = load_llama(&a.model, &cfg_json, dev)?;
            out["compile_s"] = json!(started.elapsed().as_secs_f64());
            let (mut pre, mut dec) = (Vec::new(), Vec::new());
            let mut first = Vec::new();
            for rep in 0..=a.reps {
                let mut cache = m.cache(dev)?;
                let t = Instant::now();
                let logits = m.model.forward(&ids, 0, &mut cache)?; // [B, vocab], last position
                let mut nxt = logits.argmax_keepdim(D::Minus1)?; // [B, 1] u32
                let p = t.elapsed().as_secs_f64();
                let mut toks = vec![nxt.i((0, 0))?.to_scalar::<u32>()?];
                let t = Instant::now();
                for step in 0..a.decode {
                    let logits = m.model.forward(&nxt, a.prompt_len + step, &mut cache)?;
                    nxt = logits.argmax_keepdim(D::Minus1)?;
                    if toks.len() < FIRST_TOKENS {
                        toks.push(nxt.i((0, 0))?.to_scalar::<u32>()?);
                    }
                }
                // argmax's result has been read back each step, so the work is done.
                let d = t.elapsed().as_secs_f64();
                if rep > 0 {
                    pre.push(p);
                    dec.push(d);
                }
                first = toks;
            }
            out["prefill_tok_s"] = json!((a.batch * a.prompt_len) as f64 / median(pre));
            if a.decode > 0 {
                out["decode_tok_s"] = json!((a.batch * a.decode) as f64 / median(dec));
            }
            out["first_tokens"] = json!(first);
        }
        "bert" => {
            let m = load_bert(&a.model, &cfg_json, dev)?;
            out["compile_s"] = json!(started.elapsed().as_secs_f64());
            let type_ids = ids.zeros_like()?;
            let mask = ids.ones_like()?;
            let mut times = Vec::new();
            for rep in 0..=a.reps {
                let t = Instant::now();
                let hidden = m.model.forward(&ids, &type_ids, Some(&mask))?;
                let pooled = match &m.pooler {
                    Some(p) => Some(p.forward(&hidden.i((.., 0))?)?.tanh()?),
                    None => None,
                };
                // candle's CPU ops run eagerly, so the outputs are computed here.
                std::hint::black_box((&hidden, &pooled));
                if rep > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            out["forward_seq_s"] = json!(a.batch as f64 / median(times));
        }
        other => bail!("peer_candle: model_type {other:?} is not supported (llama, bert)"),
    }
    out["peak_rss_mb"] = json!(peak_rss_mb());
    Ok(out)
}

fn generate(a: &Args, dev: &Device) -> Result<Value> {
    if a.tokens.is_empty() {
        bail!("generate needs --tokens");
    }
    let started = Instant::now();
    let cfg_json = read_config(&a.model)?;
    if cfg_json["model_type"].as_str() != Some("llama") {
        bail!("generate: LLaMA folders only");
    }
    let m = load_llama(&a.model, &cfg_json, dev)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut cache = m.cache(dev)?;
    let n = a.tokens.len();
    let t = Instant::now();
    let ids = Tensor::from_vec(a.tokens.clone(), (1, n), dev)?;
    let mut new = Vec::new();
    let mut prefill_s = 0.0;
    if a.max_new_tokens > 0 {
        let logits = m.model.forward(&ids, 0, &mut cache)?;
        let mut tok = logits.argmax(D::Minus1)?.i(0)?.to_scalar::<u32>()?;
        prefill_s = t.elapsed().as_secs_f64();
        new.push(tok);
        while new.len() < a.max_new_tokens && (a.ignore_eos || !m.eos.contains(&tok)) {
            let x = Tensor::new(&[[tok]], dev)?;
            let logits = m.model.forward(&x, n + new.len() - 1, &mut cache)?;
            tok = logits.argmax(D::Minus1)?.i(0)?.to_scalar::<u32>()?;
            new.push(tok);
        }
    }
    let decode_s = t.elapsed().as_secs_f64() - prefill_s;
    Ok(json!({
        "backend": "candle",
        "threads": candle_core::utils::get_num_threads(),
        "tokens": new,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

fn main() -> Result<()> {
    let a = parse_args()?;
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before any thread exists: candle and rayon's global pool read it on first use.
        std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    }
    let dev = Device::Cpu;
    let out = if a.mode == "bench" { bench(&a, &dev)? } else { generate(&a, &dev)? };
    println!("{out}");
    Ok(())
}

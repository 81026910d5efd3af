//! Hugging Face model folders: `config.json` + `model.safetensors`.
//!
//! The family is chosen by `model_type`; its builder makes the graph with symbolic
//! `B` and `T`; every weight in the file is then checked against the parameter type
//! the config implies. A missing, extra or mis-shaped tensor is an error naming the
//! tensor and both shapes. Weights are memory-mapped and converted to f32.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use kiln_ir::{Graph, Tensor};
use safetensors::{Dtype, SafeTensors};

use crate::bart::{build_bart, BartConfig};
use crate::bert::{build_bert, BertConfig};
use crate::bloom::{build_bloom, BloomConfig};
use crate::config::HfConfig;
use crate::gpt2::{build_gpt2, Gpt2Config};
use crate::llama::{build_llama, LlamaConfig};
use crate::t5::{build_t5, T5Config};
use crate::FrontendError;

/// The model families kiln reads from Hugging Face folders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `GPT2LMHeadModel`.
    Gpt2,
    /// `LlamaForCausalLM`.
    Llama,
    /// `BertModel`.
    Bert,
    /// `BartForConditionalGeneration`.
    Bart,
    /// `BloomForCausalLM`.
    Bloom,
    /// `MarianMTModel`.
    Marian,
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `T5ForConditionalGeneration`.
    T5,
}

impl Family {
    /// Every family, in the order the README lists them.
    pub const ALL: [Family; 8] = [
        Family::Gpt2,
        Family::Llama,
        Family::Mixtral,
        Family::Bert,
        Family::Bart,
        Family::Marian,
        Family::T5,
        Family::Bloom,
    ];

    /// The `model_type` it is read from.
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::Bart => "bart",
            Family::Bloom => "bloom",
            Family::Marian => "marian",
            Family::Mixtral => "mixtral",
            Family::T5 => "t5",
        }
    }

    /// The `config.json` key of the model's position limit.
    pub fn positions_key(&self) -> &'static str {
        match self {
            Family::Gpt2 => "n_positions",
            _ => "max_position_embeddings",
        }
    }

    /// Whether the model predicts next tokens (and so can `generate`).
    pub fn is_generative(self) -> bool {
        !matches!(self, Family::Bert)
    }
}

/// What running and generating need to know beyond the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// The family.
    pub family: Family,
    /// Vocabulary size: token ids must be below it.
    pub vocab_size: i64,
    /// Longest sequence the position scheme covers (`None` for RoPE models, whose
    /// limit is advisory).
    pub max_positions: Option<i64>,
    /// `eos_token_id`: generation stops at any of these.
    pub eos_token_ids: Vec<i64>,
    /// `decoder_start_token_id` of encoder–decoder models.
    pub decoder_start_token_id: Option<i64>,
}

/// A model loaded from a Hugging Face folder.
#[derive(Clone, Debug)]
pub struct HfModel {
    /// The forward graph.
    pub graph: Graph,
    /// Every parameter of the graph, by name (the checkpoint's and those the
    /// family computes, like ALiBi slopes).
    pub weights: BTreeMap<String, Tensor>,
    /// Family and token limits.
    pub info: ModelInfo,
}

/// Tensors that checkpoints carry but that are not weights (buffers).
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
}

/// Prefixes that checkpoints saved from a wrapper class put before the names the
/// base model uses (`bert.` from `BertForPreTraining`).
fn prefixes(family: Option<Family>) -> &'static [&'static str] {
    match family {
        Some(Family::Bert) => &["", "bert."],
        Some(Family::Bloom) => &["transformer.", ""],
        Some(
            Family::Gpt2
            | Family::Llama
            | Family::Mixtral
            | Family::Bart
            | Family::Marian
            | Family::T5,
        )
        | None => &[""],
    }
}

/// Which `config.json` key each symbol of a family's graph comes from.
const GPT2_KEYS: &[(&str, &str)] = &[
    ("V", "vocab_size"),
    ("P", "n_positions"),
    ("d", "n_embd"),
    ("h", "n_head"),
    ("f", "n_inner"),
];
const LLAMA_KEYS: &[(&str, &str)] = &[
    ("V", "vocab_size"),
    ("d", "hidden_size"),
    ("f", "intermediate_size"),
    ("h", "num_attention_heads"),
    ("hk", "num_key_value_heads"),
    ("dh", "head_dim"),
];
const BERT_KEYS: &[(&str, &str)] = &[
    ("V", "vocab_size"),
    ("P", "max_position_embeddings"),
    ("G", "type_vocab_size"),
    ("d", "hidden_size"),
    ("f", "intermediate_size"),
    ("h", "num_attention_heads"),
];
const BART_KEYS: &[(&str, &str)] = &[
    ("V", "vocab_size"),
    ("d", "d_model"),
    ("he", "encoder_attention_heads"),
    ("hd", "decoder_attention_heads"),
    ("fe", "encoder_ffn_dim"),
    ("fd", "decoder_ffn_dim"),
];

/// A graph-building error about symbols (`where dh = d / h: 32 is not
/// divisible by 5`) restated with the config file and the keys the
/// symbols come from, with their values.
fn explain(
    e: FrontendError,
    config_path: &Path,
    keys: &[(&str, &str)],
    c: &HfConfig,
) -> FrontendError {
    let FrontendError::Ir(ir) = &e else {
        return e;
    };
    let text = ir.to_string();
    if !text.starts_with("where ") {
        return e;
    }
    let words: BTreeSet<&str> = text
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .collect();
    let named: Vec<String> = keys
        .iter()
        .filter(|(sym, _)| words.contains(sym))
        .map(|(sym, key)| match c.get(key) {
            Some(v) => format!(
                "{sym} is `{key}` = {}",
                crate::config::clip(&v.to_string(), 40)
            ),
            None => format!("{sym} is `{key}` (absent: its default)"),
        })
        .collect();
    if named.is_empty() {
        return e;
    }
    FrontendError::ConfigContract(format!(
        "{}: {text} ({})",
        config_path.display(),
        named.join(", ")
    ))
}

/// A family's graph, what running it needs to know, and the weights it
/// computes rather than reads.
pub struct HfGraph {
    /// The forward graph.
    pub graph: Graph,
    /// Family and token limits.
    pub info: ModelInfo,
    /// Parameters computed from the config (ALiBi slopes, sinusoidal
    /// tables); a checkpoint that also holds one must agree with it.
    pub computed: BTreeMap<String, Tensor>,
    /// Parameters the checkpoint stores in parts (one tensor per expert),
    /// stacked along a new first axis when read.
    pub stacked: Vec<(String, Vec<String>)>,
}

/// Builds the graph and reads the config of the folder `dir`, without weights.
pub fn load_hf_graph(dir: &Path) -> Result<HfGraph, FrontendError> {
    let config_path = dir.join("config.json");
    if !dir.is_dir() {
        return Err(FrontendError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let c = HfConfig::read(&config_path)?;
    let model_type = c.model_type()?;
    let mut computed = BTreeMap::new();
    let mut stacked = Vec::new();
    let (family, graph, info) = match model_type.as_str() {
        "gpt2" => {
            let cfg = Gpt2Config::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::Gpt2,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.n_positions),
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: None,
            };
            (
                Family::Gpt2,
                build_gpt2(&cfg).map_err(|e| explain(e, &config_path, GPT2_KEYS, &c))?,
                info,
            )
        }
        "llama" => {
            let cfg = LlamaConfig::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::Llama,
                vocab_size: cfg.vocab_size,
                // RoPE has no table to run out of, but the model was made
                // for this many positions: kiln refuses more rather than
                // extrapolate silently (transformers only warns).
                max_positions: Some(cfg.max_position_embeddings),
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: None,
            };
            (
                Family::Llama,
                build_llama(&cfg).map_err(|e| explain(e, &config_path, LLAMA_KEYS, &c))?,
                info,
            )
        }
        "bert" => {
            let cfg = BertConfig::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::Bert,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.max_position_embeddings),
                eos_token_ids: Vec::new(),
                decoder_start_token_id: None,
            };
            (
                Family::Bert,
                build_bert(&cfg).map_err(|e| explain(e, &config_path, BERT_KEYS, &c))?,
                info,
            )
        }
        "bart" => {
            let cfg = BartConfig::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::Bart,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.max_position_embeddings),
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: Some(cfg.decoder_start_token_id),
            };
            (
                Family::Bart,
                build_bart(&cfg).map_err(|e| explain(e, &config_path, BART_KEYS, &c))?,
                info,
            )
        }
        "mixtral" => {
            let cfg = LlamaConfig::from_mixtral(&c)?;
            let info = ModelInfo {
                family: Family::Mixtral,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.max_position_embeddings),
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: None,
            };
            let mut keys = LLAMA_KEYS.to_vec();
            keys.push(("E", "num_local_experts"));
            let graph = build_llama(&cfg).map_err(|e| explain(e, &config_path, &keys, &c))?;
            stacked = crate::llama::expert_stacks(&cfg);
            (Family::Mixtral, graph, info)
        }
        "t5" => {
            let cfg = T5Config::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::T5,
                vocab_size: cfg.vocab_size,
                // Relative positions have no table to run out of.
                max_positions: None,
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: Some(cfg.decoder_start_token_id),
            };
            let graph = build_t5(&cfg).map_err(|e| explain(e, &config_path, T5Config::KEYS, &c))?;
            (Family::T5, graph, info)
        }
        "marian" => {
            let cfg = BartConfig::from_marian(&c)?;
            let info = ModelInfo {
                family: Family::Marian,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.max_position_embeddings),
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: Some(cfg.decoder_start_token_id),
            };
            let graph = build_bart(&cfg).map_err(|e| explain(e, &config_path, BART_KEYS, &c))?;
            computed = crate::bart::computed_weights(&cfg)?;
            (Family::Marian, graph, info)
        }
        "bloom" => {
            let cfg = BloomConfig::from_hf(&c)?;
            let info = ModelInfo {
                family: Family::Bloom,
                vocab_size: cfg.vocab_size,
                // ALiBi has no table to run out of and BLOOM configs name no limit.
                max_positions: None,
                eos_token_ids: c.ids("eos_token_id")?,
                decoder_start_token_id: None,
            };
            let keys = BloomConfig::keys(&c);
            let graph = build_bloom(&cfg).map_err(|e| explain(e, &config_path, &keys, &c))?;
            computed = crate::bloom::computed_weights(&cfg)?;
            (Family::Bloom, graph, info)
        }
        other => {
            return Err(FrontendError::Unsupported(format!(
                "{}: model_type {} is not supported (kiln reads gpt2, llama, mixtral, bert, bart, marian, t5 and bloom)",
                config_path.display(),
                crate::config::clip(&format!("{other:?}"), 80)
            )))
        }
    };
    debug_assert_eq!(family, info.family);
    // A stop token the model can never produce would silently never stop.
    if let Some(id) = info
        .eos_token_ids
        .iter()
        .find(|&&id| id < 0 || id >= info.vocab_size)
    {
        return Err(FrontendError::Config(format!(
            "{}: eos_token_id {id} is outside the vocabulary (vocab_size {})",
            config_path.display(),
            info.vocab_size
        )));
    }
    if let Some(id) = info
        .decoder_start_token_id
        .filter(|&id| id < 0 || id >= info.vocab_size)
    {
        return Err(FrontendError::Config(format!(
            "{}: decoder_start_token_id {id} is outside the vocabulary (vocab_size {})",
            config_path.display(),
            info.vocab_size
        )));
    }
    Ok(HfGraph {
        graph,
        info,
        computed,
        stacked,
    })
}

/// Loads a Hugging Face model folder: graph, checked weights and token limits.
pub fn load_hf_dir(dir: &Path) -> Result<HfModel, FrontendError> {
    let HfGraph {
        graph,
        info,
        computed,
        stacked,
    } = load_hf_graph(dir)?;
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        let sharded = dir.join("model.safetensors.index.json").exists();
        let bin = dir.join("pytorch_model.bin").exists();
        let why = if sharded {
            "sharded checkpoints (model.safetensors.index.json) are not supported yet"
        } else if bin {
            "only pytorch_model.bin is present; kiln reads safetensors (re-save with safe_serialization=True)"
        } else {
            "the folder has no model.safetensors"
        };
        return Err(FrontendError::Weights {
            path: weights_path,
            message: why.to_string(),
        });
    }
    let sources = Sources { computed, stacked };
    let weights = read_checkpoint(&weights_path, &graph, Some(info.family), &sources)?;
    Ok(HfModel {
        graph,
        weights,
        info,
    })
}

/// Reads `path` and returns exactly the graph's parameters, each checked against
/// the parameter's type.
pub fn read_weights(
    path: &Path,
    graph: &Graph,
    family: Option<Family>,
) -> Result<BTreeMap<String, Tensor>, FrontendError> {
    read_checkpoint(path, graph, family, &Sources::default())
}

/// Parameters that are not one checkpoint tensor each.
#[derive(Default)]
struct Sources {
    /// Computed from the config.
    computed: BTreeMap<String, Tensor>,
    /// Stacked from parts.
    stacked: Vec<(String, Vec<String>)>,
}

/// [`read_weights`], with the parameters in `computed` taken from it: a
/// tensor of the same name in the file must hold the same values (within
/// 1e-6 relative: the file's copy was computed by other code, in f32).
fn read_checkpoint(
    path: &Path,
    graph: &Graph,
    family: Option<Family>,
    sources: &Sources,
) -> Result<BTreeMap<String, Tensor>, FrontendError> {
    let computed = &sources.computed;
    let werr = |message: String| FrontendError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let mmap: Arc<MappedFile> = Arc::new(MappedFile(map_file(path)?));
    let source: Arc<dyn kiln_ir::tensor::ByteSource> = mmap.clone();
    let st = parse_safetensors(path, &mmap)?;
    let cx = kiln_ir::verify(graph).map_err(|e| FrontendError::Ir(e.into()))?;

    let names: BTreeSet<&str> = st.names().into_iter().collect();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for &p in graph.params() {
        let kiln_ir::NodeKind::Param { name } = &graph.node(p).kind else {
            continue;
        };
        let ty = graph.ty(p);
        let expected: Vec<usize> = ty
            .shape
            .iter()
            .map(|d| {
                cx.eval(d)
                    .ok()
                    .and_then(|v| v.as_const())
                    .map_or(0, |c| c.max(0) as usize)
            })
            .collect();
        let found = prefixes(family)
            .iter()
            .map(|pre| format!("{pre}{name}"))
            .find(|n| names.contains(n.as_str()));
        if let Some((_, parts)) = sources.stacked.iter().find(|(n, _)| n == name) {
            match stack_parts(&st, &names, family, parts, &expected) {
                Ok((t, part_names)) => {
                    for p in part_names {
                        used.insert(names.get(p.as_str()).copied().unwrap_or_default());
                    }
                    out.insert(name.clone(), t);
                }
                Err(why) => problems.push(why),
            }
            continue;
        }
        if let Some(value) = computed.get(name) {
            if let Some(file_name) = &found {
                used.insert(names.get(file_name.as_str()).copied().unwrap_or_default());
                let view = st
                    .tensor(file_name)
                    .map_err(|e| werr(format!("tensor `{file_name}`: {e}")))?;
                if let Some(why) = disagreement(&view, value) {
                    problems.push(format!(
                        "tensor `{file_name}` is computed from the config, and the file's copy disagrees: {why}"
                    ));
                }
            }
            out.insert(name.clone(), value.clone());
            continue;
        }
        let Some(file_name) = found else {
            problems.push(format!(
                "missing tensor `{name}` (expected {} {:?})",
                ty.dtype, expected
            ));
            continue;
        };
        let view = st
            .tensor(&file_name)
            .map_err(|e| werr(format!("tensor `{file_name}`: {e}")))?;
        used.insert(names.get(file_name.as_str()).copied().unwrap_or_default());
        if view.shape() != expected.as_slice() {
            problems.push(format!(
                "tensor `{file_name}` has shape {:?} but the model expects {:?} ({ty})",
                view.shape(),
                expected
            ));
            continue;
        }
        let t = mapped_tensor(&source, &mmap, &view, expected)
            .map_err(|m| werr(format!("tensor `{file_name}`: {m}")))?;
        out.insert(name.clone(), t);
    }
    for n in &names {
        let t5_copy = family == Some(Family::T5) && crate::t5::ignored(n);
        if !(used.contains(n) || is_buffer(n) || t5_copy) {
            problems.push(format!(
                "unexpected tensor `{n}` (the graph @{} has no such parameter)",
                graph.name
            ));
        }
    }
    if !problems.is_empty() {
        return Err(werr(problems.join("\n  ")));
    }
    Ok(out)
}

/// The tensors `parts` (each `expected` without its first axis) stacked
/// along a new first axis, and the file names they were found under. The
/// one copy kiln makes of checkpoint weights (parts are not adjacent in a
/// safetensors file); it keeps the parts' dtype, so f16/bf16 stay 16-bit.
fn stack_parts(
    st: &SafeTensors<'_>,
    names: &BTreeSet<&str>,
    family: Option<Family>,
    parts: &[String],
    expected: &[usize],
) -> Result<(Tensor, Vec<String>), String> {
    let part_shape = expected.get(1..).unwrap_or_default();
    if expected.first() != Some(&parts.len()) {
        return Err(format!(
            "{} parts for a stack of shape {expected:?}",
            parts.len()
        ));
    }
    let mut bytes: Vec<u8> = Vec::new();
    let mut dtype = None;
    let mut found = Vec::new();
    for part in parts {
        let Some(file_name) = prefixes(family)
            .iter()
            .map(|pre| format!("{pre}{part}"))
            .find(|n| names.contains(n.as_str()))
        else {
            return Err(format!(
                "missing tensor `{part}` (expected f32 {part_shape:?})"
            ));
        };
        let view = st
            .tensor(&file_name)
            .map_err(|e| format!("tensor `{file_name}`: {e}"))?;
        if view.shape() != part_shape {
            return Err(format!(
                "tensor `{file_name}` has shape {:?} but the model expects {part_shape:?}",
                view.shape()
            ));
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(format!(
                "tensor `{file_name}` has dtype {:?}; weights must be F32, F16 or BF16",
                view.dtype()
            ));
        }
        match dtype {
            None => dtype = Some(view.dtype()),
            Some(d) if d != view.dtype() => {
                return Err(format!(
                    "tensor `{file_name}` is {:?} but `{}` is {d:?}; the experts of one stack must share a dtype",
                    view.dtype(),
                    found.first().map_or("", |s: &String| s.as_str())
                ))
            }
            Some(_) => {}
        }
        bytes.extend_from_slice(view.data());
        found.push(file_name);
    }
    let shape = expected.to_vec();
    let t = match dtype {
        Some(Dtype::F16) => Tensor::from_vec(
            shape,
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        Some(Dtype::BF16) => Tensor::from_vec(
            shape,
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        _ => Tensor::from_vec(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    }
    .map_err(|e| e.to_string())?;
    Ok((t, found))
}

/// Where a file's copy of a computed tensor differs from it, if it does.
fn disagreement(view: &safetensors::tensor::TensorView<'_>, value: &Tensor) -> Option<String> {
    if view.shape() != value.shape() {
        return Some(format!(
            "shape {:?}, computed {:?}",
            view.shape(),
            value.shape()
        ));
    }
    let Some(file) = to_f32(view.dtype(), view.data()) else {
        return Some(format!("dtype {:?} is not a float type", view.dtype()));
    };
    let want = value.as_f32()?;
    let tol = match view.dtype() {
        Dtype::F32 => 1e-6,
        _ => 1e-2, // f16 / bf16 copies are rounded
    };
    file.iter().zip(want).enumerate().find_map(|(i, (&a, &b))| {
        let ok = (a - b).abs() as f64 <= tol * (1.0 + b.abs() as f64);
        (!ok).then(|| format!("element {i} is {a}, computed {b}"))
    })
}

/// A read-only memory map lent to tensors that read their bytes in place.
pub(crate) struct MappedFile(memmap2::Mmap);

// SAFETY: the map is read-only and never remapped, so `bytes` returns the same
// slice on every call (a file changed underneath the process is the hazard
// `map_file` documents).
unsafe impl kiln_ir::tensor::ByteSource for MappedFile {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    #[cfg(unix)]
    fn release(&self, offset: usize, len: usize) {
        if offset
            .checked_add(len)
            .is_some_and(|end| end <= self.0.len())
        {
            // SAFETY: a read-only file mapping: dropped pages are read from
            // the file again on the next access, so every byte a reader
            // sees stays the same.
            let _ = unsafe {
                self.0
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// A float tensor of a mapped safetensors file, read in place (f16 and bf16
/// stay 16-bit; a backend widens them as it reads). Copied only when the file
/// places it at an offset not aligned for its element type.
fn mapped_tensor(
    source: &Arc<dyn kiln_ir::tensor::ByteSource>,
    mmap: &MappedFile,
    view: &safetensors::tensor::TensorView<'_>,
    shape: Vec<usize>,
) -> Result<Tensor, String> {
    let dtype = match view.dtype() {
        Dtype::F32 => kiln_ir::DType::F32,
        Dtype::F16 => kiln_ir::DType::F16,
        Dtype::BF16 => kiln_ir::DType::BF16,
        other => {
            return Err(format!(
                "has dtype {other:?}; weights must be F32, F16 or BF16"
            ))
        }
    };
    let data = view.data();
    let offset = (data.as_ptr() as usize)
        .checked_sub(mmap.as_ptr() as usize)
        .filter(|o| o + data.len() <= mmap.len())
        .ok_or("lies outside the mapped file")?;
    let len = data.len() / dtype.size_bytes();
    let data = kiln_ir::TensorData::from_source(dtype, source.clone(), offset, len)
        .ok_or("its bytes do not hold its elements")?;
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

/// Memory-maps a weight file for reading.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap, FrontendError> {
    let file = std::fs::File::open(path).map_err(|source| FrontendError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read-only; weights are read in place for as long as
    // the model lives. A file truncated or rewritten underneath a running
    // process is the documented hazard of memory maps, accepted here as by
    // every mmap-based weight loader (candle, llama.cpp, safetensors' own).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| FrontendError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses the safetensors header of a mapped file.
pub(crate) fn parse_safetensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<SafeTensors<'a>, FrontendError> {
    SafeTensors::deserialize(bytes).map_err(|e| FrontendError::Weights {
        path: path.to_path_buf(),
        message: match header_problem(bytes) {
            Some(what) => format!("not a valid safetensors file: {what}"),
            None => format!("not a valid safetensors file: {e}"),
        },
    })
}

/// Which entry of a safetensors header is inconsistent, by name (the
/// library's own error does not say): an unknown dtype, offsets past the
/// data, or offsets that do not hold the shape's bytes.
fn header_problem(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let end = n.checked_add(8).filter(|&e| e <= bytes.len())?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..end]).ok()?;
    let data_len = bytes.len() - end;
    let clip = |s: &str| -> String {
        if s.chars().count() > 80 {
            format!("{}…", s.chars().take(80).collect::<String>())
        } else {
            s.to_string()
        }
    };
    for (name, entry) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let name = clip(name);
        let dtype = entry.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let size = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => {
                return Some(format!(
                    "tensor `{name}` has unknown dtype `{}`",
                    clip(other)
                ))
            }
        };
        let shape: Option<Vec<u64>> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let offsets: Option<Vec<u64>> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            return Some(format!(
                "tensor `{name}` needs a `shape` and two `data_offsets`"
            ));
        };
        let [begin, stop] = offsets[..] else {
            return Some(format!("tensor `{name}` needs two `data_offsets`"));
        };
        if begin > stop || stop > data_len as u64 {
            return Some(format!(
                "tensor `{name}`: data_offsets [{begin}, {stop}] lie outside the {data_len} bytes of data"
            ));
        }
        let need = shape.iter().try_fold(size as u64, |a, &d| a.checked_mul(d));
        if need != Some(stop - begin) {
            return Some(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} takes {} bytes, but data_offsets [{begin}, {stop}] hold {}",
                need.map_or("more than 2^64".to_string(), |b| b.to_string()),
                stop - begin
            ));
        }
    }
    None
}

/// Little-endian float data → f32; `None` for non-float dtypes.
pub(crate) fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

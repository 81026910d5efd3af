//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! [`LoraAdapter::read`] parses the config (rejecting every field that would
//! change what the adapter computes and that kiln does not implement: DoRA,
//! rank-stabilized scaling, per-module ranks, trained biases, …) and the tensors
//! (memory-mapped, f16/bf16 → f32). PEFT stores `lora_A` as `[r, in]` and
//! `lora_B` as `[out, r]` under `base_model.model.<module>.lora_{A,B}.weight`;
//! each pair belongs to the base parameter `<module>.weight`.
//!
//! [`insert_adapter`] rewrites a module so that it computes the adapter
//! *unmerged*: every `matmul(x, @<module>.weight)` becomes
//! `lora_linear(x, @<module>.weight, @<module>.lora_A.<slot>, @<module>.lora_B.<slot>)`
//! with `alpha = lora_alpha`, in the layout of the matmul (`out_in` for
//! `nn.Linear`, `in_out` for GPT-2 `Conv1D`, whose lora tensors are stored
//! transposed: `a = Aᵀ [in, r]`, `b = Bᵀ [r, out]`). `<slot>` names the adapter.
//!
//! Several adapters on one module are composed by **stacking ranks**, so a module
//! keeps exactly one `lora_linear` whatever the number of adapters:
//! `a = concat(a₁, a₂)` and `b = concat(b₁, b₂)` along the rank axis, which gives
//! `x·w + s·(x·a)·b = x·w + s·x·a₁·b₁ + s·x·a₂·b₂`. The node's scale
//! `s = alpha / (r₁ + r₂)` is that of the first adapter (`alpha` is raised with
//! the total rank), and each slot's `b` holds `B·(sᵢ / s)`: exactly PEFT's `B`
//! when the scales agree (always for the first adapter). `lora-merge` folds the
//! stacked node into one weight like any other.
//!
//! Unmerged adapters are run-time data: the graph depends only on the ranks and
//! target modules, never on the adapter's values, which are ordinary weights
//! (`<module>.lora_A.<slot>`, `<module>.lora_B.<slot>`). [`swap_adapter`] writes
//! another adapter of the same rank and targets into a slot's weights (rescaling
//! `B` to the node's `alpha`, an attribute of the graph) and leaves the graph as
//! it is: the printed IR is identical, so code generated for it stays valid and
//! only the weights are bound again (for the interpreter, `compile` is that
//! binding). A stack costs two small `concat`s of the factors per run.
//!
//! `target_modules` given as a list is checked against the model (every name
//! selects at least one linear layer, and every selected layer has tensors in
//! the file); given as a string (a regular expression, or `all-linear`) PEFT
//! matched it when it saved the file, so the modules in the file are taken as
//! its outcome. `fan_in_fan_out` needs no handling: PEFT stores `lora_A`/`lora_B`
//! the same way for both layer kinds and corrects the flag per layer, so the
//! layout comes from the model's matmul.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_ir::{
    Dim, Graph, IrError, Module, NodeKind, Op, ShapeCx, Tensor, TensorType, ValueId, WeightLayout,
    Weights,
};
use serde_json::Value;

use crate::FrontendError;

/// The prefix PEFT puts before every module path in the adapter file.
const KEY_PREFIX: &str = "base_model.model.";

/// Config keys that describe the adapter or only its training or
/// initialisation; they do not change what the adapter computes at inference.
const IGNORED_KEYS: [&str; 16] = [
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "peft_version",
    "inference_mode",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
];

/// Config keys kiln reads itself.
const READ_KEYS: [&str; 6] = [
    "r",
    "lora_alpha",
    "target_modules",
    "fan_in_fan_out",
    "bias",
    "peft_type",
];

/// Why a set field is not supported, for the fields whose meaning is known.
fn unsupported_reason(key: &str) -> &'static str {
    match key {
        "use_dora" => "DoRA rescales each weight by a learned magnitude vector",
        "use_rslora" => "rank-stabilized LoRA scales by lora_alpha / sqrt(r)",
        "modules_to_save" => "it replaces whole modules by trained copies",
        "layers_to_transform" => "it adapts only some layers",
        "rank_pattern" => "it gives modules their own rank",
        "alpha_pattern" => "it gives modules their own lora_alpha",
        "lora_bias" => "it trains a bias for lora_B",
        "target_parameters" => "it adapts raw parameters rather than linear layers",
        "exclude_modules" => "it removes modules from target_modules",
        "layer_replication" => "it duplicates layers of the base model",
        "trainable_token_indices" => "it trains rows of the embedding",
        "alora_invocation_tokens" => {
            "activated LoRA applies the adapter only after its invocation tokens"
        }
        "use_qalora" => "QA-LoRA pools the input before lora_A",
        "arrow_config" => "Arrow routes between several adapters per token",
        _ => "kiln applies plain LoRA only (W + lora_alpha / r · B·A)",
    }
}

/// The modules an adapter targets (`target_modules`).
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Names: a module is targeted when its path equals one of them or ends in
    /// `.` followed by one.
    Names(Vec<String>),
    /// A regular expression PEFT matched against full module paths (or
    /// `all-linear`); kiln takes the modules in the file as its outcome.
    Pattern(String),
}

impl TargetModules {
    /// Whether the names select the module at `path` (patterns select all).
    fn selects(&self, path: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|t| selects(t, path)),
            TargetModules::Pattern(_) => true,
        }
    }
}

/// PEFT's rule for one target name: the path is the name or ends in `.name`.
fn selects(target: &str, path: &str) -> bool {
    path == target
        || path
            .strip_suffix(target)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// The fields of `adapter_config.json` that determine what the adapter computes.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// `r`: the rank of every module's update.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// `target_modules`.
    pub target_modules: TargetModules,
    /// `fan_in_fan_out` (informative only: the layout comes from the model).
    pub fan_in_fan_out: bool,
}

impl LoraConfig {
    /// The factor of the low-rank update, `lora_alpha / r`.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Reads and checks `adapter_config.json` at `path`.
    pub fn read(path: &Path) -> Result<LoraConfig, FrontendError> {
        let text = std::fs::read_to_string(path).map_err(|source| FrontendError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        LoraConfig::parse(&text, path)
    }

    /// Parses and checks config JSON text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<LoraConfig, FrontendError> {
        let shown = path.display();
        let config = |msg: String| FrontendError::Config(format!("{shown}: {msg}"));
        let value: Value =
            serde_json::from_str(text).map_err(|e| config(format!("not valid JSON: {e}")))?;
        let Value::Object(fields) = &value else {
            return Err(config("expected a JSON object".into()));
        };
        let get = |key: &str| fields.get(key).filter(|v| !v.is_null());
        if let Some(t) = get("peft_type") {
            if t != "LORA" {
                return Err(FrontendError::Unsupported(format!(
                    "{shown}: `peft_type` = {t} is not supported; kiln reads LoRA adapters (\"LORA\")"
                )));
            }
        }
        if let Some(b) = get("bias") {
            if b != "none" {
                return Err(FrontendError::Unsupported(format!(
                    "{shown}: `bias` = {b} is not supported (the adapter trains biases of the base model); kiln supports \"none\""
                )));
            }
        }
        for (key, v) in fields {
            if READ_KEYS.contains(&key.as_str()) || IGNORED_KEYS.contains(&key.as_str()) {
                continue;
            }
            let unset = match v {
                Value::Null | Value::Bool(false) => true,
                Value::Object(m) => m.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::String(s) => s.is_empty(),
                _ => false,
            };
            if !unset {
                return Err(FrontendError::Unsupported(format!(
                    "{shown}: `{key}` = {v} is not supported ({})",
                    unsupported_reason(key)
                )));
            }
        }
        let r = match get("r") {
            Some(v) => match v.as_u64() {
                Some(r) if r > 0 => r as usize,
                _ => return Err(config(format!("`r` must be a positive integer, got {v}"))),
            },
            // PEFT's defaults for a field `save_pretrained` always writes.
            None => 8,
        };
        let lora_alpha = match get("lora_alpha") {
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| config(format!("`lora_alpha` must be a number, got {v}")))?,
            None => 8.0,
        };
        let target_modules = match get("target_modules") {
            Some(Value::String(s)) => TargetModules::Pattern(s.clone()),
            Some(Value::Array(items)) => {
                let names = items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        config(format!(
                            "`target_modules` must be a non-empty list of module names or a string, got {}",
                            Value::Array(items.clone())
                        ))
                    })?;
                TargetModules::Names(names)
            }
            Some(v) => {
                return Err(config(format!(
                    "`target_modules` must be a list of module names or a string, got {v}"
                )))
            }
            None => return Err(config("`target_modules` is missing".into())),
        };
        let fan_in_fan_out = match get("fan_in_fan_out") {
            Some(v) => v.as_bool().ok_or_else(|| {
                config(format!("`fan_in_fan_out` must be true or false, got {v}"))
            })?,
            None => false,
        };
        Ok(LoraConfig {
            r,
            lora_alpha,
            target_modules,
            fan_in_fan_out,
        })
    }
}

/// The two factors of one module's update, as PEFT stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `lora_A`: `[r, in]`.
    pub lora_a: Tensor,
    /// `lora_B`: `[out, r]`.
    pub lora_b: Tensor,
}

/// A PEFT LoRA adapter read from a folder.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    /// The folder it was read from.
    pub dir: PathBuf,
    /// The checked configuration.
    pub config: LoraConfig,
    /// The update of each adapted module, by the base parameter it updates
    /// (`<module>.weight`).
    pub modules: BTreeMap<String, LoraPair>,
}

impl LoraAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn read(dir: &Path) -> Result<LoraAdapter, FrontendError> {
        if !dir.is_dir() {
            return Err(FrontendError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a directory (expected a PEFT adapter folder)",
                ),
            });
        }
        let config = LoraConfig::read(&dir.join("adapter_config.json"))?;
        let path = dir.join("adapter_model.safetensors");
        if !path.exists() {
            let why = if dir.join("adapter_model.bin").exists() {
                "only adapter_model.bin is present; kiln reads safetensors (re-save with safe_serialization=True)"
            } else {
                "the folder has no adapter_model.safetensors"
            };
            return Err(FrontendError::Weights {
                path,
                message: why.to_string(),
            });
        }
        let tensors = read_f32_tensors(&path)?;
        let modules = pair_tensors(&path, &config, tensors)?;
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// A slot name derived from the folder name: letters, digits and `_` only.
    pub fn default_slot(&self) -> String {
        let raw = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut slot: String = raw
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if !slot.starts_with(|c: char| c.is_ascii_alphabetic()) {
            slot.insert_str(0, "adapter_");
        }
        slot
    }
}

/// Every tensor of a safetensors file, as f32, by name.
fn read_f32_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, FrontendError> {
    let werr = |message: String| FrontendError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let mmap = crate::hf::map_file(path)?;
    let st = crate::hf::parse_safetensors(path, &mmap)?;
    let mut out = BTreeMap::new();
    for name in st.names() {
        let view = st
            .tensor(name)
            .map_err(|e| werr(format!("tensor `{name}`: {e}")))?;
        let values = crate::hf::to_f32(view.dtype(), view.data()).ok_or_else(|| {
            werr(format!(
                "tensor `{name}` has dtype {:?}; adapter tensors must be F32, F16 or BF16",
                view.dtype()
            ))
        })?;
        let t = Tensor::f32(view.shape().to_vec(), values)
            .map_err(|e| werr(format!("tensor `{name}`: {e}")))?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Groups the file's tensors into one `lora_A`/`lora_B` pair per module, checking
/// names, ranks and the config's `r` and `target_modules`.
fn pair_tensors(
    path: &Path,
    config: &LoraConfig,
    tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, LoraPair>, FrontendError> {
    let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, t) in tensors {
        let split = name.strip_prefix(KEY_PREFIX).and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, true))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, false)))
        });
        let Some((module, is_a)) = split else {
            problems.push(format!(
                "unexpected tensor `{name}` (a LoRA adapter holds only `{KEY_PREFIX}<module>.lora_A.weight` and `.lora_B.weight`)"
            ));
            continue;
        };
        let entry = halves.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    let r = config.r;
    let mut out = BTreeMap::new();
    for (module, pair) in halves {
        let (Some(a), Some(b)) = pair else {
            let missing = if pair.0.is_none() { "lora_A" } else { "lora_B" };
            problems.push(format!(
                "module `{module}` has no {missing} tensor (`{KEY_PREFIX}{module}.{missing}.weight`)"
            ));
            continue;
        };
        if a.rank() != 2 || b.rank() != 2 || a.shape()[0] != r || b.shape()[1] != r {
            problems.push(format!(
                "module `{module}`: lora_A {:?} and lora_B {:?} do not have rank r = {r} (adapter_config.json `r`; expected lora_A [{r}, in] and lora_B [out, {r}])",
                a.shape(),
                b.shape()
            ));
            continue;
        }
        if !config.target_modules.selects(&module) {
            problems.push(format!(
                "module `{module}` has tensors but `target_modules` {:?} does not select it",
                config.target_modules
            ));
            continue;
        }
        out.insert(
            format!("{module}.weight"),
            LoraPair {
                module,
                lora_a: a,
                lora_b: b,
            },
        );
    }
    if out.is_empty() && problems.is_empty() {
        problems.push("the file holds no lora_A/lora_B tensors".into());
    }
    if !problems.is_empty() {
        return Err(FrontendError::Weights {
            path: path.to_path_buf(),
            message: problems.join("\n  "),
        });
    }
    Ok(out)
}

/// How a weight parameter is used as the weight of linear layers in a module.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearWeight {
    /// The storage layout (`out_in` for `matmul(x, w) transpose_b`).
    pub layout: WeightLayout,
    /// In-features.
    pub in_features: usize,
    /// Out-features.
    pub out_features: usize,
}

/// The op nodes of `g` that use parameter `w` as the weight of a linear layer:
/// `matmul(x, w)` (either transpose of `w`, never of `x`) or `lora_linear(x, w, …)`.
fn linear_uses(g: &Graph, w: ValueId) -> Vec<(ValueId, WeightLayout)> {
    g.users(w)
        .into_iter()
        .filter_map(|u| {
            let ops = g.operands(u);
            match g.op(u)? {
                Op::MatMul {
                    transpose_a: false,
                    transpose_b,
                } if ops.len() == 2 && ops[1] == w && ops[0] != w => Some((
                    u,
                    if *transpose_b {
                        WeightLayout::OutIn
                    } else {
                        WeightLayout::InOut
                    },
                )),
                Op::LoraLinear { layout, .. } if ops.get(1) == Some(&w) && ops[0] != w => {
                    Some((u, *layout))
                }
                _ => None,
            }
        })
        .collect()
}

/// The concrete value of `d`, if it has one.
fn concrete(cx: &ShapeCx, d: &Dim) -> Option<usize> {
    cx.eval(d)
        .ok()
        .and_then(|v| v.as_const())
        .and_then(|c| usize::try_from(c).ok())
}

/// Every parameter of `module` used as the weight of a linear layer, by name.
/// A weight used in both layouts is an error.
pub fn linear_weights(module: &Module) -> Result<BTreeMap<String, LinearWeight>, FrontendError> {
    let mut out: BTreeMap<String, LinearWeight> = BTreeMap::new();
    for g in &module.funcs {
        let cx = kiln_ir::verify(g).map_err(|e| FrontendError::Ir(e.into()))?;
        for &p in g.params() {
            let NodeKind::Param { name } = &g.node(p).kind else {
                continue;
            };
            let ty = g.ty(p);
            let uses = linear_uses(g, p);
            if ty.rank() != 2 || uses.is_empty() {
                continue;
            }
            let (Some(d0), Some(d1)) = (concrete(&cx, &ty.shape[0]), concrete(&cx, &ty.shape[1]))
            else {
                continue;
            };
            for (_, layout) in uses {
                let (in_features, out_features) = match layout {
                    WeightLayout::OutIn => (d1, d0),
                    WeightLayout::InOut => (d0, d1),
                };
                let lw = LinearWeight {
                    layout,
                    in_features,
                    out_features,
                };
                match out.get(name) {
                    Some(prev) if *prev != lw => {
                        return Err(FrontendError::Unsupported(format!(
                            "parameter `{name}` is used as a linear weight in both layouts ({:?} and {:?}); kiln cannot attach one LoRA update to both",
                            prev.layout, lw.layout
                        )))
                    }
                    _ => {
                        out.insert(name.clone(), lw);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Checks that `adapter` fits `module`: every target name selects a linear layer,
/// every selected layer has tensors, and every pair fits its base weight.
pub fn check_adapter(module: &Module, adapter: &LoraAdapter) -> Result<(), FrontendError> {
    let linears = linear_weights(module)?;
    let config_path = adapter.dir.join("adapter_config.json");
    let mut problems = Vec::new();
    if let TargetModules::Names(names) = &adapter.config.target_modules {
        for t in names {
            let selected: Vec<&String> = linears
                .keys()
                .filter(|w| w.strip_suffix(".weight").is_some_and(|m| selects(t, m)))
                .collect();
            if selected.is_empty() {
                let known: BTreeSet<&str> = linears
                    .keys()
                    .filter_map(|w| w.strip_suffix(".weight"))
                    .filter_map(|m| m.rsplit('.').next())
                    .collect();
                problems.push(format!(
                    "target module `{t}` matches no linear layer of the model (its linear layers are named {})",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            for w in selected {
                if !adapter.modules.contains_key(w) {
                    problems.push(format!(
                        "target module `{t}` selects `{}`, but the adapter has no lora_A/lora_B for it",
                        w.trim_end_matches(".weight")
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(FrontendError::Config(format!(
            "{}:\n  {}",
            config_path.display(),
            problems.join("\n  ")
        )));
    }
    let declared = |name: &str| module.funcs.iter().any(|g| g.param_by_name(name).is_some());
    for (w, pair) in &adapter.modules {
        let (a, b) = (pair.lora_a.shape(), pair.lora_b.shape());
        let Some(lw) = linears.get(w) else {
            problems.push(if declared(w) {
                format!(
                    "module `{}`: the parameter `{w}` is not the weight of a matmul (kiln applies LoRA to linear layers only)",
                    pair.module
                )
            } else {
                format!(
                    "module `{}`: the model has no parameter `{w}`",
                    pair.module
                )
            });
            continue;
        };
        if a[1] != lw.in_features || b[0] != lw.out_features {
            let (stored, layout) = match lw.layout {
                WeightLayout::OutIn => ([lw.out_features, lw.in_features], "[out, in]"),
                WeightLayout::InOut => ([lw.in_features, lw.out_features], "[in, out]"),
            };
            problems.push(format!(
                "module `{}`: lora_A {a:?} and lora_B {b:?} do not fit the weight `{w}` {stored:?} ({layout}): expected lora_A [r, {}] and lora_B [{}, r]",
                pair.module, lw.in_features, lw.out_features
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FrontendError::Weights {
            path: adapter.dir.join("adapter_model.safetensors"),
            message: problems.join("\n  "),
        });
    }
    Ok(())
}

/// The parameter names of `slot`'s factors for the base weight `weight`:
/// `<module>.lora_A.<slot>` and `<module>.lora_B.<slot>`.
pub fn slot_param_names(weight: &str, slot: &str) -> (String, String) {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    (
        format!("{module}.lora_A.{slot}"),
        format!("{module}.lora_B.{slot}"),
    )
}

/// The adapter slots of `module`: the `<slot>` of every `….lora_A.<slot>` parameter.
pub fn adapter_slots(module: &Module) -> BTreeSet<String> {
    module
        .funcs
        .iter()
        .flat_map(|g| g.params().iter().map(move |&p| &g.node(p).kind))
        .filter_map(|k| match k {
            NodeKind::Param { name } => name.rsplit_once(".lora_A.").map(|(_, s)| s.to_string()),
            _ => None,
        })
        .collect()
}

/// The axes along which `a` and `b` hold the rank, per layout.
fn rank_axes(layout: WeightLayout) -> (usize, usize) {
    match layout {
        WeightLayout::OutIn => (0, 1),
        WeightLayout::InOut => (1, 0),
    }
}

/// A row-major `[m, n]` f32 matrix transposed to `[n, m]`.
fn transposed(t: &Tensor) -> Option<Tensor> {
    let (m, n) = (t.shape()[0], t.shape()[1]);
    let v = t.as_f32()?;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[j * m + i] = v[i * n + j];
        }
    }
    Tensor::f32(vec![n, m], out).ok()
}

/// The tensors of a slot's `a` and `b` parameters for `pair` in `layout`, with
/// `b` multiplied by `k` (the adapter's scale over the node's).
fn slot_tensors(pair: &LoraPair, layout: WeightLayout, k: f64) -> Option<(Tensor, Tensor)> {
    let (a, b) = match layout {
        WeightLayout::OutIn => (pair.lora_a.clone(), pair.lora_b.clone()),
        WeightLayout::InOut => (transposed(&pair.lora_a)?, transposed(&pair.lora_b)?),
    };
    if k == 1.0 {
        return Some((a, b));
    }
    let scaled: Vec<f32> = b.as_f32()?.iter().map(|&x| (x as f64 * k) as f32).collect();
    Some((a, Tensor::f32(b.shape().to_vec(), scaled).ok()?))
}

/// The shape context (compile-time bindings) of every function, verified.
fn shape_contexts(module: &Module) -> Result<Vec<ShapeCx>, FrontendError> {
    module
        .funcs
        .iter()
        .map(|g| kiln_ir::verify(g).map_err(|e| FrontendError::Ir(e.into())))
        .collect()
}

fn build_error(message: String) -> FrontendError {
    FrontendError::Ir(IrError::Build(message))
}

/// The factor parameters behind a `lora_linear` operand: the parameter itself,
/// or the parameters of a `concat` along the rank axis (stacked adapters).
fn factor_params(g: &Graph, v: ValueId, axis: usize) -> Option<Vec<ValueId>> {
    let is_param = |x: ValueId| matches!(g.node(x).kind, NodeKind::Param { .. });
    if is_param(v) {
        return Some(vec![v]);
    }
    match g.op(v)? {
        Op::Concat { axis: ax } if (*ax == axis as i64 || *ax == axis as i64 - 2) => {
            let parts = g.operands(v);
            parts.iter().all(|&p| is_param(p)).then_some(parts)
        }
        _ => None,
    }
}

/// Adds an op node typed by its shape rule.
fn add_typed(
    g: &mut Graph,
    cx: &ShapeCx,
    op: Op,
    operands: &[ValueId],
) -> Result<ValueId, FrontendError> {
    let tys: Vec<TensorType> = operands.iter().map(|&o| g.ty(o).clone()).collect();
    let ty = op.infer(&tys, cx).map_err(|e| IrError::Shape {
        node: format!("{} inserted for a LoRA adapter", op.name()),
        source: Box::new(e),
    })?;
    Ok(g.add_op(op, operands, ty, None))
}

/// Makes op node `u` compute `op` on `operands`, re-typed by the shape rule.
fn rewrite(
    g: &mut Graph,
    cx: &ShapeCx,
    u: ValueId,
    op: Op,
    operands: &[ValueId],
) -> Result<(), FrontendError> {
    let tys: Vec<TensorType> = operands.iter().map(|&o| g.ty(o).clone()).collect();
    let ty = op.infer(&tys, cx).map_err(|e| IrError::Shape {
        node: format!("{} rewritten for a LoRA adapter", op.name()),
        source: Box::new(e),
    })?;
    let node = g.node_mut(u);
    if let NodeKind::Op { op: slot, .. } = &mut node.kind {
        *slot = op;
    }
    node.ty = ty;
    g.set_operands(u, operands);
    Ok(())
}

/// What [`insert_adapter`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InsertReport {
    /// The base weights that received the adapter, by name.
    pub modules: Vec<String>,
    /// How many `matmul` nodes became `lora_linear`.
    pub new_nodes: usize,
    /// How many existing `lora_linear` nodes had the adapter stacked onto them.
    pub stacked_nodes: usize,
}

/// Inserts `adapter` unmerged into `module` under the name `slot` (letters,
/// digits, `_`), adding its factors to `weights`. On error nothing is changed.
pub fn insert_adapter(
    module: &mut Module,
    weights: &mut Weights,
    adapter: &LoraAdapter,
    slot: &str,
) -> Result<InsertReport, FrontendError> {
    if slot.is_empty()
        || !slot.starts_with(|c: char| c.is_ascii_alphabetic())
        || !slot.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(FrontendError::Config(format!(
            "adapter slot name `{slot}` must start with a letter and hold only letters, digits and `_`"
        )));
    }
    if adapter_slots(module).contains(slot) {
        return Err(FrontendError::Config(format!(
            "the model already has an adapter in slot `{slot}`; choose another name or swap it"
        )));
    }
    check_adapter(module, adapter)?;
    let mut new_module = module.clone();
    // The compile-time bindings of each function (rewrites do not change them).
    let cxs = shape_contexts(module)?;
    let mut new_weights: Vec<(String, Tensor)> = Vec::new();
    let mut report = InsertReport::default();
    let scale = adapter.config.scale();
    for (w_name, pair) in &adapter.modules {
        let (a_name, b_name) = slot_param_names(w_name, slot);
        if weights.contains_key(&a_name) || weights.contains_key(&b_name) {
            return Err(FrontendError::Config(format!(
                "the weights already hold `{a_name}` or `{b_name}`"
            )));
        }
        // The factor `k` by which this slot's B is stored; equal in every use.
        let mut k: Option<(f64, WeightLayout)> = None;
        for (g, cx) in new_module.funcs.iter_mut().zip(&cxs) {
            let Some(w) = g.param_by_name(w_name) else {
                continue;
            };
            let uses = linear_uses(g, w);
            let Some(&(_, layout)) = uses.first() else {
                continue;
            };
            let w_ty = g.ty(w).clone();
            let in_dim = match layout {
                WeightLayout::OutIn => w_ty.shape[1].clone(),
                WeightLayout::InOut => w_ty.shape[0].clone(),
            };
            let out_dim = match layout {
                WeightLayout::OutIn => w_ty.shape[0].clone(),
                WeightLayout::InOut => w_ty.shape[1].clone(),
            };
            let r = Dim::constant(adapter.config.r as i64);
            let (a_shape, b_shape) = match layout {
                WeightLayout::OutIn => (vec![r.clone(), in_dim], vec![out_dim, r]),
                WeightLayout::InOut => (vec![in_dim, r.clone()], vec![r, out_dim]),
            };
            let a_p = g.add_param(&a_name, TensorType::new(w_ty.dtype, a_shape));
            let b_p = g.add_param(&b_name, TensorType::new(w_ty.dtype, b_shape));
            let (a_axis, b_axis) = rank_axes(layout);
            for (u, _) in uses {
                let ops = g.operands(u);
                let (node_k, new_op, new_ops) = match g.op(u) {
                    Some(Op::LoraLinear { alpha, layout: l }) => {
                        let (alpha, l) = (*alpha, *l);
                        let stacked = |v: ValueId, axis: usize| {
                            factor_params(g, v, axis).ok_or_else(|| {
                                FrontendError::Unsupported(format!(
                                    "module `{}` already has a lora_linear whose factors are not adapter parameters; kiln stacks adapters only onto those it inserted",
                                    pair.module
                                ))
                            })
                        };
                        let mut a_parts = stacked(ops[2], a_axis)?;
                        let mut b_parts = stacked(ops[3], b_axis)?;
                        let old_rank = concrete(cx, &g.ty(ops[2]).shape[a_axis])
                            .filter(|&r| r > 0)
                            .ok_or_else(|| {
                                build_error(format!(
                                    "module `{}`: the existing lora_linear has no concrete rank",
                                    pair.module
                                ))
                            })?;
                        let node_scale = alpha / old_rank as f64;
                        if !(node_scale.is_finite() && node_scale != 0.0) {
                            // Later adapters are rescaled relative to the node's
                            // scale, which a zero-alpha first adapter makes zero.
                            return Err(build_error(format!(
                                "module `{}`: cannot stack another adapter onto one with lora_alpha {alpha} (its update scale is 0); apply the adapters in another order",
                                pair.module
                            )));
                        }
                        a_parts.push(a_p);
                        b_parts.push(b_p);
                        let a_cat = add_typed(
                            g,
                            cx,
                            Op::Concat {
                                axis: a_axis as i64,
                            },
                            &a_parts,
                        )?;
                        let b_cat = add_typed(
                            g,
                            cx,
                            Op::Concat {
                                axis: b_axis as i64,
                            },
                            &b_parts,
                        )?;
                        let mut new_ops = vec![ops[0], w, a_cat, b_cat];
                        new_ops.extend(ops.get(4).copied());
                        let op = Op::LoraLinear {
                            alpha: node_scale * (old_rank + adapter.config.r) as f64,
                            layout: l,
                        };
                        report.stacked_nodes += 1;
                        (scale / node_scale, op, new_ops)
                    }
                    _ => {
                        let op = Op::LoraLinear {
                            alpha: adapter.config.lora_alpha,
                            layout,
                        };
                        report.new_nodes += 1;
                        (1.0, op, vec![ops[0], w, a_p, b_p])
                    }
                };
                match k {
                    Some((prev, _)) if (prev - node_k).abs() > 1e-12 * prev.abs().max(1.0) => {
                        return Err(FrontendError::Unsupported(format!(
                            "module `{}` has lora_linear nodes with different scales; kiln cannot share one adapter slot between them",
                            pair.module
                        )))
                    }
                    _ => k = Some((node_k, layout)),
                }
                let old_factors = [ops.get(2).copied(), ops.get(3).copied()];
                rewrite(g, cx, u, new_op, &new_ops)?;
                // A concat of an earlier stack that nothing uses any more.
                for v in old_factors.into_iter().flatten() {
                    if g.contains(v) && g.op(v).is_some() && g.is_dead(v) {
                        g.remove_node(v);
                    }
                }
            }
        }
        let Some((k, layout)) = k else {
            return Err(build_error(format!(
                "module `{}`: no linear use of `{w_name}` found",
                pair.module
            )));
        };
        let (a, b) = slot_tensors(pair, layout, k).ok_or_else(|| {
            build_error(format!(
                "module `{}`: lora tensors are not f32 matrices",
                pair.module
            ))
        })?;
        new_weights.push((a_name, a));
        new_weights.push((b_name, b));
        report.modules.push(w_name.clone());
    }
    kiln_ir::verify_module(&new_module).map_err(|e| FrontendError::Ir(e.into()))?;
    *module = new_module;
    weights.extend(new_weights);
    Ok(report)
}

/// The `lora_linear` node of `g` whose factor `a` (directly or through a stack)
/// is parameter `p`, with its layout, alpha and total rank.
fn lora_user(g: &Graph, cx: &ShapeCx, p: ValueId) -> Option<(WeightLayout, f64, usize)> {
    let direct = g.users(p);
    let via_concat = direct
        .iter()
        .filter(|&&u| matches!(g.op(u), Some(Op::Concat { .. })))
        .flat_map(|&u| g.users(u));
    direct
        .iter()
        .copied()
        .chain(via_concat)
        .find_map(|u| match g.op(u)? {
            Op::LoraLinear { alpha, layout } => {
                let a = *g.operands(u).get(2)?;
                let (a_axis, _) = rank_axes(*layout);
                let rank = concrete(cx, &g.ty(a).shape[a_axis])?;
                Some((*layout, *alpha, rank))
            }
            _ => None,
        })
}

/// Writes `adapter` into the weights of the existing `slot`, leaving the module
/// unchanged: the adapter must adapt the same modules with the same rank. `B` is
/// rescaled to the `alpha` of the nodes, so `lora_alpha` may differ.
pub fn swap_adapter(
    module: &Module,
    weights: &mut Weights,
    adapter: &LoraAdapter,
    slot: &str,
) -> Result<(), FrontendError> {
    let suffix = format!(".lora_A.{slot}");
    let mut slot_weights: BTreeSet<String> = BTreeSet::new();
    for g in &module.funcs {
        for &p in g.params() {
            if let NodeKind::Param { name } = &g.node(p).kind {
                if let Some(m) = name.strip_suffix(&suffix) {
                    slot_weights.insert(format!("{m}.weight"));
                }
            }
        }
    }
    if slot_weights.is_empty() {
        let slots: Vec<String> = adapter_slots(module).into_iter().collect();
        return Err(FrontendError::Config(format!(
            "the model has no adapter slot `{slot}` (slots: {}); merged adapters cannot be swapped",
            if slots.is_empty() {
                "none".to_string()
            } else {
                slots.join(", ")
            }
        )));
    }
    let given: BTreeSet<String> = adapter.modules.keys().cloned().collect();
    if given != slot_weights {
        let strip = |s: &String| s.trim_end_matches(".weight").to_string();
        let missing: Vec<String> = slot_weights.difference(&given).map(strip).collect();
        let extra: Vec<String> = given.difference(&slot_weights).map(strip).collect();
        return Err(FrontendError::Config(format!(
            "{}: swapping into slot `{slot}` needs an adapter of the same modules (missing: [{}], not in the slot: [{}]); insert it as a new adapter instead",
            adapter.dir.display(),
            missing.join(", "),
            extra.join(", ")
        )));
    }
    let cxs = shape_contexts(module)?;
    let mut updates = Vec::new();
    for (w_name, pair) in &adapter.modules {
        let (a_name, b_name) = slot_param_names(w_name, slot);
        let mut found = None;
        for (g, cx) in module.funcs.iter().zip(&cxs) {
            if let Some(p) = g.param_by_name(&a_name) {
                if let Some(u) = lora_user(g, cx, p) {
                    found = Some(u);
                    break;
                }
            }
        }
        let Some((layout, alpha, rank)) = found else {
            return Err(build_error(format!(
                "module `{}`: `{a_name}` feeds no lora_linear",
                pair.module
            )));
        };
        let k = adapter.config.scale() / (alpha / rank as f64);
        let (a, b) = slot_tensors(pair, layout, k).ok_or_else(|| {
            build_error(format!(
                "module `{}`: lora tensors are not f32 matrices",
                pair.module
            ))
        })?;
        for (name, t) in [(&a_name, &a), (&b_name, &b)] {
            let old = weights.get(name).map(|o| o.shape().to_vec());
            if old.as_deref() != Some(t.shape()) {
                return Err(FrontendError::Weights {
                    path: adapter.dir.join("adapter_model.safetensors"),
                    message: format!(
                        "module `{}`: slot `{slot}` holds `{name}` as {:?} but the adapter gives {:?} (lora_A {:?}, lora_B {:?}); swapping needs the same rank, insert it as a new adapter instead",
                        pair.module,
                        old.unwrap_or_default(),
                        t.shape(),
                        pair.lora_a.shape(),
                        pair.lora_b.shape()
                    ),
                });
            }
        }
        updates.push((a_name, a));
        updates.push((b_name, b));
    }
    weights.extend(updates);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LoraConfig, FrontendError> {
        LoraConfig::parse(text, Path::new("adapter_config.json"))
    }

    #[test]
    fn target_names_select_by_suffix() {
        assert!(selects("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(selects(
            "self_attn.q_proj",
            "model.layers.0.self_attn.q_proj"
        ));
        assert!(selects("q_proj", "q_proj"));
        assert!(!selects("proj", "model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn config_fields_that_change_semantics_are_unsupported() {
        let ok = r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": false,
                     "rank_pattern": {}, "init_lora_weights": true, "lora_dropout": 0.1}"#;
        let c = parse(ok).expect("plain LoRA");
        assert_eq!(c.scale(), 2.0);
        for (field, value) in [
            ("use_dora", "true"),
            ("use_rslora", "true"),
            ("modules_to_save", "[\"lm_head\"]"),
            ("layers_to_transform", "[0]"),
            ("rank_pattern", "{\"q_proj\": 8}"),
            ("alpha_pattern", "{\"q_proj\": 8}"),
            ("some_future_option", "1"),
        ] {
            let text = format!(
                r#"{{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "{field}": {value}}}"#
            );
            let err = parse(&text).expect_err(field).to_string();
            assert!(
                err.starts_with("unsupported model: adapter_config.json: `") && err.contains(field),
                "{err}"
            );
        }
        let err = parse(r#"{"r": 4, "target_modules": ["q"], "bias": "all"}"#)
            .expect_err("bias")
            .to_string();
        assert!(err.contains("`bias` = \"all\""), "{err}");
    }

    #[test]
    fn target_modules_may_be_a_pattern() {
        let c = parse(r#"{"r": 2, "target_modules": ".*\\.q_proj"}"#).expect("pattern");
        assert_eq!(
            c.target_modules,
            TargetModules::Pattern(".*\\.q_proj".into())
        );
        assert_eq!(c.lora_alpha, 8.0, "PEFT's default");
        assert!(parse(r#"{"r": 0, "target_modules": ["q"]}"#).is_err());
        assert!(parse(r#"{"r": 2}"#).is_err(), "no target_modules");
    }

    #[test]
    fn transposes_row_major_matrices() {
        let t = Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("tensor");
        let tt = transposed(&t).expect("f32");
        assert_eq!(tt.shape(), &[3, 2]);
        assert_eq!(tt.as_f32(), Some(&[1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0][..]));
    }
}

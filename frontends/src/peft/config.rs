//! Reading and checking `adapter_config.json`: the fields kiln reads, the ones it
//! ignores, and every other set field rejected with the reason.

use std::path::Path;

use serde_json::Value;

use crate::FrontendError;

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

/// As written in `adapter_config.json`: `["q_proj", "v_proj"]` or the
/// pattern in quotes (messages must not show Rust's debug text).
impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::Names(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
            TargetModules::Pattern(p) => write!(f, "{p:?}"),
        }
    }
}

impl TargetModules {
    /// Whether the names select the module at `path` (patterns select all).
    pub(super) fn selects(&self, path: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|t| selects(t, path)),
            TargetModules::Pattern(_) => true,
        }
    }
}

/// PEFT's rule for one target name: the path is the name or ends in `.name`.
pub(super) fn selects(target: &str, path: &str) -> bool {
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
        let text = kiln_ir::files::read_text_limited(
            path,
            kiln_ir::files::CONFIG_LIMIT,
            "adapter configuration",
        )
        .map_err(|source| FrontendError::Io {
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
}

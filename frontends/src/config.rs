//! Reading Hugging Face `config.json` files: typed accessors whose errors name the
//! file and the field, and checks that reject fields whose value would change the
//! model's meaning in a way kiln does not implement.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::FrontendError;

/// Largest size a config may give (2^31).
const MAX_SIZE: i64 = 1 << 31;
/// Largest layer count a config may give.
const MAX_LAYERS: i64 = 1024;

/// A parsed `config.json`.
#[derive(Clone, Debug)]
pub struct HfConfig {
    path: PathBuf,
    value: Value,
}

impl HfConfig {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<HfConfig, FrontendError> {
        let text = kiln_ir::files::read_text_limited(
            path,
            kiln_ir::files::CONFIG_LIMIT,
            "model configuration",
        )
        .map_err(|source| FrontendError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        HfConfig::parse(&text, path)
    }

    /// Parses JSON text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<HfConfig, FrontendError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            FrontendError::Config(format!("{}: not valid JSON: {e}", path.display()))
        })?;
        if !value.is_object() {
            return Err(FrontendError::Config(format!(
                "{}: expected a JSON object",
                path.display()
            )));
        }
        Ok(HfConfig {
            path: path.to_path_buf(),
            value,
        })
    }

    fn err(&self, key: &str, what: &str) -> FrontendError {
        FrontendError::Config(format!(
            "{}: `{}` {}",
            self.path.display(),
            clip(key, 80),
            clip(what, 240)
        ))
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw value of `key`, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// `model_type`.
    pub fn model_type(&self) -> Result<String, FrontendError> {
        self.string("model_type")
    }

    /// A required positive size, at most 2^31 (larger values describe no model
    /// that fits in memory and would overflow size arithmetic).
    pub fn int(&self, key: &str) -> Result<i64, FrontendError> {
        self.bounded(key, MAX_SIZE)
    }

    /// A required positive layer count, at most 1024.
    pub fn layers(&self, key: &str) -> Result<usize, FrontendError> {
        Ok(self.bounded(key, MAX_LAYERS)? as usize)
    }

    fn bounded(&self, key: &str, max: i64) -> Result<i64, FrontendError> {
        match self.get(key) {
            Some(v) => match v.as_i64() {
                Some(i) if i > 0 && i <= max => Ok(i),
                Some(i) if i > max => {
                    Err(self.err(key, &format!("= {i} is larger than kiln accepts ({max})")))
                }
                _ => Err(self.err(key, &format!("must be a positive integer, got {v}"))),
            },
            None => Err(self.err(key, "is missing")),
        }
    }

    /// A non-negative float with a default (epsilons).
    pub fn non_negative_or(&self, key: &str, default: f64) -> Result<f64, FrontendError> {
        let x = self.float_or(key, default)?;
        if x.is_finite() && x >= 0.0 {
            Ok(x)
        } else {
            Err(self.err(key, &format!("must be a finite number >= 0, got {x}")))
        }
    }

    /// Token ids given as one id or a list of ids (`eos_token_id: [128001, 128009]`).
    pub fn ids(&self, key: &str) -> Result<Vec<i64>, FrontendError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| match v.as_i64() {
                    Some(i) if i >= 0 => Ok(i),
                    _ => Err(self.err(key, &format!("must hold token ids, got {v}"))),
                })
                .collect(),
            Some(_) => Ok(self.opt_id(key)?.into_iter().collect()),
        }
    }

    /// An optional positive integer.
    pub fn opt_int(&self, key: &str) -> Result<Option<i64>, FrontendError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.int(key).map(Some),
        }
    }

    /// An optional non-negative integer (token ids).
    pub fn opt_id(&self, key: &str) -> Result<Option<i64>, FrontendError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(i) if i >= 0 => Ok(Some(i)),
                _ => Err(self.err(key, &format!("must be a token id, got {v}"))),
            },
        }
    }

    /// A float with a default.
    pub fn float_or(&self, key: &str, default: f64) -> Result<f64, FrontendError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, &format!("must be a number, got {v}"))),
        }
    }

    /// A bool with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, FrontendError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, &format!("must be true or false, got {v}"))),
        }
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<String, FrontendError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(key, &format!("must be a string, got {v}"))),
            None => Err(self.err(key, "is missing")),
        }
    }

    /// A string with a default.
    pub fn string_or(&self, key: &str, default: &str) -> Result<String, FrontendError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(_) => self.string(key),
        }
    }

    /// Rejects a field whose value is set and differs from `allowed` (absent or null
    /// passes): kiln would otherwise silently compute a different model.
    pub fn require(&self, key: &str, allowed: &Value, why: &str) -> Result<(), FrontendError> {
        match self.get(key) {
            Some(v) if v != allowed => Err(FrontendError::Unsupported(format!(
                "{}: `{key}` = {} is not supported ({why}); kiln supports {allowed}",
                self.path.display(),
                clip(&v.to_string(), 120)
            ))),
            _ => Ok(()),
        }
    }

    /// An unsupported-feature error about `key`.
    pub fn unsupported(&self, key: &str, why: &str) -> FrontendError {
        FrontendError::Unsupported(format!(
            "{}: `{key}` {}",
            self.path.display(),
            clip(why, 240)
        ))
    }
}

/// `text` cut to `max` characters, saying how long it was: values quoted
/// from a config file in messages stay readable however large the file
/// makes them (a 1 MB string once printed a 1 MB error).
pub fn clip(text: &str, max: usize) -> String {
    let n = text.chars().count();
    if n <= max {
        return text.to_string();
    }
    let head: String = text.chars().take(max).collect();
    format!("{head}… ({n} characters)")
}

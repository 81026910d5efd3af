//! Sentence embeddings (`kiln embed`), as sentence-transformers computes
//! them: the encoder's token states, then the folder's pooling
//! (`1_Pooling/config.json`: mean, CLS, max or mean·√len over the
//! attention mask), then L2 normalisation when `modules.json` lists a
//! `Normalize` module. A folder without `modules.json` pools by the mask-
//! weighted mean and does not normalise.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Model, RunInputs, Target};

/// How token states become one vector per sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pooling {
    /// The attention-mask-weighted mean.
    Mean,
    /// The first token's state.
    Cls,
    /// The element-wise maximum over the unmasked tokens.
    Max,
    /// The masked sum divided by √(token count).
    MeanSqrtLen,
}

/// A sentence-transformers pipeline after the transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingConfig {
    /// The pooling.
    pub pooling: Pooling,
    /// L2-normalise the pooled vector.
    pub normalize: bool,
}

impl Default for EmbeddingConfig {
    fn default() -> EmbeddingConfig {
        EmbeddingConfig {
            pooling: Pooling::Mean,
            normalize: false,
        }
    }
}

impl EmbeddingConfig {
    /// The pipeline of the folder `dir` (its `modules.json`), or `None`
    /// when it has none.
    pub fn from_dir(dir: &Path) -> Result<Option<EmbeddingConfig>, Error> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(None);
        }
        let read = |p: &Path| -> Result<serde_json::Value, Error> {
            let text = kiln_ir::files::read_text_limited(
                p,
                kiln_ir::files::CONFIG_LIMIT,
                "sentence-transformers config",
            )
            .map_err(|source| Error::Io {
                path: p.to_path_buf(),
                source,
            })?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Input(format!("{}: not valid JSON: {e}", p.display())))
        };
        let modules = read(&modules_path)?;
        let list = modules.as_array().ok_or_else(|| {
            Error::Input(format!(
                "{}: expected a list of modules",
                modules_path.display()
            ))
        })?;
        fn ty(m: &serde_json::Value) -> &str {
            m.get("type").and_then(|t| t.as_str()).unwrap_or("")
        }
        let normalize = list.iter().any(|m| ty(m).ends_with(".Normalize"));
        let mut cfg = EmbeddingConfig {
            pooling: Pooling::Mean,
            normalize,
        };
        if let Some(m) = list.iter().find(|m| ty(m).ends_with(".Pooling")) {
            let sub = m
                .get("path")
                .and_then(|p| p.as_str())
                .unwrap_or("1_Pooling");
            if sub.contains("..") || Path::new(sub).is_absolute() {
                return Err(Error::Input(format!(
                    "{}: module path `{sub}` leaves the folder",
                    modules_path.display()
                )));
            }
            let path = dir.join(sub).join("config.json");
            let p = read(&path)?;
            let on = |k: &str| p.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            let modes: Vec<Pooling> = [
                ("pooling_mode_mean_tokens", Pooling::Mean),
                ("pooling_mode_cls_token", Pooling::Cls),
                ("pooling_mode_max_tokens", Pooling::Max),
                ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
            ]
            .into_iter()
            .filter(|(k, _)| on(k))
            .map(|(_, m)| m)
            .collect();
            cfg.pooling = match modes[..] {
                [m] => m,
                [] => {
                    return Err(Error::Input(format!(
                        "{}: no pooling mode is set",
                        path.display()
                    )))
                }
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{}: several pooling modes at once (their concatenation) are not supported",
                        path.display()
                    )))
                }
            };
        }
        Ok(Some(cfg))
    }
}

/// One embedding per input row, by the model's pipeline.
pub fn embed(model: &Model, inputs: &RunInputs, target: Target) -> Result<Vec<Vec<f32>>, Error> {
    if let Some(why) = model.embedding_problem() {
        return Err(Error::Input(why.to_string()));
    }
    let cfg = model.embedding_config();
    let outs = model.run_on(target, inputs)?;
    let states = outs
        .iter()
        .find(|(n, t)| n == "last_hidden_state" && t.rank() == 3)
        .map(|(_, t)| t)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: embed needs an encoder with a `last_hidden_state: f32[B, T, d]` output",
                model.origin()
            ))
        })?;
    let &[b, t, d] = states.shape() else {
        return Err(Error::Unsupported(
            "last_hidden_state is not [B, T, d]".into(),
        ));
    };
    let h = states
        .to_f32()
        .ok_or_else(|| Error::Unsupported("last_hidden_state is not a float".into()))?;
    let mut out = Vec::with_capacity(b);
    for r in 0..b {
        let mask = |i: usize| {
            inputs
                .attention_mask
                .as_ref()
                .map_or(1, |m| m[r].get(i).copied().unwrap_or(1))
                != 0
        };
        let at = |i: usize, c: usize| h[(r * t + i) * d + c] as f64;
        let count = (0..t).filter(|&i| mask(i)).count().max(1) as f64;
        let mut v: Vec<f64> = (0..d)
            .map(|c| match cfg.pooling {
                Pooling::Cls => at(0, c),
                Pooling::Max => (0..t)
                    .filter(|&i| mask(i))
                    .map(|i| at(i, c))
                    .fold(f64::NEG_INFINITY, f64::max),
                Pooling::Mean | Pooling::MeanSqrtLen => {
                    let sum: f64 = (0..t).filter(|&i| mask(i)).map(|i| at(i, c)).sum();
                    if cfg.pooling == Pooling::Mean {
                        sum / count
                    } else {
                        sum / count.sqrt()
                    }
                }
            })
            .collect();
        if cfg.normalize {
            // torch.nn.functional.normalize: x / max(‖x‖, 1e-12).
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("the embedding of row {r} ({x})"),
                cause: crate::non_finite_weights(model.weights()),
            });
        }
        out.push(v.into_iter().map(|x| x as f32).collect());
    }
    Ok(out)
}

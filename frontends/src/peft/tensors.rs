//! The adapter's tensors: reading `adapter_model.safetensors`, pairing `lora_A`
//! and `lora_B` by module name, the names of a slot's parameters, and the factors
//! in a layer's layout and scale. Nothing here reads the graph.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_ir::{Tensor, WeightLayout};

use super::config::LoraConfig;
use crate::FrontendError;

/// The prefix PEFT puts before every module path in the adapter file.
const KEY_PREFIX: &str = "base_model.model.";

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
        // A NaN or infinite factor makes every output it touches NaN: refused
        // here, by name, rather than found in the logits.
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(werr(format!(
                "tensor `{name}` holds {v} at element {i}; adapter factors must be finite"
            )));
        }
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
                "module `{module}` has tensors but `target_modules` {} does not select it",
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

/// The parameter names of `slot`'s factors for the base weight `weight`:
/// `<module>.lora_A.<slot>` and `<module>.lora_B.<slot>`.
pub fn slot_param_names(weight: &str, slot: &str) -> (String, String) {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    (
        format!("{module}.lora_A.{slot}"),
        format!("{module}.lora_B.{slot}"),
    )
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
pub(super) fn slot_tensors(
    pair: &LoraPair,
    layout: WeightLayout,
    k: f64,
) -> Option<(Tensor, Tensor)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_row_major_matrices() {
        let t = Tensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("tensor");
        let tt = transposed(&t).expect("f32");
        assert_eq!(tt.shape(), &[3, 2]);
        assert_eq!(tt.as_f32(), Some(&[1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0][..]));
    }
}

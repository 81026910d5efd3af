//! PEFT LoRA adapters on a [`Model`]: insert them unmerged, swap them, merge them.
//!
//! ```no_run
//! use kiln::{adapter::LoraMode, Model, RunInputs};
//!
//! let base = Model::load("tests/data/hf/llama")?;
//! // Unmerged: each adapted matmul becomes `lora_linear(x, w, a, b)`; the adapter
//! // tensors are weights of the model (`<module>.lora_A.<slot>`, …).
//! let tuned = base.with_adapter("tests/data/hf/llama_lora")?;
//! // Another adapter of the same rank and targets replaces the slot's weights;
//! // the graph (and so anything compiled from it) stays the same.
//! let other = tuned.swap_adapter("llama_lora", "path/to/another_adapter")?;
//! assert_eq!(tuned.to_text(), other.to_text());
//! // Merged: the `lora-merge` pass folds each update into its weight (no run-time cost).
//! let merged = tuned.merge_adapters()?;
//! let logits = merged.run(&RunInputs::tokens(vec![vec![1, 2, 3]]))?;
//! # let _ = (LoraMode::Merged, logits);
//! # Ok::<(), kiln::Error>(())
//! ```
//!
//! Swapping without recompiling: in unmerged mode an adapter is data. The graph
//! depends only on the adapted modules and their ranks; the values live in the
//! model's weights under `<module>.lora_A.<slot>` / `<module>.lora_B.<slot>`.
//! [`Model::swap_adapter`] writes another adapter of the same rank and targets
//! into those weights (rescaling `B` when its `lora_alpha` differs, since
//! `alpha` is an attribute of the graph) and leaves the IR untouched, so
//! `to_text()` is identical and a backend can reuse code compiled for the graph
//! with the new weights. Several adapters on one module are stacked along the
//! rank axis (see `kiln_frontends::peft`); each keeps its own slot.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use kiln_frontends::peft::{self, LoraAdapter};
use kiln_passes::{OptLevel, PassManager};

use crate::{Error, Model};

/// How adapters reach the compiled model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraMode {
    /// Folded into the weights by the `lora-merge` pass: no cost at run time.
    #[default]
    Merged,
    /// Kept as `lora_linear` nodes whose factors are swappable weights.
    Unmerged,
}

impl FromStr for LoraMode {
    type Err = String;

    fn from_str(s: &str) -> Result<LoraMode, String> {
        match s {
            "merged" => Ok(LoraMode::Merged),
            "unmerged" => Ok(LoraMode::Unmerged),
            _ => Err(format!("`{s}` is not a LoRA mode (merged or unmerged)")),
        }
    }
}

impl fmt::Display for LoraMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraMode::Merged => "merged",
            LoraMode::Unmerged => "unmerged",
        })
    }
}

/// The passes of `level`, without `lora-merge` when adapters stay unmerged.
pub fn pipeline(level: OptLevel, mode: LoraMode) -> Result<PassManager, Error> {
    let names: Vec<&str> = level
        .pass_names()
        .iter()
        .copied()
        .filter(|&p| mode == LoraMode::Merged || p != "lora-merge")
        .collect();
    Ok(PassManager::from_names(&names)?)
}

impl Model {
    /// The model with the PEFT LoRA adapter in `dir` inserted unmerged, in a slot
    /// named after the folder (made unique); calls compose (deltas add up).
    pub fn with_adapter(&self, dir: impl AsRef<Path>) -> Result<Model, Error> {
        let adapter = LoraAdapter::read(dir.as_ref())?;
        let taken = peft::adapter_slots(&self.module);
        let base = adapter.default_slot();
        let mut slot = base.clone();
        let mut i = 2;
        while taken.contains(&slot) {
            slot = format!("{base}_{i}");
            i += 1;
        }
        self.insert(&adapter, &slot)
    }

    /// [`Model::with_adapter`] with a chosen slot name (letters, digits, `_`).
    pub fn with_adapter_named(&self, dir: impl AsRef<Path>, slot: &str) -> Result<Model, Error> {
        let adapter = LoraAdapter::read(dir.as_ref())?;
        self.insert(&adapter, slot)
    }

    /// Every adapter in `dirs`, inserted in order, then merged into the weights
    /// when `mode` is [`LoraMode::Merged`].
    pub fn with_adapters<P: AsRef<Path>>(
        &self,
        dirs: &[P],
        mode: LoraMode,
    ) -> Result<Model, Error> {
        let mut m = self.clone();
        for d in dirs {
            m = m.with_adapter(d)?;
        }
        match mode {
            LoraMode::Merged if !dirs.is_empty() => m.merge_adapters(),
            _ => Ok(m),
        }
    }

    /// The model with the adapter in `dir` written into the weights of `slot`;
    /// the IR does not change (same modules and ranks required).
    pub fn swap_adapter(&self, slot: &str, dir: impl AsRef<Path>) -> Result<Model, Error> {
        let adapter = LoraAdapter::read(dir.as_ref())?;
        let mut out = self.clone();
        let weights = out.weights.as_mut().ok_or_else(|| self.no_weights())?;
        peft::swap_adapter(&out.module, weights, &adapter, slot)?;
        Ok(out)
    }

    /// The model after the `lora-merge` pass alone: every `lora_linear` folded
    /// into its weight.
    pub fn merge_adapters(&self) -> Result<Model, Error> {
        Ok(self
            .apply_passes(&PassManager::from_names(&["lora-merge"])?)?
            .0)
    }

    /// The names of the adapter slots in the model (unmerged adapters).
    pub fn adapter_slots(&self) -> Vec<String> {
        peft::adapter_slots(&self.module).into_iter().collect()
    }

    fn insert(&self, adapter: &LoraAdapter, slot: &str) -> Result<Model, Error> {
        let mut out = self.clone();
        let weights = out.weights.as_mut().ok_or_else(|| self.no_weights())?;
        peft::insert_adapter(&mut out.module, weights, adapter, slot)?;
        Ok(out)
    }

    fn no_weights(&self) -> Error {
        Error::Input(format!(
            "{} has no weights: a LoRA adapter updates weights, load a model folder or pass --weights",
            self.origin
        ))
    }
}

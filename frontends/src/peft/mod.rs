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
//!
//! The parts: `config.rs` reads and checks `adapter_config.json`, `tensors.rs`
//! reads `adapter_model.safetensors` into one factor pair per module (names,
//! layout and scaling of the factors), and `insert.rs` finds the model's linear
//! layers and inserts or swaps adapters in the graph.

mod config;
mod insert;
mod tensors;

pub use config::{LoraConfig, TargetModules};
pub use insert::{
    adapter_slots, check_adapter, insert_adapter, linear_weights, swap_adapter, InsertReport,
    LinearWeight,
};
pub use tensors::{slot_param_names, LoraAdapter, LoraPair};

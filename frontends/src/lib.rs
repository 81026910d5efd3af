//! kiln-frontends: ways to get a model into kiln's IR.
//!
//! Model families are built with [`kiln_ir::GraphBuilder`] from a configuration;
//! the graphs use the tensor names Hugging Face's `save_pretrained` writes, so the
//! same builders serve the built-in demo model and real model folders.

pub mod gpt2;

pub use gpt2::Gpt2Config;

/// Everything that can go wrong while building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The IR rejected the graph the frontend built (a contract violation).
    #[error("{0}")]
    Ir(#[from] kiln_ir::IrError),
    /// A configuration value that cannot describe a valid model.
    #[error("invalid model configuration: {0}")]
    Config(String),
}

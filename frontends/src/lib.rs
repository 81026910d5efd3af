//! kiln-frontends: ways to get a model into kiln's IR.
//!
//! Model families are built with [`kiln_ir::GraphBuilder`] from a configuration;
//! the graphs use the tensor names Hugging Face's `save_pretrained` writes, so the
//! same builders serve the built-in demo model and real model folders
//! ([`hf::load_hf_dir`]).

pub mod bart;
pub mod bert;
pub mod blocks;
pub mod bloom;
pub mod config;
pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod peft;
pub mod t5;

use std::path::PathBuf;

pub use gpt2::Gpt2Config;
pub use hf::{load_hf_dir, Family, HfModel, ModelInfo};

/// Everything that can go wrong while building or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The IR rejected the graph the frontend built (a contract violation).
    #[error("{0}")]
    Ir(#[from] kiln_ir::IrError),
    /// A file or folder that cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A configuration value that cannot describe a valid model.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// Config values that break a shape contract of the model they describe
    /// (heads that do not divide the width), restated with the file and
    /// keys: a contract violation, like [`FrontendError::Ir`].
    #[error("shape contract violated by {0}")]
    ConfigContract(String),
    /// A configuration kiln understands but does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A weight file that is corrupt or does not match the model.
    #[error("weights {path}:\n  {message}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// Every problem found, one per line.
        message: String,
    },
}

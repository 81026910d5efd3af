//! kiln: a compiler for transformer models.
//!
//! This facade ties the crates together so that using kiln from Rust is one line
//! per step:
//!
//! ```
//! let model = kiln::Model::demo()?;          // the built-in GPT-2-style model
//! model.check()?;                             // every shape contract
//! let text = model.to_text();                 // deterministic IR text, for snapshots
//! assert!(text.starts_with("func @gpt2("));
//! # Ok::<(), kiln::Error>(())
//! ```

use std::path::{Path, PathBuf};

pub use kiln_frontends as frontends;
pub use kiln_ir as ir;
pub use kiln_passes as passes;

use kiln_ir::{Module, ParseError, ShapeCx, VerifyErrors};

/// Everything the facade can report, grouped by what the user has to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file or folder cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path as given.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The input is not well-formed text IR.
    #[error("{origin}:{source}")]
    Parse {
        /// Where the text came from (a path or `<demo>`).
        origin: String,
        /// The syntax error with its line and column.
        #[source]
        source: ParseError,
    },
    /// The model breaks one or more shape contracts.
    #[error("{origin}: shape contract violated:\n{errors}")]
    Contract {
        /// Where the model came from.
        origin: String,
        /// Every violation found.
        errors: VerifyErrors,
    },
    /// A frontend could not build the model.
    #[error("{0}")]
    Frontend(#[from] kiln_frontends::FrontendError),
    /// Input kiln does not handle (yet), with the reason.
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// The CLI exit code: 1 for a contract violation, 2 for unreadable input.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Contract { .. } => 1,
            Error::Frontend(kiln_frontends::FrontendError::Ir(e)) if e.is_contract_violation() => 1,
            _ => 2,
        }
    }
}

/// A model in kiln's IR, from any frontend.
#[derive(Clone, Debug)]
pub struct Model {
    module: Module,
    origin: String,
}

impl Model {
    /// Loads a model: a `.kir` text-IR file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, Error> {
        let path = path.as_ref();
        if path.is_dir() {
            return Err(Error::Unsupported(format!(
                "{}: is a directory; kiln reads text IR (`.kir`) files so far \
                 (Hugging Face model folders are not supported yet)",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not UTF-8 text (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                ),
            ),
        })?;
        Model::from_text(&text, &path.display().to_string())
    }

    /// Parses text IR; `origin` names it in messages.
    pub fn from_text(text: &str, origin: &str) -> Result<Model, Error> {
        let module = kiln_ir::parse_module(text).map_err(|source| Error::Parse {
            origin: origin.to_string(),
            source,
        })?;
        Ok(Model {
            module,
            origin: origin.to_string(),
        })
    }

    /// The built-in GPT-2-style demo model (2 layers, symbolic `B` and `T`).
    pub fn demo() -> Result<Model, Error> {
        let graph = kiln_frontends::gpt2::build_gpt2(&kiln_frontends::Gpt2Config::demo())?;
        Ok(Model {
            module: Module { funcs: vec![graph] },
            origin: "<demo gpt2>".to_string(),
        })
    }

    /// Where the model came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The model's functions.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// Checks every shape contract; returns each function's resolved symbols.
    pub fn check(&self) -> Result<Vec<ShapeCx>, Error> {
        let mut out = Vec::new();
        let mut all = Vec::new();
        for g in &self.module.funcs {
            match kiln_ir::verify(g) {
                Ok(cx) => out.push(cx),
                Err(VerifyErrors(mut e)) => all.append(&mut e),
            }
        }
        if all.is_empty() {
            Ok(out)
        } else {
            Err(Error::Contract {
                origin: self.origin.clone(),
                errors: VerifyErrors(all),
            })
        }
    }

    /// Checks the model and renders its shape trace table(s).
    pub fn shape_trace(&self) -> Result<String, Error> {
        let cxs = self.check()?;
        let parts: Vec<String> = self
            .module
            .funcs
            .iter()
            .zip(&cxs)
            .map(|(g, cx)| kiln_ir::trace::shape_trace(g, cx))
            .collect();
        Ok(parts.join("\n"))
    }

    /// The canonical text IR (deterministic: safe to snapshot).
    pub fn to_text(&self) -> String {
        kiln_ir::print_module(&self.module)
    }

    /// Graphviz DOT of every function.
    pub fn to_dot(&self) -> String {
        self.module
            .funcs
            .iter()
            .map(kiln_ir::dot::to_dot)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

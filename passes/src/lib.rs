//! kiln-passes: graph-to-graph rewrites and the pass manager that runs them.
//!
//! Every pass implements [`Pass`] and lives in its own file, which opens with a
//! `//!` contract (what it matches, what it produces, what it guarantees). The
//! [`PassManager`] runs a list of passes over a [`Module`], verifies every
//! function after each pass (so a pass that breaks a shape contract is named),
//! records what each pass changed, and can keep the printed IR after any pass.
//! Named pipelines: [`OptLevel::O0`] (nothing), `O1` (cleanup), `O2` (cleanup,
//! fusion, cleanup). [`pass_by_name`] is the registry behind `--passes`.

pub mod attention_fusion;
pub mod canonicalize;
pub mod constant_folding;
pub mod cse;
pub mod dce;
pub mod elementwise_fusion;
pub mod kv_cache_insertion;
pub mod lora_merge;

use kiln_ir::{print_module, verify_module, Module, VerifyErrors, Weights};

/// Whether a pass changed the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Changed {
    /// The module is unchanged.
    No,
    /// The module was rewritten.
    Yes,
}

impl Changed {
    /// `Yes` when `b` is true.
    pub fn from_bool(b: bool) -> Changed {
        if b {
            Changed::Yes
        } else {
            Changed::No
        }
    }
}

/// What can go wrong while running passes.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The module broke a contract after the named pass ran.
    #[error("after pass `{pass}`:\n{errors}")]
    Verify {
        /// The pass that ran last.
        pass: &'static str,
        /// What the verifier found.
        errors: VerifyErrors,
    },
    /// A pass could not do its job on this module.
    #[error("pass `{pass}`: {message}")]
    Failed {
        /// The pass.
        pass: &'static str,
        /// Why.
        message: String,
    },
    /// A pass name that no pass has.
    #[error("unknown pass `{0}` (known passes: {known})", known = pass_names().join(", "))]
    UnknownPass(String),
}

/// What one pass did.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRecord {
    /// The pass.
    pub pass: &'static str,
    /// Whether it changed the module.
    pub changed: Changed,
    /// What it did, in its own words (e.g. "fused 12 attention patterns").
    pub notes: Vec<String>,
}

/// State shared by the passes of one pipeline run.
#[derive(Debug, Default)]
pub struct PassContext<'w> {
    /// The model's weights, for passes that rewrite them (LoRA merge, constant
    /// folding of weights); `None` when the module has no weights.
    pub weights: Option<&'w mut Weights>,
    /// One record per pass run, in order.
    pub log: Vec<PassRecord>,
    /// Printed IR after each pass, when requested.
    pub dumps: Vec<(&'static str, String)>,
    notes: Vec<String>,
}

impl<'w> PassContext<'w> {
    /// A context over `weights`.
    pub fn new(weights: Option<&'w mut Weights>) -> PassContext<'w> {
        PassContext {
            weights,
            ..PassContext::default()
        }
    }

    /// Records a note about what the running pass did.
    pub fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }
}

/// A module-to-module rewrite.
pub trait Pass {
    /// The name used by `--passes` and `--print-after`.
    fn name(&self) -> &'static str;
    /// Rewrites `module` in place.
    fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<Changed, PassError>;
}

/// Every pass, in pipeline order: the one registry behind `--passes`,
/// `--print-after`, the pipelines and the error that lists the known names.
/// A pass's name is its [`Pass::name`].
const REGISTRY: [fn() -> Box<dyn Pass>; 8] = [
    || Box::new(canonicalize::Canonicalize),
    || Box::new(constant_folding::ConstantFolding),
    || Box::new(cse::Cse),
    || Box::new(dce::Dce),
    || Box::new(attention_fusion::AttentionFusion),
    || Box::new(lora_merge::LoraMerge),
    || Box::new(elementwise_fusion::ElementwiseFusion),
    || Box::new(kv_cache_insertion::KvCacheInsertion),
];

/// Every registered pass name, in pipeline order.
pub fn pass_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|make| make().name()).collect()
}

/// The pass called `name`.
pub fn pass_by_name(name: &str) -> Result<Box<dyn Pass>, PassError> {
    REGISTRY
        .iter()
        .map(|make| make())
        .find(|p| p.name() == name)
        .ok_or_else(|| PassError::UnknownPass(name.to_string()))
}

/// The named optimization pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OptLevel {
    /// No passes: the graph as the frontend built it.
    O0,
    /// Cleanup: canonicalize, constant folding, CSE, DCE.
    O1,
    /// Cleanup, attention fusion, LoRA merge, elementwise fusion, cleanup.
    O2,
}

impl OptLevel {
    /// The pass names of this pipeline, in order.
    pub fn pass_names(self) -> &'static [&'static str] {
        match self {
            OptLevel::O0 => &[],
            OptLevel::O1 => &["canonicalize", "constant-folding", "cse", "dce"],
            OptLevel::O2 => &[
                "canonicalize",
                "constant-folding",
                "cse",
                "dce",
                "attention-fusion",
                "lora-merge",
                "elementwise-fusion",
                "cse",
                "dce",
            ],
        }
    }
}

/// Runs passes in order, verifying after each.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    print_after: Vec<String>,
    verify_each: bool,
}

impl PassManager {
    /// A manager running `passes` in order, verifying after each one.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            passes,
            print_after: Vec::new(),
            verify_each: true,
        }
    }

    /// A manager for a list of pass names (`--passes a,b,c`).
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<PassManager, PassError> {
        let passes = names
            .iter()
            .map(|n| pass_by_name(n.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(PassManager::new(passes))
    }

    /// A manager for a named pipeline.
    pub fn pipeline(level: OptLevel) -> PassManager {
        PassManager::from_names(level.pass_names()).unwrap_or_else(|_| PassManager::new(Vec::new()))
    }

    /// Records the printed IR after each pass named here (`all` for every pass).
    pub fn print_after<S: AsRef<str>>(mut self, names: &[S]) -> PassManager {
        self.print_after = names.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// Whether to verify after every pass (on by default; the final result is
    /// always verified).
    pub fn verify_each(mut self, on: bool) -> PassManager {
        self.verify_each = on;
        self
    }

    /// The names of the passes, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass on `module`.
    pub fn run(&self, module: &mut Module, cx: &mut PassContext<'_>) -> Result<(), PassError> {
        let count = self.passes.len();
        for (i, pass) in self.passes.iter().enumerate() {
            cx.notes.clear();
            let changed = pass.run(module, cx)?;
            if self.verify_each || i + 1 == count {
                verify_module(module).map_err(|errors| PassError::Verify {
                    pass: pass.name(),
                    errors,
                })?;
            }
            let notes = std::mem::take(&mut cx.notes);
            cx.log.push(PassRecord {
                pass: pass.name(),
                changed,
                notes,
            });
            if self
                .print_after
                .iter()
                .any(|p| p == "all" || p == pass.name())
            {
                cx.dumps.push((pass.name(), print_module(module)));
            }
        }
        Ok(())
    }
}

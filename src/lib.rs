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
//! let out = model.run(&kiln::RunInputs::tokens(vec![vec![1, 2, 3]]))?;
//! assert_eq!(out[0].1.shape(), &[1, 3, 512]);
//! # Ok::<(), kiln::Error>(())
//! ```

pub mod adapter;
pub mod artifact;
pub mod beam;
pub mod bench;
pub mod embed;
pub mod fill_mask;
pub mod generate;
pub mod output;
pub mod text;

use std::path::{Path, PathBuf};

pub use kiln_backends as backends;
pub use kiln_frontends as frontends;
pub use kiln_ir as ir;
pub use kiln_passes as passes;

pub use generate::{GenerateOptions, Sampling};
pub use kiln_backends::{Tensor, Weights};
pub use kiln_frontends::{Family, ModelInfo};
pub use kiln_passes::{OptLevel, PassManager, PassRecord};

use kiln_backends::{Backend, Executable, Interpreter, Program, Reference, RunError};
use kiln_ir::{Graph, Module, NodeKind, ParseError, ShapeCx, VerifyErrors};

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
    /// An output file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
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
    /// A frontend could not build or load the model.
    #[error("{0}")]
    Frontend(#[from] kiln_frontends::FrontendError),
    /// Inputs that do not fit the model (token ids, lengths, masks).
    #[error("invalid input: {0}")]
    Input(String),
    /// A backend failed to compile or run the model.
    #[error("{0}")]
    Run(#[from] RunError),
    /// An optimization pass failed.
    #[error("{0}")]
    Pass(#[from] kiln_passes::PassError),
    /// Input kiln does not handle (yet), with the reason.
    #[error("{0}")]
    Unsupported(String),
    /// A compiled artifact that cannot be used: truncated, corrupt, or
    /// written for another kiln or target; `what` says which section and
    /// offset.
    #[error("{path}: {what}")]
    Artifact {
        /// The artifact.
        path: PathBuf,
        /// What is wrong, and where.
        what: String,
    },
    /// A run produced NaN or infinite logits where a token must be chosen
    /// (nothing sensible can be generated from them), with the weights
    /// that hold non-finite values, if any.
    #[error("{what} are not finite (NaN or infinite){cause}")]
    NonFinite {
        /// Which values, where (`the logits of row 0 at new token 3`).
        what: String,
        /// `: weight … holds NaN at element …`, or what else it may be.
        cause: String,
    },
}

/// The first weights (at most three) holding NaN or an infinity, as a
/// sentence for [`Error::NonFinite`]; an empty set says so too.
pub fn non_finite_weights(weights: Option<&Weights>) -> String {
    let Some(weights) = weights else {
        return String::new();
    };
    let mut found = Vec::new();
    for (name, t) in weights {
        let Some(values) = t.to_f32() else {
            continue;
        };
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            found.push(format!("{name} holds {v} at element {i}"));
            if found.len() == 3 {
                break;
            }
        }
    }
    if found.is_empty() {
        "; every weight is finite, so the computation overflowed (or an input is extreme)".into()
    } else {
        format!(": weight {}", found.join("; weight "))
    }
}

impl Error {
    /// The CLI exit code: 1 for a contract violation, 2 for unusable input.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Contract { .. } => 1,
            Error::Frontend(kiln_frontends::FrontendError::Ir(e)) if e.is_contract_violation() => 1,
            Error::Frontend(kiln_frontends::FrontendError::ConfigContract(_)) => 1,
            _ => 2,
        }
    }
}

/// The backends `run` can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The reference interpreter, on the graph (the oracle).
    Interp,
    /// The lowered Program, run by the reference Program executor.
    Reference,
    /// The lowered Program, run by the CPU backend's native kernels.
    Cpu {
        /// Threads (0: every core).
        threads: usize,
    },
    /// The lowered Program as CUDA kernels on an NVIDIA GPU.
    Cuda {
        /// The GPU's ordinal.
        device: i32,
        /// Let cuBLAS use TF32 tensor cores (`--tf32`).
        tf32: bool,
    },
    /// The CUDA backend's kernels on the emulated device (host threads):
    /// for testing the generated code where there is no GPU; slow.
    CudaEmulated,
}

impl Target {
    /// The backend's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        self.backend().name()
    }

    /// The backend this target names.
    pub fn backend(self) -> Box<dyn Backend> {
        match self {
            Target::Interp => Box::new(Interpreter),
            Target::Reference => Box::new(Reference),
            Target::Cpu { threads } => Box::new(kiln_backends::Cpu { threads }),
            Target::Cuda { device, tf32 } => Box::new(kiln_backends::cuda::Cuda { device, tf32 }),
            Target::CudaEmulated => Box::new(kiln_backends::cuda::CudaEmulated::default()),
        }
    }
}

/// The token inputs of one run; absent optional inputs take their defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunInputs {
    /// Token ids, one row per batch entry (`tokens` input).
    pub tokens: Vec<Vec<i64>>,
    /// 1 for real tokens, 0 for padding (`attention_mask`); default all ones.
    pub attention_mask: Option<Vec<Vec<i64>>>,
    /// Segment ids (`token_type_ids`); default all zeros.
    pub token_type_ids: Option<Vec<Vec<i64>>>,
    /// Decoder token ids of encoder–decoder models (`decoder_tokens`); default one
    /// `decoder_start_token_id` per row.
    pub decoder_tokens: Option<Vec<Vec<i64>>>,
}

impl RunInputs {
    /// Rows of unequal lengths with nothing else given (no mask, segments or
    /// decoder tokens), one input of one row each: generation and beam
    /// search run such rows one by one, which gives what transformers gives
    /// for the left-padded batch (each row attends to its own tokens only,
    /// positions counted from its first token) without padding the graph.
    pub fn ragged_rows(&self) -> Option<Vec<RunInputs>> {
        let first = self.tokens.first()?.len();
        if self.tokens.iter().all(|r| r.len() == first)
            || self.attention_mask.is_some()
            || self.token_type_ids.is_some()
            || self.decoder_tokens.is_some()
        {
            return None;
        }
        Some(
            self.tokens
                .iter()
                .map(|r| RunInputs::tokens(vec![r.clone()]))
                .collect(),
        )
    }

    /// Inputs with only token rows.
    pub fn tokens(rows: Vec<Vec<i64>>) -> RunInputs {
        RunInputs {
            tokens: rows,
            ..RunInputs::default()
        }
    }
}

/// A model in kiln's IR, from any frontend, with its weights when it has them.
#[derive(Clone, Debug)]
pub struct Model {
    module: Module,
    origin: String,
    weights: Option<Weights>,
    info: Option<ModelInfo>,
    /// Set when the model was loaded from a compiled artifact (it is then
    /// already optimized, and holds the artifact's packed weights).
    artifact: Option<std::sync::Arc<artifact::Loaded>>,
    /// The folder's `tokenizer.json`, when it has one (text in and out), or
    /// why it could not be read (reported when text is asked for: a model
    /// runs on token ids whatever its tokenizer file holds).
    tokenizer: Option<Result<std::sync::Arc<text::TextTokenizer>, String>>,
    /// The folder's sentence-transformers pipeline (`modules.json`), or why
    /// it could not be read (reported by `embed`).
    embedding: Option<Result<embed::EmbeddingConfig, String>>,
}

impl Model {
    /// Loads a model: a `.kir` text-IR file or a Hugging Face model folder
    /// (`config.json` + `model.safetensors`).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, Error> {
        let path = path.as_ref();
        if path.is_file() && artifact::is_artifact(path) {
            return artifact::load(path);
        }
        if path.is_dir() {
            if !path.join("config.json").exists() {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "is a directory without config.json (not a Hugging Face model folder)",
                    ),
                });
            }
            let hf = kiln_frontends::load_hf_dir(path)?;
            return Ok(Model {
                module: Module {
                    funcs: vec![hf.graph],
                },
                origin: path.display().to_string(),
                weights: Some(hf.weights),
                info: Some(hf.info),
                artifact: None,
                tokenizer: text::TextTokenizer::from_dir(path)
                    .transpose()
                    .map(|t| t.map(std::sync::Arc::new).map_err(|e| e.to_string())),
                embedding: embed::EmbeddingConfig::from_dir(path)
                    .transpose()
                    .map(|e| e.map_err(|e| e.to_string())),
            });
        }
        let text =
            kiln_ir::files::read_text_limited(path, kiln_ir::files::TEXT_IR_LIMIT, "text-IR file")
                .map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
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
            weights: None,
            info: None,
            artifact: None,
            tokenizer: None,
            embedding: None,
        })
    }

    /// The built-in GPT-2-style demo model (2 layers, symbolic `B` and `T`) with
    /// seeded random weights.
    pub fn demo() -> Result<Model, Error> {
        let cfg = kiln_frontends::Gpt2Config::demo();
        let graph = kiln_frontends::gpt2::build_gpt2(&cfg)?;
        let weights = kiln_frontends::gpt2::random_weights(&graph, 2026)?;
        Ok(Model {
            module: Module { funcs: vec![graph] },
            origin: "<demo gpt2>".to_string(),
            weights: Some(weights),
            info: Some(ModelInfo {
                family: Family::Gpt2,
                vocab_size: cfg.vocab_size,
                max_positions: Some(cfg.n_positions),
                eos_token_ids: Vec::new(),
                decoder_start_token_id: None,
            }),
            artifact: None,
            tokenizer: None,
            embedding: None,
        })
    }

    /// A model loaded from a compiled artifact.
    pub(crate) fn from_artifact(
        module: Module,
        origin: String,
        weights: Weights,
        info: Option<ModelInfo>,
        loaded: std::sync::Arc<artifact::Loaded>,
        tokenizer: Option<text::TextTokenizer>,
    ) -> Model {
        let embedding = loaded.manifest.embedding.map(Ok);
        Model {
            module,
            origin,
            weights: Some(weights),
            info,
            artifact: Some(loaded),
            tokenizer: tokenizer.map(|t| Ok(std::sync::Arc::new(t))),
            embedding,
        }
    }

    /// How `embed` pools and normalises: the folder's sentence-transformers
    /// modules, or the mask-weighted mean without normalisation.
    pub fn embedding_config(&self) -> embed::EmbeddingConfig {
        match &self.embedding {
            Some(Ok(c)) => *c,
            _ => embed::EmbeddingConfig::default(),
        }
    }

    /// The sentence-transformers pipeline read from the folder, if any.
    pub(crate) fn embedding_source(&self) -> Option<embed::EmbeddingConfig> {
        match &self.embedding {
            Some(Ok(c)) => Some(*c),
            _ => None,
        }
    }

    /// Why the folder's sentence-transformers modules could not be read, if
    /// they could not.
    pub fn embedding_problem(&self) -> Option<&str> {
        match &self.embedding {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }

    /// The model with `id` among the tokens generation stops at (a chat's
    /// end of turn).
    pub fn with_stop_token(&self, id: i64) -> Model {
        let mut out = self.clone();
        if let Some(info) = out.info.as_mut() {
            if !info.eos_token_ids.contains(&id) {
                info.eos_token_ids.push(id);
            }
        }
        out
    }

    /// The model's tokenizer (`tokenizer.json` of its folder, or stored in
    /// its artifact), if it has one.
    pub fn tokenizer(&self) -> Option<&text::TextTokenizer> {
        self.tokenizer.as_ref()?.as_ref().ok().map(|t| t.as_ref())
    }

    /// `--prompt` texts as token rows: encoded by the model's tokenizer;
    /// encoder rows of different lengths padded at the end with the
    /// padding token and masked (the attention mask is returned then).
    #[allow(clippy::type_complexity)]
    pub fn encode_prompts(
        &self,
        prompts: &[String],
    ) -> Result<(Vec<Vec<i64>>, Option<Vec<Vec<i64>>>), Error> {
        let tok = match &self.tokenizer {
            Some(Ok(t)) => t,
            Some(Err(why)) => return Err(Error::Input(format!("--prompt: {why}"))),
            None => {
                return Err(Error::Input(format!(
                    "{} has no tokenizer.json: --prompt needs one (give token ids with --tokens instead)",
                    self.origin
                )))
            }
        };
        if let Some(r) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Input(format!(
                "--prompt {r} is empty: give the text to start from"
            )));
        }
        let rows: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| tok.encode(p))
            .collect::<Result<_, _>>()?;
        for (r, row) in rows.iter().enumerate() {
            self.check_prompt_len(&format!("--prompt {r}"), row.len())?;
        }
        if let Some(r) = rows.iter().position(|r| r.is_empty()) {
            return Err(Error::Input(format!("--prompt {r} encodes to no tokens")));
        }
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        if rows.iter().all(|r| r.len() == longest) {
            return Ok((rows, None));
        }
        let encoder = self
            .info
            .as_ref()
            .is_some_and(|i| !i.family.is_generative());
        if !encoder {
            // A decoder's rows stay as they are: generation takes rows of
            // any lengths (see RunInputs::ragged_rows); `run` refuses them.
            return Ok((rows, None));
        }
        match tok.pad_id() {
            Some(pad) => {
                let mask = rows
                    .iter()
                    .map(|r| {
                        let mut m = vec![1i64; r.len()];
                        m.resize(longest, 0);
                        m
                    })
                    .collect();
                let rows = rows
                    .into_iter()
                    .map(|mut r| {
                        r.resize(longest, pad);
                        r
                    })
                    .collect();
                Ok((rows, Some(mask)))
            }
            None => Err(Error::Input(format!(
                "the prompts encode to {} tokens (the tokenizer names no padding token): give prompts of equal length, or one at a time",
                rows.iter().map(|r| r.len().to_string()).collect::<Vec<_>>().join(", "),
            ))),
        }
    }

    /// For rows of unequal lengths ([`RunInputs::ragged_rows`]): every row
    /// checked first, then `run` on each row alone, the results in row
    /// order; `None` when the rows are of one length.
    pub(crate) fn per_ragged_row<T>(
        &self,
        prompt: &RunInputs,
        mut run: impl FnMut(&RunInputs) -> Result<Vec<T>, Error>,
    ) -> Option<Result<Vec<T>, Error>> {
        let parts = prompt.ragged_rows()?;
        let mut all = || -> Result<Vec<T>, Error> {
            for part in &parts {
                self.prepare_inputs(part)?;
            }
            let mut out = Vec::with_capacity(parts.len());
            for part in &parts {
                out.extend(run(part)?);
            }
            Ok(out)
        };
        Some(all())
    }

    /// The model with `funcs` added after its own functions, and the
    /// weights of `weights` it does not have yet.
    pub(crate) fn with_functions(&self, funcs: Vec<Graph>, weights: Option<Weights>) -> Model {
        let mut out = self.clone();
        out.module.funcs.extend(funcs);
        if let Some(extra) = weights {
            let mine = out.weights.get_or_insert_with(Weights::new);
            for (name, t) in extra {
                mine.entry(name).or_insert(t);
            }
        }
        out
    }

    /// This model with every weight read into an allocation of its own
    /// instead of mapped from its file: a file that may be rewritten while
    /// the model runs cannot change (or, truncated, fault) under it, and
    /// each weight ends where its allocation does (the guard-page test
    /// places a fault right after it). Costs the weights' size in memory.
    pub fn with_weights_in_memory(&self) -> Model {
        let mut out = self.clone();
        if let Some(w) = out.weights.as_mut() {
            for t in w.values_mut() {
                *t = t.to_owned_copy();
            }
        }
        out
    }

    /// The table a `gather` of input `v` reads, and its rows, when `v`
    /// indexes a weight (segment ids into `token_type_embeddings`).
    fn gather_table_of(&self, graph: &Graph, v: kiln_ir::ValueId) -> Option<(String, i64)> {
        graph.users(v).into_iter().find_map(|u| {
            let (kiln_ir::Op::Gather, [table, ids]) = (graph.op(u)?, &graph.operands(u)[..]) else {
                return None;
            };
            if *ids != v {
                return None;
            }
            let NodeKind::Param { name } = &graph.node(*table).kind else {
                return None;
            };
            let rows = self.weights.as_ref()?.get(name)?.shape().first().copied()?;
            Some((name.clone(), i64::try_from(rows).ok()?))
        })
    }

    /// The compiled artifact this model was loaded from, if any.
    pub fn artifact(&self) -> Option<&artifact::Loaded> {
        self.artifact.as_deref()
    }

    /// Where the model came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The model's functions.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// The model's weights, when it has them.
    pub fn weights(&self) -> Option<&Weights> {
        self.weights.as_ref()
    }

    /// Family and token limits, for models from a frontend.
    pub fn info(&self) -> Option<&ModelInfo> {
        self.info.as_ref()
    }

    /// Attaches weights from a safetensors file whose tensor names are the
    /// parameter names (for `.kir` models).
    pub fn with_weights_file(mut self, path: &Path) -> Result<Model, Error> {
        let graph = self.main()?;
        let weights = kiln_frontends::hf::read_weights(path, graph, None)?;
        self.weights = Some(weights);
        Ok(self)
    }

    /// The function that `run` executes: the first one.
    pub fn main(&self) -> Result<&Graph, Error> {
        self.module.funcs.first().ok_or_else(|| {
            Error::Unsupported(format!("{}: the module has no function", self.origin))
        })
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

    /// The model after the named optimization pipeline (weights rewritten too,
    /// where a pass folds them).
    /// A model loaded from an artifact is already optimized (at the level
    /// it was compiled with) and is returned as it is.
    pub fn optimize(&self, level: OptLevel) -> Result<Model, Error> {
        if self.artifact.is_some() {
            return Ok(self.clone());
        }
        Ok(self.apply_passes(&PassManager::pipeline(level))?.0)
    }

    /// The model after `passes`, with what each pass did and the IR dumps it
    /// was asked to keep.
    pub fn apply_passes(
        &self,
        passes: &PassManager,
    ) -> Result<(Model, kiln_passes::PassContext<'static>), Error> {
        self.check()?;
        let mut out = self.clone();
        let mut weights = out.weights.take();
        let (log, dumps) = {
            let mut cx = kiln_passes::PassContext::new(weights.as_mut());
            passes.run(&mut out.module, &mut cx)?;
            (std::mem::take(&mut cx.log), std::mem::take(&mut cx.dumps))
        };
        out.weights = weights;
        let mut cx = kiln_passes::PassContext::new(None);
        cx.log = log;
        cx.dumps = dumps;
        Ok((out, cx))
    }

    /// Compiles the main function for `target`.
    pub fn compile(&self, target: Target) -> Result<Box<dyn Executable>, Error> {
        let name = self.main()?.name.clone();
        self.compile_function(&name, target)
    }

    /// The function called `name`.
    pub fn function(&self, name: &str) -> Result<&Graph, Error> {
        self.module
            .funcs
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| {
                let names: Vec<String> = self
                    .module
                    .funcs
                    .iter()
                    .map(|g| format!("@{}", g.name))
                    .collect();
                Error::Unsupported(format!(
                    "{} has no function @{name} (it has {})",
                    self.origin,
                    names.join(", ")
                ))
            })
    }

    /// Compiles the function called `name` for `target`.
    pub fn compile_function(
        &self,
        name: &str,
        target: Target,
    ) -> Result<Box<dyn Executable>, Error> {
        self.check()?;
        let graph = self.function(name)?;
        let none = Weights::new();
        let weights = match &self.weights {
            Some(w) => w,
            // A graph without parameters needs no weight file.
            None if graph.params().is_empty() => &none,
            None => {
                return Err(Error::Input(format!(
                    "{} has no weights: pass a safetensors file with --weights (tensor names = parameter names)",
                    self.origin
                )))
            }
        };
        Ok(target.backend().compile(graph, weights)?)
    }

    /// The CUDA C of every function (one module each, in module order):
    /// what `--backend cuda` compiles with NVRTC, with the dtypes the
    /// weights are stored in.
    pub fn cuda_modules(
        &self,
    ) -> Result<Vec<(String, kiln_backends::cuda::codegen::ModuleSource)>, Error> {
        self.check()?;
        let none = Weights::new();
        let weights = self.weights.as_ref().unwrap_or(&none);
        self.module
            .funcs
            .iter()
            .map(|g| {
                Ok((
                    g.name.clone(),
                    kiln_backends::cuda::module_source(g, weights)?,
                ))
            })
            .collect()
    }

    /// Every function lowered to a [`Program`] (verified), in module order.
    pub fn lower(&self) -> Result<Vec<Program>, Error> {
        self.check()?;
        self.module
            .funcs
            .iter()
            .map(|g| {
                let p = kiln_backends::lower(g)?;
                kiln_backends::lower::verify::verify_structure(&p)?;
                Ok(p)
            })
            .collect()
    }

    /// The text of every lowered function; with `bind` (a value for every
    /// run-time symbol), the arena plan under it too, checked by the Program
    /// verifier.
    pub fn lowered_text(&self, bind: &[(String, i64)]) -> Result<String, Error> {
        let programs = self.lower()?;
        let known: std::collections::BTreeSet<&String> = programs
            .iter()
            .flat_map(|p| p.runtime_symbols.iter().chain(p.capacity.iter()))
            .collect();
        if let Some((n, _)) = bind.iter().find(|(n, _)| !known.contains(n)) {
            let known: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
            return Err(Error::Input(format!(
                "--bind {n}: the model has no run-time symbol `{n}` (it has {})",
                known.join(", ")
            )));
        }
        let mut out = Vec::new();
        for p in &programs {
            if bind.is_empty() {
                out.push(p.to_text(None));
                continue;
            }
            let mut cx = ShapeCx::new();
            for (n, v) in bind {
                if p.runtime_symbols.contains(n) {
                    cx.bind(n, &kiln_ir::Dim::constant(*v))
                        .map_err(|e| Error::Input(format!("--bind {n}={v}: {e}")))?;
                }
            }
            if let Some(missing) = p.runtime_symbols.iter().find(|s| !cx.is_bound(s)) {
                return Err(Error::Input(format!(
                    "--bind: @{} has the run-time symbol `{missing}`, which needs a value (e.g. {missing}=1)",
                    p.name
                )));
            }
            let capacity = bind
                .iter()
                .find(|(n, _)| p.capacity.as_ref() == Some(n))
                .map(|(_, v)| *v as usize);
            let cx = p.bind_capacity(&cx, capacity)?;
            let plan = kiln_backends::lower::ArenaPlan::place(p, &cx)?;
            kiln_backends::lower::verify::verify_binding(p, &cx, &plan)?;
            out.push(p.to_text(Some(&cx)));
        }
        Ok(out.join("\n"))
    }

    /// Builds the input tensors of the main function from token rows, checking
    /// ids, lengths and masks against the model before anything runs.
    pub fn prepare_inputs(&self, inputs: &RunInputs) -> Result<Vec<Tensor>, Error> {
        let graph = self.main()?;
        let rows = &inputs.tokens;
        if rows.is_empty() || rows.iter().any(|r| r.is_empty()) {
            return Err(Error::Input(
                "every token row needs at least one token".into(),
            ));
        }
        check_rows("--tokens", rows)?;
        self.check_ids("--tokens", rows)?;
        let shape_of = |r: &Vec<Vec<i64>>| vec![r.len(), r[0].len()];
        let mut out = Vec::new();
        for &v in graph.inputs() {
            let NodeKind::Input { name } = &graph.node(v).kind else {
                continue;
            };
            let t = match name.as_str() {
                "tokens" => Tensor::from_tokens(rows).map_err(RunError::from)?,
                "attention_mask" => match &inputs.attention_mask {
                    Some(m) => {
                        check_rows("--attention-mask", m)?;
                        if shape_of(m) != shape_of(rows) {
                            return Err(Error::Input(format!(
                                "--attention-mask has shape {:?} but --tokens has {:?}: give one mask row per token row, one entry per token",
                                shape_of(m),
                                shape_of(rows)
                            )));
                        }
                        if let Some((r, row)) = m.iter().enumerate().find(|(_, row)| row.iter().any(|&x| x != 0 && x != 1)) {
                            return Err(Error::Input(format!("--attention-mask row {r} has values other than 0 and 1: {row:?}")));
                        }
                        if let Some(r) = m.iter().position(|row| row.iter().all(|&x| x == 0)) {
                            return Err(Error::Input(format!("--attention-mask row {r} masks every token")));
                        }
                        Tensor::from_tokens(m).map_err(RunError::from)?
                    }
                    None => Tensor::from_tokens(&vec![vec![1i64; rows[0].len()]; rows.len()]).map_err(RunError::from)?,
                },
                "token_type_ids" => match &inputs.token_type_ids {
                    Some(t) => {
                        check_rows("--token-type-ids", t)?;
                        if shape_of(t) != shape_of(rows) {
                            return Err(Error::Input("--token-type-ids must have the shape of --tokens".into()));
                        }
                        if let Some((table, types)) = self.gather_table_of(graph, v) {
                            if let Some((r, bad)) = t.iter().enumerate().find_map(|(r, row)| {
                                row.iter().find(|&&x| x < 0 || x >= types).map(|&x| (r, x))
                            }) {
                                return Err(Error::Input(format!(
                                    "--token-type-ids row {r} has segment id {bad}; the model has {types} segment types (ids 0 to {}, rows of @{table})",
                                    types - 1
                                )));
                            }
                        }
                        Tensor::from_tokens(t).map_err(RunError::from)?
                    }
                    None => Tensor::from_tokens(&vec![vec![0i64; rows[0].len()]; rows.len()]).map_err(RunError::from)?,
                },
                "decoder_tokens" => {
                    let d = match &inputs.decoder_tokens {
                        Some(d) => d.clone(),
                        None => {
                            let start = self.info.as_ref().and_then(|i| i.decoder_start_token_id).ok_or_else(|| {
                                Error::Input("the model needs --decoder-tokens (no decoder_start_token_id known)".into())
                            })?;
                            vec![vec![start]; rows.len()]
                        }
                    };
                    check_rows("--decoder-tokens", &d)?;
                    if d.len() != rows.len() {
                        return Err(Error::Input(format!(
                            "--decoder-tokens has {} rows but --tokens has {}",
                            d.len(),
                            rows.len()
                        )));
                    }
                    self.check_ids("--decoder-tokens", &d)?;
                    Tensor::from_tokens(&d).map_err(RunError::from)?
                }
                other => {
                    return Err(Error::Input(format!(
                        "the model's input %{other} cannot be given from the command line (kiln fills tokens, attention_mask, token_type_ids, decoder_tokens)"
                    )))
                }
            };
            out.push(t);
        }
        if let (Some(mask), false) = (
            &inputs.attention_mask,
            graph_has_input(graph, "attention_mask"),
        ) {
            // A model without a mask input is causal: a right-padded row's real
            // tokens never see its padding, so their outputs are exact (the padded
            // positions' outputs are meaningless). Left padding would change them.
            let right_padded = |row: &Vec<i64>| row.windows(2).all(|w| !(w[0] == 0 && w[1] == 1));
            if let Some(r) = mask.iter().position(|row| !right_padded(row)) {
                return Err(Error::Input(format!(
                    "{} takes no attention mask: only right-padded rows (1…1 0…0) can be run, but --attention-mask row {r} has padding before tokens",
                    self.origin
                )));
            }
            check_rows("--attention-mask", mask)?;
            if mask.len() != rows.len() || mask[0].len() != rows[0].len() {
                return Err(Error::Input(
                    "--attention-mask must have the shape of --tokens".into(),
                ));
            }
        }
        for (flag, given, input) in [
            (
                "--token-type-ids",
                inputs.token_type_ids.is_some(),
                "token_type_ids",
            ),
            (
                "--decoder-tokens",
                inputs.decoder_tokens.is_some(),
                "decoder_tokens",
            ),
        ] {
            if given && !graph_has_input(graph, input) {
                return Err(Error::Input(format!(
                    "{} takes no {input} input, so {flag} cannot be used",
                    self.origin
                )));
            }
        }
        Ok(out)
    }

    /// A prompt of `len` tokens fits the model's positions; `what` names
    /// the flag (`--prompt 1`, `--chat`).
    pub fn check_prompt_len(&self, what: &str, len: usize) -> Result<(), Error> {
        self.check_positions(len, || format!("{what} encodes to"))
    }

    /// `len` tokens fit the model's positions; the error reads
    /// "`{subject}` N tokens, more than the model's M positions".
    fn check_positions(&self, len: usize, subject: impl FnOnce() -> String) -> Result<(), Error> {
        if let Some(info) = &self.info {
            if let Some(max) = info.max_positions {
                if len as i64 > max {
                    return Err(Error::Input(format!(
                        "{} {len} tokens, more than the model's {max} positions ({} in config.json)",
                        subject(),
                        info.family.positions_key()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Token ids below the vocabulary size and sequences within the positions.
    fn check_ids(&self, flag: &str, rows: &[Vec<i64>]) -> Result<(), Error> {
        let Some(info) = &self.info else {
            return Ok(());
        };
        for (r, row) in rows.iter().enumerate() {
            if let Some((i, &id)) = row
                .iter()
                .enumerate()
                .find(|(_, &id)| id < 0 || id >= info.vocab_size)
            {
                return Err(Error::Input(format!(
                    "{flag} row {r}, position {i}: token id {id} is out of range (vocabulary size {})",
                    info.vocab_size
                )));
            }
            self.check_positions(row.len(), || format!("{flag} row {r} has"))?;
        }
        Ok(())
    }

    /// Runs the main function on `target`; returns the named outputs.
    pub fn run_on(
        &self,
        target: Target,
        inputs: &RunInputs,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let mut exe = self.compile(target)?;
        self.run_with(exe.as_mut(), inputs)
    }

    /// Runs the main function on the interpreter; returns the named outputs.
    pub fn run(&self, inputs: &RunInputs) -> Result<Vec<(String, Tensor)>, Error> {
        let mut exe = self.compile(Target::Interp)?;
        self.run_with(exe.as_mut(), inputs)
    }

    /// Runs an already compiled executable of this model.
    pub fn run_with(
        &self,
        exe: &mut dyn Executable,
        inputs: &RunInputs,
    ) -> Result<Vec<(String, Tensor)>, Error> {
        let tensors = self.prepare_inputs(inputs)?;
        let outs = exe.run(&tensors)?;
        let names = self.main()?.outputs().iter().map(|(n, _)| n.clone());
        Ok(names.zip(outs).collect())
    }
}

fn graph_has_input(graph: &Graph, name: &str) -> bool {
    graph
        .inputs()
        .iter()
        .any(|v| matches!(&graph.node(*v).kind, NodeKind::Input { name: n } if n == name))
}

/// Rows must be non-empty and of equal length.
fn check_rows(flag: &str, rows: &[Vec<i64>]) -> Result<(), Error> {
    let Some(first) = rows.first() else {
        return Err(Error::Input(format!("{flag} is empty")));
    };
    if first.is_empty() {
        return Err(Error::Input(format!("{flag} row 0 is empty")));
    }
    if let Some((r, row)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| r.len() != first.len())
    {
        return Err(Error::Input(format!(
            "{flag} row {r} has {} entries but row 0 has {}: rows must be equal-length (pad them and pass --attention-mask with 0 on the padding)",
            row.len(),
            first.len()
        )));
    }
    Ok(())
}

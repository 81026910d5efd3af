//! The `kiln` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiln::{Error, GenerateOptions, Model, RunInputs, Sampling};

mod progress;

/// Loads a model folder or IR file, with a spinner on a terminal.
fn load(path: &std::path::Path) -> Result<Model, Error> {
    let _spin = progress::Spinner::start(&format!("loading {}", path.display()));
    Model::load(path)
}

/// Writes to stdout; a reader that went away (`kiln ir … | head`) ends the
/// program quietly instead of panicking.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}

macro_rules! out {
    ($($arg:tt)*) => { emit(&format!($($arg)*)) };
}

macro_rules! outln {
    ($($arg:tt)*) => { emit(&(format!($($arg)*) + "\n")) };
}

/// kiln: a compiler for transformer models.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    /// Threads of the CPU backend (default: every core).
    #[arg(long, global = true, value_name = "N", value_parser = parse_threads)]
    threads: Option<usize>,
    /// Let the CUDA backend's matrix products use TF32 tensor cores
    /// (faster; about 1e-3 relative instead of f32's parity).
    #[arg(long, global = true)]
    tf32: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every shape contract of a model and print its shape trace table.
    ///
    /// Exit code 0 when every contract holds, 1 on a contract violation (each one
    /// listed with its node, op, shapes and source line), 2 when the input cannot
    /// be read or parsed.
    Check {
        /// A `.kir` text-IR file or a Hugging Face model folder.
        model: PathBuf,
    },
    /// Print a model's IR after the optimization pipeline (default `-O2`), or
    /// as the frontend built it (`-O0`), or after a chosen list of passes.
    ///
    /// `--print-after PASS` (or `all`) prints the IR after that pass as well,
    /// and a summary of what each pass did goes to stderr.
    Ir {
        /// A `.kir` text-IR file or a Hugging Face model folder.
        model: PathBuf,
        /// Optimization level: 0 (as built), 1 (cleanup), 2 (cleanup + fusion;
        /// the default). Not for artifacts, which are optimized when compiled.
        #[arg(short = 'O', value_name = "LEVEL", value_parser = parse_level)]
        opt: Option<kiln::OptLevel>,
        /// Run exactly these passes instead of a pipeline (comma-separated;
        /// canonicalize, constant-folding, cse, dce, attention-fusion, lora-merge,
        /// elementwise-fusion, kv-cache).
        #[arg(long, value_delimiter = ',')]
        passes: Option<Vec<String>>,
        /// Also print the IR after this pass (`all`: after every pass).
        #[arg(long, value_name = "PASS")]
        print_after: Vec<String>,
        /// Print Graphviz DOT (shapes on the edges) instead of text IR.
        #[arg(long)]
        dot: bool,
        /// Print the lowered Program of each function instead of the IR:
        /// buffers, views, kernel steps, arena slots and their lifetimes.
        #[arg(long, conflicts_with = "dot")]
        lowered: bool,
        /// Sizes of the run-time symbols for `--lowered`, e.g. `B=1,T=16`: the
        /// arena offsets and peak bytes under them (every run-time symbol needs
        /// a value; an unknown one is an error, exit code 2).
        #[arg(long, value_name = "SYM=INT", value_delimiter = ',', value_parser = parse_binding, requires = "lowered")]
        bind: Vec<(String, i64)>,
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Run a model on token ids and print its outputs.
    ///
    /// Each `--tokens` is one batch row. Causal LMs print `{"logits": [B][T][V]}`,
    /// encoders `{"last_hidden_state": …, "pooled": …, "pooler_output": …}`,
    /// encoder–decoders the decoder's `{"logits": …}`.
    Run {
        /// A `.kir` file (with `--weights`) or a Hugging Face model folder.
        model: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        /// Safetensors weights for a `.kir` model (tensor names = parameter names).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Optimization level of the compiled model: 0 (as built), 1, 2 (the
        /// default). Not for artifacts, which are optimized when compiled.
        #[arg(short = 'O', value_name = "LEVEL", value_parser = parse_level)]
        opt: Option<kiln::OptLevel>,
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "summary")]
        output: OutputArg,
    },
    /// Generate tokens after a prompt (greedy or seeded sampling).
    ///
    /// Prints the new token ids (`{"tokens": [...]}` with `--output json`; one list
    /// per row when several `--tokens` rows are given). Encoder–decoder models
    /// encode `--tokens` and decode from their `decoder_start_token_id`.
    Generate {
        /// A Hugging Face model folder (gpt2, llama, bart).
        model: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        /// How many tokens to generate per row.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Apply the tokenizer's chat template to `--prompt` as a user message
        /// (with the generation prompt) and stop at its end-of-turn token.
        #[arg(long, requires = "prompt")]
        chat: bool,
        /// A system message before the user's, with `--chat`.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Pick the most likely token each step (the default unless a sampling
        /// option is given).
        #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
        greedy: bool,
        /// Sample with this temperature (> 0).
        #[arg(long)]
        temperature: Option<f64>,
        /// Sample among the `k` most likely tokens (0: no limit).
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample among the most likely tokens covering probability `p`.
        #[arg(long)]
        top_p: Option<f64>,
        /// Seed of the sampler (runs with the same seed are identical).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep generating after the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Beam search with this many beams (as transformers' `num_beams`,
        /// without sampling); `--output json` adds every returned beam
        /// (`"beams"`, best first) and their `"scores"`.
        #[arg(long, value_name = "K", conflicts_with_all = ["temperature", "top_k", "top_p", "chat"])]
        num_beams: Option<usize>,
        /// The exponent of the length dividing a finished beam's summed
        /// log-probability (transformers' `length_penalty`).
        #[arg(
            long,
            default_value_t = 1.0,
            requires = "num_beams",
            allow_negative_numbers = true
        )]
        length_penalty: f64,
        /// Re-run the whole prefix every step instead of decoding with a KV cache.
        #[arg(long)]
        no_kv_cache: bool,
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Optimization level of the compiled model: 0 (as built), 1, 2 (the
        /// default). Not for artifacts, which are optimized when compiled.
        #[arg(short = 'O', value_name = "LEVEL", value_parser = parse_level)]
        opt: Option<kiln::OptLevel>,
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "summary")]
        output: OutputArg,
    },
    /// Sentence embeddings of an encoder, as sentence-transformers computes them.
    ///
    /// The folder's `modules.json` and `1_Pooling/config.json` say how token
    /// states are pooled (mean, CLS, max, mean·√len over the attention mask)
    /// and whether the vector is L2-normalised; without them, the masked mean,
    /// not normalised. `--output json` prints `{"embeddings": [[…], …]}`.
    Embed {
        /// An encoder's Hugging Face folder (bert) or its artifact.
        model: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "summary")]
        output: OutputArg,
    },
    /// The best fill-ins for the mask token(s) of a prompt (a masked-LM such
    /// as BertForMaskedLM), as transformers' fill-mask pipeline gives them.
    FillMask {
        /// A masked-LM's Hugging Face folder or its artifact.
        model: PathBuf,
        /// The text, with the tokenizer's mask token (e.g. `[MASK]`).
        #[arg(long)]
        prompt: String,
        /// Candidates per mask.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "summary")]
        output: OutputArg,
    },
    /// Compile a model once into an artifact that runs without its source.
    ///
    /// The artifact holds the optimized IR, every function's lowered Program,
    /// and the weights both as stored and packed for the CPU backend's GEMM,
    /// mapped in place when loaded. `run`, `generate`, `check`, `ir` and
    /// `bench` take it in place of the model. Written to a temporary file and
    /// renamed: a failed compile leaves nothing behind.
    Compile {
        /// A `.kir` file (with `--weights`) or a Hugging Face model folder.
        model: PathBuf,
        /// Safetensors weights for a `.kir` model (tensor names = parameter names).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Optimization level: 0 (as built), 1, 2 (the default).
        #[arg(short = 'O', value_name = "LEVEL", value_parser = parse_level)]
        opt: Option<kiln::OptLevel>,
        /// The backend the artifact is for.
        #[arg(long, value_enum, default_value = "cpu")]
        target: TargetArg,
        /// Where to write the artifact (`model.kiln`).
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Build the built-in GPT-2-style model, check it, print its shape trace,
    /// optimize it, compile it for the CPU (or `--backend cuda`) and generate
    /// with the KV cache.
    Demo {
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
    },
    /// Time a decode step with the KV cache against the full re-run it replaces.
    ///
    /// For each cache length S: the median time of one `decode` step (one token,
    /// cache of length S) and of the peer, the full forward over S + 1 tokens,
    /// measured in the same run on the same backend. Uses the built-in demo model
    /// unless a model folder is given.
    Bench {
        /// A Hugging Face model folder (gpt2, llama); default: the demo model.
        model: Option<PathBuf>,
        /// Cache lengths to time, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "64,512")]
        cache_lengths: Vec<usize>,
        /// Timed runs per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Where to run.
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
        /// `json`: instead of the cache-length report, one JSON object
        /// `{"backend", "threads", "compile_s", "prefill_tok_s", "decode_tok_s",
        /// "peak_rss_mb"}` (an encoder: `"forward_seq_s"` instead of the two
        /// token rates), medians over `--reps` after one warm-up.
        #[arg(long, value_enum, default_value = "summary")]
        output: OutputArg,
        /// Rows of the throughput benchmark.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Prompt (sequence) length of the throughput benchmark.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Greedy decode steps with the cache after the prompt.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Timed repetitions of the throughput benchmark.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

/// Token inputs shared by `run` and `generate`.
#[derive(Args)]
struct InputArgs {
    /// Token ids of one batch row, comma-separated (repeat for more rows).
    #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt", value_parser = parse_ids)]
    tokens: Vec<Vec<i64>>,
    /// Text of one batch row, encoded with the model folder's
    /// `tokenizer.json` (repeat for more rows).
    #[arg(long)]
    prompt: Vec<String>,
    /// Attention mask of one row (1 = token, 0 = padding); one per `--tokens`.
    #[arg(long, value_parser = parse_ids)]
    attention_mask: Vec<Vec<i64>>,
    /// Segment ids of one row (BERT); default zeros.
    #[arg(long, value_parser = parse_ids)]
    token_type_ids: Vec<Vec<i64>>,
    /// Decoder token ids of one row (encoder–decoder models).
    #[arg(long, value_parser = parse_ids)]
    decoder_tokens: Vec<Vec<i64>>,
}

impl InputArgs {
    /// The token rows: `--tokens` as given, or `--prompt` encoded by the
    /// model's tokenizer (encoders' rows padded and masked).
    fn to_inputs(&self, model: &Model) -> Result<RunInputs, Error> {
        let inputs = self.to_ragged_inputs(model)?;
        if !self.prompt.is_empty() && inputs.ragged_rows().is_some() {
            return Err(Error::Input(format!(
                "the prompts encode to {} tokens: a decoder's rows are not padded, so this command takes prompts of one length (generate takes prompts of any lengths)",
                inputs.tokens.iter().map(|r| r.len().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(inputs)
    }

    /// [`InputArgs::to_inputs`] where rows of several lengths are taken
    /// (generation runs them one by one).
    fn to_ragged_inputs(&self, model: &Model) -> Result<RunInputs, Error> {
        let opt = |v: &Vec<Vec<i64>>| (!v.is_empty()).then(|| v.clone());
        let (tokens, mask) = if self.prompt.is_empty() {
            (self.tokens.clone(), None)
        } else {
            model.encode_prompts(&self.prompt)?
        };
        if mask.is_some() && !self.attention_mask.is_empty() {
            return Err(Error::Input(
                "--attention-mask: the prompts were padded to one length; give prompts alone, or --tokens with their mask".into(),
            ));
        }
        Ok(RunInputs {
            tokens,
            attention_mask: mask.or_else(|| opt(&self.attention_mask)),
            token_type_ids: opt(&self.token_type_ids),
            decoder_tokens: opt(&self.decoder_tokens),
        })
    }
}

/// PEFT LoRA adapters of `run`, `generate` and `ir`.
#[derive(Args)]
struct AdapterArgs {
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors);
    /// repeat to apply several (their updates add up).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
    /// `merged`: fold the adapters into the weights before compiling (no run-time
    /// cost); `unmerged`: keep `lora_linear` nodes whose factors stay swappable weights.
    #[arg(
        long,
        value_name = "merged|unmerged",
        default_value = "merged",
        requires = "adapters"
    )]
    lora_mode: kiln::adapter::LoraMode,
}

impl AdapterArgs {
    fn apply(&self, model: Model) -> Result<Model, Error> {
        model.with_adapters(&self.adapters, self.lora_mode)
    }

    /// The model with the adapters applied and the pipeline of `opt` run;
    /// an artifact as it is (it was optimized when compiled), and an error
    /// when adapters or `-O` are given for one.
    fn prepare(&self, model: Model, opt: Option<kiln::OptLevel>) -> Result<Model, Error> {
        if model.artifact().is_some() {
            reject_for_artifact(&model, !self.adapters.is_empty(), opt)?;
            return Ok(model);
        }
        let m = self.apply(model)?;
        let pipeline = kiln::adapter::pipeline(opt.unwrap_or(kiln::OptLevel::O2), self.lora_mode)?;
        Ok(m.apply_passes(&pipeline)?.0)
    }
}

/// `--adapter` and `-O` apply when an artifact is compiled, not when it runs.
fn reject_for_artifact(
    model: &Model,
    adapters: bool,
    opt: Option<kiln::OptLevel>,
) -> Result<(), Error> {
    let Some(a) = model.artifact() else {
        return Ok(());
    };
    let what = match (adapters, opt) {
        (true, _) => "--adapter",
        (false, Some(_)) => "-O",
        (false, None) => return Ok(()),
    };
    Err(Error::Input(format!(
        "{} is a compiled artifact (-O{}, adapters: {}): {what} applies when compiling (`kiln compile`), not to an artifact",
        model.origin(),
        a.manifest.opt_level,
        if a.manifest.adapters.is_empty() {
            "none".to_string()
        } else {
            a.manifest.adapters.join(", ")
        }
    )))
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// The reference interpreter, on the graph (the oracle).
    Interp,
    /// The lowered Program, run by the reference Program executor.
    Reference,
    /// The lowered Program, run by the CPU backend's native kernels.
    Cpu,
    /// The lowered Program as CUDA kernels on the first NVIDIA GPU.
    Cuda,
    /// The CUDA kernels on the emulated device (host threads; for testing).
    #[value(hide = true)]
    CudaEmu,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// The CPU backend (packed weights for its AVX-512 GEMM where the
    /// compiling host has AVX-512).
    Cpu,
    /// The CUDA backend: every function's CUDA C, and its PTX where NVRTC
    /// is installed (run it with `--backend cuda`).
    Cuda,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum OutputArg {
    /// Output names, shapes and a few values.
    Summary,
    /// One JSON object on stdout.
    Json,
}

fn parse_level(s: &str) -> Result<kiln::OptLevel, String> {
    match s {
        "0" => Ok(kiln::OptLevel::O0),
        "1" => Ok(kiln::OptLevel::O1),
        "2" => Ok(kiln::OptLevel::O2),
        _ => Err(format!("`{s}` is not an optimization level (0, 1 or 2)")),
    }
}

/// One `SYM=INT` of `--bind`.
fn parse_binding(s: &str) -> Result<(String, i64), String> {
    let bad = || format!("`{s}` is not a binding such as T=128");
    let (name, value) = s.split_once('=').ok_or_else(bad)?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad());
    }
    let value: i64 = value.trim().parse().map_err(|_| bad())?;
    if value < 0 {
        return Err(format!("`{s}`: a size cannot be negative"));
    }
    Ok((name.to_string(), value))
}

fn parse_ids(s: &str) -> Result<Vec<i64>, String> {
    s.split(',')
        .map(|p| {
            let p = p.trim();
            p.parse::<i64>()
                .map_err(|_| format!("`{p}` is not an integer token id"))
        })
        .collect()
}

/// `--tf32`, for [`target`].
static TF32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn target(b: BackendArg, threads: Option<usize>) -> kiln::Target {
    match b {
        BackendArg::Interp => kiln::Target::Interp,
        BackendArg::Reference => kiln::Target::Reference,
        BackendArg::Cpu => kiln::Target::Cpu {
            threads: threads.unwrap_or(0),
        },
        BackendArg::Cuda => kiln::Target::Cuda {
            device: 0,
            tf32: TF32.load(std::sync::atomic::Ordering::Relaxed),
        },
        BackendArg::CudaEmu => kiln::Target::CudaEmulated,
    }
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a thread count from 1 to 1024")),
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    let threads = cli.threads;
    TF32.store(cli.tf32, std::sync::atomic::Ordering::Relaxed);
    match cli.command {
        Command::Check { model } => {
            let m = load(&model)?;
            let trace = m.shape_trace()?;
            outln!("{}: all shape contracts hold\n", m.origin());
            out!("{trace}");
        }
        Command::Ir {
            model,
            opt,
            passes,
            print_after,
            dot,
            lowered,
            bind,
            adapter,
        } => {
            if let Some(bad) = print_after
                .iter()
                .find(|p| *p != "all" && !kiln::passes::pass_names().contains(&p.as_str()))
            {
                return Err(Error::Pass(kiln::passes::PassError::UnknownPass(
                    bad.clone(),
                )));
            }
            let m = load(&model)?;
            reject_for_artifact(&m, !adapter.adapters.is_empty(), opt)?;
            let m = adapter.apply(m)?;
            let pm = match &passes {
                Some(names) => kiln::PassManager::from_names(names).map_err(Error::Pass)?,
                // An artifact is printed as it was compiled.
                None if m.artifact().is_some() => kiln::PassManager::from_names::<&str>(&[])?,
                None => {
                    kiln::adapter::pipeline(opt.unwrap_or(kiln::OptLevel::O2), adapter.lora_mode)?
                }
            }
            .print_after(&print_after);
            if let Some(p) = print_after
                .iter()
                .find(|p| *p != "all" && !pm.names().contains(&p.as_str()))
            {
                let names = pm.names();
                let runs = if names.is_empty() {
                    "no passes".to_string()
                } else {
                    names.join(", ")
                };
                return Err(Error::Input(format!(
                    "--print-after {p}: that pass is not in the pipeline (it runs {runs})"
                )));
            }
            let (m, cx) = m.apply_passes(&pm)?;
            let lowered = if lowered {
                Some(m.lowered_text(&bind)?)
            } else {
                None
            };
            for (pass, text) in &cx.dumps {
                outln!("// ----- IR after {pass} -----");
                out!("{text}");
                outln!("");
            }
            for r in &cx.log {
                let what = if r.notes.is_empty() {
                    "no change".to_string()
                } else {
                    r.notes.join("; ")
                };
                eprintln!("pass {}: {what}", r.pass);
            }
            if !cx.dumps.is_empty() {
                outln!("// ----- final IR -----");
            }
            if let Some(text) = lowered {
                out!("{text}");
            } else if dot {
                out!("{}", m.to_dot());
            } else {
                out!("{}", m.to_text());
            }
        }
        Command::Run {
            model,
            inputs,
            weights,
            adapter,
            opt,
            backend,
            output,
        } => {
            let mut m = load(&model)?;
            if let Some(w) = weights {
                m = m.with_weights_file(&w)?;
            }
            let m = adapter.prepare(m, opt)?;
            let mut exe = m.compile(target(backend, threads))?;
            let outs = m.run_with(exe.as_mut(), &inputs.to_inputs(&m)?)?;
            // Printed as computed, but not silently: say which outputs hold
            // NaN or infinities, and which weights do.
            let bad: Vec<&str> = outs
                .iter()
                .filter(|(_, t)| t.to_f32().is_some_and(|v| v.iter().any(|x| !x.is_finite())))
                .map(|(n, _)| n.as_str())
                .collect();
            if !bad.is_empty() {
                eprintln!(
                    "warning: {}: output {} holds NaN or infinite values{}",
                    m.origin(),
                    bad.join(", "),
                    kiln::non_finite_weights(m.weights())
                );
            }
            match output {
                OutputArg::Json => outln!("{}", kiln::output::outputs_json(&outs)),
                OutputArg::Summary => {
                    for (name, t) in &outs {
                        outln!("{name}: {t} {}", preview(t));
                    }
                }
            }
        }
        Command::Generate {
            model,
            inputs,
            max_new_tokens,
            chat,
            system,
            greedy: _,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            num_beams,
            length_penalty,
            no_kv_cache,
            adapter,
            opt,
            backend,
            output,
        } => {
            let m = adapter.prepare(load(&model)?, opt)?;
            if let Some(num_beams) = num_beams {
                let inputs = inputs.to_ragged_inputs(&m)?;
                let opts = kiln::beam::BeamOptions {
                    num_beams,
                    length_penalty,
                    max_new_tokens,
                    stop_at_eos: !ignore_eos,
                    backend: target(backend, threads),
                };
                let rows = m.beam_search(&inputs, &opts)?;
                print_beams(&m, &rows, output)?;
                return Ok(());
            }
            let sampling = if temperature.is_some() || top_k.is_some() || top_p.is_some() {
                Sampling::Sample {
                    temperature: temperature.unwrap_or(1.0),
                    top_k: top_k.unwrap_or(0),
                    top_p: top_p.unwrap_or(1.0),
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            if !no_kv_cache && m.info().is_some_and(|i| i.family.is_generative()) {
                if let Err(e) = m.kv_split() {
                    eprintln!("note: decoding without a KV cache: {e}");
                }
            }
            let opts = GenerateOptions {
                max_new_tokens,
                sampling,
                stop_at_eos: !ignore_eos,
                kv_cache: !no_kv_cache,
                backend: target(backend, threads),
            };
            // On a terminal, one row's text streams as it is generated (the
            // decoded text so far, printed where it extends what is shown:
            // a tokenizer may rewrite the end of a word as it grows).
            let streaming = output == OutputArg::Summary
                && std::io::IsTerminal::is_terminal(&std::io::stdout())
                && m.tokenizer().is_some();
            let mut shown = String::new();
            let mut on_step = |rows: &[Vec<i64>]| {
                let (Some(t), [row]) = (m.tokenizer(), rows) else {
                    return;
                };
                if let Ok(text) = t.decode(row) {
                    if let Some(more) = text.strip_prefix(shown.as_str()) {
                        out!("{more}");
                        let _ = std::io::Write::flush(&mut std::io::stdout());
                        shown = text;
                    }
                }
            };
            let (m, inputs) = if chat {
                let [user] = &inputs.prompt[..] else {
                    return Err(Error::Input(
                        "--chat takes one --prompt (the user's message)".into(),
                    ));
                };
                let tok = m.tokenizer().ok_or_else(|| {
                    Error::Input(format!(
                        "{} has no tokenizer.json: --chat needs one",
                        m.origin()
                    ))
                })?;
                let mut messages: Vec<(&str, &str)> = Vec::new();
                if let Some(s) = &system {
                    messages.push(("system", s));
                }
                if user.is_empty() {
                    return Err(Error::Input(
                        "--prompt is empty: --chat needs the user's message".into(),
                    ));
                }
                messages.push(("user", user));
                let (_, ids) = tok.chat(&messages)?;
                m.check_prompt_len("--chat (the rendered template)", ids.len())?;
                let stop = tok.eos_id();
                let inputs = RunInputs::tokens(vec![ids]);
                (stop.map_or(m.clone(), |id| m.with_stop_token(id)), inputs)
            } else {
                let inputs = inputs.to_ragged_inputs(&m)?;
                (m.clone(), inputs)
            };
            let streamed = streaming && inputs.tokens.len() == 1;
            let new = if streamed {
                let new = m.generate_streaming(&inputs, &opts, &mut on_step)?;
                outln!("");
                new
            } else {
                m.generate(&inputs, &opts)?
            };
            // Text, when the model has a tokenizer: `tokenizer.decode(new_ids)`.
            let texts: Option<Vec<String>> = match m.tokenizer() {
                Some(t) => Some(new.iter().map(|r| t.decode(r)).collect::<Result<_, _>>()?),
                None => None,
            };
            let lists: Vec<String> = new
                .iter()
                .map(|r| {
                    format!(
                        "[{}]",
                        r.iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect();
            let body = if lists.len() == 1 {
                lists[0].clone()
            } else {
                format!("[{}]", lists.join(", "))
            };
            match (output, &texts) {
                (OutputArg::Json, None) => outln!("{{\"tokens\": {body}}}"),
                (OutputArg::Json, Some(t)) => {
                    let text = if t.len() == 1 {
                        serde_json::Value::from(t[0].clone())
                    } else {
                        serde_json::Value::from(t.clone())
                    };
                    outln!("{{\"tokens\": {body}, \"text\": {text}}}")
                }
                (OutputArg::Summary, _) => {
                    outln!("new tokens: {body}");
                    // A streamed text is already on the screen.
                    for (r, t) in texts.iter().flatten().enumerate().filter(|_| !streamed) {
                        if texts.as_ref().is_some_and(|v| v.len() > 1) {
                            outln!("new text {r}: {t}");
                        } else {
                            outln!("new text: {t}");
                        }
                    }
                }
            }
        }
        Command::Embed {
            model,
            inputs,
            backend,
            output,
        } => {
            // (An artifact is returned as it was compiled.)
            let m = load(&model)?.optimize(kiln::OptLevel::O2)?;
            let inputs = inputs.to_inputs(&m)?;
            let rows = kiln::embed::embed(&m, &inputs, target(backend, threads))?;
            match output {
                OutputArg::Json => outln!("{}", serde_json::json!({ "embeddings": rows })),
                OutputArg::Summary => {
                    let cfg = m.embedding_config();
                    outln!(
                        "{} embeddings of {} ({:?} pooling{})",
                        rows.len(),
                        rows.first().map_or(0, Vec::len),
                        cfg.pooling,
                        if cfg.normalize { ", L2-normalised" } else { "" }
                    );
                    for (r, v) in rows.iter().enumerate() {
                        let head: Vec<String> =
                            v.iter().take(4).map(|x| format!("{x:.5}")).collect();
                        outln!("row {r}: [{}, …]", head.join(", "));
                    }
                }
            }
        }
        Command::FillMask {
            model,
            prompt,
            top_k,
            backend,
            output,
        } => {
            // (An artifact is returned as it was compiled.)
            let m = load(&model)?.optimize(kiln::OptLevel::O2)?;
            let fills = kiln::fill_mask::fill_mask(&m, &prompt, top_k, target(backend, threads))?;
            match output {
                OutputArg::Json => {
                    let v = if fills.len() == 1 {
                        serde_json::json!(fills[0])
                    } else {
                        serde_json::json!(fills)
                    };
                    outln!("{v}");
                }
                OutputArg::Summary => {
                    for (k, mask) in fills.iter().enumerate() {
                        if fills.len() > 1 {
                            outln!("mask {k}:");
                        }
                        for f in mask {
                            outln!("{:.4}  {:<12} {}", f.score, f.token_str, f.sequence);
                        }
                    }
                }
            }
        }
        Command::Compile {
            model,
            weights,
            adapter,
            opt,
            target: compile_target,
            out,
        } => {
            let started = std::time::Instant::now();
            let mut m = load(&model)?;
            if let Some(w) = weights {
                m = m.with_weights_file(&w)?;
            }
            let opts = kiln::artifact::CompileOptions {
                opt: opt.unwrap_or(kiln::OptLevel::O2),
                adapters: adapter.adapters.clone(),
                lora_mode: adapter.lora_mode,
                threads: threads.unwrap_or(0),
                target: match compile_target {
                    TargetArg::Cpu => kiln::artifact::TARGET,
                    TargetArg::Cuda => kiln::artifact::TARGET_CUDA,
                },
            };
            let w = {
                let _spin = progress::Spinner::start(&format!("compiling {}", model.display()));
                kiln::artifact::compile(&m, &opts, &out)?
            };
            outln!(
                "wrote {}: {:.1} MB, functions {}, {} weights, {} packed for the GEMM, in {:.2} s",
                out.display(),
                w.bytes as f64 / 1e6,
                w.functions
                    .iter()
                    .map(|f| format!("@{f}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                w.weights,
                w.packed,
                started.elapsed().as_secs_f64()
            );
        }
        Command::Bench {
            model,
            backend,
            cache_lengths,
            iters,
            output,
            batch,
            prompt_len,
            decode,
            reps,
        } => {
            let m = match model {
                Some(p) => load(&p)?,
                None => Model::demo()?,
            };
            if output == OutputArg::Json {
                let w = kiln::bench::Workload {
                    batch,
                    prompt_len,
                    decode,
                    reps,
                };
                let t = kiln::bench::bench_throughput(&m, target(backend, threads), &w)?;
                outln!("{}", t.to_json());
                return Ok(());
            }
            let rows =
                kiln::bench::bench_decode(&m, target(backend, threads), &cache_lengths, iters)?;
            outln!(
                "model: {} (backend: {}, batch 1, median of {iters})",
                m.origin(),
                target(backend, threads).name()
            );
            outln!("| cache S | decode step (ms) | full forward S+1 (ms) | full / decode |");
            outln!("|---------|------------------|-----------------------|---------------|");
            for r in &rows {
                outln!(
                    "| {:>7} | {:>16.3} | {:>21.3} | {:>12.1}x |",
                    r.cache_len,
                    r.decode_ms,
                    r.full_ms,
                    r.full_ms / r.decode_ms.max(1e-9)
                );
            }
            if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
                if b.cache_len > a.cache_len {
                    outln!(
                        "decode step at S={} costs {:.2}x the step at S={} ({:.1}x longer cache)",
                        b.cache_len,
                        b.decode_ms / a.decode_ms.max(1e-9),
                        a.cache_len,
                        b.cache_len as f64 / a.cache_len as f64
                    );
                }
            }
        }
        Command::Demo { backend } => {
            if let BackendArg::Cuda = backend {
                let gpu = kiln::backends::cuda::check_available(0)?;
                outln!("kiln demo on {gpu}");
            }
            let m = Model::demo()?;
            let trace = m.shape_trace()?;
            outln!("kiln demo: built-in GPT-2-style model (2 layers, symbolic B and T, seeded random weights)");
            outln!("all shape contracts hold\n");
            out!("{trace}");
            let (m, cx) = m.apply_passes(&kiln::PassManager::pipeline(kiln::OptLevel::O2))?;
            outln!("\noptimized with -O2:");
            for r in cx.log.iter().filter(|r| !r.notes.is_empty()) {
                outln!("  {}: {}", r.pass, r.notes.join("; "));
            }
            let prompt: Vec<Vec<i64>> = vec![vec![10, 200, 31, 7], vec![1, 2, 3, 4]];
            let on = target(backend, threads);
            let started = std::time::Instant::now();
            let mut exe = m.compile(on)?;
            let compile_s = started.elapsed().as_secs_f64();
            let outs = m.run_with(exe.as_mut(), &RunInputs::tokens(prompt.clone()))?;
            outln!(
                "\nlowered and compiled for {} in {:.1} ms; run with tokens {prompt:?}:",
                match backend {
                    BackendArg::Cpu => "the CPU",
                    BackendArg::Cuda => "the GPU (CUDA)",
                    BackendArg::CudaEmu => "the emulated CUDA device",
                    BackendArg::Interp => "the interpreter",
                    BackendArg::Reference => "the reference executor",
                },
                compile_s * 1e3
            );
            for (name, t) in &outs {
                outln!("  {name}: {t}");
            }
            let max_new_tokens = 32;
            let opts = GenerateOptions {
                max_new_tokens,
                sampling: Sampling::Greedy,
                stop_at_eos: false,
                kv_cache: true,
                backend: on,
            };
            // The first call comes after the session is compiled and the
            // prompt prefilled; the rest time the decode steps alone.
            let started = std::time::Instant::now();
            let mut first: Option<std::time::Instant> = None;
            let new =
                m.generate_streaming(&RunInputs::tokens(prompt.clone()), &opts, &mut |_| {
                    first.get_or_insert_with(std::time::Instant::now);
                })?;
            let done = std::time::Instant::now();
            let count: usize = new.iter().map(Vec::len).sum();
            let first = first.unwrap_or(done);
            let decoded = count.saturating_sub(prompt.len());
            let decode_s = (done - first).as_secs_f64();
            outln!(
                "  greedy generation with the KV cache, batch {}: {count} tokens in {:.1} ms: \
                 session compile and prefill {:.1} ms, then {decoded} tokens in {:.1} ms ({:.0} tokens/s)",
                prompt.len(),
                (done - started).as_secs_f64() * 1e3,
                (first - started).as_secs_f64() * 1e3,
                decode_s * 1e3,
                decoded as f64 / decode_s.max(1e-9),
            );
            outln!(
                "  first tokens: {:?}",
                new.iter().map(|r| &r[..r.len().min(8)]).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}

/// The first few values of a tensor, for the summary output.
/// Beam search results: `--output json` gives `tokens` (and `text`) of the
/// best beam, every returned beam under `beams` and their `scores`, one
/// entry per prompt row when there are several.
fn print_beams(
    m: &kiln::Model,
    rows: &[Vec<kiln::beam::Beam>],
    output: OutputArg,
) -> Result<(), Error> {
    use serde_json::{json, Value};
    let decode = |t: &[i64]| -> Result<Option<String>, Error> {
        match m.tokenizer() {
            Some(tok) => Ok(Some(tok.decode(t)?)),
            None => Ok(None),
        }
    };
    let mut objs = Vec::new();
    for beams in rows {
        let best: &[i64] = beams.first().map_or(&[], |b| b.tokens.as_slice());
        let mut o = json!({
            "tokens": best,
            "beams": beams.iter().map(|b| b.tokens.clone()).collect::<Vec<_>>(),
            "scores": beams.iter().map(|b| b.score).collect::<Vec<_>>(),
        });
        if let Some(text) = decode(best)? {
            o["text"] = Value::from(text);
            let texts = beams
                .iter()
                .map(|b| decode(&b.tokens).map(|t| t.unwrap_or_default()))
                .collect::<Result<Vec<_>, _>>()?;
            o["beam_texts"] = Value::from(texts);
        }
        objs.push(o);
    }
    match output {
        OutputArg::Json => {
            let v = if objs.len() == 1 {
                objs.remove(0)
            } else {
                let field =
                    |k: &str| Value::from(objs.iter().map(|o| o[k].clone()).collect::<Vec<_>>());
                let mut v = json!({
                    "tokens": field("tokens"),
                    "beams": field("beams"),
                    "scores": field("scores"),
                });
                if objs.iter().all(|o| o.get("text").is_some()) {
                    v["text"] = field("text");
                    v["beam_texts"] = field("beam_texts");
                }
                v
            };
            outln!("{v}");
        }
        OutputArg::Summary => {
            for (r, beams) in rows.iter().enumerate() {
                if rows.len() > 1 {
                    outln!("row {r}:");
                }
                for (i, b) in beams.iter().enumerate() {
                    let ids = b
                        .tokens
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    match decode(&b.tokens)? {
                        Some(text) => outln!("beam {i} (score {:.6}): [{ids}] {text:?}", b.score),
                        None => outln!("beam {i} (score {:.6}): [{ids}]", b.score),
                    }
                }
            }
        }
    }
    Ok(())
}

fn preview(t: &kiln::Tensor) -> String {
    let head: Vec<String> = match t.data() {
        kiln::backends::TensorData::F32(v) => v.iter().take(4).map(|x| format!("{x:.5}")).collect(),
        kiln::backends::TensorData::I32(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
        kiln::backends::TensorData::I64(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
        kiln::backends::TensorData::Bool(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
        kiln::backends::TensorData::F16(v) => v
            .iter()
            .take(4)
            .map(|x| format!("{:.5}", x.to_f32()))
            .collect(),
        kiln::backends::TensorData::BF16(v) => v
            .iter()
            .take(4)
            .map(|x| format!("{:.5}", x.to_f32()))
            .collect(),
    };
    format!(
        "[{}{}]",
        head.join(", "),
        if t.numel() > 4 { ", …" } else { "" }
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    progress::install();
    let result = run(cli);
    if let Some(table) = kiln_backends::profile::report() {
        eprint!("{table}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // However large the input made it, an error stays readable.
            let text = e.to_string();
            const MAX: usize = 8000;
            if text.len() > MAX {
                let mut cut = MAX;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                eprintln!(
                    "error: {}… ({} more bytes of this message not shown)",
                    &text[..cut],
                    text.len() - cut
                );
            } else {
                eprintln!("error: {text}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

//! Compiled artifacts: `kiln compile … -o model.kiln` and loading them back.
//!
//! An artifact is one file that runs without the model's source folder:
//!
//! ```text
//! offset 0      header (40 bytes): magic "KILNART\0", format version (u32),
//!               section count (u32), chunk checksum count (u32), checksum
//!               of the table and the chunk checksums (u32), file length
//!               (u64), reserved (u32), checksum of the header's first 36
//!               bytes (u32); little-endian
//! 40            section table: per section 48 bytes: name (16, NUL-padded),
//!               offset (u64), length (u64), index of its first chunk
//!               checksum (u32), reserved (12)
//! …             chunk checksums: CRC-32 of every 1 MiB chunk of every
//!               section, in section order (u32 each)
//! 4096-aligned  the sections:
//!   manifest    JSON: kiln version, target, packed layout, optimization
//!               level, adapters, model info, entry points with their
//!               symbolic signatures, every function's lowered Program
//!               (its text, memory plan included), and where each weight
//!               and each packed weight lies
//!   ir          the optimized module as text IR (with `@prefill` and
//!               `@decode` for models that generate)
//!   weights     every weight after the passes, in its stored dtype, each
//!               at a 64-byte boundary
//!   packed      the CPU backend's packed GEMM panels, each at a 4 KiB
//!               boundary: mapped and used in place
//! ```
//!
//! Machine code is not stored: the CPU backend regenerates it with
//! Cranelift when the artifact is loaded. It takes milliseconds (the
//! expensive part of compiling, packing the weights, is what the artifact
//! saves), and stored code would tie the file to the exact CPU features,
//! Cranelift version and process addresses of the machine that wrote it.
//! The Programs are stored and checked instead: loading lowers the stored
//! IR again and refuses the artifact if a Program differs from the one it
//! records.
//!
//! Loading checks, in order: the magic, the format version, the header's
//! checksum, the file's length, the table's checksum, every section's
//! place, every chunk's checksum (a flipped bit is reported with its
//! section and the byte range of its chunk), then the manifest's kiln
//! version and target. Nothing is trusted before its checksum matched.
//! Writing goes to a temporary file renamed into place, so a failed or
//! interrupted compile leaves no partial artifact.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Error, Family, Model, ModelInfo, Target};
use kiln_backends::cpu::PackedWeight;
use kiln_ir::tensor::ByteSource;
use kiln_ir::{DType, Tensor, TensorData};

/// The first bytes of every artifact.
pub const MAGIC: &[u8; 8] = b"KILNART\0";
/// The layout this kiln writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 40;
const ENTRY_LEN: usize = 48;
/// Bytes per chunk checksum.
const CHUNK: usize = 1 << 20;
/// Sections start at page boundaries.
const PAGE: usize = 4096;
/// Weights start at 64-byte boundaries (an AVX-512 vector).
const WEIGHT_ALIGN: usize = 64;
/// The CPU target (packed GEMM panels).
pub const TARGET: &str = "cpu";
/// The CUDA target (every function's CUDA C, and its PTX when NVRTC was
/// there to make it).
pub const TARGET_CUDA: &str = "cuda";
/// The virtual architecture the stored PTX is for: Ampere and every later
/// GPU JIT-compiles it (H100/H200 included).
pub const PTX_ARCH: &str = "compute_80";
/// The packed layout of the CPU backend's AVX-512 GEMM: 32-column panels.
const PACKED_LAYOUT: &str = "x86_64-avx512f-panels32";
/// A manifest larger than this is refused before it is parsed.
const MANIFEST_LIMIT: u64 = 256 << 20;
const SECTIONS: [&str; 4] = ["manifest", "ir", "weights", "packed"];

/// How `kiln compile` was asked to compile (recorded in the manifest).
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// The optimization level.
    pub opt: crate::OptLevel,
    /// Adapter folders applied, in order.
    pub adapters: Vec<PathBuf>,
    /// How the adapters were applied.
    pub lora_mode: crate::adapter::LoraMode,
    /// Threads of the compiling CPU backend.
    pub threads: usize,
    /// `cpu` or `cuda` ([`TARGET`], [`TARGET_CUDA`]).
    pub target: &'static str,
}

/// What the manifest says about the model and how it was compiled.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The kiln that wrote the artifact.
    pub kiln_version: String,
    /// The backend the artifact is for.
    pub target: String,
    /// The layout of the packed section (`None`: nothing packed, the
    /// compiling host had no AVX-512).
    pub packed_layout: Option<String>,
    /// `-O` level.
    pub opt_level: u8,
    /// Adapter folders, as given.
    pub adapters: Vec<String>,
    /// `merged` or `unmerged`.
    pub lora_mode: String,
    /// Where the model came from.
    pub origin: String,
    /// Family and token limits of models from a frontend.
    pub info: Option<InfoRecord>,
    /// Every function: its name and signature.
    pub entry_points: Vec<EntryPoint>,
    /// Every function's lowered Program, as `kiln ir --lowered` prints it.
    pub programs: Vec<ProgramRecord>,
    /// Every weight, by name, in the weights section.
    pub weights: Vec<WeightRecord>,
    /// Every packed weight, in the packed section.
    pub packed: Vec<PackedRecord>,
    /// The source folder's `tokenizer.json` and `tokenizer_config.json`
    /// texts, when it had them.
    #[serde(default)]
    pub tokenizer: Option<(String, Option<String>, Option<String>)>,
    /// The source folder's sentence-transformers pipeline, when it had one.
    #[serde(default)]
    pub embedding: Option<crate::embed::EmbeddingConfig>,
    /// A CUDA artifact's kernels: per function, its generated CUDA C and the
    /// PTX NVRTC made of it (checked against this kiln's code generator on load).
    #[serde(default)]
    pub cuda: Vec<CudaRecord>,
}

/// One function's CUDA kernels in a CUDA artifact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CudaRecord {
    /// The function.
    pub function: String,
    /// Its generated CUDA C (what NVRTC compiles).
    pub source: String,
    /// The kernels' names.
    pub kernels: Vec<String>,
    /// The PTX for [`PTX_ARCH`], when NVRTC was installed where it was compiled.
    pub ptx: Option<String>,
    /// The PTX's virtual architecture.
    pub arch: String,
}

/// [`ModelInfo`] in the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InfoRecord {
    /// `gpt2`, `llama`, `bert` or `bart`.
    pub family: String,
    /// Token ids must be below it.
    pub vocab_size: i64,
    /// The position limit, when there is one.
    pub max_positions: Option<i64>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<i64>,
    /// Encoder–decoder models' first decoder token.
    pub decoder_start_token_id: Option<i64>,
}

/// One function of the artifact.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EntryPoint {
    /// Its name (`main`, `prefill`, `decode`, …).
    pub name: String,
    /// `func @name(%in: f32[B, T, d], …) -> (out: …)`.
    pub signature: String,
}

/// One lowered Program.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProgramRecord {
    /// The function it lowers.
    pub function: String,
    /// Its text (buffers, steps, symbolic memory plan).
    pub text: String,
}

/// One weight in the weights section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WeightRecord {
    /// The parameter's name.
    pub name: String,
    /// Stored dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte offset in the weights section.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// One packed weight in the packed section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PackedRecord {
    /// The weight it packs.
    pub weight: String,
    /// The view of the weight packed: `B[kk, j] = w[view_offset + kk·sk + j·sn]`.
    pub view_offset: usize,
    /// Element step along the product's inner axis.
    pub sk: usize,
    /// Element step along the output columns.
    pub sn: usize,
    /// Inner size.
    pub k: usize,
    /// Output columns.
    pub n: usize,
    /// Byte offset in the packed section.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// A loaded artifact, kept by its [`Model`]: the manifest, and the packed
/// weights the CPU backend uses while they live.
#[derive(Debug)]
pub struct Loaded {
    /// The file.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    _packed: Vec<PackedWeight>,
}

/// What `kiln compile` wrote.
#[derive(Clone, Debug)]
pub struct Written {
    /// Bytes of the artifact.
    pub bytes: u64,
    /// Weights stored.
    pub weights: usize,
    /// Packed weights stored.
    pub packed: usize,
    /// Functions (entry points).
    pub functions: Vec<String>,
}

fn family_name(f: Family) -> &'static str {
    f.name()
}

fn family_of(s: &str) -> Option<Family> {
    Family::ALL.into_iter().find(|f| f.name() == s)
}

/// Whether the file at `path` starts with the artifact magic.
pub fn is_artifact(path: &Path) -> bool {
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

fn signature(g: &kiln_ir::Graph) -> String {
    let text = kiln_ir::print_graph(g);
    let first = text.lines().next().unwrap_or_default();
    first.trim_end_matches('{').trim_end().to_string()
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Compiles `model` (already loaded, adapters not yet applied) and writes
/// the artifact to `out`.
pub fn compile(model: &Model, opts: &CompileOptions, out: &Path) -> Result<Written, Error> {
    if model.artifact().is_some() {
        return Err(Error::Input(format!(
            "{} is already a compiled artifact; compile its source instead",
            model.origin()
        )));
    }
    let m = model.with_adapters(&opts.adapters, opts.lora_mode)?;
    let (m, _) = m.apply_passes(&crate::adapter::pipeline(opts.opt, opts.lora_mode)?)?;
    // Models that generate carry their prefill/decode split, so that
    // `generate` from the artifact runs exactly what it runs from the source.
    // The main function stays first (what `run` executes).
    let m = if m.info().is_some_and(|i| i.family.is_generative()) {
        match m.kv_split() {
            Ok(split) => m.with_functions(split.module().funcs.clone(), split.weights().cloned()),
            Err(Error::Pass(kiln_passes::PassError::Failed { .. })) => m,
            Err(e) => return Err(e),
        }
    } else {
        m
    };
    if opts.target == TARGET_CUDA {
        let cuda = cuda_records(&m)?;
        return write(&m, opts, &[], cuda, out);
    }
    let target = Target::Cpu {
        threads: opts.threads,
    };
    // Compile every function so that the backend packs what it will use;
    // the executables hold the packings while they are collected.
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    let names: Vec<String> = m.module().funcs.iter().map(|g| g.name.clone()).collect();
    let split = names.iter().any(|n| n == "decode") && names.iter().any(|n| n == "prefill");
    for name in &names {
        if split && (name == "prefill" || name == "decode") {
            continue;
        }
        held.push(Box::new(m.compile_function(name, target)?));
    }
    if split {
        held.push(Box::new(m.session(target, 1)?));
    }
    let packings = kiln_backends::cpu::packed_weights();
    drop(held);
    write(&m, opts, &packings, Vec::new(), out)
}

/// Every function's CUDA C, with its PTX when NVRTC is installed (a
/// compile error is an error: the artifact would not run).
fn cuda_records(m: &Model) -> Result<Vec<CudaRecord>, Error> {
    use kiln_backends::cuda::{codegen, driver};
    let nvrtc = driver::nvrtc_present();
    m.cuda_modules()?
        .into_iter()
        .map(|(function, module)| {
            let source = codegen::cuda_source(&module);
            let ptx = if nvrtc {
                Some(driver::compile_ptx(&source, PTX_ARCH).map_err(|e| {
                    Error::Run(kiln_backends::RunError::Backend {
                        backend: "cuda".into(),
                        message: format!("@{function}: {e}"),
                    })
                })?)
            } else {
                None
            };
            Ok(CudaRecord {
                function,
                kernels: module.kernels.iter().map(|(k, _)| k.clone()).collect(),
                source,
                ptx,
                arch: PTX_ARCH.to_string(),
            })
        })
        .collect()
}

/// Writes the artifact of an optimized `model` with its `packings`.
fn write(
    model: &Model,
    opts: &CompileOptions,
    packings: &[PackedWeight],
    cuda: Vec<CudaRecord>,
    out: &Path,
) -> Result<Written, Error> {
    let none = kiln_ir::Weights::new();
    let weights = model.weights().unwrap_or(&none);
    // Weights: tensors sharing bytes (tied embeddings) are stored once.
    let mut records = Vec::new();
    let mut placed: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut blobs: Vec<(usize, &[u8])> = Vec::new();
    let mut end = 0usize;
    let mut by_addr: BTreeMap<usize, &str> = BTreeMap::new();
    for (name, t) in weights {
        let b = t.bytes();
        let key = (b.as_ptr() as usize, b.len());
        let offset = *placed.entry(key).or_insert_with(|| {
            let at = align(end, WEIGHT_ALIGN);
            blobs.push((at, b));
            end = at + b.len();
            at
        });
        by_addr.entry(key.0).or_insert(name);
        records.push(WeightRecord {
            name: name.clone(),
            dtype: t.dtype().name().to_string(),
            shape: t.shape().to_vec(),
            offset,
            len: b.len(),
        });
    }
    let weights_len = end;
    let mut packed = Vec::new();
    let mut packed_blobs: Vec<(usize, &[u8])> = Vec::new();
    let mut end = 0usize;
    for p in packings {
        let Some(name) = by_addr.get(&p.weight_addr) else {
            continue;
        };
        let at = align(end, PAGE);
        packed_blobs.push((at, p.bytes()));
        end = at + p.bytes().len();
        packed.push(PackedRecord {
            weight: name.to_string(),
            view_offset: p.offset,
            sk: p.sk,
            sn: p.sn,
            k: p.k,
            n: p.n,
            offset: at,
            len: p.bytes().len(),
        });
    }
    let packed_len = end;
    // The Programs of the IR as the artifact stores it (text annotations
    // then name the stored IR's lines, as loading lowers it).
    let ir_text = model.to_text();
    let programs = programs_of(&Model::from_text(&ir_text, model.origin())?)?;
    let manifest = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        target: opts.target.to_string(),
        packed_layout: (!packed.is_empty()).then(|| PACKED_LAYOUT.to_string()),
        opt_level: match opts.opt {
            crate::OptLevel::O0 => 0,
            crate::OptLevel::O1 => 1,
            crate::OptLevel::O2 => 2,
        },
        adapters: opts
            .adapters
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        lora_mode: match opts.lora_mode {
            crate::adapter::LoraMode::Merged => "merged",
            crate::adapter::LoraMode::Unmerged => "unmerged",
        }
        .to_string(),
        origin: model.origin().to_string(),
        info: model.info().map(|i| InfoRecord {
            family: family_name(i.family).to_string(),
            vocab_size: i.vocab_size,
            max_positions: i.max_positions,
            eos_token_ids: i.eos_token_ids.clone(),
            decoder_start_token_id: i.decoder_start_token_id,
        }),
        entry_points: model
            .module()
            .funcs
            .iter()
            .map(|g| EntryPoint {
                name: g.name.clone(),
                signature: signature(g),
            })
            .collect(),
        programs,
        weights: records,
        packed,
        tokenizer: model.tokenizer().map(|t| {
            let (json, config, chat) = t.files();
            (
                json.to_string(),
                config.map(str::to_string),
                chat.map(str::to_string),
            )
        }),
        embedding: model.embedding_source(),
        cuda,
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Unsupported(format!("cannot write the manifest: {e}")))?;
    let ir = ir_text.into_bytes();

    // Layout.
    let lens = [manifest_bytes.len(), ir.len(), weights_len, packed_len];
    let chunks: Vec<usize> = lens.iter().map(|l| l.div_ceil(CHUNK)).collect();
    let n_crcs: usize = chunks.iter().sum();
    let meta_end = HEADER_LEN + ENTRY_LEN * SECTIONS.len() + 4 * n_crcs;
    let mut offsets = Vec::new();
    let mut at = align(meta_end, PAGE);
    for l in lens {
        offsets.push(at);
        at = align(at + l, PAGE);
    }
    let file_len = offsets[3] + packed_len;

    // Write to a temporary file beside the target, then rename. The
    // sections go first, their chunk checksums taken as they are written;
    // the header and table, which hold the checksums, last, at the start.
    let io = |source: std::io::Error| Error::Write {
        path: out.to_path_buf(),
        source,
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Input(format!("-o {}: not a file name", out.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<(), std::io::Error> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = ChunkWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
        let sections: [&[(usize, &[u8])]; 4] = [
            &[(0, &manifest_bytes[..])],
            &[(0, &ir[..])],
            &blobs,
            &packed_blobs,
        ];
        for (i, pieces) in sections.iter().enumerate() {
            w.pad_to(offsets[i])?;
            w.hashing = true;
            for &(at, bytes) in pieces.iter() {
                w.pad_to(offsets[i] + at)?;
                w.put(bytes)?;
            }
            w.pad_to(offsets[i] + lens[i])?;
            w.end_section();
        }
        let crcs = std::mem::take(&mut w.crcs);
        debug_assert_eq!(crcs.len(), n_crcs);
        let mut meta = Vec::with_capacity(meta_end - HEADER_LEN);
        let mut first = 0u32;
        for (i, name) in SECTIONS.iter().enumerate() {
            let mut e = [0u8; ENTRY_LEN];
            e[..name.len()].copy_from_slice(name.as_bytes());
            e[16..24].copy_from_slice(&(offsets[i] as u64).to_le_bytes());
            e[24..32].copy_from_slice(&(lens[i] as u64).to_le_bytes());
            e[32..36].copy_from_slice(&first.to_le_bytes());
            meta.extend_from_slice(&e);
            first += chunks[i] as u32;
        }
        for c in &crcs {
            meta.extend_from_slice(&c.to_le_bytes());
        }
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(SECTIONS.len() as u32).to_le_bytes());
        header[16..20].copy_from_slice(&(n_crcs as u32).to_le_bytes());
        header[20..24].copy_from_slice(&crc32fast::hash(&meta).to_le_bytes());
        header[24..32].copy_from_slice(&(file_len as u64).to_le_bytes());
        let hc = crc32fast::hash(&header[..36]);
        header[36..40].copy_from_slice(&hc.to_le_bytes());
        let mut f = w.w.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.write_all(&meta)?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result.and_then(|()| std::fs::rename(&tmp, out)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(Written {
        bytes: file_len as u64,
        weights: manifest.weights.len(),
        packed: manifest.packed.len(),
        functions: manifest
            .entry_points
            .iter()
            .map(|e| e.name.clone())
            .collect(),
    })
}

/// Writes a file front to back, taking the CRC-32 of every [`CHUNK`] of
/// each section (while `hashing`) as the bytes go by.
struct ChunkWriter<W: Write> {
    w: W,
    pos: usize,
    hashing: bool,
    hasher: crc32fast::Hasher,
    in_chunk: usize,
    crcs: Vec<u32>,
}

impl<W: Write> ChunkWriter<W> {
    fn new(w: W) -> ChunkWriter<W> {
        ChunkWriter {
            w,
            pos: 0,
            hashing: false,
            hasher: crc32fast::Hasher::new(),
            in_chunk: 0,
            crcs: Vec::new(),
        }
    }

    fn put(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.pos += bytes.len();
        while self.hashing && !bytes.is_empty() {
            let take = (CHUNK - self.in_chunk).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.in_chunk += take;
            bytes = &bytes[take..];
            if self.in_chunk == CHUNK {
                self.close_chunk();
            }
        }
        Ok(())
    }

    /// Zeros up to file offset `at`.
    fn pad_to(&mut self, at: usize) -> std::io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        debug_assert!(at >= self.pos);
        while self.pos < at {
            let n = (at - self.pos).min(ZEROS.len());
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }

    fn close_chunk(&mut self) {
        let h = std::mem::replace(&mut self.hasher, crc32fast::Hasher::new());
        self.crcs.push(h.finalize());
        self.in_chunk = 0;
    }

    /// Closes the section's last (short) chunk, and stops hashing.
    fn end_section(&mut self) {
        if self.in_chunk > 0 {
            self.close_chunk();
        }
        self.hashing = false;
    }
}

/// A read-only map of an artifact, lent to its weights and packed panels.
struct MappedArtifact(memmap2::Mmap);

// SAFETY: the map is read-only and never remapped: `bytes` returns the same
// slice on every call.
unsafe impl ByteSource for MappedArtifact {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One section as the table gives it.
struct Section {
    name: String,
    offset: usize,
    len: usize,
    first_crc: usize,
}

fn bad(path: &Path, what: String) -> Error {
    Error::Artifact {
        path: path.to_path_buf(),
        what,
    }
}

/// Refuses a record whose bytes `offset..+len` lie outside its section.
fn claim(path: &Path, what: &str, offset: usize, len: usize, s: &Section) -> Result<(), Error> {
    if offset.checked_add(len).is_none_or(|e| e > s.len) {
        return Err(bad(
            path,
            format!(
                "{what} claims bytes {offset}..+{len} of the {}-byte {} section",
                s.len, s.name
            ),
        ));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Loads the artifact at `path`: every check of the module docs, then the
/// model with its weights and packed panels mapped in place.
pub fn load(path: &Path) -> Result<Model, Error> {
    let io = |source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let actual = f.metadata().map_err(io)?.len();
    let mut header = [0u8; HEADER_LEN];
    if actual < HEADER_LEN as u64 {
        return Err(bad(
            path,
            format!("truncated: {actual} bytes, the header alone takes {HEADER_LEN}"),
        ));
    }
    f.read_exact(&mut header).map_err(io)?;
    if &header[..8] != MAGIC {
        return Err(bad(
            path,
            "not a kiln artifact (no \"KILNART\" magic at offset 0)".into(),
        ));
    }
    let version = u32_at(&header, 8);
    if version != FORMAT_VERSION {
        return Err(bad(
            path,
            format!(
                "artifact format version {version} (header, offset 8); this kiln ({}) reads version {FORMAT_VERSION}: recompile the model with this kiln",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if crc32fast::hash(&header[..36]) != u32_at(&header, 36) {
        return Err(bad(
            path,
            "the header (offset 0..40) is corrupt: its checksum does not match".into(),
        ));
    }
    let (n_sections, n_crcs) = (u32_at(&header, 12) as usize, u32_at(&header, 16) as usize);
    let file_len = u64_at(&header, 24);
    if actual != file_len {
        return Err(bad(
            path,
            if actual < file_len {
                format!("truncated: {actual} bytes, the header says {file_len} (missing from offset {actual})")
            } else {
                format!("{actual} bytes, the header says {file_len}: bytes appended from offset {file_len}")
            },
        ));
    }
    if n_sections != SECTIONS.len() {
        return Err(bad(
            path,
            format!(
                "the header (offset 12) lists {n_sections} sections; format {FORMAT_VERSION} has {}",
                SECTIONS.len()
            ),
        ));
    }
    let meta_len = ENTRY_LEN * n_sections + 4 * n_crcs;
    if (HEADER_LEN + meta_len) as u64 > file_len {
        return Err(bad(
            path,
            format!("the section table (offset {HEADER_LEN}, {meta_len} bytes) runs past the end of the file"),
        ));
    }
    let mut meta = vec![0u8; meta_len];
    f.read_exact(&mut meta).map_err(io)?;
    if crc32fast::hash(&meta) != u32_at(&header, 20) {
        return Err(bad(
            path,
            format!(
                "the section table (offset {HEADER_LEN}..{}) is corrupt: its checksum does not match",
                HEADER_LEN + meta_len
            ),
        ));
    }
    let mut sections = Vec::new();
    let mut next_crc = 0usize;
    for (i, want) in SECTIONS.iter().enumerate() {
        let e = &meta[i * ENTRY_LEN..(i + 1) * ENTRY_LEN];
        let name = String::from_utf8_lossy(&e[..16])
            .trim_end_matches('\0')
            .to_string();
        let (offset, len, first_crc) = (u64_at(e, 16), u64_at(e, 24), u32_at(e, 32) as usize);
        let at = HEADER_LEN + i * ENTRY_LEN;
        if name != *want {
            return Err(bad(
                path,
                format!("section table entry {i} (offset {at}) names `{name}`; expected `{want}`"),
            ));
        }
        let end = offset.checked_add(len).filter(|&e| e <= file_len);
        if end.is_none() || offset < (HEADER_LEN + meta_len) as u64 {
            return Err(bad(
                path,
                format!("section `{name}` (table offset {at}) claims bytes {offset}..+{len}, outside the file's {file_len} after its table"),
            ));
        }
        let chunks = (len as usize).div_ceil(CHUNK);
        if first_crc != next_crc || first_crc + chunks > n_crcs {
            return Err(bad(
                path,
                format!("section `{name}` (table offset {at}) points at the wrong chunk checksums"),
            ));
        }
        next_crc += chunks;
        sections.push(Section {
            name,
            offset: offset as usize,
            len: len as usize,
            first_crc,
        });
    }
    // Every chunk of every section against its checksum, read with a
    // bounded buffer (a mapped read would count the whole file as resident).
    let crc_base = ENTRY_LEN * n_sections;
    let mut buf = vec![0u8; CHUNK];
    for s in &sections {
        f.seek(SeekFrom::Start(s.offset as u64)).map_err(io)?;
        for c in 0..s.len.div_ceil(CHUNK) {
            let n = CHUNK.min(s.len - c * CHUNK);
            f.read_exact(&mut buf[..n]).map_err(io)?;
            let want = u32_at(&meta, crc_base + 4 * (s.first_crc + c));
            if crc32fast::hash(&buf[..n]) != want {
                let from = s.offset + c * CHUNK;
                return Err(bad(
                    path,
                    format!(
                        "section `{}` is corrupt at file offset {from}..{} (chunk {} of {}): its checksum does not match",
                        s.name,
                        from + n,
                        c + 1,
                        s.len.div_ceil(CHUNK)
                    ),
                ));
            }
        }
    }
    let manifest_s = &sections[0];
    if manifest_s.len as u64 > MANIFEST_LIMIT {
        return Err(bad(
            path,
            format!(
                "the manifest takes {} bytes (limit {MANIFEST_LIMIT})",
                manifest_s.len
            ),
        ));
    }
    // SAFETY: read-only; the file being changed underneath a running
    // process is the documented hazard of every mapped weight file (see
    // kiln_frontends' map_file).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    if map.len() as u64 != file_len {
        return Err(bad(path, "the file changed while it was read".into()));
    }
    let section = |s: &Section| &map[s.offset..s.offset + s.len];
    let manifest: Manifest = serde_json::from_slice(section(manifest_s)).map_err(|e| {
        bad(
            path,
            format!(
                "section `manifest` (offset {}) is not a valid manifest: {e}",
                manifest_s.offset
            ),
        )
    })?;
    let here = env!("CARGO_PKG_VERSION");
    if manifest.kiln_version != here {
        return Err(bad(
            path,
            format!(
                "compiled by kiln {}; this is kiln {here}: recompile the model with this kiln",
                manifest.kiln_version
            ),
        ));
    }
    if manifest.target != TARGET && manifest.target != TARGET_CUDA {
        return Err(bad(
            path,
            format!(
                "compiled for target `{}`; this kiln loads `{TARGET}` and `{TARGET_CUDA}` artifacts",
                manifest.target
            ),
        ));
    }
    if let Some(layout) = &manifest.packed_layout {
        if layout != PACKED_LAYOUT {
            return Err(bad(
                path,
                format!("its packed weights have layout `{layout}`; this kiln's CPU backend reads `{PACKED_LAYOUT}`"),
            ));
        }
    }
    let ir_s = &sections[1];
    let text = std::str::from_utf8(section(ir_s)).map_err(|e| {
        bad(
            path,
            format!("section `ir` (offset {}) is not UTF-8: {e}", ir_s.offset),
        )
    })?;
    let origin = path.display().to_string();
    let module = kiln_ir::parse_module(text).map_err(|source| Error::Parse {
        origin: format!("{origin} (section `ir`)"),
        source,
    })?;
    drop(f);
    let source: Arc<dyn ByteSource> = Arc::new(MappedArtifact(map));
    let (w_s, p_s) = (&sections[2], &sections[3]);
    let mut weights = kiln_ir::Weights::new();
    for r in &manifest.weights {
        let dtype = DType::from_name(&r.dtype).ok_or_else(|| {
            bad(
                path,
                format!("weight `{}` has unknown dtype `{}`", r.name, r.dtype),
            )
        })?;
        let numel = kiln_ir::tensor::checked_numel(&r.shape)
            .filter(|n| n.checked_mul(dtype.size_bytes()) == Some(r.len))
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "weight `{}`: shape {:?} of {dtype} does not take {} bytes",
                        r.name, r.shape, r.len
                    ),
                )
            })?;
        claim(path, &format!("weight `{}`", r.name), r.offset, r.len, w_s)?;
        let data = TensorData::from_source(dtype, source.clone(), w_s.offset + r.offset, numel)
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "weight `{}`: its bytes are not valid {dtype} values",
                        r.name
                    ),
                )
            })?;
        let t = Tensor::new(r.shape.clone(), data)
            .map_err(|e| bad(path, format!("weight `{}`: {e}", r.name)))?;
        weights.insert(r.name.clone(), t);
    }
    let info = match &manifest.info {
        None => None,
        Some(i) => Some(ModelInfo {
            family: family_of(&i.family).ok_or_else(|| {
                bad(
                    path,
                    format!("manifest: unknown model family `{}`", i.family),
                )
            })?,
            vocab_size: i.vocab_size,
            max_positions: i.max_positions,
            eos_token_ids: i.eos_token_ids.clone(),
            decoder_start_token_id: i.decoder_start_token_id,
        }),
    };
    // Packed panels, used in place when this host runs the packed kernels.
    let mut packed = Vec::new();
    if manifest.packed_layout.is_some() && kiln_backends::cpu::packed_available() {
        for r in &manifest.packed {
            let w = weights.get(&r.weight).ok_or_else(|| {
                bad(
                    path,
                    format!("packed weight of `{}`: no such weight", r.weight),
                )
            })?;
            claim(
                path,
                &format!("packed weight of `{}`", r.weight),
                r.offset,
                r.len,
                p_s,
            )?;
            let p = kiln_backends::cpu::adopt_packed(
                w,
                r.view_offset,
                r.sk,
                r.sn,
                r.k,
                r.n,
                source.clone(),
                p_s.offset + r.offset,
                r.len,
            )
            .map_err(|e| bad(path, format!("packed weight of `{}`: {e}", r.weight)))?;
            packed.push(p);
        }
    }
    let tokenizer = match &manifest.tokenizer {
        Some((json, config, chat)) => Some(crate::text::TextTokenizer::from_json(
            json.clone(),
            config.clone(),
            chat.clone(),
            &format!("{origin} (manifest tokenizer)"),
        )?),
        None => None,
    };
    let model = Model::from_artifact(
        module,
        origin,
        weights,
        info,
        Arc::new(Loaded {
            path: path.to_path_buf(),
            manifest,
            _packed: packed,
        }),
        tokenizer,
    );
    // The Programs this kiln lowers must be the ones the artifact records.
    let programs = programs_of(&model)?;
    let recorded = &model.artifact().map(|a| &a.manifest.programs);
    let recorded = recorded.map(|v| v.as_slice()).unwrap_or_default();
    if programs.len() != recorded.len() {
        return Err(bad(
            path,
            format!(
                "records {} lowered programs; its IR has {} functions",
                recorded.len(),
                programs.len()
            ),
        ));
    }
    for (p, r) in programs.iter().zip(recorded) {
        if p != r {
            return Err(bad(
                path,
                format!(
                    "the lowered program of @{} differs from the one it records: recompile the model with this kiln",
                    p.function
                ),
            ));
        }
    }
    // A CUDA artifact's kernels must be what this kiln generates.
    let cuda = model
        .artifact()
        .map(|a| a.manifest.cuda.clone())
        .unwrap_or_default();
    if !cuda.is_empty() {
        let modules = model.cuda_modules()?;
        if modules.len() != cuda.len() {
            return Err(bad(
                path,
                format!(
                    "records the CUDA C of {} functions; its IR has {}",
                    cuda.len(),
                    modules.len()
                ),
            ));
        }
        for ((function, module), r) in modules.iter().zip(&cuda) {
            if *function != r.function
                || kiln_backends::cuda::codegen::cuda_source(module) != r.source
            {
                return Err(bad(
                    path,
                    format!(
                        "the CUDA C of @{function} differs from the one it records: recompile the model with this kiln"
                    ),
                ));
            }
            // Its stored PTX spares NVRTC when the GPU loads the module.
            if let Some(ptx) = &r.ptx {
                kiln_backends::cuda::driver::register_ptx(&r.source, ptx);
            }
        }
    }
    Ok(model)
}

/// Every function of `model` lowered, as the manifest records it.
fn programs_of(model: &Model) -> Result<Vec<ProgramRecord>, Error> {
    Ok(model
        .lower()?
        .iter()
        .map(|p| ProgramRecord {
            function: p.name.clone(),
            text: p.to_text(None),
        })
        .collect())
}

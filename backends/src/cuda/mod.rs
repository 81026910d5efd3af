//! The CUDA backend: every step of the lowered Program becomes a CUDA C
//! kernel ([`codegen`]), compiled at run time by NVRTC and launched through
//! the CUDA driver ([`driver`], via cudarc with dynamic loading: building
//! kiln needs no CUDA install, and a machine without a GPU gets an error
//! that says what is missing).
//!
//! The executor shares the Program machinery of the reference executor
//! (bindings, the arena plan, views verified to stay inside their buffers)
//! and runs it on a [`Device`]: weights uploaded once, intermediates in one
//! device arena placed by the memory plan, inputs uploaded and outputs
//! downloaded per run. The same executor also runs on the emulated device
//! ([`emu`]: the same CUDA C built for the host), which is how CI checks the
//! generated code against the interpreter on machines without a GPU.

pub mod codegen;
pub mod driver;
pub mod emu;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use kiln_ir::{DType, Graph, ShapeCx};

use crate::interp::signature;
use crate::lower::{BufferKind, Kernel, Program};
use crate::reference::{CView, ReferenceExecutable};
use crate::{Backend, Executable, RunError, Tensor, Weights};

use codegen::{Grid, ModuleSource, Operand, Word};

/// What the executor needs of a device: memory, a module of kernels, launches.
pub trait Device {
    /// The device, for messages.
    fn name(&self) -> String;
    /// Compiles and loads `module`'s kernels; returns the module's index.
    fn load(&mut self, module: &ModuleSource) -> Result<usize, String>;
    /// `bytes` zeroed bytes; returns the device address.
    fn alloc(&mut self, bytes: usize) -> Result<u64, String>;
    /// Frees an allocation.
    fn free(&mut self, addr: u64);
    /// Copies host bytes to device address `dst`.
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<(), String>;
    /// Copies device bytes at `src` to the host.
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<(), String>;
    /// Launches kernel `kernel` of loaded module `module`; `args` is the
    /// device address of its `KArgs` words (read when the kernel runs).
    fn launch(
        &mut self,
        module: usize,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: u64,
    ) -> Result<(), String>;
    /// Waits for every launch; a fault in a kernel is reported here.
    fn sync(&mut self) -> Result<(), String>;
    /// Whether the device has a BLAS for [`Device::sgemm`].
    fn has_blas(&mut self) -> bool {
        false
    }
    /// A batched f32 product through the device's BLAS (cuBLAS's
    /// `cublasSgemmStridedBatched`, column-major); `Ok(false)` when the
    /// device has none.
    fn sgemm(&mut self, g: &Sgemm) -> Result<bool, String> {
        let _ = g;
        Ok(false)
    }
    /// Starts recording launches and products into a graph instead of
    /// running them; `Ok(false)` when the device cannot.
    fn begin_capture(&mut self) -> Result<bool, String> {
        Ok(false)
    }
    /// Ends the recording; returns the graph's index.
    fn end_capture(&mut self) -> Result<usize, String> {
        Err("this device records no graphs".into())
    }
    /// Runs a recorded graph: its launches read their words from the
    /// device when they run, so a replay sees the table as it is now.
    fn replay(&mut self, graph: usize) -> Result<(), String> {
        Err(format!("no graph {graph}"))
    }
    /// Frees a recorded graph.
    fn drop_graph(&mut self, graph: usize) {
        let _ = graph;
    }
}

/// One `cublasSgemmStridedBatched` call, column-major: per batch entry `z`,
/// `C = op(A) · op(B)` with `C` m × n (leading dimension `ldc`), `op(A)`
/// m × k, `op(B)` k × n; `alpha = 1`, `beta = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sgemm {
    /// `op(A) = Aᵀ`.
    pub transa: bool,
    /// `op(B) = Bᵀ`.
    pub transb: bool,
    /// Rows of C.
    pub m: i32,
    /// Columns of C.
    pub n: i32,
    /// The inner dimension.
    pub k: i32,
    /// A's device address, leading dimension and batch stride (elements).
    pub a: (u64, i32, i64),
    /// B's.
    pub b: (u64, i32, i64),
    /// C's.
    pub c: (u64, i32, i64),
    /// Batch entries.
    pub batch: i32,
}

/// The one stride that walks the batch axes of a view as one flattened
/// axis, if there is one (size-1 axes are free; a broadcast is stride 0).
fn merged_batch_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let mut expect: Option<usize> = None;
    let mut inner = 0usize;
    for k in (0..shape.len()).rev() {
        if shape[k] == 1 {
            continue;
        }
        match expect {
            None => {
                inner = strides[k];
                expect = Some(strides[k].checked_mul(shape[k])?);
            }
            Some(e) if strides[k] == e => expect = Some(e.checked_mul(shape[k])?),
            Some(_) => return None,
        }
    }
    Some(inner)
}

/// `Xᵀ` as a cuBLAS operand, for `X` row-major `[p, q]` with strides
/// `(sp, sq)`: stored as the column-major `q × p` (X's rows contiguous; no
/// transpose) or as the column-major `p × q` to transpose (X stored
/// transposed). Returns (transpose, leading dimension); `None` when neither
/// axis has a unit stride or the leading dimension is too small.
fn transposed_operand(p: usize, q: usize, sp: usize, sq: usize) -> Option<(bool, usize)> {
    let (trans, ld) = if sq == 1 || q == 1 {
        (false, if p > 1 { sp } else { q.max(1) })
    } else if sp == 1 || p == 1 {
        (true, sq)
    } else {
        return None;
    };
    (ld >= if trans { p.max(1) } else { q.max(1) }).then_some((trans, ld))
}

/// The row-major product `out[b] = a[b] · b[b]` (f32 views) as one column-
/// major strided-batched call: `outᵀ = bᵀ · aᵀ`. `None` when a layout has no
/// unit stride in its matrix axes, a batch that does not flatten, or sizes
/// past i32; the generated kernel runs those.
fn plan_sgemm(a: &CView, b: &CView, out: &CView, addr: impl Fn(&CView) -> u64) -> Option<Sgemm> {
    let r = out.shape.len();
    if r < 2 {
        return None;
    }
    let (m, n, k) = (out.shape[r - 2], out.shape[r - 1], a.shape[r - 1]);
    let (am, ak, bk, bn, om, on) = (
        a.strides[r - 2],
        a.strides[r - 1],
        b.strides[r - 2],
        b.strides[r - 1],
        out.strides[r - 2],
        out.strides[r - 1],
    );
    let batch: usize = out.shape[..r - 2].iter().product();
    let sa = merged_batch_stride(&a.shape[..r - 2], &a.strides[..r - 2])?;
    let sb = merged_batch_stride(&b.shape[..r - 2], &b.strides[..r - 2])?;
    let sc = merged_batch_stride(&out.shape[..r - 2], &out.strides[..r - 2])?;
    // C (cuBLAS's n × ... ) is outᵀ: N rows, leading dimension om.
    if on != 1 && n > 1 {
        return None;
    }
    let ldc = if m > 1 { om } else { n.max(1) };
    if ldc < n.max(1) {
        return None;
    }
    // cuBLAS's A is bᵀ (N × K), its B is aᵀ (K × M).
    let (transa, lda) = transposed_operand(k, n, bk, bn)?;
    let (transb, ldb) = transposed_operand(m, k, am, ak)?;
    let i = |x: usize| i32::try_from(x).ok();
    let l = |x: usize| i64::try_from(x).ok();
    Some(Sgemm {
        transa,
        transb,
        m: i(n)?,
        n: i(m)?,
        k: i(k)?,
        a: (addr(b), i(lda)?, l(sb)?),
        b: (addr(a), i(ldb)?, l(sa)?),
        c: (addr(out), i(ldc)?, l(sc)?),
        batch: i(batch)?,
    })
}

/// The CUDA backend on GPU `device`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cuda {
    /// The GPU's ordinal.
    pub device: i32,
    /// Let cuBLAS use TF32 tensor cores (off: f32 parity with the interpreter).
    pub tf32: bool,
}

/// The CUDA backend on the emulated device (tests; see [`emu`]).
#[derive(Clone, Copy, Debug)]
pub struct CudaEmulated {
    /// Products through the emulated cuBLAS where their layout allows, as
    /// on a GPU with cuBLAS (false: every product on the generated kernel).
    pub blas: bool,
    /// Keys per block above which attention is split over key ranges.
    pub split_keys: usize,
}

impl Default for CudaEmulated {
    fn default() -> Self {
        CudaEmulated {
            blas: true,
            split_keys: SPLIT_KEYS,
        }
    }
}

fn backend_err(message: String) -> RunError {
    RunError::Backend {
        backend: "cuda".into(),
        message,
    }
}

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        let device = driver::CudaDevice::open(self.device)
            .map_err(backend_err)?
            .with_tf32(self.tf32);
        Ok(Box::new(CudaExecutable::new(
            graph,
            weights,
            &Shared::new(Box::new(device)),
        )?))
    }

    fn session(
        &self,
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<Box<dyn crate::Session>, RunError> {
        let device = driver::CudaDevice::open(self.device)
            .map_err(backend_err)?
            .with_tf32(self.tf32);
        let shared = Shared::new(Box::new(device));
        Ok(Box::new(CudaSession::new(
            funcs, weights, capacity, shared,
        )?))
    }
}

impl Backend for CudaEmulated {
    fn name(&self) -> &'static str {
        "cuda-emu"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        let shared = Shared::with_split_keys(
            Box::new(emu::EmuDevice::new().with_blas(self.blas)),
            self.split_keys,
        );
        Ok(Box::new(CudaExecutable::new(graph, weights, &shared)?))
    }

    fn session(
        &self,
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
    ) -> Result<Box<dyn crate::Session>, RunError> {
        let shared = Shared::with_split_keys(
            Box::new(emu::EmuDevice::new().with_blas(self.blas)),
            self.split_keys,
        );
        Ok(Box::new(CudaSession::new(
            funcs, weights, capacity, shared,
        )?))
    }
}

/// A device shared by the entry points of a session, with the weights
/// uploaded to it (once, by name).
pub struct Shared {
    device: Box<dyn Device>,
    weights: HashMap<String, u64>,
    /// Per-run buffers kept for the next run, by size.
    pool: HashMap<usize, Vec<u64>>,
    /// Keys per block above which a one-tile attention is split over
    /// key ranges ([`SPLIT_KEYS`]).
    split_keys: usize,
    /// Products may go through the device's BLAS: false with
    /// `KILN_CUDA_GEMM=kernels` (every product on the generated kernel, for
    /// comparisons), read once when the device is opened.
    blas: bool,
    /// Runs that repeat the previous run's launches replay them as a graph:
    /// false with `KILN_CUDA_GRAPHS=0` (every launch on its own, for
    /// comparisons), read once when the device is opened.
    graphs: bool,
}

/// Keys per block of a decode attention split over the keys: a decode step
/// at B = 1 has only `h` query rows, so a long cache is spread over more
/// blocks than heads.
pub const SPLIT_KEYS: usize = 256;
/// The most key ranges one attention step is split into.
const MAX_SPLITS: usize = 128;

/// Attention steps run split over key ranges (in this process).
static SPLIT_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many attention steps ran split over key ranges in this process.
pub fn split_attention_runs() -> usize {
    SPLIT_RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// Runs recorded as a graph, and runs replayed from one (in this thread).
    static GRAPH_RUNS: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// How many runs this thread recorded as a graph, and how many replayed one.
pub fn graph_runs() -> (usize, usize) {
    GRAPH_RUNS.with(|c| c.get())
}

fn count_graph_run(captured: bool) {
    GRAPH_RUNS.with(|c| {
        let (k, r) = c.get();
        c.set((k + usize::from(captured), r + 1));
    });
}

impl Shared {
    /// `device` splitting attention over key ranges of `keys` (tests use a
    /// few keys, to run the split path on tiny models).
    pub fn with_split_keys(device: Box<dyn Device>, keys: usize) -> SharedDevice {
        let sh = Shared::new(device);
        sh.borrow_mut().split_keys = keys;
        sh
    }

    /// `device`, with no weights yet.
    pub fn new(device: Box<dyn Device>) -> SharedDevice {
        Rc::new(RefCell::new(Shared {
            device,
            weights: HashMap::new(),
            pool: HashMap::new(),
            split_keys: SPLIT_KEYS,
            blas: std::env::var("KILN_CUDA_GEMM").map_or(true, |v| v != "kernels"),
            graphs: std::env::var("KILN_CUDA_GRAPHS").map_or(true, |v| v != "0"),
        }))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for (_, &a) in self.weights.iter() {
            self.device.free(a);
        }
        for (_, kept) in self.pool.iter() {
            for &a in kept {
                self.device.free(a);
            }
        }
    }
}

/// A [`Shared`] device handle.
pub type SharedDevice = Rc<RefCell<Shared>>;

/// Opens GPU `device` and says what it is (`GPU 0 (NVIDIA H200, compute_90)`),
/// or why there is none to use.
pub fn check_available(device: i32) -> Result<String, RunError> {
    let d = driver::CudaDevice::open(device).map_err(backend_err)?;
    Ok(d.name())
}

/// The CUDA C of `graph`'s Program, with the dtypes its weights are stored
/// in (what `kiln compile --target cuda` keeps, and what CI compiles with NVRTC).
pub fn module_source(graph: &Graph, weights: &Weights) -> Result<ModuleSource, RunError> {
    let exe = ReferenceExecutable::new(graph, weights)?;
    let storage = storage_dtypes(exe.program(), exe.weights());
    codegen::generate(exe.program(), &storage).map_err(backend_err)
}

/// The dtype each root buffer holds: parameters as their weights are stored.
fn storage_dtypes(p: &Program, weights: &[Tensor]) -> Vec<DType> {
    let mut out: Vec<DType> = p.buffers.iter().map(|b| b.dtype).collect();
    for (&b, w) in p.params.iter().zip(weights) {
        out[b.index()] = w.dtype();
    }
    out
}

/// A lowered graph compiled for a device, its weights uploaded.
pub struct CudaExecutable {
    inner: ReferenceExecutable,
    module: ModuleSource,
    /// The module's index on the device.
    module_id: usize,
    storage: Vec<DType>,
    shared: SharedDevice,
    /// The device address of each parameter, in `Program::params` order.
    weights: Vec<u64>,
    /// The arena and its size.
    arena: Option<(u64, usize)>,
    /// Two error words kernels write (the failing step + 1, a detail).
    err: u64,
    /// The device table of the launches' words, and its size in bytes.
    words: Option<(u64, usize)>,
    /// The split attention steps' partial results, and its size in bytes.
    scratch: Option<(u64, usize)>,
    /// The recorded graph: the launches it holds, the table they read,
    /// and the device's index of it.
    graph: Option<(Vec<Op>, u64, usize)>,
    /// The previous run's launches and table.
    last: Option<(Vec<Op>, u64)>,
    /// A capture failed on this device: launches run one by one.
    graph_failed: bool,
}

/// One launch or product of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// A kernel of the executable's module; `args` is the index of its
    /// first word in the run's table.
    Launch {
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: usize,
    },
    /// A product through the device's BLAS.
    Sgemm(Sgemm),
}

impl Op {
    /// A grid-stride launch of `kernel` over the elements of `out` (a GEMM's
    /// epilogue after cuBLAS, a split attention's combine).
    fn over_output(kernel: usize, out: &CView, args: usize) -> Op {
        let n: usize = out.shape.iter().product();
        let blocks = n.div_ceil(codegen::BLOCK as usize).clamp(1, 1 << 16);
        Op::Launch {
            kernel,
            grid: [blocks as u32, 1, 1],
            block: [codegen::BLOCK, 1, 1],
            smem: 0,
            args,
        }
    }
}

/// A run's launches, ready to go to a device.
struct Launches<'a> {
    module: usize,
    /// The device address of the word table.
    table: u64,
    ops: &'a [Op],
    /// Each op's node, for messages.
    origins: &'a [&'a str],
}

impl Launches<'_> {
    /// Launches every op in order.
    fn submit(&self, device: &mut dyn Device) -> Result<(), RunError> {
        for (op, origin) in self.ops.iter().zip(self.origins) {
            match op {
                Op::Launch {
                    kernel,
                    grid,
                    block,
                    smem,
                    args,
                } => device.launch(
                    self.module,
                    *kernel,
                    *grid,
                    *block,
                    *smem,
                    self.table + 8 * *args as u64,
                ),
                Op::Sgemm(g) => device.sgemm(g).and_then(|done| {
                    done.then_some(())
                        .ok_or_else(|| "the device has no BLAS".to_string())
                }),
            }
            .map_err(|m| backend_err(format!("{origin}: {m}")))?;
        }
        Ok(())
    }

    /// Records every op as one graph; returns the device's index of it.
    fn capture(&self, device: &mut dyn Device) -> Result<usize, RunError> {
        if !device.begin_capture().map_err(backend_err)? {
            return Err(backend_err("the device records no graphs".into()));
        }
        let submitted = self.submit(device);
        let id = device.end_capture().map_err(backend_err);
        match (submitted, id) {
            (Ok(()), Ok(id)) => Ok(id),
            (Err(e), Ok(id)) => {
                device.drop_graph(id);
                Err(e)
            }
            (_, Err(e)) => Err(e),
        }
    }
}

impl std::fmt::Debug for CudaExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaExecutable({})", self.shared.borrow().device.name())
    }
}

impl Drop for CudaExecutable {
    fn drop(&mut self) {
        let mut sh = self.shared.borrow_mut();
        if let Some((a, _)) = self.arena.take() {
            sh.device.free(a);
        }
        if let Some((_, _, id)) = self.graph.take() {
            sh.device.drop_graph(id);
        }
        for (a, _) in [self.words.take(), self.scratch.take()]
            .into_iter()
            .flatten()
        {
            sh.device.free(a);
        }
        sh.device.free(self.err);
    }
}

/// Per-run allocations (inputs, outputs, small tables), returned to the
/// shared device's pool when the run ends: a decode step reuses the
/// previous step's buffers instead of allocating (`cuMemAlloc` costs more
/// than a small model's step).
struct RunBuffers<'a> {
    device: &'a mut dyn Device,
    pool: &'a mut HashMap<usize, Vec<u64>>,
    addrs: Vec<(u64, usize)>,
}

/// Buffers of one size a pool keeps.
const POOL_PER_SIZE: usize = 8;

impl RunBuffers<'_> {
    /// `bytes` bytes, from the pool when it has a buffer of that size.
    /// Their contents are unspecified: every caller writes them whole
    /// (uploads) or is a Program output, which its steps write whole.
    fn alloc(&mut self, bytes: usize) -> Result<u64, RunError> {
        let a = match self.pool.get_mut(&bytes).and_then(Vec::pop) {
            Some(a) => a,
            None => self.device.alloc(bytes).map_err(backend_err)?,
        };
        self.addrs.push((a, bytes));
        Ok(a)
    }
}

impl Drop for RunBuffers<'_> {
    fn drop(&mut self) {
        // A run that failed part-way may have launches in flight: let them
        // finish before their buffers are reused or freed.
        let _ = self.device.sync();
        // Returned last-first, so the next run's allocations get the same
        // buffers in the same order (its launches then repeat this run's).
        for &(a, n) in self.addrs.iter().rev() {
            let kept = self.pool.entry(n).or_default();
            if kept.len() < POOL_PER_SIZE {
                kept.push(a);
            } else {
                self.device.free(a);
            }
        }
    }
}

/// The launch of a mixture of experts' kernel `g` (its routing, hidden
/// rows or output) over `ins` (`x [tokens…, D]`, the router `[E, D]`, gate
/// `[E, F, D]`, …): grid, block and shared memory; `None` with no tokens.
fn moe_grid(g: &Grid, ins: &[&CView]) -> Option<([u32; 3], [u32; 3], u32)> {
    let x = ins[0];
    let r = x.shape.len();
    let tokens: usize = x.shape[..r - 1].iter().product();
    if tokens == 0 {
        return None;
    }
    let (e, f, d) = (ins[1].shape[0], ins[2].shape[1], x.shape[r - 1]);
    let cap = |n: usize, limit: usize| n.clamp(1, limit) as u32;
    let block = [codegen::MOE_THREADS, 1, 1];
    let red = codegen::MOE_THREADS * 8;
    match g {
        Grid::Moe => Some((
            [cap(tokens, 1 << 16), 1, 1],
            [codegen::BLOCK, 1, 1],
            (e.max(1) * 8) as u32,
        )),
        Grid::MoeHidden { top_k } => Some((
            [cap(f, 1 << 20), cap(*top_k, 65535), cap(tokens, 65535)],
            block,
            red,
        )),
        Grid::MoeDown => Some(([cap(d, 1 << 20), cap(tokens, 65535), 1], block, red)),
        _ => None,
    }
}

/// Bytes of scratch a mixture of experts step needs: per token and chosen
/// expert, its index, its weight and its hidden row (`F` doubles).
fn moe_scratch(step: &crate::lower::Step, ins: &[&CView]) -> Result<usize, RunError> {
    let Kernel::Moe { top_k } = step.kernel else {
        return Ok(0);
    };
    let x = ins[0];
    let r = x.shape.len();
    let tokens: usize = x.shape[..r - 1].iter().product();
    let f = ins[2].shape[1];
    [tokens, top_k, f + 2, 8]
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| backend_err("mixture-of-experts scratch past the address space".into()))
}

/// How attention step `step` is split over key ranges: (ranges, keys per
/// range, f32 of partial results). One range (all keys) unless it is
/// decode-shaped (one query tile) over more than `split_keys` keys — counted
/// by what its cache can hold, not by what it holds now, so every decode
/// step of a session launches the same grid (a range past the keys writes
/// an empty partial result).
fn split_of(
    p: &Program,
    step: &crate::lower::Step,
    ins: &[&CView],
    views: &[CView],
    split_keys: usize,
) -> Result<(usize, usize, usize), RunError> {
    if !matches!(step.kernel, Kernel::Attention { .. }) {
        return Ok((1, 0, 0));
    }
    let (b, h, t, s) = (
        ins[0].shape[0],
        ins[0].shape[1],
        ins[0].shape[2],
        ins[1].shape[2],
    );
    let keys = match p.buffers[ins[1].root].kind {
        BufferKind::State { .. } => key_capacity(ins[1], &views[ins[1].root]),
        _ => s,
    };
    if t > codegen::ATT_TQ || keys <= split_keys || split_keys == 0 {
        return Ok((1, s, 0));
    }
    let splits = keys.div_ceil(split_keys).min(MAX_SPLITS);
    let floats = [b, h, t, splits, ins[2].shape[3] + 2]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or_else(|| backend_err("attention scratch past the address space".into()))?;
    Ok((splits, s.div_ceil(splits).max(1), floats))
}

/// The most keys attention could read through key view `k` (axis 2) of
/// `root`: the length of the root's axis that the key axis walks (a
/// cache's capacity), at least the view's own.
fn key_capacity(k: &CView, root: &CView) -> usize {
    let (s, stride) = (k.shape[2], k.strides[2]);
    root.shape
        .iter()
        .zip(&root.strides)
        .filter(|&(_, &st)| st == stride)
        .map(|(&n, _)| n)
        .max()
        .unwrap_or(s)
        .max(s)
}

/// Bytes of `n` elements of `dtype`, checked.
fn nbytes(n: usize, dtype: DType) -> Result<usize, RunError> {
    n.checked_mul(dtype.size_bytes())
        .ok_or_else(|| backend_err("a buffer larger than the address space".into()))
}

/// Calls `f(element offset, element count)` for each contiguous run of the
/// view (the innermost axes whose strides are row-major merged).
fn runs(
    v: &CView,
    mut f: impl FnMut(usize, usize) -> Result<(), RunError>,
) -> Result<(), RunError> {
    use crate::reference::kernels::{each_index, StepError};
    // How many trailing axes are contiguous.
    let mut inner = 1usize;
    let mut k = v.shape.len();
    while k > 0 && v.strides[k - 1] == inner {
        inner *= v.shape[k - 1];
        k -= 1;
    }
    if inner == 0 {
        return Ok(());
    }
    each_index(&v.shape[..k], |idx| {
        let off = v.offset
            + idx
                .iter()
                .zip(&v.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        f(off, inner).map_err(StepError::Run)
    })
    .map_err(|e| match e {
        StepError::Run(e) => e,
        _ => backend_err("a copy of a view failed".into()),
    })
}

impl CudaExecutable {
    /// Lowers `graph`, generates and loads its kernels on the shared
    /// device, and uploads the weights it does not hold yet.
    pub fn new(
        graph: &Graph,
        weights: &Weights,
        shared: &SharedDevice,
    ) -> Result<CudaExecutable, RunError> {
        let inner = ReferenceExecutable::new(graph, weights)?;
        let storage = storage_dtypes(inner.program(), inner.weights());
        let module = codegen::generate(inner.program(), &storage).map_err(backend_err)?;
        let mut sh = shared.borrow_mut();
        let module_id = sh.device.load(&module).map_err(backend_err)?;
        let p = inner.program();
        let mut addrs = Vec::with_capacity(p.params.len());
        for (&b, w) in p.params.iter().zip(inner.weights()) {
            let name = match &p.buffer(b).kind {
                BufferKind::Param { name } => name.clone(),
                _ => b.to_string(),
            };
            let a = match sh.weights.get(&name) {
                Some(&a) => a,
                None => {
                    let a = sh.device.alloc(w.bytes().len()).map_err(backend_err)?;
                    // Owned by the shared device from here on (freed with it).
                    sh.weights.insert(name, a);
                    sh.device.upload(a, w.bytes()).map_err(backend_err)?;
                    a
                }
            };
            addrs.push(a);
        }
        let err = sh.device.alloc(16).map_err(backend_err)?;
        drop(sh);
        Ok(CudaExecutable {
            inner,
            module,
            module_id,
            storage,
            shared: shared.clone(),
            weights: addrs,
            arena: None,
            err,
            words: None,
            scratch: None,
            graph: None,
            last: None,
            graph_failed: false,
        })
    }

    /// The generated module.
    pub fn module(&self) -> &ModuleSource {
        &self.module
    }

    /// The Program this executable runs.
    pub fn program(&self) -> &Program {
        self.inner.program()
    }

    /// Runs the Program under `cx`: `inputs` per Program input (a tensor,
    /// or `None` for a cache read in place; a cache given as a tensor is
    /// written into its state first), `states` the device address of each
    /// [`Program::states`] buffer (sized by `state_bytes`). Returns each
    /// output's value when `want[i]` (all when `want` is empty).
    fn execute(
        &mut self,
        cx: &ShapeCx,
        inputs: &[Option<&Tensor>],
        states: &[u64],
        want: &[bool],
    ) -> Result<Vec<Option<Tensor>>, RunError> {
        let key = self.inner.prepare_binding(cx)?;
        let CudaExecutable {
            inner,
            module,
            module_id,
            storage,
            shared,
            weights,
            arena,
            err,
            words,
            scratch,
            graph,
            last,
            graph_failed,
        } = self;
        let mut sh = shared.borrow_mut();
        let Shared {
            device,
            pool,
            split_keys,
            blas,
            graphs,
            ..
        } = &mut *sh;
        let p = inner.program();
        let (plan, views) = inner
            .plan_of(&key)
            .ok_or_else(|| backend_err("a binding without a plan".into()))?;
        let need = plan.peak_bytes as usize;
        if arena.is_none_or(|(_, n)| n < need) {
            if let Some((a, _)) = arena.take() {
                device.free(a);
            }
            let a = device.alloc(need).map_err(backend_err)?;
            *arena = Some((a, need));
        }
        let arena_addr = arena.map_or(0, |(a, _)| a);
        let (split_keys, blas, graphs) = (*split_keys, *blas, *graphs);
        // Each relative-position bucket table of this run, by its bias and
        // (T, S): the layers of a stack share one.
        let mut bucket_tables: HashMap<(kiln_ir::RelativeBias, i64, i64), u64> = HashMap::new();
        let err_addr = *err;
        device.upload(err_addr, &[0u8; 16]).map_err(backend_err)?;
        let mut run = RunBuffers {
            device: device.as_mut(),
            pool,
            addrs: Vec::new(),
        };
        // The device address of every root buffer.
        let mut addr = vec![0u64; p.buffers.len()];
        for (i, b) in p.buffers.iter().enumerate() {
            addr[i] = match &b.kind {
                BufferKind::Input { index } => {
                    let t = inputs.get(*index).ok_or_else(|| RunError::InputCount {
                        func: p.name.clone(),
                        expected: p.inputs.len(),
                        got: inputs.len(),
                    })?;
                    match t {
                        Some(t) => {
                            let a = run.alloc(t.bytes().len())?;
                            run.device.upload(a, t.bytes()).map_err(backend_err)?;
                            a
                        }
                        None => 0,
                    }
                }
                BufferKind::Param { .. } => 0,
                BufferKind::Output { .. } => {
                    let n: usize = views[i].shape.iter().product();
                    run.alloc(nbytes(n, b.dtype)?)?
                }
                BufferKind::Temp => match plan.offset_of(p, crate::lower::BufferId(i as u32)) {
                    Some(o) => arena_addr + o,
                    None => 0,
                },
                BufferKind::State { .. } => {
                    let k = p
                        .states
                        .iter()
                        .position(|s| s.root.index() == i)
                        .ok_or_else(|| backend_err("a state that is no cache".into()))?;
                    *states
                        .get(k)
                        .ok_or_else(|| backend_err("a state without memory".into()))?
                }
                BufferKind::View { .. } => 0,
            };
        }
        for (k, &b) in p.params.iter().enumerate() {
            addr[b.index()] = weights[k];
        }
        let elem_addr = |v: &CView, elem: usize| -> u64 {
            addr[v.root] + (elem * storage[v.root].size_bytes()) as u64
        };
        // Cache inputs given as tensors (a view of a state): written in place.
        for (i, t) in inputs.iter().enumerate() {
            let (Some(t), Some(&b)) = (t, p.inputs.get(i)) else {
                continue;
            };
            if !matches!(p.buffer(b).kind, BufferKind::View { .. }) {
                continue;
            }
            let v = &views[b.index()];
            if t.shape() != v.shape.as_slice() {
                return Err(RunError::Invalid {
                    node: format!("input {i}"),
                    message: format!(
                        "shape {:?} does not fit the cache view {:?}",
                        t.shape(),
                        v.shape
                    ),
                });
            }
            let size = storage[v.root].size_bytes();
            let bytes = t.bytes();
            let mut at = 0usize;
            runs(v, |off, n| {
                let len = n * size;
                run.device
                    .upload(elem_addr(v, off), &bytes[at..at + len])
                    .map_err(backend_err)?;
                at += len;
                Ok(())
            })?;
        }
        // One scratch for the partial results of every split attention step
        // and the routing and hidden rows of every mixture of experts (they
        // run in order on one stream), kept between runs.
        let mut need = 0usize;
        for step in &p.steps {
            let ins: Vec<&CView> = step.inputs.iter().map(|b| &views[b.index()]).collect();
            let floats = split_of(p, step, &ins, views, split_keys)?.2;
            need = need
                .max(nbytes(floats, DType::F32)?)
                .max(moe_scratch(step, &ins)?);
        }
        if need > 0 && scratch.is_none_or(|(_, n)| n < need) {
            if let Some((a, _)) = scratch.take() {
                run.device.free(a);
            }
            *scratch = Some((run.device.alloc(need).map_err(backend_err)?, need));
        }
        let scratch_addr = scratch.map_or(0, |(a, _)| a);
        // The steps, planned as the run's launches and products with their
        // words in one table; nothing runs before the table is on the device.
        let any_gemm = p
            .steps
            .iter()
            .any(|s| matches!(s.kernel, Kernel::Gemm { .. }));
        let use_blas = blas && any_gemm && run.device.has_blas();
        let mut table: Vec<i64> = Vec::new();
        let mut ops: Vec<(Op, usize)> = Vec::new();
        for (si, (step, sk)) in p.steps.iter().zip(&module.steps).enumerate() {
            let ins: Vec<&CView> = step.inputs.iter().map(|b| &views[b.index()]).collect();
            let out = &views[step.output.index()];
            let view = |o: Operand| -> &CView {
                match o {
                    Operand::Out => out,
                    Operand::In(i) => ins[i],
                }
            };
            let mut buckets = 0u64;
            if let Kernel::Attention {
                relative: Some(rel),
                ..
            } = &step.kernel
            {
                let (t, s) = (ins[0].shape[2] as i64, ins[1].shape[2] as i64);
                buckets = match bucket_tables.get(&(*rel, t, s)) {
                    Some(&a) => a,
                    None => {
                        let table: Vec<u8> = (-(s - 1)..t.max(1))
                            .flat_map(|d| (rel.bucket(d) as i32).to_le_bytes())
                            .collect();
                        let a = run.alloc(table.len())?;
                        run.device.upload(a, &table).map_err(backend_err)?;
                        bucket_tables.insert((*rel, t, s), a);
                        a
                    }
                };
            }
            // Decode-shaped attention (one query tile) over many keys is
            // split over key ranges, each a block, then combined through
            // the executable's scratch.
            let (splits, chunk, _) = split_of(p, step, &ins, views, split_keys)?;
            let scratch = scratch_addr;
            // A word list goes into the run's table; a launch names its entry.
            let mut eval = |ws: &[Word]| -> Result<usize, RunError> {
                let at = table.len();
                for w in ws {
                    table.push(match w {
                        Word::Ptr(o) => {
                            let v = view(*o);
                            elem_addr(v, v.offset) as i64
                        }
                        Word::Size(o, k) => view(*o).shape[*k] as i64,
                        Word::Stride(o, k) => view(*o).strides[*k] as i64,
                        Word::Count(o, a, b) => {
                            view(*o).shape[*a..*b].iter().product::<usize>() as i64
                        }
                        Word::Int(i) => *i,
                        Word::F64(x) => x.to_bits() as i64,
                        Word::Dim(d) => crate::eval_int_in(cx, d, &step.origin)?,
                        Word::Err => err_addr as i64,
                        Word::Step => si as i64,
                        Word::Buckets => buckets as i64,
                        Word::Splits => splits as i64,
                        Word::Chunk => chunk as i64,
                        Word::Scratch => scratch as i64,
                    });
                }
                if ws.is_empty() {
                    table.push(0);
                }
                Ok(at)
            };
            // A product the device's BLAS can take, when it has one; then
            // the epilogue in place.
            if let Kernel::Gemm { .. } = &step.kernel {
                let all_f32 = [ins[0].root, ins[1].root, out.root]
                    .iter()
                    .all(|&r| storage[r] == DType::F32);
                let plan = if all_f32 && use_blas {
                    plan_sgemm(ins[0], ins[1], out, |v| elem_addr(v, v.offset))
                } else {
                    None
                };
                let r = out.shape.len();
                let empty = out.shape.contains(&0) || ins[0].shape[r - 1] == 0;
                if let (Some(g), false) = (plan, empty) {
                    ops.push((Op::Sgemm(g), si));
                    if let Some((k, ws)) = &sk.epilogue {
                        let args = eval(ws)?;
                        ops.push((Op::over_output(*k, out, args), si));
                    }
                    continue;
                }
            }
            let cap = |n: usize, limit: usize| n.clamp(1, limit) as u32;
            let (grid, block, smem) = match &sk.grid {
                Grid::Elements(o, r) => {
                    let n: usize = view(*o).shape[..*r].iter().product();
                    if n == 0 {
                        continue;
                    }
                    let b = codegen::BLOCK as usize;
                    (
                        [cap(n.div_ceil(b), 1 << 16), 1, 1],
                        [codegen::BLOCK, 1, 1],
                        0,
                    )
                }
                Grid::Rows(o, a, b) => {
                    let v = view(*o);
                    let rows: usize = v.shape[*a..*b].iter().product();
                    if rows == 0 {
                        continue;
                    }
                    ([cap(rows, 1 << 16), 1, 1], [codegen::BLOCK, 1, 1], 0)
                }
                Grid::Gemm => {
                    let r = out.shape.len();
                    let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
                    let batch: usize = out.shape[..r - 2].iter().product();
                    if m == 0 || n == 0 || batch == 0 {
                        continue;
                    }
                    let t = codegen::GEMM_TILE;
                    (
                        [
                            cap(n.div_ceil(t), 1 << 30),
                            cap(m.div_ceil(t), 65535),
                            cap(batch, 65535),
                        ],
                        [16, 16, 1],
                        0,
                    )
                }
                Grid::Attention => {
                    let q = ins[0];
                    let (b, h, t, dh) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
                    let (hk, dv) = (ins[1].shape[1], ins[2].shape[3]);
                    if b == 0 || h == 0 || t == 0 {
                        continue;
                    }
                    if hk == 0 || h % hk != 0 {
                        return Err(RunError::Invalid {
                            node: step.origin.clone(),
                            message: format!("{h} query heads do not group over {hk} kv heads"),
                        });
                    }
                    if b > 65535 || h > 65535 {
                        return Err(backend_err(format!(
                            "{}: {b} × {h} attention blocks exceed the grid",
                            step.origin
                        )));
                    }
                    let (tq, tk) = (codegen::ATT_TQ, codegen::ATT_TK);
                    let floats = tq * dh + tk * dh + tk * dv + tq * dv + tq * tk + 3 * tq;
                    (
                        [cap(t.div_ceil(tq) * splits, 1 << 30), h as u32, b as u32],
                        [codegen::ATT_THREADS, 1, 1],
                        (floats * 4) as u32,
                    )
                }
                Grid::Moe | Grid::MoeHidden { .. } | Grid::MoeDown => {
                    match moe_grid(&sk.grid, &ins) {
                        Some(g) => g,
                        None => continue,
                    }
                }
            };
            let args = eval(&sk.words)?;
            ops.push((
                Op::Launch {
                    kernel: sk.kernel,
                    grid,
                    block,
                    smem,
                    args,
                },
                si,
            ));
            for (k, ws, g) in &sk.then {
                let (grid, block, smem) = moe_grid(g, &ins).ok_or_else(|| {
                    backend_err(format!("{}: a kernel without a grid", step.origin))
                })?;
                let args = eval(ws)?;
                ops.push((
                    Op::Launch {
                        kernel: *k,
                        grid,
                        block,
                        smem,
                        args,
                    },
                    si,
                ));
            }
            if let (Kernel::Attention { .. }, Some((k, ws)), true) =
                (&step.kernel, &sk.epilogue, splits > 1)
            {
                SPLIT_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let args = eval(ws)?;
                ops.push((Op::over_output(*k, out, args), si));
            }
        }
        // The table, then the launches.
        let bytes: Vec<u8> = table.iter().flat_map(|w| w.to_le_bytes()).collect();
        if words.is_none_or(|(_, n)| n < bytes.len()) {
            // A graph recorded against the old table is of no more use.
            if let Some((_, _, id)) = graph.take() {
                run.device.drop_graph(id);
            }
            if let Some((a, _)) = words.take() {
                run.device.free(a);
            }
            let n = bytes.len().next_power_of_two();
            *words = Some((run.device.alloc(n).map_err(backend_err)?, n));
        }
        let table_addr = words.map_or(0, |(a, _)| a);
        run.device.upload(table_addr, &bytes).map_err(backend_err)?;
        let (ops, origins): (Vec<Op>, Vec<usize>) = ops.into_iter().unzip();
        let origins: Vec<&str> = origins
            .iter()
            .map(|&i| p.steps[i].origin.as_str())
            .collect();
        let launches = Launches {
            module: *module_id,
            table: table_addr,
            ops: &ops,
            origins: &origins,
        };
        // A run whose launches are those of the recorded graph (a decode
        // step: only the words moved) replays it; a run that repeats the
        // previous run's launches records them first.
        let same = |o: &Vec<Op>, a: u64| a == table_addr && *o == ops;
        let mut done = false;
        if graphs && !*graph_failed {
            if let Some((o, a, id)) = graph.as_ref() {
                if same(o, *a) {
                    run.device.replay(*id).map_err(backend_err)?;
                    count_graph_run(false);
                    done = true;
                }
            }
            if !done && last.as_ref().is_some_and(|(o, a)| same(o, *a)) {
                if let Some((_, _, id)) = graph.take() {
                    run.device.drop_graph(id);
                }
                match launches.capture(run.device) {
                    Ok(id) => {
                        *graph = Some((ops.clone(), table_addr, id));
                        run.device.replay(id).map_err(backend_err)?;
                        count_graph_run(true);
                        done = true;
                    }
                    // The launches run one by one instead (which reports a
                    // launch that failed the capture); no more captures.
                    Err(_) => *graph_failed = true,
                }
            }
        }
        if !done {
            launches.submit(run.device)?;
        }
        *last = Some((ops, table_addr));
        run.device
            .sync()
            .map_err(|m| backend_err(format!("@{}: {m}", p.name)))?;
        // A step that failed recorded itself in the error words.
        let mut e = [0u8; 16];
        run.device.download(err_addr, &mut e).map_err(backend_err)?;
        let failed = i64::from_le_bytes(e[..8].try_into().unwrap_or_default());
        let detail = i64::from_le_bytes(e[8..].try_into().unwrap_or_default());
        if failed > 0 {
            let si = (failed - 1) as usize;
            let step = p
                .steps
                .get(si)
                .ok_or_else(|| backend_err("a failing step out of range".into()))?;
            return Err(match &step.kernel {
                Kernel::Gather => RunError::GatherIndex {
                    node: step.origin.clone(),
                    id: detail,
                    rows: views[step.inputs[0].index()]
                        .shape
                        .first()
                        .copied()
                        .unwrap_or(0),
                },
                Kernel::Row(_) => RunError::Invalid {
                    node: step.origin.clone(),
                    message: "reduce_max over an empty axis".into(),
                },
                _ => RunError::DivisionByZero {
                    node: step.origin.clone(),
                },
            });
        }
        let mut result = Vec::with_capacity(p.outputs.len());
        for (k, (_, b)) in p.outputs.iter().enumerate() {
            if !want.get(k).copied().unwrap_or(true) {
                result.push(None);
                continue;
            }
            let v = &views[b.index()];
            let dtype = p.buffer(*b).dtype;
            let size = storage[v.root].size_bytes();
            let n: usize = v.shape.iter().product();
            let mut bytes = vec![0u8; nbytes(n, storage[v.root])?];
            let mut at = 0usize;
            runs(v, |off, n| {
                let len = n * size;
                run.device
                    .download(elem_addr(v, off), &mut bytes[at..at + len])
                    .map_err(backend_err)?;
                at += len;
                Ok(())
            })?;
            let t = crate::reference::kernels::tensor_from_le_bytes(v.shape.clone(), dtype, &bytes)
                .map_err(backend_err)?;
            result.push(Some(t));
        }
        Ok(result)
    }
}

impl Executable for CudaExecutable {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let cx = signature::bind_inputs(self.inner.graph(), inputs)?;
        // Without a session, the caches are sized for this call's outputs.
        let cx = self.inner.program().bind_capacity(&cx, None)?;
        let sizes = self.inner.state_bytes(&cx)?;
        let states = DeviceStates::alloc(&self.shared, &sizes)?;
        let tensors: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        let out = self.execute(&cx, &tensors, &states.addrs, &[]);
        Ok(out?.into_iter().flatten().collect())
    }
}

/// Cache buffers on a device, freed with this value.
struct DeviceStates {
    shared: SharedDevice,
    addrs: Vec<u64>,
}

impl DeviceStates {
    fn alloc(shared: &SharedDevice, sizes: &[usize]) -> Result<DeviceStates, RunError> {
        let mut out = DeviceStates {
            shared: shared.clone(),
            addrs: Vec::new(),
        };
        for &n in sizes {
            let a = shared.borrow_mut().device.alloc(n).map_err(backend_err)?;
            out.addrs.push(a);
        }
        Ok(out)
    }
}

impl Drop for DeviceStates {
    fn drop(&mut self) {
        let mut sh = self.shared.borrow_mut();
        let _ = sh.device.sync();
        for &a in &self.addrs {
            sh.device.free(a);
        }
    }
}

/// A session whose caches live on the device between calls: one buffer per
/// cache, of the session's capacity, written by each call only where it
/// grows (a decode step uploads its new tokens and downloads its logits,
/// nothing else).
pub struct CudaSession {
    shared: SharedDevice,
    entries: Vec<(Graph, CudaExecutable)>,
    carried_names: BTreeSet<String>,
    carried: BTreeMap<String, Tensor>,
    /// Each cache's device buffer (address, bytes) by name.
    states: BTreeMap<String, (u64, usize)>,
    /// Each cache's shape as the last call left it.
    shapes: BTreeMap<String, Vec<usize>>,
    len: usize,
    capacity: usize,
}

impl CudaSession {
    /// Compiles every entry point on the shared device; caches get
    /// `capacity` positions.
    pub fn new(
        funcs: &[Graph],
        weights: &Weights,
        capacity: usize,
        shared: SharedDevice,
    ) -> Result<CudaSession, RunError> {
        let entries = funcs
            .iter()
            .map(|g| Ok((g.clone(), CudaExecutable::new(g, weights, &shared)?)))
            .collect::<Result<Vec<_>, RunError>>()?;
        Ok(CudaSession {
            carried_names: crate::session::carried_names(&funcs.iter().collect::<Vec<_>>()),
            shared,
            entries,
            carried: BTreeMap::new(),
            states: BTreeMap::new(),
            shapes: BTreeMap::new(),
            len: 0,
            capacity,
        })
    }
}

impl Drop for CudaSession {
    fn drop(&mut self) {
        let mut sh = self.shared.borrow_mut();
        for (_, &(a, _)) in self.states.iter() {
            sh.device.free(a);
        }
    }
}

impl crate::Session for CudaSession {
    fn call(&mut self, entry: &str, data: &[Tensor]) -> Result<Vec<(String, Tensor)>, RunError> {
        let capacity = self.capacity;
        let (g, exe) = crate::session::find_entry(&mut self.entries, entry)?;
        crate::session::check_data_count(g, data)?;
        let (tensors, cx) = crate::session::bind_call(g, entry, data, &self.carried, &self.shapes)?;
        let cx = exe.inner.program().bind_capacity(&cx, Some(capacity))?;
        let sizes = exe.inner.state_bytes(&cx)?;
        let mut addrs = Vec::with_capacity(sizes.len());
        for (st, &size) in exe.inner.program().states.iter().zip(&sizes) {
            let kept = self.states.get(&st.name).copied();
            let a = match (st.input, kept) {
                (_, Some((a, n))) if n == size => a,
                (Some(_), _) => {
                    return Err(RunError::Session(format!(
                        "@{entry} reads the cache {} with another batch or layout than the call that wrote it; start a new session",
                        st.name
                    )))
                }
                // A call that writes the cache from position 0 starts a new sequence.
                (None, old) => {
                    let mut sh = self.shared.borrow_mut();
                    if let Some((a, _)) = old {
                        sh.device.free(a);
                        self.states.remove(&st.name);
                    }
                    let a = sh.device.alloc(size).map_err(backend_err)?;
                    self.states.insert(st.name.clone(), (a, size));
                    a
                }
            };
            addrs.push(a);
        }
        let want: Vec<bool> = g
            .outputs()
            .iter()
            .map(|(n, _)| g.cache_axis(n).is_none())
            .collect();
        let result = exe.execute(&cx, &tensors, &addrs, &want);
        // A failed call that writes a cache from position 0 (a prefill) may
        // have overwritten it: that cache is then gone, and a decode says so.
        if result.is_err() {
            for st in &exe.inner.program().states {
                if st.input.is_none() {
                    self.shapes.remove(&st.name);
                }
            }
        }
        let outputs = result?;
        crate::session::finish_call(
            exe.inner.program(),
            &cx,
            g,
            outputs,
            &self.carried_names,
            &mut self.carried,
            &mut self.shapes,
            &mut self.len,
        )
    }

    fn cache_len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

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
    /// Compiles and loads `module`'s kernels (replacing any loaded before).
    fn load(&mut self, module: &ModuleSource) -> Result<(), String>;
    /// `bytes` zeroed bytes; returns the device address.
    fn alloc(&mut self, bytes: usize) -> Result<u64, String>;
    /// Frees an allocation.
    fn free(&mut self, addr: u64);
    /// Copies host bytes to device address `dst`.
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<(), String>;
    /// Copies device bytes at `src` to the host.
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<(), String>;
    /// Launches kernel `kernel` of the loaded module.
    fn launch(
        &mut self,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        words: &[i64],
    ) -> Result<(), String>;
    /// Waits for every launch; a fault in a kernel is reported here.
    fn sync(&mut self) -> Result<(), String>;
}

/// The CUDA backend on GPU `device`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cuda {
    /// The GPU's ordinal.
    pub device: i32,
}

/// The CUDA backend on the emulated device (tests; see [`emu`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct CudaEmulated;

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
        let device = driver::CudaDevice::open(self.device).map_err(backend_err)?;
        Ok(Box::new(CudaExecutable::new(
            graph,
            weights,
            Box::new(device),
        )?))
    }
}

impl Backend for CudaEmulated {
    fn name(&self) -> &'static str {
        "cuda-emu"
    }

    fn compile(&self, graph: &Graph, weights: &Weights) -> Result<Box<dyn Executable>, RunError> {
        Ok(Box::new(CudaExecutable::new(
            graph,
            weights,
            Box::new(emu::EmuDevice::new()),
        )?))
    }
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
    storage: Vec<DType>,
    device: Box<dyn Device>,
    /// The device address of each parameter, in `Program::params` order.
    weights: Vec<u64>,
    /// The arena and its size.
    arena: Option<(u64, usize)>,
    /// Two error words kernels write (the failing step + 1, a detail).
    err: u64,
}

impl std::fmt::Debug for CudaExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaExecutable({})", self.device.name())
    }
}

impl Drop for CudaExecutable {
    fn drop(&mut self) {
        for &w in &self.weights {
            self.device.free(w);
        }
        if let Some((a, _)) = self.arena.take() {
            self.device.free(a);
        }
        self.device.free(self.err);
    }
}

/// Per-run allocations, freed when the run ends.
struct RunBuffers<'a> {
    device: &'a mut dyn Device,
    addrs: Vec<u64>,
}

impl RunBuffers<'_> {
    fn alloc(&mut self, bytes: usize) -> Result<u64, RunError> {
        let a = self.device.alloc(bytes).map_err(backend_err)?;
        self.addrs.push(a);
        Ok(a)
    }
}

impl Drop for RunBuffers<'_> {
    fn drop(&mut self) {
        for &a in &self.addrs {
            self.device.free(a);
        }
    }
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
    let r = v.shape.len();
    if v.shape.contains(&0) {
        return Ok(());
    }
    // How many trailing axes are contiguous.
    let mut inner = 1usize;
    let mut k = r;
    while k > 0 && v.strides[k - 1] == inner {
        inner *= v.shape[k - 1];
        k -= 1;
    }
    let outer = &v.shape[..k];
    let mut idx = vec![0usize; k];
    loop {
        let off = v.offset
            + idx
                .iter()
                .zip(&v.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        f(off, inner)?;
        let mut a = k;
        loop {
            if a == 0 {
                return Ok(());
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < outer[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

/// A host tensor from the contiguous bytes of `dtype` elements.
fn tensor_from(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> Result<Tensor, RunError> {
    let t = match dtype {
        DType::F32 => Tensor::f32(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::I32 => Tensor::i32(
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::I64 => Tensor::i64(
            shape,
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DType::Bool => Tensor::bool(shape, bytes.iter().map(|&b| b != 0).collect()),
        DType::F16 | DType::BF16 => {
            return Err(backend_err(format!(
                "a {dtype} output cannot be returned as a host tensor"
            )))
        }
    };
    Ok(t?)
}

impl CudaExecutable {
    /// Lowers `graph`, generates and loads its kernels on `device`, and
    /// uploads the weights.
    pub fn new(
        graph: &Graph,
        weights: &Weights,
        mut device: Box<dyn Device>,
    ) -> Result<CudaExecutable, RunError> {
        let inner = ReferenceExecutable::new(graph, weights)?;
        let storage = storage_dtypes(inner.program(), inner.weights());
        let module = codegen::generate(inner.program(), &storage).map_err(backend_err)?;
        device.load(&module).map_err(backend_err)?;
        let mut addrs = Vec::new();
        let upload = |device: &mut Box<dyn Device>, addrs: &mut Vec<u64>| -> Result<(), String> {
            for w in inner.weights() {
                let a = device.alloc(w.bytes().len())?;
                addrs.push(a);
                device.upload(a, w.bytes())?;
            }
            Ok(())
        };
        let uploaded = upload(&mut device, &mut addrs);
        let err = device.alloc(16);
        let (err, ()) = match (err, uploaded) {
            (Ok(e), Ok(())) => (e, ()),
            (e, u) => {
                for a in addrs {
                    device.free(a);
                }
                if let Ok(e) = e {
                    device.free(e);
                }
                return Err(backend_err(
                    u.err()
                        .unwrap_or_else(|| "cannot allocate the error words".into()),
                ));
            }
        };
        Ok(CudaExecutable {
            inner,
            module,
            storage,
            device,
            weights: addrs,
            arena: None,
            err,
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

    /// Runs the Program under `cx` on host `inputs` (in signature order; a
    /// cache input given as a tensor is written into its state first).
    fn execute(&mut self, cx: &ShapeCx, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let key = self.inner.prepare_binding(cx)?;
        let state_bytes = self.inner.state_bytes(cx)?;
        let CudaExecutable {
            inner,
            module,
            storage,
            device,
            weights,
            arena,
            err,
        } = self;
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
        let err_addr = *err;
        device.upload(err_addr, &[0u8; 16]).map_err(backend_err)?;
        let mut run = RunBuffers {
            device: device.as_mut(),
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
                    let a = run.alloc(t.bytes().len())?;
                    run.device.upload(a, t.bytes()).map_err(backend_err)?;
                    a
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
                    run.alloc(state_bytes[k])?
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
            let Some(&b) = p.inputs.get(i) else { continue };
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
        // The steps.
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
                let table: Vec<u8> = (-(s - 1)..t.max(1))
                    .flat_map(|d| (rel.bucket(d) as i32).to_le_bytes())
                    .collect();
                buckets = run.alloc(table.len())?;
                run.device.upload(buckets, &table).map_err(backend_err)?;
            }
            let mut words = Vec::with_capacity(sk.words.len().max(1));
            for w in &sk.words {
                words.push(match w {
                    Word::Ptr(o) => {
                        let v = view(*o);
                        elem_addr(v, v.offset) as i64
                    }
                    Word::Size(o, k) => view(*o).shape[*k] as i64,
                    Word::Stride(o, k) => view(*o).strides[*k] as i64,
                    Word::Count(o, a, b) => view(*o).shape[*a..*b].iter().product::<usize>() as i64,
                    Word::Int(i) => *i,
                    Word::F64(x) => x.to_bits() as i64,
                    Word::Dim(d) => crate::eval_int_in(cx, d, &step.origin)?,
                    Word::Err => err_addr as i64,
                    Word::Step => si as i64,
                    Word::Buckets => buckets as i64,
                });
            }
            if words.is_empty() {
                words.push(0);
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
                        [cap(t.div_ceil(tq), 1 << 30), h as u32, b as u32],
                        [codegen::ATT_THREADS, 1, 1],
                        (floats * 4) as u32,
                    )
                }
                Grid::Moe { top_k } => {
                    let x = ins[0];
                    let r = x.shape.len();
                    let tokens: usize = x.shape[..r - 1].iter().product();
                    if tokens == 0 {
                        continue;
                    }
                    let (e, f, d) = (ins[1].shape[0], ins[2].shape[1], x.shape[r - 1]);
                    let doubles = e + f + d + 2 * top_k + 1;
                    (
                        [cap(tokens, 1 << 16), 1, 1],
                        [codegen::BLOCK, 1, 1],
                        (doubles * 8) as u32,
                    )
                }
            };
            run.device
                .launch(sk.kernel, grid, block, smem, &words)
                .map_err(|m| backend_err(format!("{}: {m}", step.origin)))?;
        }
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
        for (_, b) in &p.outputs {
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
            result.push(tensor_from(v.shape.clone(), dtype, &bytes)?);
        }
        Ok(result)
    }
}

impl Executable for CudaExecutable {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let cx = signature::bind_inputs(self.inner.graph(), inputs)?;
        let cx = self.inner.program().bind_capacity(&cx, None)?;
        self.execute(&cx, inputs)
    }
}

//! The emulated device: the generated CUDA C built for the host with a C++
//! compiler and run block by block, each block's `blockDim` threads as
//! fibers that meet at `__syncthreads`, device memory in host allocations. It runs the very source NVRTC compiles for a GPU, through
//! the very executor, so every kernel and every launch is checked against
//! the interpreter on machines without a GPU. It is a test device: slow,
//! and never chosen by `--backend cuda`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use super::codegen::{emulator_source, ModuleSource};
use super::Device;

/// Serialises launches (see [`EmuDevice::launch`]).
static LAUNCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

type LaunchFn = unsafe extern "C" fn(*const u32, u32, *const i64);

/// A host "device".
pub struct EmuDevice {
    /// Allocations by address (8-byte aligned words).
    allocs: BTreeMap<u64, Vec<u64>>,
    /// Byte length of each allocation.
    lens: BTreeMap<u64, usize>,
    /// The loaded modules: each library with its launchers.
    modules: Vec<(libloading::Library, Vec<LaunchFn>)>,
    /// Whether it offers the emulated cuBLAS.
    blas: bool,
    /// The word count of each kernel of each module.
    words: Vec<Vec<usize>>,
    /// The recording in progress, if any.
    capturing: Option<Vec<EmuOp>>,
    /// Recorded graphs (`None` once dropped).
    graphs: Vec<Option<Vec<EmuOp>>>,
}

/// A launch or product recorded in a graph.
#[derive(Clone, Debug)]
enum EmuOp {
    Launch {
        module: usize,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: u64,
    },
    Sgemm(super::Sgemm),
}

/// Products the emulated cuBLAS ran (in this process).
static SGEMM_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many products the emulated cuBLAS ran in this process.
pub fn sgemm_calls() -> usize {
    SGEMM_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

impl EmuDevice {
    /// A device with nothing loaded.
    pub fn new() -> EmuDevice {
        EmuDevice {
            allocs: BTreeMap::new(),
            lens: BTreeMap::new(),
            modules: Vec::new(),
            blas: true,
            words: Vec::new(),
            capturing: None,
            graphs: Vec::new(),
        }
    }

    /// With or without the emulated cuBLAS.
    pub fn with_blas(mut self, blas: bool) -> EmuDevice {
        self.blas = blas;
        self
    }

    /// An error for `what` while a graph is being recorded: as on a GPU,
    /// where a stream being captured takes launches only, a device call in
    /// the middle of a capture is a bug in the executor.
    fn not_capturing(&self, what: &str) -> Result<(), String> {
        match self.capturing {
            Some(_) => Err(format!("{what} during a graph capture")),
            None => Ok(()),
        }
    }

    /// The allocation holding `[addr, addr + len)`, as (base, offset).
    fn find(&self, addr: u64, len: usize) -> Result<(u64, usize), String> {
        let (&base, &size) = self
            .lens
            .range(..=addr)
            .next_back()
            .ok_or_else(|| format!("address {addr:#x} is in no allocation"))?;
        let off = (addr - base) as usize;
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(format!(
                "{len} bytes at {addr:#x} leave the allocation of {size} bytes at {base:#x}"
            ));
        }
        Ok((base, off))
    }
}

impl Default for EmuDevice {
    fn default() -> Self {
        EmuDevice::new()
    }
}

/// Builds `source` into a shared library (cached by its hash in the temp
/// folder), returning its path.
fn build(source: &str) -> Result<PathBuf, String> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    let dir = std::env::temp_dir().join("kiln-cuda-emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lib = dir.join(format!("m{:016x}.so", h.finish()));
    if lib.exists() {
        return Ok(lib);
    }
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id())
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
    let src = dir.join(format!("m{:016x}-{tag}.cpp", h.finish()));
    let tmp = dir.join(format!("m{:016x}-{tag}.so", h.finish()));
    std::fs::write(&src, source).map_err(|e| format!("{}: {e}", src.display()))?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run the host C++ compiler `{cxx}`: {e}"))?;
    let _ = std::fs::remove_file(&src);
    if !out.status.success() {
        return Err(format!(
            "the host C++ compiler rejected the generated CUDA C:\n{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    std::fs::rename(&tmp, &lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    Ok(lib)
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        "the CUDA emulator (host threads)".into()
    }

    fn load(&mut self, module: &ModuleSource) -> Result<usize, String> {
        let path = build(&emulator_source(module))?;
        // SAFETY: the library is kiln's own generated code; its initialisers
        // only set up static storage.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut launchers = Vec::with_capacity(module.kernels.len());
        for (name, _) in &module.kernels {
            let sym = format!("{name}_launch");
            // SAFETY: the generated launcher has exactly this signature.
            let f: LaunchFn = unsafe {
                *lib.get::<LaunchFn>(sym.as_bytes())
                    .map_err(|e| format!("{sym}: {e}"))?
            };
            launchers.push(f);
        }
        self.modules.push((lib, launchers));
        self.words
            .push(module.kernels.iter().map(|&(_, n)| n.max(1)).collect());
        Ok(self.modules.len() - 1)
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        self.not_capturing("cuMemAlloc")?;
        let words = vec![0u64; bytes.div_ceil(8).max(1)];
        let addr = words.as_ptr() as u64;
        self.allocs.insert(addr, words);
        self.lens.insert(addr, bytes.max(1));
        Ok(addr)
    }

    fn free(&mut self, addr: u64) {
        debug_assert!(self.capturing.is_none(), "cuMemFree during a graph capture");
        self.allocs.remove(&addr);
        self.lens.remove(&addr);
    }

    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<(), String> {
        self.not_capturing("a copy to the device")?;
        let (base, off) = self.find(dst, src.len())?;
        let words = self.allocs.get_mut(&base).ok_or("a freed allocation")?;
        // SAFETY: `find` checked the range lies inside this allocation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                words.as_mut_ptr().cast::<u8>().add(off),
                src.len(),
            )
        };
        Ok(())
    }

    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        self.not_capturing("a copy from the device")?;
        let (base, off) = self.find(src, dst.len())?;
        let words = self.allocs.get(&base).ok_or("a freed allocation")?;
        // SAFETY: as for `upload`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                words.as_ptr().cast::<u8>().add(off),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    fn launch(
        &mut self,
        module: usize,
        kernel: usize,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        args: u64,
    ) -> Result<(), String> {
        if let Some(ops) = self.capturing.as_mut() {
            ops.push(EmuOp::Launch {
                module,
                kernel,
                grid,
                block,
                smem,
                args,
            });
            return Ok(());
        }
        let f = self
            .modules
            .get(module)
            .and_then(|(_, l)| l.get(kernel))
            .ok_or_else(|| format!("no kernel {kernel} of module {module} is loaded"))?;
        let n = self.words[module][kernel];
        self.find(args, n * 8)?;
        let dims = [grid[0], grid[1], grid[2], block[0], block[1], block[2]];
        // The host build keeps the launch state (grid, fibers, static shared
        // memory) in globals: one launch at a time in the process.
        let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `args` lies inside an allocation (checked above) and its
        // words hold the addresses of live allocations whose extents the
        // Program verifier checked for this binding, and the sizes and
        // strides of the views the kernel was generated for.
        unsafe { f(dims.as_ptr(), smem, args as *const i64) };
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.not_capturing("a synchronisation")
    }

    fn has_blas(&mut self) -> bool {
        self.blas
    }

    fn begin_capture(&mut self) -> Result<bool, String> {
        if self.capturing.is_some() {
            return Err("a capture is already in progress".into());
        }
        self.capturing = Some(Vec::new());
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<usize, String> {
        let ops = self.capturing.take().ok_or("no capture is in progress")?;
        self.graphs.push(Some(ops));
        Ok(self.graphs.len() - 1)
    }

    fn replay(&mut self, graph: usize) -> Result<(), String> {
        let ops = self
            .graphs
            .get(graph)
            .cloned()
            .flatten()
            .ok_or_else(|| format!("no graph {graph}"))?;
        for op in ops {
            match op {
                EmuOp::Launch {
                    module,
                    kernel,
                    grid,
                    block,
                    smem,
                    args,
                } => self.launch(module, kernel, grid, block, smem, args)?,
                EmuOp::Sgemm(g) => {
                    self.sgemm(&g)?;
                }
            }
        }
        Ok(())
    }

    fn drop_graph(&mut self, graph: usize) {
        if let Some(g) = self.graphs.get_mut(graph) {
            *g = None;
        }
    }

    /// cuBLAS's column-major semantics on the host (f32 sums in order),
    /// every matrix's extent checked against its allocation first.
    fn sgemm(&mut self, g: &super::Sgemm) -> Result<bool, String> {
        if !self.blas {
            return Ok(false);
        }
        if let Some(ops) = self.capturing.as_mut() {
            ops.push(EmuOp::Sgemm(*g));
            return Ok(true);
        }
        SGEMM_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (m, n, k, batch) = (g.m as i64, g.n as i64, g.k as i64, g.batch as i64);
        // The last element each operand touches, in elements.
        let extent = |(_, ld, stride): (u64, i32, i64), rows: i64, cols: i64| -> i64 {
            (batch - 1) * stride + (cols - 1) * ld as i64 + rows
        };
        let (ar, ac) = if g.transa { (k, m) } else { (m, k) };
        let (br, bc) = if g.transb { (n, k) } else { (k, n) };
        for (x, rows, cols) in [(g.a, ar, ac), (g.b, br, bc), (g.c, m, n)] {
            self.find(x.0, (extent(x, rows, cols).max(0) as usize) * 4)?;
        }
        let (a, b, c) = (g.a.0 as *const f32, g.b.0 as *const f32, g.c.0 as *mut f32);
        for z in 0..batch {
            for j in 0..n {
                for i in 0..m {
                    let mut acc = 0f32;
                    for p in 0..k {
                        let ai = if g.transa {
                            p + i * g.a.1 as i64
                        } else {
                            i + p * g.a.1 as i64
                        };
                        let bi = if g.transb {
                            j + p * g.b.1 as i64
                        } else {
                            p + j * g.b.1 as i64
                        };
                        // SAFETY: every index is inside the extents checked above.
                        acc += unsafe {
                            *a.offset((z * g.a.2 + ai) as isize)
                                * *b.offset((z * g.b.2 + bi) as isize)
                        };
                    }
                    // SAFETY: as above.
                    unsafe { *c.offset((z * g.c.2 + i + j * g.c.1 as i64) as isize) = acc };
                }
            }
        }
        Ok(true)
    }
}

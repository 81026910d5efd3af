//! NVRTC and the CUDA driver through `cudarc` (dynamically loaded: nothing
//! of CUDA is needed to build kiln). cudarc panics when it cannot find a
//! library, so every entry point asks `is_culib_present` first and turns a
//! missing library into an error that names it.

use std::ffi::{c_void, CString};

use cudarc::driver::{result as cu, sys};
use cudarc::nvrtc::result as nv;

use super::codegen::{cuda_source, ModuleSource};
use super::Device;

/// Whether NVRTC can be loaded (`libnvrtc.so.13` or a sibling on the
/// library path).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The text NVRTC returns (NUL-terminated C characters).
fn c_text(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles CUDA C to PTX for `arch` (`compute_90`) with NVRTC; the error
/// carries NVRTC's log.
pub fn compile_ptx(source: &str, arch: &str) -> Result<String, String> {
    if !nvrtc_present() {
        return Err(
            "NVRTC is not installed (libnvrtc.so.13 or .12 was not found on the library path; `pip install nvidia-cuda-nvrtc` and add its lib folder to LD_LIBRARY_PATH)"
                .into(),
        );
    }
    let src = CString::new(source).map_err(|_| "the generated source holds a NUL byte")?;
    let name = CString::new("kiln.cu").map_err(|e| e.to_string())?;
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| format!("NVRTC: {e:?}"))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // No contraction of a*b+c: the generated double arithmetic rounds as
        // the interpreter's does (the kernels' own fmaf calls stay fused).
        "--fmad=false".to_string(),
    ];
    // SAFETY: `prog` is a live program created above; destroyed below.
    let compiled = unsafe { nv::compile_program(prog, &opts) };
    let result = match compiled {
        Ok(()) => {
            // SAFETY: the program compiled.
            unsafe { nv::get_ptx(prog) }
                .map_err(|e| format!("NVRTC: {e:?}"))
                .map(|raw| c_text(&raw))
        }
        Err(e) => {
            // SAFETY: as above; the log exists after a failed compile.
            let log = unsafe { nv::get_program_log(prog) }
                .map(|raw| c_text(&raw))
                .unwrap_or_default();
            Err(format!(
                "NVRTC rejected the generated CUDA C ({e:?}):\n{log}"
            ))
        }
    };
    // SAFETY: destroyed once.
    let _ = unsafe { nv::destroy_program(prog) };
    result
}

/// PTX made before (a CUDA artifact's), by the exact CUDA C it was made
/// from: loading a module with a known source uses it instead of NVRTC.
static KNOWN_PTX: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Registers `ptx` as the compilation of `source` (for every later load of
/// that source in this process).
pub fn register_ptx(source: &str, ptx: &str) {
    let mut known = KNOWN_PTX.lock().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|(s, _)| s == source) {
        known.push((source.to_string(), ptx.to_string()));
    }
}

/// The registered PTX of `source`, if any.
pub fn known_ptx(source: &str) -> Option<String> {
    let known = KNOWN_PTX.lock().unwrap_or_else(|e| e.into_inner());
    known
        .iter()
        .find(|(s, _)| s == source)
        .map(|(_, p)| p.clone())
}

/// A GPU through the driver API: one context (the device's primary one),
/// one non-blocking stream for every copy, launch and product (nothing of
/// kiln's touches the legacy stream, so another thread's work on the same
/// GPU cannot break a capture and a capture cannot break it), memory by
/// `cuMemAlloc`.
pub struct CudaDevice {
    ordinal: i32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    /// Instantiated graphs (`None` once dropped).
    graphs: Vec<Option<sys::CUgraphExec>>,
    /// cuBLAS's workspace (device address), set with its stream, so that
    /// a captured product allocates nothing.
    workspace: u64,
    name: String,
    arch: String,
    /// The loaded modules with their functions and the dynamic shared
    /// memory each function was allowed (above 48 KiB).
    modules: Vec<(sys::CUmodule, Vec<sys::CUfunction>, Vec<u32>)>,
    /// cuBLAS, created at the first product; `None` inside when the library
    /// is not installed (the generated GEMM runs instead).
    blas: Option<Option<cudarc::cublas::sys::cublasHandle_t>>,
    /// Let cuBLAS use TF32 tensor cores (`--tf32`; off: f32 parity).
    tf32: bool,
}

fn driver_err(what: &str, e: cu::DriverError) -> String {
    let name = e
        .error_string()
        .ok()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{e:?}"));
    format!("{what}: {name}")
}

impl CudaDevice {
    /// Opens GPU `ordinal`: a clear error when the driver library, a GPU
    /// or a recent enough driver is missing.
    pub fn open(ordinal: i32) -> Result<CudaDevice, String> {
        if !driver_present() {
            return Err(
                "no CUDA driver: libcuda.so was not found (is an NVIDIA GPU with its driver installed?)"
                    .into(),
            );
        }
        cu::init().map_err(|e| driver_err("cuInit failed (no usable NVIDIA GPU or driver)", e))?;
        let count = cu::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if count <= ordinal {
            return Err(format!(
                "no GPU {ordinal}: the driver sees {count} CUDA device(s)"
            ));
        }
        let dev = cu::device::get(ordinal).map_err(|e| driver_err("cuDeviceGet", e))?;
        // SAFETY: `dev` came from `device::get`.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| driver_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: the context was just retained.
        unsafe { cu::ctx::set_current(ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        let name = cu::device::get_name(dev).unwrap_or_else(|_| "an NVIDIA GPU".into());
        // SAFETY: valid device and attribute.
        let (major, minor) = unsafe {
            (
                cu::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                ),
                cu::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                ),
            )
        };
        let (major, minor) = (
            major.map_err(|e| driver_err("cuDeviceGetAttribute", e))?,
            minor.map_err(|e| driver_err("cuDeviceGetAttribute", e))?,
        );
        Ok(CudaDevice {
            ordinal,
            dev,
            ctx,
            stream,
            graphs: Vec::new(),
            workspace: 0,
            name,
            arch: format!("compute_{major}{minor}"),
            modules: Vec::new(),
            blas: None,
            tf32: false,
        })
    }

    /// Lets cuBLAS use TF32 tensor cores (faster, about 1e-3 relative).
    pub fn with_tf32(mut self, tf32: bool) -> CudaDevice {
        self.tf32 = tf32;
        self
    }

    /// The cuBLAS handle, created on first use.
    fn blas(&mut self) -> Result<Option<cudarc::cublas::sys::cublasHandle_t>, String> {
        use cudarc::cublas::sys as b;
        if let Some(h) = self.blas {
            return Ok(h);
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { b::is_culib_present() } {
            self.blas = Some(None);
            return Ok(None);
        }
        let mut h: b::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: creates a handle in the current context.
        let st = unsafe { b::cublasCreate_v2(&mut h) };
        if st != b::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasCreate failed: {st:?}"));
        }
        // Products run on the device's stream, with a workspace of their
        // own (set after the stream, which resets it).
        match self.configure_blas(h) {
            Ok(ws) => self.workspace = ws,
            Err(e) => {
                // SAFETY: created above, destroyed once.
                unsafe { b::cublasDestroy_v2(h) };
                return Err(e);
            }
        }
        self.blas = Some(Some(h));
        Ok(Some(h))
    }

    /// Puts a new cuBLAS handle on the device's stream with a workspace
    /// of its own and the math mode; returns the workspace.
    fn configure_blas(&mut self, h: cudarc::cublas::sys::cublasHandle_t) -> Result<u64, String> {
        use cudarc::cublas::sys as b;
        let ok = |st: b::cublasStatus_t, what: &str| {
            if st == b::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                Ok(())
            } else {
                Err(format!("{what} failed: {st:?}"))
            }
        };
        // SAFETY: a live handle and stream.
        ok(
            unsafe { b::cublasSetStream_v2(h, self.stream as b::cudaStream_t) },
            "cublasSetStream",
        )?;
        let mode = if self.tf32 {
            b::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            b::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: a live handle.
        ok(
            unsafe { b::cublasSetMathMode(h, mode) },
            "cublasSetMathMode",
        )?;
        let ws = self.alloc(CUBLAS_WORKSPACE)?;
        // SAFETY: `ws` holds CUBLAS_WORKSPACE bytes for the handle's life.
        let set = ok(
            unsafe { b::cublasSetWorkspace_v2(h, ws as *mut c_void, CUBLAS_WORKSPACE) },
            "cublasSetWorkspace",
        );
        if let Err(e) = set {
            self.free(ws);
            return Err(e);
        }
        Ok(ws)
    }

    /// Waits for everything on the device's stream; a kernel's fault is
    /// reported here.
    fn wait(&self) -> Result<(), String> {
        // SAFETY: the device's live stream.
        unsafe { cu::stream::synchronize(self.stream) }
            .map_err(|e| driver_err("a kernel failed", e))
    }

    fn current(&self) -> Result<(), String> {
        // SAFETY: the context is retained for the device's lifetime.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| driver_err("cuCtxSetCurrent", e))
    }
}

/// Bytes of cuBLAS's workspace.
const CUBLAS_WORKSPACE: usize = 32 << 20;

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.current();
        let _ = self.wait();
        for g in self.graphs.drain(..).flatten() {
            // SAFETY: instantiated by `end_capture`, destroyed once.
            let _ = unsafe { cu::graph::exec_destroy(g) };
        }
        if let Some(Some(h)) = self.blas.take() {
            // SAFETY: created by `blas`, destroyed once.
            let _ = unsafe { cudarc::cublas::sys::cublasDestroy_v2(h) };
        }
        if self.workspace != 0 {
            // SAFETY: allocated by `blas`, freed once.
            let _ = unsafe { cu::free_sync(self.workspace) };
        }
        // SAFETY: created in `open`, destroyed once.
        let _ = unsafe { cu::stream::destroy(self.stream) };
        for (m, _, _) in self.modules.drain(..) {
            // SAFETY: loaded by `load`, unloaded once.
            let _ = unsafe { cu::module::unload(m) };
        }
        // SAFETY: retained in `open`.
        let _ = unsafe { cu::primary_ctx::release(self.dev) };
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        format!("GPU {} ({}, {})", self.ordinal, self.name, self.arch)
    }

    fn load(&mut self, module: &ModuleSource) -> Result<usize, String> {
        self.current()?;
        let source = cuda_source(module);
        // A CUDA artifact's stored PTX (for compute_80, which the driver
        // JIT-compiles for this GPU), else NVRTC.
        let ptx = match known_ptx(&source) {
            Some(p) => p,
            None => compile_ptx(&source, &self.arch)?,
        };
        let image = CString::new(ptx).map_err(|_| "PTX with a NUL byte")?;
        // SAFETY: a NUL-terminated PTX image.
        let m = unsafe { cu::module::load_data(image.as_ptr().cast::<c_void>()) }
            .map_err(|e| driver_err("cuModuleLoadData", e))?;
        let mut functions = Vec::new();
        for (name, _) in &module.kernels {
            let c = CString::new(name.as_str()).map_err(|e| e.to_string())?;
            // SAFETY: `m` is loaded.
            let f = unsafe { cu::module::get_function(m, c) }
                .map_err(|e| driver_err(&format!("cuModuleGetFunction({name})"), e))?;
            functions.push(f);
        }
        let allowed = vec![48 << 10; functions.len()];
        self.modules.push((m, functions, allowed));
        Ok(self.modules.len() - 1)
    }

    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        self.current()?;
        let n = bytes.max(1);
        // SAFETY: plain allocation in the current context.
        let p = unsafe { cu::malloc_sync(n) }.map_err(|e| {
            let (free, total) = cu::mem_get_info().unwrap_or((0, 0));
            driver_err(
                &format!("cannot allocate {n} bytes on the GPU ({free} of {total} bytes free)"),
                e,
            )
        })?;
        // SAFETY: `p` holds `n` bytes; the device's live stream.
        unsafe { cu::memset_d8_async(p, 0, n, self.stream) }
            .map_err(|e| driver_err("cuMemsetD8Async", e))?;
        Ok(p)
    }

    fn free(&mut self, addr: u64) {
        let _ = self.current();
        // SAFETY: `addr` came from `alloc` and is freed once.
        let _ = unsafe { cu::free_sync(addr) };
    }

    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<(), String> {
        if src.is_empty() {
            return Ok(());
        }
        self.current()?;
        // SAFETY: the executor only names ranges inside its allocations. A
        // copy from pageable memory returns once the bytes are staged, so
        // `src` may go; launches after it on the stream see them.
        unsafe { cu::memcpy_htod_async(dst, src, self.stream) }
            .map_err(|e| driver_err("cuMemcpyHtoDAsync", e))
    }

    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        if dst.is_empty() {
            return Ok(());
        }
        self.current()?;
        // SAFETY: as for `upload`; a copy to pageable memory returns once
        // it is done (after the launches before it on the stream).
        unsafe { cu::memcpy_dtoh_async(dst, src, self.stream) }
            .map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        self.wait()
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
        self.current()?;
        let (_, functions, allowed) = self
            .modules
            .get_mut(module)
            .ok_or_else(|| format!("no module {module} is loaded"))?;
        let f = *functions
            .get(kernel)
            .ok_or_else(|| format!("no kernel {kernel} of module {module} is loaded"))?;
        if smem > allowed[kernel] {
            // SAFETY: a loaded function and a valid attribute.
            unsafe {
                cu::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(|e| driver_err(&format!("{smem} bytes of shared memory"), e))?;
            allowed[kernel] = smem;
        }
        let mut arg = args;
        let mut params = [(&mut arg as *mut u64).cast::<c_void>()];
        // SAFETY: the kernel takes one pointer, to its `KArgs<N>` in the
        // executor's word table (written before the launch, alive until the
        // run has synchronised); the addresses in the words are live
        // allocations checked by the Program verifier for this binding.
        unsafe {
            cu::launch_kernel(
                f,
                (grid[0], grid[1], grid[2]),
                (block[0], block[1], block[2]),
                smem,
                self.stream,
                &mut params,
            )
        }
        .map_err(|e| driver_err("cuLaunchKernel", e))
    }

    fn has_blas(&mut self) -> bool {
        let _ = self.current();
        matches!(self.blas(), Ok(Some(_)))
    }

    fn begin_capture(&mut self) -> Result<bool, String> {
        self.current()?;
        // SAFETY: the device's live stream.
        unsafe {
            cu::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| driver_err("cuStreamBeginCapture", e))?;
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<usize, String> {
        self.current()?;
        // SAFETY: the stream is capturing (begun by `begin_capture`).
        let graph = unsafe { cu::stream::end_capture(self.stream) }
            .map_err(|e| driver_err("cuStreamEndCapture", e))?;
        // SAFETY: `graph` was just captured; destroyed once it is
        // instantiated (the executable graph is independent of it).
        let exec = unsafe { cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        // SAFETY: as above.
        let _ = unsafe { cu::graph::destroy(graph) };
        let exec = exec.map_err(|e| driver_err("cuGraphInstantiate", e))?;
        self.graphs.push(Some(exec));
        Ok(self.graphs.len() - 1)
    }

    fn replay(&mut self, graph: usize) -> Result<(), String> {
        self.current()?;
        let exec = self
            .graphs
            .get(graph)
            .copied()
            .flatten()
            .ok_or_else(|| format!("no graph {graph}"))?;
        // SAFETY: a live executable graph and the device's stream; its
        // launches read the word table the executor just wrote.
        unsafe { cu::graph::launch(exec, self.stream) }.map_err(|e| driver_err("cuGraphLaunch", e))
    }

    fn drop_graph(&mut self, graph: usize) {
        if let Some(slot) = self.graphs.get_mut(graph) {
            if let Some(exec) = slot.take() {
                let _ = self.current();
                let _ = self.wait();
                // SAFETY: instantiated by `end_capture`, destroyed once.
                let _ = unsafe { cu::graph::exec_destroy(exec) };
            }
        }
    }

    fn sgemm(&mut self, g: &super::Sgemm) -> Result<bool, String> {
        use cudarc::cublas::sys as b;
        self.current()?;
        let Some(h) = self.blas()? else {
            return Ok(false);
        };
        let op = |t: bool| {
            if t {
                b::cublasOperation_t::CUBLAS_OP_T
            } else {
                b::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the executor planned the call from views the Program
        // verifier checked inside their buffers for this binding.
        let st = unsafe {
            b::cublasSgemmStridedBatched(
                h,
                op(g.transa),
                op(g.transb),
                g.m,
                g.n,
                g.k,
                &alpha,
                g.a.0 as *const f32,
                g.a.1,
                g.a.2,
                g.b.0 as *const f32,
                g.b.1,
                g.b.2,
                &beta,
                g.c.0 as *mut f32,
                g.c.1,
                g.c.2,
                g.batch,
            )
        };
        if st != b::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(format!("cublasSgemmStridedBatched failed: {st:?} ({g:?})"));
        }
        Ok(true)
    }

    fn sync(&mut self) -> Result<(), String> {
        self.current()?;
        self.wait()
    }
}

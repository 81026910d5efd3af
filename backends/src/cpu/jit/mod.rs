//! Machine code for the CPU backend's kernels, generated with Cranelift.
//!
//! One process-wide JIT module holds every kernel compiled so far, keyed by
//! a text that says everything its code depends on (the kernel kind, the
//! fused body, the stored dtypes of its operands, which operands are
//! contiguous or broadcast): identical kernels of different steps, entry
//! points or models compile once. Run-time sizes, strides and pointers are
//! arguments, so one kernel serves every binding of the symbols.
//!
//! The code is 128-bit SIMD (`f32x4`, what Cranelift emits on x86-64) with
//! fused multiply-adds where the host has them; transcendental functions
//! (exp, log, tanh, erf) are polynomial approximations emitted inline, within
//! a few ulp of the f32-rounded exact values the interpreter computes.
//!
//! Every kernel is built from a description that was checked to be
//! supported first ([`kernels`]), so building never fails half-way; a JIT
//! failure (an ISA the host lacks, a Cranelift error) is a [`JitError`],
//! never a crash.

pub(crate) mod emit;
pub(crate) mod kernels;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cranelift_codegen::ir::{types, AbiParam, Signature, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};

/// Why a kernel could not be generated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("code generation failed: {0}")]
pub struct JitError(pub String);

/// The process-wide JIT: the module that owns the code, and the kernels
/// compiled so far by key. Code is never freed (kernels are few and small).
pub(crate) struct Jit {
    module: JITModule,
    ctx: Context,
    fctx: FunctionBuilderContext,
    cache: HashMap<String, usize>,
    pow: FuncId,
    /// Whether the host has fused multiply-add (else `mul` + `add`).
    pub(crate) fma: bool,
    /// Kernels compiled (a statistic for the compile report and tests).
    pub(crate) compiled: usize,
    /// Kernels begun (each gets a name of its own, also when building or
    /// defining one failed or panicked half-way).
    begun: usize,
}

// SAFETY: the JIT module's raw code pointers are only used behind the
// process-wide mutex; the finalized code itself is immutable and callable
// from any thread.
unsafe impl Send for Jit {}

/// `powf` for loop bodies (the interpreter's `f64::powf`, rounded to f32).
extern "C" fn kiln_powf(x: f32, y: f32) -> f32 {
    (x as f64).powf(y as f64) as f32
}

impl Jit {
    fn new() -> Result<Jit, JitError> {
        let err = |e: &dyn std::fmt::Display| JitError(e.to_string());
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").map_err(|e| err(&e))?;
        flags
            .set("use_colocated_libcalls", "false")
            .map_err(|e| err(&e))?;
        flags.set("is_pic", "false").map_err(|e| err(&e))?;
        let mut host = cranelift_native::builder().map_err(|e| err(&e))?;
        // The instruction sets `KILN_CPU` caps (none by default).
        #[cfg(target_arch = "x86_64")]
        for name in super::isa::cranelift_disabled() {
            host.set(name, "false").map_err(|e| err(&e))?;
        }
        let isa = host
            .finish(settings::Flags::new(flags))
            .map_err(|e| err(&e))?;
        if isa.pointer_type() != types::I64 {
            return Err(JitError("kiln's kernels need a 64-bit host".into()));
        }
        let mut builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        builder.symbol("kiln_powf", kiln_powf as *const u8);
        let mut module = JITModule::new(builder);
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(types::F32));
        sig.params.push(AbiParam::new(types::F32));
        sig.returns.push(AbiParam::new(types::F32));
        let pow = module
            .declare_function("kiln_powf", Linkage::Import, &sig)
            .map_err(|e| err(&e))?;
        Ok(Jit {
            ctx: module.make_context(),
            module,
            fctx: FunctionBuilderContext::new(),
            cache: HashMap::new(),
            pow,
            fma: super::isa::has(super::isa::Feature::Fma),
            compiled: 0,
            begun: 0,
        })
    }

    /// A signature of `params` 64-bit integers (pointers, sizes) plus the
    /// `extra` types, returning `ret` when given.
    pub(crate) fn signature(
        &self,
        params: usize,
        extra: &[types::Type],
        ret: Option<types::Type>,
    ) -> Signature {
        let mut sig = self.module.make_signature();
        sig.params
            .extend((0..params).map(|_| AbiParam::new(types::I64)));
        sig.params.extend(extra.iter().map(|&t| AbiParam::new(t)));
        sig.returns.extend(ret.map(AbiParam::new));
        sig
    }

    /// The kernel compiled for `key`, building it with `build` on first use.
    pub(crate) fn function(
        &mut self,
        key: &str,
        sig: Signature,
        build: impl FnOnce(&mut FunctionBuilder<'_>, &Tools),
    ) -> Result<usize, JitError> {
        if let Some(&p) = self.cache.get(key) {
            return Ok(p);
        }
        let err = |e: &dyn std::fmt::Display| JitError(format!("{key}: {e}"));
        // Fresh builder state and a fresh name: a kernel whose building
        // panicked (caught by the executable) may have left either half-way.
        self.fctx = FunctionBuilderContext::new();
        self.module.clear_context(&mut self.ctx);
        let number = self.begun;
        self.begun += 1;
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, number as u32);
        let config = self.module.target_config();
        {
            let pow = self
                .module
                .declare_func_in_func(self.pow, &mut self.ctx.func);
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            let tools = Tools { fma: self.fma, pow };
            build(&mut b, &tools);
            b.seal_all_blocks();
            b.finalize(config);
        }
        let name = format!("kiln_kernel_{number}");
        let id = self
            .module
            .declare_function(&name, Linkage::Local, &self.ctx.func.signature)
            .map_err(|e| err(&e))?;
        let dump = std::env::var_os("KILN_DUMP_KERNELS").is_some();
        self.ctx.set_disasm(dump);
        let defined = self.module.define_function(id, &mut self.ctx);
        if dump {
            if let Some(code) = self.ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
                eprintln!("kernel {name} ({key}):\n{code}");
            }
        }
        self.module.clear_context(&mut self.ctx);
        defined.map_err(|e| err(&format!("{e:?}")))?;
        self.module.finalize_definitions().map_err(|e| err(&e))?;
        let p = self.module.get_finalized_function(id) as usize;
        self.compiled += 1;
        self.cache.insert(key.to_string(), p);
        Ok(p)
    }
}

/// What a kernel builder may use besides the builder: the host's features
/// and the imported helpers.
pub(crate) struct Tools {
    /// Fused multiply-add is available.
    pub(crate) fma: bool,
    /// `kiln_powf(f32, f32) -> f32`.
    pub(crate) pow: cranelift_codegen::ir::FuncRef,
}

static JIT: OnceLock<Result<Mutex<Jit>, JitError>> = OnceLock::new();

/// Runs `f` on the process-wide JIT (created on first use).
pub(crate) fn with_jit<T>(f: impl FnOnce(&mut Jit) -> Result<T, JitError>) -> Result<T, JitError> {
    let jit = JIT.get_or_init(|| Jit::new().map(Mutex::new));
    let jit = jit.as_ref().map_err(Clone::clone)?;
    // A panic while holding the lock cannot leave a half-built kernel in the
    // cache (entries are inserted after finalization), and the next kernel
    // starts from fresh builder state under a new name, so a poisoned lock
    // is still usable.
    let mut guard = jit.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard)
}

/// How many kernels the process has compiled so far.
pub fn kernels_compiled() -> usize {
    with_jit(|j| Ok(j.compiled)).unwrap_or(0)
}

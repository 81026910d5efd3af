//! CUDA C from a [`Program`]: one `__global__` function per distinct step.
//!
//! Every kernel takes one argument, the device address of its `KArgs<N>`
//! (N 64-bit words: device pointers, sizes, strides, scalars), so the source
//! depends only on a step's structure — its kind, ranks, dtypes and fused
//! body — and never on the run-time sizes. Identical kernels are emitted
//! once. What goes in each word is recorded as a [`Word`] list the executor
//! evaluates against the views of the current binding; it writes every
//! step's words into one table on the device before the run's launches, so
//! a launch names only its table entry and a run captured as a CUDA graph
//! replays with the next run's sizes and addresses (a decode step one
//! position further along the cache) once the table is rewritten.
//!
//! Numerics follow the reference executor: a loop body's float values are
//! computed in double and rounded to their dtype after each instruction
//! (exactly the interpreter's rule); row reductions (sums, norms, softmax)
//! accumulate in double; matrix products and attention accumulate in float
//! (as the CPU backend's kernels do). 16-bit values are read as stored and
//! converted in the kernel. Integer arithmetic wraps as in the interpreter;
//! a division by zero or a gather id outside its table writes nothing
//! harmful and records the step in the error word, which the executor turns
//! into the interpreter's error after the run.
//!
//! The same source compiles with NVRTC for a GPU and, with the
//! [`EMU_PRELUDE`], with a host C++ compiler for the emulator that runs the
//! kernels' blocks on host threads (`super::emu`), which is how the code is
//! tested on machines without a GPU.

use std::collections::HashMap;
use std::fmt::Write as _;

use kiln_ir::{BinaryOp, DType, Dim, KernelOp, ReduceKind, UnaryOp};

use crate::lower::{BufferId, FillOp, Kernel, Program, RowOp};

/// Threads per block of the 1-D kernels (a power of two: the block
/// reductions halve it).
pub const BLOCK: u32 = 256;
/// Query rows per attention block.
pub const ATT_TQ: usize = 16;
/// Key rows per attention tile.
pub const ATT_TK: usize = 16;
/// Threads per attention block.
pub const ATT_THREADS: u32 = 128;
/// Threads per block of a mixture of experts' hidden-row and output
/// kernels (one row per block: two warps keep a row's loads coalesced, and
/// the emulator's barriers cheap).
pub const MOE_THREADS: u32 = 64;
/// Output tile of a GEMM block (square), and its depth.
pub const GEMM_TILE: usize = 64;
/// The depth of a GEMM tile.
pub const GEMM_DEPTH: usize = 16;

/// An operand of a step: its output or input `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    /// The buffer the step writes.
    Out,
    /// Input `i` of the step.
    In(usize),
}

/// What one argument word holds, evaluated per run.
#[derive(Clone, Debug, PartialEq)]
pub enum Word {
    /// The device address of the operand's first element (its view's offset applied).
    Ptr(Operand),
    /// Axis `axis` of the operand's shape.
    Size(Operand, usize),
    /// Axis `axis` of the operand's strides (elements).
    Stride(Operand, usize),
    /// The product of the operand's shape over `from..to`.
    Count(Operand, usize, usize),
    /// An integer known when the step is generated.
    Int(i64),
    /// A double, as its bits.
    F64(f64),
    /// An integer dim evaluated under the binding (an arange start).
    Dim(Dim),
    /// The device address of the run's error word.
    Err,
    /// The step's index (named in errors).
    Step,
    /// The device address of this step's relative-position bucket table
    /// (`i32`, one per distance from `-(S - 1)` to `T - 1`).
    Buckets,
    /// How many key ranges an attention step is split into (1: no split).
    Splits,
    /// Keys per range of a split attention step.
    Chunk,
    /// The device address of a split attention step's partial results.
    Scratch,
}

/// How a step is launched: grid from the views, fixed block and shared memory rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Grid {
    /// Grid-stride over `Count(operand, 0, rank)` elements, `BLOCK` threads.
    Elements(Operand, usize),
    /// Grid-stride over `Count(operand, from, to)` rows, one block each, `BLOCK` threads.
    Rows(Operand, usize, usize),
    /// Tiles of the output `[batch…, M, N]`, 16 × 16 threads.
    Gemm,
    /// `[ceil(T / ATT_TQ), h, B]` blocks of `ATT_THREADS`, shared memory for
    /// the tiles of q `[B, h, T, dh]` and v `[.., dv]`.
    Attention,
    /// One block per token of `x` (input 0, `[tokens…, d]`), shared memory
    /// for the router's logits: the routing of a mixture of experts.
    Moe,
    /// `[F, top_k, tokens]` blocks (grid-stride past the limits), shared
    /// memory for a block reduction: a mixture's hidden rows.
    MoeHidden {
        /// Experts per token.
        top_k: usize,
    },
    /// `[D, tokens]` blocks, shared memory for a block reduction: a
    /// mixture's output.
    MoeDown,
}

/// One step's kernel: which function of the module, its words and grid.
#[derive(Clone, Debug, PartialEq)]
pub struct StepKernel {
    /// Index into [`ModuleSource::kernels`].
    pub kernel: usize,
    /// The argument words, in order.
    pub words: Vec<Word>,
    /// How to launch it.
    pub grid: Grid,
    /// For a GEMM with an epilogue: the kernel (and its words) that applies
    /// the epilogue in place to a product the device's BLAS wrote (its grid
    /// is `Elements` over the output); for attention: the kernel that
    /// combines the partial results of a split over the keys (its grid is
    /// `Elements` over the output).
    pub epilogue: Option<(usize, Vec<Word>)>,
    /// Kernels launched after this one, in order, with their words and
    /// grids (a mixture of experts' hidden rows and output).
    pub then: Vec<(usize, Vec<Word>, Grid)>,
}

/// The CUDA C of one Program.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSource {
    /// The whole source (the prelude, then every kernel).
    pub source: String,
    /// The kernels' names with their word counts.
    pub kernels: Vec<(String, usize)>,
    /// Per step of the Program, in order.
    pub steps: Vec<StepKernel>,
}

/// Declarations shared by every module (the GPU and the emulator).
pub const PRELUDE: &str = r#"// kiln: generated CUDA C
template <int N> struct KArgs { long long v[N]; };
#define KILN_INF __int_as_float(0x7f800000)
__device__ __forceinline__ float kiln_h2f(unsigned short h) {
  unsigned s = (unsigned)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) { float v = (float)m * 5.9604644775390625e-8f; return s ? -v : v; }
  if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
  return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}
__device__ __forceinline__ unsigned short kiln_f2h(float f) {
  unsigned x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);
  if (ax <= 0x33000000u) return (unsigned short)sign;
  if (ax < 0x38800000u) return (unsigned short)(sign | (unsigned)rintf(__uint_as_float(ax) * 16777216.0f));
  unsigned h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13), rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (unsigned short)(sign | h);
}
__device__ __forceinline__ float kiln_bf2f(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
__device__ __forceinline__ unsigned short kiln_f2bf(float f) {
  unsigned x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}
__device__ __forceinline__ float kiln_r16(float f) { return kiln_h2f(kiln_f2h(f)); }
// A double rounded to float to odd (truncated, the last bit set when
// inexact): rounding that to a 16-bit format gives the double's own nearest
// 16-bit value, with no double rounding (float keeps 13 more bits).
__device__ __forceinline__ float kiln_odd(double d) {
  float f = (float)d;
  if ((double)f != d && d == d) {
    if (fabs((double)f) > fabs(d)) f = nextafterf(f, 0.0f);
    f = __uint_as_float(__float_as_uint(f) | 1u);
  }
  return f;
}
__device__ __forceinline__ float kiln_rbf(float f) { return kiln_bf2f(kiln_f2bf(f)); }
__device__ __forceinline__ float kiln_r16d(double d) { return kiln_r16(kiln_odd(d)); }
__device__ __forceinline__ float kiln_rbfd(double d) { return kiln_rbf(kiln_odd(d)); }
__device__ __forceinline__ bool kiln_nan(double x) { return x != x; }
// A float max that propagates NaN (as the interpreter's softmax does).
__device__ __forceinline__ float kiln_fmaxn(float a, float b) { return (a != a || b != b) ? __int_as_float(0x7fc00000) : (a > b ? a : b); }
__device__ __forceinline__ double kiln_max(double a, double b) { return (kiln_nan(a) || kiln_nan(b)) ? (double)__int_as_float(0x7fc00000) : (a > b ? a : b); }
__device__ __forceinline__ double kiln_min(double a, double b) { return (kiln_nan(a) || kiln_nan(b)) ? (double)__int_as_float(0x7fc00000) : (a < b ? a : b); }
__device__ __forceinline__ long long kiln_d2i64(double x) {
  if (x != x) return 0;
  if (x >= 9223372036854775807.0) return 9223372036854775807LL;
  if (x <= -9223372036854775808.0) return (-9223372036854775807LL - 1);
  return (long long)x;
}
__device__ __forceinline__ long long kiln_d2i32(double x) {
  if (x != x) return 0;
  if (x >= 2147483647.0) return 2147483647LL;
  if (x <= -2147483648.0) return -2147483648LL;
  return (long long)(int)x;
}
__device__ __forceinline__ long long kiln_wrap32(long long i) { return (long long)(int)(unsigned)(unsigned long long)i; }
__device__ __forceinline__ long long kiln_add(long long a, long long b) { return (long long)((unsigned long long)a + (unsigned long long)b); }
__device__ __forceinline__ long long kiln_sub(long long a, long long b) { return (long long)((unsigned long long)a - (unsigned long long)b); }
__device__ __forceinline__ long long kiln_mul(long long a, long long b) { return (long long)((unsigned long long)a * (unsigned long long)b); }
__device__ __forceinline__ long long kiln_neg(long long a) { return (long long)(0ULL - (unsigned long long)a); }
// Records the first failing step (1-based) and a detail in the error words.
__device__ __forceinline__ void kiln_fail(long long* err, long long step, long long detail) {
  if (atomicCAS((unsigned long long*)err, 0ULL, (unsigned long long)(step + 1)) == 0ULL) err[1] = detail;
}
__device__ __forceinline__ long long kiln_div(long long a, long long b, long long* err, long long step) {
  if (b == 0) { kiln_fail(err, step, 0); return 0; }
  if (b == -1) return kiln_neg(a);
  return a / b;
}
// A block-wide sum of doubles (blockDim.x a power of two, every thread calls it).
__device__ __forceinline__ double kiln_block_sum(double v, double* red) {
  unsigned t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  double r = red[0];
  __syncthreads();
  return r;
}
// A block-wide NaN-propagating max.
__device__ __forceinline__ double kiln_block_max(double v, double* red) {
  unsigned t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] = kiln_max(red[t], red[t + s]);
    __syncthreads();
  }
  double r = red[0];
  __syncthreads();
  return r;
}
__device__ __forceinline__ long long kiln_block_isum(long long v, long long* red) {
  unsigned t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] = kiln_add(red[t], red[t + s]);
    __syncthreads();
  }
  long long r = red[0];
  __syncthreads();
  return r;
}
__device__ __forceinline__ long long kiln_block_imax(long long v, long long* red) {
  unsigned t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s && red[t + s] > red[t]) red[t] = red[t + s];
    __syncthreads();
  }
  long long r = red[0];
  __syncthreads();
  return r;
}
"#;

/// What the GPU build puts before [`PRELUDE`].
pub const CUDA_PRELUDE: &str =
    "#define KILN_SMEM extern __shared__ __align__(16) unsigned char kiln_smem[];\n";

/// What the emulator's host build puts before [`PRELUDE`]: CUDA's
/// built-ins, a block's threads as fibers on the calling thread (see
/// `super::emu`).
pub const EMU_PRELUDE: &str = r#"#include <cmath>
#include <cstring>
#include <vector>
#include <ucontext.h>
using std::isnan;
struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
#define __align__(n) alignas(n)
static unsigned char* kiln_emu_smem;
#define KILN_SMEM unsigned char* kiln_smem = kiln_emu_smem;
// The threads of a block are fibers on the calling thread: each runs until
// its next __syncthreads (or its end), then the next one does; a round
// ends when every live thread has reached the barrier.
static ucontext_t kiln_sched;
static std::vector<ucontext_t> kiln_ctx;
static std::vector<std::vector<char>> kiln_stacks;
static std::vector<int> kiln_done;
static unsigned kiln_cur;
static void (*kiln_body)(const void*);
static const void* kiln_args;
static inline void __syncthreads() { swapcontext(&kiln_ctx[kiln_cur], &kiln_sched); }
static void kiln_fiber(int t) { kiln_body(kiln_args); kiln_done[t] = 1; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
static inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  unsigned long long old = *p;
  if (old == cmp) *p = v;
  return old;
}
// Runs every block of the grid in order, its blockDim threads as fibers.
static void kiln_emu_launch(const unsigned* d, unsigned smem, void (*body)(const void*), const void* args) {
  gridDim = dim3{d[0], d[1], d[2]};
  blockDim = dim3{d[3], d[4], d[5]};
  std::vector<double> sm(smem / 8 + 2);
  kiln_emu_smem = (unsigned char*)sm.data();
  const unsigned nt = d[3] * d[4] * d[5];
  const size_t stack = 256 << 10;
  if (kiln_stacks.size() < nt) kiln_stacks.resize(nt);
  for (unsigned t = 0; t < nt; t++) if (kiln_stacks[t].size() < stack) kiln_stacks[t].resize(stack);
  kiln_ctx.resize(nt);
  kiln_done.assign(nt, 0);
  kiln_body = body;
  kiln_args = args;
  for (unsigned z = 0; z < d[2]; z++)
    for (unsigned y = 0; y < d[1]; y++)
      for (unsigned x = 0; x < d[0]; x++) {
        blockIdx = dim3{x, y, z};
        for (unsigned t = 0; t < nt; t++) {
          getcontext(&kiln_ctx[t]);
          kiln_ctx[t].uc_stack.ss_sp = kiln_stacks[t].data();
          kiln_ctx[t].uc_stack.ss_size = stack;
          kiln_ctx[t].uc_link = &kiln_sched;
          makecontext(&kiln_ctx[t], (void (*)())kiln_fiber, 1, (int)t);
          kiln_done[t] = 0;
        }
        for (;;) {
          bool live = false;
          for (unsigned t = 0; t < nt; t++) {
            if (kiln_done[t]) continue;
            live = true;
            kiln_cur = t;
            threadIdx = dim3{t % d[3], (t / d[3]) % d[4], t / (d[3] * d[4])};
            swapcontext(&kiln_sched, &kiln_ctx[t]);
          }
          if (!live) break;
        }
      }
}
"#;

/// The C type a value of `dtype` is computed in.
fn value_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => "float",
        DType::I64 | DType::I32 => "long long",
        DType::Bool => "bool",
    }
}

/// The C type an element of `dtype` is stored as.
fn storage_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float",
        DType::F16 | DType::BF16 => "unsigned short",
        DType::I64 => "long long",
        DType::I32 => "int",
        DType::Bool => "unsigned char",
    }
}

/// `ptr[off]` of storage `stored`, as a value of `want`'s computation type.
fn load(ptr: &str, off: &str, stored: DType, want: DType) -> String {
    let raw = format!("{ptr}[{off}]");
    let v = match stored {
        DType::F32 => raw,
        DType::F16 => format!("kiln_h2f({raw})"),
        DType::BF16 => format!("kiln_bf2f({raw})"),
        DType::I64 => raw,
        DType::I32 => format!("(long long){raw}"),
        DType::Bool => format!("({raw} != 0)"),
    };
    convert(&v, stored, want)
}

/// Converts a computed value of dtype `from` to dtype `to` (the interpreter's
/// `Scalar::to`: floats to integers truncate and saturate, integers wrap to
/// i32, non-zero is true, floats round to the dtype).
fn convert(v: &str, from: DType, to: DType) -> String {
    use DType::*;
    let float = |t: DType| matches!(t, F32 | F16 | BF16);
    let int = |t: DType| matches!(t, I64 | I32);
    match (from, to) {
        (a, b) if a == b => v.to_string(),
        (a, F32) if float(a) => v.to_string(),
        (a, F16) if float(a) => format!("kiln_r16({v})"),
        (a, BF16) if float(a) => format!("kiln_rbf({v})"),
        (a, F32) if int(a) => format!("(float)({v})"),
        (a, F16) if int(a) => format!("kiln_r16((float)({v}))"),
        (a, BF16) if int(a) => format!("kiln_rbf((float)({v}))"),
        (Bool, t) if float(t) => format!("(({v}) ? 1.0f : 0.0f)"),
        (a, I64) if float(a) => format!("kiln_d2i64((double)({v}))"),
        (a, I32) if float(a) => format!("kiln_d2i32((double)({v}))"),
        (I32, I64) => v.to_string(),
        (I64, I32) => format!("kiln_wrap32({v})"),
        (Bool, t) if int(t) => format!("(({v}) ? 1LL : 0LL)"),
        (a, Bool) if float(a) => format!("(({v}) != 0.0f)"),
        (_, Bool) => format!("(({v}) != 0)"),
        _ => v.to_string(),
    }
}

/// A double expression rounded once to float dtype `to` (its value as a
/// C float); other dtypes convert from its float value.
fn round_double(v: &str, to: DType) -> String {
    match to {
        DType::F32 => format!("(float)({v})"),
        DType::F16 => format!("kiln_r16d({v})"),
        DType::BF16 => format!("kiln_rbfd({v})"),
        _ => convert(&format!("(float)({v})"), DType::F32, to),
    }
}

/// A value of `dtype` ready to store as `stored` (the output's storage).
fn store_value(v: &str, dtype: DType, stored: DType) -> String {
    let v = convert(v, dtype, stored);
    match stored {
        DType::F32 => v,
        DType::F16 => format!("kiln_f2h({v})"),
        DType::BF16 => format!("kiln_f2bf({v})"),
        DType::I64 => v,
        DType::I32 => format!("(int)({v})"),
        DType::Bool => format!("(unsigned char)(({v}) ? 1 : 0)"),
    }
}

/// A C literal of `x` as a double (bit-exact, NaN and infinities included).
fn double_lit(x: f64) -> String {
    format!("__longlong_as_double({}LL)", x.to_bits() as i64)
}

/// A constant of dtype `t` as the interpreter rounds it.
fn const_lit(x: f64, t: DType) -> String {
    match t {
        DType::F32 => format!("__uint_as_float({}u)", (x as f32).to_bits()),
        DType::F16 => format!(
            "__uint_as_float({}u)",
            (crate::reference::scalar::to_f16(x).to_f64() as f32).to_bits()
        ),
        DType::BF16 => format!(
            "__uint_as_float({}u)",
            (crate::reference::scalar::to_bf16(x).to_f64() as f32).to_bits()
        ),
        DType::I64 => format!("(long long){:#x}ULL", x as i64 as u64),
        DType::I32 => format!("(long long){}LL", x as i32),
        DType::Bool => (if x != 0.0 { "true" } else { "false" }).to_string(),
    }
}

/// The C of one unary op on value `a` of dtype `t`.
fn unary_c(u: UnaryOp, a: &str, t: DType) -> Result<String, String> {
    if t == DType::Bool {
        return match u {
            UnaryOp::Not => Ok(format!("!{a}")),
            _ => Err(format!("{} does not apply to bool", u.name())),
        };
    }
    if matches!(t, DType::I64 | DType::I32) {
        return match u {
            UnaryOp::Neg => Ok(format!("kiln_neg({a})")),
            UnaryOp::Abs => Ok(format!("({a} < 0 ? kiln_neg({a}) : {a})")),
            UnaryOp::Relu => Ok(format!("({a} < 0 ? 0LL : {a})")),
            _ => Err(format!("{} does not apply to integers", u.name())),
        };
    }
    let x = format!("(double){a}");
    Ok(match u {
        UnaryOp::Neg => format!("-{x}"),
        UnaryOp::Exp => format!("exp({x})"),
        UnaryOp::Log => format!("log({x})"),
        UnaryOp::Sqrt => format!("sqrt({x})"),
        UnaryOp::Rsqrt => format!("1.0 / sqrt({x})"),
        UnaryOp::Tanh => format!("tanh({x})"),
        UnaryOp::Sigmoid => format!("1.0 / (1.0 + exp(-{x}))"),
        UnaryOp::Abs => format!("fabs({x})"),
        UnaryOp::Recip => format!("1.0 / {x}"),
        UnaryOp::Erf => format!("erf({x})"),
        UnaryOp::Gelu => format!("0.5 * {x} * (1.0 + erf({x} * 0.7071067811865476))"),
        UnaryOp::GeluTanh => format!(
            "0.5 * {x} * (1.0 + tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"
        ),
        UnaryOp::Silu => format!("{x} * (1.0 / (1.0 + exp(-{x})))"),
        UnaryOp::Relu => format!("({x} < 0.0 ? 0.0 : {x})"),
        UnaryOp::Not => return Err("not does not apply to floats".into()),
    })
}

/// The C of one binary op on values of dtype `t`.
fn binary_c(op: BinaryOp, a: &str, b: &str, t: DType) -> Result<String, String> {
    let cmp = |sym: &str| format!("({a} {sym} {b})");
    match op {
        BinaryOp::Eq => return Ok(cmp("==")),
        BinaryOp::Ne => return Ok(cmp("!=")),
        BinaryOp::Lt if t != DType::Bool => return Ok(cmp("<")),
        BinaryOp::Le if t != DType::Bool => return Ok(cmp("<=")),
        BinaryOp::Gt if t != DType::Bool => return Ok(cmp(">")),
        BinaryOp::Ge if t != DType::Bool => return Ok(cmp(">=")),
        _ => {}
    }
    let bad = || Err(format!("{} does not apply to {t}", op.name()));
    match t {
        DType::Bool => match op {
            BinaryOp::And => Ok(cmp("&&")),
            BinaryOp::Or => Ok(cmp("||")),
            _ => bad(),
        },
        DType::I64 | DType::I32 => match op {
            BinaryOp::Add => Ok(format!("kiln_add({a}, {b})")),
            BinaryOp::Sub => Ok(format!("kiln_sub({a}, {b})")),
            BinaryOp::Mul => Ok(format!("kiln_mul({a}, {b})")),
            BinaryOp::Div => Ok(format!("kiln_div({a}, {b}, err, step)")),
            BinaryOp::Max => Ok(format!("({a} > {b} ? {a} : {b})")),
            BinaryOp::Min => Ok(format!("({a} < {b} ? {a} : {b})")),
            _ => bad(),
        },
        _ => {
            let (x, y) = (format!("(double){a}"), format!("(double){b}"));
            match op {
                BinaryOp::Add => Ok(format!("{x} + {y}")),
                BinaryOp::Sub => Ok(format!("{x} - {y}")),
                BinaryOp::Mul => Ok(format!("{x} * {y}")),
                BinaryOp::Div => Ok(format!("{x} / {y}")),
                BinaryOp::Pow => Ok(format!("pow({x}, {y})")),
                BinaryOp::Max => Ok(format!("kiln_max({x}, {y})")),
                BinaryOp::Min => Ok(format!("kiln_min({x}, {y})")),
                _ => bad(),
            }
        }
    }
}

/// The C statements of a fused body: `vals` names the values (operands
/// first) with their dtypes; appends one `v{n}` per instruction and returns
/// the last value's name and dtype.
fn body_c(
    out: &mut String,
    body: &[KernelOp],
    names: &mut Vec<String>,
    types: &mut Vec<DType>,
    indent: &str,
) -> Result<(String, DType), String> {
    for k in body {
        let get = |i: usize| -> Result<(String, DType), String> {
            match (names.get(i), types.get(i)) {
                (Some(n), Some(t)) => Ok((n.clone(), *t)),
                _ => Err(format!("the body reads undefined value {i}")),
            }
        };
        let (expr, from, t) = match k {
            KernelOp::Unary(u, a) => {
                let (a, t) = get(*a)?;
                let e = unary_c(*u, &a, t)?;
                let from = if matches!(t, DType::F32 | DType::F16 | DType::BF16) {
                    DType::F32
                } else {
                    t
                };
                (e, from, t)
            }
            KernelOp::Binary(op, a, b) => {
                let ((a, t), (b, _)) = (get(*a)?, get(*b)?);
                let e = binary_c(*op, &a, &b, t)?;
                if op.is_predicate() {
                    (e, DType::Bool, DType::Bool)
                } else if matches!(t, DType::F32 | DType::F16 | DType::BF16) {
                    (e, DType::F32, t)
                } else {
                    (e, t, t)
                }
            }
            KernelOp::Where(c, a, b) => {
                let ((c, _), (a, t), (b, _)) = (get(*c)?, get(*a)?, get(*b)?);
                (format!("({c} ? {a} : {b})"), t, t)
            }
            KernelOp::Cast(to, a) => {
                let (a, t) = get(*a)?;
                (convert(&a, t, *to), *to, *to)
            }
            KernelOp::Const(v, t) => (const_lit(*v, *t), *t, *t),
        };
        let n = format!("v{}", names.len());
        // Float results are computed in double: round once to the dtype.
        let value = match (from, t) {
            (DType::F32, DType::F32) if matches!(k, KernelOp::Unary(..) | KernelOp::Binary(..)) => {
                format!("(float)({expr})")
            }
            (DType::F32, DType::F16 | DType::BF16)
                if matches!(k, KernelOp::Unary(..) | KernelOp::Binary(..)) =>
            {
                round_double(&expr, t)
            }
            (DType::I32, DType::I32) if matches!(k, KernelOp::Unary(..) | KernelOp::Binary(..)) => {
                format!("kiln_wrap32({expr})")
            }
            _ => expr,
        };
        let _ = writeln!(out, "{indent}const {} {n} = {value};", value_type(t));
        names.push(n);
        types.push(t);
    }
    match (names.last(), types.last()) {
        (Some(n), Some(t)) => Ok((n.clone(), *t)),
        _ => Err("an empty body".into()),
    }
}

/// Builds one kernel's words and source text.
struct Gen {
    words: Vec<Word>,
    text: String,
}

impl Gen {
    fn new() -> Gen {
        Gen {
            words: Vec::new(),
            text: String::new(),
        }
    }

    /// A word; returns `a.v[i]` for the source.
    fn word(&mut self, w: Word) -> String {
        if let Some(i) = self.words.iter().position(|x| *x == w) {
            return format!("a.v[{i}]");
        }
        self.words.push(w);
        format!("a.v[{}]", self.words.len() - 1)
    }

    /// Declares `name` as a pointer to `op`'s storage.
    fn ptr(&mut self, name: &str, op: Operand, stored: DType, write: bool) {
        let w = self.word(Word::Ptr(op));
        let c = if write { "" } else { "const " };
        let t = storage_type(stored);
        let _ = writeln!(
            self.text,
            "  {c}{t}* __restrict__ {name} = ({c}{t}*)(unsigned long long){w};"
        );
    }

    /// Declares `name` = a word as a long long.
    fn int(&mut self, name: &str, w: Word) {
        let w = self.word(w);
        let _ = writeln!(self.text, "  const long long {name} = {w};");
    }

    /// The finished kernel, named `KNAME`.
    fn finish(self, body: &str) -> (String, Vec<Word>) {
        let n = self.words.len().max(1);
        let src = format!(
            "extern \"C\" __global__ void KNAME(const KArgs<{n}>* __restrict__ args) {{\n  const KArgs<{n}> a = *args;\n{}{body}}}\n",
            self.text
        );
        (src, self.words)
    }
}

/// Statements decomposing linear index `lin` over axes `axes` of a shape
/// (sizes `size(k)`), adding `c * stride` to each `offsets` variable.
fn decompose(
    lin: &str,
    sizes: &[String],
    offsets: &[(&str, Vec<Option<String>>)],
    indent: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{indent}long long rem = {lin};");
    for (name, _) in offsets {
        let _ = writeln!(s, "{indent}long long {name} = 0;");
    }
    for k in (0..sizes.len()).rev() {
        let c = if k == 0 {
            "rem".to_string()
        } else {
            format!("rem % {}", sizes[k])
        };
        let _ = writeln!(s, "{indent}{{ const long long c = {c};");
        if k > 0 {
            let _ = writeln!(s, "{indent}  rem /= {};", sizes[k]);
        }
        for (name, strides) in offsets {
            if let Some(Some(st)) = strides.get(k) {
                let _ = writeln!(s, "{indent}  {name} += c * {st};");
            }
        }
        let _ = writeln!(s, "{indent}}}");
    }
    s
}

/// The generator's view of a Program: dtypes as declared and as stored.
struct Types<'a> {
    program: &'a Program,
    storage: &'a [DType],
}

impl Types<'_> {
    fn declared(&self, b: BufferId) -> DType {
        self.program.buffer(b).dtype
    }
    fn stored(&self, b: BufferId) -> DType {
        let root = self.program.root(b).index();
        self.storage
            .get(root)
            .copied()
            .unwrap_or(self.program.buffer(b).dtype)
    }
}

/// A loop kernel (also copy): out[i] = body(ins[i]).
fn gen_loop(
    t: &Types<'_>,
    step: &crate::lower::Step,
    body: &[KernelOp],
) -> Result<(String, Vec<Word>), String> {
    let operands: Vec<(Operand, BufferId)> = step
        .inputs
        .iter()
        .enumerate()
        .map(|(i, &b)| (Operand::In(i), b))
        .collect();
    gen_elementwise(t, step, body, &operands)
}

/// A GEMM's epilogue applied in place: out[i] = epilogue(out[i], extras[i]).
fn gen_epilogue(
    t: &Types<'_>,
    step: &crate::lower::Step,
    body: &[KernelOp],
) -> Result<(String, Vec<Word>), String> {
    let mut operands = vec![(Operand::Out, step.output)];
    operands.extend(
        step.inputs
            .iter()
            .enumerate()
            .skip(2)
            .map(|(i, &b)| (Operand::In(i), b)),
    );
    gen_elementwise(t, step, body, &operands)
}

/// `out[i] = body(operands[i])` over the output's elements, the operands
/// views of the output's shape (the output itself may be one).
fn gen_elementwise(
    t: &Types<'_>,
    step: &crate::lower::Step,
    body: &[KernelOp],
    operands: &[(Operand, BufferId)],
) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let out_b = step.output;
    let r = p.buffer(out_b).shape.len();
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    for (i, &(op, b)) in operands.iter().enumerate() {
        if op == Operand::Out {
            // Read through the output's own pointer.
            let _ = writeln!(g.text, "  {}* x{i} = o;", storage_type(t.stored(b)));
        } else {
            g.ptr(&format!("x{i}"), op, t.stored(b), false);
        }
    }
    let needs_err = body
        .iter()
        .any(|k| matches!(k, KernelOp::Binary(BinaryOp::Div, ..)));
    if needs_err {
        let e = g.word(Word::Err);
        let s = g.word(Word::Step);
        let _ = writeln!(
            g.text,
            "  long long* err = (long long*)(unsigned long long){e};"
        );
        let _ = writeln!(g.text, "  const long long step = {s};");
    }
    g.int("n", Word::Count(Operand::Out, 0, r));
    let sizes: Vec<String> = (0..r)
        .map(|k| g.word(Word::Size(Operand::Out, k)))
        .collect();
    let mut offsets: Vec<(String, Vec<Option<String>>)> = Vec::new();
    let os: Vec<Option<String>> = (0..r)
        .map(|k| Some(g.word(Word::Stride(Operand::Out, k))))
        .collect();
    offsets.push(("oo".into(), os));
    for (i, &(op, _)) in operands.iter().enumerate() {
        let st = (0..r).map(|k| Some(g.word(Word::Stride(op, k)))).collect();
        offsets.push((format!("o{i}"), st));
    }
    let offs: Vec<(&str, Vec<Option<String>>)> = offsets
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    s.push_str(&decompose("i", &sizes, &offs, "    "));
    let mut names = Vec::new();
    let mut types = Vec::new();
    for (i, &(_, b)) in operands.iter().enumerate() {
        let d = t.declared(b);
        let _ = writeln!(
            s,
            "    const {} a{i} = {};",
            value_type(d),
            load(&format!("x{i}"), &format!("o{i}"), t.stored(b), d)
        );
        names.push(format!("a{i}"));
        types.push(d);
    }
    let (v, vt) = if body.is_empty() {
        match (names.first(), types.first()) {
            (Some(n), Some(t)) => (n.clone(), *t),
            _ => return Err("a copy without a source".into()),
        }
    } else {
        body_c(&mut s, body, &mut names, &mut types, "    ")?
    };
    let od = t.declared(out_b);
    let _ = writeln!(
        s,
        "    o[oo] = {};",
        store_value(&convert(&v, vt, od), od, t.stored(out_b))
    );
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// A fill kernel: constant, arange or causal mask over the output's view.
fn gen_fill(
    t: &Types<'_>,
    step: &crate::lower::Step,
    f: &FillOp,
) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let out_b = step.output;
    let r = p.buffer(out_b).shape.len();
    let od = t.declared(out_b);
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.int("n", Word::Count(Operand::Out, 0, r));
    let sizes: Vec<String> = (0..r)
        .map(|k| g.word(Word::Size(Operand::Out, k)))
        .collect();
    let os: Vec<Option<String>> = (0..r)
        .map(|k| Some(g.word(Word::Stride(Operand::Out, k))))
        .collect();
    // The multi-index's first two coordinates, for arange and the mask.
    let mut idx_offsets = vec![("oo", os)];
    let i0: Vec<Option<String>> = (0..r).map(|k| (k == 0).then(|| "1".to_string())).collect();
    let i1: Vec<Option<String>> = (0..r).map(|k| (k == 1).then(|| "1".to_string())).collect();
    idx_offsets.push(("c0", i0));
    idx_offsets.push(("c1", i1));
    let value = match f {
        // Written below as a literal of the output's dtype.
        FillOp::Constant { .. } => String::new(),
        FillOp::Arange { start } => {
            let w = g.word(Word::Dim(start.clone()));
            format!("kiln_add({w}, c0)")
        }
        FillOp::CausalMask => {
            if r != 2 {
                return Err(format!("a causal mask of rank {r}"));
            }
            format!("(c1 <= c0 + {} - {})", sizes[1], sizes[0])
        }
    };
    let vt = match f {
        FillOp::Constant { .. } => DType::F32,
        FillOp::Arange { .. } => DType::I64,
        FillOp::CausalMask => DType::Bool,
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    s.push_str(&decompose("i", &sizes, &idx_offsets, "    "));
    let _ = writeln!(s, "    (void)c0; (void)c1;");
    let v = match (f, od) {
        // A constant converts from its double as `Scalar::Float(v).to(dtype)`.
        (FillOp::Constant { value }, d) => const_lit(*value, d),
        _ => convert(&value, vt, od),
    };
    let _ = writeln!(s, "    o[oo] = {};", store_value(&v, od, t.stored(out_b)));
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// A row kernel: one block per row of the input.
fn gen_row(
    t: &Types<'_>,
    step: &crate::lower::Step,
    op: &RowOp,
) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let x_b = step.inputs[0];
    let out_b = step.output;
    let r = p.buffer(x_b).shape.len();
    let outer = match op {
        RowOp::Reduce { axes, .. } => r.checked_sub(*axes).ok_or("more axes than the rank")?,
        _ => r.checked_sub(1).ok_or("a row op on a scalar")?,
    };
    let xd = t.declared(x_b);
    let od = t.declared(out_b);
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("x", Operand::In(0), t.stored(x_b), false);
    let norm = matches!(op, RowOp::LayerNorm { .. } | RowOp::RmsNorm { .. });
    if norm {
        g.ptr("w", Operand::In(1), t.stored(step.inputs[1]), false);
        g.int("ws", Word::Stride(Operand::In(1), 0));
        if step.inputs.len() > 2 {
            g.ptr("bi", Operand::In(2), t.stored(step.inputs[2]), false);
            g.int("bs", Word::Stride(Operand::In(2), 0));
        }
    }
    g.int("rows", Word::Count(Operand::In(0), 0, outer));
    g.int("width", Word::Count(Operand::In(0), outer, r));
    let osizes: Vec<String> = (0..outer)
        .map(|k| g.word(Word::Size(Operand::In(0), k)))
        .collect();
    let xs: Vec<String> = (0..r)
        .map(|k| g.word(Word::Stride(Operand::In(0), k)))
        .collect();
    let os: Vec<String> = (0..p.buffer(out_b).shape.len())
        .map(|k| g.word(Word::Stride(Operand::Out, k)))
        .collect();
    let rsizes: Vec<String> = (outer..r)
        .map(|k| g.word(Word::Size(Operand::In(0), k)))
        .collect();
    let int = matches!(xd, DType::I64 | DType::I32);
    if matches!(
        op,
        RowOp::Reduce {
            kind: ReduceKind::Max,
            ..
        }
    ) && !int
    {
        let e = g.word(Word::Err);
        let st = g.word(Word::Step);
        let _ = writeln!(
            g.text,
            "  long long* err = (long long*)(unsigned long long){e};"
        );
        let _ = writeln!(g.text, "  const long long step = {st};");
    }
    let mut s = String::new();
    let red_t = if int { "long long" } else { "double" };
    let _ = writeln!(s, "  __shared__ {red_t} red[{BLOCK}];");
    let _ = writeln!(
        s,
        "  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {{"
    );
    // Offsets of the row's start in x and out.
    let base: Vec<(&str, Vec<Option<String>>)> = vec![
        ("xb", xs[..outer].iter().cloned().map(Some).collect()),
        ("ob", (0..outer).map(|k| os.get(k).cloned()).collect()),
    ];
    let _ = writeln!(s, "    long long xb, ob;");
    let _ = writeln!(s, "    {{");
    s.push_str(
        &decompose("row", &osizes, &base, "      ")
            .replace("long long xb = 0;", "xb = 0;")
            .replace("long long ob = 0;", "ob = 0;"),
    );
    let _ = writeln!(s, "    }}");
    // Element j of the row: its offset in x (and in out, for norms/softmax).
    // Opens a loop over the row's elements `j` (this thread's share), with
    // `xo` (and with `with_out`, `oe`) their offsets in the row.
    let open_row = |s: &mut String, with_out: bool| {
        let _ = writeln!(
            s,
            "    for (long long j = threadIdx.x; j < width; j += blockDim.x) {{"
        );
        let mut offs: Vec<(&str, Vec<Option<String>>)> =
            vec![("xo", xs[outer..].iter().cloned().map(Some).collect())];
        if with_out {
            offs.push(("oe", os[outer..].iter().cloned().map(Some).collect()));
        }
        s.push_str(&decompose("j", &rsizes, &offs, "        "));
    };
    let ld = |off: &str| load("x", off, t.stored(x_b), xd);
    match op {
        RowOp::Reduce { kind, .. } => {
            if int {
                let (init, comb, fin) = match kind {
                    ReduceKind::Sum => (
                        "0LL",
                        "acc = kiln_add(acc, v);",
                        "kiln_block_isum(acc, red)",
                    ),
                    ReduceKind::Max => (
                        "(-9223372036854775807LL - 1)",
                        "acc = v > acc ? v : acc;",
                        "kiln_block_imax(acc, red)",
                    ),
                    ReduceKind::Mean => return Err("reduce_mean needs a float input".into()),
                };
                let _ = writeln!(s, "    long long acc = {init};");
                open_row(&mut s, false);
                let _ = writeln!(
                    s,
                    "        {{ const long long v = {}; {comb} }}",
                    ld("xb + xo")
                );
                let _ = writeln!(s, "    }}");
                let _ = writeln!(s, "    const long long total = {fin};");
                let _ = writeln!(
                    s,
                    "    if (threadIdx.x == 0) o[ob] = {};",
                    store_value("total", DType::I64, t.stored(out_b))
                );
            } else {
                let max = *kind == ReduceKind::Max;
                let _ = writeln!(
                    s,
                    "    double acc = {};",
                    if max { "-(double)KILN_INF" } else { "0.0" }
                );
                open_row(&mut s, false);
                let comb = if max {
                    "acc = kiln_max(acc, v);"
                } else {
                    "acc += v;"
                };
                let _ = writeln!(
                    s,
                    "        {{ const double v = (double){}; {comb} }}",
                    ld("xb + xo")
                );
                let _ = writeln!(s, "    }}");
                let fin = if max {
                    "kiln_block_max(acc, red)"
                } else {
                    "kiln_block_sum(acc, red)"
                };
                let _ = writeln!(s, "    double total = {fin};");
                if *kind == ReduceKind::Mean {
                    let _ = writeln!(s, "    total /= (double)width;");
                }
                if max {
                    let _ = writeln!(
                        s,
                        "    if (width == 0 && threadIdx.x == 0) kiln_fail(err, step, 1);"
                    );
                }
                let _ = writeln!(
                    s,
                    "    if (threadIdx.x == 0) o[ob] = {};",
                    store_value(&round_double("total", od), od, t.stored(out_b))
                );
            }
        }
        RowOp::Softmax => {
            let _ = writeln!(s, "    double m = -(double)KILN_INF;");
            open_row(&mut s, false);
            let _ = writeln!(s, "        m = kiln_max(m, (double){});", ld("xb + xo"));
            let _ = writeln!(s, "    }}");
            let _ = writeln!(s, "    m = kiln_block_max(m, red);");
            let _ = writeln!(s, "    double sum = 0.0;");
            open_row(&mut s, false);
            let _ = writeln!(s, "        sum += exp((double){} - m);", ld("xb + xo"));
            let _ = writeln!(s, "    }}");
            let _ = writeln!(s, "    sum = kiln_block_sum(sum, red);");
            let _ = writeln!(s, "    const bool none = (m == -(double)KILN_INF);");
            open_row(&mut s, true);
            let _ = writeln!(
                s,
                "        const double y = none ? 0.0 : exp((double){} - m) / sum;",
                ld("xb + xo")
            );
            let _ = writeln!(
                s,
                "        o[ob + oe] = {};",
                store_value(&round_double("y", od), od, t.stored(out_b))
            );
            let _ = writeln!(s, "    }}");
        }
        RowOp::LayerNorm { eps } | RowOp::RmsNorm { eps } => {
            let layer = matches!(op, RowOp::LayerNorm { .. });
            let eps = double_lit(*eps);
            let _ = writeln!(s, "    double mean = 0.0;");
            if layer {
                open_row(&mut s, false);
                let _ = writeln!(s, "        mean += (double){};", ld("xb + xo"));
                let _ = writeln!(s, "    }}");
                let _ = writeln!(s, "    mean = kiln_block_sum(mean, red) / (double)width;");
            }
            let _ = writeln!(s, "    double var = 0.0;");
            open_row(&mut s, false);
            let _ = writeln!(
                s,
                "        const double d = (double){} - mean; var += d * d;",
                ld("xb + xo")
            );
            let _ = writeln!(s, "    }}");
            let _ = writeln!(s, "    var = kiln_block_sum(var, red) / (double)width;");
            let _ = writeln!(s, "    const double inv = 1.0 / sqrt(var + {eps});");
            open_row(&mut s, true);
            let wd = t.declared(step.inputs[1]);
            let wl = load("w", "j * ws", t.stored(step.inputs[1]), wd);
            let y = if layer {
                let b = if step.inputs.len() > 2 {
                    format!(
                        "(double){}",
                        load(
                            "bi",
                            "j * bs",
                            t.stored(step.inputs[2]),
                            t.declared(step.inputs[2])
                        )
                    )
                } else {
                    "0.0".into()
                };
                format!(
                    "((double){} - mean) * inv * (double){wl} + {b}",
                    ld("xb + xo")
                )
            } else {
                format!("(double){} * inv * (double){wl}", ld("xb + xo"))
            };
            let _ = writeln!(s, "        const double y = {y};");
            let _ = writeln!(
                s,
                "        o[ob + oe] = {};",
                store_value(&round_double("y", od), od, t.stored(out_b))
            );
            let _ = writeln!(s, "    }}");
        }
    }
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// A batched matrix product with its epilogue, tiled in shared memory.
fn gen_gemm(
    t: &Types<'_>,
    step: &crate::lower::Step,
    epilogue: &[KernelOp],
) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let (a_b, b_b, out_b) = (step.inputs[0], step.inputs[1], step.output);
    let r = p.buffer(out_b).shape.len();
    if r < 2 {
        return Err(format!("a matrix product of rank {r}"));
    }
    let batch = r - 2;
    let od = t.declared(out_b);
    let int = matches!(od, DType::I64 | DType::I32);
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("A", Operand::In(0), t.stored(a_b), false);
    g.ptr("B", Operand::In(1), t.stored(b_b), false);
    for i in 2..step.inputs.len() {
        g.ptr(
            &format!("x{i}"),
            Operand::In(i),
            t.stored(step.inputs[i]),
            false,
        );
    }
    g.int("M", Word::Size(Operand::Out, r - 2));
    g.int("N", Word::Size(Operand::Out, r - 1));
    g.int("K", Word::Size(Operand::In(0), r - 1));
    g.int("batch", Word::Count(Operand::Out, 0, batch));
    g.int("am", Word::Stride(Operand::In(0), r - 2));
    g.int("ak", Word::Stride(Operand::In(0), r - 1));
    g.int("bk", Word::Stride(Operand::In(1), r - 2));
    g.int("bn", Word::Stride(Operand::In(1), r - 1));
    g.int("om", Word::Stride(Operand::Out, r - 2));
    g.int("on", Word::Stride(Operand::Out, r - 1));
    for i in 2..step.inputs.len() {
        g.int(&format!("x{i}m"), Word::Stride(Operand::In(i), r - 2));
        g.int(&format!("x{i}n"), Word::Stride(Operand::In(i), r - 1));
    }
    let bsizes: Vec<String> = (0..batch)
        .map(|k| g.word(Word::Size(Operand::Out, k)))
        .collect();
    let mut offs: Vec<(String, Vec<Option<String>>)> = Vec::new();
    for (name, op) in [
        ("ao", Operand::In(0)),
        ("bo", Operand::In(1)),
        ("oo", Operand::Out),
    ] {
        let st = (0..batch)
            .map(|k| Some(g.word(Word::Stride(op, k))))
            .collect();
        offs.push((name.into(), st));
    }
    for i in 2..step.inputs.len() {
        let st = (0..batch)
            .map(|k| Some(g.word(Word::Stride(Operand::In(i), k))))
            .collect();
        offs.push((format!("xo{i}"), st));
    }
    let offs_ref: Vec<(&str, Vec<Option<String>>)> =
        offs.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    let acc_t = if int { "long long" } else { "float" };
    let (tile, depth) = (GEMM_TILE, GEMM_DEPTH);
    let per = tile / 16;
    let mut s = String::new();
    let _ = writeln!(s, "  __shared__ {acc_t} As[{depth}][{}];", tile + 1);
    let _ = writeln!(s, "  __shared__ {acc_t} Bs[{depth}][{}];", tile + 1);
    let _ = writeln!(
        s,
        "  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;"
    );
    let _ = writeln!(s, "  const long long n0 = (long long)blockIdx.x * {tile};");
    let _ = writeln!(
        s,
        "  for (long long z = blockIdx.z; z < batch; z += gridDim.z) {{"
    );
    s.push_str(&decompose("z", &bsizes, &offs_ref, "    "));
    // Row tiles past the grid's y limit loop (uniform per block).
    let _ = writeln!(
        s,
        "    for (long long m0 = (long long)blockIdx.y * {tile}; m0 < M; m0 += (long long)gridDim.y * {tile}) {{"
    );
    let _ = writeln!(s, "    {acc_t} acc[{per}][{per}];");
    let _ = writeln!(
        s,
        "    for (int i = 0; i < {per}; i++) for (int j = 0; j < {per}; j++) acc[i][j] = 0;"
    );
    let _ = writeln!(s, "    for (long long k0 = 0; k0 < K; k0 += {depth}) {{");
    let (ad, bd) = (t.declared(a_b), t.declared(b_b));
    let comp = if int { DType::I64 } else { DType::F32 };
    let la = load(
        "A",
        "ao + (m0 + mm) * am + (k0 + kk) * ak",
        t.stored(a_b),
        ad,
    );
    let lb = load(
        "B",
        "bo + (k0 + kk) * bk + (n0 + nn) * bn",
        t.stored(b_b),
        bd,
    );
    let _ = writeln!(
        s,
        "      for (int e = tid; e < {}; e += 256) {{",
        depth * tile
    );
    let _ = writeln!(s, "        const int kk = e / {tile}, mm = e % {tile};");
    let _ = writeln!(
        s,
        "        As[kk][mm] = (m0 + mm < M && k0 + kk < K) ? ({acc_t}){} : ({acc_t})0;",
        convert(&la, ad, comp)
    );
    let _ = writeln!(s, "      }}");
    let _ = writeln!(
        s,
        "      for (int e = tid; e < {}; e += 256) {{",
        depth * tile
    );
    let _ = writeln!(s, "        const int kk = e / {tile}, nn = e % {tile};");
    let _ = writeln!(
        s,
        "        Bs[kk][nn] = (n0 + nn < N && k0 + kk < K) ? ({acc_t}){} : ({acc_t})0;",
        convert(&lb, bd, comp)
    );
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "      __syncthreads();");
    let _ = writeln!(s, "      for (int kk = 0; kk < {depth}; kk++) {{");
    let _ = writeln!(s, "        {acc_t} ra[{per}], rb[{per}];");
    let _ = writeln!(s, "        for (int i = 0; i < {per}; i++) {{ ra[i] = As[kk][ty + 16 * i]; rb[i] = Bs[kk][tx + 16 * i]; }}");
    if int {
        let _ = writeln!(s, "        for (int i = 0; i < {per}; i++) for (int j = 0; j < {per}; j++) acc[i][j] = kiln_add(acc[i][j], kiln_mul(ra[i], rb[j]));");
    } else {
        let _ = writeln!(s, "        for (int i = 0; i < {per}; i++) for (int j = 0; j < {per}; j++) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);");
    }
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "      __syncthreads();");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(
        s,
        "    for (int i = 0; i < {per}; i++) for (int j = 0; j < {per}; j++) {{"
    );
    let _ = writeln!(
        s,
        "      const long long m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;"
    );
    let _ = writeln!(s, "      if (m < M && n < N) {{");
    let _ = writeln!(
        s,
        "        const {} p0 = {};",
        value_type(od),
        convert("acc[i][j]", comp, od)
    );
    let mut names = vec!["p0".to_string()];
    let mut types = vec![od];
    for i in 2..step.inputs.len() {
        let b = step.inputs[i];
        let d = t.declared(b);
        let _ = writeln!(
            s,
            "        const {} e{i} = {};",
            value_type(d),
            load(
                &format!("x{i}"),
                &format!("xo{i} + m * x{i}m + n * x{i}n"),
                t.stored(b),
                d
            )
        );
        names.push(format!("e{i}"));
        types.push(d);
    }
    let (v, vt) = if epilogue.is_empty() {
        ("p0".to_string(), od)
    } else {
        let needs_err = epilogue
            .iter()
            .any(|k| matches!(k, KernelOp::Binary(BinaryOp::Div, ..)));
        if needs_err {
            let e = g.word(Word::Err);
            let st = g.word(Word::Step);
            let _ = writeln!(s, "        long long* err = (long long*)(unsigned long long){e}; const long long step = {st};");
        }
        body_c(&mut s, epilogue, &mut names, &mut types, "        ")?
    };
    let _ = writeln!(
        s,
        "        o[oo + m * om + n * on] = {};",
        store_value(&convert(&v, vt, od), od, t.stored(out_b))
    );
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "  }}");
    Ok(g.finish(&s))
}

/// Flash-style attention: a block per (query tile, head, batch row), key
/// tiles streamed through shared memory with an online softmax.
fn gen_attention(
    t: &Types<'_>,
    step: &crate::lower::Step,
    causal: bool,
    scale: f64,
    alibi: bool,
    relative: bool,
) -> Result<(String, Vec<Word>), String> {
    let (q_b, k_b, v_b, out_b) = (step.inputs[0], step.inputs[1], step.inputs[2], step.output);
    let extra = alibi || relative;
    let plain = step.inputs.len() - usize::from(extra);
    let mask = (plain > 3).then_some(3usize);
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("q", Operand::In(0), t.stored(q_b), false);
    g.ptr("k", Operand::In(1), t.stored(k_b), false);
    g.ptr("v", Operand::In(2), t.stored(v_b), false);
    for (name, op) in [("B", 0), ("H", 1), ("T", 2), ("DH", 3)] {
        g.int(name, Word::Size(Operand::In(0), op));
    }
    g.int("HK", Word::Size(Operand::In(1), 1));
    g.int("S", Word::Size(Operand::In(1), 2));
    g.int("DV", Word::Size(Operand::In(2), 3));
    for (prefix, op) in [
        ("qs", Operand::In(0)),
        ("ks", Operand::In(1)),
        ("vs", Operand::In(2)),
        ("os", Operand::Out),
    ] {
        for ax in 0..4 {
            g.int(&format!("{prefix}{ax}"), Word::Stride(op, ax));
        }
    }
    if let Some(mi) = mask {
        g.ptr("mk", Operand::In(mi), t.stored(step.inputs[mi]), false);
        for ax in 0..4 {
            g.int(&format!("ms{ax}"), Word::Stride(Operand::In(mi), ax));
        }
    }
    let last = step.inputs.len() - 1;
    if alibi {
        g.ptr("sl", Operand::In(last), t.stored(step.inputs[last]), false);
        g.int("sls", Word::Stride(Operand::In(last), 0));
    }
    if relative {
        g.ptr("tb", Operand::In(last), t.stored(step.inputs[last]), false);
        g.int("tb0", Word::Stride(Operand::In(last), 0));
        g.int("tb1", Word::Stride(Operand::In(last), 1));
        let w = g.word(Word::Buckets);
        let _ = writeln!(
            g.text,
            "  const int* __restrict__ bk = (const int*)(unsigned long long){w};"
        );
    }
    g.int("NS", Word::Splits);
    g.int("CH", Word::Chunk);
    let w = g.word(Word::Scratch);
    let _ = writeln!(
        g.text,
        "  float* __restrict__ scr = (float*)(unsigned long long){w};"
    );
    let (tq, tk) = (ATT_TQ, ATT_TK);
    let ld = |ptr: &str, off: &str, b: BufferId| load(ptr, off, t.stored(b), t.declared(b));
    let mut s = String::new();
    let _ = writeln!(s, "  KILN_SMEM");
    let _ = writeln!(s, "  float* sq = (float*)kiln_smem;");
    let _ = writeln!(s, "  float* sk = sq + {tq} * DH;");
    let _ = writeln!(s, "  float* sv = sk + {tk} * DH;");
    let _ = writeln!(s, "  float* so = sv + {tk} * DV;");
    let _ = writeln!(s, "  float* ss = so + {tq} * DV;");
    let _ = writeln!(s, "  float* smax = ss + {};", tq * tk);
    let _ = writeln!(s, "  float* ssum = smax + {tq};");
    let _ = writeln!(s, "  float* salpha = ssum + {tq};");
    let _ = writeln!(
        s,
        "  const long long b = blockIdx.z, h = blockIdx.y, split = blockIdx.x % NS, t0 = (long long)(blockIdx.x / NS) * {tq};"
    );
    // This block's keys: all of them, or its range of a split.
    let _ = writeln!(
        s,
        "  const long long jb = split * CH, je = jb + CH < S ? jb + CH : S;"
    );
    let _ = writeln!(s, "  const long long kh = h / (H / HK);");
    let _ = writeln!(s, "  const int tid = threadIdx.x, nt = blockDim.x;");
    if alibi {
        let _ = writeln!(
            s,
            "  const float slope = {};",
            ld("sl", "h * sls", step.inputs[last])
        );
    }
    let _ = writeln!(s, "  for (long long e = tid; e < {tq} * DH; e += nt) {{");
    let _ = writeln!(
        s,
        "    const long long qi = e / DH, c = e % DH, tq = t0 + qi;"
    );
    let _ = writeln!(
        s,
        "    sq[e] = tq < T ? {} : 0.0f;",
        ld("q", "b * qs0 + h * qs1 + tq * qs2 + c * qs3", q_b)
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(
        s,
        "  for (long long e = tid; e < {tq} * DV; e += nt) so[e] = 0.0f;"
    );
    let _ = writeln!(
        s,
        "  for (int qi = tid; qi < {tq}; qi += nt) {{ smax[qi] = -KILN_INF; ssum[qi] = 0.0f; }}"
    );
    let _ = writeln!(s, "  __syncthreads();");
    let _ = writeln!(s, "  for (long long j0 = jb; j0 < je; j0 += {tk}) {{");
    if causal {
        let _ = writeln!(s, "    if (j0 > t0 + {} + S - T) break;", tq - 1);
    }
    let _ = writeln!(s, "    for (long long e = tid; e < {tk} * DH; e += nt) {{");
    let _ = writeln!(
        s,
        "      const long long kj = e / DH, c = e % DH, j = j0 + kj;"
    );
    let _ = writeln!(
        s,
        "      sk[e] = j < je ? {} : 0.0f;",
        ld("k", "b * ks0 + kh * ks1 + j * ks2 + c * ks3", k_b)
    );
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    for (long long e = tid; e < {tk} * DV; e += nt) {{");
    let _ = writeln!(
        s,
        "      const long long kj = e / DV, c = e % DV, j = j0 + kj;"
    );
    let _ = writeln!(
        s,
        "      sv[e] = j < je ? {} : 0.0f;",
        ld("v", "b * vs0 + kh * vs1 + j * vs2 + c * vs3", v_b)
    );
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    for (int e = tid; e < {}; e += nt) {{", tq * tk);
    let _ = writeln!(
        s,
        "      const long long qi = e / {tk}, kj = e % {tk}, tq = t0 + qi, j = j0 + kj;"
    );
    let _ = writeln!(s, "      float sc = -KILN_INF;");
    let _ = writeln!(s, "      if (tq < T && j < je) {{");
    let mut vis = String::from("true");
    if causal {
        vis.push_str(" && j <= tq + S - T");
    }
    if let Some(mi) = mask {
        let _ = write!(
            vis,
            " && {}",
            ld(
                "mk",
                "b * ms0 + h * ms1 + tq * ms2 + j * ms3",
                step.inputs[mi]
            )
        );
    }
    let _ = writeln!(s, "        if ({vis}) {{");
    let _ = writeln!(s, "          float dot = 0.0f;");
    let _ = writeln!(s, "          for (long long c = 0; c < DH; c++) dot = fmaf(sq[qi * DH + c], sk[kj * DH + c], dot);");
    let mut score = format!("(float)({} * (double)dot", double_lit(scale));
    if alibi {
        score.push_str(" + (double)slope * (double)j");
    }
    if relative {
        let _ = write!(
            score,
            " + (double){}",
            ld(
                "tb",
                "(long long)bk[j - (tq + S - T) + S - 1] * tb0 + h * tb1",
                step.inputs[last]
            )
        );
    }
    score.push(')');
    let _ = writeln!(s, "          sc = {score};");
    let _ = writeln!(s, "        }}");
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "      ss[e] = sc;");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    for (int qi = tid; qi < {tq}; qi += nt) {{");
    let _ = writeln!(s, "      const float mold = smax[qi];");
    let _ = writeln!(s, "      float m = mold;");
    let _ = writeln!(
        s,
        "      for (int kj = 0; kj < {tk}; kj++) m = kiln_fmaxn(m, ss[qi * {tk} + kj]);"
    );
    let _ = writeln!(
        s,
        "      const float alpha = (m == -KILN_INF || mold == -KILN_INF) ? 0.0f : expf(mold - m);"
    );
    let _ = writeln!(s, "      float l = ssum[qi] * alpha;");
    let _ = writeln!(s, "      for (int kj = 0; kj < {tk}; kj++) {{");
    let _ = writeln!(s, "        const float x = ss[qi * {tk} + kj];");
    let _ = writeln!(
        s,
        "        const float pr = x == -KILN_INF ? 0.0f : expf(x - m);"
    );
    let _ = writeln!(s, "        ss[qi * {tk} + kj] = pr;");
    let _ = writeln!(s, "        l += pr;");
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "      smax[qi] = m; ssum[qi] = l; salpha[qi] = alpha;");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    for (long long e = tid; e < {tq} * DV; e += nt) {{");
    let _ = writeln!(s, "      const long long qi = e / DV, c = e % DV;");
    let _ = writeln!(s, "      float acc = so[e] * salpha[qi];");
    let _ = writeln!(s, "      for (int kj = 0; kj < {tk}; kj++) acc = fmaf(ss[qi * {tk} + kj], sv[kj * DV + c], acc);");
    let _ = writeln!(s, "      so[e] = acc;");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "  }}");
    let od = t.declared(out_b);
    let _ = writeln!(s, "  for (long long e = tid; e < {tq} * DV; e += nt) {{");
    let _ = writeln!(
        s,
        "    const long long qi = e / DV, c = e % DV, tq = t0 + qi;"
    );
    let _ = writeln!(s, "    if (tq < T && NS > 1) {{");
    let _ = writeln!(
        s,
        "      float* part = scr + (((b * H + h) * T + tq) * NS + split) * (DV + 2);"
    );
    let _ = writeln!(
        s,
        "      if (c == 0) {{ part[0] = smax[qi]; part[1] = ssum[qi]; }}"
    );
    let _ = writeln!(s, "      part[2 + c] = so[e];");
    let _ = writeln!(s, "    }} else if (tq < T) {{");
    let _ = writeln!(s, "      const float l = ssum[qi];");
    let _ = writeln!(s, "      const float y = l == 0.0f ? 0.0f : so[e] / l;");
    let _ = writeln!(
        s,
        "      o[b * os0 + h * os1 + tq * os2 + c * os3] = {};",
        store_value(&convert("y", DType::F32, od), od, t.stored(out_b))
    );
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "  }}");
    Ok(g.finish(&s))
}

/// Combines the partial results of an attention step split over the keys:
/// per query row, the ranges' running maxima, sums and unnormalised outputs
/// rescaled to the largest maximum.
fn gen_attention_combine(
    t: &Types<'_>,
    step: &crate::lower::Step,
) -> Result<(String, Vec<Word>), String> {
    let out_b = step.output;
    let od = t.declared(out_b);
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    let w = g.word(Word::Scratch);
    let _ = writeln!(
        g.text,
        "  const float* __restrict__ scr = (const float*)(unsigned long long){w};"
    );
    for (name, ax) in [("B", 0), ("H", 1), ("T", 2), ("DV", 3)] {
        g.int(name, Word::Size(Operand::Out, ax));
    }
    g.int("NS", Word::Splits);
    for ax in 0..4 {
        g.int(&format!("os{ax}"), Word::Stride(Operand::Out, ax));
    }
    let mut s = String::new();
    let _ = writeln!(s, "  const long long n = B * H * T * DV;");
    let _ = writeln!(
        s,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    let _ = writeln!(s, "    const long long c = i % DV, row = i / DV;");
    let _ = writeln!(
        s,
        "    const long long tq = row % T, h = (row / T) % H, b = row / (T * H);"
    );
    let _ = writeln!(s, "    const float* part = scr + row * NS * (DV + 2);");
    let _ = writeln!(s, "    float m = -KILN_INF;");
    let _ = writeln!(
        s,
        "    for (long long k = 0; k < NS; k++) m = kiln_fmaxn(m, part[k * (DV + 2)]);"
    );
    let _ = writeln!(s, "    float l = 0.0f, acc = 0.0f;");
    let _ = writeln!(
        s,
        "    if (m != -KILN_INF) for (long long k = 0; k < NS; k++) {{"
    );
    let _ = writeln!(s, "      const float* pk = part + k * (DV + 2);");
    let _ = writeln!(s, "      if (pk[0] == -KILN_INF) continue;");
    let _ = writeln!(s, "      const float f = expf(pk[0] - m);");
    let _ = writeln!(s, "      l += pk[1] * f;");
    let _ = writeln!(s, "      acc += pk[2 + c] * f;");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    const float y = l == 0.0f ? 0.0f : acc / l;");
    let _ = writeln!(
        s,
        "    o[b * os0 + h * os1 + tq * os2 + c * os3] = {};",
        store_value(&convert("y", DType::F32, od), od, t.stored(out_b))
    );
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// A table lookup by integer ids; an id outside the table records the step.
fn gen_gather(t: &Types<'_>, step: &crate::lower::Step) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let (tb, ids, out_b) = (step.inputs[0], step.inputs[1], step.output);
    let r = p.buffer(out_b).shape.len();
    let lead = p.buffer(ids).shape.len();
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("tb", Operand::In(0), t.stored(tb), false);
    g.ptr("ids", Operand::In(1), t.stored(ids), false);
    let e = g.word(Word::Err);
    let st = g.word(Word::Step);
    let _ = writeln!(
        g.text,
        "  long long* err = (long long*)(unsigned long long){e};"
    );
    let _ = writeln!(g.text, "  const long long step = {st};");
    g.int("n", Word::Count(Operand::Out, 0, r));
    g.int("rows", Word::Size(Operand::In(0), 0));
    g.int("ts0", Word::Stride(Operand::In(0), 0));
    let sizes: Vec<String> = (0..r)
        .map(|k| g.word(Word::Size(Operand::Out, k)))
        .collect();
    let os: Vec<Option<String>> = (0..r)
        .map(|k| Some(g.word(Word::Stride(Operand::Out, k))))
        .collect();
    let is: Vec<Option<String>> = (0..r)
        .map(|k| (k < lead).then(|| g.word(Word::Stride(Operand::In(1), k))))
        .collect();
    let ts: Vec<Option<String>> = (0..r)
        .map(|k| (k >= lead).then(|| g.word(Word::Stride(Operand::In(0), k - lead + 1))))
        .collect();
    let offs = vec![("oo", os), ("io", is), ("to", ts)];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {{"
    );
    s.push_str(&decompose("i", &sizes, &offs, "    "));
    let idd = t.declared(ids);
    let _ = writeln!(
        s,
        "    const long long id = {};",
        convert(&load("ids", "io", t.stored(ids), idd), idd, DType::I64)
    );
    let od = t.declared(out_b);
    let td = t.declared(tb);
    let _ = writeln!(
        s,
        "    if (id < 0 || id >= rows) {{ kiln_fail(err, step, id); continue; }}"
    );
    let _ = writeln!(
        s,
        "    o[oo] = {};",
        store_value(
            &convert(&load("tb", "to + id * ts0", t.stored(tb), td), td, od),
            od,
            t.stored(out_b)
        )
    );
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// Rotary embedding (rotate-half) at integer positions.
fn gen_rope(
    t: &Types<'_>,
    step: &crate::lower::Step,
    theta: f64,
) -> Result<(String, Vec<Word>), String> {
    let p = t.program;
    let (x_b, pos_b, out_b) = (step.inputs[0], step.inputs[1], step.output);
    let r = p.buffer(x_b).shape.len();
    if r == 0 {
        return Err("rope of a scalar".into());
    }
    let mut g = Gen::new();
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("x", Operand::In(0), t.stored(x_b), false);
    g.ptr("ps", Operand::In(1), t.stored(pos_b), false);
    g.int("rows", Word::Count(Operand::In(0), 0, r - 1));
    g.int("dh", Word::Size(Operand::In(0), r - 1));
    g.int("xl", Word::Stride(Operand::In(0), r - 1));
    g.int("ol", Word::Stride(Operand::Out, r - 1));
    let th = g.word(Word::F64(theta));
    let sizes: Vec<String> = (0..r - 1)
        .map(|k| g.word(Word::Size(Operand::In(0), k)))
        .collect();
    let xs: Vec<Option<String>> = (0..r - 1)
        .map(|k| Some(g.word(Word::Stride(Operand::In(0), k))))
        .collect();
    let os: Vec<Option<String>> = (0..r - 1)
        .map(|k| Some(g.word(Word::Stride(Operand::Out, k))))
        .collect();
    let ps: Vec<Option<String>> = (0..r - 1)
        .map(|k| Some(g.word(Word::Stride(Operand::In(1), k))))
        .collect();
    let offs = vec![("xo", xs), ("oo", os), ("po", ps)];
    let xd = t.declared(x_b);
    let od = t.declared(out_b);
    let pd = t.declared(pos_b);
    let mut s = String::new();
    let _ = writeln!(s, "  const long long half = dh / 2;");
    let _ = writeln!(s, "  const double theta = __longlong_as_double({th});");
    let _ = writeln!(
        s,
        "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < rows * half; i += (long long)gridDim.x * blockDim.x) {{"
    );
    let _ = writeln!(s, "    const long long row = i / half, f = i % half;");
    s.push_str(&decompose("row", &sizes, &offs, "    "));
    let _ = writeln!(
        s,
        "    const long long pv = {};",
        convert(&load("ps", "po", t.stored(pos_b), pd), pd, DType::I64)
    );
    let _ = writeln!(
        s,
        "    const double fr = pow(theta, -(2.0 * (double)f) / (double)dh);"
    );
    let _ = writeln!(s, "    const double ang = (double)pv * fr;");
    let _ = writeln!(s, "    const double sn = sin(ang), cs = cos(ang);");
    let _ = writeln!(
        s,
        "    const double lo = (double){};",
        load("x", "xo + f * xl", t.stored(x_b), xd)
    );
    let _ = writeln!(
        s,
        "    const double hi = (double){};",
        load("x", "xo + (f + half) * xl", t.stored(x_b), xd)
    );
    let _ = writeln!(
        s,
        "    o[oo + f * ol] = {};",
        store_value(&round_double("lo * cs - hi * sn", od), od, t.stored(out_b))
    );
    let _ = writeln!(
        s,
        "    o[oo + (f + half) * ol] = {};",
        store_value(&round_double("hi * cs + lo * sn", od), od, t.stored(out_b))
    );
    s.push_str("  }\n");
    Ok(g.finish(&s))
}

/// A generated kernel (its text, with `KNAME` for its name) and its words.
type GenResult = Result<(String, Vec<Word>), String>;

/// The words and declarations the three kernels of a mixture of experts
/// share: the token count, `D`, `E`, `F`, `K` (experts per token), the
/// scratch (`sel` — the chosen experts, `wt` — their weights, `hv` — the
/// hidden rows) and, for each `(name, operand, axis-stride prefix)` in
/// `per_token`, the statements giving its offset for token `tok`.
struct MoeShape {
    g: Gen,
    decompose: String,
}

fn moe_shape(
    t: &Types<'_>,
    step: &crate::lower::Step,
    top_k: usize,
    per_token: &[(&str, Operand)],
) -> Result<MoeShape, String> {
    let p = t.program;
    let x_b = step.inputs[0];
    let r = p.buffer(x_b).shape.len();
    if r == 0 || step.inputs.len() != 5 {
        return Err("moe takes x [.., d] and four weight stacks".into());
    }
    let mut g = Gen::new();
    g.int("tokens", Word::Count(Operand::In(0), 0, r - 1));
    g.int("D", Word::Size(Operand::In(0), r - 1));
    g.int("E", Word::Size(Operand::In(1), 0));
    g.int("F", Word::Size(Operand::In(2), 1));
    let _ = writeln!(g.text, "  const long long K = {top_k};");
    let w = g.word(Word::Scratch);
    let _ = writeln!(
        g.text,
        "  long long* __restrict__ sel = (long long*)(unsigned long long){w};\n  double* __restrict__ wt = (double*)(sel + tokens * K);\n  double* __restrict__ hv = wt + tokens * K;"
    );
    let sizes: Vec<String> = (0..r - 1)
        .map(|k| g.word(Word::Size(Operand::In(0), k)))
        .collect();
    let offs: Vec<(&str, Vec<Option<String>>)> = per_token
        .iter()
        .map(|&(name, op)| {
            let strides = (0..r - 1)
                .map(|k| Some(g.word(Word::Stride(op, k))))
                .collect();
            (name, strides)
        })
        .collect();
    Ok(MoeShape {
        decompose: decompose("tok", &sizes, &offs, "    "),
        g,
    })
}

/// A mixture of SwiGLU experts runs as three kernels through the step's
/// scratch: this one, a block per token, routes it (the shared rule of
/// `crate::routing::route`: router logits in double, softmax, the `K` most
/// probable, renormalised) into `sel` and `wt`; [`gen_moe_hidden`] computes
/// the chosen experts' hidden rows, a block per row; [`gen_moe_down`] their
/// weighted down projections, a block per output element. Every block sums
/// a whole row across its threads, so a decode step's single token still
/// spreads over the GPU.
fn gen_moe(
    t: &Types<'_>,
    step: &crate::lower::Step,
    top_k: usize,
) -> Result<(String, Vec<Word>), String> {
    let x_b = step.inputs[0];
    let r = t.program.buffer(x_b).shape.len();
    let MoeShape { mut g, decompose } = moe_shape(t, step, top_k, &[("xo", Operand::In(0))])?;
    g.ptr("x", Operand::In(0), t.stored(x_b), false);
    g.ptr("rt", Operand::In(1), t.stored(step.inputs[1]), false);
    g.int("xl", Word::Stride(Operand::In(0), r - 1));
    g.int("r0", Word::Stride(Operand::In(1), 0));
    g.int("r1", Word::Stride(Operand::In(1), 1));
    let ld = |ptr: &str, off: &str, i: usize| {
        let b = step.inputs[i];
        format!("(double){}", load(ptr, off, t.stored(b), t.declared(b)))
    };
    let body = format!(
        r#"  KILN_SMEM
  double* lg = (double*)kiln_smem;
  for (long long tok = blockIdx.x; tok < tokens; tok += gridDim.x) {{
{decompose}    for (long long e = threadIdx.x; e < E; e += blockDim.x) {{
      double acc = 0.0;
      for (long long c = 0; c < D; c++) acc += {router} * {x};
      lg[e] = acc;
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
      long long* s = sel + tok * K;
      double* w = wt + tok * K;
      bool nan = false;
      double mx = -(double)KILN_INF;
      for (long long e = 0; e < E; e++) {{ if (kiln_nan(lg[e])) nan = true; else if (lg[e] > mx) mx = lg[e]; }}
      const long long kk = K < E ? K : E;
      if (nan) {{
        for (long long k = 0; k < K; k++) {{ s[k] = k < kk ? k : -1; w[k] = (double)__int_as_float(0x7fc00000); }}
      }} else {{
        double total = 0.0;
        for (long long e = 0; e < E; e++) {{ lg[e] = exp(lg[e] - mx); total += lg[e]; }}
        double chosen = 0.0;
        for (long long k = 0; k < K; k++) {{
          long long best = -1;
          if (k < kk) for (long long e = 0; e < E; e++) {{
            bool used = false;
            for (long long q = 0; q < k; q++) used = used || s[q] == e;
            if (!used && (best < 0 || lg[e] > lg[best])) best = e;
          }}
          s[k] = best;
          if (best >= 0) chosen += lg[best] / total;
        }}
        for (long long k = 0; k < K; k++) w[k] = s[k] >= 0 ? lg[s[k]] / total / chosen : 0.0;
      }}
    }}
    __syncthreads();
  }}
"#,
        router = ld("rt", "e * r0 + c * r1", 1),
        x = ld("x", "xo + c * xl", 0),
    );
    Ok(g.finish(&body))
}

/// The hidden rows of a mixture of experts: block `(i, k, token)` computes
/// `silu(gate[e, i] · x) · (up[e, i] · x)` for the token's k-th expert `e`,
/// its threads summing the dot products over `D` in double.
fn gen_moe_hidden(t: &Types<'_>, step: &crate::lower::Step, top_k: usize) -> GenResult {
    let x_b = step.inputs[0];
    let r = t.program.buffer(x_b).shape.len();
    let MoeShape { mut g, decompose } = moe_shape(t, step, top_k, &[("xo", Operand::In(0))])?;
    g.ptr("x", Operand::In(0), t.stored(x_b), false);
    g.ptr("gt", Operand::In(2), t.stored(step.inputs[2]), false);
    g.ptr("up", Operand::In(3), t.stored(step.inputs[3]), false);
    g.int("xl", Word::Stride(Operand::In(0), r - 1));
    for (n, i) in [("g", 2usize), ("u", 3)] {
        for ax in 0..3 {
            g.int(&format!("{n}{ax}"), Word::Stride(Operand::In(i), ax));
        }
    }
    let ld = |ptr: &str, off: &str, i: usize| {
        let b = step.inputs[i];
        format!("(double){}", load(ptr, off, t.stored(b), t.declared(b)))
    };
    let body = format!(
        r#"  KILN_SMEM
  double* red = (double*)kiln_smem;
  const long long k = blockIdx.y;
  for (long long tok = blockIdx.z; tok < tokens; tok += gridDim.z) {{
{decompose}    const long long ex = sel[tok * K + k];
    if (ex < 0) continue;
    for (long long i = blockIdx.x; i < F; i += gridDim.x) {{
      double gs = 0.0, us = 0.0;
      for (long long c = threadIdx.x; c < D; c += blockDim.x) {{
        const double xv = {x};
        gs += {gate} * xv;
        us += {up} * xv;
      }}
      gs = kiln_block_sum(gs, red);
      us = kiln_block_sum(us, red);
      if (threadIdx.x == 0) hv[(tok * K + k) * F + i] = gs / (1.0 + exp(-gs)) * us;
    }}
  }}
"#,
        x = ld("x", "xo + c * xl", 0),
        gate = ld("gt", "ex * g0 + i * g1 + c * g2", 2),
        up = ld("up", "ex * u0 + i * u1 + c * u2", 3),
    );
    Ok(g.finish(&body))
}

/// The output of a mixture of experts: block `(c, token)` sums, for each
/// of the token's experts in routing order, `down[e, c] · hidden` across its
/// threads, weighted by the expert's routing weight.
fn gen_moe_down(t: &Types<'_>, step: &crate::lower::Step, top_k: usize) -> GenResult {
    let out_b = step.output;
    let r = t.program.buffer(step.inputs[0]).shape.len();
    let MoeShape { mut g, decompose } = moe_shape(t, step, top_k, &[("oo", Operand::Out)])?;
    g.ptr("o", Operand::Out, t.stored(out_b), true);
    g.ptr("dn", Operand::In(4), t.stored(step.inputs[4]), false);
    g.int("ol", Word::Stride(Operand::Out, r - 1));
    for ax in 0..3 {
        g.int(&format!("d{ax}"), Word::Stride(Operand::In(4), ax));
    }
    let b = step.inputs[4];
    let down = format!(
        "(double){}",
        load(
            "dn",
            "ex * d0 + c * d1 + i * d2",
            t.stored(b),
            t.declared(b)
        )
    );
    let od = t.declared(out_b);
    let store = store_value(&round_double("y", od), od, t.stored(out_b));
    let body = format!(
        r#"  KILN_SMEM
  double* red = (double*)kiln_smem;
  for (long long tok = blockIdx.y; tok < tokens; tok += gridDim.y) {{
{decompose}    for (long long c = blockIdx.x; c < D; c += gridDim.x) {{
      double y = 0.0;
      for (long long k = 0; k < K; k++) {{
        const long long ex = sel[tok * K + k];
        if (ex < 0) continue;
        const double* h = hv + (tok * K + k) * F;
        double acc = 0.0;
        for (long long i = threadIdx.x; i < F; i += blockDim.x) acc += {down} * h[i];
        acc = kiln_block_sum(acc, red);
        y += wt[tok * K + k] * acc;
      }}
      if (threadIdx.x == 0) o[oo + c * ol] = {store};
    }}
  }}
"#
    );
    Ok(g.finish(&body))
}

/// The CUDA C of every step of `program`; `storage` is the dtype each root
/// buffer really holds (a 16-bit weight bound to an f32 parameter).
pub fn generate(program: &Program, storage: &[DType]) -> Result<ModuleSource, String> {
    let t = Types { program, storage };
    let mut kernels: Vec<(String, usize)> = Vec::new();
    let mut bodies: Vec<String> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut steps = Vec::with_capacity(program.steps.len());
    for (si, step) in program.steps.iter().enumerate() {
        let out_rank = program.buffer(step.output).shape.len();
        let (text, words) = match &step.kernel {
            Kernel::Loop { body } => gen_loop(&t, step, body),
            Kernel::Copy => gen_loop(&t, step, &[]),
            Kernel::Fill(f) => gen_fill(&t, step, f),
            Kernel::Row(op) => gen_row(&t, step, op),
            Kernel::Gemm { epilogue } => gen_gemm(&t, step, epilogue),
            Kernel::Attention {
                causal,
                scale,
                alibi,
                relative,
            } => gen_attention(&t, step, *causal, *scale, *alibi, relative.is_some()),
            Kernel::Gather => gen_gather(&t, step),
            Kernel::Rope { theta } => gen_rope(&t, step, *theta),
            Kernel::Moe { top_k } => gen_moe(&t, step, *top_k),
        }
        .map_err(|e| format!("s{si} {} ({}): {e}", step.kernel.kind_name(), step.origin))?;
        let grid = match &step.kernel {
            Kernel::Loop { .. } | Kernel::Copy | Kernel::Fill(_) | Kernel::Gather => {
                Grid::Elements(Operand::Out, out_rank)
            }
            Kernel::Rope { .. } => Grid::Elements(Operand::Out, out_rank),
            Kernel::Row(op) => {
                let r = program.buffer(step.inputs[0]).shape.len();
                let outer = match op {
                    RowOp::Reduce { axes, .. } => r - axes,
                    _ => r - 1,
                };
                Grid::Rows(Operand::In(0), 0, outer)
            }
            Kernel::Gemm { .. } => Grid::Gemm,
            Kernel::Attention { .. } => Grid::Attention,
            Kernel::Moe { .. } => Grid::Moe,
        };
        let mut add = |text: String, n: usize| match seen.get(&text) {
            Some(&k) => k,
            None => {
                let k = kernels.len();
                let name = format!("kiln_k{k}");
                bodies.push(text.replace("KNAME", &name));
                kernels.push((name, n));
                seen.insert(text, k);
                k
            }
        };
        let kernel = add(text, words.len().max(1));
        let epilogue = match &step.kernel {
            Kernel::Gemm { epilogue } if !epilogue.is_empty() => {
                let (text, words) = gen_epilogue(&t, step, epilogue)
                    .map_err(|e| format!("s{si} gemm epilogue ({}): {e}", step.origin))?;
                Some((add(text, words.len().max(1)), words))
            }
            Kernel::Attention { .. } => {
                let (text, words) = gen_attention_combine(&t, step)
                    .map_err(|e| format!("s{si} attention combine ({}): {e}", step.origin))?;
                Some((add(text, words.len().max(1)), words))
            }
            _ => None,
        };
        let mut then = Vec::new();
        if let Kernel::Moe { top_k } = &step.kernel {
            type Gen3 = fn(&Types<'_>, &crate::lower::Step, usize) -> GenResult;
            let parts: [(&str, Gen3, Grid); 2] = [
                ("hidden", gen_moe_hidden, Grid::MoeHidden { top_k: *top_k }),
                ("down", gen_moe_down, Grid::MoeDown),
            ];
            for (which, gen, grid) in parts {
                let (text, words) = gen(&t, step, *top_k)
                    .map_err(|e| format!("s{si} moe {which} ({}): {e}", step.origin))?;
                then.push((add(text, words.len().max(1)), words, grid));
            }
        }
        steps.push(StepKernel {
            kernel,
            words,
            grid,
            epilogue,
            then,
        });
    }
    let mut source = String::from(PRELUDE);
    for b in bodies {
        source.push('\n');
        source.push_str(&b);
    }
    Ok(ModuleSource {
        source,
        kernels,
        steps,
    })
}

/// The host build of `m` for the emulator: the emulator prelude, the module,
/// and one `extern "C"` launcher per kernel.
pub fn emulator_source(m: &ModuleSource) -> String {
    let mut s = String::from(EMU_PRELUDE);
    s.push_str(&m.source);
    for (name, n) in &m.kernels {
        let _ = writeln!(
            s,
            "static void {name}_body(const void* a) {{ {name}((const KArgs<{n}>*)a); }}\n\
             extern \"C\" void {name}_launch(const unsigned* dims, unsigned smem, const long long* words) {{\n\
             \x20 kiln_emu_launch(dims, smem, {name}_body, words);\n\
             }}"
        );
    }
    s
}

/// The GPU build of `m` (for NVRTC).
pub fn cuda_source(m: &ModuleSource) -> String {
    format!("{CUDA_PRELUDE}{}", m.source)
}

//! Fused elementwise bodies of f32 values as AVX-512 code, for the
//! epilogues of packed matrix products (bias, activation, residual, the
//! SwiGLU gate): the Cranelift loop kernel emits 128-bit vectors only, and
//! on BERT-base its GELU epilogue took 4% of a forward and a prefill's
//! `silu(gate)·up` 5%.
//!
//! A body is checked once ([`VecBody::new`]): f32 operands and output, and
//! only the instructions below, each computed as the generated code computes
//! it (the same polynomials, clamps and order of operations, `fma` where
//! the generated code fuses), so both paths agree to an ulp or two. Anything
//! else (integer or boolean values, `where`, casts, comparisons, `max`,
//! `min`, `pow`, `log`) keeps the generated kernel. A row runs in strips of
//! 64 lanes: each instruction over the strip's four vectors, then the next,
//! so one dispatch serves 64 elements; the tail is masked.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use kiln_ir::{BinaryOp, DType, KernelOp, UnaryOp};

#[cfg(target_arch = "x86_64")]
use super::jit::emit::{ERF_LIMIT, ERF_P, ERF_Q, TANH_P};

/// Values of a body (operands and instructions) this module runs at most.
const MAX_VALUES: usize = 16;
/// Vectors per strip.
const STRIP: usize = 4;
/// Rows whose operands are fetched ahead.
const PREFETCH_ROWS: usize = 1;

/// One instruction, its arguments indexing the body's values.
#[derive(Clone, Copy, Debug)]
enum Ins {
    Unary(UnaryOp, usize),
    Binary(BinaryOp, usize, usize),
    Const(f32),
}

/// A body this module runs (see the module documentation).
#[derive(Debug)]
pub(crate) struct VecBody {
    operands: usize,
    ins: Vec<Ins>,
}

impl VecBody {
    /// The body over `operands` f32 operands (declared and stored) with an
    /// f32 output, or `None` when it has anything this module does not run
    /// or the host has no AVX-512F.
    pub(crate) fn new(
        body: &[KernelOp],
        declared: &[DType],
        stored: &[DType],
        out: DType,
    ) -> Option<VecBody> {
        if !super::packed::available() || out != DType::F32 {
            return None;
        }
        let operands = declared.len();
        if stored.len() != operands
            || declared.iter().chain(stored).any(|&d| d != DType::F32)
            || operands + body.len() > MAX_VALUES
            || body.is_empty() && operands != 1
        {
            return None;
        }
        let mut ins = Vec::with_capacity(body.len());
        for (i, op) in body.iter().enumerate() {
            let defined = operands + i;
            let arg = |a: usize| (a < defined).then_some(a);
            ins.push(match *op {
                KernelOp::Const(v, DType::F32) => Ins::Const(v as f32),
                KernelOp::Unary(u, a) => {
                    let ok = matches!(
                        u,
                        UnaryOp::Neg
                            | UnaryOp::Exp
                            | UnaryOp::Sqrt
                            | UnaryOp::Rsqrt
                            | UnaryOp::Tanh
                            | UnaryOp::Sigmoid
                            | UnaryOp::Abs
                            | UnaryOp::Recip
                            | UnaryOp::Erf
                            | UnaryOp::Gelu
                            | UnaryOp::GeluTanh
                            | UnaryOp::Silu
                            | UnaryOp::Relu
                    );
                    if !ok {
                        return None;
                    }
                    Ins::Unary(u, arg(a)?)
                }
                KernelOp::Binary(b, x, y) => {
                    if !matches!(
                        b,
                        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div
                    ) {
                        return None;
                    }
                    Ins::Binary(b, arg(x)?, arg(y)?)
                }
                _ => return None,
            });
        }
        Some(VecBody { operands, ins })
    }

    /// Runs the body over `cols` elements of each of `rows` rows: row
    /// `r`'s operand `i` at `ptrs[i]` once `row(r, ptrs)` has set them, its
    /// elements `inner[i]` apart (0: one value for the row, 1: contiguous;
    /// others are not run here and return `false` before any row), the
    /// result stored to `ptrs[operands]` (contiguous).
    ///
    /// # Safety
    /// Each operand holds its `cols` elements (one when `inner` is 0) from
    /// its pointer for every row, and the output `cols`; the output may be
    /// an operand (elementwise, in place).
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn run(
        &self,
        rows: usize,
        row: impl Fn(usize, &mut [*mut u8; 8]),
        inner: &[i64],
        cols: usize,
    ) -> bool {
        let n = self.operands;
        if n >= 8
            || inner.len() <= n
            || inner[n] != 1 && cols > 1
            || inner[..n].iter().any(|&s| s != 0 && s != 1)
        {
            return false;
        }
        // SAFETY: forwarded; AVX-512F was checked in `new`.
        unsafe {
            // A micro-tile's rows are two vectors.
            if cols <= 32 {
                self.strips::<2>(rows, &row, inner, cols);
            } else {
                self.strips::<STRIP>(rows, &row, inner, cols);
            }
        }
        true
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn strips<const S: usize>(
        &self,
        rows: usize,
        row: &impl Fn(usize, &mut [*mut u8; 8]),
        inner: &[i64],
        cols: usize,
    ) {
        let n = self.operands;
        let mut vals = [[_mm512_setzero_ps(); S]; MAX_VALUES];
        for (t, ins) in self.ins.iter().enumerate() {
            if let Ins::Const(c) = *ins {
                vals[n + t] = [_mm512_set1_ps(c); S];
            }
        }
        // The last instruction's value (a body without any copies its
        // operand).
        let last = if self.ins.is_empty() {
            0
        } else {
            n + self.ins.len() - 1
        };
        let mut ptrs = [std::ptr::null_mut::<u8>(); 8];
        let mut ahead = [std::ptr::null_mut::<u8>(); 8];
        let fetch = |r: usize, ahead: &mut [*mut u8; 8]| {
            row(r, ahead);
            for i in 0..n {
                if inner[i] == 1 {
                    let p = ahead[i].cast_const();
                    for line in (0..cols * 4).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast());
                    }
                }
            }
        };
        for r in 0..rows.min(PREFETCH_ROWS) {
            fetch(r, &mut ahead);
        }
        for r in 0..rows {
            // Rows ahead into L1 while this one runs: a strip's
            // instructions fill the reorder window, so its loads would
            // otherwise wait for memory one strip at a time (a residual
            // comes from L3).
            if r + PREFETCH_ROWS < rows {
                fetch(r + PREFETCH_ROWS, &mut ahead);
            }
            row(r, &mut ptrs);
            // Operands of one value per row.
            for i in 0..n {
                if inner[i] == 0 {
                    // SAFETY: the operand holds one element (the caller's
                    // promise).
                    vals[i] = [_mm512_set1_ps(unsafe { *ptrs[i].cast::<f32>() }); S];
                }
            }
            let out = ptrs[n].cast::<f32>();
            let mut j = 0;
            while j < cols {
                let masks: [u16; S] = std::array::from_fn(|v| lanes(cols - j, v));
                for i in 0..n {
                    if inner[i] == 1 {
                        let p = ptrs[i].cast::<f32>().cast_const();
                        for (v, &k) in masks.iter().enumerate() {
                            // SAFETY: masked to the operand's cols elements.
                            vals[i][v] = unsafe { _mm512_maskz_loadu_ps(k, p.add(j + 16 * v)) };
                        }
                    }
                }
                for (t, ins) in self.ins.iter().enumerate() {
                    let r = n + t;
                    match *ins {
                        Ins::Const(_) => {}
                        Ins::Unary(u, a) => {
                            let x = vals[a];
                            vals[r] = std::array::from_fn(|v| unary(u, x[v]));
                        }
                        Ins::Binary(b, x, y) => {
                            let (p, q) = (vals[x], vals[y]);
                            vals[r] = std::array::from_fn(|v| match b {
                                BinaryOp::Add => _mm512_add_ps(p[v], q[v]),
                                BinaryOp::Sub => _mm512_sub_ps(p[v], q[v]),
                                BinaryOp::Mul => _mm512_mul_ps(p[v], q[v]),
                                _ => _mm512_div_ps(p[v], q[v]),
                            });
                        }
                    }
                }
                for (v, &k) in masks.iter().enumerate() {
                    // SAFETY: masked to the output's cols elements.
                    unsafe { _mm512_mask_storeu_ps(out.add(j + 16 * v), k, vals[last][v]) };
                }
                j += 16 * S;
            }
        }
    }
}

/// The lanes of vector `v` of a strip with `left` elements to go.
#[cfg(target_arch = "x86_64")]
fn lanes(left: usize, v: usize) -> u16 {
    super::softmax::lanes(left.saturating_sub(16 * v))
}

/// `v` clamped to `[lo, hi]` by compare and blend (NaN passes through), as
/// the generated code's `clamp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn clamp(v: __m512, lo: f32, hi: f32) -> __m512 {
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, hi), v, hi);
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, lo), v, lo)
}

/// Horner's rule with fused multiply-adds (highest degree first).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn poly(x: __m512, coeffs: &[f32]) -> __m512 {
    let mut acc = _mm512_set1_ps(coeffs[0]);
    for &c in &coeffs[1..] {
        acc = _mm512_fmadd_ps(acc, x, _mm512_set1_ps(c));
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    super::softmax::exp(x)
}

/// `1 / (1 + exp(-x))`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sigmoid(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    _mm512_div_ps(one, _mm512_add_ps(one, exp(neg(x))))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn neg(x: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ))
}

/// As the generated `tanh`: an odd polynomial below 0.625, else
/// `1 - 2/(exp(2|x|) + 1)` with the sign of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn tanh(x: __m512) -> __m512 {
    let z = _mm512_mul_ps(x, x);
    let p = poly(z, &TANH_P);
    let small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    let a = _mm512_abs_ps(x);
    let two = _mm512_set1_ps(2.0);
    let e = exp(_mm512_mul_ps(a, two));
    let q = _mm512_div_ps(two, _mm512_add_ps(e, _mm512_set1_ps(1.0)));
    let big = _mm512_sub_ps(_mm512_set1_ps(1.0), q);
    let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
    let big = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(big), sign));
    let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(0.625));
    _mm512_mask_blend_ps(is_small, big, small)
}

/// As the generated `erf`: `x·P(x²)/Q(x²)` on `x` clamped to `[-4, 4]`,
/// the result clamped to `[-1, 1]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn erf(x: __m512) -> __m512 {
    let xc = clamp(x, -ERF_LIMIT, ERF_LIMIT);
    let z = _mm512_mul_ps(xc, xc);
    let r = _mm512_div_ps(_mm512_mul_ps(xc, poly(z, &ERF_P)), poly(z, &ERF_Q));
    clamp(r, -1.0, 1.0)
}

/// One unary instruction, as the generated code computes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn unary(u: UnaryOp, x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let half = _mm512_set1_ps(0.5);
    match u {
        UnaryOp::Neg => neg(x),
        UnaryOp::Exp => exp(x),
        UnaryOp::Sqrt => _mm512_sqrt_ps(x),
        UnaryOp::Rsqrt => _mm512_div_ps(one, _mm512_sqrt_ps(x)),
        UnaryOp::Tanh => tanh(x),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Abs => _mm512_abs_ps(x),
        UnaryOp::Recip => _mm512_div_ps(one, x),
        UnaryOp::Erf => erf(x),
        UnaryOp::Gelu => {
            let r = erf(_mm512_mul_ps(
                x,
                _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
            ));
            _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, r))
        }
        UnaryOp::GeluTanh => {
            let c = _mm512_set1_ps((2.0f64 / std::f64::consts::PI).sqrt() as f32);
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let inner = _mm512_fmadd_ps(_mm512_set1_ps(0.044_715), x3, x);
            let th = tanh(_mm512_mul_ps(c, inner));
            _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, th))
        }
        UnaryOp::Silu => _mm512_mul_ps(x, sigmoid(x)),
        UnaryOp::Relu => {
            let z = _mm512_setzero_ps();
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, z), x, z)
        }
        // Not admitted by `new`.
        UnaryOp::Log | UnaryOp::Not => x,
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::cpu::jit::kernels::{loop_kernel, LoopSpec, Step};
    use crate::cpu::jit::tests::{inputs, oracle, UNARY_BOUNDS};

    /// The body on `n` elements through [`VecBody`], one row, operands
    /// contiguous except those `bcast` marks (one value).
    fn run_vec(body: &[KernelOp], ins: &[&[f32]], bcast: &[bool], n: usize) -> Vec<f32> {
        let k = ins.len();
        let v = VecBody::new(body, &vec![DType::F32; k], &vec![DType::F32; k], DType::F32)
            .expect("covered");
        let mut out = vec![0f32; n];
        let mut inner: Vec<i64> = bcast.iter().map(|&b| i64::from(!b)).collect();
        inner.push(1);
        let base: Vec<*mut u8> = ins
            .iter()
            .map(|s| s.as_ptr().cast_mut().cast())
            .chain(std::iter::once(out.as_mut_ptr().cast()))
            .collect();
        let row = |_: usize, p: &mut [*mut u8; 8]| p[..base.len()].copy_from_slice(&base);
        // SAFETY: every operand holds n elements (or one, broadcast).
        assert!(unsafe { v.run(1, row, &inner, n) });
        out
    }

    /// The same through the Cranelift loop kernel.
    fn run_jit(body: &[KernelOp], ins: &[&[f32]], bcast: &[bool], n: usize) -> Vec<f32> {
        let k = ins.len();
        let mut steps: Vec<Step> = bcast
            .iter()
            .map(|&b| if b { Step::Bcast } else { Step::Contig })
            .collect();
        steps.push(Step::Contig);
        let spec = LoopSpec {
            body,
            declared: vec![DType::F32; k],
            stored: vec![DType::F32; k],
            out: DType::F32,
            steps,
        };
        let f = loop_kernel(&spec).expect("jit").expect("covered");
        let mut out = vec![0f32; n];
        let mut ptrs: Vec<*mut u8> = ins.iter().map(|s| s.as_ptr().cast_mut().cast()).collect();
        ptrs.push(out.as_mut_ptr().cast());
        let mut inner: Vec<i64> = bcast.iter().map(|&b| i64::from(!b)).collect();
        inner.push(1);
        // SAFETY: as above.
        assert_eq!(unsafe { f(ptrs.as_ptr(), inner.as_ptr(), n as i64) }, 0);
        out
    }

    #[allow(clippy::too_many_arguments)]
    /// Both paths within `ulps` of each other (NaN and infinities equal)
    /// and the interpreter's value within `rel·|want| + abs`.
    fn agree(name: &str, x: f32, got: f32, jit: f32, want: f32, ulps: u32, rel: f32, abs: f32) {
        let same = if jit.is_nan() {
            got.is_nan()
        } else if jit.is_infinite() || jit == 0.0 {
            got == jit
        } else {
            (got.to_bits() as i64 - jit.to_bits() as i64).unsigned_abs() <= u64::from(ulps)
        };
        assert!(same, "{name}({x:e}): AVX-512 {got:e}, generated {jit:e}");
        let close = if want.is_nan() {
            got.is_nan()
        } else if want.is_infinite() {
            got == want
        } else {
            (got - want).abs() <= rel * want.abs() + abs
        };
        assert!(
            close,
            "{name}({x:e}) = {got:e}, the interpreter gives {want:e}"
        );
    }

    #[test]
    fn unary_instructions_match_the_generated_code_and_the_interpreter() {
        if !super::super::packed::available() {
            return;
        }
        let x = inputs();
        // The interpreter's bounds of the generated kernels' own test.
        for &(u, rel, abs) in UNARY_BOUNDS.iter().filter(|c| c.0 != UnaryOp::Log) {
            let body = [KernelOp::Unary(u, 0)];
            let got = run_vec(&body, &[&x], &[false], x.len());
            let jit = run_jit(&body, &[&x], &[false], x.len());
            for i in 0..x.len() {
                let want = oracle(&body, &[x[i]]);
                // exp scales by 2ⁿ with `vscalef` here and by a built
                // power of two there: the same but for results near f32's
                // smallest normals, which both flush or round alike.
                agree(u.name(), x[i], got[i], jit[i], want, 1, rel, abs);
            }
        }
    }

    #[test]
    fn fused_bodies_match_at_every_tail_with_broadcast_operands() {
        if !super::super::packed::available() {
            return;
        }
        let bodies: Vec<Vec<KernelOp>> = vec![
            // SwiGLU: silu(gate)·up.
            vec![
                KernelOp::Unary(UnaryOp::Silu, 0),
                KernelOp::Binary(BinaryOp::Mul, 3, 1),
            ],
            // Bias, then GELU.
            vec![
                KernelOp::Binary(BinaryOp::Add, 0, 1),
                KernelOp::Unary(UnaryOp::Gelu, 3),
            ],
            // Bias and residual, with a constant scale and a division.
            vec![
                KernelOp::Binary(BinaryOp::Add, 0, 1),
                KernelOp::Const(0.5, DType::F32),
                KernelOp::Binary(BinaryOp::Mul, 3, 4),
                KernelOp::Binary(BinaryOp::Div, 5, 2),
                KernelOp::Binary(BinaryOp::Sub, 6, 1),
            ],
        ];
        let x = inputs();
        let y: Vec<f32> = x.iter().rev().map(|v| v * 0.75 + 0.1).collect();
        let z: Vec<f32> = x.iter().map(|v| v.abs() + 0.5).collect();
        for body in &bodies {
            for bcast in [
                [false, false, false],
                [false, true, false],
                [true, false, true],
            ] {
                for n in (0..=70).chain([x.len()]) {
                    let ins: [&[f32]; 3] = [&x[..], &y[..], &z[..]];
                    let got = run_vec(body, &ins, &bcast, n);
                    let jit = run_jit(body, &ins, &bcast, n);
                    for i in 0..n {
                        let at = |s: &[f32], b: bool| if b { s[0] } else { s[i] };
                        let xs = [at(&x, bcast[0]), at(&y, bcast[1]), at(&z, bcast[2])];
                        let want = oracle(body, &xs);
                        agree("body", xs[0], got[i], jit[i], want, 2, 2e-6, 2e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn bodies_it_does_not_run_keep_the_generated_kernel() {
        let f = [DType::F32, DType::F32];
        for body in [
            vec![KernelOp::Unary(UnaryOp::Log, 0)],
            vec![KernelOp::Binary(BinaryOp::Max, 0, 1)],
            vec![KernelOp::Binary(BinaryOp::Gt, 0, 1)],
            vec![KernelOp::Cast(DType::F32, 0)],
            // An argument not yet defined.
            vec![KernelOp::Unary(UnaryOp::Exp, 3)],
        ] {
            assert!(
                VecBody::new(&body, &f, &f, DType::F32).is_none(),
                "{body:?}"
            );
        }
        let body = [KernelOp::Binary(BinaryOp::Add, 0, 1)];
        assert!(VecBody::new(&body, &f, &[DType::F32, DType::BF16], DType::F32).is_none());
        assert!(VecBody::new(&body, &f, &f, DType::F16).is_none());
        if super::super::packed::available() {
            let v = VecBody::new(&body, &f, &f, DType::F32).expect("covered");
            let row = |_: usize, _: &mut [*mut u8; 8]| {};
            // A strided operand is left to the generated kernel.
            // SAFETY: refused before any row is touched.
            assert!(!unsafe { v.run(1, row, &[2, 1, 1], 8) });
        }
    }
}

//! The generated kernels against the interpreter's scalar definitions, op
//! by op, in both the vector and the scalar form, special values included.

use kiln_ir::{BinaryOp, DType, KernelOp, UnaryOp};

use super::kernels::{loop_kernel, LoopSpec, Step};
use crate::reference::scalar::{body_dtypes, run_body, Scalar};

/// Runs `body` over `n` elements of contiguous f32 operands.
fn run_f32(body: &[KernelOp], ins: &[Vec<f32>], steps: Vec<Step>) -> Vec<f32> {
    let n = ins[0].len();
    let spec = LoopSpec {
        body,
        declared: vec![DType::F32; ins.len()],
        stored: vec![DType::F32; ins.len()],
        out: DType::F32,
        steps,
    };
    let f = loop_kernel(&spec).expect("jit").expect("covered");
    let mut out = vec![0f32; n];
    let mut ptrs: Vec<*mut u8> = ins.iter().map(|v| v.as_ptr().cast_mut().cast()).collect();
    ptrs.push(out.as_mut_ptr().cast());
    let strides = vec![1i64; ptrs.len()];
    // SAFETY: every operand holds n elements.
    let code = unsafe { f(ptrs.as_ptr(), strides.as_ptr(), n as i64) };
    assert_eq!(code, 0);
    out
}

/// The interpreter's value of `body` on one element.
pub(crate) fn oracle(body: &[KernelOp], xs: &[f32]) -> f32 {
    let dtypes = body_dtypes(body, &vec![DType::F32; xs.len()]);
    let mut vals: Vec<Scalar> = xs.iter().map(|&x| Scalar::Float(x as f64)).collect();
    match run_body(body, &dtypes, &mut vals).expect("body") {
        Scalar::Float(v) => v as f32,
        other => panic!("{other:?}"),
    }
}

pub(crate) fn inputs() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        1e-7,
        f32::MIN_POSITIVE,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        88.0,
        88.72,
        89.0,
        -86.0,
        -87.0,
        -104.0,
        1e30,
        -1e30,
        0.5,
        -0.5,
        0.625,
        -0.625,
    ];
    // A dense sweep over the range activations live in, then a sparse one.
    for i in -4000..=4000 {
        v.push(i as f32 * 0.0025);
    }
    for i in -300..=300 {
        v.push(i as f32 * 0.31);
    }
    v
}

/// Compares `got` with `want`: identical NaN-ness and infinities, and
/// `|got - want| <= rel·|want| + abs`.
fn check(name: &str, x: &[f32], got: &[f32], want: &[f32], rel: f32, abs: f32) {
    for ((&x, &g), &w) in x.iter().zip(got).zip(want) {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= rel * w.abs() + abs
        };
        assert!(ok, "{name}({x:e}) = {g:e}, the interpreter gives {w:e}");
    }
}

/// Per unary op, the bounds of the generated code against the
/// interpreter: relative for functions computed with range reduction (a few
/// ulp), plus an absolute floor where a function crosses or nears zero
/// (the rational erf and the tanh form of gelu_tanh are absolute-accurate).
pub(crate) const UNARY_BOUNDS: &[(UnaryOp, f32, f32)] = &[
    (UnaryOp::Neg, 0.0, 0.0),
    (UnaryOp::Abs, 0.0, 0.0),
    (UnaryOp::Relu, 0.0, 0.0),
    (UnaryOp::Sqrt, 0.0, 0.0),
    (UnaryOp::Recip, 0.0, 0.0),
    (UnaryOp::Rsqrt, 2.5e-7, 0.0),
    (UnaryOp::Exp, 5e-7, 1e-35),
    (UnaryOp::Log, 5e-7, 1e-7),
    (UnaryOp::Tanh, 6e-7, 1e-7),
    (UnaryOp::Sigmoid, 6e-7, 1e-35),
    (UnaryOp::Silu, 6e-7, 1e-35),
    (UnaryOp::Erf, 6e-7, 3e-7),
    // The rational erf is accurate to 3.6e-7 absolute; gelu scales that
    // by |x|/2 where 1 + erf cancels (x = -5.6: 4.2e-7, at most ~1e-6
    // before erf clamps to -1), against an output of magnitude |x|.
    (UnaryOp::Gelu, 6e-7, 1.1e-6),
    (UnaryOp::GeluTanh, 6e-7, 2e-7),
];

#[test]
fn unary_ops_match_the_interpreter() {
    let x = inputs();
    for &(u, rel, abs) in UNARY_BOUNDS {
        let body = [KernelOp::Unary(u, 0)];
        let want: Vec<f32> = x.iter().map(|&v| oracle(&body, &[v])).collect();
        // Vector form with a scalar tail (the length is not a multiple of 4).
        let got = run_f32(
            &body,
            std::slice::from_ref(&x),
            vec![Step::Contig, Step::Contig],
        );
        check(u.name(), &x, &got, &want, rel, abs);
        // Scalar form only (strided operands).
        let got = run_f32(
            &body,
            std::slice::from_ref(&x),
            vec![Step::Strided, Step::Strided],
        );
        check(u.name(), &x, &got, &want, rel, abs);
    }
}

#[test]
fn every_length_around_the_unrolled_steps_is_computed_once_and_in_bounds() {
    // A short body (unrolled four vectors a step) and a long one (two),
    // with a broadcast operand: every length from 0 to 41, each element
    // the interpreter's value, nothing written past the end.
    let short = [
        KernelOp::Binary(BinaryOp::Mul, 0, 1),
        KernelOp::Unary(UnaryOp::Tanh, 2),
    ];
    let long = [
        KernelOp::Binary(BinaryOp::Mul, 0, 1),
        KernelOp::Unary(UnaryOp::Tanh, 2),
        KernelOp::Binary(BinaryOp::Add, 3, 0),
        KernelOp::Unary(UnaryOp::Exp, 4),
        KernelOp::Binary(BinaryOp::Sub, 5, 1),
        KernelOp::Unary(UnaryOp::Neg, 6),
    ];
    for body in [&short[..], &long[..]] {
        let spec = LoopSpec {
            body,
            declared: vec![DType::F32; 2],
            stored: vec![DType::F32; 2],
            out: DType::F32,
            steps: vec![Step::Contig, Step::Bcast, Step::Contig],
        };
        let f = loop_kernel(&spec).expect("jit").expect("covered");
        let b = [0.7f32];
        for n in 0..=41usize {
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.1 - 1.0).collect();
            let sentinel = -1234.5f32;
            let mut out = vec![sentinel; n + 16];
            let ptrs: [*mut u8; 3] = [
                x.as_ptr().cast_mut().cast(),
                b.as_ptr().cast_mut().cast(),
                out.as_mut_ptr().cast(),
            ];
            let strides = [1i64, 0, 1];
            // SAFETY: x and out hold n elements (out more), b one, read
            // broadcast.
            let code = unsafe { f(ptrs.as_ptr(), strides.as_ptr(), n as i64) };
            assert_eq!(code, 0);
            let want: Vec<f32> = x.iter().map(|&v| oracle(body, &[v, b[0]])).collect();
            check(
                &format!("{} ops, n {n}", body.len()),
                &x,
                &out[..n],
                &want,
                2e-6,
                1e-7,
            );
            assert!(
                out[n..].iter().all(|&v| v == sentinel),
                "{} ops, n {n}: written past the end",
                body.len()
            );
        }
    }
}

#[test]
fn binary_ops_and_fused_bodies_match_the_interpreter() {
    let x = inputs();
    let y: Vec<f32> = x.iter().rev().copied().collect();
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ] {
        let body = [KernelOp::Binary(op, 0, 1)];
        let want: Vec<f32> = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| oracle(&body, &[a, b]))
            .collect();
        let got = run_f32(
            &body,
            &[x.clone(), y.clone()],
            vec![Step::Contig, Step::Contig, Step::Contig],
        );
        // Exactly rounded in both: bit-identical.
        check(op.name(), &x, &got, &want, 0.0, 0.0);
    }
    // where(x > y, x·2, y - 1) through a mask, and a cast of a comparison.
    let body = [
        KernelOp::Binary(BinaryOp::Gt, 0, 1),
        KernelOp::Const(2.0, DType::F32),
        KernelOp::Binary(BinaryOp::Mul, 0, 3),
        KernelOp::Const(1.0, DType::F32),
        KernelOp::Binary(BinaryOp::Sub, 1, 5),
        KernelOp::Where(2, 4, 6),
        KernelOp::Binary(BinaryOp::Le, 0, 1),
        KernelOp::Cast(DType::F32, 8),
        KernelOp::Binary(BinaryOp::Add, 7, 9),
    ];
    let want: Vec<f32> = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| oracle(&body, &[a, b]))
        .collect();
    for steps in [
        vec![Step::Contig, Step::Contig, Step::Contig],
        vec![Step::Strided, Step::Contig, Step::Contig],
    ] {
        let got = run_f32(&body, &[x.clone(), y.clone()], steps);
        check("where", &x, &got, &want, 0.0, 0.0);
    }
}

#[test]
fn integer_bodies_follow_the_interpreter_and_never_trap() {
    // ids / d with d = 0 fails the call; i64::MIN / -1 wraps.
    let body = [KernelOp::Binary(BinaryOp::Div, 0, 1)];
    let spec = LoopSpec {
        body: &body,
        declared: vec![DType::I64, DType::I64],
        stored: vec![DType::I64, DType::I64],
        out: DType::I64,
        steps: vec![Step::Contig, Step::Contig, Step::Contig],
    };
    let f = loop_kernel(&spec).expect("jit").expect("covered");
    let run = |a: Vec<i64>, b: Vec<i64>| {
        let mut out = vec![0i64; a.len()];
        let ptrs: Vec<*mut u8> = vec![
            a.as_ptr().cast_mut().cast(),
            b.as_ptr().cast_mut().cast(),
            out.as_mut_ptr().cast(),
        ];
        let strides = [1i64; 3];
        // SAFETY: every operand holds a.len() elements.
        let code = unsafe { f(ptrs.as_ptr(), strides.as_ptr(), a.len() as i64) };
        (code, out)
    };
    assert_eq!(
        run(vec![7, -7, i64::MIN, 9], vec![2, 2, -1, -3]),
        (0, vec![3, -3, i64::MIN, -3])
    );
    assert_eq!(run(vec![1, 2], vec![1, 0]).0, 1);
    // padding_mask: ids != 0 as bool, and a bool cast to f32.
    let body = [
        KernelOp::Const(0.0, DType::I64),
        KernelOp::Binary(BinaryOp::Ne, 0, 1),
    ];
    let spec = LoopSpec {
        body: &body,
        declared: vec![DType::I64],
        stored: vec![DType::I64],
        out: DType::Bool,
        steps: vec![Step::Contig, Step::Contig],
    };
    let f = loop_kernel(&spec).expect("jit").expect("covered");
    let ids = [5i64, 0, -1, 0, 3];
    let mut out = [9u8; 5];
    let ptrs: Vec<*mut u8> = vec![ids.as_ptr().cast_mut().cast(), out.as_mut_ptr()];
    // SAFETY: five elements each.
    assert_eq!(unsafe { f(ptrs.as_ptr(), [1i64; 2].as_ptr(), 5) }, 0);
    assert_eq!(out, [1, 0, 1, 0, 1]);
}

#[test]
fn sixteen_bit_operands_are_widened_in_the_kernel() {
    // Every 16-bit pattern: zeros, subnormals, normals, infinities and NaN
    // of both signs.
    let every: Vec<u16> = (0..=u16::MAX).collect();
    let (f16, bf16) = (&every, &every);
    for (dt, bits) in [(DType::F16, f16), (DType::BF16, bf16)] {
        let want: Vec<f32> = bits
            .iter()
            .map(|&b| match dt {
                DType::F16 => half::f16::from_bits(b).to_f32(),
                _ => half::bf16::from_bits(b).to_f32(),
            })
            .collect();
        for step in [Step::Contig, Step::Strided] {
            let spec = LoopSpec {
                body: &[],
                declared: vec![DType::F32],
                stored: vec![dt],
                out: DType::F32,
                steps: vec![step, step],
            };
            let f = loop_kernel(&spec).expect("jit").expect("covered");
            let mut out = vec![0f32; bits.len()];
            let ptrs: Vec<*mut u8> = vec![bits.as_ptr().cast_mut().cast(), out.as_mut_ptr().cast()];
            // SAFETY: both hold bits.len() elements.
            unsafe { f(ptrs.as_ptr(), [1i64; 2].as_ptr(), bits.len() as i64) };
            for (g, w) in out.iter().zip(&want) {
                // Bit for bit, but for the quiet bit of a NaN: the widened
                // NaN keeps its sign and payload, and a signalling one stays
                // signalling (the `half` crate quiets it).
                let quiet = 1u32 << 22;
                assert!(
                    g.to_bits() == w.to_bits()
                        || g.is_nan() && w.is_nan() && g.to_bits() | quiet == w.to_bits() | quiet,
                    "{dt:?}: {:#x} vs {:#x}",
                    g.to_bits(),
                    w.to_bits()
                );
            }
        }
    }
}

/// Bandwidth of the generated matrix–vector kernels (run by hand:
/// `cargo test --release -p kiln-backends matvec_bandwidth -- --ignored --nocapture`).
#[test]
#[ignore]
fn matvec_bandwidth() {
    use super::kernels::{matvec_kernel, MatvecLayout};
    let (k, n) = match std::env::var("KILN_MV_K") {
        Ok(v) => {
            let k: usize = v.parse().unwrap();
            (k, (16 << 20) / k)
        }
        Err(_) => (4096usize, 4096usize),
    };
    let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 5) as f32).collect();
    let mut y = vec![0f32; n];
    for layout in [MatvecLayout::Rows, MatvecLayout::Cols, MatvecLayout::Rows] {
        let f = matvec_kernel(layout, DType::F32).unwrap().unwrap();
        let ldw = if layout == MatvecLayout::Rows { k } else { n };
        let t = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps {
            // SAFETY: sizes as allocated.
            unsafe {
                f(
                    x.as_ptr(),
                    w.as_ptr().cast(),
                    y.as_mut_ptr(),
                    k as i64,
                    0,
                    n as i64,
                    ldw as i64,
                )
            };
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{layout:?}: {:.1} GB/s",
            (k * n * 4 * reps) as f64 / s / 1e9
        );
    }
    // Two threads, each half of the rows.
    let f = matvec_kernel(MatvecLayout::Rows, DType::F32)
        .unwrap()
        .unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        let (wp, xp, yp) = (
            w.as_ptr() as usize,
            x.as_ptr() as usize,
            y.as_mut_ptr() as usize,
        );
        std::thread::scope(|s| {
            for h in 0..2i64 {
                s.spawn(move || {
                    // SAFETY: sizes as allocated; halves disjoint.
                    unsafe {
                        f(
                            xp as *const f32,
                            wp as *const u8,
                            yp as *mut f32,
                            k as i64,
                            h * n as i64 / 2,
                            (h + 1) * n as i64 / 2,
                            k as i64,
                        )
                    }
                });
            }
        });
    }
    println!(
        "Rows, 2 threads: {:.1} GB/s",
        (k * n * 4 * 20) as f64 / t.elapsed().as_secs_f64() / 1e9
    );
    let t = std::time::Instant::now();
    let mut acc = 0f32;
    for _ in 0..20 {
        acc += w.iter().sum::<f32>();
    }
    println!(
        "rust sum: {:.1} GB/s ({acc})",
        (k * n * 4 * 20) as f64 / t.elapsed().as_secs_f64() / 1e9
    );
}

/// The GEMM library on BERT's shapes, with the weight as stored by
/// PyTorch ([out, in], read transposed) and pre-transposed ([in, out]):
/// `cargo test --release -p kiln-backends gemm_layouts -- --ignored --nocapture`.
#[test]
#[ignore]
fn gemm_layouts() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (m, k, n) in [
        (1024usize, 768usize, 768usize),
        (1024, 768, 3072),
        (1024, 3072, 768),
        (128, 768, 2048),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
        let mut c = vec![0f32; m * n];
        for (name, (bcs, brs)) in [
            ("[out,in]", (k as isize, 1isize)),
            ("[in,out]", (1, n as isize)),
        ] {
            let reps = 10;
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = std::time::Instant::now();
                // SAFETY: sizes as allocated.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        bcs,
                        brs,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{m}x{k}x{n} {name}: {:.0} GFLOP/s",
                2.0 * (m * n * k) as f64 / best / 1e9
            );
        }
    }
}

#[test]
fn a_kernel_whose_building_panicked_leaves_the_jit_usable() {
    use super::with_jit;
    use cranelift_codegen::ir::{types, InstBuilder};
    // A build that panics half-way: a block created, filled and left
    // unterminated, with a variable declared.
    let caught = std::panic::catch_unwind(|| {
        let _ = with_jit(|j| {
            let sig = j.signature(1, &[], None);
            j.function("a kernel that panics while built", sig, |b, _| {
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let v = b.declare_var(types::I64);
                let x = b.ins().iconst(types::I64, 3);
                b.def_var(v, x);
                panic!("the builder fails");
            })
        });
    });
    assert!(caught.is_err());
    // The next kernels compile and compute (another signature, so a name
    // the failed kernel half-declared would be refused).
    let body = [KernelOp::Binary(BinaryOp::Add, 0, 1)];
    let x: Vec<f32> = (0..37).map(|i| i as f32).collect();
    let got = run_f32(&body, &[x.clone(), x.clone()], vec![Step::Contig; 3]);
    assert_eq!(got, x.iter().map(|v| v * 2.0).collect::<Vec<_>>());
    let body = [KernelOp::Unary(UnaryOp::Neg, 0)];
    let got = run_f32(&body, std::slice::from_ref(&x), vec![Step::Contig; 2]);
    assert_eq!(got, x.iter().map(|v| -v).collect::<Vec<_>>());
}

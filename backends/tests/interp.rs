//! The reference interpreter against hand-computed values for every op, against
//! itself on equivalent graphs (GQA vs repeated kv heads, causal `S > T` vs the
//! last rows of full causal attention, fused vs primitive attention), and on the
//! errors a caller can provoke (contradicting inputs, wrong weights, bad ids).
//!
//! Test families, one helper each: [`check_op`] (one op, exact expectation),
//! [`check_same`] (two graphs, same outputs), [`check_error`] (the whole message).
//! Both comparisons go through [`compare`], which fails on a NaN or an
//! infinity unless a hand-written expectation holds the same one there.

use kiln_backends::{Backend, Interpreter, RunError, Tensor, Weights};
use kiln_ir::parse_graph;

fn f(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), v.to_vec()).unwrap()
}

fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::i64(shape.to_vec(), v.to_vec()).unwrap()
}

fn i32s(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::i32(shape.to_vec(), v.to_vec()).unwrap()
}

fn bools(shape: &[usize], v: &[bool]) -> Tensor {
    Tensor::bool(shape.to_vec(), v.to_vec()).unwrap()
}

/// A seeded uniform tensor in `[-1, 1)` (64-bit LCG, Knuth's constants).
fn random(seed: u64, shape: &[usize]) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::f32(shape.to_vec(), values).unwrap()
}

/// Compiles text IR with `weights` and runs it once.
fn run(src: &str, weights: &Weights, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
    let graph = parse_graph(src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    let mut exe = Interpreter.compile(&graph, weights)?;
    exe.run(inputs)
}

/// What a comparison does with NaN and infinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NonFinite {
    /// A NaN or an infinity on either side fails (two computed results).
    Reject,
    /// `want` is written by hand and may hold a NaN or an infinity that the op
    /// must produce there (`sqrt(-1)`, `recip(0)`); anywhere else one fails.
    Expected,
}

/// The comparison of this file: same dtype, shape and elements; f32 within
/// `tol` relative (absolute below 1), element by element, and NaN or infinite
/// only where `non_finite` allows. Err names the first element that fails.
fn compare(got: &Tensor, want: &Tensor, tol: f32, non_finite: NonFinite) -> Result<(), String> {
    if (got.dtype(), got.shape()) != (want.dtype(), want.shape()) {
        return Err(format!(
            "got {:?}{:?}, want {:?}{:?}",
            got.dtype(),
            got.shape(),
            want.dtype(),
            want.shape()
        ));
    }
    let (Some(g), Some(w)) = (got.as_f32(), want.as_f32()) else {
        return if got == want {
            Ok(())
        } else {
            Err("elements differ".to_string())
        };
    };
    for (k, (&x, &y)) in g.iter().zip(w).enumerate() {
        let ok = match (y.is_finite(), non_finite) {
            (false, NonFinite::Reject) => return Err(format!("element {k} of want is {y}")),
            (false, NonFinite::Expected) => (x.is_nan() && y.is_nan()) || x == y,
            (true, _) if !x.is_finite() => return Err(format!("element {k} of got is {x}")),
            (true, _) => (x - y).abs() <= tol * y.abs().max(1.0),
        };
        if !ok {
            return Err(format!("element {k}: got {x}, want {y}"));
        }
    }
    Ok(())
}

/// [`compare`], panicking with both tensors and `context`.
fn assert_close(got: &Tensor, want: &Tensor, tol: f32, non_finite: NonFinite, context: &str) {
    if let Err(e) = compare(got, want, tol, non_finite) {
        panic!(
            "{e}\ngot  {:?}\nwant {:?}\nin\n{context}",
            got.as_f32(),
            want.as_f32()
        );
    }
}

#[test]
fn the_comparison_fails_on_nan_and_infinity() {
    let want = f(&[3], &[1.0, 2.0, 3.0]);
    for (bad, tol) in [
        (f32::NAN, 1e-6),
        (f32::INFINITY, 1e-6),
        (f32::NEG_INFINITY, 1e30),
    ] {
        let got = f(&[3], &[1.0, bad, 3.0]);
        for policy in [NonFinite::Reject, NonFinite::Expected] {
            let e = compare(&got, &want, tol, policy).unwrap_err();
            assert_eq!(e, format!("element 1 of got is {bad}"));
            let e = compare(&want, &got, tol, NonFinite::Reject).unwrap_err();
            assert_eq!(e, format!("element 1 of want is {bad}"));
        }
        // Two computed results that are both NaN (or both infinite) agree on
        // nothing.
        assert!(compare(&got, &got, tol, NonFinite::Reject).is_err());
        // A hand-written NaN or infinity must be produced exactly.
        compare(&got, &got, tol, NonFinite::Expected).unwrap();
        assert!(compare(&want, &got, tol, NonFinite::Expected).is_err());
    }
    let nan_row = f(&[3], &[f32::NAN; 3]);
    assert!(std::panic::catch_unwind(|| {
        assert_close(&nan_row, &want, 1e30, NonFinite::Reject, "all NaN")
    })
    .is_err());
}

/// Family: one op applied to inputs `%a0, %a1, …` gives exactly `want` (to 1e-6).
fn check_op(op: &str, attrs: &str, inputs: &[Tensor], want: Tensor) {
    let sig: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(k, t)| format!("%a{k}: {t}"))
        .collect();
    let args: Vec<String> = (0..inputs.len()).map(|k| format!("%a{k}")).collect();
    let src = format!(
        "func @f({}) -> (y: {want}) {{\n  %y = {op}({}) {attrs} : {want}\n  return %y\n}}\n",
        sig.join(", "),
        args.join(", ")
    );
    let out = run(&src, &Weights::new(), inputs).unwrap_or_else(|e| panic!("{e}\nin\n{src}"));
    assert_close(&out[0], &want, 1e-6, NonFinite::Expected, &src);
}

/// Family: two graphs give the same outputs on the same inputs (within `tol`).
fn check_same(a: &str, b: &str, weights: &Weights, inputs: &[Tensor], tol: f32) {
    let out_a = run(a, weights, inputs).unwrap_or_else(|e| panic!("{e}\nin\n{a}"));
    let out_b = run(b, weights, inputs).unwrap_or_else(|e| panic!("{e}\nin\n{b}"));
    assert_eq!(out_a.len(), out_b.len());
    for (x, y) in out_a.iter().zip(&out_b) {
        assert_close(x, y, tol, NonFinite::Reject, &format!("{a}\nvs\n{b}"));
    }
}

/// Family: compiling or running fails with exactly `message`.
fn check_error(src: &str, weights: &Weights, inputs: &[Tensor], message: &str) {
    match run(src, weights, inputs) {
        Ok(out) => panic!("expected `{message}`, got outputs {out:?}\nin\n{src}"),
        Err(e) => assert_eq!(e.to_string(), message, "in\n{src}"),
    }
}

#[test]
fn unary_float_ops() {
    let ln3 = 3f32.ln();
    let cases: [(&str, &[f32], &[f32]); 15] = [
        ("neg", &[1.0, -2.0, 0.0], &[-1.0, 2.0, -0.0]),
        (
            "exp",
            &[0.0, 1.0, f32::NEG_INFINITY],
            &[1.0, std::f32::consts::E, 0.0],
        ),
        (
            "log",
            &[1.0, std::f32::consts::E, 0.0],
            &[0.0, 1.0, f32::NEG_INFINITY],
        ),
        ("sqrt", &[4.0, 9.0, -1.0], &[2.0, 3.0, f32::NAN]),
        ("rsqrt", &[4.0, 0.25], &[0.5, 2.0]),
        ("tanh", &[0.0, ln3], &[0.0, 0.8]),
        ("sigmoid", &[0.0, ln3, -200.0], &[0.5, 0.75, 0.0]),
        ("abs", &[-3.0, 2.0], &[3.0, 2.0]),
        ("recip", &[2.0, -4.0, 0.0], &[0.5, -0.25, f32::INFINITY]),
        ("erf", &[0.0, 1.0, -1.0], &[0.0, 0.842_700_8, -0.842_700_8]),
        (
            "gelu",
            &[0.0, 1.0, -1.0],
            &[0.0, 0.841_344_8, -0.158_655_26],
        ),
        ("gelu_tanh", &[0.0, 1.0], &[0.0, 0.841_192]),
        ("silu", &[0.0, ln3], &[0.0, 0.823_959_2]),
        (
            "relu",
            &[-1.0, 2.0, 0.0, f32::NAN],
            &[0.0, 2.0, 0.0, f32::NAN],
        ),
        ("neg", &[f32::NAN], &[f32::NAN]),
    ];
    for (op, x, want) in cases {
        check_op(op, "", &[f(&[x.len()], x)], f(&[want.len()], want));
    }
}

#[test]
fn unary_integer_and_bool_ops() {
    check_op("neg", "", &[i64s(&[2], &[-3, 4])], i64s(&[2], &[3, -4]));
    check_op("abs", "", &[i64s(&[2], &[-3, 4])], i64s(&[2], &[3, 4]));
    check_op("relu", "", &[i64s(&[2], &[-3, 4])], i64s(&[2], &[0, 4]));
    // Integer negation wraps like two's complement (as in PyTorch).
    check_op(
        "neg",
        "",
        &[i32s(&[2], &[i32::MIN, 5])],
        i32s(&[2], &[i32::MIN, -5]),
    );
    check_op(
        "not",
        "",
        &[bools(&[2], &[true, false])],
        bools(&[2], &[false, true]),
    );
}

#[test]
fn binary_float_ops_broadcast() {
    let col = f(&[2, 1], &[1.0, 2.0]);
    let row = f(&[3], &[10.0, 20.0, 30.0]);
    check_op(
        "add",
        "",
        &[col.clone(), row.clone()],
        f(&[2, 3], &[11.0, 21.0, 31.0, 12.0, 22.0, 32.0]),
    );
    check_op(
        "sub",
        "",
        &[row.clone(), col.clone()],
        f(&[2, 3], &[9.0, 19.0, 29.0, 8.0, 18.0, 28.0]),
    );
    check_op(
        "mul",
        "",
        &[col, row],
        f(&[2, 3], &[10.0, 20.0, 30.0, 20.0, 40.0, 60.0]),
    );
    // A rank-0 operand broadcasts against anything.
    check_op(
        "div",
        "",
        &[f(&[2], &[1.0, 2.0]), f(&[], &[4.0])],
        f(&[2], &[0.25, 0.5]),
    );
    check_op(
        "pow",
        "",
        &[f(&[2], &[2.0, 4.0]), f(&[2], &[2.0, 0.5])],
        f(&[2], &[4.0, 2.0]),
    );
    // max/min propagate NaN like torch.maximum/minimum.
    let a = f(&[3], &[1.0, f32::NAN, -1.0]);
    let b = f(&[3], &[2.0, 0.0, -5.0]);
    check_op(
        "max",
        "",
        &[a.clone(), b.clone()],
        f(&[3], &[2.0, f32::NAN, -1.0]),
    );
    check_op("min", "", &[a, b], f(&[3], &[1.0, f32::NAN, -5.0]));
    // Size-1 axes on both sides stretch: [2, 1, 2] with [3, 1] gives [2, 3, 2].
    let x = f(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let y = f(&[3, 1], &[0.0, 10.0, 20.0]);
    let want = f(
        &[2, 3, 2],
        &[
            1.0, 2.0, 11.0, 12.0, 21.0, 22.0, 3.0, 4.0, 13.0, 14.0, 23.0, 24.0,
        ],
    );
    check_op("add", "", &[x, y], want);
}

#[test]
fn binary_integer_ops() {
    // Integer division truncates toward zero.
    check_op(
        "div",
        "",
        &[i64s(&[2], &[-7, 7]), i64s(&[2], &[2, -2])],
        i64s(&[2], &[-3, -3]),
    );
    // i32 arithmetic wraps.
    check_op(
        "add",
        "",
        &[i32s(&[1], &[i32::MAX]), i32s(&[1], &[1])],
        i32s(&[1], &[i32::MIN]),
    );
    check_op(
        "mul",
        "",
        &[i32s(&[2], &[3, -4]), i32s(&[], &[5])],
        i32s(&[2], &[15, -20]),
    );
    check_op(
        "sub",
        "",
        &[i64s(&[2], &[3, 4]), i64s(&[2, 1], &[1, 2])],
        i64s(&[2, 2], &[2, 3, 1, 2]),
    );
    check_op(
        "max",
        "",
        &[i64s(&[2], &[3, -4]), i64s(&[2], &[1, 2])],
        i64s(&[2], &[3, 2]),
    );
    check_op(
        "min",
        "",
        &[i64s(&[2], &[3, -4]), i64s(&[2], &[1, 2])],
        i64s(&[2], &[1, -4]),
    );
}

#[test]
fn comparisons_and_logic() {
    let a = f(&[3], &[1.0, 2.0, f32::NAN]);
    let b = f(&[], &[2.0]);
    let cases: [(&str, [bool; 3]); 6] = [
        ("eq", [false, true, false]),
        ("ne", [true, false, true]),
        ("lt", [true, false, false]),
        ("le", [true, true, false]),
        ("gt", [false, false, false]),
        ("ge", [false, true, false]),
    ];
    for (op, want) in cases {
        check_op(op, "", &[a.clone(), b.clone()], bools(&[3], &want));
    }
    let p = i64s(&[2, 1], &[1, 3]);
    let q = i64s(&[2], &[2, 3]);
    check_op(
        "lt",
        "",
        &[p.clone(), q.clone()],
        bools(&[2, 2], &[true, true, false, false]),
    );
    check_op(
        "ge",
        "",
        &[p, q],
        bools(&[2, 2], &[false, false, true, true]),
    );
    let x = bools(&[4], &[true, true, false, false]);
    let y = bools(&[4], &[true, false, true, false]);
    check_op(
        "and",
        "",
        &[x.clone(), y.clone()],
        bools(&[4], &[true, false, false, false]),
    );
    check_op(
        "or",
        "",
        &[x.clone(), y.clone()],
        bools(&[4], &[true, true, true, false]),
    );
    check_op(
        "eq",
        "",
        &[x.clone(), y.clone()],
        bools(&[4], &[true, false, false, true]),
    );
    check_op("ne", "", &[x, y], bools(&[4], &[false, true, true, false]));
}

#[test]
fn where_broadcasts_all_three() {
    let cond = bools(&[2, 1], &[true, false]);
    let a = f(&[3], &[1.0, 2.0, 3.0]);
    let b = f(&[], &[-1.0]);
    check_op(
        "where",
        "",
        &[cond.clone(), a, b],
        f(&[2, 3], &[1.0, 2.0, 3.0, -1.0, -1.0, -1.0]),
    );
    check_op(
        "where",
        "",
        &[cond, i64s(&[1, 2], &[5, 6]), i64s(&[2, 1], &[7, 8])],
        i64s(&[2, 2], &[5, 6, 8, 8]),
    );
}

#[test]
fn cast_between_dtypes() {
    let x = f(&[5], &[-1.7, 2.5, 0.0, 3e9, f32::NAN]);
    // Float to int truncates toward zero and saturates; NaN becomes 0.
    check_op(
        "cast",
        "to=i32",
        std::slice::from_ref(&x),
        i32s(&[5], &[-1, 2, 0, i32::MAX, 0]),
    );
    check_op(
        "cast",
        "to=i64",
        std::slice::from_ref(&x),
        i64s(&[5], &[-1, 2, 0, 3_000_000_000, 0]),
    );
    check_op(
        "cast",
        "to=bool",
        &[x],
        bools(&[5], &[true, true, false, true, true]),
    );
    check_op(
        "cast",
        "to=f32",
        &[bools(&[2], &[true, false])],
        f(&[2], &[1.0, 0.0]),
    );
    check_op(
        "cast",
        "to=i64",
        &[bools(&[2], &[true, false])],
        i64s(&[2], &[1, 0]),
    );
    // i64 to i32 wraps.
    check_op(
        "cast",
        "to=i32",
        &[i64s(&[2], &[(1 << 32) + 1, -2])],
        i32s(&[2], &[1, -2]),
    );
    check_op(
        "cast",
        "to=f32",
        &[i64s(&[2], &[3, -4])],
        f(&[2], &[3.0, -4.0]),
    );
    check_op(
        "cast",
        "to=bool",
        &[i32s(&[3], &[0, 7, -1])],
        bools(&[3], &[false, true, true]),
    );
    check_op("cast", "to=i64", &[i32s(&[1], &[-9])], i64s(&[1], &[-9]));
}

#[test]
fn constant_and_arange() {
    check_op(
        "constant",
        "value=-inf dtype=f32 shape=[2]",
        &[],
        f(&[2], &[f32::NEG_INFINITY; 2]),
    );
    check_op(
        "constant",
        "value=0.5 dtype=f32 shape=[]",
        &[],
        f(&[], &[0.5]),
    );
    check_op(
        "constant",
        "value=7 dtype=i64 shape=[2, 1]",
        &[],
        i64s(&[2, 1], &[7, 7]),
    );
    check_op(
        "constant",
        "value=1 dtype=bool shape=[1]",
        &[],
        bools(&[1], &[true]),
    );
    check_op(
        "arange",
        "start=2 len=3 dtype=i64",
        &[],
        i64s(&[3], &[2, 3, 4]),
    );
    check_op(
        "arange",
        "start=-1 len=2 dtype=f32",
        &[],
        f(&[2], &[-1.0, 0.0]),
    );
    check_op("arange", "start=0 len=0 dtype=i32", &[], i32s(&[0], &[]));
}

#[test]
fn symbol_attributes_take_run_time_values() {
    // `T` and `S` come from the input shapes; the positions of the last T of S + T keys.
    let src = "func @f(%x: f32[S, T]) -> (y: i64[T]) {
  %y = arange() start=S len=T dtype=i64 : i64[T]
  return %y
}";
    let out = run(src, &Weights::new(), &[random(1, &[4, 3])]).unwrap();
    assert_eq!(out[0], i64s(&[3], &[4, 5, 6]));
    let src = "func @f(%x: f32[S, T]) -> (y: bool[T, S + T]) {
  %y = causal_mask() queries=T keys=S + T : bool[T, S + T]
  return %y
}";
    let out = run(src, &Weights::new(), &[random(1, &[1, 2])]).unwrap();
    assert_eq!(
        out[0],
        bools(&[2, 3], &[true, true, false, true, true, true])
    );
}

#[test]
fn matmul_plain_transposed_batched() {
    let a = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = f(&[3, 2], &[7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
    let want = f(&[2, 2], &[58.0, 64.0, 139.0, 154.0]);
    let a_t = f(&[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    let b_t = f(&[2, 3], &[7.0, 9.0, 11.0, 8.0, 10.0, 12.0]);
    check_op("matmul", "", &[a.clone(), b.clone()], want.clone());
    check_op(
        "matmul",
        "transpose_a=true",
        &[a_t.clone(), b.clone()],
        want.clone(),
    );
    check_op(
        "matmul",
        "transpose_b=true",
        &[a.clone(), b_t.clone()],
        want.clone(),
    );
    check_op(
        "matmul",
        "transpose_a=true transpose_b=true",
        &[a_t, b_t],
        want,
    );
    // Batch dims broadcast: [2, 1] with [2] gives a [2, 2] batch of 1x1 products.
    let a = f(&[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f(&[2, 2, 1], &[1.0, 1.0, 1.0, -1.0]);
    check_op(
        "matmul",
        "",
        &[a, b],
        f(&[2, 2, 1, 1], &[3.0, -1.0, 7.0, -1.0]),
    );
    // A rank-2 rhs is shared by every batch of the lhs.
    let a = f(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f(&[2, 1], &[10.0, 1.0]);
    check_op("matmul", "", &[a, b], f(&[2, 1, 1], &[12.0, 34.0]));
    check_op(
        "matmul",
        "",
        &[i64s(&[1, 2], &[2, 3]), i64s(&[2, 2], &[1, 10, 100, 1000])],
        i64s(&[1, 2], &[302, 3020]),
    );
}

#[test]
fn reductions() {
    let x = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    check_op(
        "reduce_sum",
        "axes=[1]",
        std::slice::from_ref(&x),
        f(&[2], &[6.0, 15.0]),
    );
    check_op(
        "reduce_sum",
        "axes=[1] keepdim=true",
        std::slice::from_ref(&x),
        f(&[2, 1], &[6.0, 15.0]),
    );
    check_op(
        "reduce_sum",
        "axes=[0, 1]",
        std::slice::from_ref(&x),
        f(&[], &[21.0]),
    );
    check_op(
        "reduce_mean",
        "axes=[-1]",
        std::slice::from_ref(&x),
        f(&[2], &[2.0, 5.0]),
    );
    check_op(
        "reduce_mean",
        "axes=[0] keepdim=true",
        std::slice::from_ref(&x),
        f(&[1, 3], &[2.5, 3.5, 4.5]),
    );
    check_op("reduce_max", "axes=[0]", &[x], f(&[3], &[4.0, 5.0, 6.0]));
    let y = f(&[2, 2, 2], &[1.0, 8.0, 3.0, 4.0, 5.0, 6.0, 7.0, 2.0]);
    check_op(
        "reduce_max",
        "axes=[0, 2]",
        std::slice::from_ref(&y),
        f(&[2], &[8.0, 7.0]),
    );
    check_op(
        "reduce_sum",
        "axes=[-3, -1] keepdim=true",
        &[y],
        f(&[1, 2, 1], &[20.0, 16.0]),
    );
    check_op(
        "reduce_sum",
        "axes=[0]",
        &[i64s(&[2, 3], &[1, 2, 3, 4, 5, 6])],
        i64s(&[3], &[5, 7, 9]),
    );
    check_op(
        "reduce_max",
        "axes=[1]",
        &[i32s(&[2, 2], &[-1, -5, 3, 2])],
        i32s(&[2], &[-1, 3]),
    );
    // Reducing no axes is the identity.
    check_op(
        "reduce_sum",
        "axes=[]",
        &[f(&[2], &[1.0, 2.0])],
        f(&[2], &[1.0, 2.0]),
    );
}

#[test]
fn softmax_is_stable_and_zero_for_all_masked_rows() {
    let x = f(
        &[3, 3],
        &[
            1.0,
            2.0,
            3.0,
            1001.0,
            1002.0,
            1003.0,
            0.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ],
    );
    let p = [0.090_030_57, 0.244_728_47, 0.665_240_96];
    let want = f(
        &[3, 3],
        &[p[0], p[1], p[2], p[0], p[1], p[2], 1.0, 0.0, 0.0],
    );
    check_op("softmax", "axis=-1", &[x], want);
    check_op(
        "softmax",
        "axis=1",
        &[f(&[1, 2], &[f32::NEG_INFINITY; 2])],
        f(&[1, 2], &[0.0, 0.0]),
    );
    let x = f(&[2, 2], &[0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]);
    check_op("softmax", "axis=0", &[x], f(&[2, 2], &[0.5, 0.0, 0.5, 0.0]));
}

#[test]
fn layer_norm_and_rms_norm() {
    let x = f(&[2, 4], &[1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]);
    let z = [-1.341_640_8, -0.447_213_6, 0.447_213_6, 1.341_640_8];
    let w = f(&[4], &[1.0, 1.0, 1.0, 2.0]);
    let b = f(&[4], &[0.0, 0.0, 0.0, 1.0]);
    // eps = 0: the constant row has zero variance, hence 0 / 0.
    check_op(
        "layer_norm",
        "eps=0.0",
        &[x.clone(), w.clone(), b],
        f(
            &[2, 4],
            &[
                z[0],
                z[1],
                z[2],
                2.0 * z[3] + 1.0,
                f32::NAN,
                f32::NAN,
                f32::NAN,
                f32::NAN,
            ],
        ),
    );
    let want = f(&[2, 4], &[z[0], z[1], z[2], 2.0 * z[3], 0.0, 0.0, 0.0, 0.0]);
    check_op("layer_norm", "eps=1e-30", &[x, w], want);
    let x = f(&[1, 2], &[3.0, 4.0]);
    check_op(
        "rms_norm",
        "eps=0.0",
        &[x.clone(), f(&[2], &[1.0, 2.0])],
        f(&[1, 2], &[0.848_528_14, 2.262_741_7]),
    );
    // eps is added to the mean square: mean(x²) = 12.5, + 3.5 = 16.
    check_op(
        "rms_norm",
        "eps=3.5",
        &[x, f(&[2], &[1.0, 1.0])],
        f(&[1, 2], &[0.75, 1.0]),
    );
}

#[test]
fn reshape_permute_expand() {
    let x = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    check_op(
        "reshape",
        "shape=[3, 2]",
        std::slice::from_ref(&x),
        f(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    );
    check_op(
        "reshape",
        "shape=[6]",
        std::slice::from_ref(&x),
        f(&[6], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    );
    check_op(
        "permute",
        "perm=[1, 0]",
        &[x],
        f(&[3, 2], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]),
    );
    // Output axis i is input axis perm[i]: out[i, j, k] = x[j, k, i].
    let x: Vec<i64> = (0..24).collect();
    let mut want = Vec::new();
    for i in 0..4 {
        for j in 0..2 {
            for k in 0..3 {
                want.push(x[j * 12 + k * 4 + i]);
            }
        }
    }
    check_op(
        "permute",
        "perm=[2, 0, 1]",
        &[i64s(&[2, 3, 4], &x)],
        i64s(&[4, 2, 3], &want),
    );
    check_op(
        "expand",
        "shape=[2, 3, 2]",
        &[f(&[3, 1], &[1.0, 2.0, 3.0])],
        f(
            &[2, 3, 2],
            &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0],
        ),
    );
    check_op(
        "expand",
        "shape=[2, 2]",
        &[bools(&[], &[true])],
        bools(&[2, 2], &[true; 4]),
    );
}

#[test]
fn slice_and_concat() {
    let x = f(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    check_op(
        "slice",
        "axis=1 start=1 end=3",
        std::slice::from_ref(&x),
        f(&[2, 2], &[2.0, 3.0, 5.0, 6.0]),
    );
    check_op(
        "slice",
        "axis=-2 start=1 end=2",
        std::slice::from_ref(&x),
        f(&[1, 3], &[4.0, 5.0, 6.0]),
    );
    check_op("slice", "axis=0 start=1 end=1", &[x], f(&[0, 3], &[]));
    let a = i64s(&[2, 1], &[1, 2]);
    let b = i64s(&[2, 2], &[3, 4, 5, 6]);
    check_op(
        "concat",
        "axis=1",
        &[a.clone(), b],
        i64s(&[2, 3], &[1, 3, 4, 2, 5, 6]),
    );
    check_op(
        "concat",
        "axis=0",
        &[a.clone(), a.clone(), a],
        i64s(&[6, 1], &[1, 2, 1, 2, 1, 2]),
    );
    check_op(
        "concat",
        "axis=-1",
        &[bools(&[1, 1], &[true]), bools(&[1, 2], &[false, true])],
        bools(&[1, 3], &[true, false, true]),
    );
}

#[test]
fn gather_rows() {
    let table = f(&[3, 2], &[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    check_op(
        "gather",
        "",
        &[table.clone(), i64s(&[1, 2], &[2, 0])],
        f(&[1, 2, 2], &[20.0, 21.0, 0.0, 1.0]),
    );
    check_op(
        "gather",
        "",
        &[table, i32s(&[2], &[1, 1])],
        f(&[2, 2], &[10.0, 11.0, 10.0, 11.0]),
    );
    // A rank-1 table gives scalars per id.
    check_op(
        "gather",
        "",
        &[i64s(&[3], &[7, 8, 9]), i64s(&[2], &[2, 0])],
        i64s(&[2], &[9, 7]),
    );
}

#[test]
fn masks() {
    check_op(
        "causal_mask",
        "queries=2 keys=3",
        &[],
        bools(&[2, 3], &[true, true, false, true, true, true]),
    );
    check_op(
        "causal_mask",
        "queries=3 keys=3",
        &[],
        bools(
            &[3, 3],
            &[true, false, false, true, true, false, true, true, true],
        ),
    );
    // More queries than keys: the first query sees nothing.
    check_op(
        "causal_mask",
        "queries=3 keys=2",
        &[],
        bools(&[3, 2], &[false, false, true, false, true, true]),
    );
    check_op(
        "padding_mask",
        "",
        &[i64s(&[2, 3], &[1, 1, 0, 0, 5, 1])],
        bools(&[2, 1, 1, 3], &[true, true, false, false, true, true]),
    );
    check_op(
        "padding_mask",
        "",
        &[bools(&[1, 2], &[false, true])],
        bools(&[1, 1, 1, 2], &[false, true]),
    );
}

/// Rotary embedding written as complex multiplication: the pair
/// `(x[i], x[i + dh/2])` is `x[i] + j·x[i + dh/2]`, rotated by `pos · theta^(-2i/dh)`.
fn rope_reference(x: &Tensor, pos: &[i64], pos_batched: bool, theta: f64) -> Tensor {
    let shape = x.shape();
    let (t_len, dh) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let half = dh / 2;
    let per_batch = x.numel() / shape[0];
    let xd = x.as_f32().unwrap();
    let mut out = vec![0.0f32; xd.len()];
    for start in (0..xd.len()).step_by(dh) {
        let t = (start / dh) % t_len;
        let p = if pos_batched {
            pos[start / per_batch * t_len + t]
        } else {
            pos[t]
        };
        for i in 0..half {
            let angle = p as f64 * theta.powf(-2.0 * i as f64 / dh as f64);
            let (re, im) = (xd[start + i] as f64, xd[start + i + half] as f64);
            let (c, s) = (angle.cos(), angle.sin());
            out[start + i] = (re * c - im * s) as f32;
            out[start + i + half] = (re * s + im * c) as f32;
        }
    }
    Tensor::f32(shape.to_vec(), out).unwrap()
}

#[test]
fn rope_matches_the_rotation_formula() {
    // dh = 2, position 1: the only frequency is theta^0 = 1, so [1, 0] becomes [cos 1, sin 1].
    check_op(
        "rope",
        "theta=10000.0",
        &[f(&[1, 2], &[1.0, 0.0]), i64s(&[1], &[1])],
        f(&[1, 2], &[0.540_302_3, 0.841_470_96]),
    );
    // Position 0 is the identity.
    let x = random(3, &[1, 2, 1, 4]);
    check_op("rope", "theta=10000.0", &[x.clone(), i64s(&[1], &[0])], x);

    let x = random(4, &[2, 2, 3, 8]);
    let pos = [0, 5, 11];
    check_op(
        "rope",
        "theta=10000.0",
        &[x.clone(), i64s(&[3], &pos)],
        rope_reference(&x, &pos, false, 10000.0),
    );
    let pos = [0, 1, 2, 7, 8, 9];
    let want = rope_reference(&x, &pos, true, 500.0);
    check_op(
        "rope",
        "theta=500.0",
        &[x.clone(), i64s(&[2, 3], &pos)],
        want.clone(),
    );
    let pos32: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
    check_op("rope", "theta=500.0", &[x, i32s(&[2, 3], &pos32)], want);
}

#[test]
fn attention_by_hand() {
    // One query, two keys, scale 1: scores [0, ln 3] → probabilities [1/4, 3/4].
    let q = f(&[1, 1, 1, 1], &[1.0]);
    let k = f(&[1, 1, 2, 1], &[0.0, 3f32.ln()]);
    let v = f(&[1, 1, 2, 2], &[4.0, 0.0, 8.0, 1.0]);
    let qkv = [q.clone(), k.clone(), v.clone()];
    check_op(
        "attention",
        "scale=1.0",
        &qkv,
        f(&[1, 1, 1, 2], &[7.0, 0.75]),
    );
    // T = 1 < S = 2: the single query is the last one and sees both keys.
    check_op(
        "attention",
        "causal=true scale=1.0",
        &qkv,
        f(&[1, 1, 1, 2], &[7.0, 0.75]),
    );
    let mut with_mask = qkv.to_vec();
    with_mask.push(bools(&[2], &[true, false]));
    check_op(
        "attention",
        "scale=1.0",
        &with_mask,
        f(&[1, 1, 1, 2], &[4.0, 0.0]),
    );
    // Every key excluded: zeros, not NaN.
    with_mask[3] = bools(&[1, 1, 1, 2], &[false, false]);
    check_op(
        "attention",
        "scale=1.0",
        &with_mask,
        f(&[1, 1, 1, 2], &[0.0, 0.0]),
    );
    // Two queries over two keys, causal: the first sees only key 0.
    let q = f(&[1, 1, 2, 1], &[1.0, 1.0]);
    check_op(
        "attention",
        "causal=true scale=1.0",
        &[q.clone(), k, v.clone()],
        f(&[1, 1, 2, 2], &[4.0, 0.0, 7.0, 0.75]),
    );
    // T = 2 > S = 1, aligned bottom-right: query 0 sees no key (zeros), query 1 sees key 0.
    let k1 = f(&[1, 1, 1, 1], &[0.0]);
    let v1 = f(&[1, 1, 1, 2], &[4.0, 0.0]);
    check_op(
        "attention",
        "causal=true scale=1.0",
        &[q, k1, v1],
        f(&[1, 1, 2, 2], &[0.0, 0.0, 4.0, 0.0]),
    );
}

#[test]
fn gqa_attention_equals_repeated_kv_heads() {
    let gqa = "func @f(%q: f32[B, h, T, dh], %k: f32[B, hk, S, dh], %v: f32[B, hk, S, dv]) -> (y: f32[B, h, T, dv])
    where h = 6, hk = 2, dh = 3, dv = 5 {
  %y = attention(%q, %k, %v) causal=true scale=0.5 : f32[B, h, T, dv]
  return %y
}";
    // Query head i reads kv head i / (h / hk): repeat each kv head g times, in place.
    let repeated = "func @f(%q: f32[B, h, T, dh], %k: f32[B, hk, S, dh], %v: f32[B, hk, S, dv]) -> (y: f32[B, h, T, dv])
    where h = 6, hk = 2, g = h / hk, dh = 3, dv = 5 {
  %k1 = reshape(%k) shape=[B, hk, 1, S, dh] : f32[B, hk, 1, S, dh]
  %kg = expand(%k1) shape=[B, hk, g, S, dh] : f32[B, hk, g, S, dh]
  %kr = reshape(%kg) shape=[B, h, S, dh] : f32[B, h, S, dh]
  %v1 = reshape(%v) shape=[B, hk, 1, S, dv] : f32[B, hk, 1, S, dv]
  %vg = expand(%v1) shape=[B, hk, g, S, dv] : f32[B, hk, g, S, dv]
  %vr = reshape(%vg) shape=[B, h, S, dv] : f32[B, h, S, dv]
  %y = attention(%q, %kr, %vr) causal=true scale=0.5 : f32[B, h, T, dv]
  return %y
}";
    let inputs = [
        random(1, &[2, 6, 3, 3]),
        random(2, &[2, 2, 4, 3]),
        random(3, &[2, 2, 4, 5]),
    ];
    check_same(gqa, repeated, &Weights::new(), &inputs, 0.0);
    // MQA (hk = 1) is the same rule.
    let mqa = gqa.replace("hk = 2", "hk = 1");
    let mqa_repeated = repeated.replace("hk = 2", "hk = 1");
    let inputs = [
        random(4, &[1, 6, 2, 3]),
        random(5, &[1, 1, 2, 3]),
        random(6, &[1, 1, 2, 5]),
    ];
    check_same(&mqa, &mqa_repeated, &Weights::new(), &inputs, 0.0);
}

#[test]
fn causal_attention_with_a_prefix_equals_the_last_rows() {
    // Queries T = 3 over S = 5 keys are the last 3 queries of full causal attention.
    let full = "func @f(%q: f32[1, 2, 5, 4], %k: f32[1, 2, 5, 4], %v: f32[1, 2, 5, 3]) -> (y: f32[1, 2, 3, 3]) {
  %all = attention(%q, %k, %v) causal=true scale=0.5 : f32[1, 2, 5, 3]
  %y = slice(%all) axis=2 start=2 end=5 : f32[1, 2, 3, 3]
  return %y
}";
    let last = "func @f(%q: f32[1, 2, 5, 4], %k: f32[1, 2, 5, 4], %v: f32[1, 2, 5, 3]) -> (y: f32[1, 2, 3, 3]) {
  %ql = slice(%q) axis=2 start=2 end=5 : f32[1, 2, 3, 4]
  %y = attention(%ql, %k, %v) causal=true scale=0.5 : f32[1, 2, 3, 3]
  return %y
}";
    let inputs = [
        random(7, &[1, 2, 5, 4]),
        random(8, &[1, 2, 5, 4]),
        random(9, &[1, 2, 5, 3]),
    ];
    check_same(full, last, &Weights::new(), &inputs, 0.0);
}

#[test]
fn fused_attention_equals_primitive_ops() {
    let fused = "func @f(%q: f32[B, h, T, dh], %k: f32[B, h, S, dh], %v: f32[B, h, S, dh]) -> (y: f32[B, h, T, dh])
    where h = 2, dh = 4 {
  %y = attention(%q, %k, %v) causal=true scale=0.5 : f32[B, h, T, dh]
  return %y
}";
    let primitive = "func @f(%q: f32[B, h, T, dh], %k: f32[B, h, S, dh], %v: f32[B, h, S, dh]) -> (y: f32[B, h, T, dh])
    where h = 2, dh = 4 {
  %s = matmul(%q, %k) transpose_b=true : f32[B, h, T, S]
  %c = constant() value=0.5 dtype=f32 shape=[] : f32[]
  %scaled = mul(%s, %c) : f32[B, h, T, S]
  %m = causal_mask() queries=T keys=S : bool[T, S]
  %ninf = constant() value=-inf dtype=f32 shape=[] : f32[]
  %masked = where(%m, %scaled, %ninf) : f32[B, h, T, S]
  %p = softmax(%masked) axis=-1 : f32[B, h, T, S]
  %y = matmul(%p, %v) : f32[B, h, T, dh]
  return %y
}";
    let inputs = [
        random(10, &[2, 2, 3, 4]),
        random(11, &[2, 2, 5, 4]),
        random(12, &[2, 2, 5, 4]),
    ];
    check_same(fused, primitive, &Weights::new(), &inputs, 1e-5);
}

#[test]
fn padding_mask_equals_dropping_the_key() {
    let masked = "func @f(%q: f32[1, 1, 2, 3], %k: f32[1, 1, 4, 3], %v: f32[1, 1, 4, 2], %m: i64[1, 4]) -> (y: f32[1, 1, 2, 2]) {
  %pm = padding_mask(%m) : bool[1, 1, 1, 4]
  %y = attention(%q, %k, %v, %pm) scale=0.6 : f32[1, 1, 2, 2]
  return %y
}";
    let dropped = "func @f(%q: f32[1, 1, 2, 3], %k: f32[1, 1, 4, 3], %v: f32[1, 1, 4, 2], %m: i64[1, 4]) -> (y: f32[1, 1, 2, 2]) {
  %k0 = slice(%k) axis=2 start=0 end=2 : f32[1, 1, 2, 3]
  %k1 = slice(%k) axis=2 start=3 end=4 : f32[1, 1, 1, 3]
  %kk = concat(%k0, %k1) axis=2 : f32[1, 1, 3, 3]
  %v0 = slice(%v) axis=2 start=0 end=2 : f32[1, 1, 2, 2]
  %v1 = slice(%v) axis=2 start=3 end=4 : f32[1, 1, 1, 2]
  %vv = concat(%v0, %v1) axis=2 : f32[1, 1, 3, 2]
  %y = attention(%q, %kk, %vv) scale=0.6 : f32[1, 1, 2, 2]
  return %y
}";
    let inputs = [
        random(13, &[1, 1, 2, 3]),
        random(14, &[1, 1, 4, 3]),
        random(15, &[1, 1, 4, 2]),
        i64s(&[1, 4], &[1, 1, 0, 1]),
    ];
    check_same(masked, dropped, &Weights::new(), &inputs, 1e-6);
}

#[test]
fn lora_linear_both_layouts() {
    // x·w = [7, 10]; x·a = 3; (alpha / r)·(x·a)·b = 2·[3, -3]; + bias 0.5.
    let x = f(&[1, 2], &[1.0, 2.0]);
    let bias = f(&[2], &[0.5, 0.5]);
    let want = f(&[1, 2], &[13.5, 4.5]);
    let in_out = [
        x.clone(),
        f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]),
        f(&[2, 1], &[1.0, 1.0]),
        f(&[1, 2], &[1.0, -1.0]),
        bias.clone(),
    ];
    check_op(
        "lora_linear",
        "alpha=2.0 layout=in_out",
        &in_out,
        want.clone(),
    );
    let out_in = [
        x,
        f(&[2, 2], &[1.0, 3.0, 2.0, 4.0]),
        f(&[1, 2], &[1.0, 1.0]),
        f(&[2, 1], &[1.0, -1.0]),
        bias,
    ];
    check_op("lora_linear", "alpha=2.0 layout=out_in", &out_in, want);
    check_op(
        "lora_linear",
        "alpha=2.0 layout=out_in",
        &out_in[..4],
        f(&[1, 2], &[13.0, 4.0]),
    );
}

#[test]
fn lora_linear_equals_matmuls() {
    let lora = "func @f(%x: f32[B, T, d]) -> (y: f32[B, T, o]) where d = 4, o = 3, r = 2 {
  param @w: f32[o, d]
  param @a: f32[r, d]
  param @b: f32[o, r]
  %y = lora_linear(%x, @w, @a, @b) alpha=8.0 layout=out_in : f32[B, T, o]
  return %y
}";
    let unfused = "func @f(%x: f32[B, T, d]) -> (y: f32[B, T, o]) where d = 4, o = 3, r = 2 {
  param @w: f32[o, d]
  param @a: f32[r, d]
  param @b: f32[o, r]
  %xw = matmul(%x, @w) transpose_b=true : f32[B, T, o]
  %xa = matmul(%x, @a) transpose_b=true : f32[B, T, r]
  %xab = matmul(%xa, @b) transpose_b=true : f32[B, T, o]
  %s = constant() value=4.0 dtype=f32 shape=[] : f32[]
  %low = mul(%xab, %s) : f32[B, T, o]
  %y = add(%xw, %low) : f32[B, T, o]
  return %y
}";
    let weights = Weights::from([
        ("w".to_string(), random(20, &[3, 4])),
        ("a".to_string(), random(21, &[2, 4])),
        ("b".to_string(), random(22, &[3, 2])),
    ]);
    check_same(lora, unfused, &weights, &[random(23, &[2, 3, 4])], 1e-5);
}

/// A pre-LN encoder block with symbolic batch and length.
const BLOCK: &str = "func @block(%x: f32[B, T, d]) -> (y: f32[B, T, d])
    where d = 8, h = 2, dh = d / h, f = 2 * d {
  param @ln.weight: f32[d]
  param @ln.bias: f32[d]
  param @qkv: f32[d, 3 * d]
  param @o: f32[d, d]
  param @up: f32[d, f]
  param @down: f32[f, d]
  %h1 = layer_norm(%x, @ln.weight, @ln.bias) eps=1e-5 : f32[B, T, d]
  %qkv = matmul(%h1, @qkv) : f32[B, T, 3 * d]
  %q = slice(%qkv) axis=2 start=0 end=d : f32[B, T, d]
  %k = slice(%qkv) axis=2 start=d end=2 * d : f32[B, T, d]
  %v = slice(%qkv) axis=2 start=2 * d end=3 * d : f32[B, T, d]
  %qh = reshape(%q) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %kh = reshape(%k) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %vh = reshape(%v) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %qt = permute(%qh) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %kt = permute(%kh) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %vt = permute(%vh) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %ctx = attention(%qt, %kt, %vt) causal=true scale=0.5 : f32[B, h, T, dh]
  %ctx_t = permute(%ctx) perm=[0, 2, 1, 3] : f32[B, T, h, dh]
  %merged = reshape(%ctx_t) shape=[B, T, d] : f32[B, T, d]
  %attn = matmul(%merged, @o) : f32[B, T, d]
  %r1 = add(%x, %attn) : f32[B, T, d]
  %up = matmul(%r1, @up) : f32[B, T, f]
  %act = gelu(%up) : f32[B, T, f]
  %down = matmul(%act, @down) : f32[B, T, d]
  %y = add(%r1, %down) : f32[B, T, d]
  return %y
}";

fn block_weights() -> Weights {
    Weights::from([
        ("ln.weight".to_string(), random(30, &[8])),
        ("ln.bias".to_string(), random(31, &[8])),
        ("qkv".to_string(), random(32, &[8, 24])),
        ("o".to_string(), random(33, &[8, 8])),
        ("up".to_string(), random(34, &[8, 16])),
        ("down".to_string(), random(35, &[16, 8])),
        // Weights the graph does not use are allowed.
        ("unused".to_string(), random(36, &[1])),
    ])
}

#[test]
fn one_executable_runs_many_shapes() {
    let graph = parse_graph(BLOCK).unwrap();
    let mut exe = Interpreter.compile(&graph, &block_weights()).unwrap();
    let x = random(37, &[2, 3, 8]);
    let both = exe.run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(both[0].shape(), &[2, 3, 8]);
    // Batch rows are independent: row 1 alone gives the same result.
    let row1 = Tensor::f32(vec![1, 3, 8], x.as_f32().unwrap()[24..].to_vec()).unwrap();
    let alone = exe.run(&[row1]).unwrap();
    let want = Tensor::f32(vec![1, 3, 8], both[0].as_f32().unwrap()[24..].to_vec()).unwrap();
    assert_close(&alone[0], &want, 0.0, NonFinite::Reject, BLOCK);
    // Causal: the first 2 positions do not depend on the third.
    let prefix: Vec<f32> = x.as_f32().unwrap()[..16].to_vec();
    let short = exe
        .run(&[Tensor::f32(vec![1, 2, 8], prefix).unwrap()])
        .unwrap();
    let want = Tensor::f32(vec![1, 2, 8], both[0].as_f32().unwrap()[..16].to_vec()).unwrap();
    assert_close(&short[0], &want, 0.0, NonFinite::Reject, BLOCK);
}

const MATMUL: &str = "func @f(%a: f32[B, T], %b: f32[T, d]) -> (y: f32[B, d]) where d = 2 {
  %y = matmul(%a, %b) : f32[B, d]
  return %y
}";

#[test]
fn inputs_that_contradict_the_signature() {
    let none = Weights::new();
    check_error(
        MATMUL,
        &none,
        &[random(1, &[1, 3]), random(2, &[4, 2])],
        "input %b: axis 0 is `T`, which is 3 (from axis 1 of input %a), but this tensor has 4",
    );
    check_error(
        MATMUL,
        &none,
        &[random(1, &[1, 3]), random(2, &[3, 5])],
        "input %b: axis 1 is `d` = 2, but this tensor has 5",
    );
    check_error(
        MATMUL,
        &none,
        &[i64s(&[1, 1], &[0]), random(2, &[1, 2])],
        "input %a: dtype i64 contradicts the signature type f32[B, T]",
    );
    check_error(
        MATMUL,
        &none,
        &[random(1, &[3]), random(2, &[3, 2])],
        "input %a: shape [3] has rank 1, but the signature type f32[B, T] has rank 2",
    );
    check_error(
        MATMUL,
        &none,
        &[random(1, &[1, 3])],
        "@f takes 2 inputs, got 1",
    );
    // A compound dim must equal the size too.
    let src = "func @f(%a: f32[T], %b: f32[T + 1]) -> (y: f32[T]) {
  %y = neg(%a) : f32[T]
  return %y
}";
    check_error(
        src,
        &none,
        &[random(1, &[3]), random(2, &[3])],
        "input %b: axis 0 is `T + 1` = 4, but this tensor has 3",
    );
}

#[test]
fn bindings_that_fail_at_run_time() {
    let src = "func @f(%x: f32[B, N]) -> (y: f32[B, H, 2]) where H = N / 2 {
  %y = reshape(%x) shape=[B, H, 2] : f32[B, H, 2]
  return %y
}";
    let out = run(src, &Weights::new(), &[random(1, &[1, 4])]).unwrap();
    assert_eq!(out[0].shape(), &[1, 2, 2]);
    check_error(
        src,
        &Weights::new(),
        &[random(1, &[1, 3])],
        "where H = N / 2: N / 2: 3 is not divisible by 2",
    );
}

#[test]
fn weights_that_contradict_the_parameters() {
    let src = "func @f(%x: f32[B, d]) -> (y: f32[B, f]) where d = 2, f = 2 * d {
  param @w: f32[d, f]
  %y = matmul(%x, @w) : f32[B, f]
  return %y
}";
    let x = [f(&[1, 2], &[1.0, 2.0])];
    let weights = |w: Tensor| Weights::from([("w".to_string(), w)]);
    check_error(
        src,
        &Weights::new(),
        &x,
        "weight @w (f32[d, f] = [2, 4]) is missing",
    );
    check_error(
        src,
        &weights(random(1, &[2, 3])),
        &x,
        "weight @w: shape [2, 3] contradicts the parameter type f32[d, f] = [2, 4] (axis 1 differs)",
    );
    check_error(
        src,
        &weights(random(1, &[8])),
        &x,
        "weight @w: shape [8] contradicts the parameter type f32[d, f] = [2, 4]",
    );
    check_error(
        src,
        &weights(i64s(&[2, 4], &[0; 8])),
        &x,
        "weight @w: dtype i64 contradicts the parameter type f32[d, f]",
    );
    let w = f(&[2, 4], &[1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
    let out = run(src, &weights(w), &x).unwrap();
    assert_eq!(out[0], f(&[1, 4], &[1.0, 2.0, 2.0, 1.0]));
}

#[test]
fn run_time_errors_name_the_node() {
    let table = f(&[3, 2], &[0.0; 6]);
    let gather = "func @f(%t: f32[3, 2], %ids: i64[N]) -> (y: f32[N, 2]) {
  %y = gather(%t, %ids) : f32[N, 2]
  return %y
}";
    check_error(
        gather,
        &Weights::new(),
        &[table.clone(), i64s(&[2], &[0, 3])],
        "%y = gather(%t, %ids) (line 2): id 3 is out of range for a table of 3 rows",
    );
    check_error(
        gather,
        &Weights::new(),
        &[table, i64s(&[1], &[-1])],
        "%y = gather(%t, %ids) (line 2): id -1 is out of range for a table of 3 rows",
    );
    let div = "func @f(%a: i32[2], %b: i32[2]) -> (y: i32[2]) {
  %y = div(%a, %b) : i32[2]
  return %y
}";
    check_error(
        div,
        &Weights::new(),
        &[i32s(&[2], &[1, 2]), i32s(&[2], &[1, 0])],
        "%y = div(%a, %b) (line 2): integer division by zero",
    );
    // A slice whose bounds depend on a run-time symbol is checked when it runs.
    let slice = "func @f(%x: f32[N]) -> (y: f32[2]) {
  %y = slice(%x) axis=0 start=1 end=3 : f32[2]
  return %y
}";
    check_error(
        slice,
        &Weights::new(),
        &[random(1, &[2])],
        "%y = slice(%x) (line 2): slice 1..3 is out of bounds for axis 0 of size 2 in f32[2]",
    );
}

#[test]
fn graphs_the_interpreter_refuses() {
    let half = "func @f(%x: f16[2]) -> (y: f16[2]) {
  %y = neg(%x) : f16[2]
  return %y
}";
    check_error(
        half,
        &Weights::new(),
        &[],
        "input %x (line 1): dtype f16 is not supported by the graph interpreter, which holds f32 values \
         (declare the value f32: 16-bit weights of an f32 param are widened as they are read; \
         the reference and CPU backends run f16 values)",
    );
    let wrong = "func @f(%x: f32[2]) -> (y: f32[3]) {
  %y = neg(%x) : f32[3]
  return %y
}";
    let err = run(wrong, &Weights::new(), &[random(1, &[2])]).unwrap_err();
    assert!(matches!(err, RunError::Graph(_)), "{err}");
}

#[test]
fn fused_kernel_equals_its_elementwise_ops() {
    let fused = "func @f(%x: f32[B, 3], %b: f32[3]) -> (y: f32[B, 3]) {
  %y = kernel(%x, %b) body=[add(0, 1), const(0.5, f32), mul(2, 3), gelu_tanh(4)] : f32[B, 3]
  return %y
}";
    let plain = "func @f(%x: f32[B, 3], %b: f32[3]) -> (y: f32[B, 3]) {
  %s = add(%x, %b) : f32[B, 3]
  %h = constant() value=0.5 dtype=f32 shape=[] : f32[]
  %m = mul(%s, %h) : f32[B, 3]
  %y = gelu_tanh(%m) : f32[B, 3]
  return %y
}";
    let inputs = [
        Tensor::f32(vec![2, 3], vec![0.5, -1.0, 2.0, 3.0, -0.25, 0.0]).unwrap(),
        Tensor::f32(vec![3], vec![0.1, 0.2, -0.3]).unwrap(),
    ];
    check_same(fused, plain, &Weights::new(), &inputs, 0.0);
    // A body whose result does not depend on every operand still has the
    // operands' broadcast shape.
    let bcast = "func @f(%x: f32[B, 3], %b: f32[3]) -> (y: f32[B, 3]) {
  %y = kernel(%x, %b) body=[exp(1)] : f32[B, 3]
  return %y
}";
    let plain = "func @f(%x: f32[B, 3], %b: f32[3]) -> (y: f32[B, 3]) {
  %e = exp(%b) : f32[3]
  %y = expand(%e) shape=[B, 3] : f32[B, 3]
  return %y
}";
    check_same(bcast, plain, &Weights::new(), &inputs, 0.0);
}

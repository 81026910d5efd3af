//! Verifier messages for contracts that text examples cannot show (cycles,
//! builder misuse) and for several violations reported at once.

use kiln_ir::{parse_graph, verify, DType, Dim, Graph, Op, TensorType, UnaryOp};

fn check_errors(g: &Graph) -> String {
    match verify(g) {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    }
}

fn check_text(src: &str) -> String {
    check_errors(&parse_graph(src).expect("parses"))
}

#[test]
fn a_cycle_is_reported_at_a_node_on_it() {
    let ty = TensorType::new(DType::F32, vec![Dim::sym("N")]);
    let mut g = Graph::new("loop");
    let x = g.add_input("x", ty.clone());
    let a = g.add_op(Op::Binary(kiln_ir::BinaryOp::Add), &[x], ty.clone(), None);
    let b = g.add_op(Op::Unary(UnaryOp::Exp), &[a], ty.clone(), None);
    g.add_edge_unchecked(b, a, 1);
    g.set_outputs(vec![("y".into(), b)]);
    insta::assert_snapshot!(check_errors(&g), @"in @loop: %0 = add(%x, %1): the graph has a cycle through this node");
}

#[test]
fn every_violation_is_reported_not_just_the_first() {
    let src = "func @f(%x: f32[B, T, d], %m: i64[B, T]) -> (y: f32[B, T, d])
    where d = 64, h = 5, dh = d / h {
  param @w: f32[32, d]
  %a = matmul(%x, @w) : f32[B, T, d]
  %b = add(%x, %m) : f32[B, T, d]
  %c = reshape(%x) shape=[B, T, d, 2] : f32[B, T, d, 2]
  %y = exp(%x) : f32[B, T, e]
  return %y
}";
    insta::assert_snapshot!(check_text(src), @r"
    in @f: where dh = d / h: 64 is not divisible by 5 (in `d / h` with d = 64, h = 5) (line 2, column 26)
    in @f: %a = matmul(%x, @w): inner dims differ: d=64 vs 32 (f32[B, T, d] and f32[32, d]) (line 4, column 3)
    in @f: %b = add(%x, %m): operands of add must be f32 like the first operand, got i64 (operands: f32[B, T, d], i64[B, T]) (line 5, column 3)
    in @f: %c = reshape(%x): reshape changes the element count: [B, T, d] has 64 * B * T elements, [B, T, d, 2] has 128 * B * T (line 6, column 3)
    in @f: %y = exp(%x): type f32[B, T, e] mentions unbound symbol `e` (bind it in `where` or make it an input dim) (line 7, column 3)
    ");
}

#[test]
fn names_and_outputs_are_checked() {
    let src = "func @f(%x: f32[N]) -> (y: f32[N], y: f32[N]) {
  return %x, %x
}";
    let err = parse_graph(src).unwrap_err();
    insta::assert_snapshot!(err.to_string(), @"1:36: output `y` is declared twice");
    let src = "func @f(%x: f32[N]) -> (y: f32[N, 2]) {
  %y = exp(%x) : f32[N]
  return %y
}";
    insta::assert_snapshot!(check_text(src), @"in @f: output `y` (returns %y): signature does not match the returned value: declared type f32[N, 2] differs from the inferred f32[N]: rank 2 vs 1 (line 1, column 25)");
}

#[test]
fn symbols_bound_to_expressions_compare_by_value() {
    let src = "func @f(%x: f32[B, T, d]) -> (y: f32[B, T, h, dh])
    where d = 768, h = 12, dh = d / h {
  %y = reshape(%x) shape=[B, T, 12, 64] : f32[B, T, h, dh]
  return %y
}";
    assert_eq!(check_text(src), "ok");
    let src = "func @f(%x: f32[B, S], %y: f32[B, T]) -> (z: f32[B, S + T])
{
  %z = concat(%x, %y) axis=1 : f32[B, T + S]
  return %z
}";
    assert_eq!(check_text(src), "ok");
}

const CACHED: &str = "func @decode(%t: f32[B, T, 4], %past: f32[B, S, 4] cache=cache, %enc: f32[B, 3] carried) -> (y: f32[B, T, 4], cache: f32[B, S + T, 4] cache_axis=1) {
  %cache = concat(%past, %t) axis=1 : f32[B, S + T, 4]
  %y = exp(%t) : f32[B, T, 4]
  return %y, %cache
}";

#[test]
fn cache_and_carried_inputs_round_trip_and_verify() {
    let g = parse_graph(CACHED).expect("parses");
    assert_eq!(check_errors(&g), "ok");
    let printed = kiln_ir::print_graph(&g);
    assert_eq!(parse_graph(&printed).expect("reparses"), g);
    assert!(
        printed.contains("%past: f32[B, S, 4] cache=cache"),
        "{printed}"
    );
    assert!(printed.contains("%enc: f32[B, 3] carried"), "{printed}");
    assert!(
        printed.contains("cache: f32[B, S + T, 4] cache_axis=1"),
        "{printed}"
    );
    // Roles are part of the graph: dropping one makes it another graph.
    let plain = parse_graph(&CACHED.replace(" carried", "")).expect("parses");
    assert_ne!(plain, g);
}

#[test]
fn a_cache_must_grow_into_its_output_along_its_axis() {
    let wrong_axis = CACHED.replace("cache_axis=1", "cache_axis=2");
    insta::assert_snapshot!(check_text(&wrong_axis), @"in @decode: input %past: a cache of f32[B, S, 4] cannot grow into output `cache` of f32[B, S + T, 4] along axis 2 (line 1, column 32)");
    let no_output = CACHED.replace("cache=cache", "cache=nothing");
    insta::assert_snapshot!(check_text(&no_output), @"in @decode: input %past: cache=nothing names no cache output (declare `nothing: … cache_axis=N`) (line 1, column 32)");
    let bad_axis = parse_graph(&CACHED.replace("cache_axis=1", "cache_axis=7")).unwrap_err();
    insta::assert_snapshot!(bad_axis.to_string(), @"1:146: cache_axis=7 is not an axis of f32[B, S + T, 4]");
}

#[test]
fn replace_op_re_infers_the_type_and_changes_nothing_on_an_error() {
    let mut g = parse_graph(
        "func @f(%x: f32[B, 4], %m: i64[B, 4]) -> (y: f32[B, 4]) {
  %y = exp(%x) : f32[B, 4]
  return %y
}",
    )
    .expect("parses");
    let cx = verify(&g).expect("verifies");
    let (x, m) = (g.inputs()[0], g.inputs()[1]);
    let y = g.outputs()[0].1;
    let sum = Op::Reduce {
        kind: kiln_ir::ReduceKind::Sum,
        axes: vec![1],
        keepdim: false,
    };
    g.replace_op(y, sum, &[x], &cx)
        .expect("a reduction of %x types");
    assert_eq!(g.ty(y).to_string(), "f32[B]");
    let before = kiln_ir::print_graph(&g);
    let err = g
        .replace_op(y, Op::Binary(kiln_ir::BinaryOp::Add), &[x, m], &cx)
        .unwrap_err();
    assert!(err.to_string().contains("i64"), "{err}");
    assert_eq!(
        kiln_ir::print_graph(&g),
        before,
        "a failed replace changes nothing"
    );
    let added = g
        .add_op_inferred(Op::Unary(UnaryOp::Neg), &[x], None, &cx)
        .expect("neg types");
    assert_eq!(g.ty(added).to_string(), "f32[B, 4]");
}

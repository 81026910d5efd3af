//! Review of the lowering layer: small graphs on which the reference executor
//! (a lowered Program) disagrees with the graph interpreter, the oracle. Each
//! test names the decision of the lowering it catches.

mod support;

use kiln::backends::lower;
use kiln::backends::{Backend, Interpreter, Reference};
use kiln::ir::Graph;
use kiln::Tensor;
use support::{NonFinite, Tolerance};

fn graph(text: &str) -> Graph {
    kiln::ir::parse_graph(text).unwrap_or_else(|e| panic!("{e}"))
}

/// Seeded inputs for `g` with its run-time symbols bound by `sizes`.
fn inputs(g: &Graph, sizes: &[(&str, i64)]) -> Vec<Tensor> {
    support::seeded_inputs(g, sizes, |u| (u * 5.0) as i64, 7)
}

/// Runs `text` on the interpreter and on the reference executor and checks
/// that the outputs agree exactly (the Program is printed on failure).
fn check(text: &str, sizes: &[(&str, i64)]) {
    let g = graph(text);
    let ins = inputs(&g, sizes);
    check_on(&g, &ins);
}

fn check_on(g: &Graph, ins: &[Tensor]) {
    check_with(g, ins, NonFinite::Reject);
}

fn check_with(g: &Graph, ins: &[Tensor], policy: NonFinite) {
    let program = lower::lower(g)
        .map(|p| p.to_text(None))
        .unwrap_or_else(|e| format!("does not lower: {e}"));
    let want = Interpreter
        .compile(g, &Default::default())
        .and_then(|mut e| e.run(ins))
        .unwrap_or_else(|e| panic!("interp: {e}"));
    let got = Reference
        .compile(g, &Default::default())
        .and_then(|mut e| e.run(ins))
        .unwrap_or_else(|e| panic!("reference: {e}\n{program}"));
    let (want, got) = (support::named(g, want), support::named(g, got));
    support::outputs_deviation(&got, &want, &|_| policy)
        .and_then(|d| d.within(Tolerance::Relative(0.0)))
        .unwrap_or_else(|e| panic!("{e}\n{program}"));
}

/// A cache output that puts the new positions *before* the past: the concat
/// writes into the cache in place (`result_place`), so its first copy (the new
/// rows, to positions 0..T) overwrites the past before the second copy reads it.
#[test]
fn prepending_to_a_cache_reads_the_past_before_overwriting_it() {
    check(
        "func @f(%new: f32[1, 2, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, T + S, 4] cache_axis=2) {
  %kc = concat(%new, %past) axis=2 : f32[1, 2, T + S, 4]
  return %kc
}",
        &[("T", 2), ("S", 3)],
    );
}

/// A cache output computed by a loop: copy elimination redirects the loop to
/// write straight into the cache, at the loop's step, while a later step
/// still reads the past from the same positions of the cache.
#[test]
fn a_cache_output_written_early_does_not_clobber_the_past_a_later_step_reads() {
    check(
        "func @f(%new: f32[1, 2, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, T + S, 4] cache_axis=2, y: f32[1, 2, S, 4]) {
  %c = concat(%new, %past) axis=2 : f32[1, 2, T + S, 4]
  %e = exp(%c) : f32[1, 2, T + S, 4]
  %y = neg(%past) : f32[1, 2, S, 4]
  return %e, %y
}",
        &[("T", 2), ("S", 3)],
    );
}

/// Two concats onto the same past: the first is appended in place; the
/// second (the cache output) is placed in the cache too and writes its new
/// rows over the first one's, which `y` still returns.
#[test]
fn two_concats_onto_one_past_keep_both_values() {
    check(
        "func @f(%n1: f32[1, 2, T, 4], %n2: f32[1, 2, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, S + T, 4] cache_axis=2, y: f32[1, 2, S + T, 4]) {
  %a = concat(%past, %n1) axis=2 : f32[1, 2, S + T, 4]
  %b = concat(%past, %n2) axis=2 : f32[1, 2, S + T, 4]
  return %b, %a
}",
        &[("T", 2), ("S", 3)],
    );
}

/// Two in-place appends onto overlapping regions of one cache (the whole
/// past, and the past of head 0 only): `appended` compares exact layouts, so
/// the second append writes over the first one's new rows of head 0.
#[test]
fn appends_onto_overlapping_parts_of_a_cache_do_not_overwrite_each_other() {
    check(
        "func @f(%n1: f32[1, 2, T, 4], %n2: f32[1, 1, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, S + T, 4] cache_axis=2, y: f32[1, 1, S + T, 4]) {
  %a = concat(%past, %n1) axis=2 : f32[1, 2, S + T, 4]
  %p0 = slice(%past) axis=1 start=0 end=1 : f32[1, 1, S, 4]
  %b = concat(%p0, %n2) axis=2 : f32[1, 1, S + T, 4]
  return %a, %b
}",
        &[("T", 2), ("S", 3)],
    );
}

/// A slice whose symbolic end lies past its operand (a slice of a slice)
/// but inside the root buffer: the interpreter rejects the run; the Program
/// verifier checks views against their root only, so the reference executor
/// silently reads the next row.
#[test]
fn a_slice_past_the_end_of_a_view_is_an_error_not_the_next_row() {
    let g = graph(
        "func @f(%x: f32[3, T], %n: f32[S]) -> (y: f32[1, S]) {
  %a = slice(%x) axis=0 start=0 end=1 : f32[1, T]
  %b = slice(%a) axis=1 start=0 end=S : f32[1, S]
  %y = neg(%b) : f32[1, S]
  return %y
}",
    );
    let ins = inputs(&g, &[("T", 2), ("S", 4)]);
    let interp = Interpreter
        .compile(&g, &Default::default())
        .and_then(|mut e| e.run(&ins));
    assert!(interp.is_err(), "the oracle rejects the slice");
    let got = Reference
        .compile(&g, &Default::default())
        .and_then(|mut e| e.run(&ins));
    assert!(
        got.is_err(),
        "the reference executor read past the slice's operand: {got:?}"
    );
}

/// A reshape between zero-size shapes whose groups do not line up: no view
/// expresses it, and the copy fallback then fails to view its contiguous
/// destination, so a graph the interpreter runs does not lower.
#[test]
fn a_reshape_of_zero_elements_lowers() {
    check(
        "func @f(%x: f32[2, 0]) -> (y: f32[0, 5]) {
  %r = reshape(%x) shape=[0, 5] : f32[0, 5]
  %y = neg(%r) : f32[0, 5]
  return %y
}",
        &[],
    );
}

/// An append in place that is not the cache output: the cache's capacity is
/// sized for the outputs (`S` here), but the append writes positions
/// `S..S+T`, outside it, so a graph the interpreter runs fails to run.
#[test]
fn an_append_that_is_not_the_cache_output_stays_inside_the_cache() {
    check(
        "func @f(%n1: f32[1, 2, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, S, 4] cache_axis=2, y: f32[1, 2, S + T, 4]) {
  %a = concat(%past, %n1) axis=2 : f32[1, 2, S + T, 4]
  return %past, %a
}",
        &[("T", 2), ("S", 3)],
    );
}

/// A decode step that fails (a token id outside the vocabulary) must leave
/// the session as it was: the interpreter's session does, but the reference
/// session has already taken its caches out of the session when the step
/// fails, and the next (good) step then reports a cache of another layout.
#[test]
fn a_failed_decode_step_leaves_the_session_usable() {
    use kiln::OptLevel;
    let split = support::hf_model("llama")
        .optimize(OptLevel::O2)
        .expect("O2")
        .kv_split()
        .expect("split");
    let tokens = |rows: &[&[i64]]| Tensor::from_tokens(rows).expect("tokens");
    let mut logits = Vec::new();
    for backend in support::BACKENDS {
        let b = backend.name();
        let mut session = split.session(backend, 8).expect("session");
        session
            .call("prefill", &[tokens(&[&[5, 17, 42]])])
            .expect("prefill");
        let err = session.call("decode", &[tokens(&[&[1_000_000]])]);
        assert!(
            err.is_err(),
            "{b}: an id outside the vocabulary is an error"
        );
        let got = session
            .call("decode", &[tokens(&[&[3]])])
            .unwrap_or_else(|e| panic!("{b}: the step after a failed one: {e}"));
        logits.push(got);
    }
    support::outputs_deviation(&logits[1], &logits[0], &|_| NonFinite::Reject)
        .and_then(|d| d.within(Tolerance::Relative(1e-6)))
        .unwrap_or_else(|e| panic!("{e}"));
}

// A byte source that lends different bytes on different calls could make a
// `Buf` hand out invalid values; `ByteSource` is therefore an `unsafe trait`
// whose implementors promise the same bytes on every call (the review's
// `Flipping` source no longer compiles without an `unsafe impl`).

/// Rope of a rank-2 input with `[B, T]` positions (so B = T = axis 0): the
/// interpreter reads position `[t, t]` for row `t`; the lowering builds the
/// positions view with `strides[0]` set twice (axes 0 and r - 2 coincide),
/// so the reference reads `[0, t]`.
#[test]
fn rope_of_a_rank_two_input_with_batched_positions() {
    check(
        "func @f(%x: f32[4, 8], %p: i64[4, 4]) -> (y: f32[4, 8]) {
  %y = rope(%x, %p) theta=10000.0 : f32[4, 8]
  return %y
}",
        &[],
    );
}

/// A cache output shorter than its input (a window that drops its oldest
/// position): without a session the capacity is sized for the outputs only
/// (`cache_need`), so the `cache=` input's view (`S` positions) does not fit
/// in the `S - 1` positions allocated.
#[test]
fn a_cache_that_shrinks_fits_its_input() {
    check(
        "func @f(%past: f32[2, S, 4] cache=kc) -> (kc: f32[2, S - 1, 4] cache_axis=1) {
  %kc = slice(%past) axis=1 start=1 end=S : f32[2, S - 1, 4]
  return %kc
}",
        &[("S", 3)],
    );
}

/// Two `cache=` inputs naming one cache would share one state buffer: the
/// IR verifier refuses the graph instead.
#[test]
fn two_inputs_of_one_cache_do_not_share_memory_silently() {
    let g = graph(
        "func @f(%p1: f32[2, S, 4] cache=kc, %p2: f32[2, S, 4] cache=kc, %n: f32[2, T, 4]) -> (kc: f32[2, S + T, 4] cache_axis=1, y: f32[2, S, 4]) {
  %kc = concat(%p1, %n) axis=1 : f32[2, S + T, 4]
  %y = neg(%p2) : f32[2, S, 4]
  return %kc, %y
}",
    );
    let err = kiln::ir::verify(&g).unwrap_err().to_string();
    assert!(err.contains("a second input reads the cache kc"), "{err}");
}

/// `p` verified structurally and under `sizes`, with its own arena plan.
fn verify_all(p: &lower::Program, sizes: &[(&str, i64)]) -> Result<(), String> {
    let mut cx = kiln::ir::ShapeCx::new();
    for (n, v) in sizes {
        cx.bind(n, &kiln::ir::Dim::constant(*v)).unwrap();
    }
    lower::verify::verify_structure(p).map_err(|e| e.to_string())?;
    let plan = lower::ArenaPlan::place(p, &cx).map_err(|e| e.to_string())?;
    lower::verify::verify_binding(p, &cx, &plan).map_err(|e| e.to_string())
}

/// The Program of [`prepending_to_a_cache_reads_the_past_before_overwriting_it`]
/// once wrote positions `0..T` of the cache and then read `0..S` as the past.
/// Lowering now writes a cache only after every read of its past; the
/// Program verifies.
#[test]
fn a_cache_is_written_only_after_its_past_is_read() {
    let g = graph(
        "func @f(%new: f32[1, 2, T, 4], %past: f32[1, 2, S, 4] cache=kc) -> (kc: f32[1, 2, T + S, 4] cache_axis=2) {
  %kc = concat(%new, %past) axis=2 : f32[1, 2, T + S, 4]
  return %kc
}",
    );
    let p = lower::lower(&g).expect("lowers");
    let sizes = [("T", 2), ("S", 3), ("Smax", 5)];
    verify_all(&p, &sizes).unwrap_or_else(|e| panic!("{e}"));
    let state = p.states[0].root;
    let reads: Vec<usize> = (0..p.steps.len())
        .filter(|&i| p.steps[i].inputs.iter().any(|&b| p.root(b) == state))
        .collect();
    let writes: Vec<usize> = (0..p.steps.len())
        .filter(|&i| p.root(p.steps[i].output) == state)
        .collect();
    assert!(
        reads.iter().max() < writes.iter().min(),
        "reads {reads:?}, writes {writes:?}:\n{}",
        p.to_text(None)
    );
}

/// "No step reads a buffer before it is written" is checked per root buffer:
/// a Program whose concat temporary has only one of its two halves written
/// passes, and the reader sees whatever the arena held.
#[test]
fn the_verifier_reports_a_read_of_a_half_written_temporary() {
    let g = graph(
        "func @f(%x: f32[B, 4]) -> (y: f32[B, 8]) {
  %e = exp(%x) : f32[B, 4]
  %c = concat(%e, %x) axis=1 : f32[B, 8]
  %y = neg(%c) : f32[B, 8]
  return %y
}",
    );
    let mut p = lower::lower(&g).expect("lowers");
    let copy = p
        .steps
        .iter()
        .position(|s| s.kernel == lower::Kernel::Copy)
        .expect("the copy of %x into the concat");
    p.steps.remove(copy);
    p.liveness = lower::Liveness::of(&p);
    assert!(
        verify_all(&p, &[("B", 2)]).is_err(),
        "half of the concat is never written:\n{}",
        p.to_text(None)
    );
}

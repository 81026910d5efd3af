//! Text IR round trip: `parse(print(g)) == g` for random well-typed graphs, and
//! the parser never panics, whatever bytes it is given.

use kiln_ir::{parse_graph, parse_module, print_graph, verify, Dim};
use proptest::prelude::*;

// The round trip needs only `random_graph`, not the generator's other forms.
#[allow(dead_code)]
#[path = "../../tests/support/random_graph.rs"]
mod random_graph;
use random_graph::random_graph;

fn floats() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
        Just(1e-5),
        Just(0.125),
        Just(f64::NEG_INFINITY),
        Just(f64::NAN),
        Just(-0.0),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn print_then_parse_is_identity(ops in prop::collection::vec(any::<u32>(), 1..40), floats in prop::collection::vec(floats(), 1..8)) {
        let g = random_graph(&ops, &floats);
        let text = print_graph(&g);
        let back = parse_graph(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(back == g, "round trip changed the graph:\n{}", text);
        prop_assert_eq!(print_graph(&back), text);
        prop_assert!(verify(&back).is_ok());
    }

    #[test]
    fn dims_round_trip_through_text(coefs in prop::collection::vec(-50i64..50, 1..5), syms in prop::collection::vec(0usize..4, 1..5), div in 1i64..6) {
        let names = ["B", "T", "S", "d"];
        let mut acc = Dim::constant(0);
        for (c, s) in coefs.iter().zip(&syms) {
            let term = Dim::constant(*c).mul(&Dim::sym(names[*s])).unwrap();
            acc = acc.add(&term).unwrap();
        }
        let q = acc.div(&Dim::constant(div)).unwrap();
        let mixed = q.mul(&Dim::constant(div + 1)).unwrap().add(&q).unwrap().add(&acc).unwrap();
        let nested = q.div(&Dim::constant(div + 2)).unwrap().mul(&Dim::sym("h")).unwrap();
        for d in [acc, q, mixed, nested] {
            let back = kiln_ir::parse_dim(&d.to_string()).map_err(|e| TestCaseError::fail(format!("{e}: {d}")))?;
            prop_assert_eq!(back, d);
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_text(s in "\\PC{0,200}") {
        let _ = parse_module(&s);
    }

    #[test]
    fn parser_never_panics_on_ir_like_text(s in "[%@a-z0-9_\\[\\](){},:=+*/\\- .\\n]{0,300}") {
        if let Ok(m) = parse_module(&s) {
            let _ = kiln_ir::verify_module(&m);
        }
    }
}

/// Every prefix and many seeded corruptions of every example parse or fail
/// cleanly; those that parse also verify without panicking.
#[test]
fn truncated_and_garbled_examples_never_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = vec![];
    for sub in ["", "invalid"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "kir")),
            );
        }
    }
    assert!(!files.is_empty());
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"%@[](){},:=+-*/ \n0123456789abdhxTBSf.e-";
    for f in files {
        let src = std::fs::read(&f).unwrap();
        let try_parse = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(bytes);
            if let Ok(m) = parse_module(&text) {
                let _ = kiln_ir::verify_module(&m);
                let _ = kiln_ir::print_module(&m);
            }
        };
        for cut in 0..src.len() {
            try_parse(&src[..cut]);
        }
        for _ in 0..300 {
            let mut bytes = src.clone();
            for _ in 0..1 + rand() % 4 {
                let at = (rand() as usize) % bytes.len().max(1);
                match rand() % 3 {
                    0 if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(
                        at.min(bytes.len()),
                        alphabet[(rand() as usize) % alphabet.len()],
                    ),
                    _ if !bytes.is_empty() => {
                        bytes[at] = alphabet[(rand() as usize) % alphabet.len()]
                    }
                    _ => {}
                }
            }
            try_parse(&bytes);
        }
    }
}

#[test]
fn pathological_sizes_are_errors_not_hangs_or_panics() {
    let deep = format!(
        "func @f(%x: f32[{}B{}]) -> f32[B] {{ return %x }}",
        "(".repeat(200),
        ")".repeat(200)
    );
    assert!(parse_module(&deep).unwrap_err().message.contains("nesting"));
    let chain = format!(
        "func @f(%x: f32[B]) -> f32[B] where q = 1{} {{ return %x }}",
        " / B".repeat(50)
    );
    let _ = parse_module(&chain).map(|m| kiln_ir::verify_module(&m));
    let expand = format!(
        "func @f(%x: f32[B]) -> f32[B] where q = {} {{ return %x }}",
        (0..12)
            .map(|i| format!("(a{i} + b{i})"))
            .collect::<Vec<_>>()
            .join(" * ")
    );
    let err = parse_module(&expand).unwrap_err();
    assert!(err.message.contains("too complex"), "{err}");
    let big = "func @f(%x: f32[B, 9223372036854775807, 2]) -> f32[B] { %y = reshape(%x) shape=[B] : f32[B]\n return %y }";
    let m = parse_module(big).unwrap();
    let e = kiln_ir::verify_module(&m).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");
}

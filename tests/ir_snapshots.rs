//! Snapshots of printed IR and shape traces of the built-in models.

mod support;

#[test]
fn demo_gpt2_ir_and_trace() {
    let model = kiln::Model::demo().expect("the demo model builds");
    insta::assert_snapshot!("demo_gpt2_ir", model.to_text());
    insta::assert_snapshot!(
        "demo_gpt2_trace",
        model.shape_trace().expect("the demo model checks")
    );
}

#[test]
fn builder_errors_name_the_node_and_both_shapes() {
    use kiln::ir::{DType, Dim, GraphBuilder, TensorType};
    let mut b = GraphBuilder::new("f");
    b.bind("d", 768).unwrap();
    let x = b.input(
        "x",
        TensorType::new(
            DType::F32,
            vec![Dim::sym("B"), Dim::sym("T"), Dim::sym("d")],
        ),
    );
    let w = b.param(
        "c_attn.weight",
        TensorType::new(DType::F32, vec![Dim::constant(512), Dim::constant(2304)]),
    );
    let err = b.matmul(x, w).unwrap_err();
    insta::assert_snapshot!(err.to_string(), @"%new = matmul(%x, @c_attn.weight): inner dims differ: d=768 vs 512 (f32[B, T, d] and f32[512, 2304])");
}

#[test]
fn hugging_face_family_graphs() {
    for family in support::FAMILIES {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/hf")
            .join(family);
        let model = kiln::Model::load(&dir).expect("the test model loads");
        insta::assert_snapshot!(format!("hf_{family}_ir"), model.to_text());
    }
}

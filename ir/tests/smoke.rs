#[test]
fn smoke() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/encoder_block_preln.kir")).unwrap();
    let g = kiln_ir::parse_graph(&src).unwrap();
    let cx = kiln_ir::verify(&g).unwrap_or_else(|e| panic!("{e}"));
    let p = kiln_ir::print_graph(&g);
    println!("{p}");
    println!("{}", kiln_ir::trace::shape_trace(&g, &cx));
    let g2 = kiln_ir::parse_graph(&p).unwrap();
    assert_eq!(g, g2);
    assert_eq!(kiln_ir::print_graph(&g2), p);
}

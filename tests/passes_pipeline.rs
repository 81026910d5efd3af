//! The pass manager: pipelines, registry, verification after every pass, and
//! the interpreter's outputs preserved by the default pipeline on every family.

mod support;

use kiln::{OptLevel, PassManager};
use support::{check_preserves, family_inputs, hf_model, FAMILIES};

#[test]
fn default_pipeline_preserves_every_family() {
    for family in FAMILIES {
        let model = hf_model(family);
        check_preserves(
            &model,
            &PassManager::pipeline(OptLevel::O2),
            &family_inputs(&model),
            1e-5,
        );
    }
}

#[test]
fn unknown_pass_names_are_errors() {
    let err = PassManager::from_names(&["dce", "fuse-everything"])
        .err()
        .expect("unknown pass");
    assert!(
        err.to_string()
            .starts_with("unknown pass `fuse-everything` (known passes: canonicalize"),
        "{err}"
    );
}

#[test]
fn dce_removes_unused_nodes_and_parameters() {
    let src = "func @f(%x: f32[N]) -> (y: f32[N]) {
  param @unused: f32[N]
  %a = exp(%x) : f32[N]
  %b = add(%a, @unused) : f32[N]
  %y = tanh(%x) : f32[N]
  return %y
}";
    let model = kiln::Model::from_text(src, "dce").unwrap();
    let (out, cx) = model
        .apply_passes(&PassManager::from_names(&["dce"]).unwrap())
        .unwrap();
    insta::assert_snapshot!(out.to_text(), @r"
    func @f(%x: f32[N]) -> (y: f32[N]) {
      %y = tanh(%x) : f32[N]
      return %y
    }
    ");
    assert_eq!(cx.log[0].notes, vec!["removed 3 dead nodes".to_string()]);
}

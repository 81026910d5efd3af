//! The test support checked on its own: the one comparison fails on NaN and
//! infinities on either side, naming the output and the element, and the
//! property runner fails a test that skipped most of its cases.

mod support;

use kiln::Tensor;
use proptest::prelude::*;
use support::{
    assert_close, deviation, max_relative_error, outputs_deviation, run_property, Case, Compare,
    Mismatch, NonFinite, Side, Tally, Tolerance,
};

/// The side and index of a non-finite-element error (NaN is not equal to
/// itself, so the errors are matched rather than compared).
fn where_non_finite<T: std::fmt::Debug>(r: Result<T, Mismatch>) -> (String, Side, usize) {
    match r {
        Err(Mismatch::NonFinite {
            output,
            side,
            index,
            value,
        }) => {
            assert!(!value.is_finite(), "{value}");
            (output, side, index)
        }
        other => panic!("expected a non-finite element, got {other:?}"),
    }
}

fn at(side: Side, index: usize) -> (String, Side, usize) {
    ("y".to_string(), side, index)
}

fn check(got: &[f32], want: &[f32]) -> Result<f64, Mismatch> {
    deviation("y", got, want, &Compare::default())
        .and_then(|d| d.within(Tolerance::Relative(1e-5)))
        .map(|d| d.relative())
}

#[test]
fn a_nan_or_an_infinity_on_either_side_fails_at_its_first_element() {
    let want = [1.0, 2.0, 3.0, 4.0];
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    assert_eq!(check(&want, &want), Ok(0.0));
    assert_eq!(
        where_non_finite(check(&[nan; 4], &want)),
        at(Side::Output, 0)
    );
    assert_eq!(
        where_non_finite(check(&[1.0, 2.0, inf, -inf], &want)),
        at(Side::Output, 2)
    );
    assert_eq!(
        where_non_finite(check(&want, &[1.0, -inf, 3.0, inf])),
        at(Side::Reference, 1)
    );
    // Both sides NaN in the same places is no agreement either.
    let both = check(&[1.0, nan, 3.0, 4.0], &[1.0, nan, 3.0, 4.0]);
    assert_eq!(
        both.clone().unwrap_err().to_string(),
        "y: element 1 of the reference is NaN",
        "the message names the output and the element"
    );
    assert_eq!(where_non_finite(both), at(Side::Reference, 1));
    // Positions that are not measured must be finite all the same.
    let compare = Compare {
        keep: &|i| i != 3,
        ..Compare::default()
    };
    assert_eq!(
        where_non_finite(deviation("y", &[1.0, 2.0, 3.0, nan], &want, &compare)),
        at(Side::Output, 3)
    );
    assert_eq!(
        deviation("y", &[1.0f32, 2.0, 3.0, 9.0], &want, &compare).map(|d| d.max_diff),
        Ok(0.0)
    );
}

#[test]
fn the_panicking_forms_reject_nan_and_infinity() {
    let want = vec![0.5f32; 6];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let got = vec![bad; 6];
        let panicked = std::panic::catch_unwind(|| {
            assert_close("logits", &got, &want, Tolerance::Relative(1e-5))
        });
        let message = panicked.expect_err("a non-finite output must fail");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.starts_with("logits: element 0 of the output is"),
            "{message}"
        );
        let outputs = |x: &[f32]| {
            vec![(
                "logits".to_string(),
                Tensor::f32(vec![2, 3], x.to_vec()).unwrap(),
            )]
        };
        let (got, want) = (outputs(&got), outputs(&want));
        assert!(std::panic::catch_unwind(|| max_relative_error(&want, &got)).is_err());
        assert!(std::panic::catch_unwind(|| max_relative_error(&got, &want)).is_err());
    }
}

#[test]
fn tolerances_are_relative_to_the_largest_reference_or_absolute() {
    let want = [0.0f32, -2.0, 4.0];
    let got = [0.0f32, -2.0, 4.001];
    let d = deviation("y", &got, &want, &Compare::default()).unwrap();
    assert!((d.relative() - 0.001 / 4.0).abs() < 1e-6, "{d}");
    assert!(d.clone().within(Tolerance::Relative(1e-3)).is_ok());
    assert!(d.clone().within(Tolerance::Relative(1e-4)).is_err());
    assert!(d.clone().within(Tolerance::Absolute(2e-3)).is_ok());
    assert!(matches!(
        d.within(Tolerance::Absolute(1e-4)),
        Err(Mismatch::Apart { .. })
    ));
    assert!(matches!(
        deviation("y", &got[..2], &want, &Compare::default()),
        Err(Mismatch::Layout { .. })
    ));
}

#[test]
fn matching_the_reference_allows_only_the_non_finite_elements_it_has() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let compare = Compare {
        non_finite: NonFinite::MatchReference,
        ..Compare::default()
    };
    let want = [nan, -inf, 1.0];
    assert!(deviation("y", &[nan, -inf, 1.0], &want, &compare).is_ok());
    for got in [[nan, inf, 1.0], [nan, 0.0, 1.0], [0.0, -inf, 1.0]] {
        let e = deviation("y", &got, &want, &compare).unwrap_err();
        assert!(matches!(e, Mismatch::NotReproduced { .. }), "{e:?}");
    }
    assert_eq!(
        deviation("y", &[nan, 0.0, 1.0], &want, &compare)
            .unwrap_err()
            .to_string(),
        "y: element 1 is 0, the reference's -inf"
    );
    assert_eq!(
        where_non_finite(deviation("y", &[nan, -inf, nan], &want, &compare)),
        at(Side::Output, 2)
    );
    // Output by output: only the outputs named may hold what the reference holds.
    let outs = |y: f32| {
        vec![
            ("a".to_string(), Tensor::f32(vec![1], vec![1.0]).unwrap()),
            ("nans".to_string(), Tensor::f32(vec![1], vec![y]).unwrap()),
        ]
    };
    let policy = |name: &str| {
        if name == "nans" {
            NonFinite::MatchReference
        } else {
            NonFinite::Reject
        }
    };
    assert!(outputs_deviation(&outs(nan), &outs(nan), &policy).is_ok());
    assert!(outputs_deviation(&outs(nan), &outs(nan), &|_| NonFinite::Reject).is_err());
}

fn seeded(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(7),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[test]
fn a_property_test_that_skips_most_cases_fails() {
    let skip_odd = |x: u32| {
        Ok(if x % 2 == 1 {
            Case::Skipped("odd")
        } else {
            Case::Ran
        })
    };
    let tally = run_property(seeded(64), 0u32..1000, skip_odd).unwrap();
    assert_eq!(tally.total(), 64);
    assert!(tally.ran > 10 && tally.ran < 54, "{tally}");
    let e = tally.most_ran().unwrap_err();
    assert!(e.contains("skipped: odd: "), "{e}");
    assert!(e.ends_with("at least 80% must run"), "{e}");

    let mostly = run_property(seeded(64), 0u32..1000, |x| {
        Ok(if x % 10 == 0 {
            Case::Skipped("a multiple of ten")
        } else {
            Case::Ran
        })
    })
    .unwrap();
    assert_eq!(mostly.total(), 64);
    mostly.most_ran().unwrap();

    assert!(Tally::default().most_ran().is_err(), "no case at all");
    let failing = run_property(seeded(64), 0u32..1000, |x| {
        prop_assert!(x < 500);
        Ok(Case::Ran)
    });
    let e = failing.unwrap_err();
    assert!(
        e.contains("500"),
        "the minimal failing case is reported: {e}"
    );
}

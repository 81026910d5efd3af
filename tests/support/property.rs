//! Property tests that count the cases they skip. A random graph the
//! interpreter cannot run, or whose reference output is not finite, says
//! nothing about a pass; a property test that skipped most of its cases would
//! pass while testing little, so it fails unless most of them ran.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// How one case of a property test ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// The property was checked.
    Ran,
    /// The case could not check the property, for this reason.
    Skipped(&'static str),
}

/// The least fraction of a property test's cases that must run, not skip.
pub const MIN_RAN: f64 = 0.8;

/// How many cases of a property test ran, and how many were skipped and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub ran: usize,
    pub skipped: BTreeMap<&'static str, usize>,
}

impl Tally {
    /// Counts one case.
    pub fn record(&mut self, case: Case) {
        match case {
            Case::Ran => self.ran += 1,
            Case::Skipped(why) => *self.skipped.entry(why).or_default() += 1,
        }
    }

    /// The number of cases counted.
    pub fn total(&self) -> usize {
        self.ran + self.skipped.values().sum::<usize>()
    }

    /// Err, with the counts, when fewer than [`MIN_RAN`] of the cases ran.
    pub fn most_ran(&self) -> Result<(), String> {
        if self.total() > 0 && self.ran as f64 >= MIN_RAN * self.total() as f64 {
            Ok(())
        } else {
            Err(format!("{self}; at least {:.0}% must run", MIN_RAN * 100.0))
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ran {} of {} cases", self.ran, self.total())?;
        let mut sep = " (skipped: ";
        for (why, n) in &self.skipped {
            write!(f, "{sep}{why}: {n}")?;
            sep = "; ";
        }
        if !self.skipped.is_empty() {
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// Runs `test` on `config.cases` cases drawn from `strategy`; the first failing
/// case is shrunk and returned as the error, as `proptest!` reports it.
/// Otherwise returns the tally of the cases that ran and were skipped.
pub fn run_property<S>(
    config: Config,
    strategy: S,
    test: impl Fn(S::Value) -> Result<Case, TestCaseError>,
) -> Result<Tally, String>
where
    S: Strategy,
    S::Value: Debug,
{
    let tally = RefCell::new(Tally::default());
    TestRunner::new(config)
        .run(&strategy, |value| {
            let case = test(value)?;
            tally.borrow_mut().record(case);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    Ok(tally.into_inner())
}

/// [`run_property`], then panics on a failing case or when fewer than
/// [`MIN_RAN`] of the cases ran; prints the tally.
pub fn check_property<S>(
    name: &str,
    config: Config,
    strategy: S,
    test: impl Fn(S::Value) -> Result<Case, TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let tally = run_property(config, strategy, test).unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{name}: {tally}");
    tally.most_ran().unwrap_or_else(|e| panic!("{name}: {e}"));
}

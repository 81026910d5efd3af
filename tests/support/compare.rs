//! The one comparison of an output with its reference. It checks that every
//! element is finite on both sides before it measures anything: a running
//! maximum built with `f64::max` skips a NaN, so without the check an all-NaN
//! output would compare as equal to anything.

use std::fmt;

use kiln::Tensor;

/// How far an output may be from its reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// max |got − want| ≤ tol · max |want| over the compared elements (an
    /// absolute bound where the reference is all zeros).
    Relative(f64),
    /// max |got − want| ≤ tol.
    Absolute(f64),
}

/// What a comparison does with NaN and infinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonFinite {
    /// A NaN or an infinity on either side fails the comparison.
    Reject,
    /// For an output that a test graph is built to make non-finite (a NaN
    /// constant, a `-inf` mask): each NaN or infinity of the reference must be
    /// reproduced exactly (NaN by NaN, an infinity by itself); where the
    /// reference is finite the output must be finite too.
    MatchReference,
}

/// Which side of a comparison an element belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The value under test.
    Output,
    /// What it is compared with.
    Reference,
}

/// The element where an output is farthest from its reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Worst {
    pub output: String,
    pub index: usize,
    pub got: f64,
    pub want: f64,
}

/// The largest |got − want| and the largest |want| over the compared elements.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deviation {
    pub max_diff: f64,
    pub max_want: f64,
    pub worst: Option<Worst>,
}

impl Deviation {
    /// max |got − want| / max |want|, or max |got − want| when the reference is
    /// all zeros.
    pub fn relative(&self) -> f64 {
        if self.max_want > 0.0 {
            self.max_diff / self.max_want
        } else {
            self.max_diff
        }
    }

    /// The deviation of two comparisons taken together (both finite, so the
    /// maxima see every element).
    pub fn merge(self, other: Deviation) -> Deviation {
        let max_want = self.max_want.max(other.max_want);
        let (max_diff, worst) = if other.max_diff > self.max_diff || self.worst.is_none() {
            (other.max_diff, other.worst)
        } else {
            (self.max_diff, self.worst)
        };
        Deviation {
            max_diff,
            max_want,
            worst,
        }
    }

    /// `self` when it is within `tolerance`, else the mismatch.
    pub fn within(self, tolerance: Tolerance) -> Result<Deviation, Mismatch> {
        let ok = match tolerance {
            Tolerance::Relative(tol) => self.relative() <= tol,
            Tolerance::Absolute(tol) => self.max_diff <= tol,
        };
        if ok {
            Ok(self)
        } else {
            Err(Mismatch::Apart {
                deviation: self,
                tolerance,
            })
        }
    }
}

impl fmt::Display for Deviation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max |got - want| = {:.3e}, max |want| = {:.3e}, relative {:.3e}",
            self.max_diff,
            self.max_want,
            self.relative()
        )?;
        if let Some(w) = &self.worst {
            write!(
                f,
                " (worst: {}[{}], got {:e}, want {:e})",
                w.output, w.index, w.got, w.want
            )?;
        }
        Ok(())
    }
}

/// Why a comparison failed.
#[derive(Clone, Debug, PartialEq)]
pub enum Mismatch {
    /// An element is NaN or infinite where nothing allows it.
    NonFinite {
        output: String,
        side: Side,
        index: usize,
        value: f64,
    },
    /// A NaN or infinity of the reference that the output does not reproduce
    /// ([`NonFinite::MatchReference`]).
    NotReproduced {
        output: String,
        index: usize,
        got: f64,
        want: f64,
    },
    /// Output and reference differ in element count, shape, name or dtype.
    Layout { output: String, detail: String },
    /// Every element is finite but the output is too far from the reference.
    Apart {
        deviation: Deviation,
        tolerance: Tolerance,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::NonFinite {
                output,
                side,
                index,
                value,
            } => {
                let side = match side {
                    Side::Output => "output",
                    Side::Reference => "reference",
                };
                write!(f, "{output}: element {index} of the {side} is {value}")
            }
            Mismatch::NotReproduced {
                output,
                index,
                got,
                want,
            } => write!(
                f,
                "{output}: element {index} is {got}, the reference's {want}"
            ),
            Mismatch::Layout { output, detail } => write!(f, "{output}: {detail}"),
            Mismatch::Apart {
                deviation,
                tolerance,
            } => write!(f, "{deviation}, beyond {tolerance:?}"),
        }
    }
}

/// Selects what a comparison looks at; the default compares every position
/// and rejects every NaN and infinity.
#[derive(Clone, Copy)]
pub struct Compare<'a> {
    /// Which flat positions are measured (the padding of a masked encoder is
    /// not). Every position must be finite, measured or not.
    pub keep: &'a dyn Fn(usize) -> bool,
    pub non_finite: NonFinite,
}

fn every_position(_: usize) -> bool {
    true
}

impl Default for Compare<'_> {
    fn default() -> Self {
        Compare {
            keep: &every_position,
            non_finite: NonFinite::Reject,
        }
    }
}

/// Fails at the first element of `values` that is NaN or infinite.
pub fn check_finite<T: Copy + Into<f64>>(
    output: &str,
    side: Side,
    values: &[T],
) -> Result<(), Mismatch> {
    match values
        .iter()
        .map(|&v| v.into())
        .position(|v| !v.is_finite())
    {
        None => Ok(()),
        Some(index) => Err(Mismatch::NonFinite {
            output: output.to_string(),
            side,
            index,
            value: values[index].into(),
        }),
    }
}

/// How far `got` is from `want`, element by element: every element finite on
/// both sides (or, with [`NonFinite::MatchReference`], non-finite exactly where
/// the reference is), the maxima over the positions `compare.keep` selects.
pub fn deviation<G, W>(
    output: &str,
    got: &[G],
    want: &[W],
    compare: &Compare,
) -> Result<Deviation, Mismatch>
where
    G: Copy + Into<f64>,
    W: Copy + Into<f64>,
{
    if got.len() != want.len() {
        return Err(Mismatch::Layout {
            output: output.to_string(),
            detail: format!("{} elements, the reference has {}", got.len(), want.len()),
        });
    }
    if compare.non_finite == NonFinite::Reject {
        check_finite(output, Side::Reference, want)?;
    }
    let mut dev = Deviation::default();
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if !w.is_finite() {
            // Only `MatchReference` reaches here with a non-finite reference.
            let reproduced = (w.is_nan() && g.is_nan()) || g == w;
            if reproduced {
                continue;
            }
            return Err(Mismatch::NotReproduced {
                output: output.to_string(),
                index,
                got: g,
                want: w,
            });
        }
        if !g.is_finite() {
            return Err(Mismatch::NonFinite {
                output: output.to_string(),
                side: Side::Output,
                index,
                value: g,
            });
        }
        if !(compare.keep)(index) {
            continue;
        }
        let diff = (g - w).abs();
        if dev.worst.is_none() || diff > dev.max_diff {
            dev.max_diff = diff;
            dev.worst = Some(Worst {
                output: output.to_string(),
                index,
                got: g,
                want: w,
            });
        }
        dev.max_want = dev.max_want.max(w.abs());
    }
    Ok(dev)
}

/// [`deviation`] over every position, checked against `tolerance`; panics with
/// the output's name and the first non-finite element or the worst element.
pub fn assert_close<G, W>(output: &str, got: &[G], want: &[W], tolerance: Tolerance) -> Deviation
where
    G: Copy + Into<f64>,
    W: Copy + Into<f64>,
{
    deviation(output, got, want, &Compare::default())
        .and_then(|d| d.within(tolerance))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// How far the outputs `got` are from `want`, taken together: names, shapes and
/// dtypes equal, non-float outputs equal, floats as [`deviation`] measures them
/// with the policy `non_finite(name)` gives each output.
pub fn outputs_deviation(
    got: &[(String, Tensor)],
    want: &[(String, Tensor)],
    non_finite: &dyn Fn(&str) -> NonFinite,
) -> Result<Deviation, Mismatch> {
    let layout = |output: &str, detail: String| Mismatch::Layout {
        output: output.to_string(),
        detail,
    };
    if got.len() != want.len() {
        return Err(layout(
            "outputs",
            format!("{} outputs, the reference has {}", got.len(), want.len()),
        ));
    }
    let mut total = Deviation::default();
    for ((name, g), (want_name, w)) in got.iter().zip(want) {
        if name != want_name {
            return Err(layout(
                name,
                format!("the reference's output is {want_name}"),
            ));
        }
        if g.shape() != w.shape() {
            return Err(layout(
                name,
                format!("shape {:?}, the reference's {:?}", g.shape(), w.shape()),
            ));
        }
        match (g.as_f32(), w.as_f32()) {
            (Some(x), Some(y)) => {
                let compare = Compare {
                    non_finite: non_finite(name),
                    ..Compare::default()
                };
                total = total.merge(deviation(name, x, y, &compare)?);
            }
            _ if g == w => {}
            _ => return Err(layout(name, format!("{g:?}, the reference {w:?}"))),
        }
    }
    Ok(total)
}

/// Fails at the first NaN or infinity of any float output.
pub fn check_outputs_finite(outputs: &[(String, Tensor)], side: Side) -> Result<(), Mismatch> {
    outputs
        .iter()
        .filter_map(|(name, t)| t.as_f32().map(|x| (name, x)))
        .try_for_each(|(name, x)| check_finite(name, side, x))
}

/// Names the outputs of one run of `graph` as its `return` does.
pub fn named(graph: &kiln::ir::Graph, outputs: Vec<Tensor>) -> Vec<(String, Tensor)> {
    assert_eq!(graph.outputs().len(), outputs.len(), "output count");
    graph
        .outputs()
        .iter()
        .map(|(name, _)| name.clone())
        .zip(outputs)
        .collect()
}

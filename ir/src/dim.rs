//! Symbolic dimensions: normalized polynomials over named size symbols.
//!
//! A [`Dim`] is a sum of terms; each term is an integer coefficient times a sorted
//! product of atoms; an atom is a named symbol (`B`, `d`) or a division that could
//! not be simplified (`d / h`). Every constructor returns the normal form, so two
//! dims are equal iff they are structurally equal. Division is exact by contract:
//! when both sides are known integers and the quotient is not whole, that is a
//! [`DimError::NotDivisible`].

use std::collections::BTreeMap;
use std::fmt;

/// An irreducible factor of a term.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Atom {
    /// A named size symbol, bound at compile time (`d = 768`) or at run time (`B`).
    Sym(String),
    /// A division whose exactness cannot be decided symbolically: numerator, divisor.
    Div(Box<Dim>, Box<Dim>),
}

/// One term: `coef * atoms[0] * atoms[1] * ...`, atoms sorted (repeats allowed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term {
    atoms: Vec<Atom>,
    coef: i64,
}

/// A symbolic dimension in normal form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dim {
    /// Sorted by atoms, no zero coefficients, no two terms with equal atoms.
    terms: Vec<Term>,
}

/// Why a dim expression could not be formed or evaluated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DimError {
    /// An exact division whose operands are known and do not divide.
    #[error("{num} is not divisible by {den}")]
    NotDivisible { num: i64, den: i64 },
    /// A division by a dim that is zero.
    #[error("division by zero")]
    DivisionByZero,
    /// Integer overflow while normalizing.
    #[error("size arithmetic overflows 64 bits")]
    Overflow,
    /// An expression beyond the limits that keep normalization cheap.
    #[error("size expression is too complex (more than {MAX_TERMS} terms or {MAX_DIV_DEPTH} nested divisions)")]
    TooComplex,
}

/// A [`Dim`] whose symbols are indices into a table of values
/// ([`Dim::indexed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedDim {
    terms: Vec<(i64, Vec<IndexedAtom>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum IndexedAtom {
    Sym(usize),
    Div(Box<IndexedDim>, Box<IndexedDim>),
}

impl IndexedDim {
    /// The value under `values` (symbol `i` is `values[i]`; `Ok(None)` when
    /// one it reads is `None` or missing), with [`Dim::eval_const`]'s
    /// arithmetic and errors.
    pub fn eval(&self, values: &[Option<i64>]) -> Result<Option<i64>, DimError> {
        sum_of_products(
            self.terms.iter().map(|(c, a)| (*c, a.as_slice())),
            |a| match a {
                IndexedAtom::Sym(i) => Ok(values.get(*i).copied().flatten()),
                IndexedAtom::Div(n, d) => exact_div(n.eval(values)?, d.eval(values)?),
            },
        )
    }
}

/// `Σ coef · Π atoms` in checked arithmetic, each atom's value from `atom`
/// (`Ok(None)` when one is unknown: the sum is unknown too).
fn sum_of_products<'a, A: 'a>(
    terms: impl IntoIterator<Item = (i64, &'a [A])>,
    atom: impl Fn(&A) -> Result<Option<i64>, DimError>,
) -> Result<Option<i64>, DimError> {
    let mut acc = 0i64;
    for (coef, atoms) in terms {
        let mut prod = coef;
        for a in atoms {
            let Some(v) = atom(a)? else {
                return Ok(None);
            };
            prod = prod.checked_mul(v).ok_or(DimError::Overflow)?;
        }
        acc = acc.checked_add(prod).ok_or(DimError::Overflow)?;
    }
    Ok(Some(acc))
}

/// `n / d` when both are known and the quotient is whole.
fn exact_div(n: Option<i64>, d: Option<i64>) -> Result<Option<i64>, DimError> {
    let (Some(n), Some(d)) = (n, d) else {
        return Ok(None);
    };
    if d == 0 {
        return Err(DimError::DivisionByZero);
    }
    if n.checked_rem(d).ok_or(DimError::Overflow)? != 0 {
        return Err(DimError::NotDivisible { num: n, den: d });
    }
    n.checked_div(d).ok_or(DimError::Overflow).map(Some)
}

/// Most terms a normalized dim may have (guards against exponential expansion).
pub const MAX_TERMS: usize = 64;
/// Deepest nesting of unsimplified divisions.
pub const MAX_DIV_DEPTH: usize = 8;

impl Dim {
    /// The constant dim `n`.
    pub fn constant(n: i64) -> Dim {
        if n == 0 {
            return Dim::default();
        }
        Dim {
            terms: vec![Term {
                atoms: Vec::new(),
                coef: n,
            }],
        }
    }

    /// The dim consisting of the single symbol `name`.
    pub fn sym(name: &str) -> Dim {
        Dim {
            terms: vec![Term {
                atoms: vec![Atom::Sym(name.to_string())],
                coef: 1,
            }],
        }
    }

    /// The value of this dim if it is a constant.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [t] if t.atoms.is_empty() => Some(t.coef),
            _ => None,
        }
    }

    /// The symbol name if this dim is exactly one symbol.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.as_slice() {
            [t] if t.coef == 1 && t.atoms.len() == 1 => match &t.atoms[0] {
                Atom::Sym(s) => Some(s),
                Atom::Div(..) => None,
            },
            _ => None,
        }
    }

    /// Whether this dim is the constant `n`.
    pub fn is_const(&self, n: i64) -> bool {
        self.as_const() == Some(n)
    }

    /// How deeply unsimplified divisions nest in this dim.
    pub fn div_depth(&self) -> usize {
        self.terms
            .iter()
            .flat_map(|t| t.atoms.iter())
            .map(|a| match a {
                Atom::Sym(_) => 0,
                Atom::Div(n, d) => 1 + n.div_depth().max(d.div_depth()),
            })
            .max()
            .unwrap_or(0)
    }

    /// Every symbol this dim mentions, sorted and deduplicated.
    pub fn symbols(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<String>) {
        for t in &self.terms {
            for a in &t.atoms {
                match a {
                    Atom::Sym(s) => out.push(s.clone()),
                    Atom::Div(n, d) => {
                        n.collect_symbols(out);
                        d.collect_symbols(out);
                    }
                }
            }
        }
    }

    /// Builds a dim from unsorted terms, merging and dropping zero terms.
    fn from_terms(mut terms: Vec<Term>) -> Result<Dim, DimError> {
        for t in &mut terms {
            t.atoms.sort();
        }
        terms.sort_by(|a, b| a.atoms.cmp(&b.atoms));
        let mut out: Vec<Term> = Vec::with_capacity(terms.len());
        for t in terms {
            match out.last_mut() {
                Some(last) if last.atoms == t.atoms => {
                    last.coef = last.coef.checked_add(t.coef).ok_or(DimError::Overflow)?;
                }
                _ => out.push(t),
            }
        }
        out.retain(|t| t.coef != 0);
        if out.len() > MAX_TERMS {
            return Err(DimError::TooComplex);
        }
        Ok(Dim { terms: out })
    }

    /// `self + other`.
    pub fn add(&self, other: &Dim) -> Result<Dim, DimError> {
        let mut terms = self.terms.clone();
        terms.extend(other.terms.iter().cloned());
        resimplify(Dim::from_terms(terms)?)
    }

    /// Whether the dim is negative for every non-negative value of its symbols
    /// (every term has a negative coefficient): a size that can never be valid.
    pub fn is_never_positive(&self) -> bool {
        !self.terms.is_empty() && self.terms.iter().all(|t| t.coef < 0)
    }

    /// `self - other`.
    pub fn sub(&self, other: &Dim) -> Result<Dim, DimError> {
        self.add(&other.neg()?)
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Dim, DimError> {
        let mut terms = Vec::with_capacity(self.terms.len());
        for t in &self.terms {
            terms.push(Term {
                atoms: t.atoms.clone(),
                coef: t.coef.checked_neg().ok_or(DimError::Overflow)?,
            });
        }
        Dim::from_terms(terms)
    }

    /// `self * other`, expanded and simplified.
    pub fn mul(&self, other: &Dim) -> Result<Dim, DimError> {
        if self.terms.len().saturating_mul(other.terms.len()) > MAX_TERMS * MAX_TERMS {
            return Err(DimError::TooComplex);
        }
        let mut acc = Dim::default();
        for a in &self.terms {
            for b in &other.terms {
                let mut atoms = a.atoms.clone();
                atoms.extend(b.atoms.iter().cloned());
                if atoms.len() > MAX_TERMS {
                    return Err(DimError::TooComplex);
                }
                atoms.sort();
                let coef = a.coef.checked_mul(b.coef).ok_or(DimError::Overflow)?;
                let term = simplify_term(Term { atoms, coef })?;
                acc = acc.add(&term)?;
            }
        }
        Ok(acc)
    }

    /// The exact quotient `self / other`.
    ///
    /// Cancels common factors (the gcd of the coefficients and symbols every
    /// term shares), divides exactly when the divisor is a single term dividing
    /// every term, flattens `(n / a) / b` to `n / (a * b)`, pulls a remaining
    /// constant factor out (`(3 * T) / 2` is `3 * (T / 2)`: under exact division
    /// and coprime factors they are equal), and otherwise keeps the quotient as a
    /// symbolic `Div` atom, checked when the symbols are bound.
    pub fn div(&self, other: &Dim) -> Result<Dim, DimError> {
        if other.terms.is_empty() {
            return Err(DimError::DivisionByZero);
        }
        if self.terms.is_empty() {
            return Ok(Dim::default());
        }
        if self == other {
            return Ok(Dim::constant(1));
        }
        if let (Some(n), Some(d)) = (self.as_const(), other.as_const()) {
            if n.checked_rem(d).ok_or(DimError::Overflow)? != 0 {
                return Err(DimError::NotDivisible { num: n, den: d });
            }
            return Ok(Dim::constant(n.checked_div(d).ok_or(DimError::Overflow)?));
        }
        if other.terms.iter().all(|t| t.coef < 0) {
            return self.neg()?.div(&other.neg()?);
        }
        let (num, den) = cancel_common(self, other)?;
        if den.is_const(1) {
            return Ok(num);
        }
        if num == den {
            return Ok(Dim::constant(1));
        }
        if let [d] = den.terms.as_slice() {
            if let Some(q) = divide_by_term(&num, d)? {
                return Ok(q);
            }
        }
        if let [t] = num.terms.as_slice() {
            if let (1, [Atom::Div(n2, d2)]) = (t.coef, t.atoms.as_slice()) {
                return n2.div(&d2.mul(&den)?);
            }
            if t.coef != 1 {
                let inner = Dim::from_terms(vec![Term {
                    atoms: t.atoms.clone(),
                    coef: 1,
                }])?;
                return Dim::constant(t.coef).mul(&inner.div(&den)?);
            }
        }
        if num.div_depth().max(den.div_depth()) >= MAX_DIV_DEPTH {
            return Err(DimError::TooComplex);
        }
        Ok(Dim {
            terms: vec![Term {
                atoms: vec![Atom::Div(Box::new(num), Box::new(den))],
                coef: 1,
            }],
        })
    }

    /// The value of this dim when every symbol in it is bound to a constant
    /// in `env` (`Ok(None)` when one is not): the arithmetic of
    /// [`Dim::substitute`] without building the intermediate polynomials,
    /// for the run-time evaluation of sizes. An error here (a division that
    /// is not exact, an overflow) is the one `substitute` reports too.
    pub fn eval_const(&self, env: &BTreeMap<String, Dim>) -> Result<Option<i64>, DimError> {
        sum_of_products(
            self.terms.iter().map(|t| (t.coef, t.atoms.as_slice())),
            |a| match a {
                Atom::Sym(s) => Ok(env.get(s).and_then(Dim::as_const)),
                Atom::Div(n, d) => exact_div(n.eval_const(env)?, d.eval_const(env)?),
            },
        )
    }

    /// This dim with each symbol replaced by its index in a table of values
    /// (`index`), for evaluating it many times under changing bindings
    /// without looking symbols up by name (`None`: a symbol has no index).
    pub fn indexed(&self, index: &impl Fn(&str) -> Option<usize>) -> Option<IndexedDim> {
        let mut terms = Vec::with_capacity(self.terms.len());
        for t in &self.terms {
            let mut atoms = Vec::with_capacity(t.atoms.len());
            for a in &t.atoms {
                atoms.push(match a {
                    Atom::Sym(s) => IndexedAtom::Sym(index(s)?),
                    Atom::Div(n, d) => {
                        IndexedAtom::Div(Box::new(n.indexed(index)?), Box::new(d.indexed(index)?))
                    }
                });
            }
            terms.push((t.coef, atoms));
        }
        Some(IndexedDim { terms })
    }

    /// Replaces bound symbols by their values and renormalizes.
    pub fn substitute(&self, env: &BTreeMap<String, Dim>) -> Result<Dim, DimError> {
        let mut acc = Dim::default();
        for t in &self.terms {
            let mut prod = Dim::constant(t.coef);
            for a in &t.atoms {
                let v = match a {
                    Atom::Sym(s) => match env.get(s) {
                        Some(v) => v.clone(),
                        None => Dim::sym(s),
                    },
                    Atom::Div(n, d) => n.substitute(env)?.div(&d.substitute(env)?)?,
                };
                prod = prod.mul(&v)?;
            }
            acc = acc.add(&prod)?;
        }
        Ok(acc)
    }
}

/// Greatest common divisor of two magnitudes.
fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `num` and `den` with the factor they share removed: the gcd of every
/// coefficient and the atoms common to every term of both.
fn cancel_common(num: &Dim, den: &Dim) -> Result<(Dim, Dim), DimError> {
    let all = num.terms.iter().chain(&den.terms);
    let g = all.clone().fold(0u64, |g, t| gcd(g, t.coef.unsigned_abs()));
    let mut common: Vec<Atom> = num.terms[0].atoms.clone();
    for t in all {
        let mut kept = Vec::new();
        let mut rest = t.atoms.clone();
        for a in &common {
            if let Some(i) = rest.iter().position(|x| x == a) {
                rest.remove(i);
                kept.push(a.clone());
            }
        }
        common = kept;
    }
    if g <= 1 && common.is_empty() {
        return Ok((num.clone(), den.clone()));
    }
    let g = i64::try_from(g).map_err(|_| DimError::Overflow)?;
    let strip = |d: &Dim| -> Result<Dim, DimError> {
        let mut terms = Vec::with_capacity(d.terms.len());
        for t in &d.terms {
            terms.push(Term {
                atoms: remove_atoms(&t.atoms, &common).unwrap_or_default(),
                coef: t.coef.checked_div(g).ok_or(DimError::Overflow)?,
            });
        }
        Dim::from_terms(terms)
    };
    Ok((strip(num)?, strip(den)?))
}

/// Re-applies the division cancellations to terms whose coefficients changed
/// when like terms merged (`T / 2 + T / 2` is `T`).
fn resimplify(d: Dim) -> Result<Dim, DimError> {
    let mut cur = d;
    for _ in 0..MAX_TERMS {
        let mut changed = false;
        let mut terms = Vec::with_capacity(cur.terms.len());
        for t in cur.terms {
            if t.atoms.iter().any(|a| matches!(a, Atom::Div(..))) {
                let s = simplify_term(t.clone())?;
                if s.terms.len() != 1 || s.terms[0] != t {
                    changed = true;
                }
                terms.extend(s.terms);
            } else {
                terms.push(t);
            }
        }
        cur = Dim::from_terms(terms)?;
        if !changed {
            break;
        }
    }
    Ok(cur)
}

/// Divides every term of `num` by `den` when that is exact; `None` when it is not.
fn divide_by_term(num: &Dim, den: &Term) -> Result<Option<Dim>, DimError> {
    let mut out = Vec::with_capacity(num.terms.len());
    for t in &num.terms {
        if t.coef.checked_rem(den.coef).ok_or(DimError::Overflow)? != 0 {
            return Ok(None);
        }
        let Some(rest) = remove_atoms(&t.atoms, &den.atoms) else {
            return Ok(None);
        };
        out.push(Term {
            atoms: rest,
            coef: t.coef.checked_div(den.coef).ok_or(DimError::Overflow)?,
        });
    }
    let mut acc = Dim::default();
    for t in out {
        acc = acc.add(&simplify_term(t)?)?;
    }
    Ok(Some(acc))
}

/// `atoms` minus the multiset `remove`, if `remove` is contained in it.
fn remove_atoms(atoms: &[Atom], remove: &[Atom]) -> Option<Vec<Atom>> {
    let mut rest = atoms.to_vec();
    for r in remove {
        let pos = rest.iter().position(|a| a == r)?;
        rest.remove(pos);
    }
    Some(rest)
}

/// Cancels `x * (n / x)` to `n` inside one term, which may expand it into a sum.
fn simplify_term(term: Term) -> Result<Dim, DimError> {
    for (i, atom) in term.atoms.iter().enumerate() {
        let Atom::Div(n, d) = atom else { continue };
        let [den] = d.terms.as_slice() else { continue };
        let mut others = term.atoms.clone();
        others.remove(i);
        if term.coef.checked_rem(den.coef) != Some(0) {
            // `k * (n / c)` with a common factor `g` of `k` and `c` is
            // `(k / g) * (n / (c / g))`, the reduced form division produces.
            let g = gcd(term.coef.unsigned_abs(), den.coef.unsigned_abs());
            if g > 1 && den.atoms.is_empty() {
                let g = i64::try_from(g).map_err(|_| DimError::Overflow)?;
                let outer = Dim::from_terms(vec![Term {
                    atoms: others,
                    coef: term.coef / g,
                }])?;
                return outer.mul(&n.div(&Dim::constant(den.coef / g))?);
            }
            continue;
        }
        let Some(rest) = remove_atoms(&others, &den.atoms) else {
            continue;
        };
        let outer = Dim::from_terms(vec![Term {
            atoms: rest,
            coef: term.coef.checked_div(den.coef).ok_or(DimError::Overflow)?,
        }])?;
        return outer.mul(n);
    }
    Dim::from_terms(vec![term])
}

impl From<i64> for Dim {
    fn from(n: i64) -> Dim {
        Dim::constant(n)
    }
}

impl From<&str> for Dim {
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl fmt::Display for Atom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Atom::Sym(s) => f.write_str(s),
            Atom::Div(n, d) => {
                write_operand(f, n)?;
                f.write_str(" / ")?;
                write_operand(f, d)
            }
        }
    }
}

/// Writes a division operand, parenthesized unless it is a bare symbol or constant.
fn write_operand(f: &mut fmt::Formatter<'_>, d: &Dim) -> fmt::Result {
    if d.as_const().is_some_and(|c| c >= 0) || d.as_sym().is_some() {
        write!(f, "{d}")
    } else {
        write!(f, "({d})")
    }
}

impl Term {
    fn fmt_abs(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.coef.unsigned_abs();
        let mut first = true;
        if c != 1 || self.atoms.is_empty() {
            write!(f, "{c}")?;
            first = false;
        }
        let lone = self.atoms.len() == 1 && first;
        for a in &self.atoms {
            if !first {
                f.write_str(" * ")?;
            }
            first = false;
            match a {
                Atom::Div(..) if !lone => write!(f, "({a})")?,
                _ => write!(f, "{a}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Symbolic terms first (sorted), the constant last: `S + T + 1`.
        let mut order: Vec<&Term> = self.terms.iter().filter(|t| !t.atoms.is_empty()).collect();
        order.extend(self.terms.iter().filter(|t| t.atoms.is_empty()));
        for (i, t) in order.iter().enumerate() {
            match (i, t.coef < 0) {
                (0, true) => f.write_str("-")?,
                (0, false) => {}
                (_, true) => f.write_str(" - ")?,
                (_, false) => f.write_str(" + ")?,
            }
            t.fmt_abs(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: &str) -> Dim {
        Dim::sym(n)
    }
    fn c(n: i64) -> Dim {
        Dim::constant(n)
    }

    #[test]
    fn normal_form_makes_equal_expressions_equal() {
        let a = s("S").add(&s("T")).unwrap();
        let b = s("T").add(&s("S")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "S + T");
        let hd = s("h").mul(&s("dh")).unwrap();
        assert_eq!(hd, s("dh").mul(&s("h")).unwrap());
        assert_eq!(hd.to_string(), "dh * h");
        assert_eq!(s("d").sub(&s("d")).unwrap(), c(0));
        assert_eq!(
            c(2).mul(&s("d")).unwrap().add(&s("d")).unwrap().to_string(),
            "3 * d"
        );
        assert_eq!(s("S").add(&c(1)).unwrap().to_string(), "S + 1");
        assert_eq!(c(1).sub(&s("S")).unwrap().to_string(), "-S + 1");
    }

    #[test]
    fn integer_evaluation_agrees_with_substitution() {
        // Dims over S, d, h with divisions; every binding of small values
        // (zero and negatives included) gives substitute's constant or its
        // error, and an unbound symbol gives None.
        let q = s("d").div(&s("h")).unwrap();
        let dims = [
            s("S").add(&c(1)).unwrap(),
            s("S").mul(&q).unwrap().add(&c(-3)).unwrap(),
            q.mul(&q).unwrap().sub(&s("S")).unwrap(),
            s("S").add(&s("d")).unwrap().div(&s("h")).unwrap(),
            c(7),
            Dim::default(),
        ];
        for d in &dims {
            for sv in [-2i64, 0, 1, 5, 64] {
                for dv in [0i64, 6, 12, 768] {
                    for hv in [-3i64, 0, 1, 4, 12] {
                        let env: BTreeMap<String, Dim> = [("S", sv), ("d", dv), ("h", hv)]
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), c(v)))
                            .collect();
                        let want = d.substitute(&env);
                        // The indexed form over a table [h, S, d] agrees.
                        let names = ["h", "S", "d"];
                        let indexed = d.indexed(&|n| names.iter().position(|m| *m == n)).unwrap();
                        assert_eq!(
                            indexed.eval(&[Some(hv), Some(sv), Some(dv)]),
                            d.eval_const(&env),
                            "{d} at S={sv} d={dv} h={hv}"
                        );
                        match d.eval_const(&env) {
                            Ok(Some(v)) => {
                                assert_eq!(want, Ok(c(v)), "{d} at S={sv} d={dv} h={hv}")
                            }
                            Ok(None) => panic!("{d}: every symbol is bound"),
                            Err(e) => assert_eq!(want, Err(e), "{d} at S={sv} d={dv} h={hv}"),
                        }
                    }
                }
            }
            let partial: BTreeMap<String, Dim> = [("S".to_string(), c(3))].into_iter().collect();
            if d.as_const().is_none() && *d != s("S").add(&c(1)).unwrap() {
                assert_eq!(d.eval_const(&partial), Ok(None), "{d}");
                let indexed = d.indexed(&|n| ["S", "d", "h"].iter().position(|m| *m == n));
                assert_eq!(indexed.unwrap().eval(&[Some(3), None]), Ok(None), "{d}");
            }
            // A symbol without an index: no indexed form.
            if !d.symbols().is_empty() {
                assert_eq!(d.indexed(&|_| None), None, "{d}");
            }
        }
        assert_eq!(
            c(i64::MAX)
                .mul(&s("S"))
                .unwrap()
                .eval_const(&[("S".to_string(), c(2))].into_iter().collect()),
            Err(DimError::Overflow)
        );
    }

    #[test]
    fn exact_division_simplifies_or_stays_symbolic() {
        assert_eq!(c(768).div(&c(12)).unwrap(), c(64));
        assert_eq!(
            c(770).div(&c(12)),
            Err(DimError::NotDivisible { num: 770, den: 12 })
        );
        let two_d = c(2).mul(&s("d")).unwrap();
        assert_eq!(two_d.div(&c(2)).unwrap(), s("d"));
        let q = s("d").div(&s("h")).unwrap();
        assert_eq!(q.to_string(), "d / h");
        // h * (d / h) cancels back to d.
        assert_eq!(s("h").mul(&q).unwrap(), s("d"));
        let hd = s("h").mul(&s("dh")).unwrap();
        assert_eq!(hd.div(&s("h")).unwrap(), s("dh"));
        assert_eq!(s("d").div(&c(0)), Err(DimError::DivisionByZero));
        let st = s("S").add(&s("T")).unwrap();
        assert_eq!(st.div(&c(2)).unwrap().to_string(), "(S + T) / 2");
        assert_eq!(c(3).mul(&q).unwrap().to_string(), "3 * (d / h)");
    }

    #[test]
    fn equal_quotients_have_one_normal_form() {
        let t = s("T");
        let half = t.div(&c(2)).unwrap();
        assert_eq!(half.add(&half).unwrap(), t, "T/2 + T/2");
        let d = s("D");
        assert_eq!(
            c(2).mul(&d).unwrap().div(&c(4)).unwrap(),
            d.div(&c(2)).unwrap()
        );
        assert_eq!(
            d.div(&c(2)).unwrap().div(&c(3)).unwrap(),
            d.div(&c(6)).unwrap()
        );
        assert_eq!(
            c(3).mul(&t).unwrap().div(&c(2)).unwrap(),
            c(3).mul(&half).unwrap()
        );
        let st = s("S").mul(&t).unwrap();
        assert_eq!(
            st.div(&c(2).mul(&t).unwrap()).unwrap(),
            s("S").div(&c(2)).unwrap()
        );
        assert_eq!(c(2).mul(&t.div(&c(4)).unwrap()).unwrap(), half);
        assert_eq!(d.div(&c(-2)).unwrap(), d.neg().unwrap().div(&c(2)).unwrap());
        assert!(s("T").neg().unwrap().is_never_positive());
        assert!(!s("S").sub(&t).unwrap().is_never_positive());
    }

    #[test]
    fn substitution_evaluates_and_checks_divisions() {
        let mut env = BTreeMap::new();
        env.insert("d".to_string(), c(768));
        env.insert("h".to_string(), c(12));
        let q = s("d").div(&s("h")).unwrap();
        assert_eq!(q.substitute(&env).unwrap(), c(64));
        env.insert("d".to_string(), c(770));
        assert_eq!(
            q.substitute(&env),
            Err(DimError::NotDivisible { num: 770, den: 12 })
        );
        let bt = s("B").mul(&s("T")).unwrap();
        assert_eq!(bt.substitute(&env).unwrap(), bt);
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let big = c(i64::MAX);
        assert_eq!(big.add(&c(1)), Err(DimError::Overflow));
        assert_eq!(big.mul(&c(2)), Err(DimError::Overflow));
        assert_eq!(c(i64::MIN).neg(), Err(DimError::Overflow));
    }
}

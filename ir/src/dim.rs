//! Dimensions: constants, symbols such as `seq` (each with a compile-time maximum declared on the
//! graph), and small arithmetic expressions over them, as shape subgraphs produce (`batch*seq`).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::{Add, Div, Mul, Sub};

/// One dimension of a shape.
///
/// Constructors simplify (constants fold, `x*1` is `x`, constants move right), so structurally
/// equal dims print identically; [`Dim::equiv`] proves equality up to polynomial arithmetic.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    /// A known size (negative only inside slice bounds, where it counts from the end).
    Const(i64),
    /// A symbolic size bound at run time, declared on the graph with its maximum.
    Sym(String),
    /// `a + b`.
    Add(Box<Dim>, Box<Dim>),
    /// `a - b`.
    Sub(Box<Dim>, Box<Dim>),
    /// `a * b`.
    Mul(Box<Dim>, Box<Dim>),
    /// `a / b`, rounding toward negative infinity.
    Div(Box<Dim>, Box<Dim>),
}

/// Errors from evaluating a dim expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DimError {
    /// A symbol has no value in the bindings.
    #[error("symbol `{0}` is not bound")]
    Unbound(String),
    /// A division by zero.
    #[error("division by zero in `{0}`")]
    DivByZero(String),
    /// Arithmetic overflowed i64.
    #[error("overflow evaluating `{0}`")]
    Overflow(String),
}

impl From<i64> for Dim {
    fn from(value: i64) -> Dim {
        Dim::Const(value)
    }
}

impl From<usize> for Dim {
    fn from(value: usize) -> Dim {
        Dim::Const(value as i64)
    }
}

impl From<&str> for Dim {
    fn from(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }
}

impl Dim {
    /// A symbolic dim.
    pub fn sym(name: impl Into<String>) -> Dim {
        Dim::Sym(name.into())
    }

    /// The constant value, if this dim is a constant.
    pub fn as_const(&self) -> Option<i64> {
        match self {
            Dim::Const(v) => Some(*v),
            _ => None,
        }
    }

    /// The product of `dims`, simplified.
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter()
            .fold(Dim::Const(1), |acc, d| Dim::mul(acc, d.clone()))
    }

    /// Calls `f` on each symbol name in the expression, left to right.
    pub fn for_each_symbol(&self, f: &mut impl FnMut(&str)) {
        match self {
            Dim::Const(_) => {}
            Dim::Sym(name) => f(name),
            Dim::Add(a, b) | Dim::Sub(a, b) | Dim::Mul(a, b) | Dim::Div(a, b) => {
                a.for_each_symbol(f);
                b.for_each_symbol(f);
            }
        }
    }

    /// Evaluates the expression with symbol values from `bindings`.
    pub fn eval(&self, bindings: &HashMap<String, i64>) -> Result<i64, DimError> {
        let overflow = || DimError::Overflow(self.to_string());
        match self {
            Dim::Const(v) => Ok(*v),
            Dim::Sym(name) => bindings
                .get(name)
                .copied()
                .ok_or_else(|| DimError::Unbound(name.clone())),
            Dim::Add(a, b) => a
                .eval(bindings)?
                .checked_add(b.eval(bindings)?)
                .ok_or_else(overflow),
            Dim::Sub(a, b) => a
                .eval(bindings)?
                .checked_sub(b.eval(bindings)?)
                .ok_or_else(overflow),
            Dim::Mul(a, b) => a
                .eval(bindings)?
                .checked_mul(b.eval(bindings)?)
                .ok_or_else(overflow),
            Dim::Div(a, b) => {
                let divisor = b.eval(bindings)?;
                if divisor == 0 {
                    return Err(DimError::DivByZero(self.to_string()));
                }
                floor_div(a.eval(bindings)?, divisor).ok_or_else(overflow)
            }
        }
    }

    /// The constant this expression always equals, if its polynomial form is a constant
    /// (`seq - (seq - 1)` is `1`).
    pub fn as_const_equiv(&self) -> Option<i64> {
        if let Some(v) = self.as_const() {
            return Some(v);
        }
        let poly = Poly::of(self);
        match poly.0.len() {
            0 => Some(0),
            1 => poly.0.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// The interval `[lo, hi]` the expression can take when each symbol ranges over
    /// `[1, max]` (its maximum from `maxima`); `None` if a symbol has no maximum. Interval
    /// arithmetic ignores correlations, except that expressions equal to a constant are exact.
    pub fn bounds(&self, maxima: &HashMap<String, i64>) -> Option<(i64, i64)> {
        if let Some(v) = self.as_const_equiv() {
            return Some((v, v));
        }
        self.interval(maxima)
    }

    fn interval(&self, maxima: &HashMap<String, i64>) -> Option<(i64, i64)> {
        match self {
            Dim::Const(v) => Some((*v, *v)),
            Dim::Sym(name) => maxima.get(name).map(|&max| (1.min(max), max)),
            Dim::Add(a, b) => {
                let (a, b) = (a.bounds(maxima)?, b.bounds(maxima)?);
                Some((a.0.checked_add(b.0)?, a.1.checked_add(b.1)?))
            }
            Dim::Sub(a, b) => {
                let (a, b) = (a.bounds(maxima)?, b.bounds(maxima)?);
                Some((a.0.checked_sub(b.1)?, a.1.checked_sub(b.0)?))
            }
            Dim::Mul(a, b) => {
                let (a, b) = (a.bounds(maxima)?, b.bounds(maxima)?);
                let products = [
                    a.0.checked_mul(b.0)?,
                    a.0.checked_mul(b.1)?,
                    a.1.checked_mul(b.0)?,
                    a.1.checked_mul(b.1)?,
                ];
                Some((*products.iter().min()?, *products.iter().max()?))
            }
            Dim::Div(a, b) => {
                let (a, b) = (a.bounds(maxima)?, b.bounds(maxima)?);
                if b.0 <= 0 {
                    return None;
                }
                // Over a positive divisor range the extremes are among the four corner quotients
                // (a negative numerator is largest over the largest divisor).
                let corners = [
                    floor_div(a.0, b.0)?,
                    floor_div(a.0, b.1)?,
                    floor_div(a.1, b.0)?,
                    floor_div(a.1, b.1)?,
                ];
                Some((*corners.iter().min()?, *corners.iter().max()?))
            }
        }
    }

    /// True when `self` and `other` are equal for every value of the symbols: both are
    /// brought to a polynomial normal form (divisions stay opaque atoms).
    pub fn equiv(&self, other: &Dim) -> bool {
        self == other || Poly::of(self) == Poly::of(other)
    }

    fn precedence(&self) -> u8 {
        match self {
            Dim::Add(..) | Dim::Sub(..) => 1,
            Dim::Mul(..) | Dim::Div(..) => 2,
            Dim::Const(v) if *v < 0 => 1,
            Dim::Const(_) | Dim::Sym(_) => 3,
        }
    }
}

impl Add for Dim {
    type Output = Dim;

    /// `a + b`, simplified.
    fn add(self, rhs: Dim) -> Dim {
        let (a, b) = (self, rhs);
        match (a, b) {
            (Dim::Const(x), Dim::Const(y)) => match x.checked_add(y) {
                Some(v) => Dim::Const(v),
                None => Dim::Add(Box::new(Dim::Const(x)), Box::new(Dim::Const(y))),
            },
            (a, Dim::Const(0)) | (Dim::Const(0), a) => a,
            (Dim::Const(c), a) => Dim::add(a, Dim::Const(c)),
            (Dim::Add(a, c1), Dim::Const(c2)) if matches!(*c1, Dim::Const(_)) => {
                Dim::add(*a, Dim::add(*c1, Dim::Const(c2)))
            }
            (a, b) => Dim::Add(Box::new(a), Box::new(b)),
        }
    }
}

impl Sub for Dim {
    type Output = Dim;

    /// `a - b`, simplified.
    fn sub(self, rhs: Dim) -> Dim {
        let (a, b) = (self, rhs);
        match (a, b) {
            (Dim::Const(x), Dim::Const(y)) if x.checked_sub(y).is_some() => Dim::Const(x - y),
            (a, Dim::Const(0)) => a,
            (a, b) if a == b => Dim::Const(0),
            (a, b) => Dim::Sub(Box::new(a), Box::new(b)),
        }
    }
}

impl Mul for Dim {
    type Output = Dim;

    /// `a * b`, simplified.
    fn mul(self, rhs: Dim) -> Dim {
        let (a, b) = (self, rhs);
        match (a, b) {
            (Dim::Const(x), Dim::Const(y)) => match x.checked_mul(y) {
                Some(v) => Dim::Const(v),
                None => Dim::Mul(Box::new(Dim::Const(x)), Box::new(Dim::Const(y))),
            },
            (Dim::Const(0), _) | (_, Dim::Const(0)) => Dim::Const(0),
            (a, Dim::Const(1)) | (Dim::Const(1), a) => a,
            (Dim::Const(c), a) => Dim::mul(a, Dim::Const(c)),
            (Dim::Mul(a, c1), Dim::Const(c2)) if matches!(*c1, Dim::Const(_)) => {
                Dim::mul(*a, Dim::mul(*c1, Dim::Const(c2)))
            }
            (a, b) => Dim::Mul(Box::new(a), Box::new(b)),
        }
    }
}

impl Div for Dim {
    type Output = Dim;

    /// `a / b` (floor division), simplified.
    fn div(self, rhs: Dim) -> Dim {
        let (a, b) = (self, rhs);
        match (a, b) {
            (Dim::Const(x), Dim::Const(y)) if floor_div(x, y).is_some() => {
                Dim::Const(floor_div(x, y).unwrap_or(0))
            }
            (a, Dim::Const(1)) => a,
            (Dim::Mul(a, c), Dim::Const(d)) if matches!(*c, Dim::Const(k) if d > 0 && k.checked_rem(d) == Some(0)) =>
            {
                let k = c.as_const().unwrap_or(1);
                Dim::mul(*a, Dim::Const(k / d))
            }
            (a, b) => Dim::Div(Box::new(a), Box::new(b)),
        }
    }
}

impl fmt::Display for Dim {
    /// Infix with the fewest parentheses that parse back to the same tree (left-associative).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b, op) = match self {
            Dim::Const(v) => return write!(f, "{v}"),
            Dim::Sym(name) => return f.write_str(name),
            Dim::Add(a, b) => (a, b, "+"),
            Dim::Sub(a, b) => (a, b, "-"),
            Dim::Mul(a, b) => (a, b, "*"),
            Dim::Div(a, b) => (a, b, "/"),
        };
        let prec = self.precedence();
        if a.precedence() < prec {
            write!(f, "({a})")?;
        } else {
            write!(f, "{a}")?;
        }
        f.write_str(op)?;
        if b.precedence() <= prec {
            write!(f, "({b})")
        } else {
            write!(f, "{b}")
        }
    }
}

/// `x / y` rounded toward negative infinity; `None` on division by zero or overflow.
fn floor_div(x: i64, y: i64) -> Option<i64> {
    let q = x.checked_div(y)?;
    let r = x.checked_rem(y)?;
    Some(if r != 0 && ((r < 0) != (y < 0)) {
        q - 1
    } else {
        q
    })
}

/// A polynomial over symbols with integer coefficients: monomial (sorted atom names) to
/// coefficient. Divisions become atoms named by their printed form.
#[derive(PartialEq, Eq, Debug)]
struct Poly(BTreeMap<Vec<String>, i64>);

impl Poly {
    fn of(dim: &Dim) -> Poly {
        let atom = |name: String| Poly(BTreeMap::from([(vec![name], 1)]));
        match dim {
            Dim::Const(v) => Poly(BTreeMap::from([(vec![], *v)])).normalized(),
            Dim::Sym(name) => atom(name.clone()),
            Dim::Div(..) => atom(dim.to_string()),
            Dim::Add(a, b) => Poly::of(a).plus(&Poly::of(b), 1),
            Dim::Sub(a, b) => Poly::of(a).plus(&Poly::of(b), -1),
            Dim::Mul(a, b) => Poly::of(a).times(&Poly::of(b)),
        }
    }

    fn normalized(mut self) -> Poly {
        self.0.retain(|_, c| *c != 0);
        self
    }

    fn plus(mut self, other: &Poly, sign: i64) -> Poly {
        for (mono, coeff) in &other.0 {
            let entry = self.0.entry(mono.clone()).or_insert(0);
            *entry = entry.wrapping_add(coeff.wrapping_mul(sign));
        }
        self.normalized()
    }

    fn times(&self, other: &Poly) -> Poly {
        let mut out = BTreeMap::new();
        for (ma, ca) in &self.0 {
            for (mb, cb) in &other.0 {
                let mut mono: Vec<String> = ma.iter().chain(mb).cloned().collect();
                mono.sort();
                let entry = out.entry(mono).or_insert(0i64);
                *entry = entry.wrapping_add(ca.wrapping_mul(*cb));
            }
        }
        Poly(out).normalized()
    }
}

/// A tensor shape: one [`Dim`] per axis, outermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    /// A shape of constant dims.
    pub fn fixed(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::from(d)).collect())
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dims.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// Number of elements, as a dim expression.
    pub fn numel(&self) -> Dim {
        Dim::product(&self.0)
    }

    /// The constant sizes, if every dim is constant.
    pub fn as_fixed(&self) -> Option<Vec<usize>> {
        self.0
            .iter()
            .map(|d| d.as_const().and_then(|v| usize::try_from(v).ok()))
            .collect()
    }

    /// Evaluates every dim with `bindings`.
    pub fn eval(&self, bindings: &HashMap<String, i64>) -> Result<Vec<usize>, DimError> {
        self.0
            .iter()
            .map(|d| {
                let v = d.eval(bindings)?;
                usize::try_from(v).map_err(|_| DimError::Overflow(d.to_string()))
            })
            .collect()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl From<Vec<Dim>> for Shape {
    fn from(dims: Vec<Dim>) -> Shape {
        Shape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> Dim {
        Dim::sym(name)
    }

    #[test]
    fn constructors_fold_constants_and_identities() {
        assert_eq!(Dim::add(Dim::Const(2), Dim::Const(3)), Dim::Const(5));
        assert_eq!(Dim::mul(s("seq"), Dim::Const(1)), s("seq"));
        assert_eq!(Dim::mul(Dim::Const(4), s("seq")).to_string(), "seq*4");
        assert_eq!(
            Dim::mul(Dim::mul(s("seq"), Dim::Const(4)), Dim::Const(3)).to_string(),
            "seq*12"
        );
        assert_eq!(
            Dim::div(Dim::mul(s("seq"), Dim::Const(12)), Dim::Const(4)).to_string(),
            "seq*3"
        );
        assert_eq!(Dim::sub(s("seq"), s("seq")), Dim::Const(0));
        assert_eq!(Dim::div(Dim::Const(-7), Dim::Const(2)), Dim::Const(-4));
        assert_eq!(Dim::div(Dim::Const(7), Dim::Const(-2)), Dim::Const(-4));
    }

    #[test]
    fn overflowing_constants_stay_unfolded() {
        // Regression (from review): folding must not recurse when the constant result overflows.
        let big = Dim::add(Dim::Const(i64::MAX), Dim::Const(1));
        assert_eq!(big.to_string(), "9223372036854775807+1");
        assert!(big.eval(&HashMap::new()).is_err());
        let huge = Dim::mul(Dim::Const(1 << 32), Dim::Const(1 << 32));
        assert_eq!(huge.as_const(), None);
        assert_eq!(
            Dim::div(
                Dim::mul(Dim::sym("s"), Dim::Const(i64::MIN)),
                Dim::Const(-1)
            )
            .to_string(),
            "s*(-9223372036854775808)/(-1)"
        );
    }

    #[test]
    fn printing_uses_minimal_parentheses() {
        let a_plus_b = Dim::add(s("a"), s("b"));
        assert_eq!(Dim::mul(a_plus_b.clone(), s("c")).to_string(), "(a+b)*c");
        assert_eq!(Dim::sub(s("c"), a_plus_b.clone()).to_string(), "c-(a+b)");
        assert_eq!(Dim::add(a_plus_b, s("c")).to_string(), "a+b+c");
        assert_eq!(Dim::Const(-3).to_string(), "-3");
    }

    #[test]
    fn evaluation_and_bounds() {
        let bindings = HashMap::from([("seq".to_string(), 7), ("batch".to_string(), 2)]);
        let d = Dim::add(Dim::mul(s("batch"), s("seq")), Dim::Const(1));
        assert_eq!(d.eval(&bindings), Ok(15));
        assert_eq!(
            s("past").eval(&bindings),
            Err(DimError::Unbound("past".into()))
        );
        assert!(matches!(
            Dim::Div(Box::new(s("seq")), Box::new(Dim::Const(0))).eval(&bindings),
            Err(DimError::DivByZero(_))
        ));
        let maxima = HashMap::from([("seq".to_string(), 512), ("batch".to_string(), 8)]);
        assert_eq!(d.bounds(&maxima), Some((2, 4097)));
        assert_eq!(
            Dim::sub(Dim::Const(512), s("seq")).bounds(&maxima),
            Some((0, 511))
        );
        // Regression (from review): a negative numerator is largest over the largest divisor.
        let shifted = Dim::Div(
            Box::new(Dim::sub(s("seq"), Dim::Const(520))),
            Box::new(s("batch")),
        );
        assert_eq!(shifted.bounds(&maxima), Some((-519, -1)));
        let one = Dim::sub(s("seq"), Dim::add(s("seq"), Dim::Const(-1)));
        assert_eq!(one.bounds(&maxima), Some((1, 1)));
        assert_eq!(one.as_const_equiv(), Some(1));
    }

    #[test]
    fn equivalence_is_polynomial() {
        let ab = Dim::Mul(Box::new(s("a")), Box::new(s("b")));
        let ba = Dim::Mul(Box::new(s("b")), Box::new(s("a")));
        assert!(ab.equiv(&ba));
        let lhs = Dim::mul(Dim::add(s("a"), Dim::Const(1)), Dim::Const(2));
        let rhs = Dim::add(Dim::mul(s("a"), Dim::Const(2)), Dim::Const(2));
        assert!(lhs.equiv(&rhs));
        assert!(!s("a").equiv(&s("b")));
    }
}

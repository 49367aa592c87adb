//! Input dims requested on the command line: `--shape input_ids=1x128` binds constants,
//! `--shape input_ids=batch:8xseq:512` keeps symbols with their maxima.

use std::collections::BTreeMap;

/// One requested dim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimSpec {
    /// A constant size.
    Fixed(usize),
    /// A symbol with its maximum.
    Symbol {
        /// The symbol's name.
        name: String,
        /// Its compile-time maximum.
        max: usize,
    },
}

/// Requested dims per input name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputShapes {
    by_input: BTreeMap<String, Vec<DimSpec>>,
}

impl InputShapes {
    /// No requests: every reader uses its defaults.
    pub fn new() -> InputShapes {
        InputShapes::default()
    }

    /// Parses `name=DIMxDIMx...` where each DIM is `N` or `symbol:MAX`.
    pub fn parse_arg(&mut self, arg: &str) -> Result<(), String> {
        let (name, dims) = arg.split_once('=').ok_or_else(|| {
            format!("`{arg}`: expected INPUT=DIMxDIM..., e.g. input_ids=batch:8xseq:512")
        })?;
        let dims = dims
            .split('x')
            .map(|dim| match dim.split_once(':') {
                Some((symbol, max)) => {
                    let valid = symbol.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && symbol.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(format!("`{arg}`: `{symbol}` is not a valid symbol name"));
                    }
                    let max = max.parse::<usize>().ok().filter(|&m| m > 0).ok_or_else(|| {
                        format!("`{arg}`: the maximum of `{symbol}` must be a positive integer, got `{max}`")
                    })?;
                    Ok(DimSpec::Symbol { name: symbol.to_string(), max })
                }
                None => dim
                    .parse::<usize>()
                    .ok()
                    .filter(|&d| d > 0)
                    .map(DimSpec::Fixed)
                    .ok_or_else(|| format!("`{arg}`: `{dim}` is neither a positive size nor symbol:MAX")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.by_input.insert(name.to_string(), dims).is_some() {
            return Err(format!("--shape for `{name}` is given twice"));
        }
        Ok(())
    }

    /// Requests `dims` for `input`, replacing any earlier request.
    pub fn insert(&mut self, input: &str, dims: Vec<DimSpec>) {
        self.by_input.insert(input.to_string(), dims);
    }

    /// The dims requested for `input`, if any.
    pub fn get(&self, input: &str) -> Option<&[DimSpec]> {
        self.by_input.get(input).map(Vec::as_slice)
    }

    /// Input names with requested dims.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_input.keys().map(String::as_str)
    }

    /// True when nothing was requested.
    pub fn is_empty(&self) -> bool {
        self.by_input.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_symbolic_dims() {
        let mut shapes = InputShapes::new();
        shapes.parse_arg("input_ids=1x128").unwrap();
        shapes.parse_arg("attention_mask=batch:8xseq:512").unwrap();
        assert_eq!(
            shapes.get("input_ids").unwrap(),
            [DimSpec::Fixed(1), DimSpec::Fixed(128)]
        );
        assert_eq!(
            shapes.get("attention_mask").unwrap(),
            [
                DimSpec::Symbol {
                    name: "batch".into(),
                    max: 8
                },
                DimSpec::Symbol {
                    name: "seq".into(),
                    max: 512
                }
            ]
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        let mut shapes = InputShapes::new();
        for bad in ["input_ids", "x=0x2", "x=seq:0", "x=1:2", "x=abc", "x=seq:"] {
            assert!(shapes.parse_arg(bad).is_err(), "{bad}");
        }
        shapes.parse_arg("x=2").unwrap();
        assert_eq!(
            shapes.parse_arg("x=3").unwrap_err(),
            "--shape for `x` is given twice"
        );
    }
}

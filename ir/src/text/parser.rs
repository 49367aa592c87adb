//! Text to graph, with errors that give line and column.

use super::lexer::{tokenize, Tok, Token};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::graph::{Graph, GraphError, NodeId};
use crate::ops::{AttrValue, Attrs, Op, TensorType};
use crate::weights::{map_safetensors, Weight};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A syntax or semantic error at a position in the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    pub(super) fn new(line: usize, col: usize, message: impl Into<String>) -> ParseError {
        ParseError {
            line,
            col,
            message: message.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.message)
    }
}

/// An error loading a `.kir` file: the file could not be read, or its text is invalid.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// The text is invalid.
    #[error("{path}:{error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        error: ParseError,
    },
}

/// Parses text without loading a weights file: referenced weights keep their metadata only.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    Parser::new(src, None)?.graph()
}

/// Parses text, loading the `weights` file (if the text names one) relative to `base_dir`.
pub fn parse_with_base(src: &str, base_dir: &Path) -> Result<Graph, ParseError> {
    Parser::new(src, Some(base_dir))?.graph()
}

/// Reads and parses a `.kir` file, with its weights.
pub fn parse_file(path: &Path) -> Result<Graph, LoadError> {
    let src = std::fs::read_to_string(path).map_err(|cause| LoadError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_with_base(&src, base).map_err(|error| LoadError::Parse {
        path: path.to_path_buf(),
        error,
    })
}

/// Deepest nesting of parentheses and lists accepted, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// Most operators one dim expression may have.
const MAX_DIM_OPERATORS: usize = 256;

struct Parser<'a> {
    tokens: Vec<Token>,
    pos: usize,
    base_dir: Option<&'a Path>,
    loaded: Option<BTreeMap<String, Weight>>,
    graph: Graph,
    dim_operators: usize,
}

impl<'a> Parser<'a> {
    fn new(src: &str, base_dir: Option<&'a Path>) -> Result<Parser<'a>, ParseError> {
        Ok(Parser {
            tokens: tokenize(src)?,
            pos: 0,
            base_dir,
            loaded: None,
            graph: Graph::default(),
            dim_operators: 0,
        })
    }

    fn peek(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let token = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        token
    }

    fn error_at(token: &Token, message: impl Into<String>) -> ParseError {
        ParseError::new(token.line, token.col, message)
    }

    fn unexpected(token: &Token, expected: &str) -> ParseError {
        Self::error_at(token, format!("expected {expected}, found {}", token.tok))
    }

    fn expect_punct(&mut self, c: char) -> Result<Token, ParseError> {
        let token = self.next();
        if token.tok == Tok::Punct(c) {
            Ok(token)
        } else {
            Err(Self::unexpected(&token, &format!("`{c}`")))
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        if self.peek().tok == Tok::Punct(c) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, word: &str) -> Result<Token, ParseError> {
        let token = self.next();
        match &token.tok {
            Tok::Ident(w) if w == word => Ok(token),
            _ => Err(Self::unexpected(&token, &format!("`{word}`"))),
        }
    }

    fn expect_ident(&mut self, what: &str) -> Result<(String, Token), ParseError> {
        let token = self.next();
        match &token.tok {
            Tok::Ident(w) => Ok((w.clone(), token)),
            _ => Err(Self::unexpected(&token, what)),
        }
    }

    fn expect_str(&mut self, what: &str) -> Result<(String, Token), ParseError> {
        let token = self.next();
        match &token.tok {
            Tok::Str(s) => Ok((s.clone(), token)),
            _ => Err(Self::unexpected(&token, what)),
        }
    }

    fn expect_name(&mut self) -> Result<(String, Token), ParseError> {
        let token = self.next();
        match &token.tok {
            Tok::Name(n) => Ok((n.clone(), token)),
            _ => Err(Self::unexpected(&token, "a node name `%name`")),
        }
    }

    fn graph(mut self) -> Result<Graph, ParseError> {
        self.expect_keyword("graph")?;
        let (name, _) = self.expect_str("the graph name as a string")?;
        self.graph = Graph::new(name);
        self.expect_punct('{')?;
        loop {
            let token = self.peek().clone();
            match &token.tok {
                Tok::Punct('}') => {
                    self.next();
                    break;
                }
                Tok::Ident(word) if word == "sym" => self.symbol()?,
                Tok::Ident(word) if word == "weights" => self.weights_file()?,
                Tok::Ident(word) if word == "input" => self.input()?,
                Tok::Ident(word) if word == "output" => self.output()?,
                Tok::Name(_) => self.node()?,
                _ => {
                    return Err(Self::unexpected(
                        &token,
                        "`sym`, `weights`, `input`, `output`, a node or `}`",
                    ))
                }
            }
        }
        let end = self.next();
        if end.tok != Tok::Eof {
            return Err(Self::unexpected(&end, "end of input after the graph"));
        }
        if self.graph.outputs().is_empty() {
            return Err(Self::error_at(&end, "the graph declares no outputs"));
        }
        Ok(self.graph)
    }

    fn symbol(&mut self) -> Result<(), ParseError> {
        self.next();
        let (name, token) = self.expect_ident("a symbol name")?;
        let le = self.next();
        if le.tok != Tok::LessEqual {
            return Err(Self::unexpected(&le, "`<=` and the symbol's maximum"));
        }
        let max_token = self.next();
        let Tok::Int(max) = max_token.tok else {
            return Err(Self::unexpected(&max_token, "an integer maximum"));
        };
        let max = i64::try_from(max).map_err(|_| {
            Self::error_at(&max_token, format!("maximum {max} does not fit in i64"))
        })?;
        self.graph
            .declare_symbol(&name, max)
            .map_err(|e| Self::error_at(&token, e.to_string()))
    }

    fn weights_file(&mut self) -> Result<(), ParseError> {
        let keyword = self.next();
        let (path, token) = self.expect_str("the weights file as a string")?;
        if self.graph.weights_file().is_some() {
            return Err(Self::error_at(&keyword, "`weights` is given twice"));
        }
        if let Some(base) = self.base_dir {
            let full = base.join(&path);
            let weights =
                map_safetensors(&full).map_err(|e| Self::error_at(&token, e.to_string()))?;
            self.loaded = Some(weights);
        }
        self.graph.set_weights_file(Some(path));
        Ok(())
    }

    fn input(&mut self) -> Result<(), ParseError> {
        self.next();
        let (name, token) = self.expect_name()?;
        self.expect_punct(':')?;
        let ty = self.tensor_type()?;
        self.graph
            .add_input(&name, ty)
            .map(|_| ())
            .map_err(|e| Self::error_at(&token, e.to_string()))
    }

    fn output(&mut self) -> Result<(), ParseError> {
        self.next();
        let (name, token) = self.expect_str("the output name as a string")?;
        self.expect_punct('=')?;
        let (node, node_token) = self.expect_name()?;
        let id = self.lookup(&node, &node_token)?;
        self.graph
            .add_output(&name, id)
            .map_err(|e| Self::error_at(&token, e.to_string()))
    }

    fn lookup(&self, name: &str, token: &Token) -> Result<NodeId, ParseError> {
        self.graph.find(name).ok_or_else(|| {
            Self::error_at(
                token,
                format!("node %{name} is not defined before this use"),
            )
        })
    }

    fn node(&mut self) -> Result<(), ParseError> {
        let (name, name_token) = self.expect_name()?;
        if self.graph.find(&name).is_some() {
            return Err(Self::error_at(
                &name_token,
                format!("node %{name} is defined twice"),
            ));
        }
        self.expect_punct('=')?;
        let (op_name, op_token) = self.expect_ident("an op name")?;
        if op_name == "const" {
            return self.constant(&name, &name_token);
        }
        let mut operands = Vec::new();
        if self.eat_punct('(') {
            loop {
                let (operand, token) = self.expect_name()?;
                operands.push(self.lookup(&operand, &token)?);
                if !self.eat_punct(',') {
                    break;
                }
            }
            self.expect_punct(')')?;
        }
        let attrs = if self.peek().tok == Tok::Punct('{') {
            self.next();
            let attrs = self.attr_list('}', 0)?;
            self.expect_punct('}')?;
            attrs
        } else {
            Vec::new()
        };
        let op = Op::from_text(&op_name, Attrs::new(attrs))
            .map_err(|m| Self::error_at(&op_token, format!("{op_name}: {m}")))?;
        let declared = if self.eat_punct(':') {
            let token = self.peek().clone();
            Some((self.tensor_type()?, token))
        } else {
            None
        };
        let result = match declared {
            Some((ty, ty_token)) => {
                self.graph
                    .add_node_typed(&name, op, &operands, ty)
                    .map_err(|e| match e {
                        GraphError::Node { ref message, .. }
                            if message.starts_with("declared type") =>
                        {
                            Self::error_at(&ty_token, e.to_string())
                        }
                        other => Self::error_at(&op_token, other.to_string()),
                    })
            }
            None => self
                .graph
                .add_node(&name, op, &operands)
                .map_err(|e| Self::error_at(&op_token, e.to_string())),
        };
        result.map(|_| ())
    }

    fn constant(&mut self, name: &str, name_token: &Token) -> Result<(), ParseError> {
        let (weight_name, weight_token) = self.expect_str("the weight name as a string")?;
        let inline = if self.peek().tok == Tok::Punct('[') {
            let open = self.next();
            let mut values = Vec::new();
            if self.peek().tok != Tok::Punct(']') {
                loop {
                    values.push(self.literal()?);
                    if !self.eat_punct(',') {
                        break;
                    }
                }
            }
            self.expect_punct(']')?;
            Some((values, open))
        } else {
            None
        };
        self.expect_punct(':')?;
        let ty_token = self.peek().clone();
        let ty = self.tensor_type()?;
        let dims = ty.shape.as_fixed().ok_or_else(|| {
            Self::error_at(
                &ty_token,
                format!("a constant needs constant dims, got {}", ty.shape),
            )
        })?;
        let checksum = if self.peek().tok == Tok::Ident("checksum".into()) {
            self.next();
            let token = self.next();
            match token.tok {
                Tok::Hex(v) => Some((v, token)),
                _ => return Err(Self::unexpected(&token, "a hex checksum `0x...`")),
            }
        } else {
            None
        };
        let weight = match (inline, &self.loaded) {
            (Some((values, open)), _) => {
                let bytes = literal_bytes(ty.dtype, &dims, &values)
                    .map_err(|m| Self::error_at(&open, m))?;
                Weight::owned(ty.dtype, dims.clone(), bytes)
                    .map_err(|e| Self::error_at(&open, e.to_string()))?
            }
            (None, Some(loaded)) => {
                let found = loaded.get(&weight_name).ok_or_else(|| {
                    Self::error_at(
                        &weight_token,
                        format!("weight `{weight_name}` is not in the weights file"),
                    )
                })?;
                if found.dtype != ty.dtype || found.shape != dims {
                    return Err(Self::error_at(
                        &ty_token,
                        format!(
                            "weight `{weight_name}` is {}{:?} in the weights file, the text says {ty}",
                            found.dtype, found.shape
                        ),
                    ));
                }
                found.clone()
            }
            (None, None) => Weight {
                dtype: ty.dtype,
                shape: dims.clone(),
                checksum: checksum.as_ref().map_or(0, |(v, _)| *v),
                data: None,
            },
        };
        if let Some((expected, token)) = &checksum {
            if weight.checksum != *expected {
                return Err(Self::error_at(
                    token,
                    format!(
                        "weight `{weight_name}` has checksum 0x{:016x}, the text says 0x{expected:016x}",
                        weight.checksum
                    ),
                ));
            }
        } else if weight.data.is_none() {
            return Err(Self::error_at(
                &ty_token,
                format!("weight `{weight_name}` needs inline values or a checksum"),
            ));
        }
        if let Some(existing) = self.graph.weights().get(&weight_name) {
            if existing.dtype != weight.dtype
                || existing.shape != weight.shape
                || existing.checksum != weight.checksum
            {
                return Err(Self::error_at(
                    &weight_token,
                    format!("weight `{weight_name}` is declared twice, differently"),
                ));
            }
        } else {
            self.graph.weights_mut().insert(weight_name.clone(), weight);
        }
        self.graph
            .add_constant_node(name, &weight_name)
            .map(|_| ())
            .map_err(|e| Self::error_at(name_token, e.to_string()))
    }

    fn literal(&mut self) -> Result<(String, Token), ParseError> {
        let token = self.next();
        let negative = token.tok == Tok::Punct('-');
        let value_token = if negative { self.next() } else { token.clone() };
        let text = match &value_token.tok {
            Tok::Int(v) => v.to_string(),
            Tok::Float(s) => s.clone(),
            Tok::Ident(w) if matches!(w.as_str(), "inf" | "NaN" | "true" | "false") => w.clone(),
            _ => {
                return Err(Self::unexpected(
                    &value_token,
                    "a number, `inf`, `NaN`, `true` or `false`",
                ))
            }
        };
        Ok((if negative { format!("-{text}") } else { text }, token))
    }

    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let (name, token) = self.expect_ident("a dtype")?;
        let dtype = DType::from_name(&name)
            .ok_or_else(|| Self::error_at(&token, format!("unknown dtype `{name}`")))?;
        self.expect_punct('[')?;
        let mut dims = Vec::new();
        if !self.eat_punct(']') {
            loop {
                dims.push(self.dim(0)?);
                if !self.eat_punct(',') {
                    break;
                }
            }
            self.expect_punct(']')?;
        }
        Ok(TensorType::new(dtype, Shape(dims)))
    }

    /// `term (('+' | '-') term)*`, left-associative, building the tree exactly as written.
    fn dim(&mut self, depth: usize) -> Result<Dim, ParseError> {
        if depth == 0 {
            self.dim_operators = 0;
        }
        let mut lhs = self.dim_term(depth)?;
        loop {
            let build: fn(Box<Dim>, Box<Dim>) -> Dim = match self.peek().tok {
                Tok::Punct('+') => Dim::Add,
                Tok::Punct('-') => Dim::Sub,
                _ => return Ok(lhs),
            };
            self.next();
            self.count_dim_operator()?;
            let rhs = self.dim_term(depth)?;
            lhs = build(Box::new(lhs), Box::new(rhs));
        }
    }

    fn dim_term(&mut self, depth: usize) -> Result<Dim, ParseError> {
        let mut lhs = self.dim_atom(depth)?;
        loop {
            let build: fn(Box<Dim>, Box<Dim>) -> Dim = match self.peek().tok {
                Tok::Punct('*') => Dim::Mul,
                Tok::Punct('/') => Dim::Div,
                _ => return Ok(lhs),
            };
            self.next();
            self.count_dim_operator()?;
            let rhs = self.dim_atom(depth)?;
            lhs = build(Box::new(lhs), Box::new(rhs));
        }
    }

    /// Bounds the size of one dim expression, whose trees every later pass walks recursively.
    fn count_dim_operator(&mut self) -> Result<(), ParseError> {
        self.dim_operators += 1;
        if self.dim_operators > MAX_DIM_OPERATORS {
            return Err(Self::error_at(
                self.peek(),
                format!("dim expression has more than {MAX_DIM_OPERATORS} operators"),
            ));
        }
        Ok(())
    }

    fn dim_atom(&mut self, depth: usize) -> Result<Dim, ParseError> {
        let token = self.next();
        match &token.tok {
            Tok::Int(v) => i64::try_from(*v)
                .map(Dim::Const)
                .map_err(|_| Self::error_at(&token, format!("integer `{v}` does not fit in i64"))),
            Tok::Punct('-') => {
                let next = self.next();
                match next.tok {
                    Tok::Int(v) => 0i64.checked_sub_unsigned(v).map(Dim::Const).ok_or_else(|| {
                        Self::error_at(&next, format!("integer `-{v}` does not fit in i64"))
                    }),
                    _ => Err(Self::unexpected(&next, "an integer after `-`")),
                }
            }
            Tok::Ident(name) => Ok(Dim::Sym(name.clone())),
            Tok::Punct('(') => {
                if depth >= MAX_DEPTH {
                    return Err(Self::error_at(&token, "expression nested too deeply"));
                }
                let inner = self.dim(depth + 1)?;
                self.expect_punct(')')?;
                Ok(inner)
            }
            _ => Err(Self::unexpected(
                &token,
                "a dim (integer, symbol or expression)",
            )),
        }
    }

    fn attr_list(
        &mut self,
        close: char,
        depth: usize,
    ) -> Result<Vec<(String, AttrValue)>, ParseError> {
        let mut attrs: Vec<(String, AttrValue)> = Vec::new();
        if self.peek().tok == Tok::Punct(close) {
            return Ok(attrs);
        }
        loop {
            let (key, token) = self.expect_ident("an attribute name")?;
            if attrs.iter().any(|(k, _)| *k == key) {
                return Err(Self::error_at(
                    &token,
                    format!("attribute `{key}` is given twice"),
                ));
            }
            self.expect_punct('=')?;
            let value = self.attr_value(depth)?;
            attrs.push((key, value));
            if !self.eat_punct(',') {
                return Ok(attrs);
            }
        }
    }

    fn attr_value(&mut self, depth: usize) -> Result<AttrValue, ParseError> {
        let token = self.peek().clone();
        if depth >= MAX_DEPTH {
            return Err(Self::error_at(&token, "attribute nested too deeply"));
        }
        match &token.tok {
            Tok::Str(s) => {
                self.next();
                Ok(AttrValue::Str(s.clone()))
            }
            Tok::Float(s) => {
                self.next();
                Ok(AttrValue::Float(s.clone()))
            }
            Tok::Punct('[') => {
                self.next();
                let mut items = Vec::new();
                if !self.eat_punct(']') {
                    loop {
                        items.push(self.attr_value(depth + 1)?);
                        if !self.eat_punct(',') {
                            break;
                        }
                    }
                    self.expect_punct(']')?;
                }
                Ok(AttrValue::List(items))
            }
            Tok::Punct('-')
                if matches!(
                    self.tokens.get(self.pos + 1).map(|t| &t.tok),
                    Some(Tok::Float(_)) | Some(Tok::Ident(_))
                ) =>
            {
                self.next();
                let next = self.next();
                match &next.tok {
                    Tok::Float(s) => Ok(AttrValue::Float(format!("-{s}"))),
                    Tok::Ident(w) if w == "inf" => Ok(AttrValue::Float("-inf".into())),
                    _ => Err(Self::unexpected(&next, "a number after `-`")),
                }
            }
            Tok::Ident(word) => match word.as_str() {
                "true" | "false" => {
                    self.next();
                    Ok(AttrValue::Bool(word == "true"))
                }
                "inf" | "NaN" => {
                    self.next();
                    Ok(AttrValue::Float(word.clone()))
                }
                _ if self.tokens.get(self.pos + 1).map(|t| &t.tok) == Some(&Tok::Punct('(')) => {
                    self.next();
                    self.next();
                    let args = self.attr_list(')', depth + 1)?;
                    self.expect_punct(')')?;
                    Ok(AttrValue::Call(word.clone(), args))
                }
                _ => {
                    self.dim_operators = 0;
                    Ok(AttrValue::Dim(self.dim(depth)?))
                }
            },
            _ => {
                self.dim_operators = 0;
                Ok(AttrValue::Dim(self.dim(depth)?))
            }
        }
    }
}

/// Little-endian bytes of inline literal values of `dtype`.
fn literal_bytes(
    dtype: DType,
    dims: &[usize],
    values: &[(String, Token)],
) -> Result<Vec<u8>, String> {
    let numel: usize = dims.iter().product();
    if values.len() != numel {
        return Err(format!(
            "{} values given for {numel} elements",
            values.len()
        ));
    }
    let mut bytes = Vec::with_capacity(numel * dtype.size_bytes());
    for (text, _) in values {
        let float = || {
            text.parse::<f32>()
                .map_err(|_| format!("`{text}` is not a {dtype}"))
        };
        let int = || {
            text.parse::<i64>()
                .map_err(|_| format!("`{text}` is not a {dtype}"))
        };
        let out_of_range = || format!("`{text}` is out of range for {dtype}");
        match dtype {
            DType::F32 => bytes.extend(float()?.to_le_bytes()),
            DType::F16 => bytes.extend(f16::from_f32(float()?).to_le_bytes()),
            DType::BF16 => bytes.extend(bf16::from_f32(float()?).to_le_bytes()),
            DType::I64 => bytes.extend(int()?.to_le_bytes()),
            DType::I32 => bytes.extend(
                i32::try_from(int()?)
                    .map_err(|_| out_of_range())?
                    .to_le_bytes(),
            ),
            DType::I8 => bytes.extend(
                i8::try_from(int()?)
                    .map_err(|_| out_of_range())?
                    .to_le_bytes(),
            ),
            DType::U8 => bytes.push(u8::try_from(int()?).map_err(|_| out_of_range())?),
            DType::Bool => match text.as_str() {
                "true" => bytes.push(1),
                "false" => bytes.push(0),
                _ => return Err(format!("`{text}` is not a bool")),
            },
        }
    }
    Ok(bytes)
}

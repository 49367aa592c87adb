//! Tokens of the text format, each with its line and column (1-based, in characters).

use super::parser::ParseError;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Tok {
    /// `[A-Za-z_][A-Za-z0-9_]*`
    Ident(String),
    /// A decimal integer (unsigned: a leading `-` is its own token, and `-2^63` must lex).
    Int(u64),
    /// A decimal number with a fraction or exponent, as written.
    Float(String),
    /// `0x` followed by hex digits.
    Hex(u64),
    /// A quoted string, unescaped.
    Str(String),
    /// `%name`, without the `%`.
    Name(String),
    /// `<=`
    LessEqual,
    /// One of `{ } ( ) [ ] , = : * + - /`.
    Punct(char),
    Eof,
}

impl std::fmt::Display for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Int(v) => write!(f, "`{v}`"),
            Tok::Float(s) => write!(f, "`{s}`"),
            Tok::Hex(v) => write!(f, "`0x{v:x}`"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Name(s) => write!(f, "`%{s}`"),
            Tok::LessEqual => f.write_str("`<=`"),
            Tok::Punct(c) => write!(f, "`{c}`"),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Token {
    pub tok: Tok,
    pub line: usize,
    pub col: usize,
}

/// Characters allowed in a bare `%name`.
pub(super) fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    col: usize,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|&c| keep(c)) {
            s.push(c);
            self.bump();
        }
        s
    }

    fn string(&mut self, line: usize, col: usize) -> Result<String, ParseError> {
        let mut s = String::new();
        loop {
            let (l, c) = (self.line, self.col);
            match self.bump() {
                None | Some('\n') => return Err(ParseError::new(line, col, "unterminated string")),
                Some('"') => return Ok(s),
                Some('\\') => s.push(self.escape(l, c)?),
                Some(ch) => s.push(ch),
            }
        }
    }

    fn escape(&mut self, line: usize, col: usize) -> Result<char, ParseError> {
        let bad = |what: &str| ParseError::new(line, col, format!("invalid escape {what}"));
        Ok(match self.bump() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('0') => '\0',
            Some('\\') => '\\',
            Some('"') => '"',
            Some('\'') => '\'',
            Some('u') => {
                if self.bump() != Some('{') {
                    return Err(bad("(expected `\\u{...}`)"));
                }
                let hex = self.take_while(|c| c.is_ascii_hexdigit());
                if self.bump() != Some('}') || hex.is_empty() || hex.len() > 6 {
                    return Err(bad("(expected `\\u{...}`)"));
                }
                u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| bad(&format!("\\u{{{hex}}}")))?
            }
            Some(other) => return Err(bad(&format!("`\\{other}`"))),
            None => return Err(bad("at end of input")),
        })
    }
}

/// Splits `src` into tokens, ending with [`Tok::Eof`].
pub(super) fn tokenize(src: &str) -> Result<Vec<Token>, ParseError> {
    let mut cur = Cursor {
        chars: src.chars().peekable(),
        line: 1,
        col: 1,
    };
    let mut tokens = Vec::new();
    loop {
        let (line, col) = (cur.line, cur.col);
        let Some(c) = cur.peek() else {
            tokens.push(Token {
                tok: Tok::Eof,
                line,
                col,
            });
            return Ok(tokens);
        };
        let tok = match c {
            c if c.is_whitespace() => {
                cur.bump();
                continue;
            }
            '#' => {
                cur.take_while(|c| c != '\n');
                continue;
            }
            '"' => {
                cur.bump();
                Tok::Str(cur.string(line, col)?)
            }
            '%' => {
                cur.bump();
                if cur.peek() == Some('"') {
                    cur.bump();
                    let (l, c) = (cur.line, cur.col);
                    let name = cur.string(line, col)?;
                    if name.is_empty() {
                        return Err(ParseError::new(l, c, "empty node name"));
                    }
                    Tok::Name(name)
                } else {
                    let name = cur.take_while(is_name_char);
                    if name.is_empty() {
                        return Err(ParseError::new(line, col, "expected a node name after `%`"));
                    }
                    Tok::Name(name)
                }
            }
            '<' => {
                cur.bump();
                if cur.bump() != Some('=') {
                    return Err(ParseError::new(line, col, "expected `<=`"));
                }
                Tok::LessEqual
            }
            '{' | '}' | '(' | ')' | '[' | ']' | ',' | '=' | ':' | '*' | '+' | '-' | '/' => {
                cur.bump();
                Tok::Punct(c)
            }
            c if c.is_ascii_digit() => number(&mut cur, line, col)?,
            c if c.is_ascii_alphabetic() || c == '_' => {
                Tok::Ident(cur.take_while(|c| c.is_ascii_alphanumeric() || c == '_'))
            }
            other => {
                return Err(ParseError::new(
                    line,
                    col,
                    format!("unexpected character {other:?}"),
                ))
            }
        };
        tokens.push(Token { tok, line, col });
    }
}

fn number(cur: &mut Cursor, line: usize, col: usize) -> Result<Tok, ParseError> {
    let mut text = cur.take_while(|c| c.is_ascii_digit());
    if text == "0" && cur.peek() == Some('x') {
        cur.bump();
        let hex = cur.take_while(|c| c.is_ascii_hexdigit());
        return u64::from_str_radix(&hex, 16)
            .map(Tok::Hex)
            .map_err(|_| ParseError::new(line, col, format!("invalid hex number `0x{hex}`")));
    }
    let mut is_float = false;
    if cur.peek() == Some('.') {
        is_float = true;
        text.push('.');
        cur.bump();
        text.push_str(&cur.take_while(|c| c.is_ascii_digit()));
    }
    if matches!(cur.peek(), Some('e' | 'E')) {
        is_float = true;
        text.push('e');
        cur.bump();
        if let Some(sign) = cur.peek().filter(|&c| c == '-' || c == '+') {
            text.push(sign);
            cur.bump();
        }
        let exponent = cur.take_while(|c| c.is_ascii_digit());
        if exponent.is_empty() {
            return Err(ParseError::new(
                line,
                col,
                format!("missing exponent digits in `{text}`"),
            ));
        }
        text.push_str(&exponent);
    }
    if cur
        .peek()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
    {
        return Err(ParseError::new(
            line,
            col,
            format!("invalid number `{text}{}`", cur.peek().unwrap_or(' ')),
        ));
    }
    if is_float {
        Ok(Tok::Float(text))
    } else {
        text.parse::<u64>().map(Tok::Int).map_err(|_| {
            ParseError::new(line, col, format!("integer `{text}` does not fit in i64"))
        })
    }
}

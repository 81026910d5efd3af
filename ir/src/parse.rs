//! The text-IR parser: a lexer and a recursive-descent parser producing a
//! [`Module`]. Every error carries the line and column where it was found; no
//! input makes it panic. Shapes are not checked here (that is the verifier's job);
//! only syntax, names and def-before-use are.

use std::collections::HashMap;

use crate::dim::{Dim, DimError};
use crate::graph::{Graph, Module, Span, ValueId};
use crate::op::{AttrValue, Op};
use crate::types::{DType, TensorType};

/// A syntax or naming error in text IR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct ParseError {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

/// Parentheses and brackets nest at most this deep (guards the stack).
const MAX_NESTING: usize = 64;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `%name` or `%3`.
    Local(String),
    /// `@name`.
    Global(String),
    Int(i64),
    Float(f64),
    Punct(&'static str),
    Eof,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Local(s) => format!("`%{s}`"),
            Tok::Global(s) => format!("`@{s}`"),
            Tok::Int(i) => format!("`{i}`"),
            Tok::Float(x) => format!("`{x:?}`"),
            Tok::Punct(p) => format!("`{p}`"),
            Tok::Eof => "end of input".to_string(),
        }
    }
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    src: &'a str,
    line: usize,
    col: usize,
}

const PUNCT: [&str; 14] = [
    "->", "(", ")", "[", "]", "{", "}", ",", ":", "=", "+", "-", "*", "/",
];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Lexer<'a> {
        Lexer {
            chars: src.char_indices().peekable(),
            src,
            line: 1,
            col: 1,
        }
    }

    fn bump(&mut self) -> Option<char> {
        let (_, c) = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|(_, c)| *c)
    }

    fn offset(&mut self) -> usize {
        self.chars.peek().map_or(self.src.len(), |(i, _)| *i)
    }

    fn err(&self, line: usize, col: usize, message: String) -> ParseError {
        ParseError { line, col, message }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.offset();
        while self.peek().is_some_and(&f) {
            self.bump();
        }
        let end = self.offset();
        &self.src[start..end]
    }

    fn tokens(mut self) -> Result<Vec<(Tok, Span)>, ParseError> {
        let mut out = Vec::new();
        loop {
            while let Some(c) = self.peek() {
                if c.is_whitespace() {
                    self.bump();
                } else if c == '/' && self.src[self.offset()..].starts_with("//") {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                } else {
                    break;
                }
            }
            let span = Span {
                line: self.line,
                col: self.col,
            };
            let Some(c) = self.peek() else {
                out.push((Tok::Eof, span));
                return Ok(out);
            };
            let tok = if c.is_ascii_alphabetic() || c == '_' {
                let word = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
                Tok::Ident(word.to_string())
            } else if c == '%' || c == '@' {
                self.bump();
                let name = self.take_while(is_name_char);
                if name.is_empty() {
                    return Err(self.err(
                        span.line,
                        span.col,
                        format!("expected a name after `{c}`"),
                    ));
                }
                if c == '%' {
                    Tok::Local(name.to_string())
                } else {
                    Tok::Global(name.to_string())
                }
            } else if c.is_ascii_digit() {
                self.number(span)?
            } else if let Some(p) = PUNCT
                .iter()
                .find(|p| self.src[self.offset()..].starts_with(**p))
            {
                for _ in 0..p.len() {
                    self.bump();
                }
                Tok::Punct(p)
            } else {
                return Err(self.err(span.line, span.col, format!("unexpected character {c:?}")));
            };
            out.push((tok, span));
        }
    }

    fn number(&mut self, span: Span) -> Result<Tok, ParseError> {
        let start = self.offset();
        self.take_while(|c| c.is_ascii_digit());
        let mut float = false;
        if self.peek() == Some('.') {
            float = true;
            self.bump();
            self.take_while(|c| c.is_ascii_digit());
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            float = true;
            self.bump();
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            if self.take_while(|c| c.is_ascii_digit()).is_empty() {
                return Err(self.err(span.line, span.col, "malformed exponent in number".into()));
            }
        }
        let end = self.offset();
        let text = &self.src[start..end];
        if float {
            text.parse::<f64>()
                .map(Tok::Float)
                .map_err(|_| self.err(span.line, span.col, format!("malformed number `{text}`")))
        } else {
            text.parse::<i64>().map(Tok::Int).map_err(|_| {
                self.err(
                    span.line,
                    span.col,
                    format!("integer `{text}` is too large"),
                )
            })
        }
    }
}

struct Parser {
    toks: Vec<(Tok, Span)>,
    pos: usize,
    depth: usize,
}

/// Parses a text-IR file holding one or more functions.
pub fn parse_module(src: &str) -> Result<Module, ParseError> {
    let toks = Lexer::new(src).tokens()?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let mut funcs = Vec::new();
    while p.peek() != &Tok::Eof {
        let f = p.func()?;
        if funcs.iter().any(|g: &Graph| g.name == f.name) {
            return Err(p.error_at(p.span(), format!("function @{} is defined twice", f.name)));
        }
        funcs.push(f);
    }
    if funcs.is_empty() {
        return Err(p.error_at(p.span(), "expected `func`, found end of input".into()));
    }
    Ok(Module { funcs })
}

/// Parses text IR that holds exactly one function.
pub fn parse_graph(src: &str) -> Result<Graph, ParseError> {
    let mut m = parse_module(src)?;
    if m.funcs.len() != 1 {
        return Err(ParseError {
            line: 1,
            col: 1,
            message: format!("expected one function, found {}", m.funcs.len()),
        });
    }
    Ok(m.funcs.remove(0))
}

/// Parses a dim expression such as `S + T` or `d / h`.
pub fn parse_dim(src: &str) -> Result<Dim, ParseError> {
    let toks = Lexer::new(src).tokens()?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let d = p.dim()?;
    p.expect_eof()?;
    Ok(d)
}

/// Parses a tensor type such as `f32[B, T, 768]`.
pub fn parse_type(src: &str) -> Result<TensorType, ParseError> {
    let toks = Lexer::new(src).tokens()?;
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let t = p.ty()?;
    p.expect_eof()?;
    Ok(t)
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).map_or(&Tok::Eof, |(t, _)| t)
    }

    fn peek2(&self) -> &Tok {
        self.toks.get(self.pos + 1).map_or(&Tok::Eof, |(t, _)| t)
    }

    fn span(&self) -> Span {
        self.toks
            .get(self.pos)
            .or(self.toks.last())
            .map_or(Span { line: 1, col: 1 }, |(_, s)| *s)
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error_at(&self, span: Span, message: String) -> ParseError {
        ParseError {
            line: span.line,
            col: span.col,
            message: bounded_message(message),
        }
    }

    fn unexpected(&self, expected: &str) -> ParseError {
        self.error_at(
            self.span(),
            format!("expected {expected}, found {}", self.peek().describe()),
        )
    }

    fn eat(&mut self, p: &str) -> bool {
        if matches!(self.peek(), Tok::Punct(q) if *q == p) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, p: &str) -> Result<(), ParseError> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("`{p}`")))
        }
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        if matches!(self.peek(), Tok::Ident(s) if s == kw) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(&format!("`{kw}`")))
        }
    }

    fn expect_eof(&self) -> Result<(), ParseError> {
        if self.peek() == &Tok::Eof {
            Ok(())
        } else {
            Err(self.unexpected("end of input"))
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.pos += 1;
                Ok(s)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error_at(
                self.span(),
                format!("nesting deeper than {MAX_NESTING} levels"),
            ));
        }
        Ok(())
    }

    fn dim_error(&self, span: Span, e: DimError) -> ParseError {
        self.error_at(span, format!("invalid size expression: {e}"))
    }

    /// `expr := ['-'] term (('+'|'-') term)*`
    fn dim(&mut self) -> Result<Dim, ParseError> {
        self.enter()?;
        let span = self.span();
        let neg = self.eat("-");
        let mut acc = self.dim_term()?;
        if neg {
            acc = acc.neg().map_err(|e| self.dim_error(span, e))?;
        }
        loop {
            let span = self.span();
            if self.eat("+") {
                let t = self.dim_term()?;
                acc = acc.add(&t).map_err(|e| self.dim_error(span, e))?;
            } else if self.eat("-") {
                let t = self.dim_term()?;
                acc = acc.sub(&t).map_err(|e| self.dim_error(span, e))?;
            } else {
                break;
            }
        }
        self.depth -= 1;
        Ok(acc)
    }

    /// `term := atom (('*'|'/') atom)*`
    fn dim_term(&mut self) -> Result<Dim, ParseError> {
        let mut acc = self.dim_atom()?;
        loop {
            let span = self.span();
            if self.eat("*") {
                let a = self.dim_atom()?;
                acc = acc.mul(&a).map_err(|e| self.dim_error(span, e))?;
            } else if self.eat("/") {
                let a = self.dim_atom()?;
                acc = acc.div(&a).map_err(|e| self.dim_error(span, e))?;
            } else {
                return Ok(acc);
            }
        }
    }

    fn dim_atom(&mut self) -> Result<Dim, ParseError> {
        match self.peek().clone() {
            Tok::Int(i) => {
                self.pos += 1;
                Ok(Dim::constant(i))
            }
            Tok::Ident(s) => {
                if matches!(
                    s.to_ascii_lowercase().as_str(),
                    "inf" | "nan" | "true" | "false"
                ) {
                    return Err(self
                        .unexpected("a size symbol (`inf`, `nan`, `true`, `false` are reserved)"));
                }
                self.pos += 1;
                Ok(Dim::sym(&s))
            }
            Tok::Punct("(") => {
                self.pos += 1;
                let d = self.dim()?;
                self.expect(")")?;
                Ok(d)
            }
            _ => Err(self.unexpected("a size (integer, symbol or parenthesized expression)")),
        }
    }

    fn ty(&mut self) -> Result<TensorType, ParseError> {
        let span = self.span();
        let name = self.ident("a tensor type such as `f32[B, T, d]`")?;
        let Some(dtype) = DType::from_name(&name) else {
            return Err(self.error_at(
                span,
                format!("unknown dtype `{name}` (expected f32, f16, bf16, i32, i64 or bool)"),
            ));
        };
        self.expect("[")?;
        let mut shape = Vec::new();
        if !self.eat("]") {
            loop {
                shape.push(self.dim()?);
                if self.eat("]") {
                    break;
                }
                self.expect(",")?;
            }
        }
        Ok(TensorType::new(dtype, shape))
    }

    fn attr_value(&mut self) -> Result<AttrValue, ParseError> {
        let is_special = |t: &Tok| matches!(t, Tok::Ident(s) if matches!(s.to_ascii_lowercase().as_str(), "inf" | "nan"));
        match self.peek().clone() {
            Tok::Float(x) => {
                self.pos += 1;
                Ok(AttrValue::Float(x))
            }
            Tok::Punct("-")
                if matches!(self.peek2(), Tok::Float(_)) || is_special(self.peek2()) =>
            {
                self.pos += 1;
                match self.next() {
                    Tok::Float(x) => Ok(AttrValue::Float(-x)),
                    Tok::Ident(s) if s.eq_ignore_ascii_case("inf") => {
                        Ok(AttrValue::Float(f64::NEG_INFINITY))
                    }
                    _ => Ok(AttrValue::Float(f64::NAN)),
                }
            }
            Tok::Ident(s) if is_special(self.peek()) => {
                self.pos += 1;
                Ok(AttrValue::Float(if s.eq_ignore_ascii_case("inf") {
                    f64::INFINITY
                } else {
                    f64::NAN
                }))
            }
            Tok::Ident(name) if self.peek2() == &Tok::Punct("(") => {
                self.pos += 2;
                self.enter()?;
                let mut args = Vec::new();
                if !self.eat(")") {
                    loop {
                        args.push(self.attr_value()?);
                        if self.eat(")") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                self.depth -= 1;
                Ok(AttrValue::Call(name, args))
            }
            Tok::Ident(s) if s == "true" || s == "false" => {
                self.pos += 1;
                Ok(AttrValue::Bool(s == "true"))
            }
            Tok::Punct("[") => {
                self.pos += 1;
                self.enter()?;
                let mut items = Vec::new();
                if !self.eat("]") {
                    loop {
                        items.push(self.attr_value()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                self.depth -= 1;
                Ok(AttrValue::List(items))
            }
            _ => Ok(AttrValue::Dim(self.dim()?)),
        }
    }

    fn func(&mut self) -> Result<Graph, ParseError> {
        self.expect_keyword("func")?;
        let name = match self.next() {
            Tok::Global(n) => n,
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a function name such as `@model`"));
            }
        };
        let mut g = Graph::new(&name);
        let mut scope: HashMap<String, ValueId> = HashMap::new();
        self.expect("(")?;
        if !self.eat(")") {
            loop {
                let span = self.span();
                let n = self.local_def(&scope, true)?;
                self.expect(":")?;
                let ty = self.ty()?;
                let id = g.add_input(&n, ty);
                g.set_span(id, span);
                if matches!(self.peek(), Tok::Ident(s) if s == "cache")
                    && self.peek2() == &Tok::Punct("=")
                {
                    self.pos += 2;
                    let output = self.ident("the name of the output that holds the cache")?;
                    g.set_input_role(id, crate::graph::InputRole::Cache { output });
                } else if matches!(self.peek(), Tok::Ident(s) if s == "carried") {
                    self.pos += 1;
                    g.set_input_role(id, crate::graph::InputRole::Carried);
                }
                scope.insert(n, id);
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        }
        self.expect("->")?;
        let mut declared: Vec<(String, TensorType, Span)> = Vec::new();
        let mut caches: Vec<(String, usize)> = Vec::new();
        let mut out_sig = |p: &mut Parser| -> Result<(), ParseError> {
            let span = p.span();
            let oname = if matches!(p.peek(), Tok::Ident(_)) && p.peek2() == &Tok::Punct(":") {
                let n = p.ident("an output name")?;
                p.pos += 1;
                n
            } else {
                format!("out{}", declared.len())
            };
            if declared.iter().any(|(n, _, _)| *n == oname) {
                return Err(p.error_at(span, format!("output `{oname}` is declared twice")));
            }
            let ty = p.ty()?;
            if matches!(p.peek(), Tok::Ident(s) if s == "cache_axis")
                && p.peek2() == &Tok::Punct("=")
            {
                p.pos += 2;
                let at = p.span();
                let axis = p.dim()?;
                let axis = axis
                    .as_const()
                    .and_then(|a| usize::try_from(a).ok())
                    .filter(|&a| a < ty.rank())
                    .ok_or_else(|| {
                        p.error_at(at, format!("cache_axis={axis} is not an axis of {ty}"))
                    })?;
                caches.push((oname.clone(), axis));
            }
            declared.push((oname, ty, span));
            Ok(())
        };
        if self.eat("(") {
            loop {
                out_sig(self)?;
                if self.eat(")") {
                    break;
                }
                self.expect(",")?;
            }
        } else {
            out_sig(self)?;
        }
        for (name, axis) in caches {
            g.set_cache_output(&name, axis);
        }
        if matches!(self.peek(), Tok::Ident(s) if s == "where") {
            self.pos += 1;
            loop {
                let span = self.span();
                let sym = self.ident("a symbol name")?;
                if g.bindings().iter().any(|(n, _)| *n == sym) {
                    return Err(self.error_at(span, format!("symbol `{sym}` is bound twice")));
                }
                self.expect("=")?;
                let d = self.dim()?;
                g.bind(&sym, d);
                g.set_binding_span(&sym, span);
                if !self.eat(",") {
                    break;
                }
            }
        }
        self.expect("{")?;
        let mut returned: Option<(Vec<ValueId>, Span)> = None;
        loop {
            let span = self.span();
            match self.peek().clone() {
                Tok::Punct("}") => {
                    self.pos += 1;
                    break;
                }
                _ if returned.is_some() => return Err(self.unexpected("`}` after `return`")),
                Tok::Ident(kw) if kw == "param" => {
                    self.pos += 1;
                    let pspan = self.span();
                    let pname = match self.next() {
                        Tok::Global(n) => n,
                        _ => {
                            self.pos -= 1;
                            return Err(self.unexpected("a parameter name such as `@wte`"));
                        }
                    };
                    if scope.contains_key(&format!("@{pname}")) {
                        return Err(
                            self.error_at(pspan, format!("parameter @{pname} is declared twice"))
                        );
                    }
                    self.expect(":")?;
                    let ty = self.ty()?;
                    let id = g.add_param(&pname, ty);
                    g.set_span(id, pspan);
                    scope.insert(format!("@{pname}"), id);
                }
                Tok::Ident(kw) if kw == "return" => {
                    self.pos += 1;
                    let mut vals = Vec::new();
                    loop {
                        vals.push(self.use_value(&scope)?);
                        if !self.eat(",") {
                            break;
                        }
                    }
                    returned = Some((vals, span));
                }
                Tok::Local(_) => {
                    let n = self.local_def(&scope, false)?;
                    self.expect("=")?;
                    let op_span = self.span();
                    let opname = self.ident("an op name")?;
                    self.expect("(")?;
                    let mut operands = Vec::new();
                    if !self.eat(")") {
                        loop {
                            operands.push(self.use_value(&scope)?);
                            if self.eat(")") {
                                break;
                            }
                            self.expect(",")?;
                        }
                    }
                    let mut attrs: Vec<(String, AttrValue)> = Vec::new();
                    while !self.eat(":") {
                        let aspan = self.span();
                        if !(matches!(self.peek(), Tok::Ident(_))
                            && self.peek2() == &Tok::Punct("="))
                        {
                            return Err(self.unexpected(&format!(
                                "`: <result type>` after `{opname}(...)` (or an attribute `name=value`)"
                            )));
                        }
                        let aname = self.ident("an attribute name")?;
                        if attrs.iter().any(|(a, _)| *a == aname) {
                            return Err(
                                self.error_at(aspan, format!("attribute `{aname}` is given twice"))
                            );
                        }
                        self.expect("=")?;
                        attrs.push((aname, self.attr_value()?));
                    }
                    let op =
                        Op::from_parts(&opname, &attrs).map_err(|m| self.error_at(op_span, m))?;
                    let ty = self.ty()?;
                    let label = n.clone();
                    let name = if n.chars().all(|c| c.is_ascii_digit()) {
                        None
                    } else {
                        Some(n)
                    };
                    let id = g.add_op(op, &operands, ty, name);
                    g.set_span(id, span);
                    scope.insert(label, id);
                }
                _ => return Err(self.unexpected("`param`, `%name = op(...)`, `return` or `}`")),
            }
        }
        let Some((vals, rspan)) = returned else {
            return Err(self.error_at(self.span(), format!("function @{name} has no `return`")));
        };
        if vals.len() != declared.len() {
            return Err(self.error_at(
                rspan,
                format!(
                    "`return` gives {} values but the signature declares {} outputs",
                    vals.len(),
                    declared.len()
                ),
            ));
        }
        let mut outputs = Vec::new();
        for (i, ((oname, ty, span), v)) in declared.into_iter().zip(vals).enumerate() {
            g.declare_output_type(i, ty, span);
            outputs.push((oname, v));
        }
        g.set_outputs(outputs);
        Ok(g)
    }

    /// A `%name` being defined: must be new; inputs must be named, not numbered.
    fn local_def(
        &mut self,
        scope: &HashMap<String, ValueId>,
        input: bool,
    ) -> Result<String, ParseError> {
        let span = self.span();
        let Tok::Local(n) = self.next() else {
            self.pos -= 1;
            return Err(self.unexpected("a value name such as `%x`"));
        };
        let numeric = n.chars().all(|c| c.is_ascii_digit());
        let starts_ok = n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
        if !numeric && !starts_ok {
            return Err(self.error_at(
                span,
                format!("value name `%{n}` must be a number or start with a letter"),
            ));
        }
        if input && numeric {
            return Err(self.error_at(
                span,
                format!("input `%{n}` needs a name that starts with a letter"),
            ));
        }
        if scope.contains_key(&n) {
            return Err(self.error_at(span, format!("value %{n} is defined twice")));
        }
        Ok(n)
    }

    fn use_value(&mut self, scope: &HashMap<String, ValueId>) -> Result<ValueId, ParseError> {
        let span = self.span();
        match self.next() {
            Tok::Local(n) => scope.get(&n).copied().ok_or_else(|| {
                let names = scope
                    .keys()
                    .filter(|k| !k.starts_with('@'))
                    .map(|k| k.as_str());
                let hint = crate::op::closest(&n, names)
                    .map_or(String::new(), |s| format!(" (did you mean %{s}?)"));
                self.error_at(span, format!("use of undefined value %{n}{hint}"))
            }),
            Tok::Global(n) => scope.get(&format!("@{n}")).copied().ok_or_else(|| {
                self.error_at(
                    span,
                    format!(
                        "use of undeclared parameter @{n} (declare it with `param @{n}: <type>`)"
                    ),
                )
            }),
            _ => {
                self.pos -= 1;
                Err(self.unexpected("a value (`%x` or `@param`)"))
            }
        }
    }
}

/// A parse error's message, at most MAX_MESSAGE characters: the names it
/// quotes come from the input, and a name of megabytes must not become a
/// message of megabytes (the middle goes, with a count of what went).
fn bounded_message(message: String) -> String {
    const MAX_MESSAGE: usize = 400;
    let n = message.chars().count();
    if n <= MAX_MESSAGE {
        return message;
    }
    let head: String = message.chars().take(MAX_MESSAGE / 2).collect();
    let tail: String = message.chars().skip(n - MAX_MESSAGE / 4).collect();
    format!(
        "{head}… ({} characters left out) …{tail}",
        n - MAX_MESSAGE / 2 - MAX_MESSAGE / 4
    )
}

//! A small, safe subset of the AIP-160 filter language used by list rpcs:
//! comparisons joined by `AND`.
//!
//! ```text
//! filter     := comparison ( "AND" comparison )*
//! comparison := field op value
//! field      := ident ( "." ident )*
//! op         := "=" | "!=" | "<" | "<=" | ">" | ">="
//! value      := "quoted string" | number | true | false | bare_word
//! ```
//!
//! Each service decides which fields it accepts and compiles the parsed
//! comparisons to SQL with bound parameters (never string splicing).

use crate::Violation;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// A literal on the right of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A quoted string.
    String(String),
    /// A number.
    Number(f64),
    /// `true` or `false`.
    Bool(bool),
    /// An unquoted word, such as an enum value (`RETENTION`).
    Word(String),
}

impl Literal {
    /// The literal as text (strings and words), for text fields.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Literal::String(s) | Literal::Word(s) => Some(s),
            _ => None,
        }
    }
}

/// One `field op value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Dotted field path.
    pub field: String,
    /// Operator.
    pub op: Op,
    /// Value.
    pub value: Literal,
}

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 2048;
/// Most comparisons in one filter.
pub const MAX_COMPARISONS: usize = 20;

/// Parses a filter; an empty string is no filter. `field` names the request field.
pub fn parse(field: &str, input: &str) -> Result<Vec<Comparison>, Violation> {
    if input.len() > MAX_FILTER_LEN {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_FILTER_LEN} bytes"),
        ));
    }
    let tokens = tokenize(input).map_err(|e| Violation::new(field, e))?;
    let mut out = Vec::new();
    let mut it = tokens.into_iter().peekable();
    while it.peek().is_some() {
        if !out.is_empty() {
            match it.next() {
                Some(Token::Word(w)) if w == "AND" => {}
                other => {
                    return Err(Violation::new(
                        field,
                        format!("expected AND, found {}", describe(other.as_ref())),
                    ));
                }
            }
        }
        let name = match it.next() {
            Some(Token::Word(w)) if is_field_path(&w) => w,
            other => {
                return Err(Violation::new(
                    field,
                    format!("expected a field name, found {}", describe(other.as_ref())),
                ));
            }
        };
        let op = match it.next() {
            Some(Token::Op(op)) => op,
            other => {
                return Err(Violation::new(
                    field,
                    format!(
                        "expected an operator after {name}, found {}",
                        describe(other.as_ref())
                    ),
                ));
            }
        };
        let value = match it.next() {
            Some(Token::Str(s)) => Literal::String(s),
            Some(Token::Word(w)) => word_literal(w),
            other => {
                return Err(Violation::new(
                    field,
                    format!(
                        "expected a value after {name}, found {}",
                        describe(other.as_ref())
                    ),
                ));
            }
        };
        out.push(Comparison {
            field: name,
            op,
            value,
        });
        if out.len() > MAX_COMPARISONS {
            return Err(Violation::new(
                field,
                format!("at most {MAX_COMPARISONS} comparisons"),
            ));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Op(Op),
}

fn describe(t: Option<&Token>) -> String {
    match t {
        None => "end of filter".into(),
        Some(Token::Word(w)) => crate::validation::echo(w),
        Some(Token::Str(s)) => format!("string {}", crate::validation::echo(s)),
        Some(Token::Op(o)) => format!("operator {o:?}"),
    }
}

fn word_literal(w: String) -> Literal {
    match w.as_str() {
        "true" => Literal::Bool(true),
        "false" => Literal::Bool(false),
        _ => match w.parse::<f64>() {
            Ok(n) if n.is_finite() => Literal::Number(n),
            _ => Literal::Word(w),
        },
    }
}

fn is_field_path(w: &str) -> bool {
    w.split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        && w.starts_with(|c: char| c.is_ascii_alphabetic())
}

fn tokenize(input: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '"' | '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('\\') => match chars.next() {
                            Some(e) => s.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some(q) if q == c => break,
                        Some(x) => s.push(x),
                    }
                }
                out.push(Token::Str(s));
            }
            '=' => {
                chars.next();
                out.push(Token::Op(Op::Eq));
            }
            '!' | '<' | '>' => {
                chars.next();
                let eq = chars.next_if_eq(&'=').is_some();
                out.push(Token::Op(match (c, eq) {
                    ('!', true) => Op::Ne,
                    ('<', false) => Op::Lt,
                    ('<', true) => Op::Le,
                    ('>', false) => Op::Gt,
                    ('>', true) => Op::Ge,
                    _ => return Err("'!' must be followed by '='".into()),
                }));
            }
            _ => {
                let mut w = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || matches!(x, '=' | '!' | '<' | '>' | '"' | '\'') {
                        break;
                    }
                    w.push(x);
                    chars.next();
                }
                out.push(Token::Word(w));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conjunctions() {
        let f = parse(
            "filter",
            r#"stage = RETENTION AND attributes.plan="pro" AND attributes.seats >= 10"#,
        )
        .expect("parses");
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0],
            Comparison {
                field: "stage".into(),
                op: Op::Eq,
                value: Literal::Word("RETENTION".into())
            }
        );
        assert_eq!(f[1].value, Literal::String("pro".into()));
        assert_eq!(f[2].op, Op::Ge);
        assert_eq!(f[2].value, Literal::Number(10.0));
    }

    #[test]
    fn empty_is_no_filter() {
        assert_eq!(parse("filter", "  "), Ok(vec![]));
    }

    #[test]
    fn errors_name_the_field() {
        for bad in [
            "stage",
            "stage =",
            "= 3",
            "a = 1 OR b = 2",
            "a = \"x",
            "a ! 3",
            "a.= 1",
        ] {
            let e = parse("filter", bad).expect_err(bad);
            assert_eq!(e.field, "filter");
        }
    }
}

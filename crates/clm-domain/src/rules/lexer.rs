//! Tokens of the rule text.

use super::ast::CmpOp;
use super::error::{Pos, RuleError};
use crate::clock::micros;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A word: field names, keywords, enum values, touchpoint types.
    Ident(String),
    /// A string literal, escapes resolved.
    Str(String),
    /// A number; `text` keeps the digits for exact money amounts.
    Num {
        value: f64,
        text: String,
    },
    /// A duration literal such as `7d`.
    Duration(TimeDelta),
    /// A timestamp literal, truncated to microseconds.
    Time(DateTime<Utc>),
    LParen,
    RParen,
    Comma,
    Dot,
    Cmp(CmpOp),
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub(crate) fn describe(&self) -> String {
        use crate::validation::echo;
        match self {
            Tok::Ident(w) => format!("`{}`", crate::validation::shorten(w, 40)),
            Tok::Str(s) => format!("string {}", echo(s)),
            Tok::Num { text, .. } => format!("number {}", crate::validation::shorten(text, 40)),
            Tok::Duration(_) => "a duration".to_owned(),
            Tok::Time(_) => "a timestamp".to_owned(),
            Tok::LParen => "`(`".to_owned(),
            Tok::RParen => "`)`".to_owned(),
            Tok::Comma => "`,`".to_owned(),
            Tok::Dot => "`.`".to_owned(),
            Tok::Cmp(op) => format!("`{}`", op.as_str()),
            Tok::Eof => "the end of the rule".to_owned(),
        }
    }
}

/// A token and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) pos: Pos,
}

/// Seconds per duration unit.
pub(crate) fn unit_seconds(unit: char) -> Option<i64> {
    match unit {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86_400),
        'w' => Some(604_800),
        _ => None,
    }
}

struct Lexer {
    chars: Vec<char>,
    i: usize,
    line: u32,
    column: u32,
}

impl Lexer {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.i + n).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|c| f(*c)) {
            s.push(c);
            self.bump();
        }
        s
    }

    fn string(&mut self, start: Pos) -> Result<Tok, RuleError> {
        self.bump();
        let mut s = String::new();
        loop {
            let here = self.pos();
            match self.bump() {
                None => return Err(RuleError::at(start, "unterminated string: expected `\"`")),
                Some('"') => return Ok(Tok::Str(s)),
                Some('\\') => match self.bump() {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('n') => s.push('\n'),
                    Some('r') => s.push('\r'),
                    Some('t') => s.push('\t'),
                    Some('u') => s.push(self.unicode_escape(here)?),
                    _ => {
                        return Err(RuleError::at(
                            here,
                            "unknown escape: expected one of \\\" \\\\ \\n \\r \\t \\u{...}",
                        ));
                    }
                },
                Some(c) => s.push(c),
            }
        }
    }

    fn unicode_escape(&mut self, at: Pos) -> Result<char, RuleError> {
        let bad = || {
            RuleError::at(
                at,
                "bad unicode escape: expected \\u{1F600} with 1 to 6 hex digits",
            )
        };
        if self.bump() != Some('{') {
            return Err(bad());
        }
        let hex = self.take_while(|c| c.is_ascii_hexdigit());
        if hex.is_empty() || hex.len() > 6 || self.bump() != Some('}') {
            return Err(bad());
        }
        u32::from_str_radix(&hex, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(bad)
    }

    fn number(&mut self, start: Pos) -> Result<Tok, RuleError> {
        let mut text = String::new();
        if self.peek() == Some('-') {
            self.bump();
            text.push('-');
        }
        let int = self.take_while(|c| c.is_ascii_digit());
        if text.is_empty()
            && int.len() == 4
            && self.peek() == Some('-')
            && self.peek_at(1).is_some_and(|c| c.is_ascii_digit())
        {
            let rest = self
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '+' | '-'));
            return timestamp(&format!("{int}{rest}"))
                .map(Tok::Time)
                .ok_or_else(|| {
                    RuleError::at(
                        start,
                        "bad timestamp: expected RFC 3339 such as 2024-01-31T12:00:00Z, or a date such as 2024-01-31",
                    )
                });
        }
        text.push_str(&int);
        let mut fraction = false;
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            fraction = true;
            text.push('.');
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        if self.peek().is_some_and(|c| c.is_alphabetic() || c == '_') {
            let unit_pos = self.pos();
            let unit = self.take_while(|c| c.is_alphanumeric() || c == '_');
            let mut chars = unit.chars();
            let factor = match (chars.next(), chars.next()) {
                (Some(u), None) if !fraction => unit_seconds(u),
                _ => None,
            };
            let Some(factor) = factor else {
                return Err(RuleError::at(
                    unit_pos,
                    "expected a duration: a whole number and one of the units s, m, h, d, w (e.g. 7d)",
                ));
            };
            return text
                .parse::<i64>()
                .ok()
                .and_then(|n| n.checked_mul(factor))
                .and_then(TimeDelta::try_seconds)
                .map(Tok::Duration)
                .ok_or_else(|| RuleError::at(start, "duration out of range"));
        }
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Tok::Num { value, text }),
            _ => Err(RuleError::at(start, "number out of range")),
        }
    }

    fn next(&mut self) -> Result<Token, RuleError> {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => {
                    self.take_while(|c| c != '\n');
                }
                _ => break,
            }
        }
        let pos = self.pos();
        let Some(c) = self.peek() else {
            return Ok(Token { tok: Tok::Eof, pos });
        };
        let single = |tok| Ok(Token { tok, pos });
        match c {
            '(' | ')' | ',' | '.' => {
                self.bump();
                single(match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    ',' => Tok::Comma,
                    _ => Tok::Dot,
                })
            }
            '=' | '!' | '<' | '>' => {
                self.bump();
                let eq = self.peek() == Some('=');
                if eq {
                    self.bump();
                }
                let op = match (c, eq) {
                    ('=', _) => CmpOp::Eq,
                    ('!', true) => CmpOp::Ne,
                    ('<', false) => CmpOp::Lt,
                    ('<', true) => CmpOp::Lte,
                    ('>', false) => CmpOp::Gt,
                    ('>', true) => CmpOp::Gte,
                    _ => return Err(RuleError::at(pos, "unexpected `!`: expected `!=`")),
                };
                single(Tok::Cmp(op))
            }
            '"' => Ok(Token {
                tok: self.string(pos)?,
                pos,
            }),
            c if c.is_ascii_digit()
                || (c == '-' && self.peek_at(1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                Ok(Token {
                    tok: self.number(pos)?,
                    pos,
                })
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let w = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
                single(Tok::Ident(w))
            }
            c => Err(RuleError::at(pos, format!("unexpected character {c:?}"))),
        }
    }
}

/// Parses a timestamp literal: RFC 3339 or a bare date (midnight UTC).
fn timestamp(s: &str) -> Option<DateTime<Utc>> {
    if s.len() == 10 {
        return NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc());
    }
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| micros(t.with_timezone(&Utc)))
}

/// Splits `input` into tokens, ending with [`Tok::Eof`].
pub(crate) fn tokenize(input: &str) -> Result<Vec<Token>, RuleError> {
    let mut lx = Lexer {
        chars: input.chars().collect(),
        i: 0,
        line: 1,
        column: 1,
    };
    let mut out = Vec::new();
    loop {
        let t = lx.next()?;
        let end = t.tok == Tok::Eof;
        out.push(t);
        if end {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s)
            .expect("lexes")
            .into_iter()
            .map(|t| t.tok)
            .collect()
    }

    #[test]
    fn literals() {
        assert_eq!(
            toks(r#"a_1 "x\"\u{e9}\n" -1.50 7d 2024-01-31 != >="#),
            vec![
                Tok::Ident("a_1".into()),
                Tok::Str("x\"é\n".into()),
                Tok::Num {
                    value: -1.5,
                    text: "-1.50".into()
                },
                Tok::Duration(TimeDelta::days(7)),
                Tok::Time(
                    NaiveDate::from_ymd_opt(2024, 1, 31)
                        .and_then(|d| d.and_hms_opt(0, 0, 0))
                        .expect("date")
                        .and_utc()
                ),
                Tok::Cmp(CmpOp::Ne),
                Tok::Cmp(CmpOp::Gte),
                Tok::Eof,
            ]
        );
        assert_eq!(
            toks("2024-01-31T12:00:00.1234567+02:00"),
            vec![
                Tok::Time(
                    DateTime::parse_from_rfc3339("2024-01-31T10:00:00.123456Z")
                        .expect("ts")
                        .with_timezone(&Utc)
                ),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn positions_count_lines_and_characters() {
        let t = tokenize("x\n  ab # comment\n\"é\" y").expect("lexes");
        let pos: Vec<(u32, u32)> = t.iter().map(|t| (t.pos.line, t.pos.column)).collect();
        assert_eq!(pos, vec![(1, 1), (2, 3), (3, 1), (3, 5), (3, 6)]);
        let e = tokenize("a\n  é").unwrap_err();
        assert_eq!(e.to_string(), "line 2, column 3: unexpected character 'é'");
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let e = tokenize("age = \"abc").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1, column 7: unterminated string: expected `\"`"
        );
        let e = tokenize("x\n 7days").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 2, column 3: expected a duration"),
            "{e}"
        );
        let e = tokenize("1.5d").unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        let e = tokenize("2024-13-01").unwrap_err();
        assert!(
            e.to_string().starts_with("line 1, column 1: bad timestamp"),
            "{e}"
        );
        let e = tokenize(r#""\q""#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 1, column 2: unknown escape"),
            "{e}"
        );
        let e = tokenize("a ! b").unwrap_err();
        assert!(e.to_string().contains("`!=`"), "{e}");
        assert!(tokenize("99999999999999999999w").is_err());
        assert!(tokenize(&format!("1{}", "0".repeat(400))).is_err());
    }
}

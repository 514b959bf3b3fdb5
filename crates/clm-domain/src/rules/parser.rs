//! Recursive-descent parser: text to [`Rule`], with the positions the
//! checker needs to point at line and column.

use super::ast::{
    ALL_GENDERS, Condition, NpsCategory, Operand, Predicate, Rule, ScoreRef, SumField, Test,
    TouchField, TouchQuery, TouchType, Value, ValueType, gender_name, minor_unit_digits,
};
use super::error::{Pos, RuleError};
use super::lexer::{Tok, Token, tokenize};
use crate::lifecycle::Stage;
use crate::money::{Money, is_iso_4217};
use crate::touchpoint::TouchpointKind;

/// Longest rule text accepted, in bytes.
pub const MAX_RULE_BYTES: usize = 64 * 1024;
/// Deepest nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 64;

/// Where the parts of a test are in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TestSpans {
    /// The operator.
    pub(crate) op: Pos,
    /// The first literal (the operator if none).
    pub(crate) value: Pos,
}

/// Where the parts of a condition are in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CondSpans {
    /// The condition's first token (the operand).
    pub(crate) start: Pos,
    /// The test.
    pub(crate) test: TestSpans,
    /// The touchpoint type of a behaviour operand.
    pub(crate) touch: Pos,
    /// The window of a behaviour operand.
    pub(crate) window: Pos,
    /// Each `where` predicate: its field and its test.
    pub(crate) filter: Vec<(Pos, TestSpans)>,
}

/// Positions mirroring the rule tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SpanTree {
    /// `and` / `or` operands.
    Group(Vec<SpanTree>),
    /// `not` operand.
    Not(Box<SpanTree>),
    /// A condition.
    Cond(CondSpans),
}

type R<T> = Result<T, RuleError>;

/// Fields a condition may start with, for messages.
const FIELDS: &str = "age, gender, income, occupation, email, display_name, attributes.<key>, \
stage, time_in_stage, score.<name>, grade, nps.last, nps.last_category, csat.last, \
loyalty.tier, loyalty.balance, count(...), sum(...), first(...), last(...), consent(...), \
in_segment(...), `not` or `(`";

const OPERATORS: &str =
    "=, !=, <, <=, >, >=, between, in, contains, starts_with, exists, within or older_than";

const VALUES: &str = "a value: a \"string\", a number, money such as 50.00 EUR, a duration such as 7d, a timestamp such as 2024-01-31, true or false";

struct Parser {
    toks: Vec<Token>,
    i: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        // tokenize always ends with Eof and the parser never moves past it.
        &self.toks[self.i.min(self.toks.len() - 1)]
    }

    fn peek2(&self) -> &Tok {
        &self.toks[(self.i + 1).min(self.toks.len() - 1)].tok
    }

    fn advance(&mut self) -> Token {
        let t = self.peek().clone();
        if t.tok != Tok::Eof {
            self.i += 1;
        }
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if w.eq_ignore_ascii_case(kw))
    }

    fn err<T>(&self, expected: &str) -> R<T> {
        let t = self.peek();
        Err(RuleError::at(
            t.pos,
            format!("expected {expected}, found {}", t.tok.describe()),
        ))
    }

    fn expect(&mut self, tok: Tok, what: &str) -> R<Pos> {
        if self.peek().tok == tok {
            Ok(self.advance().pos)
        } else {
            self.err(what)
        }
    }

    fn expect_kw(&mut self, kw: &str) -> R<Pos> {
        if self.is_kw(kw) {
            Ok(self.advance().pos)
        } else {
            self.err(&format!("`{kw}`"))
        }
    }

    fn deeper(&mut self) -> R<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(RuleError::at(
                self.peek().pos,
                format!(
                    "rule nested too deeply: at most {MAX_DEPTH} levels of parentheses and `not`"
                ),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> R<(Rule, SpanTree)> {
        self.chain("or", Self::and, Rule::Or)
    }

    fn and(&mut self) -> R<(Rule, SpanTree)> {
        self.chain("and", Self::unary, Rule::And)
    }

    fn chain(
        &mut self,
        kw: &str,
        operand: fn(&mut Self) -> R<(Rule, SpanTree)>,
        make: fn(Vec<Rule>) -> Rule,
    ) -> R<(Rule, SpanTree)> {
        let first = operand(self)?;
        if !self.is_kw(kw) {
            return Ok(first);
        }
        let (mut rules, mut spans) = (vec![first.0], vec![first.1]);
        while self.is_kw(kw) {
            self.advance();
            let (r, s) = operand(self)?;
            rules.push(r);
            spans.push(s);
        }
        Ok((make(rules), SpanTree::Group(spans)))
    }

    fn unary(&mut self) -> R<(Rule, SpanTree)> {
        if self.is_kw("not") {
            self.advance();
            self.deeper()?;
            let (r, s) = self.unary()?;
            self.depth -= 1;
            return Ok((Rule::Not(Box::new(r)), SpanTree::Not(Box::new(s))));
        }
        if self.peek().tok == Tok::LParen {
            self.advance();
            self.deeper()?;
            let inner = self.or()?;
            if self.peek().tok != Tok::RParen {
                return self.err("`)`, `and` or `or`");
            }
            self.advance();
            self.depth -= 1;
            return Ok(inner);
        }
        let (c, s) = self.condition()?;
        Ok((Rule::Cond(c), SpanTree::Cond(s)))
    }

    /// A name: a bare word or a string literal.
    fn name(&mut self, what: &str) -> R<String> {
        match self.peek().tok.clone() {
            Tok::Ident(w) | Tok::Str(w) => {
                self.advance();
                Ok(w)
            }
            _ => self.err(what),
        }
    }

    fn dotted(&mut self, what: &str) -> R<String> {
        self.expect(Tok::Dot, "`.`")?;
        self.name(what)
    }

    fn sub_field(&mut self, field: &str, choices: &[&str]) -> R<String> {
        self.expect(Tok::Dot, "`.`")?;
        match &self.peek().tok {
            Tok::Ident(w) if choices.contains(&w.as_str()) => {
                let w = w.clone();
                self.advance();
                Ok(w)
            }
            _ => {
                let list: Vec<String> = choices.iter().map(|c| format!("{field}.{c}")).collect();
                self.err(&list.join(" or "))
            }
        }
    }

    fn condition(&mut self) -> R<(Condition, CondSpans)> {
        let start = self.peek().pos;
        let mut spans = CondSpans {
            start,
            test: TestSpans {
                op: start,
                value: start,
            },
            touch: start,
            window: start,
            filter: Vec::new(),
        };
        let Tok::Ident(word) = self.peek().tok.clone() else {
            return self.err(&format!("a condition: one of {FIELDS}"));
        };
        let operand = match word.as_str() {
            "consent" if *self.peek2() == Tok::LParen => {
                self.advance();
                self.advance();
                let purpose = self.name("a consent purpose such as marketing")?;
                self.expect(Tok::Comma, "`,`")?;
                let channel = self.name("a consent channel such as email")?;
                self.expect(Tok::RParen, "`)`")?;
                return Ok((Condition::Consent { purpose, channel }, spans));
            }
            "in_segment" if *self.peek2() == Tok::LParen => {
                self.advance();
                self.advance();
                let Tok::Str(name) = self.peek().tok.clone() else {
                    return self.err("a segment name as a string, such as \"segments/abc\"");
                };
                self.advance();
                self.expect(Tok::RParen, "`)`")?;
                return Ok((Condition::InSegment(name), spans));
            }
            "age" => simple(self, Operand::Age),
            "gender" => simple(self, Operand::Gender),
            "income" => simple(self, Operand::Income),
            "occupation" => simple(self, Operand::Occupation),
            "email" => simple(self, Operand::Email),
            "display_name" => simple(self, Operand::DisplayName),
            "stage" => simple(self, Operand::Stage),
            "time_in_stage" => simple(self, Operand::TimeInStage),
            "grade" => simple(self, Operand::Grade),
            "attributes" => {
                self.advance();
                Operand::Attribute(self.dotted("an attribute key")?)
            }
            "score" => {
                self.advance();
                let model = if self.peek().tok == Tok::LParen {
                    self.advance();
                    let Tok::Str(model) = self.peek().tok.clone() else {
                        return self.err("a scoring model id as a string, such as \"leads\"");
                    };
                    self.advance();
                    self.expect(Tok::RParen, "`)`")?;
                    Some(model)
                } else {
                    None
                };
                let name = self.dotted("a score name such as engagement or fit")?;
                Operand::Score(ScoreRef { model, name })
            }
            "nps" => {
                self.advance();
                match self.sub_field("nps", &["last", "last_category"])?.as_str() {
                    "last" => Operand::NpsLast,
                    _ => Operand::NpsLastCategory,
                }
            }
            "csat" => {
                self.advance();
                self.sub_field("csat", &["last"])?;
                Operand::CsatLast
            }
            "loyalty" => {
                self.advance();
                match self.sub_field("loyalty", &["tier", "balance"])?.as_str() {
                    "tier" => Operand::LoyaltyTier,
                    _ => Operand::LoyaltyBalance,
                }
            }
            "count" | "first" | "last" | "sum" if *self.peek2() == Tok::LParen => {
                self.advance();
                self.advance();
                let touch_pos = self.peek().pos;
                let touch = self.touch_type()?;
                let sum = if word == "sum" {
                    Some(
                        match self
                            .sub_field("the touchpoint", &["revenue", "usage"])?
                            .as_str()
                        {
                            "revenue" => SumField::Revenue,
                            _ => SumField::Usage,
                        },
                    )
                } else {
                    None
                };
                let query = self.query_rest(touch, touch_pos, &mut spans, Tok::RParen)?;
                match (word.as_str(), sum) {
                    ("count", _) => Operand::Count(query),
                    ("first", _) => Operand::First(query),
                    ("last", _) => Operand::Last(query),
                    (_, Some(field)) => Operand::Sum(query, field),
                    _ => Operand::Count(query),
                }
            }
            _ => {
                return Err(RuleError::at(
                    start,
                    format!(
                        "unknown field `{}`: expected one of {FIELDS}",
                        crate::validation::shorten(&word, 40)
                    ),
                ));
            }
        };
        let ty = match operand {
            Operand::Stage => Some(ValueType::Stage),
            Operand::Gender => Some(ValueType::Gender),
            Operand::NpsLastCategory => Some(ValueType::NpsCategory),
            _ => None,
        };
        let (test, test_spans) = self.test(ty)?;
        spans.test = test_spans;
        Ok((Condition::Compare { operand, test }, spans))
    }

    fn touch_type(&mut self) -> R<TouchType> {
        let expected = {
            let kinds: Vec<String> = TouchpointKind::ALL
                .iter()
                .map(|k| k.as_str().to_ascii_lowercase())
                .collect();
            format!(
                "a touchpoint type: {} or custom(\"name\")",
                kinds.join(", ")
            )
        };
        let Tok::Ident(w) = self.peek().tok.clone() else {
            return self.err(&expected);
        };
        if w == "custom" && *self.peek2() == Tok::LParen {
            self.advance();
            self.advance();
            let Tok::Str(name) = self.peek().tok.clone() else {
                return self.err("a custom touchpoint type as a string");
            };
            self.advance();
            self.expect(Tok::RParen, "`)`")?;
            return Ok(TouchType::custom(name));
        }
        match TouchpointKind::parse("", &w) {
            Ok(kind) => {
                self.advance();
                Ok(TouchType::kind(kind))
            }
            Err(_) => Err(RuleError::at(
                self.peek().pos,
                format!(
                    "unknown touchpoint type `{}`: expected {}",
                    crate::validation::shorten(&w, 40),
                    &expected["a touchpoint type: ".len()..]
                ),
            )),
        }
    }

    /// `[where filter] [, window]` after the touchpoint type, then `end`.
    fn query_rest(
        &mut self,
        touch: TouchType,
        touch_pos: Pos,
        spans: &mut CondSpans,
        end: Tok,
    ) -> R<TouchQuery> {
        spans.touch = touch_pos;
        let mut filter = Vec::new();
        if self.is_kw("where") {
            self.advance();
            loop {
                let field_pos = self.peek().pos;
                let field = self.touch_field()?;
                let (test, ts) = self.test(None)?;
                filter.push(Predicate { field, test });
                spans.filter.push((field_pos, ts));
                if !self.is_kw("and") {
                    break;
                }
                self.advance();
            }
        }
        let mut window = None;
        if self.peek().tok == Tok::Comma {
            self.advance();
            spans.window = self.peek().pos;
            match self.peek().tok {
                Tok::Duration(d) => {
                    self.advance();
                    window = Some(d);
                }
                _ => return self.err("a window such as 7d"),
            }
        }
        if self.peek().tok != end {
            let end_text = if end == Tok::Eof { "the end" } else { "`)`" };
            return self.err(&if filter.is_empty() && window.is_none() {
                format!("`where`, `,` or {end_text}")
            } else if window.is_none() {
                format!("`and`, `,` or {end_text}")
            } else {
                end_text.to_owned()
            });
        }
        self.advance();
        Ok(TouchQuery {
            touch,
            filter,
            window,
        })
    }

    fn touch_field(&mut self) -> R<TouchField> {
        const EXPECTED: &str = "a touchpoint field: product, feature, campaign, channel, revenue, usage or properties.<key>";
        let Tok::Ident(w) = self.peek().tok.clone() else {
            return self.err(EXPECTED);
        };
        let f = match w.as_str() {
            "product" => TouchField::Product,
            "feature" => TouchField::Feature,
            "campaign" => TouchField::Campaign,
            "channel" => TouchField::Channel,
            "revenue" => TouchField::Revenue,
            "usage" => TouchField::Usage,
            "properties" => {
                self.advance();
                return Ok(TouchField::Property(self.dotted("a property key")?));
            }
            _ => return self.err(EXPECTED),
        };
        self.advance();
        Ok(f)
    }

    fn test(&mut self, ty: Option<ValueType>) -> R<(Test, TestSpans)> {
        let op = self.peek().pos;
        let mut spans = TestSpans { op, value: op };
        let test = match self.peek().tok.clone() {
            Tok::Cmp(c) => {
                self.advance();
                spans.value = self.peek().pos;
                Test::Cmp(c, self.value(ty)?)
            }
            Tok::Ident(w) => {
                let w = w.to_ascii_lowercase();
                self.advance();
                spans.value = self.peek().pos;
                match w.as_str() {
                    "between" => {
                        let lo = self.value(ty)?;
                        self.expect_kw("and")?;
                        let hi = self.value(ty)?;
                        Test::Between(lo, hi)
                    }
                    "in" => {
                        self.expect(Tok::LParen, "`(`")?;
                        spans.value = self.peek().pos;
                        let mut vs = vec![self.value(ty)?];
                        while self.peek().tok == Tok::Comma {
                            self.advance();
                            vs.push(self.value(ty)?);
                        }
                        self.expect(Tok::RParen, "`,` or `)`")?;
                        Test::In(vs)
                    }
                    "contains" | "starts_with" => {
                        let Tok::Str(s) = self.peek().tok.clone() else {
                            return self.err("a \"string\"");
                        };
                        self.advance();
                        if w == "contains" {
                            Test::Contains(s)
                        } else {
                            Test::StartsWith(s)
                        }
                    }
                    "exists" => Test::Exists,
                    "within" | "older_than" => {
                        let Tok::Duration(d) = self.peek().tok else {
                            return self.err("a duration such as 30d");
                        };
                        self.advance();
                        if w == "within" {
                            Test::Within(d)
                        } else {
                            Test::OlderThan(d)
                        }
                    }
                    _ => {
                        return Err(RuleError::at(
                            op,
                            format!(
                                "expected an operator: {OPERATORS}; found `{}`",
                                crate::validation::shorten(&w, 40)
                            ),
                        ));
                    }
                }
            }
            _ => return self.err(&format!("an operator: {OPERATORS}")),
        };
        Ok((test, spans))
    }

    fn value(&mut self, ty: Option<ValueType>) -> R<Value> {
        let t = self.peek().clone();
        let v = match t.tok {
            Tok::Str(s) => match ty {
                Some(ty) if ty.is_enum() => enum_value(ty, &s, t.pos)?,
                _ => Value::Str(s),
            },
            Tok::Num { value, text } => {
                if let Tok::Ident(code) = self.peek2()
                    && code.len() == 3
                    && is_iso_4217(code)
                {
                    let code = code.clone();
                    self.advance();
                    let m = money(&text, &code).map_err(|m| RuleError::at(t.pos, m))?;
                    self.advance();
                    return Ok(Value::Money(m));
                }
                Value::Num(value)
            }
            Tok::Duration(d) => Value::Duration(d),
            Tok::Time(at) => Value::Time(at),
            Tok::Ident(w) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Tok::Ident(w) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Tok::Ident(w) => match ty {
                Some(ty) if ty.is_enum() => enum_value(ty, &w, t.pos)?,
                _ => {
                    return Err(RuleError::at(
                        t.pos,
                        format!(
                            "expected {VALUES}; found `{}` (strings are quoted)",
                            crate::validation::shorten(&w, 40)
                        ),
                    ));
                }
            },
            _ => return self.err(VALUES),
        };
        self.advance();
        Ok(v)
    }
}

fn simple(p: &mut Parser, op: Operand) -> Operand {
    p.advance();
    op
}

/// A bare word or string naming a stage, gender or NPS category.
fn enum_value(ty: ValueType, w: &str, pos: Pos) -> R<Value> {
    let upper = w.trim().to_ascii_uppercase();
    let found = match ty {
        ValueType::Stage => Stage::parse("", w).ok().map(Value::Stage),
        ValueType::Gender => ALL_GENDERS
            .into_iter()
            .find(|g| gender_name(*g) == upper)
            .map(Value::Gender),
        _ => NpsCategory::ALL
            .into_iter()
            .find(|c| c.as_str() == upper)
            .map(Value::Nps),
    };
    found.ok_or_else(|| {
        let names: Vec<&str> = match ty {
            ValueType::Stage => crate::lifecycle::ALL_STAGES
                .iter()
                .map(|s| s.as_str())
                .collect(),
            ValueType::Gender => ALL_GENDERS.iter().map(|g| gender_name(*g)).collect(),
            _ => NpsCategory::ALL.iter().map(|c| c.as_str()).collect(),
        };
        RuleError::at(
            pos,
            format!(
                "unknown {} {}: expected one of {}",
                &ty.describe()[ty.describe().find(' ').map_or(0, |i| i + 1)..],
                crate::validation::echo(w),
                names.join(", ")
            ),
        )
    })
}

/// `12.50` and `EUR` to minor units, exactly.
fn money(text: &str, currency: &str) -> Result<Money, String> {
    let digits = minor_unit_digits(currency);
    let (neg, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if frac.len() > digits as usize {
        return Err(format!(
            "{currency} amounts have at most {digits} decimal places"
        ));
    }
    let padded = format!("{int}{frac}{}", "0".repeat(digits as usize - frac.len()));
    let minor = padded
        .parse::<i128>()
        .ok()
        .map(|m| if neg { -m } else { m })
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| "amount out of range".to_owned())?;
    Ok(Money {
        currency: currency.to_owned(),
        amount_minor: minor,
    })
}

/// Parses rule text into a tree and the positions of its parts.
pub(crate) fn parse_with_spans(text: &str) -> R<(Rule, SpanTree)> {
    if text.len() > MAX_RULE_BYTES {
        return Err(RuleError::at(
            Pos { line: 1, column: 1 },
            format!("rule too long: at most {MAX_RULE_BYTES} bytes"),
        ));
    }
    let mut p = Parser {
        toks: tokenize(text)?,
        i: 0,
        depth: 0,
    };
    if p.peek().tok == Tok::Eof {
        return p.err("a condition");
    }
    let out = p.or()?;
    if p.peek().tok != Tok::Eof {
        return p.err(if p.peek().tok == Tok::RParen {
            "`and`, `or` or the end of the rule (unbalanced `)`)"
        } else {
            "`and`, `or` or the end of the rule"
        });
    }
    Ok(out)
}

/// Parses a touchpoint query on its own (`feature_use where feature =
/// "export", 7d`), e.g. the trigger of a scoring event rule.
pub(crate) fn parse_touch_query_with_spans(text: &str) -> R<(TouchQuery, CondSpans)> {
    if text.len() > MAX_RULE_BYTES {
        return Err(RuleError::at(
            Pos { line: 1, column: 1 },
            format!("query too long: at most {MAX_RULE_BYTES} bytes"),
        ));
    }
    let mut p = Parser {
        toks: tokenize(text)?,
        i: 0,
        depth: 0,
    };
    let start = p.peek().pos;
    let mut spans = CondSpans {
        start,
        test: TestSpans {
            op: start,
            value: start,
        },
        touch: start,
        window: start,
        filter: Vec::new(),
    };
    let touch = p.touch_type()?;
    let q = p.query_rest(touch, start, &mut spans, Tok::Eof)?;
    Ok((q, spans))
}

/// Parses a touchpoint query on its own (syntax only; see
/// [`super::compile_touch_query`] to also type-check): a touchpoint type,
/// an optional `where` filter and an optional window, as inside `count(...)`.
pub fn parse_touch_query(text: &str) -> Result<TouchQuery, RuleError> {
    parse_touch_query_with_spans(text).map(|(q, _)| q)
}

/// Parses rule text (syntax only; see [`super::compile`] to also type-check).
pub fn parse(text: &str) -> Result<Rule, RuleError> {
    parse_with_spans(text).map(|(r, _)| r)
}

#[cfg(test)]
mod tests {
    use super::super::ast::CmpOp;
    use super::*;
    use chrono::{DateTime, TimeDelta};

    fn cond(r: &Rule) -> &Condition {
        match r {
            Rule::Cond(c) => c,
            other => panic!("not a condition: {other:?}"),
        }
    }

    #[test]
    fn precedence_not_and_or() {
        let r = parse("age > 1 or not age > 2 and age > 3").expect("parses");
        let Rule::Or(ops) = &r else { panic!("{r:?}") };
        assert_eq!(ops.len(), 2);
        let Rule::And(ands) = &ops[1] else {
            panic!("{r:?}")
        };
        assert!(matches!(ands[0], Rule::Not(_)));
        let r = parse("(age > 1 or age > 2) and age > 3").expect("parses");
        let Rule::And(ops) = &r else { panic!("{r:?}") };
        assert!(matches!(ops[0], Rule::Or(_)));
        let r = parse("age > 1 and age > 2 AND age > 3").expect("parses");
        let Rule::And(ops) = &r else { panic!("{r:?}") };
        assert_eq!(ops.len(), 3, "a chain is one n-ary node");
        let r = parse("age > 1 and (age > 2 and age > 3)").expect("parses");
        let Rule::And(ops) = &r else { panic!("{r:?}") };
        assert_eq!(ops.len(), 2, "parentheses keep their nesting");
    }

    #[test]
    fn behaviour_conditions() {
        let r = parse(r#"count(feature_use where feature = "export" and properties."utm source" starts_with "x", 7d) >= 3"#)
            .expect("parses");
        let Condition::Compare {
            operand: Operand::Count(q),
            test,
        } = cond(&r)
        else {
            panic!("{r:?}")
        };
        assert_eq!(q.touch, TouchType::kind(TouchpointKind::FeatureUse));
        assert_eq!(q.window, Some(TimeDelta::days(7)));
        assert_eq!(q.filter.len(), 2);
        assert_eq!(q.filter[1].field, TouchField::Property("utm source".into()));
        assert_eq!(*test, Test::Cmp(CmpOp::Gte, Value::Num(3.0)));

        let r = parse(r#"sum(purchase.revenue where revenue > 0 EUR, 30d) >= 100.5 EUR"#)
            .expect("parses");
        let Condition::Compare {
            operand: Operand::Sum(_, SumField::Revenue),
            test: Test::Cmp(CmpOp::Gte, Value::Money(m)),
        } = cond(&r)
        else {
            panic!("{r:?}")
        };
        assert_eq!((m.amount_minor, m.currency.as_str()), (10050, "EUR"));

        let r = parse(r#"last(custom("survey.answer")) older_than 90d"#).expect("parses");
        assert!(matches!(
            cond(&r),
            Condition::Compare { operand: Operand::Last(q), test: Test::OlderThan(_) }
                if q.touch == TouchType::custom("survey.answer") && q.window.is_none()
        ));
    }

    #[test]
    fn enums_accept_words_and_strings() {
        let r = parse(r#"stage in (retention, "LOYALTY", STAGE_CHURNED)"#).expect("parses");
        assert_eq!(
            *cond(&r),
            Condition::Compare {
                operand: Operand::Stage,
                test: Test::In(vec![
                    Value::Stage(Stage::Retention),
                    Value::Stage(Stage::Loyalty),
                    Value::Stage(Stage::Churned)
                ])
            }
        );
        let r = parse(r#"nps.last_category = "detractor""#).expect("parses");
        assert!(matches!(
            cond(&r),
            Condition::Compare {
                test: Test::Cmp(_, Value::Nps(NpsCategory::Detractor)),
                ..
            }
        ));
        let e = parse("stage = LEAD").unwrap_err();
        assert!(
            e.to_string().starts_with(
                "line 1, column 9: unknown lifecycle stage \"LEAD\": expected one of APPROACH"
            ),
            "{e}"
        );
    }

    #[test]
    fn literals() {
        let r = parse("attributes.renewal < 2025-01-01T10:00:00+01:00").expect("parses");
        let want = DateTime::parse_from_rfc3339("2025-01-01T09:00:00Z")
            .expect("ts")
            .to_utc();
        assert!(
            matches!(cond(&r), Condition::Compare { test: Test::Cmp(CmpOp::Lt, Value::Time(t)), .. } if *t == want)
        );
        let r = parse("income between 1 JPY and 2.125 BHD").expect("parses");
        let Condition::Compare {
            test: Test::Between(Value::Money(a), Value::Money(b)),
            ..
        } = cond(&r)
        else {
            panic!("{r:?}")
        };
        assert_eq!((a.amount_minor, b.amount_minor), (1, 2125));
        assert!(
            parse("income > 1.5 JPY")
                .unwrap_err()
                .to_string()
                .contains("at most 0 decimal places")
        );
        assert!(
            parse("income > 99999999999999999999 EUR")
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        let r =
            parse("consent(marketing, \"e-mail\") and in_segment(\"segments/a\")").expect("parses");
        let Rule::And(ops) = r else { panic!() };
        assert_eq!(
            *cond(&ops[0]),
            Condition::Consent {
                purpose: "marketing".into(),
                channel: "e-mail".into()
            }
        );
        assert_eq!(*cond(&ops[1]), Condition::InSegment("segments/a".into()));
    }

    #[test]
    fn errors_name_line_column_and_expectation() {
        let cases = [
            (
                "",
                "line 1, column 1: expected a condition, found the end of the rule",
            ),
            ("age >", "line 1, column 6: expected a value"),
            ("age >= 25 and", "line 1, column 14: expected a condition"),
            (
                "agee >= 25",
                "line 1, column 1: unknown field `agee`: expected one of age,",
            ),
            (
                "age >= 25\n  or foo",
                "line 2, column 6: unknown field `foo`",
            ),
            (
                "(age > 1",
                "line 1, column 9: expected `)`, `and` or `or`, found the end of the rule",
            ),
            (
                "age > 1)",
                "line 1, column 8: expected `and`, `or` or the end of the rule (unbalanced `)`)",
            ),
            ("age is 3", "line 1, column 5: expected an operator: =, !="),
            (
                "count(page_view, 7d) > 1",
                "line 1, column 7: unknown touchpoint type `page_view`: expected usage_time,",
            ),
            (
                "count(feature_use, 7) > 1",
                "line 1, column 20: expected a window such as 7d, found number 7",
            ),
            (
                "count(feature_use where color = \"x\") > 1",
                "line 1, column 25: expected a touchpoint field",
            ),
            (
                "count(feature_use 7d) > 1",
                "line 1, column 19: expected `where`, `,` or `)`, found a duration",
            ),
            (
                "attributes.plan = pro",
                "line 1, column 19: expected a value",
            ),
            (
                "nps.score > 1",
                "line 1, column 5: expected nps.last or nps.last_category, found `score`",
            ),
            (
                "in_segment(abc)",
                "line 1, column 12: expected a segment name as a string",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn touch_queries_parse_on_their_own() {
        let q = parse_touch_query(r#"feature_use where feature = "export" and channel exists, 7d"#)
            .expect("parses");
        assert_eq!(q.filter.len(), 2);
        assert_eq!(q.window, Some(TimeDelta::days(7)));
        assert_eq!(
            q.to_string(),
            r#"feature_use where feature = "export" and channel exists, 1w"#
        );
        assert_eq!(
            parse_touch_query("purchase").map(|q| q.to_string()),
            Ok("purchase".to_owned())
        );
        let e = parse_touch_query("purchase 7d").unwrap_err().to_string();
        assert_eq!(
            e,
            "line 1, column 10: expected `where`, `,` or the end, found a duration"
        );
        let e = parse_touch_query("purchase, 7d)").unwrap_err().to_string();
        assert_eq!(e, "line 1, column 13: expected the end, found `)`");
    }

    #[test]
    fn depth_and_size_are_bounded() {
        let deep = format!("{}age > 1{}", "(".repeat(100), ")".repeat(100));
        assert!(
            parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("nested too deeply")
        );
        let nots = format!("{}age > 1", "not ".repeat(100));
        assert!(
            parse(&nots)
                .unwrap_err()
                .to_string()
                .contains("nested too deeply")
        );
        let ok = format!("{}age > 1{}", "(".repeat(60), ")".repeat(60));
        assert!(parse(&ok).is_ok());
        let long = format!("email = \"{}\"", "a".repeat(MAX_RULE_BYTES));
        assert!(parse(&long).unwrap_err().to_string().contains("too long"));
    }
}

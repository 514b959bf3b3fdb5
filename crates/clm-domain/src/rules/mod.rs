//! The condition language that segment rules and scoring rules share.
//!
//! A rule is a tree of `and`, `or`, `not` and conditions on what CLM knows
//! about a customer: profile and demographics, typed custom attributes,
//! lifecycle stage, scores and grade, behaviour (touchpoints in sliding
//! windows), consent, feedback, loyalty and membership of other segments.
//! It has a text form that parses to the tree and prints back to the same
//! text, a type checker against a catalog of fields, an evaluator over a
//! [`Facts`] trait, and [`next_change`]: the exact instant at which time
//! alone changes a rule's answer (what timer queues need).
//!
//! ```
//! use clm_domain::rules::{self, FactSet, FieldCatalog};
//! use chrono::{TimeZone, Utc};
//!
//! let catalog = FieldCatalog::new();
//! let rule = rules::compile(
//!     r#"age >= 25 and count(feature_use where feature = "export", 7d) >= 3"#,
//!     &catalog,
//! )
//! .expect("a valid rule");
//! assert_eq!(
//!     rule.to_string(),
//!     r#"age >= 25 and count(feature_use where feature = "export", 1w) >= 3"#
//! );
//! let facts = FactSet::default(); // no birth date, no touchpoints
//! let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("a valid time");
//! assert!(!rules::evaluate(&rule, &facts, now));
//!
//! let err = rules::compile(r#"age = "x""#, &catalog).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     r#"line 1, column 7: type mismatch: age is a number, but "x" is a string"#
//! );
//! ```
//!
//! # Grammar
//!
//! ```text
//! rule        = or ;
//! or          = and { "or" and } ;
//! and         = unary { "and" unary } ;
//! unary       = "not" unary | "(" rule ")" | condition ;
//! condition   = "consent" "(" name "," name ")"
//!             | "in_segment" "(" string ")"
//!             | operand test ;
//! operand     = "age" | "gender" | "income" | "occupation" | "email" | "display_name"
//!             | "attributes" "." name
//!             | "stage" | "time_in_stage"
//!             | "score" "." name | "grade"
//!             | "nps" "." ( "last" | "last_category" ) | "csat" "." "last"
//!             | "loyalty" "." ( "tier" | "balance" )
//!             | ( "count" | "first" | "last" ) "(" touch_type query ")"
//!             | "sum" "(" touch_type "." ( "revenue" | "usage" ) query ")" ;
//! query       = [ "where" predicate { "and" predicate } ] [ "," duration ] ;
//! touch_type  = "usage_time" | "product_access" | "feature_use" | "purchase"
//!             | "campaign_touch" | "support_contact"
//!             | "custom"                      (* every custom type *)
//!             | "custom" "(" string ")" ;     (* one custom type *)
//! predicate   = touch_field test ;
//! touch_field = "product" | "feature" | "campaign" | "channel"
//!             | "revenue" | "usage" | "properties" "." name ;
//! test        = ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) value
//!             | "between" value "and" value
//!             | "in" "(" value { "," value } ")"
//!             | "contains" string | "starts_with" string
//!             | "exists"
//!             | "within" duration | "older_than" duration ;
//! value       = string | number | money | duration | timestamp
//!             | "true" | "false" | word ;    (* word: a stage, gender or NPS category *)
//! name        = word | string ;
//! word        = ( letter | "_" ) { letter | digit | "_" } ;   (* ASCII *)
//! string      = '"' { char | "\" ( '"' | "\" | "n" | "r" | "t" | "u{" hex+ "}" ) } '"' ;
//! number      = [ "-" ] digit+ [ "." digit+ ] ;
//! money       = number currency ;             (* 50000.00 EUR, 1500 JPY *)
//! duration    = [ "-" ] digit+ ( "s" | "m" | "h" | "d" | "w" ) ;
//! timestamp   = RFC 3339 ( 2024-01-31T12:00:00Z, 2024-01-31T12:00:00.5+02:00 )
//!             | date ( 2024-01-31, midnight UTC ) ;
//! ```
//!
//! `not` binds tighter than `and`, which binds tighter than `or`.
//! Keywords (`and`, `or`, `not`, `where`, operators) are case-insensitive;
//! field names are lower case; `#` starts a comment to the end of the line.
//! Stages (`RETENTION`), genders (`FEMALE`, `MALE`, `NON_BINARY`, `OTHER`,
//! `UNDISCLOSED`) and NPS categories (`PROMOTER`, `PASSIVE`, `DETRACTOR`)
//! are bare words or strings, in any case.
//!
//! # Examples
//!
//! ```text
//! age between 25 and 40 and gender = FEMALE and income >= 50000.00 EUR
//! attributes.plan in ("pro", "team") and attributes.trial_end older_than 0s   # trial over
//! stage = RETENTION and time_in_stage >= 30d
//! score.engagement >= 50 and grade starts_with "A"
//! count(feature_use where feature = "export", 7d) >= 3
//! sum(purchase.revenue where product = "pro", 30d) >= 100.00 EUR
//! sum(usage_time.usage, 1w) >= 2h
//! last(purchase) older_than 90d            # bought, but not in 90 days
//! count(purchase, 90d) = 0                 # no purchase in the last 90 days
//! first(purchase) >= 2025-01-01
//! count(custom("survey_answer") where properties.score <= "6", 30d) > 0
//! consent(marketing, email) and not in_segment("segments/churn-risk")
//! nps.last_category = DETRACTOR or csat.last <= 2
//! loyalty.tier = "gold" and loyalty.balance > 1000
//! ```
//!
//! # Meaning
//!
//! * Types: `age`, `score.*`, `nps.last`, `csat.last`, `loyalty.balance`
//!   and `count(...)` are numbers; `income` and `sum(x.revenue ...)` are
//!   money; `time_in_stage` and `sum(x.usage ...)` are durations;
//!   `first(...)` and `last(...)` are timestamps; attributes have the type
//!   the [`Catalog`] gives. `<`, `<=`, `>`, `>=`, `between` order numbers,
//!   strings (by bytes), money, durations and timestamps; stages, genders,
//!   NPS categories and booleans take `=`, `!=`, `in` and `exists`.
//! * Money is never a float: a literal is an amount in major units with at
//!   most the currency's decimal places (`12.50 EUR`, `1500 JPY`,
//!   `1.250 BHD`), held as integer minor units. Money compares only with
//!   money of the same currency (an income in USD is neither above nor below
//!   `50000.00 EUR`); a revenue sum adds up the revenue in the currency of
//!   the literal it is compared with.
//! * A condition on a fact the customer does not have is false; `not` of it
//!   is true (two-valued logic: a SQL compilation wraps conditions in
//!   `COALESCE(..., false)`). `exists` asks whether the fact is known.
//! * `age` is whole years at the evaluation instant's UTC date.
//!   `time_in_stage` is the time since the current stage was entered.
//! * Windows are positive durations in `s`, `m`, `h`, `d`, `w`; a touchpoint
//!   that occurred at `e` is in a window `w` at instant `t` when
//!   `e > t - w`, so it leaves the window exactly at `e + w`. Without a
//!   window the whole history counts.
//! * `x within d` holds when `x > t - d` (recent); `x older_than d` when
//!   `x <= t - d`. For a past `x` they are each other's negation.
//! * Times are microseconds: evaluation instants are truncated to whole
//!   microseconds, as stored times are.
//!
//! # Checking and errors
//!
//! [`compile`] parses and type-checks text against a [`Catalog`];
//! [`check`] type-checks a tree (e.g. converted from a proto message).
//! Syntax errors, unknown fields, scores, touchpoint types, consents and
//! segments, type mismatches and windows that are not longer than zero are
//! [`RuleError`]s naming line and column (text) or the node's path (tree);
//! [`RuleError::to_violation`] turns one into the field violation of a
//! `BadRequest`.
//!
//! A touchpoint query also stands on its own ([`compile_touch_query`],
//! [`TouchQuery::matches`]): `feature_use where feature = "export"` is how a
//! scoring event rule names the touchpoints it scores.
#![warn(missing_docs)]

mod ast;
mod check;
mod error;
mod eval;
mod facts;
mod lexer;
mod parser;
mod print;
mod reads;
#[cfg(test)]
mod tests;
mod timeline;

pub use ast::{
    ALL_GENDERS, CmpOp, Condition, NpsCategory, Operand, Predicate, Rule, ScoreRef, SumField, Test,
    TouchField, TouchQuery, TouchType, Value, ValueType, gender_name, minor_unit_digits,
};
pub use check::{
    Catalog, FieldCatalog, MAX_CONDITIONS, MAX_DURATION, MAX_FILTER, MAX_IN_VALUES,
    MAX_STRING_CHARS, check, check_touch_query, compile, compile_touch_query,
};
pub use error::{Location, MAX_ERRORS, Pos, RuleError, RuleErrors};
pub use eval::{
    Facts, MAX_NEXT_CHANGE_STEPS, depends_on_time, evaluate, evaluate_and_next_change, next_change,
    next_change_by_rescan,
};
pub use facts::FactSet;
pub use parser::{MAX_DEPTH, MAX_RULE_BYTES, parse, parse_touch_query};
pub use reads::{Fact, reads, segments_referenced};
pub use timeline::SharedTimelines;

//! Errors of the rule language: where (a line and column of the text, or a
//! path in the tree) and what.

use crate::{Violation, Violations};
use std::fmt;

/// A position in a rule's text, 1-based; columns count characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, in characters.
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Where an error is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// In a rule given as text.
    Text(Pos),
    /// In a rule given as a tree (e.g. converted from a proto message): the
    /// path from the root, such as `and[1].not.count.window` (empty for the
    /// root).
    Path(String),
}

/// One error in a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Where.
    pub at: Location,
    /// What is wrong (and, for syntax errors, what was expected).
    pub message: String,
}

impl RuleError {
    /// An error at a text position.
    pub fn at(pos: Pos, message: impl Into<String>) -> Self {
        Self {
            at: Location::Text(pos),
            message: message.into(),
        }
    }

    /// The error as a field violation of the request field `field` (e.g.
    /// `rule`): text errors read `line 1, column 7: ...`, tree errors name
    /// the node by its proto field path as a sub-field
    /// (`rule.all.rules[1].condition.compare.operand.count.window`).
    pub fn to_violation(&self, field: &str) -> Violation {
        match &self.at {
            Location::Text(pos) => Violation::new(field, format!("{pos}: {}", self.message)),
            Location::Path(p) if p.is_empty() => Violation::new(field, self.message.clone()),
            Location::Path(p) => Violation::new(format!("{field}.{p}"), self.message.clone()),
        }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Location::Text(pos) => write!(f, "{pos}: {}", self.message),
            Location::Path(p) if p.is_empty() => f.write_str(&self.message),
            Location::Path(p) => write!(f, "{p}: {}", self.message),
        }
    }
}

impl std::error::Error for RuleError {}

/// Every error found in a rule (at least one), in text order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleErrors(pub Vec<RuleError>);

/// Most errors reported for one rule; the last one says how many more.
pub const MAX_ERRORS: usize = 20;

impl RuleErrors {
    /// The errors as field violations of the request field `field`.
    pub fn to_violations(&self, field: &str) -> Violations {
        Violations(self.0.iter().map(|e| e.to_violation(field)).collect())
    }

    /// The first error.
    pub fn first(&self) -> Option<&RuleError> {
        self.0.first()
    }
}

impl From<RuleError> for RuleErrors {
    fn from(e: RuleError) -> Self {
        Self(vec![e])
    }
}

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleErrors {}

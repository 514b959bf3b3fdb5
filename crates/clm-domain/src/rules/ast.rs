//! The rule tree: what a parsed (or proto-converted) rule is.
//!
//! The tree is plain data. [`super::check`] says whether it is well typed
//! against a catalog of fields, `Display` prints its canonical text and
//! [`super::evaluate`] decides it against a customer's facts.

use crate::demographics::Gender;
use crate::lifecycle::Stage;
use crate::money::Money;
use crate::touchpoint::TouchpointKind;
use chrono::{DateTime, TimeDelta, Utc};

/// A rule: conditions joined by `and`, `or` and `not`.
///
/// `And` and `Or` hold at least two operands (the checker refuses fewer);
/// `a and b and c` is one `And` of three, while `a and (b and c)` keeps the
/// nesting the parentheses ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every operand holds.
    And(Vec<Rule>),
    /// At least one operand holds.
    Or(Vec<Rule>),
    /// The operand does not hold.
    Not(Box<Rule>),
    /// A single condition.
    Cond(Condition),
}

/// One condition: a test of one fact.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `operand test`, e.g. `age >= 25`.
    Compare {
        /// What is tested.
        operand: Operand,
        /// How it is tested.
        test: Test,
    },
    /// `consent(purpose, channel)`: the customer granted this consent.
    Consent {
        /// Purpose, e.g. `marketing`.
        purpose: String,
        /// Channel, e.g. `email`.
        channel: String,
    },
    /// `in_segment("segments/abc")`: the customer is a member of that segment.
    InSegment(String),
}

/// A score a rule reads: its name and, in the model-qualified form
/// `score("leads").engagement`, the scoring model's id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScoreRef {
    /// The scoring model's id (`scoringModels/{id}`), `None` in the plain
    /// form `score.<name>`.
    pub model: Option<String>,
    /// The score's name.
    pub name: String,
}

impl ScoreRef {
    /// The plain form `score.<name>`.
    pub fn plain(name: &str) -> Self {
        ScoreRef {
            model: None,
            name: name.to_owned(),
        }
    }

    /// The model-qualified form `score("<model>").<name>`.
    pub fn of(model: &str, name: &str) -> Self {
        ScoreRef {
            model: Some(model.to_owned()),
            name: name.to_owned(),
        }
    }
}

/// The left side of a comparison: a fact of the customer.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `age`: whole years from the birth date at the evaluation instant (UTC).
    Age,
    /// `gender`.
    Gender,
    /// `income`: yearly income, money.
    Income,
    /// `occupation`.
    Occupation,
    /// `email`.
    Email,
    /// `display_name`.
    DisplayName,
    /// `attributes.<key>`: a typed custom attribute.
    Attribute(String),
    /// `stage`: the lifecycle stage.
    Stage,
    /// `time_in_stage`: time since the customer entered the current stage.
    TimeInStage,
    /// `score.<name>` or `score("<model>").<name>`: `engagement`, `fit` or
    /// a custom score, of one scoring model or (plain form) of the one
    /// model that defines it.
    Score(ScoreRef),
    /// `grade`, e.g. `"A1"`.
    Grade,
    /// `nps.last`: the last NPS answer, 0 to 10.
    NpsLast,
    /// `nps.last_category`: `PROMOTER` (9–10), `PASSIVE` (7–8), `DETRACTOR` (0–6).
    NpsLastCategory,
    /// `csat.last`: the last CSAT answer.
    CsatLast,
    /// `loyalty.tier`: the loyalty tier name.
    LoyaltyTier,
    /// `loyalty.balance`: the loyalty points balance.
    LoyaltyBalance,
    /// `count(query)`: how many touchpoints match.
    Count(TouchQuery),
    /// `sum(type.field where ..., window)`: the total of a field over matches.
    Sum(TouchQuery, SumField),
    /// `first(query)`: when the earliest match occurred.
    First(TouchQuery),
    /// `last(query)`: when the latest match occurred.
    Last(TouchQuery),
}

/// Which touchpoints a behaviour operand looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct TouchQuery {
    /// Touchpoint type.
    pub touch: TouchType,
    /// Conditions on the touchpoint's own fields, all of which must hold.
    pub filter: Vec<Predicate>,
    /// Sliding window: only touchpoints that occurred after `at - window`
    /// count. `None` is the whole history.
    pub window: Option<TimeDelta>,
}

/// A touchpoint type: one of the built-in kinds, or a custom type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TouchType {
    /// Kind.
    pub kind: TouchpointKind,
    /// For [`TouchpointKind::Custom`]: the custom type name, or `None` for
    /// every custom type. Always `None` for the other kinds.
    pub custom_type: Option<String>,
}

impl TouchType {
    /// A built-in kind (or every custom type for [`TouchpointKind::Custom`]).
    pub fn kind(kind: TouchpointKind) -> Self {
        Self {
            kind,
            custom_type: None,
        }
    }

    /// A named custom type.
    pub fn custom(name: impl Into<String>) -> Self {
        Self {
            kind: TouchpointKind::Custom,
            custom_type: Some(name.into()),
        }
    }

    /// Whether a touchpoint of `kind` (with `custom_type` for custom ones)
    /// is of this type.
    pub fn matches(&self, kind: TouchpointKind, custom_type: Option<&str>) -> bool {
        self.kind == kind
            && match &self.custom_type {
                None => true,
                Some(name) => custom_type == Some(name.as_str()),
            }
    }
}

/// A condition on one field of a touchpoint, inside `where`.
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    /// The touchpoint field.
    pub field: TouchField,
    /// The test.
    pub test: Test,
}

/// A field of a touchpoint that a `where` filter can test.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TouchField {
    /// `product` (string).
    Product,
    /// `feature` (string).
    Feature,
    /// `campaign` (string).
    Campaign,
    /// `channel` (string).
    Channel,
    /// `revenue` (money).
    Revenue,
    /// `usage`: usage duration (USAGE_TIME).
    Usage,
    /// `properties.<key>`: a free-form property (string).
    Property(String),
}

/// What `sum(...)` adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SumField {
    /// `revenue`: money, in the currency of the compared literal.
    Revenue,
    /// `usage`: usage duration.
    Usage,
}

/// How an operand is tested.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// `= != < <= > >=` a value.
    Cmp(CmpOp, Value),
    /// `between low and high`, both ends included.
    Between(Value, Value),
    /// `in (v1, v2, ...)`.
    In(Vec<Value>),
    /// `contains "text"` (strings, case-sensitive).
    Contains(String),
    /// `starts_with "text"` (strings, case-sensitive).
    StartsWith(String),
    /// `exists`: the fact is known.
    Exists,
    /// `within d`: a time after `at - d` (recent).
    Within(TimeDelta),
    /// `older_than d`: a time at or before `at - d`.
    OlderThan(TimeDelta),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Lte,
    /// `>`
    Gt,
    /// `>=`
    Gte,
}

impl CmpOp {
    /// The operator's text.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Lte => "<=",
            CmpOp::Gt => ">",
            CmpOp::Gte => ">=",
        }
    }

    /// Whether the operator orders values (everything but `=` and `!=`).
    pub fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// A literal value in a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `"text"`.
    Str(String),
    /// `42`, `-1.5`.
    Num(f64),
    /// `true`, `false`.
    Bool(bool),
    /// `2024-01-31T12:00:00Z` or `2024-01-31` (midnight UTC).
    Time(DateTime<Utc>),
    /// `30d`, `12h`, `90m`, `45s`, `2w`.
    Duration(TimeDelta),
    /// `50000.00 EUR`: an amount in major units with at most the currency's
    /// decimal places, then an ISO 4217 code.
    Money(Money),
    /// `RETENTION`.
    Stage(Stage),
    /// `FEMALE`, `MALE`, `NON_BINARY`, `OTHER`, `UNDISCLOSED`.
    Gender(Gender),
    /// `PROMOTER`, `PASSIVE`, `DETRACTOR`.
    Nps(NpsCategory),
}

/// The type of a value or of an operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Text.
    String,
    /// A number.
    Number,
    /// `true` or `false`.
    Bool,
    /// A point in time.
    Timestamp,
    /// A length of time.
    Duration,
    /// Money.
    Money,
    /// A lifecycle stage.
    Stage,
    /// A gender.
    Gender,
    /// An NPS category.
    NpsCategory,
}

impl ValueType {
    /// Name for messages (`a number`).
    pub fn describe(self) -> &'static str {
        match self {
            ValueType::String => "a string",
            ValueType::Number => "a number",
            ValueType::Bool => "a boolean",
            ValueType::Timestamp => "a timestamp",
            ValueType::Duration => "a duration",
            ValueType::Money => "money",
            ValueType::Stage => "a lifecycle stage",
            ValueType::Gender => "a gender",
            ValueType::NpsCategory => "an NPS category",
        }
    }

    /// Whether `<`, `<=`, `>`, `>=` and `between` apply.
    pub fn is_ordered(self) -> bool {
        matches!(
            self,
            ValueType::String
                | ValueType::Number
                | ValueType::Timestamp
                | ValueType::Duration
                | ValueType::Money
        )
    }

    /// Whether the type is one of the enumerations written as bare words.
    pub fn is_enum(self) -> bool {
        matches!(
            self,
            ValueType::Stage | ValueType::Gender | ValueType::NpsCategory
        )
    }
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Str(_) => ValueType::String,
            Value::Num(_) => ValueType::Number,
            Value::Bool(_) => ValueType::Bool,
            Value::Time(_) => ValueType::Timestamp,
            Value::Duration(_) => ValueType::Duration,
            Value::Money(_) => ValueType::Money,
            Value::Stage(_) => ValueType::Stage,
            Value::Gender(_) => ValueType::Gender,
            Value::Nps(_) => ValueType::NpsCategory,
        }
    }
}

/// NPS answer category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NpsCategory {
    /// 0 to 6.
    Detractor,
    /// 7 or 8.
    Passive,
    /// 9 or 10.
    Promoter,
}

impl NpsCategory {
    /// Every category.
    pub const ALL: [NpsCategory; 3] = [
        NpsCategory::Detractor,
        NpsCategory::Passive,
        NpsCategory::Promoter,
    ];

    /// The category of an NPS answer (0 to 10; above 10 counts as a promoter).
    pub fn of_score(score: u8) -> Self {
        match score {
            0..=6 => NpsCategory::Detractor,
            7 | 8 => NpsCategory::Passive,
            _ => NpsCategory::Promoter,
        }
    }

    /// Upper-case name (`DETRACTOR`).
    pub fn as_str(self) -> &'static str {
        match self {
            NpsCategory::Detractor => "DETRACTOR",
            NpsCategory::Passive => "PASSIVE",
            NpsCategory::Promoter => "PROMOTER",
        }
    }
}

/// Every gender, for the rule language's bare words.
pub const ALL_GENDERS: [Gender; 5] = [
    Gender::Female,
    Gender::Male,
    Gender::NonBinary,
    Gender::Other,
    Gender::Undisclosed,
];

/// The rule language's upper-case name of a gender (`NON_BINARY`).
pub fn gender_name(g: Gender) -> &'static str {
    match g {
        Gender::Female => "FEMALE",
        Gender::Male => "MALE",
        Gender::NonBinary => "NON_BINARY",
        Gender::Other => "OTHER",
        Gender::Undisclosed => "UNDISCLOSED",
    }
}

/// Decimal places of a currency's minor unit (ISO 4217 exponent): 0 for
/// `JPY`, 3 for `BHD`, 4 for `CLF`, 2 for most.
///
/// Money literals in rules are written in major units (`50000.00 EUR`), so
/// the language needs the exponent to turn them into minor units.
pub fn minor_unit_digits(currency: &str) -> u32 {
    const ZERO: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
        "VUV", "XAF", "XOF", "XPF",
    ];
    const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    const FOUR: &[&str] = &["CLF", "UYW"];
    if ZERO.contains(&currency) {
        0
    } else if THREE.contains(&currency) {
        3
    } else if FOUR.contains(&currency) {
        4
    } else {
        2
    }
}

impl Rule {
    /// `a and b`, flattening nothing: exactly the operands given.
    pub fn and(operands: Vec<Rule>) -> Rule {
        Rule::And(operands)
    }

    /// `a or b`.
    pub fn or(operands: Vec<Rule>) -> Rule {
        Rule::Or(operands)
    }

    /// `not a`.
    #[allow(clippy::should_implement_trait)]
    pub fn not(operand: Rule) -> Rule {
        Rule::Not(Box::new(operand))
    }

    /// A single comparison.
    pub fn compare(operand: Operand, test: Test) -> Rule {
        Rule::Cond(Condition::Compare { operand, test })
    }

    /// Calls `f` on every condition, depth first, left to right.
    pub fn for_each_condition<'a>(&'a self, f: &mut impl FnMut(&'a Condition)) {
        match self {
            Rule::And(rs) | Rule::Or(rs) => rs.iter().for_each(|r| r.for_each_condition(f)),
            Rule::Not(r) => r.for_each_condition(f),
            Rule::Cond(c) => f(c),
        }
    }
}

impl Operand {
    /// The touchpoint query of a behaviour operand.
    pub fn query(&self) -> Option<&TouchQuery> {
        match self {
            Operand::Count(q) | Operand::Sum(q, _) | Operand::First(q) | Operand::Last(q) => {
                Some(q)
            }
            _ => None,
        }
    }
}

impl Test {
    /// Calls `f` on every literal value of the test.
    pub fn for_each_value<'a>(&'a self, f: &mut impl FnMut(&'a Value)) {
        match self {
            Test::Cmp(_, v) => f(v),
            Test::Between(lo, hi) => {
                f(lo);
                f(hi);
            }
            Test::In(vs) => vs.iter().for_each(f),
            _ => {}
        }
    }

    /// The currency of the first money literal, if any.
    pub fn currency(&self) -> Option<&str> {
        match self {
            Test::Cmp(_, Value::Money(m)) | Test::Between(Value::Money(m), _) => Some(&m.currency),
            Test::In(vs) => vs.iter().find_map(|v| match v {
                Value::Money(m) => Some(m.currency.as_str()),
                _ => None,
            }),
            _ => None,
        }
    }
}

//! What a rule reads: which facts it depends on (so a changed fact
//! re-evaluates only the rules that read it) and which segments it names
//! (for cycle checks).

use super::ast::{Condition, Operand, Rule, TouchType};
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

/// A kind of fact a rule can depend on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fact {
    /// Birth date (`age`).
    BirthDate,
    /// Gender.
    Gender,
    /// Income.
    Income,
    /// Occupation.
    Occupation,
    /// E-mail address.
    Email,
    /// Display name.
    DisplayName,
    /// Custom attribute `key`.
    Attribute(String),
    /// Lifecycle stage and its entry time (`stage`, `time_in_stage`).
    Stage,
    /// Score `name` (of any model).
    Score(String),
    /// Grade.
    Grade,
    /// Consent for a purpose on a channel.
    Consent {
        /// Purpose.
        purpose: String,
        /// Channel.
        channel: String,
    },
    /// Last NPS answer (`nps.last`, `nps.last_category`).
    Nps,
    /// Last CSAT answer.
    Csat,
    /// Loyalty tier.
    LoyaltyTier,
    /// Loyalty balance.
    LoyaltyBalance,
    /// Touchpoints of a type (a `custom` type without a name stands for
    /// every custom type: see [`TouchType::matches`]).
    Touchpoints(TouchType),
    /// Membership of segment `name`.
    Segment(String),
}

impl PartialOrd for TouchType {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TouchType {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.kind.code(), &self.custom_type).cmp(&(other.kind.code(), &other.custom_type))
    }
}

impl fmt::Display for Fact {
    /// A stable key: `birth_date`, `attributes.plan`, `score.fit`,
    /// `consent.marketing.email`, `touchpoints.feature_use`,
    /// `touchpoints.custom("survey")`, `segment.segments/abc`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fact::BirthDate => f.write_str("birth_date"),
            Fact::Gender => f.write_str("gender"),
            Fact::Income => f.write_str("income"),
            Fact::Occupation => f.write_str("occupation"),
            Fact::Email => f.write_str("email"),
            Fact::DisplayName => f.write_str("display_name"),
            Fact::Attribute(k) => write!(f, "attributes.{k}"),
            Fact::Stage => f.write_str("stage"),
            Fact::Score(n) => write!(f, "score.{n}"),
            Fact::Grade => f.write_str("grade"),
            Fact::Consent { purpose, channel } => write!(f, "consent.{purpose}.{channel}"),
            Fact::Nps => f.write_str("nps"),
            Fact::Csat => f.write_str("csat"),
            Fact::LoyaltyTier => f.write_str("loyalty.tier"),
            Fact::LoyaltyBalance => f.write_str("loyalty.balance"),
            Fact::Touchpoints(t) => write!(f, "touchpoints.{t}"),
            Fact::Segment(s) => write!(f, "segment.{s}"),
        }
    }
}

/// The facts `rule` reads.
pub fn reads(rule: &Rule) -> BTreeSet<Fact> {
    let mut out = BTreeSet::new();
    rule.for_each_condition(&mut |c| {
        let fact = match c {
            Condition::Consent { purpose, channel } => Fact::Consent {
                purpose: purpose.clone(),
                channel: channel.clone(),
            },
            Condition::InSegment(s) => Fact::Segment(s.clone()),
            Condition::Compare { operand, .. } => match operand {
                Operand::Age => Fact::BirthDate,
                Operand::Gender => Fact::Gender,
                Operand::Income => Fact::Income,
                Operand::Occupation => Fact::Occupation,
                Operand::Email => Fact::Email,
                Operand::DisplayName => Fact::DisplayName,
                Operand::Attribute(k) => Fact::Attribute(k.clone()),
                Operand::Stage | Operand::TimeInStage => Fact::Stage,
                Operand::Score(n) => Fact::Score(n.name.clone()),
                Operand::Grade => Fact::Grade,
                Operand::NpsLast | Operand::NpsLastCategory => Fact::Nps,
                Operand::CsatLast => Fact::Csat,
                Operand::LoyaltyTier => Fact::LoyaltyTier,
                Operand::LoyaltyBalance => Fact::LoyaltyBalance,
                Operand::Count(q) | Operand::Sum(q, _) | Operand::First(q) | Operand::Last(q) => {
                    Fact::Touchpoints(q.touch.clone())
                }
            },
        };
        out.insert(fact);
    });
    out
}

/// The segments `rule` names in `in_segment(...)`.
pub fn segments_referenced(rule: &Rule) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    rule.for_each_condition(&mut |c| {
        if let Condition::InSegment(s) = c {
            out.insert(s.clone());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse;
    use crate::touchpoint::TouchpointKind;

    #[test]
    fn reads_lists_each_fact_once() {
        let r = parse(
            r#"age > 1 and (time_in_stage > 1d or stage = LOYALTY) and count(feature_use, 7d) > 1
               and last(feature_use where feature = "x") within 1d and count(custom) > 0
               and not in_segment("segments/a") and consent(marketing, email)
               and nps.last_category = DETRACTOR and attributes.plan = "pro" and score.fit > 1"#,
        )
        .expect("parses");
        let got: Vec<String> = reads(&r).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "birth_date",
                "attributes.plan",
                "stage",
                "score.fit",
                "consent.marketing.email",
                "nps",
                "touchpoints.feature_use",
                "touchpoints.custom",
                "segment.segments/a",
            ]
        );
        assert!(reads(&r).contains(&Fact::Touchpoints(TouchType::kind(
            TouchpointKind::FeatureUse
        ))));
        let s = parse(r#"in_segment("b") or (in_segment("a") and not in_segment("b"))"#)
            .expect("parses");
        assert_eq!(
            segments_referenced(&s),
            ["a".to_owned(), "b".to_owned()].into()
        );
        assert!(segments_referenced(&r).contains("segments/a"));
    }
}

//! Surveys as pure logic: question kinds and their valid answers, display
//! conditions, which questions a response was shown and where it stopped,
//! completion, and the classification of NPS and CSAT answers.
//!
//! # Which questions a response was shown
//!
//! Questions are shown in order. A question's *condition* holds when it has
//! none, or when the earlier question it names was answered with a
//! matching value. For a completed response every question whose condition
//! holds was shown. For a partial one the customer got as far as the last
//! question they answered, and saw the next question whose condition holds
//! there (they stopped at it: it *dropped* them); questions after that were
//! not shown. Summaries count shown, answered, skipped and dropped per
//! question from this, so a question hidden by its condition is never in a
//! denominator.

use crate::Violation;
use std::collections::BTreeMap;

/// What a question asks for. The kind alone makes an answer NPS, CSAT or CES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// 0..=10.
    Nps,
    /// 1..=5.
    Csat,
    /// 1..=7.
    Ces,
    /// The question's own scale.
    Rating,
    /// Exactly one choice.
    SingleChoice,
    /// One or more distinct choices.
    MultipleChoice,
    /// Free text.
    OpenText,
}

impl Kind {
    /// Stable code, as stored (matches the proto enum's numbers).
    pub fn code(self) -> i16 {
        match self {
            Self::Nps => 1,
            Self::Csat => 2,
            Self::Ces => 3,
            Self::Rating => 4,
            Self::SingleChoice => 5,
            Self::MultipleChoice => 6,
            Self::OpenText => 7,
        }
    }

    /// The kind of a stored code.
    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            1 => Self::Nps,
            2 => Self::Csat,
            3 => Self::Ces,
            4 => Self::Rating,
            5 => Self::SingleChoice,
            6 => Self::MultipleChoice,
            7 => Self::OpenText,
            _ => return None,
        })
    }

    /// Whether answers are numbers.
    pub fn is_numeric(self) -> bool {
        matches!(self, Self::Nps | Self::Csat | Self::Ces | Self::Rating)
    }

    /// Whether answers are choices.
    pub fn is_choice(self) -> bool {
        matches!(self, Self::SingleChoice | Self::MultipleChoice)
    }

    /// The fixed scale of NPS, CSAT and CES.
    pub fn fixed_scale(self) -> Option<(i64, i64)> {
        match self {
            Self::Nps => Some((0, 10)),
            Self::Csat => Some((1, 5)),
            Self::Ces => Some((1, 7)),
            _ => None,
        }
    }
}

/// Longest open-text answer, in characters.
pub const MAX_TEXT: usize = 10_000;
/// Most questions in a survey.
pub const MAX_QUESTIONS: usize = 100;
/// Most choices of a choice question.
pub const MAX_CHOICES: usize = 50;
/// Widest rating scale (max - min).
pub const MAX_SCALE_WIDTH: i64 = 100;

/// When a question is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Index of the earlier question it looks at.
    pub question: usize,
    /// Numeric answer at least this.
    pub min: Option<i64>,
    /// Numeric answer at most this.
    pub max: Option<i64>,
    /// A choice answer including any of these.
    pub any_of: Vec<String>,
}

impl Condition {
    fn holds(&self, answer: &Value) -> bool {
        match answer {
            Value::Number(n) => {
                self.min.is_none_or(|m| *n >= m) && self.max.is_none_or(|m| *n <= m)
            }
            Value::Choices(c) => self.any_of.iter().any(|a| c.contains(a)),
            Value::Text(_) => true,
        }
    }
}

/// One question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Its id.
    pub id: String,
    /// Its kind.
    pub kind: Kind,
    /// Whether a completed response must answer it when shown.
    pub required: bool,
    /// The valid numbers (numeric kinds).
    pub scale: (i64, i64),
    /// Choice ids (choice kinds).
    pub choices: Vec<String>,
    /// Shown only when this holds.
    pub show_if: Option<Condition>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Numeric kinds.
    Number(i64),
    /// Choice kinds (distinct ids, in the order given).
    Choices(Vec<String>),
    /// Open text.
    Text(String),
}

/// The NPS class of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpsClass {
    /// 0..=6.
    Detractor,
    /// 7..=8.
    Passive,
    /// 9..=10.
    Promoter,
}

/// The class of an NPS answer (0..=10).
pub fn nps_class(n: i64) -> NpsClass {
    match n {
        9.. => NpsClass::Promoter,
        7..=8 => NpsClass::Passive,
        _ => NpsClass::Detractor,
    }
}

/// The satisfaction class of a CSAT answer (1..=5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Satisfaction {
    /// 1..=2.
    Unsatisfied,
    /// 3.
    Neutral,
    /// 4..=5.
    Satisfied,
}

/// The class of a CSAT answer.
pub fn satisfaction(n: i64) -> Satisfaction {
    match n {
        4.. => Satisfaction::Satisfied,
        3 => Satisfaction::Neutral,
        _ => Satisfaction::Unsatisfied,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks a survey's questions as a whole: ids unique and well formed,
/// scales and choices fit the kind, conditions look back at a question of
/// a kind they can test. `field` is the proto path of the questions.
pub fn check_questions(field: &str, questions: &[Question]) -> Vec<Violation> {
    let mut v = Vec::new();
    if questions.is_empty() {
        v.push(Violation::new(field, "must hold at least one question"));
    }
    if questions.len() > MAX_QUESTIONS {
        v.push(Violation::new(
            field,
            format!("must hold at most {MAX_QUESTIONS} questions"),
        ));
        return v;
    }
    let mut seen = BTreeMap::new();
    for (i, q) in questions.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if !valid_id(&q.id) {
            v.push(Violation::new(
                format!("{f}.id"),
                "must be 1-64 characters of a-z, 0-9 and _",
            ));
        } else if seen.insert(q.id.as_str(), i).is_some() {
            v.push(Violation::new(
                format!("{f}.id"),
                "is used by an earlier question",
            ));
        }
        if q.kind == Kind::Rating {
            let (lo, hi) = q.scale;
            if hi <= lo || hi - lo > MAX_SCALE_WIDTH {
                v.push(Violation::new(
                    format!("{f}.scale_max"),
                    format!("must be above scale_min and at most {MAX_SCALE_WIDTH} above it"),
                ));
            }
        }
        if q.kind.is_choice() {
            if q.choices.len() < 2 || q.choices.len() > MAX_CHOICES {
                v.push(Violation::new(
                    format!("{f}.choices"),
                    format!("must hold 2 to {MAX_CHOICES} choices"),
                ));
            }
            let mut ids = std::collections::BTreeSet::new();
            for (j, c) in q.choices.iter().enumerate() {
                if !valid_id(c) {
                    v.push(Violation::new(
                        format!("{f}.choices[{j}].id"),
                        "must be 1-64 characters of a-z, 0-9 and _",
                    ));
                } else if !ids.insert(c) {
                    v.push(Violation::new(
                        format!("{f}.choices[{j}].id"),
                        "is used by an earlier choice",
                    ));
                }
            }
        } else if !q.choices.is_empty() {
            v.push(Violation::new(
                format!("{f}.choices"),
                "only choice questions have choices",
            ));
        }
        if let Some(c) = &q.show_if {
            let cf = format!("{f}.show_if");
            if c.question >= i {
                v.push(Violation::new(
                    format!("{cf}.question"),
                    "must name an earlier question",
                ));
                continue;
            }
            let target = &questions[c.question];
            if target.kind.is_numeric() {
                if c.min.is_none() && c.max.is_none() {
                    v.push(Violation::new(cf.clone(), "needs min_value or max_value"));
                } else if !c.any_of.is_empty() {
                    v.push(Violation::new(
                        format!("{cf}.any_of_choices"),
                        "the question it looks at is numeric",
                    ));
                }
            } else if target.kind.is_choice() {
                if c.any_of.is_empty() || c.min.is_some() || c.max.is_some() {
                    v.push(Violation::new(
                        cf.clone(),
                        "a choice question is tested with any_of_choices only",
                    ));
                }
                for (j, a) in c.any_of.iter().enumerate() {
                    if !target.choices.contains(a) {
                        v.push(Violation::new(
                            format!("{cf}.any_of_choices[{j}]"),
                            "is not a choice of that question",
                        ));
                    }
                }
            } else {
                v.push(Violation::new(
                    format!("{cf}.question"),
                    "open-text answers cannot be tested",
                ));
            }
        }
    }
    v
}

/// Checks one answer against its question; the error says why.
pub fn check_answer(q: &Question, value: &Value) -> Result<(), String> {
    match (value, q.kind) {
        (Value::Number(n), k) if k.is_numeric() => {
            let (lo, hi) = q.scale;
            if (lo..=hi).contains(n) {
                Ok(())
            } else {
                Err(format!("must be {lo} to {hi}"))
            }
        }
        (Value::Choices(c), k) if k.is_choice() => {
            if c.is_empty() {
                return Err("must pick a choice".into());
            }
            if k == Kind::SingleChoice && c.len() != 1 {
                return Err("must pick exactly one choice".into());
            }
            for (i, id) in c.iter().enumerate() {
                if !q.choices.contains(id) {
                    return Err(format!(
                        "{:?} is not a choice of this question",
                        crate::validation::shorten(id, 64)
                    ));
                }
                if c[..i].contains(id) {
                    return Err("picks a choice twice".into());
                }
            }
            Ok(())
        }
        (Value::Text(t), Kind::OpenText) => {
            if t.trim().is_empty() {
                Err("must not be empty".into())
            } else if t.chars().count() > MAX_TEXT {
                Err(format!("must be at most {MAX_TEXT} characters"))
            } else {
                Ok(())
            }
        }
        _ => Err(match q.kind {
            k if k.is_numeric() => "this question takes a number",
            k if k.is_choice() => "this question takes choices",
            _ => "this question takes text",
        }
        .into()),
    }
}

/// How one question stands in one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Its index in the survey.
    pub position: usize,
    /// Its condition holds (whether or not the customer got to it).
    pub condition: bool,
    /// It was shown.
    pub shown: bool,
    /// It is answered.
    pub answered: bool,
    /// The response stopped at it.
    pub dropped: bool,
}

/// Every question's standing in a response holding `answers` (by question
/// index), completed or not.
pub fn walk(
    questions: &[Question],
    answers: &BTreeMap<usize, Value>,
    completed: bool,
) -> Vec<Seen> {
    let condition: Vec<bool> = questions
        .iter()
        .map(|q| match &q.show_if {
            None => true,
            Some(c) => answers.get(&c.question).is_some_and(|a| c.holds(a)),
        })
        .collect();
    // Conditions only look back, and answers of hidden questions are
    // dropped by `prune`, so one pass in order is exact.
    let last = answers.keys().next_back().copied();
    let stop = if completed {
        None
    } else {
        let from = last.map_or(0, |l| l + 1);
        (from..questions.len()).find(|&i| condition[i])
    };
    questions
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let answered = answers.contains_key(&i);
            let reached = completed || last.is_some_and(|l| i <= l) || stop == Some(i);
            let shown = condition[i] && reached;
            Seen {
                position: i,
                condition: condition[i],
                shown,
                answered,
                dropped: !completed && shown && !answered && stop == Some(i),
            }
        })
        .collect()
}

/// Drops answers to questions whose condition no longer holds (an earlier
/// answer changed), until none is left; returns the dropped indexes.
pub fn prune(questions: &[Question], answers: &mut BTreeMap<usize, Value>) -> Vec<usize> {
    let mut dropped = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        if let Some(c) = &q.show_if
            && answers.contains_key(&i)
            && !answers.get(&c.question).is_some_and(|a| c.holds(a))
        {
            answers.remove(&i);
            dropped.push(i);
        }
    }
    dropped
}

/// Indexes of required questions whose condition holds but that are not
/// answered: a response cannot complete while any is left.
pub fn missing_required(questions: &[Question], answers: &BTreeMap<usize, Value>) -> Vec<usize> {
    walk(questions, answers, true)
        .into_iter()
        .filter(|s| questions[s.position].required && s.condition && !s.answered)
        .map(|s| s.position)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, kind: Kind, required: bool) -> Question {
        Question {
            id: id.into(),
            kind,
            required,
            scale: kind.fixed_scale().unwrap_or((1, 5)),
            choices: if kind.is_choice() {
                vec!["a".into(), "b".into()]
            } else {
                vec![]
            },
            show_if: None,
        }
    }

    fn survey() -> Vec<Question> {
        let mut why = q("why", Kind::OpenText, true);
        why.show_if = Some(Condition {
            question: 0,
            min: None,
            max: Some(6),
            any_of: vec![],
        });
        vec![q("nps", Kind::Nps, true), why, q("csat", Kind::Csat, false)]
    }

    #[test]
    fn classes_at_their_edges() {
        assert_eq!(nps_class(0), NpsClass::Detractor);
        assert_eq!(nps_class(6), NpsClass::Detractor);
        assert_eq!(nps_class(7), NpsClass::Passive);
        assert_eq!(nps_class(8), NpsClass::Passive);
        assert_eq!(nps_class(9), NpsClass::Promoter);
        assert_eq!(nps_class(10), NpsClass::Promoter);
        assert_eq!(satisfaction(2), Satisfaction::Unsatisfied);
        assert_eq!(satisfaction(3), Satisfaction::Neutral);
        assert_eq!(satisfaction(4), Satisfaction::Satisfied);
    }

    #[test]
    fn answers_are_checked_against_their_question() {
        let s = survey();
        assert!(check_answer(&s[0], &Value::Number(10)).is_ok());
        assert!(check_answer(&s[0], &Value::Number(11)).is_err());
        assert!(check_answer(&s[0], &Value::Number(-1)).is_err());
        assert!(check_answer(&s[2], &Value::Number(0)).is_err());
        assert!(check_answer(&s[1], &Value::Text(" ".into())).is_err());
        assert!(check_answer(&s[1], &Value::Number(1)).is_err());
        let single = q("pick", Kind::SingleChoice, false);
        assert!(check_answer(&single, &Value::Choices(vec!["a".into()])).is_ok());
        assert!(check_answer(&single, &Value::Choices(vec!["a".into(), "b".into()])).is_err());
        assert!(check_answer(&single, &Value::Choices(vec!["z".into()])).is_err());
        let multi = q("many", Kind::MultipleChoice, false);
        assert!(check_answer(&multi, &Value::Choices(vec!["a".into(), "b".into()])).is_ok());
        assert!(check_answer(&multi, &Value::Choices(vec!["a".into(), "a".into()])).is_err());
    }

    #[test]
    fn a_promoter_never_sees_the_detractor_question() {
        let s = survey();
        let answers = BTreeMap::from([(0, Value::Number(9)), (2, Value::Number(5))]);
        let seen = walk(&s, &answers, true);
        assert!(!seen[1].shown && !seen[1].condition);
        assert!(missing_required(&s, &answers).is_empty());
    }

    #[test]
    fn a_detractor_must_say_why_and_a_partial_stops_there() {
        let s = survey();
        let answers = BTreeMap::from([(0, Value::Number(3))]);
        assert_eq!(missing_required(&s, &answers), vec![1]);
        let seen = walk(&s, &answers, false);
        assert!(seen[1].shown && seen[1].dropped);
        assert!(!seen[2].shown, "never got to the third question");
    }

    #[test]
    fn changing_an_answer_drops_answers_it_hid() {
        let s = survey();
        let mut answers = BTreeMap::from([(0, Value::Number(9)), (1, Value::Text("x".into()))]);
        assert_eq!(prune(&s, &mut answers), vec![1]);
        assert!(!answers.contains_key(&1));
    }

    #[test]
    fn conditions_look_back_only() {
        let mut s = survey();
        s[0].show_if = Some(Condition {
            question: 1,
            min: Some(1),
            max: None,
            any_of: vec![],
        });
        let v = check_questions("survey.questions", &s);
        assert!(
            v.iter()
                .any(|v| v.field == "survey.questions[0].show_if.question")
        );
    }
}

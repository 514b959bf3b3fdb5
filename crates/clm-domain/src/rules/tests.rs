//! Round-trip, evaluation and next-change tests for the whole language.

use super::*;
use crate::attributes::AttributeValue;
use crate::demographics::Gender;
use crate::lifecycle::{ALL_STAGES, Stage};
use crate::money::{ISO_4217, Money};
use crate::touchpoint::{Touchpoint, TouchpointKind};
use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;

// ---------------------------------------------------------------- generators

/// Accepts every name, with four typed attributes.
struct AnyCatalog;

const ATTRS: [(&str, ValueType); 4] = [
    ("plan", ValueType::String),
    ("seats", ValueType::Number),
    ("vip", ValueType::Bool),
    ("renewal", ValueType::Timestamp),
];

impl Catalog for AnyCatalog {
    fn attribute_type(&self, key: &str) -> Option<ValueType> {
        ATTRS.iter().find(|(k, _)| *k == key).map(|(_, t)| *t)
    }
    fn infer_unknown_attributes(&self) -> bool {
        false
    }
    fn has_score(&self, _: &str) -> bool {
        true
    }
    fn has_custom_touchpoint(&self, _: &str) -> bool {
        true
    }
    fn has_consent(&self, _: &str, _: &str) -> bool {
        true
    }
    fn has_segment(&self, _: &str) -> bool {
        true
    }
}

/// Any text without NUL: quotes, backslashes, controls, non-ASCII.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<char>(),
            1 => prop::sample::select(vec!['"', '\\', '\n', '\t', '\u{7f}', 'é', ' ', 'a', '_']),
        ],
        0..max,
    )
    .prop_map(|cs| {
        cs.into_iter()
            .map(|c| if c == '\0' { '0' } else { c })
            .collect()
    })
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_][a-z0-9_]{0,8}",
        text(8).prop_filter("non-empty, at most 64 bytes", |s| !s.is_empty()
            && s.len() <= 64),
    ]
}

fn positive_duration() -> impl Strategy<Value = TimeDelta> {
    (
        1i64..400,
        prop::sample::select(vec![1i64, 60, 3600, 86_400, 604_800, 7]),
    )
        .prop_map(|(n, unit)| TimeDelta::seconds(n * unit))
}

fn any_duration() -> impl Strategy<Value = TimeDelta> {
    (-315_360_000i64..315_360_000).prop_map(TimeDelta::seconds)
}

fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        (0i64..4_102_444_800, 0i64..1_000_000).prop_map(|(s, us)| {
            DateTime::from_timestamp(s, 0).expect("in range") + TimeDelta::microseconds(us)
        }),
        (0i64..40_000).prop_map(|d| DateTime::from_timestamp(d * 86_400, 0).expect("in range")),
    ]
}

fn money_in(currency: &'static str) -> impl Strategy<Value = Value> {
    any::<i64>().prop_map(move |amount_minor| {
        Value::Money(Money {
            currency: currency.to_owned(),
            amount_minor,
        })
    })
}

fn value_of(ty: ValueType) -> BoxedStrategy<Value> {
    match ty {
        ValueType::String => text(12).prop_map(Value::Str).boxed(),
        ValueType::Number => prop_oneof![
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            (-1000i32..1000).prop_map(f64::from),
        ]
        .prop_map(Value::Num)
        .boxed(),
        ValueType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        ValueType::Timestamp => any_time().prop_map(Value::Time).boxed(),
        ValueType::Duration => any_duration().prop_map(Value::Duration).boxed(),
        ValueType::Money => prop::sample::select(ISO_4217.to_vec())
            .prop_flat_map(money_in)
            .boxed(),
        ValueType::Stage => prop::sample::select(ALL_STAGES.to_vec())
            .prop_map(Value::Stage)
            .boxed(),
        ValueType::Gender => prop::sample::select(ALL_GENDERS.to_vec())
            .prop_map(Value::Gender)
            .boxed(),
        ValueType::NpsCategory => prop::sample::select(NpsCategory::ALL.to_vec())
            .prop_map(Value::Nps)
            .boxed(),
    }
}

fn cmp_op() -> impl Strategy<Value = CmpOp> {
    prop::sample::select(vec![
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Lte,
        CmpOp::Gt,
        CmpOp::Gte,
    ])
}

/// A test that type-checks against an operand of type `ty`; `values` makes
/// its literals (money in one currency for revenue sums).
fn test_with(ty: ValueType, aggregate: bool, values: BoxedStrategy<Value>) -> BoxedStrategy<Test> {
    let v = values.clone();
    let mut options: Vec<BoxedStrategy<Test>> = vec![
        (
            prop::sample::select(vec![CmpOp::Eq, CmpOp::Ne]),
            values.clone(),
        )
            .prop_map(|(op, v)| Test::Cmp(op, v))
            .boxed(),
        prop::collection::vec(values.clone(), 1..4)
            .prop_map(Test::In)
            .boxed(),
    ];
    if ty.is_ordered() {
        options.push(
            (cmp_op(), v.clone())
                .prop_map(|(op, v)| Test::Cmp(op, v))
                .boxed(),
        );
        options.push(
            (v.clone(), v)
                .prop_map(|(a, b)| Test::Between(a, b))
                .boxed(),
        );
    }
    if ty == ValueType::String {
        options.push(text(6).prop_map(Test::Contains).boxed());
        options.push(text(6).prop_map(Test::StartsWith).boxed());
    }
    if !aggregate {
        options.push(Just(Test::Exists).boxed());
    }
    if ty == ValueType::Timestamp {
        options.push(positive_duration().prop_map(Test::Within).boxed());
        options.push(positive_duration().prop_map(Test::OlderThan).boxed());
    }
    prop::strategy::Union::new(options).boxed()
}

fn test_for(ty: ValueType, aggregate: bool) -> BoxedStrategy<Test> {
    if ty == ValueType::Money {
        return prop::sample::select(ISO_4217.to_vec())
            .prop_flat_map(move |cur| test_with(ty, aggregate, money_in(cur).boxed()))
            .boxed();
    }
    test_with(ty, aggregate, value_of(ty))
}

fn touch_type() -> impl Strategy<Value = TouchType> {
    prop_oneof![
        prop::sample::select(TouchpointKind::ALL.to_vec()).prop_map(TouchType::kind),
        name().prop_map(TouchType::custom),
    ]
}

fn predicate() -> impl Strategy<Value = Predicate> {
    let string_field = prop_oneof![
        Just(TouchField::Product),
        Just(TouchField::Feature),
        Just(TouchField::Campaign),
        Just(TouchField::Channel),
        name().prop_map(TouchField::Property),
    ];
    prop_oneof![
        (string_field, test_for(ValueType::String, false))
            .prop_map(|(field, test)| Predicate { field, test }),
        test_for(ValueType::Money, false).prop_map(|test| Predicate {
            field: TouchField::Revenue,
            test
        }),
        test_for(ValueType::Duration, false).prop_map(|test| Predicate {
            field: TouchField::Usage,
            test
        }),
    ]
}

fn query() -> impl Strategy<Value = TouchQuery> {
    (
        touch_type(),
        prop::collection::vec(predicate(), 0..3),
        prop::option::of(positive_duration()),
    )
        .prop_map(|(touch, filter, window)| TouchQuery {
            touch,
            filter,
            window,
        })
}

fn compare(
    operand: impl Strategy<Value = Operand> + 'static,
    ty: ValueType,
    aggregate: bool,
) -> BoxedStrategy<Rule> {
    (operand, test_for(ty, aggregate))
        .prop_map(|(operand, test)| Rule::compare(operand, test))
        .boxed()
}

fn condition() -> BoxedStrategy<Rule> {
    use ValueType as T;
    let simple = |op: Operand, ty| compare(Just(op), ty, false);
    prop::strategy::Union::new(vec![
        simple(Operand::Age, T::Number),
        simple(Operand::Gender, T::Gender),
        simple(Operand::Income, T::Money),
        simple(Operand::Occupation, T::String),
        simple(Operand::Email, T::String),
        simple(Operand::DisplayName, T::String),
        simple(Operand::Stage, T::Stage),
        simple(Operand::TimeInStage, T::Duration),
        simple(Operand::Grade, T::String),
        simple(Operand::NpsLast, T::Number),
        simple(Operand::NpsLastCategory, T::NpsCategory),
        simple(Operand::CsatLast, T::Number),
        simple(Operand::LoyaltyTier, T::String),
        simple(Operand::LoyaltyBalance, T::Number),
        prop::sample::select(ATTRS.to_vec())
            .prop_flat_map(|(k, ty)| compare(Just(Operand::Attribute(k.to_owned())), ty, false))
            .boxed(),
        compare(
            (proptest::option::of(name()), name())
                .prop_map(|(model, name)| Operand::Score(ScoreRef { model, name })),
            T::Number,
            false,
        ),
        compare(query().prop_map(Operand::Count), T::Number, true),
        compare(
            query().prop_map(|q| Operand::Sum(q, SumField::Revenue)),
            T::Money,
            true,
        ),
        compare(
            query().prop_map(|q| Operand::Sum(q, SumField::Usage)),
            T::Duration,
            true,
        ),
        compare(query().prop_map(Operand::First), T::Timestamp, false),
        compare(query().prop_map(Operand::Last), T::Timestamp, false),
        (name(), name())
            .prop_map(|(purpose, channel)| Rule::Cond(Condition::Consent { purpose, channel }))
            .boxed(),
        text(12)
            .prop_map(|s| Rule::Cond(Condition::InSegment(s)))
            .boxed(),
    ])
    .boxed()
}

/// Random well-typed rules.
fn rule() -> impl Strategy<Value = Rule> {
    condition().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Rule::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Rule::Or),
            inner.prop_map(Rule::not),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn print_then_parse_gives_the_same_tree(r in rule()) {
        let text = r.to_string();
        let parsed = parse(&text);
        prop_assert_eq!(parsed.as_ref(), Ok(&r), "text: {}", text);
        prop_assert_eq!(check(&r, &AnyCatalog), Ok(()), "text: {}", text);
        prop_assert!(compile(&text, &AnyCatalog).is_ok(), "text: {}", text);
    }

    #[test]
    fn touch_queries_round_trip(q in query()) {
        let text = q.to_string();
        prop_assert_eq!(parse_touch_query(&text), Ok(q.clone()), "text: {}", text);
        prop_assert_eq!(check_touch_query(&q, &AnyCatalog), Ok(()), "text: {}", text);
    }

    #[test]
    fn printing_parsed_text_is_stable(r in rule()) {
        // Re-spell the canonical text: upper-case keywords, other duration
        // units, extra spaces and parentheses; the canonical text comes back.
        let canonical = r.to_string();
        let parsed = parse(&format!("( {canonical} )")).map(|p| p.to_string());
        prop_assert_eq!(parsed.as_deref(), Ok(canonical.as_str()));
    }
}

#[test]
fn canonical_text_for_loose_spellings() {
    for (loose, canonical) in [
        (
            "age>=25 AND  NOT(stage=retention)",
            "age >= 25 and not stage = RETENTION",
        ),
        (
            "count( feature_use , 168h ) >= 3",
            "count(feature_use, 1w) >= 3",
        ),
        ("count(FEATURE_USE,90m)>0 or (a_b_c_is_not_a_field = 1)", ""),
        ("((age > 1))", "age > 1"),
        ("income >= 50000 EUR", "income >= 50000.00 EUR"),
        (
            "attributes.renewal < 2025-01-01T00:00:00+00:00",
            "attributes.renewal < 2025-01-01",
        ),
        (
            "attributes.renewal < 2025-01-01T00:00:00.5Z",
            "attributes.renewal < 2025-01-01T00:00:00.500Z",
        ),
        ("attributes.\"plan\" = 'x'", ""),
        (
            "attributes.\"plan\" = \"a\\u{1}\"",
            "attributes.plan = \"a\\u{1}\"",
        ),
        (
            "(age > 1 or age > 2) or age > 3",
            "(age > 1 or age > 2) or age > 3",
        ),
        (
            "age > 1 or age > 2 and (age > 3 or age > 4)",
            "age > 1 or age > 2 and (age > 3 or age > 4)",
        ),
        ("not (age > 1 and age > 2)", "not (age > 1 and age > 2)"),
        (
            "nps.last_category in (\"promoter\", passive)",
            "nps.last_category in (PROMOTER, PASSIVE)",
        ),
        (
            "sum(usage_time.usage, 3600s) > 120m",
            "sum(usage_time.usage, 1h) > 2h",
        ),
    ] {
        match parse(loose) {
            Ok(r) => assert_eq!(r.to_string(), canonical, "{loose}"),
            Err(e) => assert_eq!(canonical, "", "{loose}: {e}"),
        }
    }
}

// ---------------------------------------------------------------- evaluation

fn t(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
        .single()
        .expect("valid time")
}

fn tp(kind: TouchpointKind, at: DateTime<Utc>) -> Touchpoint {
    Touchpoint {
        event_id: format!("e{}", at.timestamp()),
        kind,
        custom_type: None,
        occurred_time: at,
        usage_millis: None,
        product: None,
        feature: None,
        revenue: None,
        campaign: None,
        channel: None,
        properties: Default::default(),
    }
}

fn export(at: DateTime<Utc>) -> Touchpoint {
    Touchpoint {
        feature: Some("export".into()),
        ..tp(TouchpointKind::FeatureUse, at)
    }
}

fn purchase(at: DateTime<Utc>, cents: i64, currency: &str) -> Touchpoint {
    Touchpoint {
        revenue: Some(Money {
            currency: currency.into(),
            amount_minor: cents,
        }),
        product: Some("pro".into()),
        ..tp(TouchpointKind::Purchase, at)
    }
}

fn customer() -> FactSet {
    let mut f = FactSet::default();
    f.demographics.birth_date = NaiveDate::from_ymd_opt(2000, 6, 15);
    f.demographics.gender = Some(Gender::Female);
    f.demographics.annual_income = Some(Money {
        currency: "EUR".into(),
        amount_minor: 5_000_000,
    });
    f.demographics.occupation = Some("Software engineer".into());
    f.email = Some("ada@example.com".into());
    f.display_name = Some("Ada".into());
    f.attributes
        .insert("plan".into(), AttributeValue::String("pro".into()));
    f.attributes
        .insert("seats".into(), AttributeValue::Number(12.0));
    f.attributes
        .insert("vip".into(), AttributeValue::Bool(true));
    f.attributes.insert(
        "renewal".into(),
        AttributeValue::Timestamp(t(2026, 3, 1, 0)),
    );
    f.stage = Some((Stage::Retention, t(2026, 1, 1, 0)));
    f.scores.insert("engagement".into(), 55.5);
    f.scores.insert("fit".into(), 20.0);
    f.grade = Some("A2".into());
    f.grant("marketing", "email");
    f.nps_last = Some(4);
    f.csat_last = Some(4.5);
    f.loyalty_tier = Some("gold".into());
    f.loyalty_balance = Some(1200);
    f.segments.insert("segments/vip".into());
    let mut custom = tp(TouchpointKind::Custom, t(2026, 2, 20, 0));
    custom.custom_type = Some("survey_answer".into());
    custom.properties.insert("score".into(), "3".into());
    let mut usage = tp(TouchpointKind::UsageTime, t(2026, 2, 27, 0));
    usage.usage_millis = Some(90 * 60 * 1000);
    f.touchpoints = vec![
        export(t(2026, 2, 25, 10)),
        export(t(2026, 2, 27, 10)),
        export(t(2026, 2, 28, 10)),
        Touchpoint {
            feature: Some("import".into()),
            ..tp(TouchpointKind::FeatureUse, t(2026, 2, 28, 11))
        },
        purchase(t(2025, 10, 1, 0), 10_000, "EUR"),
        purchase(t(2026, 2, 10, 0), 2_550, "EUR"),
        purchase(t(2026, 2, 11, 0), 9_999, "USD"),
        custom,
        usage,
    ];
    f
}

fn holds(text: &str, facts: &FactSet, at: DateTime<Utc>) -> bool {
    // Parsed, not checked: a mismatched literal (`attributes.plan = 3`) must
    // still evaluate to false rather than panic.
    let rule = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    evaluate(&rule, facts, at)
}

#[test]
fn each_condition_kind_evaluates() {
    let f = customer();
    let now = t(2026, 3, 1, 0);
    let cases: &[(&str, bool)] = &[
        ("age = 25", true),
        ("age >= 26", false),
        ("age between 20 and 30", true),
        ("gender = FEMALE", true),
        ("gender != MALE", true),
        ("gender in (MALE, OTHER)", false),
        ("income >= 50000.00 EUR", true),
        ("income > 50000.00 EUR", false),
        ("income > 1.00 USD or income < 1.00 USD", false),
        ("occupation contains \"engineer\"", true),
        ("occupation contains \"Engineer\"", false),
        ("email starts_with \"ada@\"", true),
        ("display_name = \"Ada\"", true),
        ("attributes.plan in (\"pro\", \"team\")", true),
        ("attributes.seats between 10 and 12", true),
        ("attributes.vip = true", true),
        ("attributes.renewal older_than 0s", true),
        ("attributes.renewal within 1d", true),
        ("attributes.renewal < 2026-03-01T00:00:01Z", true),
        ("attributes.missing exists", false),
        ("not attributes.missing exists", true),
        ("attributes.plan = 3", false),
        ("stage = RETENTION", true),
        ("stage in (LOYALTY, CHURNED)", false),
        ("time_in_stage >= 59d", true),
        ("time_in_stage > 59d", false),
        ("score.engagement > 55", true),
        ("score.fit >= 50", false),
        ("score.custom_missing >= 0", false),
        ("grade starts_with \"A\"", true),
        ("consent(marketing, email)", true),
        ("consent(marketing, sms)", false),
        ("nps.last_category = DETRACTOR", true),
        ("nps.last <= 6", true),
        ("csat.last > 4", true),
        ("loyalty.tier = \"gold\" and loyalty.balance > 1000", true),
        ("in_segment(\"segments/vip\")", true),
        ("in_segment(\"segments/other\")", false),
        (
            "count(feature_use where feature = \"export\", 7d) >= 3",
            true,
        ),
        (
            "count(feature_use where feature = \"export\", 3d) >= 3",
            false,
        ),
        ("count(feature_use, 7d) = 4", true),
        (
            "count(feature_use where feature in (\"export\", \"import\") and feature != \"import\") = 3",
            true,
        ),
        ("count(purchase) = 3", true),
        ("count(purchase where revenue >= 25.50 EUR) = 2", true),
        ("sum(purchase.revenue, 30d) = 25.50 EUR", true),
        ("sum(purchase.revenue) = 125.50 EUR", true),
        ("sum(purchase.revenue, 30d) = 99.99 USD", true),
        ("sum(usage_time.usage, 7d) >= 90m", true),
        ("count(usage_time where usage > 2h) = 0", true),
        ("last(purchase) older_than 90d", false),
        ("last(purchase) within 30d", true),
        ("count(purchase, 90d) = 0", false),
        ("first(purchase) < 2026-01-01", true),
        ("first(purchase, 30d) >= 2026-02-10", true),
        ("last(support_contact) exists", false),
        ("not last(support_contact) exists", true),
        (
            "count(custom(\"survey_answer\") where properties.score <= \"6\") = 1",
            true,
        ),
        ("count(custom) = 1 and count(custom(\"other\")) = 0", true),
        (
            "count(purchase where product = \"pro\" and channel exists) = 0",
            true,
        ),
    ];
    for (text, want) in cases {
        assert_eq!(holds(text, &f, now), *want, "{text}");
    }
    assert!(holds("age = 25 or stage = LOYALTY", &f, now));
    assert!(!holds("age = 25 and stage = LOYALTY", &f, now));
    assert!(holds("not (age = 25 and stage = LOYALTY)", &f, now));
}

#[test]
fn missing_facts_fail_every_test_but_not_negations() {
    let empty = FactSet::default();
    let now = t(2026, 3, 1, 0);
    for text in [
        "age >= 0",
        "age < 0",
        "gender != MALE",
        "stage != LOYALTY",
        "email exists",
        "time_in_stage >= 0s",
        "last(purchase) older_than 1d",
        "last(purchase) within 1d",
        "nps.last_category != PROMOTER",
    ] {
        assert!(!holds(text, &empty, now), "{text}");
        assert!(holds(&format!("not {text}"), &empty, now), "not {text}");
    }
    assert!(holds("count(purchase) = 0", &empty, now));
    assert!(holds("sum(purchase.revenue) = 0 EUR", &empty, now));
}

#[test]
fn windows_expire_at_the_exact_instant() {
    let f = customer();
    let rule = compile(
        "count(feature_use where feature = \"export\", 7d) >= 3",
        &AnyCatalog,
    )
    .expect("compiles");
    let now = t(2026, 3, 1, 0);
    // The oldest of the three exports (25 Feb 10:00) leaves at 4 Mar 10:00.
    let expiry = t(2026, 3, 4, 10);
    assert_eq!(next_change(&rule, &f, now), Some(expiry));
    assert!(evaluate(&rule, &f, expiry - TimeDelta::microseconds(1)));
    assert!(!evaluate(&rule, &f, expiry));
    assert_eq!(
        next_change(&rule, &f, expiry),
        None,
        "false for good once they age out"
    );

    // >= 2 holds until the second oldest leaves: one timer, not two.
    let rule = compile(
        "count(feature_use where feature = \"export\", 7d) >= 2",
        &AnyCatalog,
    )
    .expect("compiles");
    assert_eq!(next_change(&rule, &f, now), Some(t(2026, 3, 6, 10)));
}

#[test]
fn next_change_covers_birthdays_stage_time_and_recency() {
    let f = customer();
    let now = t(2026, 3, 1, 0);
    let nc = |text: &str| {
        let rule = compile(text, &AnyCatalog).expect("compiles");
        next_change(&rule, &f, now)
    };
    // Born 15 June 2000: 26 on 15 June 2026, midnight UTC.
    assert_eq!(nc("age >= 26"), Some(t(2026, 6, 15, 0)));
    assert_eq!(nc("age between 20 and 30"), Some(t(2031, 6, 15, 0)));
    assert_eq!(nc("age >= 18"), None);
    // Entered RETENTION on 1 Jan 2026.
    assert_eq!(nc("time_in_stage >= 90d"), Some(t(2026, 4, 1, 0)));
    assert_eq!(
        nc("time_in_stage > 90d"),
        Some(t(2026, 4, 1, 0) + TimeDelta::microseconds(1))
    );
    // Last purchase 10 Feb (EUR) / 11 Feb (USD).
    assert_eq!(nc("last(purchase) older_than 90d"), Some(t(2026, 5, 12, 0)));
    assert_eq!(nc("attributes.renewal within 7d"), Some(t(2026, 3, 8, 0)));
    assert_eq!(nc("consent(marketing, email) and stage = RETENTION"), None);
    // The sum drops from 25.50 to 0 when the 10 Feb purchase leaves.
    assert_eq!(
        nc("sum(purchase.revenue, 30d) > 0 EUR"),
        Some(t(2026, 3, 12, 0))
    );
    // Nothing changes the rule while another part keeps it true.
    assert_eq!(nc("stage = RETENTION or age >= 26"), None);
    assert!(!depends_on_time(
        &parse("stage = RETENTION and count(purchase) > 1").expect("parses")
    ));
    assert!(depends_on_time(
        &parse("count(purchase, 1d) > 1").expect("parses")
    ));
}

#[test]
fn leap_day_birthdays_count_from_the_first_of_march() {
    let mut f = FactSet::default();
    f.demographics.birth_date = NaiveDate::from_ymd_opt(2008, 2, 29);
    let rule = parse("age >= 18").expect("parses");
    assert_eq!(
        next_change(&rule, &f, t(2026, 1, 1, 0)),
        Some(t(2026, 3, 1, 0))
    );
    assert!(!evaluate(&rule, &f, t(2026, 2, 28, 23)));
    assert!(evaluate(&rule, &f, t(2026, 3, 1, 0)));
}

// ------------------------------------------------- next_change vs brute force

const BASE_SECS: i64 = 1_772_323_200; // 2026-03-01T00:00:00Z

fn hour(h: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(BASE_SECS + h * 3600, 0).expect("in range")
}

/// Small fact sets on an hour grid.
fn small_facts() -> impl Strategy<Value = FactSet> {
    let event = (prop::bool::ANY, prop::bool::ANY, -800i64..3, 0i64..5000);
    (
        prop::option::of((1996i32..2001, 1u32..13, 1u32..29, prop::bool::weighted(0.2))),
        prop::option::of(0i64..2000),
        prop::option::of(-1000i64..1000),
        prop::collection::vec(event, 0..6),
        prop::bool::ANY,
    )
        .prop_map(|(birth, entered, renewal, events, consent)| {
            let mut f = FactSet::default();
            f.demographics.birth_date = birth.and_then(|(y, m, d, leap)| {
                if leap {
                    NaiveDate::from_ymd_opt(2000, 2, 29)
                } else {
                    NaiveDate::from_ymd_opt(y, m, d)
                }
            });
            f.stage = entered.map(|h| (Stage::Retention, hour(-h)));
            if let Some(h) = renewal {
                f.attributes
                    .insert("renewal".into(), AttributeValue::Timestamp(hour(h)));
            }
            if consent {
                f.grant("marketing", "email");
            }
            f.touchpoints = events
                .into_iter()
                .map(|(is_purchase, feature_a, h, cents)| {
                    if is_purchase {
                        purchase(hour(h), cents, "EUR")
                    } else {
                        Touchpoint {
                            feature: Some(if feature_a { "a" } else { "b" }.into()),
                            ..tp(TouchpointKind::FeatureUse, hour(h))
                        }
                    }
                })
                .collect();
            f
        })
}

fn hours() -> impl Strategy<Value = TimeDelta> {
    (1i64..800).prop_map(TimeDelta::hours)
}

fn small_query() -> impl Strategy<Value = TouchQuery> {
    (prop::bool::ANY, prop::bool::ANY, prop::option::of(hours())).prop_map(
        |(is_purchase, filtered, window)| TouchQuery {
            touch: TouchType::kind(if is_purchase {
                TouchpointKind::Purchase
            } else {
                TouchpointKind::FeatureUse
            }),
            filter: if filtered && !is_purchase {
                vec![Predicate {
                    field: TouchField::Feature,
                    test: Test::Cmp(CmpOp::Eq, Value::Str("a".into())),
                }]
            } else {
                vec![]
            },
            window,
        },
    )
}

/// Rules over time-dependent conditions with literals on the same grid.
fn timed_rule() -> impl Strategy<Value = Rule> {
    let num = |lo: i32, hi: i32| (lo..hi).prop_map(|n| Value::Num(f64::from(n)));
    let num_test = move |lo, hi| {
        prop_oneof![
            (cmp_op(), num(lo, hi)).prop_map(|(op, v)| Test::Cmp(op, v)),
            (num(lo, hi), num(lo, hi)).prop_map(|(a, b)| Test::Between(a, b)),
            prop::collection::vec(num(lo, hi), 1..3).prop_map(Test::In),
        ]
    };
    let dur_test = prop_oneof![
        (
            cmp_op(),
            (1i64..2000).prop_map(|h| Value::Duration(TimeDelta::hours(h)))
        )
            .prop_map(|(op, v)| Test::Cmp(op, v)),
    ];
    let recency = prop_oneof![
        hours().prop_map(Test::Within),
        hours().prop_map(Test::OlderThan),
        (
            cmp_op(),
            (-1000i64..1000).prop_map(|h| Value::Time(hour(h)))
        )
            .prop_map(|(op, v)| Test::Cmp(op, v)),
        Just(Test::Exists),
    ];
    let eur = (0i64..15_000).prop_map(|c| {
        Value::Money(Money {
            currency: "EUR".into(),
            amount_minor: c,
        })
    });
    let cond = prop_oneof![
        num_test(20, 38).prop_map(|t| Rule::compare(Operand::Age, t)),
        dur_test.prop_map(|t| Rule::compare(Operand::TimeInStage, t)),
        (small_query(), num_test(0, 5)).prop_map(|(q, t)| Rule::compare(Operand::Count(q), t)),
        (small_query(), cmp_op(), eur).prop_map(|(q, op, v)| Rule::compare(
            Operand::Sum(q, SumField::Revenue),
            Test::Cmp(op, v)
        )),
        (small_query(), recency.clone()).prop_map(|(q, t)| Rule::compare(Operand::Last(q), t)),
        (small_query(), recency.clone()).prop_map(|(q, t)| Rule::compare(Operand::First(q), t)),
        recency.prop_map(|t| Rule::compare(Operand::Attribute("renewal".into()), t)),
        Just(Rule::Cond(Condition::Consent {
            purpose: "marketing".into(),
            channel: "email".into()
        })),
    ];
    cond.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Rule::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Rule::Or),
            inner.prop_map(Rule::not),
        ]
    })
}

/// Every instant at which a rule from [`timed_rule`] over [`small_facts`]
/// can change, in order: each hour and the microsecond after it for the
/// first 4,000 hours (windows, stage times and recency all fall there), then
/// each midnight for fifteen years (birthdays).
fn grid(after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> {
    let us = TimeDelta::microseconds(1);
    let hourly = (-3000i64..4000).flat_map(move |h| [hour(h), hour(h) + us]);
    let daily = (4000 / 24 + 1..15 * 366).map(|d| hour(d * 24));
    hourly.chain(daily).filter(move |p| *p > after)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn next_change_matches_a_brute_force_walk_through_time(
        rule in timed_rule(),
        facts in small_facts(),
        now_hours in -100i64..100,
        now_micros in prop_oneof![Just(0i64), 0i64..3_600_000_000],
    ) {
        let now = hour(now_hours) + TimeDelta::microseconds(now_micros);
        prop_assert_eq!(check(&rule, &AnyCatalog), Ok(()));
        let start = evaluate(&rule, &facts, now);
        let brute = grid(now).find(|p| evaluate(&rule, &facts, *p) != start);
        let got = next_change(&rule, &facts, now);
        let horizon = hour(15 * 366 * 24);
        match brute {
            Some(p) => {
                prop_assert_eq!(got, Some(p), "rule: {}", rule);
                prop_assert_eq!(evaluate(&rule, &facts, p - TimeDelta::microseconds(1)), start);
            }
            None => prop_assert!(got.is_none_or(|g| g > horizon), "rule: {}, got {:?}", rule, got),
        }
    }
}

// ------------------------------------- indexed next_change vs the rescan

/// Fact sets with many touchpoints: purchases in two currencies (with
/// refunds and, rarely, amounts that overflow a sum), feature uses with
/// usage, and several at the same instant.
fn busy_facts() -> impl Strategy<Value = FactSet> {
    let amount = prop_oneof![
        8 => -2000i64..15_000,
        1 => prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(i64::MAX / 2 + 1)],
    ];
    let event = (
        0u8..3,
        prop::bool::ANY,
        -900i64..3,
        amount,
        prop::option::of(prop_oneof![
            8 => 0i64..10_000_000,
            1 => Just(i64::MAX),
        ]),
    );
    (small_facts(), prop::collection::vec(event, 0..60)).prop_map(|(mut f, events)| {
        f.touchpoints.extend(events.into_iter().map(
            |(kind, feature_a, h, cents, usage)| match kind {
                0 => purchase(hour(h), cents, "EUR"),
                1 => purchase(hour(h), cents, "USD"),
                _ => Touchpoint {
                    feature: Some(if feature_a { "a" } else { "b" }.into()),
                    usage_millis: usage,
                    ..tp(TouchpointKind::FeatureUse, hour(h))
                },
            },
        ));
        f
    })
}

/// [`timed_rule`] plus usage sums, mixed with conditions on other facts.
fn busy_rule() -> impl Strategy<Value = Rule> {
    let usage = (
        small_query(),
        cmp_op(),
        (0i64..50_000).prop_map(|s| Value::Duration(TimeDelta::seconds(s))),
    )
        .prop_map(|(q, op, v)| Rule::compare(Operand::Sum(q, SumField::Usage), Test::Cmp(op, v)));
    let usd = (small_query(), cmp_op(), -5_000i64..30_000).prop_map(|(q, op, c)| {
        Rule::compare(
            Operand::Sum(q, SumField::Revenue),
            Test::Cmp(
                op,
                Value::Money(Money {
                    currency: "USD".into(),
                    amount_minor: c,
                }),
            ),
        )
    });
    prop_oneof![
        3 => timed_rule(),
        1 => usage,
        1 => usd,
        2 => (timed_rule(), timed_rule()).prop_map(|(a, b)| Rule::And(vec![a, b])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn next_change_agrees_with_the_rescan(
        rule in busy_rule(),
        facts in busy_facts(),
        now_hours in -1000i64..1000,
        now_micros in prop_oneof![Just(0i64), Just(1i64), 0i64..3_600_000_000],
    ) {
        let now = hour(now_hours) + TimeDelta::microseconds(now_micros);
        prop_assert_eq!(check(&rule, &AnyCatalog), Ok(()));
        prop_assert_eq!(
            next_change(&rule, &facts, now),
            next_change_by_rescan(&rule, &facts, now),
            "rule: {}", rule
        );
        // One index for both answers, taken from the shared ones on a
        // second call: the same as asking each.
        let mut shared = SharedTimelines::default();
        for _ in 0..2 {
            prop_assert_eq!(
                evaluate_and_next_change(&rule, &facts, now, &mut shared),
                (evaluate(&rule, &facts, now), next_change(&rule, &facts, now)),
                "rule: {}", rule
            );
        }
    }
}

#[test]
fn rules_that_differ_only_in_their_window_share_a_timeline_and_keep_their_answers() {
    let mut f = FactSet::default();
    for i in 0..100 {
        f.touchpoints
            .push(purchase(hour(-240 + i * 24 / 10), 100, "EUR"));
    }
    let now = hour(0);
    let mut shared = SharedTimelines::default();
    for text in [
        "count(purchase, 7d) >= 40",
        "count(purchase, 3d) >= 40",
        "sum(purchase.revenue, 2d) >= 10 EUR",
        "count(purchase where revenue >= 200 EUR, 7d) >= 1",
        "last(purchase, 7d) within 1d",
    ] {
        let rule = compile(text, &AnyCatalog).expect("compiles");
        assert_eq!(
            evaluate_and_next_change(&rule, &f, now, &mut shared),
            (evaluate(&rule, &f, now), next_change(&rule, &f, now)),
            "{text}"
        );
    }
}

#[test]
fn next_change_indexes_a_hundred_touchpoints_exactly() {
    // Ten purchases a day for ten days, each 1 EUR; at least 40 in the last
    // 7 days holds until the 61st oldest leaves.
    let mut f = FactSet::default();
    for i in 0..100 {
        f.touchpoints
            .push(purchase(hour(-240 + i * 24 / 10), 100, "EUR"));
    }
    let now = hour(0);
    for text in [
        "count(purchase, 7d) >= 40",
        "sum(purchase.revenue, 7d) >= 40 EUR",
        "first(purchase, 7d) older_than 6d",
        "last(purchase, 7d) within 1d",
        "count(purchase, 7d) between 10 and 20",
    ] {
        let rule = compile(text, &AnyCatalog).expect("compiles");
        let got = next_change(&rule, &f, now);
        assert_eq!(got, next_change_by_rescan(&rule, &f, now), "{text}");
        let at = got.expect("changes");
        assert_ne!(evaluate(&rule, &f, at), evaluate(&rule, &f, now), "{text}");
        assert_eq!(
            evaluate(&rule, &f, at - TimeDelta::microseconds(1)),
            evaluate(&rule, &f, now),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------- scores

#[test]
fn model_qualified_scores_parse_print_and_check() {
    let rule = parse(r#"score("leads").engagement < 20 and score.fit >= 5"#).expect("parses");
    assert_eq!(
        rule.to_string(),
        r#"score("leads").engagement < 20 and score.fit >= 5"#
    );
    let mut models = std::collections::BTreeMap::new();
    for m in ["leads", "product"] {
        models.insert(m.to_owned(), ["custom_a".to_owned()].into_iter().collect());
    }
    let catalog = FieldCatalog {
        score_models: Some(models),
        ..FieldCatalog::new()
    };
    assert!(compile(r#"score("leads").engagement < 20"#, &catalog).is_ok());
    assert!(compile(r#"score("leads").custom_a < 20"#, &catalog).is_ok());
    let err = compile("score.engagement < 20", &catalog).unwrap_err();
    assert!(
        err.to_string().contains("score.engagement is ambiguous"),
        "{err}"
    );
    assert!(
        err.to_string().contains(r#"score("leads").engagement"#),
        "{err}"
    );
    let err = compile(r#"score("nope").engagement < 20"#, &catalog).unwrap_err();
    assert!(err.to_string().contains("unknown scoring model"), "{err}");
    let err = compile(r#"score("leads").other < 20"#, &catalog).unwrap_err();
    assert!(err.to_string().contains("unknown score"), "{err}");
    // One model defining it: the plain form stands for that model.
    let one = FieldCatalog {
        score_models: Some(
            [("leads".to_owned(), Default::default())]
                .into_iter()
                .collect(),
        ),
        ..FieldCatalog::new()
    };
    assert!(compile("score.engagement < 20", &one).is_ok());
}

#[test]
fn a_decaying_score_changes_the_rule_at_its_crossing() {
    use crate::scoring::{Curve, Decay, Term};
    let now = t(2026, 1, 1, 0);
    let mut f = FactSet::default();
    let curve = Curve {
        terms: vec![Term {
            coef: 40.0,
            since_us: now.timestamp_micros(),
            decay: Decay::Exponential {
                half_life: TimeDelta::days(30),
            },
        }],
        ..Curve::default()
    };
    f.curves.insert(
        ("leads".into(), "engagement".into()),
        (now.timestamp_micros(), curve.clone()),
    );
    let rule = parse("score.engagement < 20").expect("parses");
    assert!(!evaluate(&rule, &f, now));
    let at = next_change(&rule, &f, now).expect("decays below 20");
    assert!(evaluate(&rule, &f, at));
    assert!(!evaluate(&rule, &f, at - TimeDelta::microseconds(1)));
    assert_eq!(
        at.timestamp_micros(),
        curve
            .next_crossing(20.0, false, now.timestamp_micros())
            .expect("crosses")
    );
    // The qualified form reads the same curve; another model's does not.
    let q = parse(r#"score("leads").engagement < 20"#).expect("parses");
    assert_eq!(next_change(&q, &f, now), Some(at));
    let other = parse(r#"score("other").engagement < 20"#).expect("parses");
    assert!(!evaluate(&other, &f, at));
    // `between` changes where the score enters and leaves the range.
    let b = parse("score.engagement between 10 and 30").expect("parses");
    let enter = next_change(&b, &f, now).expect("enters");
    assert!(evaluate(&b, &f, enter) && !evaluate(&b, &f, enter - TimeDelta::microseconds(1)));
    let leave = next_change(&b, &f, enter).expect("leaves");
    assert!(!evaluate(&b, &f, leave) && evaluate(&b, &f, leave - TimeDelta::microseconds(1)));
}

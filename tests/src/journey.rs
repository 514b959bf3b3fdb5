//! The requests the journeys are made of, shared by the end-to-end tests
//! (`e2e/journeys.rs`, `e2e/suite`) and journey 2's benchmark
//! (`src/bin/bench_journey.rs`), so that the benchmark measures the loop
//! the tests check.

use clm_proto::customer as cpb;
use clm_proto::feedback as fpb;
use clm_proto::scoring as spb;
use std::collections::BTreeMap;

/// Scoring model `journey`: engagement +10 a feature use, +50 a purchase,
/// -30 an NPS detractor, +30 an NPS promoter; 30 → ACQUISITION,
/// 70 → CONVERSION.
pub fn engagement_model() -> spb::CreateScoringModelRequest {
    let rule = |id: &str, points: i64, trigger: spb::scoring_rule::Trigger| spb::ScoringRule {
        id: id.into(),
        score: "engagement".into(),
        points,
        trigger: Some(trigger),
        ..Default::default()
    };
    let nps = |category: fpb::NpsCategory| {
        spb::scoring_rule::Trigger::SurveyAnswer(spb::SurveyAnswerTrigger {
            kind: fpb::QuestionKind::Nps as i32,
            nps_category: category as i32,
            ..Default::default()
        })
    };
    let threshold = |id: &str, value: f64, to: cpb::Stage| spb::Threshold {
        id: id.into(),
        score: "engagement".into(),
        value,
        direction: spb::ThresholdDirection::AtOrAbove as i32,
        to_stage: to as i32,
        ..Default::default()
    };
    spb::CreateScoringModelRequest {
        scoring_model: Some(spb::ScoringModel {
            display_name: "journey".into(),
            scores: vec![spb::ScoreDefinition {
                name: "engagement".into(),
                ..Default::default()
            }],
            rules: vec![
                rule(
                    "uses",
                    10,
                    spb::scoring_rule::Trigger::Touchpoint("feature_use".into()),
                ),
                rule(
                    "buys",
                    50,
                    spb::scoring_rule::Trigger::Touchpoint("purchase".into()),
                ),
                rule("detractor", -30, nps(fpb::NpsCategory::Detractor)),
                rule("promoter", 30, nps(fpb::NpsCategory::Promoter)),
            ],
            thresholds: vec![
                threshold("acquired", 30.0, cpb::Stage::Acquisition),
                threshold("converted", 70.0, cpb::Stage::Conversion),
            ],
            ..Default::default()
        }),
        scoring_model_id: "journey".into(),
        request_id: "model-journey".into(),
    }
}

fn texts(t: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("en".to_owned(), t.to_owned())])
}

/// Survey `id` asking NPS (required) and a free-text "why"; no recontact
/// period, so a customer can answer again at once.
pub fn nps_survey(id: &str) -> fpb::CreateSurveyRequest {
    fpb::CreateSurveyRequest {
        survey: Some(fpb::Survey {
            display_name: id.into(),
            questions: vec![
                fpb::Question {
                    id: "nps".into(),
                    kind: fpb::QuestionKind::Nps as i32,
                    text: texts("How likely are you to recommend us?"),
                    required: true,
                    ..Default::default()
                },
                fpb::Question {
                    id: "why".into(),
                    kind: fpb::QuestionKind::OpenText as i32,
                    text: texts("Why?"),
                    ..Default::default()
                },
            ],
            recontact_period: Some(prost_types::Duration::default()),
            ..Default::default()
        }),
        survey_id: id.into(),
        request_id: format!("survey-{id}"),
    }
}

/// Customer `name` consents to surveys in-app.
pub fn survey_consent(name: &str, request_id: String) -> cpb::SetConsentRequest {
    cpb::SetConsentRequest {
        name: name.into(),
        settings: vec![cpb::ConsentSetting {
            purpose: cpb::ConsentPurpose::Surveys as i32,
            channel: cpb::ConsentChannel::InApp as i32,
            state: cpb::ConsentState::Granted as i32,
        }],
        source: cpb::ConsentSource::Api as i32,
        request_id,
    }
}

/// The answers of an NPS survey made by [`nps_survey`]: `nps`, and the
/// comment if any.
pub fn nps_answers(nps: i64, comment: Option<&str>) -> Vec<fpb::Answer> {
    let mut answers = vec![fpb::Answer {
        question: "nps".into(),
        value: Some(fpb::answer::Value::Number(nps)),
        ..Default::default()
    }];
    if let Some(c) = comment {
        answers.push(fpb::Answer {
            question: "why".into(),
            value: Some(fpb::answer::Value::Text(c.into())),
            ..Default::default()
        });
    }
    answers
}

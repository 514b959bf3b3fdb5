//! The feedback benchmark: GetSurveySummary over a survey with many
//! responses, printed beside a same-run `SELECT count(*)` over the
//! responses and the ratio. Ignored by default; run on PostgreSQL with
//!
//! ```sh
//! CLM_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release -p clm-feedback --features bench --test bench -- --ignored --nocapture
//! ```
//!
//! `BENCH_RESPONSES` sets the size (default 1,000,000). The responses are
//! seeded with set-based SQL (three answered questions each: NPS, CSAT,
//! CES; one in ten partial, one in three skipping CES), then summarised
//! through gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::testing::{TestBackend, start};
use clm_proto::feedback as pb;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use sea_orm::{ConnectionTrait, Statement};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn responses() -> i64 {
    std::env::var("BENCH_RESPONSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn question(id: &str, kind: pb::QuestionKind) -> pb::Question {
    pb::Question {
        id: id.into(),
        kind: kind as i32,
        text: BTreeMap::from([("en".to_owned(), id.to_owned())]),
        ..Default::default()
    }
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored on PostgreSQL"]
async fn survey_summary_over_a_million_responses() {
    let backend = TestBackend::migrated::<clm_feedback::store::Migrator>().await;
    if !backend.is_postgres() {
        eprintln!("the summary benchmark seeds with generate_series: set CLM_TEST_DATABASE_URL");
        return;
    }
    // Feedback follows the customer stream: a customer service beside it.
    let customer_backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let customer = start(
        &clm_customer::DESCRIPTOR,
        customer_backend.config("customer"),
    )
    .await;
    let mut config = backend.config("feedback");
    config.peers.insert("customer".into(), customer.url());
    let running = start(&clm_feedback::DESCRIPTOR, config).await;
    let mut fb = FeedbackServiceClient::new(running.channel());
    let s = fb
        .create_survey(pb::CreateSurveyRequest {
            survey: Some(pb::Survey {
                display_name: "bench".into(),
                questions: vec![
                    question("nps", pb::QuestionKind::Nps),
                    question("csat", pb::QuestionKind::Csat),
                    question("ces", pb::QuestionKind::Ces),
                ],
                ..Default::default()
            }),
            survey_id: "bench".into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let n = responses();
    let db = clm_platform::db::connect(&backend.config("feedback").database)
        .await
        .unwrap();
    let t = Instant::now();
    let seed = [
        "INSERT INTO invitations (id, survey_id, customer, channel, language, state, survey_version, create_us, expire_us, response_id) \
         SELECT 'i' || g, 'bench', 'customers/c' || g, 1, 'en', 3, 1, 1800000000000000 + g * 1000, 1900000000000000, 'r' || g FROM generate_series(1, $1) g",
        "INSERT INTO responses (survey_id, id, invitation_id, customer, survey_version, completed, stage, create_us, update_us, complete_us) \
         SELECT 'bench', 'r' || g, 'i' || g, 'customers/c' || g, 1, g % 10 <> 0, g % 6 + 1, 1800000000000000 + g * 1000, 1800000000000000 + g * 1000, \
         CASE WHEN g % 10 <> 0 THEN 1800000000000000 + g * 1000 END FROM generate_series(1, $1) g",
        "INSERT INTO answers (survey_id, response_id, question, position, kind, answered, dropped, number, survey_version, completed, stage, at_us) \
         SELECT 'bench', 'r' || g, 'nps', 0, 1, true, false, g % 11, 1, g % 10 <> 0, g % 6 + 1, 1800000000000000 + g * 1000 FROM generate_series(1, $1) g",
        "INSERT INTO answers (survey_id, response_id, question, position, kind, answered, dropped, number, survey_version, completed, stage, at_us) \
         SELECT 'bench', 'r' || g, 'csat', 1, 2, g % 10 <> 0, g % 10 = 0, CASE WHEN g % 10 <> 0 THEN g % 5 + 1 END, 1, g % 10 <> 0, g % 6 + 1, 1800000000000000 + g * 1000 \
         FROM generate_series(1, $1) g",
        "INSERT INTO answers (survey_id, response_id, question, position, kind, answered, dropped, number, survey_version, completed, stage, at_us) \
         SELECT 'bench', 'r' || g, 'ces', 2, 3, g % 3 <> 0, false, CASE WHEN g % 3 <> 0 THEN g % 7 + 1 END, 1, true, g % 6 + 1, 1800000000000000 + g * 1000 \
         FROM generate_series(1, $1) g WHERE g % 10 <> 0",
        "ANALYZE",
    ];
    for sql in seed {
        let values: Vec<sea_orm::Value> = if sql.contains("$1") {
            vec![n.into()]
        } else {
            vec![]
        };
        db.execute_raw(Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            sql,
            values,
        ))
        .await
        .unwrap();
    }
    eprintln!("seeded {n} responses in {:.1?}", t.elapsed());
    let mut summary = Vec::new();
    let mut count = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let t = Instant::now();
        let r = db
            .query_one_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM responses WHERE survey_id = 'bench'",
            ))
            .await
            .unwrap()
            .unwrap();
        count.push(t.elapsed());
        assert_eq!(r.try_get::<i64>("", "n").unwrap(), n);
        let t = Instant::now();
        let s = fb
            .get_survey_summary(pb::GetSurveySummaryRequest {
                survey: s.name.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        summary.push(t.elapsed());
        last = Some(s);
    }
    let s = last.unwrap();
    assert_eq!(s.responses, n);
    assert_eq!(
        s.nps.as_ref().unwrap().promoters
            + s.nps.as_ref().unwrap().passives
            + s.nps.as_ref().unwrap().detractors,
        n
    );
    let (sm, cm) = (median(summary), median(count));
    println!(
        "GetSurveySummary over {n} responses: {:.0} ms (median of 5); SELECT count(*) over them: {:.0} ms; ratio {:.1}x",
        sm.as_secs_f64() * 1e3,
        cm.as_secs_f64() * 1e3,
        sm.as_secs_f64() / cm.as_secs_f64()
    );
    running.stop().await;
    customer.stop().await;
}

//! The summary queries: aggregates computed by the database over the
//! answer rows (one scan of one survey's rows per query, grouped), never
//! responses loaded into memory. Every query takes the same filters.

use super::entity::answer_choices::{Column as CC, Entity as Choices};
use super::entity::answers::{Column as AC, Entity as Answers};
use super::entity::invitations::{Column as IC, Entity as Invitations};
use super::entity::response_segments::{Column as SC, Entity as Segments};
use super::entity::responses::{Column as RC, Entity as Responses};
use super::n;
use clm_domain::survey::Kind;
use clm_platform::Result;
use sea_orm::sea_query::{Expr, ExprTrait, IntoIden, Query, SelectStatement, SimpleExpr};
use sea_orm::{ConnectionTrait, FromQueryResult, IdenStatic};

/// Which responses a summary covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The survey.
    pub survey: String,
    /// One version, or every version (0).
    pub version: i64,
    /// Last answered at or after (µs).
    pub start_us: Option<i64>,
    /// Last answered before (µs).
    pub end_us: Option<i64>,
    /// Stage at the time (`Stage::code`).
    pub stage: Option<i16>,
    /// In this segment at completion (`segments/{id}`).
    pub segment: Option<String>,
    /// Completed responses only.
    pub completed_only: bool,
}

/// The filter columns of one table.
struct Cols<T: IntoIden + Copy> {
    table: T,
    survey: &'static str,
    response: &'static str,
    version: &'static str,
    completed: &'static str,
    stage: &'static str,
    at: &'static str,
}

fn col<T: IntoIden + Copy>(t: T, c: &'static str) -> Expr {
    Expr::col((t, n(c)))
}

fn apply<T: IntoIden + Copy + 'static>(q: &mut SelectStatement, f: &Filter, c: &Cols<T>) {
    q.and_where(col(c.table, c.survey).eq(f.survey.clone()));
    if f.version != 0 {
        q.and_where(col(c.table, c.version).eq(f.version));
    }
    if let Some(s) = f.start_us {
        q.and_where(col(c.table, c.at).gte(s));
    }
    if let Some(e) = f.end_us {
        q.and_where(col(c.table, c.at).lt(e));
    }
    if let Some(s) = f.stage {
        q.and_where(col(c.table, c.stage).eq(s));
    }
    if f.completed_only {
        q.and_where(col(c.table, c.completed).eq(true));
    }
    if let Some(seg) = &f.segment {
        let inner = Query::select()
            .expr(Expr::val(1))
            .from(Segments)
            .and_where(Expr::col((Segments, SC::SurveyId)).equals((c.table, n(c.survey))))
            .and_where(Expr::col((Segments, SC::ResponseId)).equals((c.table, n(c.response))))
            .and_where(Expr::col((Segments, SC::Segment)).eq(seg.clone()))
            .to_owned();
        q.and_where(Expr::exists(inner));
    }
}

fn answer_cols() -> Cols<Answers> {
    Cols {
        table: Answers,
        survey: AC::SurveyId.as_str(),
        response: AC::ResponseId.as_str(),
        version: AC::SurveyVersion.as_str(),
        completed: AC::Completed.as_str(),
        stage: AC::Stage.as_str(),
        at: AC::AtUs.as_str(),
    }
}

fn count_if(cond: &str) -> SimpleExpr {
    Expr::cust(format!("COUNT(CASE WHEN {cond} THEN 1 END)"))
}

/// The answer rows of one (version, position, kind, value) cell, or, in
/// the trend, of one (bucket, kind, value) cell of answered rows.
#[derive(Debug, Clone, Default, FromQueryResult)]
pub struct Cell {
    /// Survey version (0 in the trend).
    pub survey_version: i64,
    /// Position of the question in that version (0 in the trend).
    pub position: i32,
    /// Bucket start (µs; trend only, else 0).
    pub bucket: i64,
    /// `Kind::code`.
    pub kind: i16,
    /// The numeric answer; none for unanswered and non-numeric rows.
    pub number: Option<i64>,
    /// Rows: responses shown the question with this answer.
    pub shown: i64,
    /// Of those, answered.
    pub answered: i64,
    /// Of those, stopped at it.
    pub dropped: i64,
}

/// One grouped scan of the answer rows: every (version, position, kind,
/// number) with its shown, answered and dropped counts. Integer keys only
/// (hashing question ids costs more than the scan); the question ids, the
/// classes, sums and distributions are derived from these few rows.
pub async fn cells(db: &impl ConnectionTrait, f: &Filter) -> Result<Vec<Cell>> {
    let mut q = Query::select();
    q.column(AC::SurveyVersion)
        .column(AC::Position)
        .expr_as(Expr::cust("CAST(0 AS BIGINT)"), n("bucket"))
        .column(AC::Kind)
        .column(AC::Number)
        .expr_as(Expr::cust("COUNT(*)"), n("shown"))
        .expr_as(count_if(AC::Answered.as_str()), n("answered"))
        .expr_as(count_if(AC::Dropped.as_str()), n("dropped"))
        .from(Answers);
    apply(&mut q, f, &answer_cols());
    q.group_by_col(AC::SurveyVersion)
        .group_by_col(AC::Position)
        .group_by_col(AC::Kind)
        .group_by_col(AC::Number);
    Ok(Cell::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?)
}

/// The answered NPS, CSAT and CES rows per bucket of `bucket_us`, kind and value.
pub async fn trend(db: &impl ConnectionTrait, f: &Filter, bucket_us: i64) -> Result<Vec<Cell>> {
    let at = AC::AtUs.as_str();
    let bucket = format!("(({at} / {bucket_us}) * {bucket_us})");
    let mut q = Query::select();
    q.expr_as(Expr::cust("CAST(0 AS BIGINT)"), n("survey_version"))
        .expr_as(Expr::cust("0"), n("position"))
        .expr_as(Expr::cust(bucket.clone()), n("bucket"))
        .column(AC::Kind)
        .column(AC::Number)
        .expr_as(Expr::cust("COUNT(*)"), n("shown"))
        .expr_as(Expr::cust("COUNT(*)"), n("answered"))
        .expr_as(Expr::cust("CAST(0 AS BIGINT)"), n("dropped"))
        .from(Answers);
    apply(&mut q, f, &answer_cols());
    q.and_where(Expr::col(AC::Answered).eq(true))
        .and_where(Expr::col(AC::Kind).is_in([
            Kind::Nps.code(),
            Kind::Csat.code(),
            Kind::Ces.code(),
        ]))
        .add_group_by([
            Expr::cust(bucket),
            Expr::col(AC::Kind).into(),
            Expr::col(AC::Number).into(),
        ]);
    Ok(Cell::find_by_statement(db.get_database_backend().build(&q))
        .all(db)
        .await?)
}

/// How many answers picked one choice of one question.
#[derive(Debug, Clone, FromQueryResult)]
pub struct ChoiceCount {
    /// The question id.
    pub question: String,
    /// The choice id.
    pub choice: String,
    /// How many.
    pub n: i64,
}

/// Answers per choice, per question.
pub async fn choices(db: &impl ConnectionTrait, f: &Filter) -> Result<Vec<ChoiceCount>> {
    let mut q = Query::select();
    q.column(CC::Question)
        .column(CC::Choice)
        .expr_as(Expr::cust("COUNT(*)"), n("n"))
        .from(Choices);
    apply(
        &mut q,
        f,
        &Cols {
            table: Choices,
            survey: CC::SurveyId.as_str(),
            response: CC::ResponseId.as_str(),
            version: CC::SurveyVersion.as_str(),
            completed: CC::Completed.as_str(),
            stage: CC::Stage.as_str(),
            at: CC::AtUs.as_str(),
        },
    );
    q.group_by_col(CC::Question).group_by_col(CC::Choice);
    Ok(
        ChoiceCount::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// Responses per bucket (`bucket` 0 without a trend).
#[derive(Debug, Clone, FromQueryResult)]
pub struct ResponseCount {
    /// Bucket start (µs), 0 for the total.
    pub bucket: i64,
    /// Responses.
    pub responses: i64,
    /// Completed.
    pub completed: i64,
}

/// Responses and completed responses, in total or per bucket.
pub async fn responses(
    db: &impl ConnectionTrait,
    f: &Filter,
    bucket_us: Option<i64>,
) -> Result<Vec<ResponseCount>> {
    let at = RC::UpdateUs.as_str();
    let bucket = bucket_us.map_or_else(
        || "CAST(0 AS BIGINT)".to_owned(),
        |b| format!("(({at} / {b}) * {b})"),
    );
    let mut q = Query::select();
    q.expr_as(Expr::cust(bucket.clone()), n("bucket"))
        .expr_as(Expr::cust("COUNT(*)"), n("responses"))
        .expr_as(count_if(RC::Completed.as_str()), n("completed"))
        .from(Responses);
    apply(
        &mut q,
        f,
        &Cols {
            table: Responses,
            survey: RC::SurveyId.as_str(),
            response: RC::Id.as_str(),
            version: RC::SurveyVersion.as_str(),
            completed: RC::Completed.as_str(),
            stage: RC::Stage.as_str(),
            at: RC::UpdateUs.as_str(),
        },
    );
    if bucket_us.is_some() {
        q.add_group_by([Expr::cust(bucket)]);
    }
    Ok(
        ResponseCount::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// Invitations made to the survey (version and period filters only).
pub async fn invitations(db: &impl ConnectionTrait, f: &Filter) -> Result<i64> {
    let mut q = Query::select();
    q.expr_as(Expr::cust("COUNT(*)"), n("n"))
        .from(Invitations)
        .and_where(Expr::col(IC::SurveyId).eq(f.survey.clone()));
    if f.version != 0 {
        q.and_where(Expr::col(IC::SurveyVersion).eq(f.version));
    }
    if let Some(s) = f.start_us {
        q.and_where(Expr::col(IC::CreateUs).gte(s));
    }
    if let Some(e) = f.end_us {
        q.and_where(Expr::col(IC::CreateUs).lt(e));
    }
    let row = db.query_one(&q).await?;
    Ok(match row {
        Some(r) => r.try_get("", "n")?,
        None => 0,
    })
}

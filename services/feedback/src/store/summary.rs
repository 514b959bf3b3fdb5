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

fn count_if(cond: String) -> SimpleExpr {
    Expr::cust(format!(
        "CAST(SUM(CASE WHEN {cond} THEN 1 ELSE 0 END) AS BIGINT)"
    ))
}

fn between(kind: Kind, lo: i64, hi: i64) -> String {
    format!(
        "{k} = {code} AND {num} BETWEEN {lo} AND {hi}",
        k = AC::Kind.as_str(),
        code = kind.code(),
        num = AC::Number.as_str()
    )
}

/// The aggregates of one question (or, in the trend, of one kind in one bucket).
#[derive(Debug, Clone, Default, FromQueryResult)]
pub struct QuestionRow {
    /// The question id (empty in the trend).
    pub question: String,
    /// `Kind::code`.
    pub kind: i16,
    /// Its first position.
    pub position: i32,
    /// Bucket start (µs; trend only).
    pub bucket: i64,
    /// Rows: responses shown it.
    pub shown: i64,
    /// Answered.
    pub answered: i64,
    /// Stopped at it.
    pub dropped: i64,
    /// Sum of numeric answers.
    pub num_sum: i64,
    /// Count of numeric answers.
    pub num_count: i64,
    /// NPS 9..10.
    pub promoters: i64,
    /// NPS 7..8.
    pub passives: i64,
    /// NPS 0..6.
    pub detractors: i64,
    /// CSAT 4..5.
    pub satisfied: i64,
}

fn aggregates(q: &mut SelectStatement) {
    let answered = AC::Answered.as_str();
    let dropped = AC::Dropped.as_str();
    let num = AC::Number.as_str();
    q.expr_as(Expr::cust("COUNT(*)"), n("shown"))
        .expr_as(count_if(answered.to_owned()), n("answered"))
        .expr_as(count_if(dropped.to_owned()), n("dropped"))
        .expr_as(
            Expr::cust(format!("CAST(COALESCE(SUM({num}), 0) AS BIGINT)")),
            n("num_sum"),
        )
        .expr_as(Expr::cust(format!("COUNT({num})")), n("num_count"))
        .expr_as(count_if(between(Kind::Nps, 9, 10)), n("promoters"))
        .expr_as(count_if(between(Kind::Nps, 7, 8)), n("passives"))
        .expr_as(count_if(between(Kind::Nps, 0, 6)), n("detractors"))
        .expr_as(count_if(between(Kind::Csat, 4, 5)), n("satisfied"));
}

/// Per question: shown, answered, dropped, sums and classes.
pub async fn questions(db: &impl ConnectionTrait, f: &Filter) -> Result<Vec<QuestionRow>> {
    let mut q = Query::select();
    q.column(AC::Question)
        .column(AC::Kind)
        .expr_as(Expr::col(AC::Position).min(), n("position"))
        .expr_as(Expr::val(0i64), n("bucket"))
        .from(Answers);
    aggregates(&mut q);
    apply(&mut q, f, &answer_cols());
    q.group_by_col(AC::Question).group_by_col(AC::Kind);
    Ok(
        QuestionRow::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// Per bucket of `bucket_us` and NPS/CSAT/CES kind: the answered rows'
/// aggregates.
pub async fn trend(
    db: &impl ConnectionTrait,
    f: &Filter,
    bucket_us: i64,
) -> Result<Vec<QuestionRow>> {
    let at = AC::AtUs.as_str();
    let bucket = format!("(({at} / {bucket_us}) * {bucket_us})");
    let mut q = Query::select();
    q.expr_as(Expr::val(""), n("question"))
        .column(AC::Kind)
        .expr_as(Expr::val(0i32), n("position"))
        .expr_as(Expr::cust(bucket.clone()), n("bucket"))
        .from(Answers);
    aggregates(&mut q);
    apply(&mut q, f, &answer_cols());
    q.and_where(Expr::col(AC::Answered).eq(true))
        .and_where(Expr::col(AC::Kind).is_in([
            Kind::Nps.code(),
            Kind::Csat.code(),
            Kind::Ces.code(),
        ]))
        .add_group_by([Expr::cust(bucket), Expr::col(AC::Kind)]);
    Ok(
        QuestionRow::find_by_statement(db.get_database_backend().build(&q))
            .all(db)
            .await?,
    )
}

/// How many answers hold one value of one question.
#[derive(Debug, Clone, FromQueryResult)]
pub struct ValueRow {
    /// The question id.
    pub question: String,
    /// The value: a number as text, or a choice id.
    pub value: String,
    /// How many.
    pub n: i64,
}

/// Answers per value: numbers and choices.
pub async fn distribution(db: &impl ConnectionTrait, f: &Filter) -> Result<Vec<ValueRow>> {
    let backend = db.get_database_backend();
    let mut q = Query::select();
    q.column(AC::Question)
        .expr_as(
            Expr::cust(format!("CAST({} AS TEXT)", AC::Number.as_str())),
            n("value"),
        )
        .expr_as(Expr::cust("COUNT(*)"), n("n"))
        .from(Answers);
    apply(&mut q, f, &answer_cols());
    q.and_where(Expr::col(AC::Number).is_not_null())
        .group_by_col(AC::Question)
        .group_by_col(AC::Number);
    let mut out = ValueRow::find_by_statement(backend.build(&q))
        .all(db)
        .await?;
    let mut q = Query::select();
    q.column(CC::Question)
        .expr_as(Expr::col(CC::Choice), n("value"))
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
    out.extend(
        ValueRow::find_by_statement(backend.build(&q))
            .all(db)
            .await?,
    );
    Ok(out)
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
        .expr_as(count_if(RC::Completed.as_str().to_owned()), n("completed"))
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

//! `responses`, `answers`, `answer_choices` and `response_segments`. A
//! response's answer rows are rewritten with the response on each
//! submission (a few rows), carrying the response's filter columns so a
//! summary reads one table.

use super::entity::answer_choices::{self, Column as CC, Entity as Choices};
use super::entity::answers::{self, Column as AC, Entity as Answers};
use super::entity::response_segments::{self, Entity as Segments};
use super::entity::responses::{self, Column as RC, Entity as Responses};
use clm_platform::Result;
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

pub use answer_choices::Model as ChoiceRow;
pub use answers::Model as AnswerRow;
pub use responses::Model as Row;

/// Response `id` of survey `survey`.
pub async fn get(db: &impl ConnectionTrait, survey: &str, id: &str) -> Result<Option<Row>> {
    Ok(Responses::find_by_id((survey.to_owned(), id.to_owned()))
        .one(db)
        .await?)
}

/// The response to invitation `invitation`, if any.
pub async fn of_invitation(db: &impl ConnectionTrait, invitation: &str) -> Result<Option<Row>> {
    Ok(Responses::find()
        .filter(RC::InvitationId.eq(invitation))
        .one(db)
        .await?)
}

/// Writes a response row (insert or replace).
pub async fn put(db: &impl ConnectionTrait, row: Row) -> Result<()> {
    Responses::insert(responses::ActiveModel::from(row))
        .on_conflict(
            OnConflict::columns([RC::SurveyId, RC::Id])
                .update_columns([
                    RC::Completed,
                    RC::Stage,
                    RC::UpdateUs,
                    RC::CompleteUs,
                    RC::LastRequest,
                ])
                .to_owned(),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// The answer rows of responses `ids` of survey `survey`, by position.
pub async fn answers(
    db: &impl ConnectionTrait,
    survey: &str,
    ids: &[String],
) -> Result<(Vec<AnswerRow>, Vec<ChoiceRow>)> {
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let a = Answers::find()
        .filter(AC::SurveyId.eq(survey))
        .filter(AC::ResponseId.is_in(ids.iter().cloned()))
        .order_by_asc(AC::ResponseId)
        .order_by_asc(AC::Position)
        .all(db)
        .await?;
    let c = Choices::find()
        .filter(CC::SurveyId.eq(survey))
        .filter(CC::ResponseId.is_in(ids.iter().cloned()))
        .all(db)
        .await?;
    Ok((a, c))
}

/// Replaces the answer rows of response `id` of survey `survey`.
pub async fn rewrite_answers(
    db: &impl ConnectionTrait,
    survey: &str,
    id: &str,
    rows: Vec<AnswerRow>,
    choices: Vec<ChoiceRow>,
) -> Result<()> {
    Answers::delete_many()
        .filter(AC::SurveyId.eq(survey))
        .filter(AC::ResponseId.eq(id))
        .exec(db)
        .await?;
    Choices::delete_many()
        .filter(CC::SurveyId.eq(survey))
        .filter(CC::ResponseId.eq(id))
        .exec(db)
        .await?;
    if !rows.is_empty() {
        Answers::insert_many(rows.into_iter().map(answers::ActiveModel::from))
            .exec(db)
            .await?;
    }
    if !choices.is_empty() {
        Choices::insert_many(choices.into_iter().map(answer_choices::ActiveModel::from))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Records the segments the customer was in when response `id` completed.
pub async fn set_segments(
    db: &impl ConnectionTrait,
    survey: &str,
    id: &str,
    segments: &[String],
) -> Result<()> {
    if segments.is_empty() {
        return Ok(());
    }
    for part in segments.chunks(super::chunk(3)) {
        Segments::insert_many(part.iter().map(|s| response_segments::ActiveModel {
            survey_id: sea_orm::Set(survey.to_owned()),
            segment: sea_orm::Set(s.clone()),
            response_id: sea_orm::Set(id.to_owned()),
        }))
        .on_conflict_do_nothing()
        .exec(db)
        .await?;
    }
    Ok(())
}

/// A page of survey `survey`'s responses, oldest first, after
/// `(create_us, id)`.
pub async fn list(
    db: &impl ConnectionTrait,
    survey: &str,
    completed_only: bool,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<Row>> {
    let mut q = Responses::find().filter(RC::SurveyId.eq(survey));
    if completed_only {
        q = q.filter(RC::Completed.eq(true));
    }
    if let Some((us, id)) = after {
        q = q.filter(
            Condition::any()
                .add(RC::CreateUs.gt(us))
                .add(RC::CreateUs.eq(us).and(RC::Id.gt(id))),
        );
    }
    Ok(q.order_by_asc(RC::CreateUs)
        .order_by_asc(RC::Id)
        .limit(limit)
        .all(db)
        .await?)
}

/// Moves the responses of `merged` customers to `survivor`.
pub async fn reassign(db: &impl ConnectionTrait, merged: &[String], survivor: &str) -> Result<()> {
    let q = Query::update()
        .table(Responses)
        .value(RC::Customer, survivor.to_owned())
        .and_where(Expr::col(RC::Customer).is_in(merged.iter().cloned()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// Erases `customers` from their responses: open-text answers are deleted
/// and the responses are no longer linked to anyone (their numbers stay
/// in the summaries, anonymous). Two statements.
pub async fn erase(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    let theirs = Query::select()
        .column(RC::Id)
        .from(Responses)
        .and_where(Expr::col(RC::Customer).is_in(customers.iter().cloned()))
        .and_where(Expr::col((Responses, RC::SurveyId)).equals((Answers, AC::SurveyId)))
        .to_owned();
    let q = Query::update()
        .table(Answers)
        .value(AC::AnswerText, Option::<String>::None)
        .and_where(Expr::col(AC::AnswerText).is_not_null())
        .and_where(Expr::col((Answers, AC::ResponseId)).in_subquery(theirs))
        .to_owned();
    db.execute(&q).await?;
    let q = Query::update()
        .table(Responses)
        .value(RC::Customer, Option::<String>::None)
        .value(RC::LastRequest, Option::<Vec<u8>>::None)
        .and_where(Expr::col(RC::Customer).is_in(customers.iter().cloned()))
        .to_owned();
    db.execute(&q).await?;
    Ok(())
}

/// A customer's last NPS and CSAT answers, each `(value, at_us)`, and the
/// number of responses they completed: two statements over the
/// customer's own responses (`responses_by_customer`).
pub async fn customer_feedback(
    db: &impl ConnectionTrait,
    customer: &str,
) -> Result<(Option<(i64, i64)>, Option<(i64, i64)>, i64)> {
    use clm_domain::survey::Kind;
    use sea_orm::sea_query::{Alias, Order};
    let q = Query::select()
        .columns([
            (Answers, AC::Kind),
            (Answers, AC::Number),
            (Answers, AC::AtUs),
        ])
        .from(Answers)
        .inner_join(
            Responses,
            Expr::col((Responses, RC::SurveyId))
                .equals((Answers, AC::SurveyId))
                .and(Expr::col((Responses, RC::Id)).equals((Answers, AC::ResponseId))),
        )
        .and_where(Expr::col((Responses, RC::Customer)).eq(customer))
        .and_where(Expr::col((Responses, RC::Completed)).eq(true))
        .and_where(Expr::col((Answers, AC::Answered)).eq(true))
        .and_where(Expr::col((Answers, AC::Number)).is_not_null())
        .and_where(Expr::col((Answers, AC::Kind)).is_in([Kind::Nps.code(), Kind::Csat.code()]))
        .order_by((Answers, AC::AtUs), Order::Desc)
        .to_owned();
    let (mut nps, mut csat) = (None, None);
    for r in db.query_all(&q).await? {
        let kind: i16 = r.try_get("", "kind")?;
        let value: i64 = r.try_get("", "number")?;
        let at: i64 = r.try_get("", "at_us")?;
        let slot = if kind == Kind::Nps.code() {
            &mut nps
        } else {
            &mut csat
        };
        slot.get_or_insert((value, at));
    }
    let count = Query::select()
        .expr_as(Expr::col(RC::Id).count(), Alias::new("n"))
        .from(Responses)
        .and_where(Expr::col(RC::Customer).eq(customer))
        .and_where(Expr::col(RC::Completed).eq(true))
        .to_owned();
    let n = match db.query_one(&count).await? {
        Some(r) => r.try_get::<i64>("", "n")?,
        None => 0,
    };
    Ok((nps, csat, n))
}

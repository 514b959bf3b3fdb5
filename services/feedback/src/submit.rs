//! `SubmitResponse`: answers merged into a response, checked against the
//! survey version the invitation was made for, display conditions applied,
//! completion when asked and every required question shown is answered.
//!
//! Idempotency is by the response id: a submission identical to the last
//! one answers the stored response without writing (a retried page); a
//! completed response refuses any other change. One response per
//! invitation. Locks, in this order: the survey row (shared; exclusive when
//! completing, where the response limit is counted), then the invitation.

use crate::convert;
use crate::error::{FeedbackError, state_name};
use crate::store::surveys::{self, Lock};
use crate::store::{customers, invitations, responses};
use clm_domain::survey::{self, Question, Value};
use clm_domain::{Violation, Violations};
use clm_platform::audit::{self, Change};
use clm_platform::convert::timestamp;
use clm_platform::db::from_micros;
use clm_platform::outbox::NewEvent;
use clm_platform::timers;
use clm_platform::{Error, Result, Runtime, idempotency};
use clm_proto::feedback as pb;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Most answers in one submission.
pub const MAX_ANSWERS: usize = survey::MAX_QUESTIONS;

/// The parsed request.
struct Parsed {
    survey: String,
    response: String,
    invitation: String,
}

fn parse(req: &pb::SubmitResponseRequest) -> Result<Parsed> {
    let mut v = Violations::new();
    let name = v.check("", convert::child("name", &req.name, "responses"));
    let inv = v.check(
        "",
        convert::child("invitation", &req.invitation, "invitations"),
    );
    if req.answers.is_empty() && !req.finish {
        v.push(Violation::new(
            "answers",
            "must hold an answer (or set finish)",
        ));
    }
    if req.answers.len() > MAX_ANSWERS {
        v.push(Violation::new(
            "answers",
            format!("must hold at most {MAX_ANSWERS} answers"),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, a) in req.answers.iter().enumerate() {
        if a.question.is_empty() {
            v.push(Violation::new(
                format!("answers[{i}].question"),
                "is required",
            ));
        } else if !seen.insert(a.question.as_str()) {
            v.push(Violation::new(
                format!("answers[{i}].question"),
                "is answered twice in this submission",
            ));
        }
    }
    v.into_result()?;
    let (Some((survey, response)), Some((inv_survey, invitation))) = (name, inv) else {
        return Err(Error::internal("parsed names missing"));
    };
    if survey != inv_survey {
        return Err(Error::invalid(
            "invitation",
            "belongs to another survey than the response",
        ));
    }
    Ok(Parsed {
        survey,
        response,
        invitation,
    })
}

fn fingerprint(req: &pb::SubmitResponseRequest) -> Vec<u8> {
    Sha256::digest(prost::Message::encode_to_vec(req)).to_vec()
}

/// The answers stored for a response, by question index of `questions`.
fn stored_answers(
    questions: &[Question],
    rows: &[responses::AnswerRow],
    choices: &[responses::ChoiceRow],
) -> BTreeMap<usize, Value> {
    let index: BTreeMap<&str, usize> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.id.as_str(), i))
        .collect();
    let mut out = BTreeMap::new();
    for r in rows.iter().filter(|r| r.answered) {
        let Some(&i) = index.get(r.question.as_str()) else {
            continue;
        };
        let value = match questions[i].kind {
            k if k.is_numeric() => r.number.map(Value::Number),
            k if k.is_choice() => Some(in_question_order(
                &questions[i],
                choices
                    .iter()
                    .filter(|c| c.question == r.question)
                    .map(|c| c.choice.clone())
                    .collect(),
            )),
            _ => r.answer_text.clone().map(Value::Text),
        };
        if let Some(v) = value {
            out.insert(i, v);
        }
    }
    out
}

/// Picked choices in the order the question lists them, however they
/// were sent or stored.
fn in_question_order(q: &Question, mut picked: Vec<String>) -> Value {
    picked.sort_by_key(|c| q.choices.iter().position(|x| x == c));
    Value::Choices(picked)
}

/// A response as answered.
pub fn to_proto(
    row: &responses::Row,
    questions: &[Question],
    answers: &BTreeMap<usize, Value>,
) -> pb::Response {
    pb::Response {
        name: format!("surveys/{}/responses/{}", row.survey_id, row.id),
        invitation: format!(
            "surveys/{}/invitations/{}",
            row.survey_id, row.invitation_id
        ),
        customer: row.customer.clone().unwrap_or_default(),
        survey_version: row.survey_version,
        answers: answers
            .iter()
            .map(|(i, v)| convert::answer_to_proto(&questions[*i], v))
            .collect(),
        completed: row.completed,
        stage: i32::from(row.stage),
        create_time: Some(timestamp(from_micros(row.create_us))),
        update_time: Some(timestamp(from_micros(row.update_us))),
        complete_time: row.complete_us.map(|us| timestamp(from_micros(us))),
    }
}

/// Responses `rows` of one survey as answered, their answers read in two
/// queries for the whole page.
pub async fn page_to_proto(
    db: &impl sea_orm::ConnectionTrait,
    survey: &str,
    rows: &[responses::Row],
) -> Result<Vec<pb::Response>> {
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let (answers, choices) = responses::answers(db, survey, &ids).await?;
    let mut versions: BTreeMap<i64, Vec<Question>> = BTreeMap::new();
    for r in rows {
        if let std::collections::btree_map::Entry::Vacant(e) = versions.entry(r.survey_version) {
            let body = surveys::body(db, survey, r.survey_version)
                .await?
                .ok_or_else(|| Error::internal("a response's survey version is missing"))?;
            e.insert(convert::questions(&body));
        }
    }
    Ok(rows
        .iter()
        .map(|r| {
            let qs = &versions[&r.survey_version];
            let a: Vec<_> = answers
                .iter()
                .filter(|a| a.response_id == r.id)
                .cloned()
                .collect();
            let c: Vec<_> = choices
                .iter()
                .filter(|c| c.response_id == r.id)
                .cloned()
                .collect();
            to_proto(r, qs, &stored_answers(qs, &a, &c))
        })
        .collect())
}

/// A classified answer, as `ResponseCompleted` carries it.
fn classified(q: &Question, v: &Value) -> pb::ClassifiedAnswer {
    let mut a = pb::ClassifiedAnswer {
        question: q.id.clone(),
        kind: convert::kind_to_proto(q.kind) as i32,
        ..Default::default()
    };
    match v {
        Value::Number(n) => {
            a.number = Some(*n);
            a.nps_category = convert::nps_category(q.kind, *n) as i32;
            a.satisfaction = convert::satisfaction(q.kind, *n) as i32;
        }
        Value::Choices(c) => a.choices.clone_from(c),
        Value::Text(_) => {}
    }
    a
}

/// Runs a submission.
pub async fn submit(rt: &Runtime, req: pb::SubmitResponseRequest) -> Result<pb::Response> {
    let p = parse(&req)?;
    let now = clm_domain::clock::micros(rt.clock.now());
    let now_us = clm_platform::db::to_micros(now);
    let print = fingerprint(&req);
    // Segments at completion are asked before the transaction opens.
    let segments = if req.finish {
        match invitations::get(&rt.read, &p.survey, &p.invitation, false).await? {
            Some(inv) => crate::segments::of_customer(rt, &inv.customer).await,
            None => Vec::new(),
        }
    } else {
        Vec::new()
    };
    let out = idempotency::write(rt, "SubmitResponse", None, &req, now, async |txn| {
        let lock = if req.finish {
            Lock::Update
        } else {
            Lock::Share
        };
        let row = surveys::row(txn, &p.survey, lock)
            .await?
            .ok_or_else(|| Error::NotFound(format!("surveys/{}", p.survey)))?;
        let inv = invitations::get(txn, &p.survey, &p.invitation, true)
            .await?
            .ok_or_else(|| Error::NotFound(req.invitation.clone()))?;
        let existing = responses::get(txn, &p.survey, &p.response).await?;
        match &existing {
            Some(r) if r.invitation_id != p.invitation => {
                return Err(FeedbackError::ResponseTaken(format!(
                    "{} answers another invitation",
                    req.name
                ))
                .into());
            }
            None => {
                if let Some(other) = responses::of_invitation(txn, &p.invitation).await? {
                    return Err(FeedbackError::ResponseTaken(format!(
                        "{} already has response surveys/{}/responses/{}",
                        req.invitation, p.survey, other.id
                    ))
                    .into());
                }
            }
            Some(_) => {}
        }
        let body = surveys::body(txn, &p.survey, inv.survey_version)
            .await?
            .ok_or_else(|| Error::internal("an invitation's survey version is missing"))?;
        let questions = convert::questions(&body);
        let (rows, choices) = match &existing {
            Some(r) => responses::answers(txn, &p.survey, std::slice::from_ref(&r.id)).await?,
            None => Default::default(),
        };
        let mut answers = stored_answers(&questions, &rows, &choices);
        if let Some(r) = &existing
            && r.last_request.as_deref() == Some(print.as_slice())
        {
            // The same submission again: answer as before.
            return Ok((to_proto(r, &questions, &answers), Vec::new()));
        }
        if let Some(r) = &existing
            && r.completed
        {
            return Err(FeedbackError::ResponseCompleted(req.name.clone()).into());
        }
        if row.state == pb::SurveyState::Closed as i16 {
            return Err(FeedbackError::WrongState {
                survey: p.survey.clone(),
                state: state_name(row.state),
                what: "a closed survey takes no answers",
            }
            .into());
        }
        if now_us >= inv.expire_us || inv.state == pb::InvitationState::Expired as i16 {
            return Err(FeedbackError::InvitationExpired {
                invitation: req.invitation.clone(),
            }
            .into());
        }
        let index: BTreeMap<&str, usize> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| (q.id.as_str(), i))
            .collect();
        let mut v = Violations::new();
        let mut given = Vec::new();
        for (i, a) in req.answers.iter().enumerate() {
            let f = format!("answers[{i}]");
            let Some(&qi) = index.get(a.question.as_str()) else {
                v.push(Violation::new(
                    format!("{f}.question"),
                    format!(
                        "{:?} is not a question of version {} of this survey",
                        clm_domain::validation::shorten(&a.question, 64),
                        inv.survey_version
                    ),
                ));
                continue;
            };
            match convert::value(&f, a) {
                Err(e) => v.push(e),
                Ok(value) => match survey::check_answer(&questions[qi], &value) {
                    Err(why) => v.push(Violation::new(
                        f,
                        format!("question {:?}: {why}", questions[qi].id),
                    )),
                    Ok(()) => {
                        let value = match value {
                            Value::Choices(c) => in_question_order(&questions[qi], c),
                            v => v,
                        };
                        answers.insert(qi, value);
                        given.push((i, qi));
                    }
                },
            }
        }
        v.into_result()?;
        let mut v = Violations::new();
        let pruned = survey::prune(&questions, &mut answers);
        for (i, qi) in &given {
            if pruned.contains(qi) {
                v.push(Violation::new(
                    format!("answers[{i}]"),
                    format!(
                        "question {:?} is not shown: its display condition does not hold",
                        questions[*qi].id
                    ),
                ));
            }
        }
        if req.finish {
            for qi in survey::missing_required(&questions, &answers) {
                v.push(Violation::new(
                    "answers",
                    format!(
                        "question {:?} is required and not answered",
                        questions[qi].id
                    ),
                ));
            }
        }
        v.into_result()?;
        if req.finish && !surveys::count_completion(txn, &p.survey).await? {
            return Err(FeedbackError::ResponseLimit {
                survey: p.survey.clone(),
                limit: row.response_limit,
            }
            .into());
        }
        let stage = customers::get(txn, &inv.customer)
            .await?
            .map_or(0, |c| c.stage);
        let resp = responses::Row {
            survey_id: p.survey.clone(),
            id: p.response.clone(),
            invitation_id: p.invitation.clone(),
            customer: Some(inv.customer.clone()),
            survey_version: inv.survey_version,
            completed: req.finish,
            stage,
            create_us: existing.as_ref().map_or(now_us, |r| r.create_us),
            update_us: now_us,
            complete_us: req.finish.then_some(now_us),
            last_request: Some(print.clone()),
        };
        responses::put(txn, resp.clone()).await?;
        let seen = survey::walk(&questions, &answers, req.finish);
        let mut rows = Vec::new();
        let mut choice_rows = Vec::new();
        for s in seen.iter().filter(|s| s.shown) {
            let q = &questions[s.position];
            let value = answers.get(&s.position);
            rows.push(responses::AnswerRow {
                survey_id: p.survey.clone(),
                response_id: p.response.clone(),
                question: q.id.clone(),
                position: i32::try_from(s.position).unwrap_or(i32::MAX),
                kind: q.kind.code(),
                answered: s.answered,
                dropped: s.dropped,
                number: match value {
                    Some(Value::Number(n)) => Some(*n),
                    _ => None,
                },
                answer_text: match value {
                    Some(Value::Text(t)) => Some(t.clone()),
                    _ => None,
                },
                survey_version: inv.survey_version,
                completed: req.finish,
                stage,
                at_us: now_us,
            });
            if let Some(Value::Choices(c)) = value {
                choice_rows.extend(c.iter().map(|choice| responses::ChoiceRow {
                    survey_id: p.survey.clone(),
                    response_id: p.response.clone(),
                    question: q.id.clone(),
                    choice: choice.clone(),
                    survey_version: inv.survey_version,
                    completed: req.finish,
                    stage,
                    at_us: now_us,
                }));
            }
        }
        responses::rewrite_answers(txn, &p.survey, &p.response, rows, choice_rows).await?;
        let state = if req.finish {
            pb::InvitationState::Completed
        } else {
            pb::InvitationState::Started
        };
        invitations::set_state(txn, &p.invitation, state, Some(&p.response)).await?;
        let shown = to_proto(&resp, &questions, &answers);
        let mut events = Vec::new();
        if req.finish {
            responses::set_segments(txn, &p.survey, &p.response, &segments).await?;
            timers::disarm(
                txn,
                crate::invite::EXPIRY,
                std::slice::from_ref(&p.invitation),
            )
            .await?;
            events.push(NewEvent::new(
                &inv.customer,
                &pb::ResponseCompleted {
                    response: shown.name.clone(),
                    survey: format!("surveys/{}", p.survey),
                    customer: inv.customer.clone(),
                    completed_time: Some(timestamp(now)),
                    survey_version: inv.survey_version,
                    answers: answers
                        .iter()
                        .map(|(i, v)| classified(&questions[*i], v))
                        .collect(),
                },
            ));
        }
        // The trail keeps who submitted what and when, not the answers
        // themselves (open text is personal data).
        let trail = pb::Response {
            answers: Vec::new(),
            ..shown.clone()
        };
        let change = match &existing {
            None => Change::create(&shown.name, &trail),
            Some(_) => Change::action(&shown.name, &trail),
        };
        audit::record(
            txn,
            crate::SERVICE,
            now,
            change.customer(inv.customer.clone()),
        )
        .await?;
        Ok((shown, events))
    })
    .await?;
    Ok(out)
}

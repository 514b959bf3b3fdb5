//! An edit of a segment (the fields an update mask names), validated once
//! and applied in a write's transaction: shared by UpdateSegment and by the
//! approval of a change request, so both change a segment the same way.

use super::SegmentationApi;
use crate::accountability;
use crate::convert::{self, Live};
use crate::engine::{Engine, catalog_with_segments};
use crate::objectives;
use crate::store::objectives as stored;
use crate::store::segments::{Segment, State};
use crate::store::{members, segments};
use chrono::{DateTime, Utc};
use clm_domain::rules::{self, Rule};
use clm_domain::validation::{optional_text, required_text};
use clm_domain::{Violation, Violations};
use clm_platform::db::to_micros;
use clm_platform::{Error, Result};
use clm_proto::segmentation as pb;
use sea_orm::ConnectionTrait;

/// Fields an edit may name.
pub const EDITABLE: &str = "display_name, description, team, purpose, playbook, approval_required, objectives, rule or rule_text";
/// Fields that need an approved change request on a segment with
/// `approval_required`.
pub const GUARDED: [&str; 4] = ["rule", "rule_text", "objectives", "approval_required"];
/// Longest playbook.
pub const MAX_PLAYBOOK: usize = 20_000;

/// A validated edit.
#[derive(Debug, Clone, Default)]
pub struct Edit {
    /// The mask's paths.
    pub paths: Vec<String>,
    /// New display name.
    pub display_name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New team.
    pub team: Option<String>,
    /// New purpose.
    pub purpose: Option<String>,
    /// New playbook.
    pub playbook: Option<String>,
    /// New approval setting.
    pub approval_required: Option<bool>,
    /// New rule.
    pub rule: Option<Rule>,
    /// The request field the rule came from (`segment.rule_text`).
    pub rule_field: String,
    /// New objectives.
    pub objectives: Option<Vec<stored::Objective>>,
}

/// What applying an edit did.
#[derive(Debug, Default)]
pub struct Applied {
    /// How the rule changed (a new version), if it did.
    pub rule_diff: Option<pb::RuleDiff>,
}

impl Edit {
    /// The guarded fields the edit names.
    pub fn guarded(&self) -> Vec<&str> {
        self.paths
            .iter()
            .map(String::as_str)
            .filter(|p| GUARDED.contains(p))
            .collect()
    }
}

impl SegmentationApi {
    /// Validates the fields of `s` that `paths` name (`prefix` is the path
    /// of `s` in the request, `segment.`), for segment `id`.
    pub(super) async fn parse_edit(
        &self,
        prefix: &str,
        id: &str,
        s: &pb::Segment,
        paths: &[String],
    ) -> Result<Edit> {
        let mut edit = Edit {
            paths: paths.to_vec(),
            ..Edit::default()
        };
        let mut v = Violations::new();
        let field = |f: &str| format!("{prefix}{f}");
        for p in paths {
            match p.as_str() {
                "display_name" => {
                    edit.display_name = v.check(
                        "",
                        required_text(&field("display_name"), &s.display_name, 200),
                    );
                }
                "description" => {
                    edit.description = Some(
                        v.check(
                            "",
                            optional_text(&field("description"), &s.description, 2000),
                        )
                        .flatten()
                        .unwrap_or_default(),
                    );
                }
                "team" => {
                    edit.team = Some(
                        v.check("", optional_text(&field("team"), &s.team, 200))
                            .flatten()
                            .unwrap_or_default(),
                    );
                }
                "purpose" => {
                    edit.purpose = Some(
                        v.check("", optional_text(&field("purpose"), &s.purpose, 2000))
                            .flatten()
                            .unwrap_or_default(),
                    );
                }
                "playbook" => {
                    edit.playbook = Some(
                        v.check(
                            "",
                            optional_text(&field("playbook"), &s.playbook, MAX_PLAYBOOK),
                        )
                        .flatten()
                        .unwrap_or_default(),
                    );
                }
                "approval_required" => edit.approval_required = Some(s.approval_required),
                "objectives" => {
                    match objectives::from_proto(&field("objectives"), id, &s.objectives) {
                        Ok(list) => edit.objectives = Some(list),
                        Err(Error::InvalidArgument(list)) => {
                            list.0.into_iter().for_each(|x| v.push(x))
                        }
                        Err(other) => return Err(other),
                    }
                }
                "rule" | "rule_text" => {
                    if edit.rule.is_none() {
                        let catalog = catalog_with_segments(self.engine.rt()).await?;
                        let r =
                            Self::resolve_rule(prefix, s.rule.as_ref(), &s.rule_text, &catalog)?;
                        let at = if s.rule.is_some() {
                            field("rule")
                        } else {
                            field("rule_text")
                        };
                        self.check_cycle(id, &at, &r).await?;
                        edit.rule = Some(r);
                        edit.rule_field = at;
                    }
                }
                "owner" => v.push(Violation::new(
                    "update_mask",
                    "cannot change owner here: use TransferSegmentOwnership",
                )),
                other => v.push(Violation::new(
                    "update_mask",
                    format!(
                        "cannot change {}: use {EDITABLE}",
                        clm_domain::validation::echo(other)
                    ),
                )),
            }
        }
        v.into_result()?;
        Ok(edit)
    }
}

/// Applies `edit` to `row` in `txn` at `now` (objectives replaced and
/// their deadlines re-armed, a changed rule made a new version with its
/// backfill started); the caller writes the row and the audit entry.
pub async fn apply(
    txn: &impl ConnectionTrait,
    edit: &Edit,
    row: &mut Segment,
    now: DateTime<Utc>,
) -> Result<Applied> {
    let mut out = Applied::default();
    if let Some(x) = &edit.display_name {
        row.display_name = x.trim().to_owned();
    }
    if let Some(x) = &edit.description {
        row.description = x.trim().to_owned();
    }
    if let Some(x) = &edit.team {
        row.team = x.trim().to_owned();
    }
    if let Some(x) = &edit.purpose {
        row.purpose = x.trim().to_owned();
    }
    if let Some(x) = &edit.playbook {
        row.playbook = x.clone();
    }
    if let Some(x) = edit.approval_required {
        row.approval_required = x;
    }
    if let Some(list) = &edit.objectives {
        stored::replace(txn, &row.id, list.clone()).await?;
        let kept = stored::of_segments(txn, std::slice::from_ref(&row.id))
            .await?
            .remove(&row.id)
            .unwrap_or_default();
        accountability::arm_deadlines(txn, &row.id, &kept, to_micros(now)).await?;
    }
    if let Some(r) = &edit.rule {
        let text = r.to_string();
        if text != row.rule_text {
            super::check_references(txn, &row.id, &edit.rule_field, r).await?;
            let old = rules::parse(&row.rule_text).ok();
            out.rule_diff = Some(super::rule_diff(
                row.version,
                &row.rule_text,
                old.as_ref(),
                r,
            ));
            row.rule_text = text;
            row.version += 1;
            row.state = State::Backfilling.code();
            row.failure_reason = None;
            row.operation = Some(Engine::new_backfill_name());
            Engine::start_backfill(txn, row, now).await?;
        }
    }
    Ok(out)
}

/// Writes the edited row (a new rule version recorded with `actor`).
pub async fn store(
    txn: &impl ConnectionTrait,
    row: &mut Segment,
    applied: &Applied,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    row.revision += 1;
    row.update_us = to_micros(now);
    let new_version = applied.rule_diff.is_some();
    segments::update(txn, row.clone(), new_version, actor).await?;
    if new_version {
        members::bump_generation(txn).await?;
    }
    Ok(())
}

/// A segment as its audit snapshots show it: the row, the member count,
/// and the objectives as defined (no values: they change by themselves).
pub async fn audit_view(txn: &impl ConnectionTrait, row: &Segment) -> Result<pb::Segment> {
    let counted = members::counts(txn, std::slice::from_ref(&row.id)).await?;
    let objectives = stored::of_segments(txn, std::slice::from_ref(&row.id))
        .await?
        .remove(&row.id)
        .unwrap_or_default()
        .iter()
        .map(|o| objectives::to_proto(o, None))
        .collect();
    Ok(convert::segment_to_proto(
        row,
        &Live {
            member_count: counted.get(&row.id).copied().unwrap_or(0),
            objectives,
            ..Live::default()
        },
    ))
}

//! Schema of the feedback service. Times are microseconds since the epoch (`*_us`).

use clm_platform::migration::{big, index, small, text};
use sea_orm_migration::prelude::*;

/// Runs the platform tables, then the feedback tables.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(FeedbackTables));
        m.push(Box::new(SummaryIndex));
        m
    }
}

struct FeedbackTables;

impl MigrationName for FeedbackTables {
    fn name(&self) -> &str {
        "m0002_feedback_tables"
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

fn flag(name: &str) -> ColumnDef {
    ColumnDef::new(a(name)).boolean().not_null().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for FeedbackTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One row per survey: its latest version and its counters.
        m.create_table(
            Table::create()
                .table(a("surveys"))
                .if_not_exists()
                .col(text("id").primary_key())
                .col(small("state"))
                .col(big("version"))
                .col(big("revision"))
                .col(big("response_limit"))
                .col(big("completed"))
                .col(big("create_us"))
                .col(big("update_us"))
                .to_owned(),
        )
        .await?;
        // Every version of every survey: the encoded `Survey` as of it.
        m.create_table(
            Table::create()
                .table(a("survey_versions"))
                .if_not_exists()
                .col(text("survey_id"))
                .col(big("version"))
                .col(ColumnDef::new(a("body")).blob().not_null())
                .primary_key(Index::create().col(a("survey_id")).col(a("version")))
                .to_owned(),
        )
        .await?;
        // What feedback knows of each customer, from the customer stream.
        m.create_table(
            Table::create()
                .table(a("fb_customers"))
                .if_not_exists()
                .col(text("customer").primary_key())
                .col(small("stage"))
                .col(ColumnDef::new(a("language")).string().null())
                // Bit (1 << channel) set while survey consent is granted on it.
                .col(ColumnDef::new(a("consent")).integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("invitations"))
                .if_not_exists()
                .col(text("id").primary_key())
                .col(text("survey_id"))
                .col(text("customer"))
                .col(small("channel"))
                .col(text("language"))
                .col(small("state"))
                .col(big("survey_version"))
                .col(big("create_us"))
                .col(big("expire_us"))
                .col(ColumnDef::new(a("response_id")).string().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "invitations_by_survey",
            "invitations",
            &["survey_id", "create_us", "id"],
            false,
        ))
        .await?;
        m.create_index(index(
            "invitations_by_customer",
            "invitations",
            &["customer", "create_us"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("responses"))
                .if_not_exists()
                .col(text("survey_id"))
                .col(text("id"))
                .col(text("invitation_id"))
                .col(ColumnDef::new(a("customer")).string().null())
                .col(big("survey_version"))
                .col(flag("completed"))
                .col(small("stage"))
                .col(big("create_us"))
                .col(big("update_us"))
                .col(ColumnDef::new(a("complete_us")).big_integer().null())
                // Hash of the last submission, so a retry answers as before.
                .col(ColumnDef::new(a("last_request")).blob().null())
                .primary_key(Index::create().col(a("survey_id")).col(a("id")))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "responses_by_invitation",
            "responses",
            &["invitation_id"],
            true,
        ))
        .await?;
        m.create_index(index(
            "responses_by_time",
            "responses",
            &["survey_id", "update_us"],
            false,
        ))
        .await?;
        m.create_index(index(
            "responses_by_customer",
            "responses",
            &["customer"],
            false,
        ))
        .await?;
        // One row per question a response was shown (answered or not), with
        // the response's filter columns copied in, so a summary is one scan
        // of one table. Rewritten with the response on each submission.
        m.create_table(
            Table::create()
                .table(a("answers"))
                .if_not_exists()
                .col(text("survey_id"))
                .col(text("response_id"))
                .col(text("question"))
                .col(ColumnDef::new(a("position")).integer().not_null())
                .col(small("kind"))
                .col(flag("answered"))
                .col(flag("dropped"))
                .col(ColumnDef::new(a("number")).big_integer().null())
                .col(ColumnDef::new(a("answer_text")).text().null())
                .col(big("survey_version"))
                .col(flag("completed"))
                .col(small("stage"))
                .col(big("at_us"))
                .primary_key(
                    Index::create()
                        .col(a("survey_id"))
                        .col(a("response_id"))
                        .col(a("question")),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("answer_choices"))
                .if_not_exists()
                .col(text("survey_id"))
                .col(text("response_id"))
                .col(text("question"))
                .col(text("choice"))
                .col(big("survey_version"))
                .col(flag("completed"))
                .col(small("stage"))
                .col(big("at_us"))
                .primary_key(
                    Index::create()
                        .col(a("survey_id"))
                        .col(a("response_id"))
                        .col(a("question"))
                        .col(a("choice")),
                )
                .to_owned(),
        )
        .await?;
        // The segments the customer was in when the response completed.
        m.create_table(
            Table::create()
                .table(a("response_segments"))
                .if_not_exists()
                .col(text("survey_id"))
                .col(text("response_id"))
                .col(text("segment"))
                .primary_key(
                    Index::create()
                        .col(a("survey_id"))
                        .col(a("segment"))
                        .col(a("response_id")),
                )
                .to_owned(),
        )
        .await?;
        // The fatigue policy: one row, id 1.
        m.create_table(
            Table::create()
                .table(a("fatigue_policy"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).integer().not_null().primary_key())
                .col(ColumnDef::new(a("max_invitations")).integer().not_null())
                .col(big("period_us"))
                .col(big("revision"))
                .col(big("update_us"))
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// The index that covers the summary's scan of the answer rows: its keys
/// are the scan's filters and groups, so PostgreSQL reads the index only
/// and aggregates it in order.
struct SummaryIndex;

impl MigrationName for SummaryIndex {
    fn name(&self) -> &str {
        "m0003_answers_summary_index"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SummaryIndex {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(index(
            "answers_cells",
            "answers",
            &[
                "survey_id",
                "survey_version",
                "position",
                "kind",
                "number",
                "completed",
                "answered",
                "dropped",
                "stage",
                "at_us",
            ],
            false,
        ))
        .await
    }
}

//! Schema of the segmentation service. Times are microseconds since the
//! epoch (`*_us`), money is minor units plus a currency code.
//!
//! * `segments`, `segment_versions`: the segments and every rule version.
//! * `seg_meta`: one row: the registry generation (bumped by every segment
//!   change, so every replica reloads its rules), the membership version
//!   (the cache's version source; its row lock serialises membership
//!   writers) and the freshness of the facts.
//! * `fact_*`: the projection of the customer stream the rules read.
//! * `members`, `member_history`: current membership and closed intervals.
//! * the next instant time alone changes a customer's answer for a segment
//!   (exact window expiry) is a timer of the platform's `timer_queue`
//!   (kind `segmentation.window`); `m0003` moved the old `timers` there.
//!
//! * `m0005`: accountability: a segment's team, purpose, playbook and
//!   approval setting; `segment_objectives`; `segment_change_requests`;
//!   daily `segment_snapshots` and `objective_snapshots`; the rule version
//!   and reason of each entry (`members`) and exit (`member_history`).
//!
//! * `m0006`: scores as curves in time per scoring model
//!   (`fact_score_curves`, `fact_score_terms`) instead of one value per
//!   name (`fact_scores`); `gone_customers` (erased or merged away, by a
//!   hash of the id).
//!
//! * `m0007`: the membership version of each exit
//!   (`member_history.exit_membership_version`) and indexes on the entry's
//!   (`members.version`) and the exit's: a backfill writes the cache after
//!   its commit by reading back, in chunks, the rows its versions wrote.
//!
//! * `m0008`: `backfill_diffs` and `backfill_seen`: a backfill computes
//!   its diff outside the membership lock, and the evaluations that
//!   decide its segment meanwhile record whom they decided, so the
//!   backfill, applying its diff under the lock, leaves those alone.
//!
//! * `m0009`: `fact_customers.profiled`: facts from the loyalty and
//!   feedback streams that arrive before the customer's profile are kept
//!   in a row that waits for it (before, they were dropped).
//!
//! On PostgreSQL the fact text columns use the `C` collation, so string
//! order is byte order, as in the rule language and SQLite.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

/// Runs the platform tables, then the segmentation tables.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(SegmentationTables));
        m.push(Box::new(WindowTimersToPlatformQueue));
        m.push(Box::new(BackfillOperations));
        m.push(Box::new(SegmentAccountability));
        m.push(Box::new(ScoreCurves));
        m.push(Box::new(MembershipVersionIndexes));
        m.push(Box::new(BackfillDiffs));
        m.push(Box::new(FactsBeforeProfiles));
        m
    }
}

struct SegmentationTables;

impl MigrationName for SegmentationTables {
    fn name(&self) -> &str {
        "m0002_segmentation_tables"
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

fn index(name: &str, table: &str, cols: &[&str]) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(a(table)).if_not_exists();
    for c in cols {
        i.col(a(c));
    }
    i.to_owned()
}

fn pk(table: &str, cols: &[&str]) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(format!("{table}_pk")).table(a(table)).primary();
    for c in cols {
        i.col(a(c));
    }
    i.to_owned()
}

/// Columns built with the backend in mind.
struct Cols {
    pg: bool,
}

impl Cols {
    /// A text column compared by bytes on both backends.
    fn text(&self, name: &str) -> ColumnDef {
        let mut c = ColumnDef::new(a(name));
        c.text();
        if self.pg {
            c.extra("COLLATE \"C\"");
        }
        c
    }
    fn big(&self, name: &str) -> ColumnDef {
        let mut c = ColumnDef::new(a(name));
        c.big_integer();
        c
    }
    fn small(&self, name: &str) -> ColumnDef {
        let mut c = ColumnDef::new(a(name));
        c.small_integer();
        c
    }
    fn double(&self, name: &str) -> ColumnDef {
        let mut c = ColumnDef::new(a(name));
        c.double();
        c
    }
    fn boolean(&self, name: &str) -> ColumnDef {
        let mut c = ColumnDef::new(a(name));
        c.boolean();
        c
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SegmentationTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = Cols {
            pg: m.get_database_backend() == DbBackend::Postgres,
        };
        m.create_table(
            Table::create()
                .table(a("segments"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(c.text("display_name").not_null())
                .col(c.text("owner").not_null())
                .col(c.text("description").not_null())
                .col(c.text("rule_text").not_null())
                .col(c.big("version").not_null())
                .col(c.big("revision").not_null())
                .col(c.small("state").not_null())
                .col(c.text("failure_reason").null())
                .col(c.big("create_us").not_null())
                .col(c.big("update_us").not_null())
                .col(c.big("evaluate_us").null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("segment_versions"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(c.big("version").not_null())
                .col(c.text("rule_text").not_null())
                .col(c.text("actor").not_null())
                .col(c.big("create_us").not_null())
                .primary_key(&mut pk("segment_versions", &["segment_id", "version"]))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("seg_meta"))
                .if_not_exists()
                .col(c.small("id").not_null().primary_key())
                .col(c.big("generation").not_null())
                .col(c.big("membership_version").not_null())
                .col(c.big("fresh_event_us").null())
                .col(c.big("fresh_apply_us").null())
                .to_owned(),
        )
        .await?;
        m.exec_stmt(
            Query::insert()
                .into_table(a("seg_meta"))
                .columns([a("id"), a("generation"), a("membership_version")])
                .values_panic([1.into(), 1.into(), 1.into()])
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_customers"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("customer_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(c.text("email").null())
                .col(c.text("display_name").null())
                .col(c.text("birth_date").null())
                .col(c.small("gender").null())
                .col(c.big("income_minor").null())
                .col(c.text("income_currency").null())
                .col(c.text("occupation").null())
                .col(c.small("stage").null())
                .col(c.big("stage_us").null())
                .col(c.text("grade").null())
                .col(c.small("nps_last").null())
                .col(c.double("csat_last").null())
                .col(c.text("loyalty_tier").null())
                .col(c.big("loyalty_balance").null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_attributes"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.text("key").not_null())
                .col(c.small("kind").not_null())
                .col(c.text("str_value").null())
                .col(c.double("num_value").null())
                .col(c.boolean("bool_value").null())
                .col(c.big("time_us").null())
                .primary_key(&mut pk("fact_attributes", &["customer_id", "key"]))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_consents"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.text("purpose").not_null())
                .col(c.text("channel").not_null())
                .col(c.boolean("granted").not_null())
                .primary_key(&mut pk(
                    "fact_consents",
                    &["customer_id", "purpose", "channel"],
                ))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_scores"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.text("name").not_null())
                .col(c.double("value").not_null())
                .primary_key(&mut pk("fact_scores", &["customer_id", "name"]))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_touchpoints"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.small("kind").not_null())
                .col(c.text("custom_type").null())
                .col(c.big("occurred_us").not_null())
                .col(c.text("product").null())
                .col(c.text("feature").null())
                .col(c.text("campaign").null())
                .col(c.text("channel").null())
                .col(c.big("revenue_minor").null())
                .col(c.text("revenue_currency").null())
                .col(c.big("usage_ms").null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "fact_touchpoints_customer",
            "fact_touchpoints",
            &["customer_id", "kind", "occurred_us"],
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_touch_props"))
                .if_not_exists()
                .col(ColumnDef::new(a("event_id")).string().not_null())
                .col(c.text("key").not_null())
                .col(c.text("value").not_null())
                .primary_key(&mut pk("fact_touch_props", &["event_id", "key"]))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("members"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.big("enter_us").not_null())
                .col(c.big("version").not_null())
                .primary_key(&mut pk("members", &["segment_id", "customer_id"]))
                .to_owned(),
        )
        .await?;
        m.create_index(index("members_customer", "members", &["customer_id"]))
            .await?;
        m.create_table(
            Table::create()
                .table(a("member_history"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.big("enter_us").not_null())
                .col(c.big("exit_us").not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "member_history_segment",
            "member_history",
            &["segment_id", "customer_id"],
        ))
        .await?;
        m.create_index(index(
            "member_history_customer",
            "member_history",
            &["customer_id"],
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("timers"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.big("due_us").not_null())
                .primary_key(&mut pk("timers", &["segment_id", "customer_id"]))
                .to_owned(),
        )
        .await?;
        m.create_index(index("timers_due", "timers", &["due_us"]))
            .await?;
        m.create_index(index("timers_customer", "timers", &["customer_id"]))
            .await?;
        Ok(())
    }
}

/// Moves the window timers into the platform's timer queue and drops
/// the service's own `timers` table.
struct WindowTimersToPlatformQueue;

impl MigrationName for WindowTimersToPlatformQueue {
    fn name(&self) -> &str {
        "m0003_window_timers_to_platform_queue"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for WindowTimersToPlatformQueue {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        db.execute_unprepared(
            "INSERT INTO timer_queue (kind, key, subject, due_us, version, payload)
             SELECT 'segmentation.window', segment_id || '|' || customer_id, customer_id, due_us, 1, NULL
             FROM timers",
        )
        .await?;
        db.execute_unprepared("DROP TABLE timers").await?;
        Ok(())
    }
}

/// A segment names the operation of its latest backfill.
struct BackfillOperations;

impl MigrationName for BackfillOperations {
    fn name(&self) -> &str {
        "m0004_backfill_operations"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for BackfillOperations {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared("ALTER TABLE segments ADD COLUMN operation VARCHAR(160) NULL")
            .await?;
        Ok(())
    }
}

/// Segment accountability: ownership fields, objectives, change requests,
/// daily snapshots, and why each membership change happened.
struct SegmentAccountability;

impl MigrationName for SegmentAccountability {
    fn name(&self) -> &str {
        "m0005_segment_accountability"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SegmentAccountability {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = Cols {
            pg: m.get_database_backend() == DbBackend::Postgres,
        };
        let db = m.get_connection();
        for stmt in [
            "ALTER TABLE segments ADD COLUMN team TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE segments ADD COLUMN purpose TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE segments ADD COLUMN playbook TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE segments ADD COLUMN approval_required BOOLEAN NOT NULL DEFAULT FALSE",
            "ALTER TABLE members ADD COLUMN rule_version BIGINT NULL",
            "ALTER TABLE members ADD COLUMN reason SMALLINT NULL",
            "ALTER TABLE member_history ADD COLUMN enter_version BIGINT NULL",
            "ALTER TABLE member_history ADD COLUMN enter_reason SMALLINT NULL",
            "ALTER TABLE member_history ADD COLUMN exit_version BIGINT NULL",
            "ALTER TABLE member_history ADD COLUMN exit_reason SMALLINT NULL",
        ] {
            db.execute_unprepared(stmt).await?;
        }
        m.create_index(index("segments_owner", "segments", &["owner", "id"]))
            .await?;
        m.create_index(index("segments_team", "segments", &["team", "id"]))
            .await?;
        // Membership history pages walk these in (segment, time, customer)
        // order.
        m.create_index(index(
            "members_enter",
            "members",
            &["segment_id", "enter_us", "customer_id"],
        ))
        .await?;
        m.create_index(index(
            "member_history_enter",
            "member_history",
            &["segment_id", "enter_us", "customer_id"],
        ))
        .await?;
        m.create_index(index(
            "member_history_exit",
            "member_history",
            &["segment_id", "exit_us", "customer_id"],
        ))
        .await?;
        m.create_index(index(
            "member_history_exit_time",
            "member_history",
            &["exit_us"],
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("segment_objectives"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(c.text("objective_id").not_null())
                .col(c.small("position").not_null())
                .col(c.small("metric").not_null())
                .col(c.small("stage").null())
                .col(c.double("target").not_null())
                .col(c.small("direction").not_null())
                .col(c.big("deadline_us").not_null())
                .col(c.text("currency").null())
                .col(c.big("window_us").null())
                .col(c.small("status").not_null())
                .col(c.double("final_value").null())
                .primary_key(&mut pk(
                    "segment_objectives",
                    &["segment_id", "objective_id"],
                ))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("segment_change_requests"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(c.small("state").not_null())
                .col(c.big("create_us").not_null())
                .col(ColumnDef::new(a("body")).binary().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "segment_change_requests_segment",
            "segment_change_requests",
            &["segment_id", "id"],
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("segment_snapshots"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(c.big("day_us").not_null())
                .col(c.big("size").not_null())
                .col(c.big("taken_us").not_null())
                .primary_key(&mut pk("segment_snapshots", &["segment_id", "day_us"]))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("objective_snapshots"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(c.text("objective_id").not_null())
                .col(c.big("day_us").not_null())
                .col(c.big("taken_us").not_null())
                .col(c.double("value").not_null())
                .col(c.small("status").not_null())
                .primary_key(&mut pk(
                    "objective_snapshots",
                    &["segment_id", "objective_id", "day_us"],
                ))
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Scores as curves per scoring model (`fact_score_curves`,
/// `fact_score_terms`) in place of one value per name (`fact_scores`,
/// copied as a constant term of model `""`), and `gone_customers`.
struct ScoreCurves;

impl MigrationName for ScoreCurves {
    fn name(&self) -> &str {
        "m0006_score_curves"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ScoreCurves {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let c = Cols {
            pg: m.get_database_backend() == DbBackend::Postgres,
        };
        m.create_table(
            Table::create()
                .table(a("fact_score_curves"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.text("model").not_null())
                .col(c.text("name").not_null())
                .col(c.big("changed_us").not_null())
                .col(c.double("value").not_null())
                .col(c.text("grade").not_null())
                .col(c.big("idle_points").null())
                .col(c.big("idle_every_us").null())
                .col(c.big("last_us").null())
                .col(c.big("floor").null())
                .col(c.big("ceiling").null())
                .primary_key(&mut pk(
                    "fact_score_curves",
                    &["customer_id", "model", "name"],
                ))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("fact_score_terms"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(c.text("model").not_null())
                .col(c.text("name").not_null())
                .col(ColumnDef::new(a("seq")).integer().not_null())
                .col(c.double("coef").not_null())
                .col(c.big("since_us").not_null())
                .col(c.small("kind").not_null())
                .col(c.big("param_us").not_null())
                .primary_key(&mut pk(
                    "fact_score_terms",
                    &["customer_id", "model", "name", "seq"],
                ))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("gone_customers"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("customer_hash"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(c.big("gone_us").not_null())
                .to_owned(),
        )
        .await?;
        let db = m.get_connection();
        for stmt in [
            "INSERT INTO fact_score_curves (customer_id, model, name, changed_us, value, grade) \
             SELECT customer_id, '', name, 0, value, '' FROM fact_scores",
            "INSERT INTO fact_score_terms (customer_id, model, name, seq, coef, since_us, kind, param_us) \
             SELECT customer_id, '', name, 0, value, 0, 0, 0 FROM fact_scores",
            "DROP TABLE fact_scores",
        ] {
            db.execute_unprepared(stmt).await?;
        }
        Ok(())
    }
}

/// The membership version of each exit, and indexes on both versions (a
/// backfill reads its changes back by version to write the cache).
struct MembershipVersionIndexes;

impl MigrationName for MembershipVersionIndexes {
    fn name(&self) -> &str {
        "m0007_membership_version_indexes"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MembershipVersionIndexes {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared(
                "ALTER TABLE member_history ADD COLUMN exit_membership_version BIGINT NULL",
            )
            .await?;
        m.create_index(index("members_version", "members", &["version"]))
            .await?;
        m.create_index(index(
            "member_history_exit_membership_version",
            "member_history",
            &["exit_membership_version"],
        ))
        .await?;
        Ok(())
    }
}

/// The backfills computing their diff outside the membership lock, and the
/// customers evaluations decided meanwhile.
struct BackfillDiffs;

impl MigrationName for BackfillDiffs {
    fn name(&self) -> &str {
        "m0008_backfill_diffs"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for BackfillDiffs {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("backfill_diffs"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("segment_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("since_version")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("backfill_seen"))
                .if_not_exists()
                .col(ColumnDef::new(a("segment_id")).string().not_null())
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("version")).big_integer().not_null())
                .primary_key(&mut pk("backfill_seen", &["segment_id", "customer_id"]))
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

/// Whether a customer's profile has arrived (facts from other streams can
/// come first). Every existing row came with or after its profile.
struct FactsBeforeProfiles;

impl MigrationName for FactsBeforeProfiles {
    fn name(&self) -> &str {
        "m0009_facts_before_profiles"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for FactsBeforeProfiles {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared(
                "ALTER TABLE fact_customers ADD COLUMN profiled BOOLEAN NOT NULL DEFAULT TRUE",
            )
            .await?;
        Ok(())
    }
}

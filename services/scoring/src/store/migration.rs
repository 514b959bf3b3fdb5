//! Schema of the scoring service. Times are microseconds since the epoch (`*_us`).

use clm_platform::migration::index;
use sea_orm_migration::prelude::*;

/// Runs the platform tables, then the scoring tables.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(ScoringTables));
        m.push(Box::new(ScoreSums));
        m.push(Box::new(ThresholdTimersToPlatformQueue));
        m.push(Box::new(ThresholdSidesSeenAt));
        m.push(Box::new(LedgerByRule));
        m
    }
}

struct ScoringTables;

impl MigrationName for ScoringTables {
    fn name(&self) -> &str {
        "m0002_scoring_tables"
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

#[async_trait::async_trait]
impl MigrationTrait for ScoringTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One row per model version; `body` is the encoded ScoringModel.
        m.create_table(
            Table::create()
                .table(a("scoring_models"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null())
                .col(ColumnDef::new(a("version")).big_integer().not_null())
                .col(ColumnDef::new(a("display_name")).string().not_null())
                .col(ColumnDef::new(a("body")).blob().not_null())
                .col(ColumnDef::new(a("active")).boolean().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .primary_key(Index::create().col(a("id")).col(a("version")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("score_ledger"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer")).string().not_null())
                .col(ColumnDef::new(a("model")).string().not_null())
                .col(ColumnDef::new(a("model_version")).big_integer().not_null())
                .col(ColumnDef::new(a("score")).string().not_null())
                .col(ColumnDef::new(a("rule")).string().not_null())
                .col(ColumnDef::new(a("points")).big_integer().not_null())
                .col(ColumnDef::new(a("source_event")).string().not_null())
                .col(ColumnDef::new(a("award_us")).big_integer().not_null())
                .col(ColumnDef::new(a("decay_kind")).small_integer().not_null())
                .col(ColumnDef::new(a("decay_us")).big_integer().not_null())
                .col(ColumnDef::new(a("reason")).string().not_null())
                .col(ColumnDef::new(a("actor")).string().not_null())
                .to_owned(),
        )
        .await?;
        // Awards are idempotent by (source event, rule, model version).
        m.create_index(index(
            "score_ledger_award",
            "score_ledger",
            &["source_event", "rule", "model", "model_version"],
            true,
        ))
        .await?;
        m.create_index(index(
            "score_ledger_customer",
            "score_ledger",
            &["customer", "model", "award_us"],
            false,
        ))
        .await?;
        // What scoring knows of each customer: profile and stage (fit rules,
        // thresholds) and the newest touchpoint (inactivity decay).
        m.create_table(
            Table::create()
                .table(a("score_customers"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("customer"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("stage")).small_integer().null())
                .col(ColumnDef::new(a("stage_us")).big_integer().null())
                .col(ColumnDef::new(a("profile")).blob().null())
                .to_owned(),
        )
        .await?;
        // Every touchpoint seen (encoded), for inactivity and re-scoring.
        m.create_table(
            Table::create()
                .table(a("score_touchpoints"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer")).string().not_null())
                .col(ColumnDef::new(a("occurred_us")).big_integer().not_null())
                .col(ColumnDef::new(a("body")).blob().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "score_touchpoints_customer",
            "score_touchpoints",
            &["customer", "occurred_us"],
            false,
        ))
        .await?;
        // The timer queue: per customer and threshold, which side of it the
        // score was last seen on and when it must be looked at next.
        m.create_table(
            Table::create()
                .table(a("score_timers"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer")).string().not_null())
                .col(ColumnDef::new(a("model")).string().not_null())
                .col(ColumnDef::new(a("threshold")).string().not_null())
                .col(ColumnDef::new(a("above")).boolean().not_null())
                .col(ColumnDef::new(a("due_us")).big_integer().null())
                .primary_key(
                    Index::create()
                        .col(a("customer"))
                        .col(a("model"))
                        .col(a("threshold")),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "score_timers_due",
            "score_timers",
            &["due_us"],
            false,
        ))
        .await
    }
}

/// Running sums of the ledger per (customer, model, score, decay), filled
/// from the ledger already written (see `store::sums`).
struct ScoreSums;

impl MigrationName for ScoreSums {
    fn name(&self) -> &str {
        "m0003_score_sums"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ScoreSums {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("score_sums"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer")).string().not_null())
                .col(ColumnDef::new(a("model")).string().not_null())
                .col(ColumnDef::new(a("score")).string().not_null())
                .col(ColumnDef::new(a("decay_kind")).small_integer().not_null())
                .col(ColumnDef::new(a("decay_us")).big_integer().not_null())
                .col(ColumnDef::new(a("anchor_us")).big_integer().not_null())
                .col(ColumnDef::new(a("total")).double().not_null())
                .col(ColumnDef::new(a("entries")).big_integer().not_null())
                .col(ColumnDef::new(a("newest_us")).big_integer().not_null())
                .primary_key(
                    Index::create()
                        .col(a("customer"))
                        .col(a("model"))
                        .col(a("score"))
                        .col(a("decay_kind"))
                        .col(a("decay_us")),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "score_sums_model",
            "score_sums",
            &["model", "customer"],
            false,
        ))
        .await?;
        // Fill from the existing ledger, a chunk of customers at a time.
        let db = m.get_connection();
        let mut after = String::new();
        loop {
            let q = Query::select()
                .distinct()
                .column(a("customer"))
                .from(a("score_ledger"))
                .and_where(Expr::col(a("customer")).gt(after.clone()))
                .order_by(a("customer"), Order::Asc)
                .limit(1_000)
                .to_owned();
            let ids: Vec<String> = db
                .query_all(&q)
                .await?
                .iter()
                .map(|r| r.try_get::<String>("", "customer"))
                .collect::<Result<_, _>>()?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            super::sums::rebuild(db, &ids)
                .await
                .map_err(|e| DbErr::Migration(format!("filling score_sums: {e}")))?;
            after = last;
        }
        Ok(())
    }
}

/// Threshold timers move to the platform's timer queue; the side each
/// threshold was last seen on stays here, in `threshold_sides`.
struct ThresholdTimersToPlatformQueue;

impl MigrationName for ThresholdTimersToPlatformQueue {
    fn name(&self) -> &str {
        "m0004_threshold_timers_to_platform_queue"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ThresholdTimersToPlatformQueue {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("threshold_sides"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer")).string().not_null())
                .col(ColumnDef::new(a("model")).string().not_null())
                .col(ColumnDef::new(a("threshold")).string().not_null())
                .col(ColumnDef::new(a("above")).boolean().not_null())
                .primary_key(
                    Index::create()
                        .col(a("customer"))
                        .col(a("model"))
                        .col(a("threshold")),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "threshold_sides_model",
            "threshold_sides",
            &["model", "threshold"],
            false,
        ))
        .await?;
        let db = m.get_connection();
        for sql in [
            "INSERT INTO threshold_sides (customer, model, threshold, above)
             SELECT customer, model, threshold, above FROM score_timers",
            "INSERT INTO timer_queue (kind, key, subject, due_us, version, payload)
             SELECT 'scoring.threshold', model || '|' || threshold || '|' || customer, customer, due_us, 1, NULL
             FROM score_timers WHERE due_us IS NOT NULL",
            "DROP TABLE score_timers",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Each threshold side records the instant it was judged at, so a timer
/// that fires for an earlier instant never judges the score behind an
/// award's own judgement (crossings are recorded in the award's
/// transaction; the timer queue looks only at decay).
struct ThresholdSidesSeenAt;

impl MigrationName for ThresholdSidesSeenAt {
    fn name(&self) -> &str {
        "m0005_threshold_sides_seen_at"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ThresholdSidesSeenAt {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("threshold_sides"))
                .add_column(
                    ColumnDef::new(a("seen_us"))
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await
    }
}

/// The ledger entries of a customer's limited rules (caps, once per
/// customer) found by index: a stream batch reads each customer's use of
/// those rules (`ledger::rule_usage`, `newest_awards`, `rule_entries`)
/// without fetching every other entry of theirs.
struct LedgerByRule;

impl MigrationName for LedgerByRule {
    fn name(&self) -> &str {
        "m0006_score_ledger_by_rule"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for LedgerByRule {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(index(
            "score_ledger_rule",
            "score_ledger",
            &["customer", "model", "rule", "award_us"],
            false,
        ))
        .await
    }
}

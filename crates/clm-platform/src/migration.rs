//! Tables every service has: the outbox, idempotency keys, the cursors of
//! the change streams it follows and the events it had to park (`dead_letters`). A service's migrator lists
//! [`platform_migrations`] first, then its own.

use sea_orm_migration::prelude::*;

/// An index named `name` on `cols` of `table` (created if missing), unique
/// when asked: the one helper every service's migrations build indexes with.
pub fn index(name: &str, table: &str, cols: &[&str], unique: bool) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(Alias::new(table)).if_not_exists();
    if unique {
        i.unique();
    }
    for c in cols {
        i.col(Alias::new(*c));
    }
    i.to_owned()
}

/// A NOT NULL text column.
pub fn text(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .string()
        .not_null()
        .to_owned()
}

/// A NOT NULL 64-bit integer column (times are `*_us` microseconds).
pub fn big(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .big_integer()
        .not_null()
        .to_owned()
}

/// A NOT NULL 16-bit integer column (enum codes).
pub fn small(name: &str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .small_integer()
        .not_null()
        .to_owned()
}

/// The platform's migrations, to put first in a service's `Migrator`.
pub fn platform_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(PlatformTables),
        Box::new(OutboxPositions),
        Box::new(OperationsTable),
        Box::new(AuditTrail),
        Box::new(OperationLeases),
        Box::new(TimerQueue),
        Box::new(OutboxTraceContext),
        Box::new(OutboxEventIdUnindexed),
        Box::new(OutboxPositionStampedOnly),
        Box::new(OutboxTransactionStamps),
    ]
}

/// Creates `outbox`, `idempotency_keys`, `dead_letters` and `consumer_cursors`.
pub struct PlatformTables;

impl MigrationName for PlatformTables {
    fn name(&self) -> &str {
        "m0001_platform_tables"
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

#[async_trait::async_trait]
impl MigrationTrait for PlatformTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("outbox"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("sequence"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(a("event_id"))
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(a("event_type")).string().not_null())
                .col(ColumnDef::new(a("subject")).string().not_null())
                .col(ColumnDef::new(a("payload")).blob().not_null())
                .col(ColumnDef::new(a("occurred_us")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("idempotency_keys"))
                .if_not_exists()
                .col(ColumnDef::new(a("scope")).string().not_null())
                .col(ColumnDef::new(a("request_id")).string().not_null())
                .col(ColumnDef::new(a("request_hash")).string().not_null())
                .col(ColumnDef::new(a("response")).blob())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .primary_key(Index::create().col(a("scope")).col(a("request_id")))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idempotency_keys_create_us")
                .table(a("idempotency_keys"))
                .col(a("create_us"))
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("dead_letters"))
                .if_not_exists()
                .col(ColumnDef::new(a("source")).string().not_null())
                .col(ColumnDef::new(a("sequence")).big_integer().not_null())
                .col(ColumnDef::new(a("event_id")).string().not_null())
                .col(ColumnDef::new(a("event_type")).string().not_null())
                .col(ColumnDef::new(a("subject")).string().not_null())
                .col(ColumnDef::new(a("payload")).blob().not_null())
                .col(ColumnDef::new(a("error")).text().not_null())
                .col(ColumnDef::new(a("attempts")).big_integer().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .primary_key(Index::create().col(a("source")).col(a("sequence")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("consumer_cursors"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("source"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("sequence")).big_integer().not_null())
                .col(ColumnDef::new(a("update_us")).big_integer().not_null())
                .to_owned(),
        )
        .await
    }
}

/// Gives outbox events a `position` stamped in commit order (see
/// [`crate::outbox`]) and records how far retention has purged.
pub struct OutboxPositions;

impl MigrationName for OutboxPositions {
    fn name(&self) -> &str {
        "m0001_platform_outbox_positions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxPositions {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        for sql in [
            "ALTER TABLE outbox ADD COLUMN position BIGINT NULL",
            "UPDATE outbox SET position = sequence",
            "CREATE UNIQUE INDEX IF NOT EXISTS outbox_position ON outbox (position)",
            "CREATE INDEX IF NOT EXISTS outbox_unstamped ON outbox (sequence) WHERE position IS NULL",
            "CREATE TABLE IF NOT EXISTS outbox_retention (id BIGINT NOT NULL PRIMARY KEY, purged_through BIGINT NOT NULL)",
            "INSERT INTO outbox_retention (id, purged_through) VALUES (1, 0)",
            "ALTER TABLE dead_letters ADD COLUMN occurred_us BIGINT NOT NULL DEFAULT 0",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Creates `operations`: long-running operations (see [`crate::operations`]).
pub struct OperationsTable;

impl MigrationName for OperationsTable {
    fn name(&self) -> &str {
        "m0001_platform_operations"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OperationsTable {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("operations"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(ColumnDef::new(a("kind")).string().not_null())
                .col(ColumnDef::new(a("body")).blob().not_null())
                .col(ColumnDef::new(a("done")).boolean().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .col(ColumnDef::new(a("update_us")).big_integer().not_null())
                .to_owned(),
        )
        .await
    }
}

/// Creates `audit_entries`, the append-only audit trail (see
/// [`crate::audit`]), with the triggers that keep it append-only.
pub struct AuditTrail;

impl MigrationName for AuditTrail {
    fn name(&self) -> &str {
        "m0002_platform_audit_trail"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for AuditTrail {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("audit_entries"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("time_us")).big_integer().not_null())
                .col(ColumnDef::new(a("actor")).string().not_null())
                .col(ColumnDef::new(a("roles")).string().not_null())
                .col(ColumnDef::new(a("rpc")).string().not_null())
                .col(ColumnDef::new(a("resource")).string().not_null())
                .col(ColumnDef::new(a("customer")).string())
                .col(ColumnDef::new(a("field_mask")).text().not_null())
                .col(ColumnDef::new(a("before_json")).text())
                .col(ColumnDef::new(a("after_json")).text())
                .col(ColumnDef::new(a("request_id")).string())
                .col(ColumnDef::new(a("trace_id")).string())
                .col(ColumnDef::new(a("redacted_us")).big_integer())
                .to_owned(),
        )
        .await?;
        for (name, cols) in [
            ("audit_entries_resource", &["resource", "id"][..]),
            ("audit_entries_actor", &["actor", "id"][..]),
            ("audit_entries_customer", &["customer"][..]),
            ("audit_entries_time", &["time_us"][..]),
        ] {
            let mut index = Index::create();
            index.name(name).table(a("audit_entries")).if_not_exists();
            for c in cols {
                index.col(a(c));
            }
            m.create_index(index.to_owned()).await?;
        }
        let db = m.get_connection();
        let statements: &[&str] = match db.get_database_backend() {
            sea_orm::DatabaseBackend::Postgres => &[
                "CREATE OR REPLACE FUNCTION clm_audit_append_only() RETURNS trigger AS $$
                 BEGIN
                   IF TG_OP = 'UPDATE' AND current_setting('clm.audit_redaction', true) = 'on' THEN
                     RETURN NEW;
                   END IF;
                   RAISE EXCEPTION 'audit_entries is append-only: % refused', TG_OP
                     USING ERRCODE = 'insufficient_privilege';
                 END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER audit_entries_append_only BEFORE UPDATE OR DELETE ON audit_entries
                 FOR EACH ROW EXECUTE FUNCTION clm_audit_append_only()",
                "CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries
                 FOR EACH STATEMENT EXECUTE FUNCTION clm_audit_append_only()",
            ],
            _ => &[
                "CREATE TRIGGER IF NOT EXISTS audit_entries_no_delete BEFORE DELETE ON audit_entries
                 BEGIN SELECT RAISE(ABORT, 'audit_entries is append-only: DELETE refused'); END",
                "CREATE TRIGGER IF NOT EXISTS audit_entries_no_update BEFORE UPDATE ON audit_entries
                 WHEN OLD.redacted_us IS NOT NULL OR NEW.redacted_us IS NULL
                   OR NEW.id <> OLD.id OR NEW.time_us <> OLD.time_us OR NEW.actor <> OLD.actor
                   OR NEW.roles <> OLD.roles OR NEW.rpc <> OLD.rpc
                   OR NEW.field_mask <> OLD.field_mask
                 BEGIN SELECT RAISE(ABORT, 'audit_entries is append-only: UPDATE refused'); END",
            ],
        };
        for sql in statements {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Gives operations a lease (`owner`, `lease_until_us`) and a cancel flag
/// (see [`crate::operations`]).
pub struct OperationLeases;

impl MigrationName for OperationLeases {
    fn name(&self) -> &str {
        "m0002_platform_operation_leases"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OperationLeases {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        for sql in [
            "ALTER TABLE operations ADD COLUMN owner VARCHAR(64) NULL",
            "ALTER TABLE operations ADD COLUMN lease_until_us BIGINT NULL",
            "ALTER TABLE operations ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE",
            "CREATE INDEX IF NOT EXISTS operations_open ON operations (done, kind, create_us)",
        ] {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// Creates `timer_queue`, the timer queue of every kind (see [`crate::timers`]).
pub struct TimerQueue;

impl MigrationName for TimerQueue {
    fn name(&self) -> &str {
        "m0002_platform_timer_queue"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for TimerQueue {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("timer_queue"))
                .if_not_exists()
                .col(ColumnDef::new(a("kind")).string().not_null())
                .col(ColumnDef::new(a("key")).string().not_null())
                .col(ColumnDef::new(a("subject")).string().not_null())
                .col(ColumnDef::new(a("due_us")).big_integer().not_null())
                .col(ColumnDef::new(a("version")).big_integer().not_null())
                .col(ColumnDef::new(a("payload")).blob())
                .primary_key(Index::create().col(a("kind")).col(a("key")))
                .to_owned(),
        )
        .await?;
        for (name, cols) in [
            ("timer_queue_due", &["kind", "due_us"][..]),
            ("timer_queue_subject", &["subject"][..]),
        ] {
            let mut index = Index::create();
            index.name(name).table(a("timer_queue")).if_not_exists();
            for c in cols {
                index.col(a(c));
            }
            m.create_index(index.to_owned()).await?;
        }
        Ok(())
    }
}

/// Gives outbox events the W3C trace context of the call that committed
/// them (`traceparent`, NULL when untraced), so subscribers continue it.
pub struct OutboxTraceContext;

impl MigrationName for OutboxTraceContext {
    fn name(&self) -> &str {
        "m0003_platform_outbox_trace_context"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxTraceContext {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.get_connection()
            .execute_unprepared("ALTER TABLE outbox ADD COLUMN traceparent VARCHAR(128) NULL")
            .await?;
        Ok(())
    }
}

/// Drops the unique index on `outbox.event_id` (PostgreSQL). Event ids are
/// UUIDv7s made by [`crate::outbox`] and never looked up in the outbox
/// (consumers deduplicate in their own tables), so the index only cost a
/// B-tree insert per event, and another when the relay stamps the event's
/// position (the stamp rewrites the row). SQLite keeps it: its inline
/// constraint cannot be dropped without rebuilding the table, and it has
/// no relay.
pub struct OutboxEventIdUnindexed;

impl MigrationName for OutboxEventIdUnindexed {
    fn name(&self) -> &str {
        "m0004_platform_outbox_event_id_unindexed"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxEventIdUnindexed {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            db.execute_unprepared(
                "ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_event_id_key",
            )
            .await?;
        }
        Ok(())
    }
}

/// Keeps unstamped events out of `outbox_position` (PostgreSQL): the
/// unique index becomes partial, `WHERE position IS NOT NULL`. Every event
/// is inserted with a NULL position and stamped by the relay, so the full
/// index took one B-tree entry per event that no query reads (readers ask
/// `position > $1`, the relay `MAX(position)`, both of which the partial
/// index answers) and kept it until vacuum. SQLite stamps in the writing
/// transaction and keeps its index as it is.
pub struct OutboxPositionStampedOnly;

impl MigrationName for OutboxPositionStampedOnly {
    fn name(&self) -> &str {
        "m0005_platform_outbox_position_stamped_only"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxPositionStampedOnly {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            db.execute_unprepared("DROP INDEX IF EXISTS outbox_position")
                .await?;
            db.execute_unprepared(
                "CREATE UNIQUE INDEX outbox_position ON outbox (position) WHERE position IS NOT NULL",
            )
            .await?;
        }
        Ok(())
    }
}

/// Stamps positions per writing transaction instead of per event
/// (PostgreSQL; see [`crate::outbox`]): `outbox_txns` holds one row per
/// transaction that appended events, inserted by a statement trigger on
/// `outbox` and stamped by the relay with the transaction's first and last
/// position; an event's position is its transaction's `base` plus its
/// sequence's offset from the transaction's lowest (`lo`). The relay no
/// longer rewrites event rows, so an event costs its insert only.
///
/// Events stamped before become one-event transactions keyed by their
/// negated position (their positions do not change); events not stamped
/// yet become one-event transactions that the relay stamps next. Every
/// backend gets the view `outbox_events` (each event with its position, or
/// NULL while unstamped), for tests and operators.
pub struct OutboxTransactionStamps;

impl MigrationName for OutboxTransactionStamps {
    fn name(&self) -> &str {
        "m0006_platform_outbox_transaction_stamps"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for OutboxTransactionStamps {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        let statements: &[&str] = if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            &[
                "CREATE TABLE outbox_txns (txn BIGINT NOT NULL PRIMARY KEY, \
                 lo BIGINT NULL, base BIGINT NULL, last BIGINT NULL)",
                "ALTER TABLE outbox ADD COLUMN txn BIGINT NULL",
                "UPDATE outbox SET txn = -position WHERE position IS NOT NULL",
                // Below every negated position (positions stay under 2^62).
                "UPDATE outbox SET txn = -4611686018427387904 - sequence WHERE position IS NULL",
                "INSERT INTO outbox_txns (txn, lo, base, last) \
                 SELECT txn, sequence, position, position FROM outbox WHERE position IS NOT NULL",
                "INSERT INTO outbox_txns (txn) SELECT txn FROM outbox WHERE position IS NULL",
                "ALTER TABLE outbox ALTER COLUMN txn SET DEFAULT (pg_current_xact_id()::text::int8)",
                "ALTER TABLE outbox ALTER COLUMN txn SET NOT NULL",
                "CREATE INDEX outbox_txn ON outbox (txn, sequence)",
                "CREATE UNIQUE INDEX outbox_txns_last ON outbox_txns (last) WHERE last IS NOT NULL",
                "CREATE INDEX outbox_txns_unstamped ON outbox_txns (txn) WHERE last IS NULL",
                "DROP INDEX IF EXISTS outbox_unstamped",
                "DROP INDEX IF EXISTS outbox_position",
                "CREATE OR REPLACE FUNCTION clm_outbox_txn() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN INSERT INTO outbox_txns (txn) VALUES (pg_current_xact_id()::text::int8) \
                 ON CONFLICT DO NOTHING; RETURN NULL; END $$",
                "CREATE TRIGGER outbox_txn AFTER INSERT ON outbox \
                 FOR EACH STATEMENT EXECUTE FUNCTION clm_outbox_txn()",
                "CREATE VIEW outbox_events AS SELECT t.base + (e.sequence - t.lo) AS position, \
                 e.sequence, e.event_id, e.event_type, e.subject, e.payload, e.occurred_us, \
                 e.traceparent FROM outbox e LEFT JOIN outbox_txns t \
                 ON t.txn = e.txn AND t.last IS NOT NULL",
            ]
        } else {
            &[
                "CREATE VIEW outbox_events AS SELECT position, sequence, event_id, event_type, \
               subject, payload, occurred_us, traceparent FROM outbox",
            ]
        };
        for sql in statements {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

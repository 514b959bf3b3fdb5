//! Tables every service has: the outbox, idempotency keys, the cursors of
//! the change streams it follows and the events it had to park (`dead_letters`). A service's migrator lists
//! [`platform_migrations`] first, then its own.

use sea_orm_migration::prelude::*;

/// The platform's migrations, to put first in a service's `Migrator`.
pub fn platform_migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(PlatformTables),
        Box::new(OutboxPositions),
        Box::new(OperationsTable),
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

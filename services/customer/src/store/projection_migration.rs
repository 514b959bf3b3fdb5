//! Schema of the report projection ([`super::projection`]).

use super::migration::a;
use sea_orm_migration::prelude::*;

/// `projection_marks`, and the projection's cursor on this service's own
/// stream set to its head: the rollups of a database migrated from a
/// version that kept them in the write transactions are current up to there.
pub struct ReportProjection;

impl MigrationName for ReportProjection {
    fn name(&self) -> &str {
        "m0009_report_projection"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ReportProjection {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("projection_marks"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("customer_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("position")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.get_connection()
            .execute_unprepared(&format!(
                "INSERT INTO consumer_cursors (source, sequence, update_us) \
                 SELECT '{}', COALESCE(MAX(position), 0), 0 FROM outbox WHERE 1 = 1 \
                 ON CONFLICT (source) DO NOTHING",
                crate::SERVICE
            ))
            .await?;
        Ok(())
    }
}

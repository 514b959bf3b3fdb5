//! Schema of the touchpoint rollups ([`super::activity`]), backfilled
//! set-based from the touchpoints already stored.

use super::migration::a;
use sea_orm_migration::prelude::*;

/// `touch_months`, `purchase_months` and `attribution_touches`, filled from
/// `touchpoints`, `move_paths` ([`super::journeys`]) from the stage history
/// and touchpoints, and `customers.first_conversion_month` (the UTC month of
/// `first_conversion_us`, the cohort of CLV and retention).
pub struct TouchpointRollups;

impl MigrationName for TouchpointRollups {
    fn name(&self) -> &str {
        "m0008_touchpoint_rollups"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for TouchpointRollups {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("touch_months"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("month")).integer().not_null())
                .col(ColumnDef::new(a("kinds")).integer().not_null())
                .col(ColumnDef::new(a("conv_us")).big_integer().null())
                .col(ColumnDef::new(a("conv_month")).integer().null())
                .primary_key(Index::create().col(a("customer_id")).col(a("month")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("purchase_months"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("month")).integer().not_null())
                .col(ColumnDef::new(a("currency")).string().not_null())
                .col(ColumnDef::new(a("orders")).big_integer().not_null())
                .col(ColumnDef::new(a("revenue_minor")).big_integer().not_null())
                .col(ColumnDef::new(a("conv_us")).big_integer().null())
                .col(ColumnDef::new(a("conv_month")).integer().null())
                .primary_key(
                    Index::create()
                        .col(a("customer_id"))
                        .col(a("month"))
                        .col(a("currency")),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("attribution_touches"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("occurred_us")).big_integer().not_null())
                .col(ColumnDef::new(a("event_id")).string().not_null())
                .col(ColumnDef::new(a("campaign")).string().not_null())
                .primary_key(
                    Index::create()
                        .col(a("customer_id"))
                        .col(a("occurred_us"))
                        .col(a("event_id")),
                )
                .to_owned(),
        )
        .await?;
        let mut paths = Table::create();
        paths
            .table(a("move_paths"))
            .if_not_exists()
            .col(
                ColumnDef::new(a("history_id"))
                    .big_integer()
                    .not_null()
                    .primary_key(),
            )
            .col(ColumnDef::new(a("customer_id")).string().not_null())
            .col(ColumnDef::new(a("from_stage")).small_integer().null())
            .col(ColumnDef::new(a("to_stage")).small_integer().not_null())
            .col(ColumnDef::new(a("change_us")).big_integer().not_null())
            .col(ColumnDef::new(a("prev_same_us")).big_integer().null());
        for i in 1..=super::journeys::STEPS {
            paths.col(ColumnDef::new(a(&format!("s{i}"))).string().null());
        }
        for i in 1..=super::journeys::STEPS {
            paths.col(ColumnDef::new(a(&format!("u{i}"))).big_integer().null());
        }
        m.create_table(paths.to_owned()).await?;
        m.create_index(super::migration::index(
            "move_paths_customer",
            "move_paths",
            &["customer_id", "change_us"],
        ))
        .await?;
        m.create_index(super::migration::index(
            "move_paths_stage_time",
            "move_paths",
            &["to_stage", "change_us"],
        ))
        .await?;
        m.get_connection()
            .execute_unprepared(&format!(
                "CREATE INDEX IF NOT EXISTS move_paths_leaving ON move_paths (change_us) WHERE {}",
                super::journeys::LEAVING
            ))
            .await?;
        // Pain points read the touchpoints of the last window before a
        // period's end by time, from the index alone.
        m.create_index(super::migration::index(
            "touchpoints_time",
            "touchpoints",
            &["occurred_us", "customer_id", "kind", "custom_type"],
        ))
        .await?;
        m.alter_table(
            Table::alter()
                .table(a("customers"))
                .add_column(ColumnDef::new(a("first_conversion_month")).integer().null())
                .to_owned(),
        )
        .await?;
        let db = m.get_connection();
        db.execute_unprepared(&format!(
            "UPDATE customers SET first_conversion_month = {} WHERE first_conversion_us IS NOT NULL",
            super::reports::month_sql("first_conversion_us")
        ))
        .await?;
        for sql in super::activity::rebuild_sql(None) {
            db.execute_unprepared(&sql).await?;
        }
        db.execute_unprepared(&super::journeys::fill_sql(None))
            .await?;
        for t in ["touch_months", "purchase_months"] {
            m.create_index(super::migration::index(
                &format!("{t}_conv"),
                t,
                &["conv_us"],
            ))
            .await?;
        }
        if db.get_database_backend() == sea_orm::DbBackend::Postgres {
            db.execute_unprepared(
                "ANALYZE touch_months, purchase_months, attribution_touches, move_paths, customers",
            )
            .await?;
        }
        Ok(())
    }
}

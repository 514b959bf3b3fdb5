//! Schema of campaigns and the indexes the KPI reports read through:
//! `campaigns`, `campaign_spend`, `customers.acquisition_campaign`.

use super::migration::{a, index};
use sea_orm_migration::prelude::*;

/// Campaign tables and report indexes.
pub struct CampaignTables;

impl MigrationName for CampaignTables {
    fn name(&self) -> &str {
        "m0007_campaigns_report_indexes_rollups"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CampaignTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("campaigns"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(ColumnDef::new(a("name")).string().not_null().unique_key())
                .col(ColumnDef::new(a("display_name")).string().not_null())
                .col(ColumnDef::new(a("channel")).small_integer().not_null())
                .col(ColumnDef::new(a("start_us")).big_integer().not_null())
                .col(ColumnDef::new(a("end_us")).big_integer().null())
                .col(ColumnDef::new(a("currency")).string().not_null())
                .col(
                    ColumnDef::new(a("total_spend_minor"))
                        .big_integer()
                        .not_null(),
                )
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .col(ColumnDef::new(a("update_us")).big_integer().not_null())
                .col(ColumnDef::new(a("version")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index("campaigns_start", "campaigns", &["start_us", "id"]))
            .await?;
        m.create_table(
            Table::create()
                .table(a("campaign_spend"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("campaign_id")).string().not_null())
                .col(ColumnDef::new(a("amount_minor")).big_integer().not_null())
                .col(ColumnDef::new(a("currency")).string().not_null())
                .col(ColumnDef::new(a("book_us")).big_integer().not_null())
                .col(ColumnDef::new(a("description")).text().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "campaign_spend_book",
            "campaign_spend",
            &["book_us", "campaign_id"],
        ))
        .await?;
        m.alter_table(
            Table::alter()
                .table(a("customers"))
                .add_column(ColumnDef::new(a("acquisition_campaign")).string().null())
                .to_owned(),
        )
        .await?;
        // Reports select moves by stage and time, and touchpoints by kind
        // per customer in time order.
        m.create_index(index(
            "stage_history_stage_time",
            "stage_history",
            &["to_stage", "change_us", "customer_id"],
        ))
        .await?;
        m.create_index(index(
            "touchpoints_kind_customer",
            "touchpoints",
            &["kind", "customer_id", "occurred_us"],
        ))
        .await?;
        rollups(m).await
    }
}

/// The rollup columns of [`super::rollups`], filled from the existing
/// history (set-based, the same SQL on both backends).
async fn rollups(m: &SchemaManager<'_>) -> Result<(), DbErr> {
    for (table, col) in [
        ("stage_history", "left_us"),
        ("customers", "first_conversion_us"),
        ("customers", "first_churn_us"),
    ] {
        m.alter_table(
            Table::alter()
                .table(a(table))
                .add_column(ColumnDef::new(a(col)).big_integer().null())
                .to_owned(),
        )
        .await?;
    }
    m.alter_table(
        Table::alter()
            .table(a("stage_history"))
            .add_column(ColumnDef::new(a("next_stage")).small_integer().null())
            .to_owned(),
    )
    .await?;
    let db = m.get_connection();
    for sql in [
        "UPDATE stage_history SET left_us = nx.next_us, next_stage = nx.next_stage FROM \
         (SELECT id, LEAD(change_us) OVER (PARTITION BY customer_id ORDER BY id) AS next_us, \
         LEAD(to_stage) OVER (PARTITION BY customer_id ORDER BY id) AS next_stage FROM stage_history) AS nx \
         WHERE nx.id = stage_history.id AND nx.next_us IS NOT NULL",
        "UPDATE customers SET first_conversion_us = (SELECT MIN(h.change_us) FROM stage_history h \
         WHERE h.customer_id = customers.id AND h.to_stage = 3)",
        "UPDATE customers SET first_churn_us = (SELECT MIN(h.change_us) FROM stage_history h \
         WHERE h.customer_id = customers.id AND h.to_stage = 6 AND h.change_us > customers.first_conversion_us) \
         WHERE first_conversion_us IS NOT NULL",
    ] {
        db.execute_unprepared(sql).await?;
    }
    m.create_index(index(
        "customers_first_conversion",
        "customers",
        &["first_conversion_us", "id"],
    ))
    .await?;
    m.create_index(index("stage_history_time", "stage_history", &["change_us"]))
        .await
}

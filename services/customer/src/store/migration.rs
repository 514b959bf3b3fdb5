//! Schema of the customer service. Times are microseconds since the epoch
//! (`*_us`), money is minor units plus a currency code.

use sea_orm_migration::prelude::*;

/// Runs the platform tables, then the customer tables.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(CustomerTables));
        m.push(Box::new(ConsentTables));
        m.push(Box::new(IdentifierTable));
        m.push(Box::new(MergeRedirects));
        m.push(Box::new(ErasureTables));
        m.push(Box::new(ReimportFlagAndExpectedReceipts));
        m.push(Box::new(super::kpi_migration::CampaignTables));
        m.push(Box::new(super::rollup_migration::TouchpointRollups));
        m.push(Box::new(super::projection_migration::ReportProjection));
        m
    }
}

struct CustomerTables;

impl MigrationName for CustomerTables {
    fn name(&self) -> &str {
        "m0002_customer_tables"
    }
}

pub(crate) fn a(s: &str) -> Alias {
    Alias::new(s)
}

pub(crate) fn index(name: &str, table: &str, cols: &[&str]) -> IndexCreateStatement {
    let mut i = Index::create();
    i.name(name).table(a(table)).if_not_exists();
    for c in cols {
        i.col(a(c));
    }
    i.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for CustomerTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("customers"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(
                    ColumnDef::new(a("external_id"))
                        .string()
                        .null()
                        .unique_key(),
                )
                .col(ColumnDef::new(a("email")).string().null().unique_key())
                .col(ColumnDef::new(a("display_name")).string().not_null())
                .col(ColumnDef::new(a("birth_date")).string().null())
                .col(ColumnDef::new(a("gender")).small_integer().null())
                .col(ColumnDef::new(a("income_minor")).big_integer().null())
                .col(ColumnDef::new(a("income_currency")).string().null())
                .col(ColumnDef::new(a("occupation")).string().null())
                .col(ColumnDef::new(a("stage")).small_integer().not_null())
                .col(
                    ColumnDef::new(a("stage_change_us"))
                        .big_integer()
                        .not_null(),
                )
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .col(ColumnDef::new(a("update_us")).big_integer().not_null())
                .col(ColumnDef::new(a("version")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index("customers_create", "customers", &["create_us", "id"]))
            .await?;
        m.create_index(index("customers_update", "customers", &["update_us", "id"]))
            .await?;
        m.create_index(index(
            "customers_display_name",
            "customers",
            &["display_name", "id"],
        ))
        .await?;
        m.create_index(index("customers_stage", "customers", &["stage"]))
            .await?;

        m.create_table(
            Table::create()
                .table(a("customer_attributes"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("key")).string().not_null())
                .col(ColumnDef::new(a("kind")).small_integer().not_null())
                .col(ColumnDef::new(a("string_value")).text().null())
                .col(ColumnDef::new(a("number_value")).double().null())
                .col(ColumnDef::new(a("bool_value")).boolean().null())
                .col(ColumnDef::new(a("time_us")).big_integer().null())
                .primary_key(Index::create().col(a("customer_id")).col(a("key")))
                .foreign_key(
                    ForeignKey::create()
                        .from(a("customer_attributes"), a("customer_id"))
                        .to(a("customers"), a("id"))
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "customer_attributes_key_string",
            "customer_attributes",
            &["key", "string_value"],
        ))
        .await?;
        m.create_index(index(
            "customer_attributes_key_number",
            "customer_attributes",
            &["key", "number_value"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("touchpoints"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("event_id"))
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("kind")).small_integer().not_null())
                .col(ColumnDef::new(a("custom_type")).string().null())
                .col(ColumnDef::new(a("occurred_us")).big_integer().not_null())
                .col(ColumnDef::new(a("record_us")).big_integer().not_null())
                .col(ColumnDef::new(a("usage_ms")).big_integer().null())
                .col(ColumnDef::new(a("product")).string().null())
                .col(ColumnDef::new(a("feature")).string().null())
                .col(ColumnDef::new(a("revenue_minor")).big_integer().null())
                .col(ColumnDef::new(a("currency")).string().null())
                .col(ColumnDef::new(a("campaign")).string().null())
                .col(ColumnDef::new(a("channel")).string().null())
                .col(ColumnDef::new(a("properties")).text().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "touchpoints_timeline",
            "touchpoints",
            &["customer_id", "occurred_us", "event_id"],
        ))
        .await?;

        m.create_table(
            Table::create()
                .table(a("stage_history"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("from_stage")).small_integer().null())
                .col(ColumnDef::new(a("to_stage")).small_integer().not_null())
                .col(ColumnDef::new(a("reason")).text().not_null())
                .col(ColumnDef::new(a("actor")).string().not_null())
                .col(ColumnDef::new(a("change_us")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "stage_history_customer",
            "stage_history",
            &["customer_id", "id"],
        ))
        .await
    }
}

struct ConsentTables;

impl MigrationName for ConsentTables {
    fn name(&self) -> &str {
        "m0003_consent_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ConsentTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("customer_consent"))
                .if_not_exists()
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("purpose")).small_integer().not_null())
                .col(ColumnDef::new(a("channel")).small_integer().not_null())
                .col(ColumnDef::new(a("state")).small_integer().not_null())
                .col(ColumnDef::new(a("source")).small_integer().not_null())
                .col(ColumnDef::new(a("actor")).string().not_null())
                .col(ColumnDef::new(a("update_us")).big_integer().not_null())
                .primary_key(
                    Index::create()
                        .col(a("customer_id"))
                        .col(a("purpose"))
                        .col(a("channel")),
                )
                .foreign_key(
                    ForeignKey::create()
                        .from(a("customer_consent"), a("customer_id"))
                        .to(a("customers"), a("id"))
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("consent_history"))
                .if_not_exists()
                .col(
                    ColumnDef::new(a("id"))
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("purpose")).small_integer().not_null())
                .col(ColumnDef::new(a("channel")).small_integer().not_null())
                .col(ColumnDef::new(a("from_state")).small_integer().not_null())
                .col(ColumnDef::new(a("to_state")).small_integer().not_null())
                .col(ColumnDef::new(a("source")).small_integer().not_null())
                .col(ColumnDef::new(a("actor")).string().not_null())
                .col(ColumnDef::new(a("change_us")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "consent_history_customer",
            "consent_history",
            &["customer_id", "id"],
        ))
        .await
    }
}

struct IdentifierTable;

impl MigrationName for IdentifierTable {
    fn name(&self) -> &str {
        "m0004_customer_identifiers"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for IdentifierTable {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("customer_identifiers"))
                .if_not_exists()
                .col(ColumnDef::new(a("kind")).small_integer().not_null())
                .col(ColumnDef::new(a("value")).string().not_null())
                .col(ColumnDef::new(a("customer_id")).string().not_null())
                .col(ColumnDef::new(a("profile")).boolean().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .primary_key(Index::create().col(a("kind")).col(a("value")))
                .foreign_key(
                    ForeignKey::create()
                        .from(a("customer_identifiers"), a("customer_id"))
                        .to(a("customers"), a("id"))
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "customer_identifiers_customer",
            "customer_identifiers",
            &["customer_id", "kind", "value"],
        ))
        .await?;
        backfill_profile_identifiers(m).await
    }
}

/// Customers created before identifiers existed get their profile e-mail
/// and external id as identifiers, in batches.
async fn backfill_profile_identifiers(m: &SchemaManager<'_>) -> Result<(), DbErr> {
    use clm_domain::contact::{IdentifierKind, external_key};
    let db = m.get_connection();
    let rows = db
        .query_all(
            Query::select()
                .columns(["id", "email", "external_id", "create_us"].map(a))
                .from(a("customers")),
        )
        .await?;
    let mut values: Vec<[SimpleExpr; 5]> = Vec::new();
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let create_us: i64 = row.try_get("", "create_us")?;
        let email: Option<String> = row.try_get("", "email")?;
        let external: Option<String> = row.try_get("", "external_id")?;
        let keys = email
            .map(|e| (IdentifierKind::Email, e))
            .into_iter()
            .chain(external.map(|x| (IdentifierKind::External, external_key(&x))));
        for (kind, value) in keys {
            values.push([
                kind.code().into(),
                value.into(),
                id.clone().into(),
                true.into(),
                create_us.into(),
            ]);
        }
    }
    for chunk in values.chunks(clm_platform::db::rows_per_statement(5)) {
        let mut insert = Query::insert();
        insert
            .into_table(a("customer_identifiers"))
            .columns(["kind", "value", "customer_id", "profile", "create_us"].map(a));
        for v in chunk {
            insert
                .values(v.clone())
                .map_err(|e| DbErr::Custom(e.to_string()))?;
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

struct MergeRedirects;

impl MigrationName for MergeRedirects {
    fn name(&self) -> &str {
        "m0005_merge_redirects"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MergeRedirects {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(a("customers"))
                .add_column(ColumnDef::new(a("merged_from")).text().null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("customer_redirects"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(ColumnDef::new(a("survivor_id")).string().not_null())
                .col(ColumnDef::new(a("merge_us")).big_integer().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "customer_redirects_survivor",
            "customer_redirects",
            &["survivor_id"],
        ))
        .await
    }
}

struct ErasureTables;

impl MigrationName for ErasureTables {
    fn name(&self) -> &str {
        "m0006_erasure_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ErasureTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(a("erasure_requests"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).string().not_null().primary_key())
                .col(
                    ColumnDef::new(a("customer_id"))
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(a("requester")).string().not_null())
                .col(ColumnDef::new(a("create_us")).big_integer().not_null())
                .col(ColumnDef::new(a("complete_us")).big_integer().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "erasure_requests_create",
            "erasure_requests",
            &["create_us", "id"],
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("erasure_receipts"))
                .if_not_exists()
                .col(ColumnDef::new(a("erasure_id")).string().not_null())
                .col(ColumnDef::new(a("service")).string().not_null())
                .col(ColumnDef::new(a("erase_us")).big_integer().not_null())
                .primary_key(Index::create().col(a("erasure_id")).col(a("service")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("erased_identifiers"))
                .if_not_exists()
                .col(ColumnDef::new(a("kind")).small_integer().not_null())
                .col(ColumnDef::new(a("hash")).string().not_null())
                .col(ColumnDef::new(a("erasure_id")).string().not_null())
                .primary_key(Index::create().col(a("kind")).col(a("hash")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("erasure_salt"))
                .if_not_exists()
                .col(ColumnDef::new(a("id")).integer().not_null().primary_key())
                .col(ColumnDef::new(a("salt")).string().not_null())
                .to_owned(),
        )
        .await?;
        // One random salt per installation, made here so that readers
        // never have to create it.
        let salt = format!(
            "{}{}",
            clm_domain::ids::Uuid::new_v4().simple(),
            clm_domain::ids::Uuid::new_v4().simple()
        );
        let mut insert = Query::insert();
        insert
            .into_table(a("erasure_salt"))
            .columns([a("id"), a("salt")])
            .values_panic([1.into(), salt.into()])
            .on_conflict(OnConflict::column(a("id")).do_nothing().to_owned());
        m.get_connection().execute(&insert).await?;
        Ok(())
    }
}

struct ReimportFlagAndExpectedReceipts;

impl MigrationName for ReimportFlagAndExpectedReceipts {
    fn name(&self) -> &str {
        "m0007_reimport_flag_and_expected_receipts"
    }
}

/// The services every request made before this migration expects
/// receipts from (all five, as then).
pub const ALL_ERASING_SERVICES: &str = "customer,scoring,segmentation,feedback,loyalty";

#[async_trait::async_trait]
impl MigrationTrait for ReimportFlagAndExpectedReceipts {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Two statements: SQLite adds one column per ALTER TABLE.
        m.alter_table(
            Table::alter()
                .table(a("customers"))
                .add_column(
                    ColumnDef::new(a("reimported_after_erasure"))
                        .boolean()
                        .not_null()
                        .default(false),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(a("erasure_requests"))
                .add_column(
                    ColumnDef::new(a("expected_services"))
                        .string()
                        .not_null()
                        .default(ALL_ERASING_SERVICES),
                )
                .to_owned(),
        )
        .await
    }
}

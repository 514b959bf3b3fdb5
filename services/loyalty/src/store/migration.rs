//! Schema of the loyalty service. Times are microseconds since the epoch
//! (`*_us`); an expiry of `i64::MAX` means never.

use clm_platform::migration::{big, index, small, text};
use sea_orm::{ConnectionTrait, Statement};
use sea_orm_migration::prelude::*;

/// Runs the platform tables, then the loyalty tables.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut m = clm_platform::migration::platform_migrations();
        m.push(Box::new(LoyaltyTables));
        m.push(Box::new(RewardSlots));
        m.push(Box::new(PrimaryProgram));
        m.push(Box::new(SpendableTimers));
        m.push(Box::new(MembersByCustomer));
        m.push(Box::new(BudgetSlots));
        m.push(Box::new(RedemptionBudget));
        m
    }
}

struct LoyaltyTables;

impl MigrationName for LoyaltyTables {
    fn name(&self) -> &str {
        "m0002_loyalty_tables"
    }
}

fn a(s: &str) -> Alias {
    Alias::new(s)
}

fn big_null(c: &str) -> ColumnDef {
    ColumnDef::new(a(c)).big_integer().null().to_owned()
}

fn id(c: &str) -> ColumnDef {
    ColumnDef::new(a(c))
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for LoyaltyTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Programs: the encoded Program (without name and etag) and its version.
        m.create_table(
            Table::create()
                .table(a("loyalty_programs"))
                .if_not_exists()
                .col(text("id").primary_key())
                .col(ColumnDef::new(a("body")).blob().not_null())
                .col(big("version"))
                .col(big("create_us"))
                .col(big("update_us"))
                .to_owned(),
        )
        .await?;
        // One row per (program, customer): the lock every change of a
        // member's ledger takes first (in (program, customer) order).
        m.create_table(
            Table::create()
                .table(a("loyalty_members"))
                .if_not_exists()
                .col(text("program"))
                .col(text("customer"))
                .col(text("tier"))
                .col(big("tier_us"))
                .col(big_null("below_us"))
                .col(big("enroll_us"))
                .col(ColumnDef::new(a("referral_code")).string().null())
                .col(ColumnDef::new(a("referred_by")).string().null())
                .primary_key(Index::create().col(a("program")).col(a("customer")))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "loyalty_members_tier",
            "loyalty_members",
            &["program", "tier", "customer"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("loyalty_lots"))
                .if_not_exists()
                .col(id("id"))
                .col(text("program"))
                .col(text("customer"))
                .col(big("amount"))
                .col(big("remaining"))
                .col(big("earn_us"))
                .col(big("spendable_us"))
                .col(big("expire_us"))
                .col(big("txn"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "loyalty_lots_member",
            "loyalty_lots",
            &["program", "customer", "expire_us"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("loyalty_transactions"))
                .if_not_exists()
                .col(id("id"))
                .col(text("program"))
                .col(text("customer"))
                .col(small("kind"))
                .col(big("points"))
                .col(text("rule"))
                .col(text("reason"))
                .col(text("actor"))
                .col(text("request_id"))
                .col(text("source"))
                .col(big("at_us"))
                .col(big("lot"))
                .to_owned(),
        )
        .await?;
        // What caused a transaction makes it once (a replayed event, a
        // second expiry of one lot).
        m.create_index(index(
            "loyalty_transactions_source",
            "loyalty_transactions",
            &["program", "source"],
            true,
        ))
        .await?;
        m.create_index(index(
            "loyalty_transactions_member",
            "loyalty_transactions",
            &["program", "customer", "at_us"],
            false,
        ))
        .await?;
        // Per-lot draws of spend, refund and expire transactions.
        m.create_table(
            Table::create()
                .table(a("loyalty_draws"))
                .if_not_exists()
                .col(big("txn"))
                .col(big("lot"))
                .col(big("amount"))
                .primary_key(Index::create().col(a("txn")).col(a("lot")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("loyalty_rewards"))
                .if_not_exists()
                .col(text("program"))
                .col(text("id"))
                .col(ColumnDef::new(a("body")).blob().not_null())
                .col(big("cost"))
                .col(big_null("stock"))
                .col(big("per_member_limit"))
                .col(text("campaign"))
                .col(big("value_minor"))
                .col(big("version"))
                .col(big("create_us"))
                .primary_key(Index::create().col(a("program")).col(a("id")))
                .to_owned(),
        )
        .await?;
        // What each campaign's redemptions have cost (totals are in the program).
        m.create_table(
            Table::create()
                .table(a("loyalty_budgets"))
                .if_not_exists()
                .col(text("program"))
                .col(text("campaign"))
                .col(big("spent_minor"))
                .primary_key(Index::create().col(a("program")).col(a("campaign")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(a("loyalty_redemptions"))
                .if_not_exists()
                .col(text("id").primary_key())
                .col(text("program"))
                .col(text("customer"))
                .col(text("reward"))
                .col(text("campaign"))
                .col(big("cost"))
                .col(big("value_minor"))
                .col(big("spend_txn"))
                .col(small("state"))
                .col(text("code"))
                .col(small("code_kind"))
                .col(small("coupon_state"))
                .col(big("coupon_expire_us"))
                .col(big_null("use_us"))
                .col(big("create_us"))
                .col(big_null("cancel_us"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "loyalty_redemptions_code",
            "loyalty_redemptions",
            &["code"],
            true,
        ))
        .await?;
        m.create_index(index(
            "loyalty_redemptions_member",
            "loyalty_redemptions",
            &["program", "customer", "reward"],
            false,
        ))
        .await?;
        m.create_table(
            Table::create()
                .table(a("loyalty_referral_codes"))
                .if_not_exists()
                .col(text("code").primary_key())
                .col(text("program"))
                .col(text("customer"))
                .to_owned(),
        )
        .await?;
        m.create_index(index(
            "loyalty_referral_codes_member",
            "loyalty_referral_codes",
            &["program", "customer"],
            true,
        ))
        .await?;
        // One claim per referee and program.
        m.create_table(
            Table::create()
                .table(a("loyalty_referrals"))
                .if_not_exists()
                .col(text("program"))
                .col(text("referee"))
                .col(text("referrer"))
                .col(text("code"))
                .col(small("state"))
                .col(big("claim_us"))
                .col(big_null("reward_us"))
                .primary_key(Index::create().col(a("program")).col(a("referee")))
                .to_owned(),
        )
        .await?;
        Ok(())
    }
}

struct RewardSlots;

impl MigrationName for RewardSlots {
    fn name(&self) -> &str {
        "m0003_reward_slots"
    }
}

/// The default number of stock slots of a reward (`Reward.stock_slots`).
pub const DEFAULT_SLOTS: i64 = 16;

#[async_trait::async_trait]
impl MigrationTrait for RewardSlots {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // A limited reward's stock, spread over counter rows: a redemption
        // takes a unit from any slot that has one, so concurrent
        // redemptions lock different rows. Unlimited rewards have none.
        m.create_table(
            Table::create()
                .table(a("loyalty_reward_slots"))
                .if_not_exists()
                .col(text("program"))
                .col(text("reward"))
                .col(small("slot"))
                .col(big("stock"))
                .primary_key(
                    Index::create()
                        .col(a("program"))
                        .col(a("reward"))
                        .col(a("slot")),
                )
                .to_owned(),
        )
        .await?;
        // Existing limited rewards: their stock spread over the default
        // number of slots (slot i holds stock / 16, plus one for the first
        // stock % 16), the same spread as `clm_domain::loyalty::spread`.
        let slots: Vec<String> = (0..DEFAULT_SLOTS)
            .map(|i| format!("SELECT {i} AS n"))
            .collect();
        let sql = format!(
            "INSERT INTO loyalty_reward_slots (program, reward, slot, stock) \
             SELECT r.program, r.id, s.n, r.stock / {DEFAULT_SLOTS} \
               + CASE WHEN s.n < r.stock % {DEFAULT_SLOTS} THEN 1 ELSE 0 END \
             FROM loyalty_rewards r, ({}) s WHERE r.stock IS NOT NULL",
            slots.join(" UNION ALL ")
        );
        m.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }
}

struct PrimaryProgram;

impl MigrationName for PrimaryProgram {
    fn name(&self) -> &str {
        "m0004_primary_program"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PrimaryProgram {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // `Program.primary` as a column, so the primary program is one
        // indexed read and at most one program can hold it.
        m.alter_table(
            Table::alter()
                .table(a("loyalty_programs"))
                .add_column(
                    ColumnDef::new(a("is_primary"))
                        .small_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        m.get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX IF NOT EXISTS loyalty_programs_primary \
                 ON loyalty_programs (is_primary) WHERE is_primary = 1",
            )
            .await?;
        Ok(())
    }
}

struct SpendableTimers;

impl MigrationName for SpendableTimers {
    fn name(&self) -> &str {
        "m0005_points_spendable_timers"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SpendableTimers {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Lots still pending when this runs get the `loyalty.points_spendable`
        // timer new earnings arm (the balance event and the tier review at
        // their spendable instant): pending points now count towards tiers
        // only from then.
        let now_us = chrono::Utc::now().timestamp_micros();
        let sql = format!(
            "INSERT INTO timer_queue (kind, key, subject, due_us, version, payload) \
             SELECT 'loyalty.points_spendable', 'spendable/' || CAST(id AS TEXT), customer, \
               spendable_us, 1, NULL \
             FROM loyalty_lots \
             WHERE spendable_us > earn_us AND spendable_us < expire_us \
               AND spendable_us > {now_us} AND remaining > 0 \
             ON CONFLICT DO NOTHING"
        );
        m.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }
}

struct MembersByCustomer;

impl MigrationName for MembersByCustomer {
    fn name(&self) -> &str {
        "m0006_members_by_customer"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MembersByCustomer {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // Every member row of some customers, in all programs (a stream
        // batch's lock, timers, merges, erasure): the primary key leads
        // with the program, so the customer needs its own index.
        m.create_index(index(
            "loyalty_members_customer",
            "loyalty_members",
            &["customer"],
            false,
        ))
        .await
    }
}

struct BudgetSlots;

impl MigrationName for BudgetSlots {
    fn name(&self) -> &str {
        "m0007_budget_slots"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for BudgetSlots {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // What is left of each campaign's total budget, spread over counter
        // rows like a reward's stock (`store::slots`); `loyalty_budgets`
        // (what was spent) is read once here and no longer written.
        m.create_table(
            Table::create()
                .table(a("loyalty_budget_slots"))
                .if_not_exists()
                .col(text("program"))
                .col(text("campaign"))
                .col(small("slot"))
                .col(big("left_minor"))
                .primary_key(
                    Index::create()
                        .col(a("program"))
                        .col(a("campaign"))
                        .col(a("slot")),
                )
                .to_owned(),
        )
        .await?;
        let db = m.get_connection();
        let backend = db.get_database_backend();
        let mut spent = std::collections::HashMap::new();
        for row in db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT program, campaign, spent_minor FROM loyalty_budgets",
            ))
            .await?
        {
            let key: (String, String) = (row.try_get("", "program")?, row.try_get("", "campaign")?);
            spent.insert(key, row.try_get::<i64>("", "spent_minor")?);
        }
        for row in db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT id, body FROM loyalty_programs",
            ))
            .await?
        {
            let id: String = row.try_get("", "id")?;
            let body: Vec<u8> = row.try_get("", "body")?;
            let program = <clm_proto::loyalty::Program as prost::Message>::decode(body.as_slice())
                .map_err(|e| DbErr::Custom(format!("programs/{id}: {e}")))?;
            for b in &program.campaign_budgets {
                let Some(total) = &b.total else { continue };
                let used = spent
                    .get(&(id.clone(), b.campaign.clone()))
                    .copied()
                    .unwrap_or(0);
                super::budget(&id, &b.campaign)
                    .replace(db, Some(total.amount_minor - used), BUDGET_SLOTS)
                    .await
                    .map_err(|e| DbErr::Custom(e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The counter rows of a campaign's total budget.
pub const BUDGET_SLOTS: usize = 16;

struct RedemptionBudget;

impl MigrationName for RedemptionBudget {
    fn name(&self) -> &str {
        "m0008_redemption_budget"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for RedemptionBudget {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // What a redemption took from its campaign's total budget, so a
        // cancellation gives back exactly that (nothing when the campaign
        // had no total at the redemption).
        m.alter_table(
            Table::alter()
                .table(a("loyalty_redemptions"))
                .add_column(
                    ColumnDef::new(a("budget_minor"))
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        // Before, active redemptions of a campaign with a total were counted.
        m.get_connection()
            .execute_unprepared(
                "UPDATE loyalty_redemptions SET budget_minor = value_minor \
                 WHERE state = 1 AND value_minor > 0 AND EXISTS (SELECT 1 FROM loyalty_budget_slots s \
                   WHERE s.program = loyalty_redemptions.program \
                     AND s.campaign = loyalty_redemptions.campaign)",
            )
            .await?;
        Ok(())
    }
}

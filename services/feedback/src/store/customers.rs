//! `fb_customers`: what feedback keeps of each customer from the customer
//! stream: the stage (for summaries by stage), the `language` attribute
//! (for invitations) and survey consent per channel (a bit mask).

use super::entity::fb_customers::{self, Column as FC, Entity as Customers};
use clm_platform::Result;
use clm_platform::db::is_postgres;
use sea_orm::sea_query::{LockType, OnConflict};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

pub use fb_customers::Model as Row;

/// The consent bit of a `ConsentChannel` number.
pub fn bit(channel: i32) -> i32 {
    1 << channel.clamp(0, 30)
}

/// The rows of `customers` (missing ones are absent); on PostgreSQL locked
/// `FOR UPDATE` in customer order, so invitations of one customer take
/// turns (the fatigue cap is checked under this lock).
pub async fn lock(db: &impl ConnectionTrait, customers: &[String]) -> Result<Vec<Row>> {
    let mut q = Customers::find()
        .filter(FC::Customer.is_in(customers.iter().cloned()))
        .order_by_asc(FC::Customer);
    if is_postgres(db) {
        q = q.lock(LockType::Update);
    }
    Ok(q.all(db).await?)
}

/// One customer's row.
pub async fn get(db: &impl ConnectionTrait, customer: &str) -> Result<Option<Row>> {
    Ok(Customers::find_by_id(customer.to_owned()).one(db).await?)
}

/// Writes a customer's row (insert or replace).
pub async fn put(db: &impl ConnectionTrait, row: Row) -> Result<()> {
    Customers::insert(fb_customers::ActiveModel::from(row))
        .on_conflict(
            OnConflict::column(FC::Customer)
                .update_columns([FC::Stage, FC::Language, FC::Consent])
                .to_owned(),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// Forgets `customers`.
pub async fn delete(db: &impl ConnectionTrait, customers: &[String]) -> Result<()> {
    Customers::delete_many()
        .filter(FC::Customer.is_in(customers.iter().cloned()))
        .exec(db)
        .await?;
    Ok(())
}

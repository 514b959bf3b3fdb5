//! Consent: the current state per purpose and channel
//! ([`customer_consent`](super::entity::customer_consent), an absent row is
//! unset) and every change ([`consent_history`](super::entity::consent_history)).

use super::entity::consent_history;
use super::entity::customer_consent::{self, Column};
use chrono::{DateTime, Utc};
use clm_domain::consent::{Channel, ConsentSource, ConsentState, Purpose};
use clm_domain::ids::CustomerId;
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

/// The stated consent for one purpose and channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRecord {
    /// The purpose.
    pub purpose: Purpose,
    /// The channel.
    pub channel: Channel,
    /// The state.
    pub state: ConsentState,
    /// Where it came from.
    pub source: ConsentSource,
    /// Who recorded it.
    pub actor: String,
    /// When.
    pub update_time: DateTime<Utc>,
}

/// One change of consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChangeRecord {
    /// The purpose.
    pub purpose: Purpose,
    /// The channel.
    pub channel: Channel,
    /// The state before.
    pub from: ConsentState,
    /// The state after.
    pub to: ConsentState,
    /// Where it came from.
    pub source: ConsentSource,
    /// Who recorded it.
    pub actor: String,
    /// When.
    pub change_time: DateTime<Utc>,
}

fn decode<T>(what: &str, code: i16, f: fn(i16) -> Option<T>) -> Result<T, Error> {
    f(code).ok_or_else(|| Error::internal(format!("stored {what} code {code}")))
}

impl ConsentRecord {
    fn from_model(m: customer_consent::Model) -> Result<Self, Error> {
        Ok(Self {
            purpose: decode("purpose", m.purpose, Purpose::from_code)?,
            channel: decode("channel", m.channel, Channel::from_code)?,
            state: decode("state", m.state, ConsentState::from_code)?,
            source: decode("source", m.source, ConsentSource::from_code)?,
            actor: m.actor,
            update_time: from_micros(m.update_us),
        })
    }
}

impl ConsentChangeRecord {
    fn from_model(m: consent_history::Model) -> Result<Self, Error> {
        Ok(Self {
            purpose: decode("purpose", m.purpose, Purpose::from_code)?,
            channel: decode("channel", m.channel, Channel::from_code)?,
            from: decode("state", m.from_state, ConsentState::from_code)?,
            to: decode("state", m.to_state, ConsentState::from_code)?,
            source: decode("source", m.source, ConsentSource::from_code)?,
            actor: m.actor,
            change_time: from_micros(m.change_us),
        })
    }
}

/// The stated consent of `customer` (one statement), ordered by purpose and channel.
pub async fn current(
    db: &impl ConnectionTrait,
    customer: CustomerId,
) -> Result<Vec<ConsentRecord>, Error> {
    customer_consent::Entity::find()
        .filter(Column::CustomerId.eq(customer.to_string()))
        .order_by_asc(Column::Purpose)
        .order_by_asc(Column::Channel)
        .all(db)
        .await?
        .into_iter()
        .map(ConsentRecord::from_model)
        .collect()
}

/// The stated consent of several customers (one statement), each row
/// with its customer's id.
pub async fn current_of_many(
    db: &impl ConnectionTrait,
    customers: &[CustomerId],
) -> Result<Vec<(String, ConsentRecord)>, Error> {
    customer_consent::Entity::find()
        .filter(Column::CustomerId.is_in(customers.iter().map(ToString::to_string)))
        .all(db)
        .await?
        .into_iter()
        .map(|m| Ok((m.customer_id.clone(), ConsentRecord::from_model(m)?)))
        .collect()
}

/// Applies `changes` to `customer`'s consent: one upsert for the current
/// state, one insert for the history.
pub async fn apply(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    changes: &[ConsentChangeRecord],
) -> Result<(), Error> {
    if changes.is_empty() {
        return Ok(());
    }
    let id = customer.to_string();
    customer_consent::Entity::insert_many(changes.iter().map(|c| customer_consent::ActiveModel {
        customer_id: ActiveValue::Set(id.clone()),
        purpose: ActiveValue::Set(c.purpose.code()),
        channel: ActiveValue::Set(c.channel.code()),
        state: ActiveValue::Set(c.to.code()),
        source: ActiveValue::Set(c.source.code()),
        actor: ActiveValue::Set(c.actor.clone()),
        update_us: ActiveValue::Set(to_micros(c.change_time)),
    }))
    .on_conflict(
        OnConflict::columns([Column::CustomerId, Column::Purpose, Column::Channel])
            .update_columns([
                Column::State,
                Column::Source,
                Column::Actor,
                Column::UpdateUs,
            ])
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    consent_history::Entity::insert_many(changes.iter().map(|c| consent_history::ActiveModel {
        id: ActiveValue::NotSet,
        customer_id: ActiveValue::Set(id.clone()),
        purpose: ActiveValue::Set(c.purpose.code()),
        channel: ActiveValue::Set(c.channel.code()),
        from_state: ActiveValue::Set(c.from.code()),
        to_state: ActiveValue::Set(c.to.code()),
        source: ActiveValue::Set(c.source.code()),
        actor: ActiveValue::Set(c.actor.clone()),
        change_us: ActiveValue::Set(to_micros(c.change_time)),
    }))
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The newest `limit` changes of `customer`'s consent, oldest first.
pub async fn history(
    db: &impl ConnectionTrait,
    customer: CustomerId,
    limit: u64,
) -> Result<Vec<ConsentChangeRecord>, Error> {
    let mut rows = consent_history::Entity::find()
        .filter(consent_history::Column::CustomerId.eq(customer.to_string()))
        .order_by_desc(consent_history::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(ConsentChangeRecord::from_model)
        .collect::<Result<Vec<_>, _>>()?;
    rows.reverse();
    Ok(rows)
}

//! Campaigns and their spend entries, through the
//! [`campaigns`](super::entity::campaigns) and
//! [`campaign_spend`](super::entity::campaign_spend) entities.

use super::entity::campaign_spend as spend;
use super::entity::campaigns::{self, Column};
use chrono::{DateTime, Utc};
use clm_domain::ids::CampaignId;
use clm_platform::Error;
use clm_platform::db::{from_micros, to_micros};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, Condition, ConnectionTrait, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect,
};

/// Channel codes (`CampaignChannel` numbers): 1 e-mail .. 7 other.
pub const CHANNELS: std::ops::RangeInclusive<i16> = 1..=7;

/// A stored campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRecord {
    /// Id.
    pub id: CampaignId,
    /// Name to show.
    pub display_name: String,
    /// Channel code (see [`CHANNELS`]).
    pub channel: i16,
    /// Start.
    pub start_time: DateTime<Utc>,
    /// End, none while open-ended.
    pub end_time: Option<DateTime<Utc>>,
    /// ISO 4217 code of every spend entry.
    pub currency: String,
    /// Sum of the spend entries (minor units).
    pub total_spend_minor: i64,
    /// Creation time.
    pub create_time: DateTime<Utc>,
    /// Last update.
    pub update_time: DateTime<Utc>,
    /// Version (the etag).
    pub version: i64,
}

/// A stored spend entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendRecord {
    /// The campaign.
    pub campaign: CampaignId,
    /// Amount in minor units of the campaign's currency.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
    /// When booked.
    pub book_time: DateTime<Utc>,
    /// What for.
    pub description: String,
    /// When recorded.
    pub create_time: DateTime<Utc>,
}

impl CampaignRecord {
    fn to_model(&self) -> campaigns::Model {
        campaigns::Model {
            id: self.id.to_string(),
            name: self.id.name(),
            display_name: self.display_name.clone(),
            channel: self.channel,
            start_us: to_micros(self.start_time),
            end_us: self.end_time.map(to_micros),
            currency: self.currency.clone(),
            total_spend_minor: self.total_spend_minor,
            create_us: to_micros(self.create_time),
            update_us: to_micros(self.update_time),
            version: self.version,
        }
    }

    fn from_model(m: campaigns::Model) -> Result<Self, Error> {
        Ok(Self {
            id: CampaignId::parse_id("id", &m.id).map_err(Error::internal)?,
            display_name: m.display_name,
            channel: m.channel,
            start_time: from_micros(m.start_us),
            end_time: m.end_us.map(from_micros),
            currency: m.currency,
            total_spend_minor: m.total_spend_minor,
            create_time: from_micros(m.create_us),
            update_time: from_micros(m.update_us),
            version: m.version,
        })
    }
}

/// Inserts a campaign.
pub async fn insert(db: &impl ConnectionTrait, r: &CampaignRecord) -> Result<(), Error> {
    campaigns::Entity::insert(r.to_model().into_active_model())
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// The campaign, or NOT_FOUND.
pub async fn get(db: &impl ConnectionTrait, id: CampaignId) -> Result<CampaignRecord, Error> {
    match campaigns::Entity::find_by_id(id.to_string())
        .one(db)
        .await?
    {
        Some(m) => CampaignRecord::from_model(m),
        None => Err(Error::NotFound(id.name())),
    }
}

/// Writes every field of `r` if the stored version is still
/// `expected_version`; whether it was.
pub async fn update(
    db: &impl ConnectionTrait,
    r: &CampaignRecord,
    expected_version: i64,
) -> Result<bool, Error> {
    let mut row = r.to_model().into_active_model().reset_all();
    row.id = ActiveValue::NotSet;
    Ok(campaigns::Entity::update_many()
        .set(row)
        .filter(Column::Id.eq(r.id.to_string()))
        .filter(Column::Version.eq(expected_version))
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// Books `s` and adds it to the campaign's total (one insert, one update,
/// in the caller's transaction).
pub async fn add_spend(db: &impl ConnectionTrait, s: &SpendRecord) -> Result<(), Error> {
    spend::ActiveModel {
        id: ActiveValue::NotSet,
        campaign_id: ActiveValue::Set(s.campaign.to_string()),
        amount_minor: ActiveValue::Set(s.amount_minor),
        currency: ActiveValue::Set(s.currency.clone()),
        book_us: ActiveValue::Set(to_micros(s.book_time)),
        description: ActiveValue::Set(s.description.clone()),
        create_us: ActiveValue::Set(to_micros(s.create_time)),
    }
    .insert(db)
    .await?;
    campaigns::Entity::update_many()
        .col_expr(
            Column::TotalSpendMinor,
            Expr::col(Column::TotalSpendMinor).add(s.amount_minor),
        )
        .col_expr(Column::UpdateUs, Expr::val(to_micros(s.create_time)))
        .col_expr(Column::Version, Expr::col(Column::Version).add(1))
        .filter(Column::Id.eq(s.campaign.to_string()))
        .exec(db)
        .await?;
    Ok(())
}

/// Up to `limit` campaigns by (start, id) after `after`, of `channel` if
/// set, running at some time in `[period.0, period.1)` if set.
pub async fn list(
    db: &impl ConnectionTrait,
    channel: Option<i16>,
    period: Option<(i64, i64)>,
    after: Option<(i64, String)>,
    limit: u64,
) -> Result<Vec<CampaignRecord>, Error> {
    let mut q = campaigns::Entity::find();
    if let Some(c) = channel {
        q = q.filter(Column::Channel.eq(c));
    }
    if let Some((start, end)) = period {
        q = q.filter(Column::StartUs.lt(end)).filter(
            Condition::any()
                .add(Column::EndUs.is_null())
                .add(Column::EndUs.gt(start)),
        );
    }
    if let Some((s, id)) = after {
        q = q.filter(
            Condition::any().add(Column::StartUs.gt(s)).add(
                Condition::all()
                    .add(Column::StartUs.eq(s))
                    .add(Column::Id.gt(id)),
            ),
        );
    }
    q.order_by_asc(Column::StartUs)
        .order_by_asc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(CampaignRecord::from_model)
        .collect()
}

/// Which of `names` (`campaigns/{id}`) name a stored campaign (one query).
pub async fn existing_names(
    db: &impl ConnectionTrait,
    names: &[String],
) -> Result<Vec<String>, Error> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    Ok(campaigns::Entity::find()
        .select_only()
        .column(Column::Name)
        .filter(Column::Name.is_in(names.iter().cloned()))
        .into_tuple::<String>()
        .all(db)
        .await?)
}

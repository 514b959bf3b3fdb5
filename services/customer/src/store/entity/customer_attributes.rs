//! `customer_attributes`: one row per custom attribute of a customer; the
//! value sits in the column of its `kind`.

use sea_orm::entity::prelude::*;

/// `kind` of a string value (in `string_value`).
pub const KIND_STRING: i16 = 1;
/// `kind` of a number (in `number_value`).
pub const KIND_NUMBER: i16 = 2;
/// `kind` of a boolean (in `bool_value`).
pub const KIND_BOOL: i16 = 3;
/// `kind` of a point in time (in `time_us`).
pub const KIND_TIME: i16 = 4;

/// A row of `customer_attributes`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "customer_attributes")]
pub struct Model {
    /// The customer.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Attribute key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub key: String,
    /// Which value column holds the value (`KIND_*`).
    pub kind: i16,
    /// String value.
    #[sea_orm(column_type = "Text", nullable)]
    pub string_value: Option<String>,
    /// Number value.
    pub number_value: Option<f64>,
    /// Boolean value.
    pub bool_value: Option<bool>,
    /// Time value (µs since the epoch).
    pub time_us: Option<i64>,
}

/// Relations of `customer_attributes`.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The customer the attribute belongs to.
    #[sea_orm(
        belongs_to = "super::customers::Entity",
        from = "Column::CustomerId",
        to = "super::customers::Column::Id",
        on_delete = "Cascade"
    )]
    Customer,
}

impl Related<super::customers::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Customer.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

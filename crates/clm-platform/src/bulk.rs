//! Batches of rows and lists of values sent to PostgreSQL as **one JSON
//! parameter**, expanded by `json_to_recordset` / `json_array_elements_text`.
//!
//! Why: a multi-row `VALUES` with a bind parameter per cell, or an
//! `IN ($1, …, $n)` list, has a different SQL text for every batch size, so
//! sqlx prepares (parses and plans) it anew each time, and a large one
//! takes longer to plan than to run. One JSON parameter keeps the text the
//! same whatever the batch holds: it is prepared once per connection, has no
//! bind-parameter limit, and the server parses one value instead of
//! thousands. SQLite plans cheaply and has one writer, so callers keep
//! their portable sea-query statements there and use these on PostgreSQL
//! ([`crate::db::is_postgres`]).
//!
//! ```text
//! INSERT INTO t (a, b) SELECT a, b FROM json_to_recordset($1::json) AS x(a text, b int8)
//! … WHERE customer = ANY(ARRAY(SELECT json_array_elements_text($1::json)))
//! ```

use crate::db::is_postgres;
use base64::Engine;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, SimpleExpr};
use sea_orm::{ConnectionTrait, Value};

/// A column type as `json_to_recordset` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// `text`.
    Text,
    /// `int2`.
    Int2,
    /// `int8`.
    Int8,
    /// `float8`.
    Float8,
    /// `bool`.
    Bool,
    /// `bytea`, carried as base64 text and decoded by the select list.
    Bytea,
}

impl ColType {
    fn sql(self) -> &'static str {
        match self {
            ColType::Text | ColType::Bytea => "text",
            ColType::Int2 => "int2",
            ColType::Int8 => "int8",
            ColType::Float8 => "float8",
            ColType::Bool => "bool",
        }
    }
}

/// Rows being collected for one `json_to_recordset` parameter.
#[derive(Debug)]
pub struct JsonRows {
    columns: &'static [(&'static str, ColType)],
    rows: Vec<serde_json::Value>,
}

impl JsonRows {
    /// No rows yet, of `columns` (name, type), in the order [`Self::push`]
    /// takes values.
    pub fn new(columns: &'static [(&'static str, ColType)]) -> Self {
        Self {
            columns,
            rows: Vec::new(),
        }
    }

    /// Adds a row: one value per column, in column order, as sea-query
    /// would bind it (so the SQLite statement and this one can share the
    /// code that makes a row's cells). Bytes travel as base64.
    ///
    /// # Panics
    /// When the row's length is not the number of columns (a caller bug).
    pub fn push<const N: usize>(&mut self, values: [Value; N]) {
        assert_eq!(
            N,
            self.columns.len(),
            "a JsonRows row has one value per column"
        );
        let row: serde_json::Map<String, serde_json::Value> = self
            .columns
            .iter()
            .zip(values)
            .map(|((name, _), v)| ((*name).to_owned(), json_cell(&v)))
            .collect();
        self.rows.push(serde_json::Value::Object(row));
    }

    /// Rows collected.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row was pushed.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The column names, comma-separated (an INSERT's column list).
    pub fn names(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `SELECT a, b, decode(c, 'base64') FROM json_to_recordset({param}::json)
    /// AS x(a text, b int8, c text)`, where `param` is the placeholder the
    /// statement binds [`Self::into_value`] to (`$1`).
    pub fn select(&self, param: &str) -> String {
        let list: Vec<String> = self
            .columns
            .iter()
            .map(|(n, t)| match t {
                ColType::Bytea => format!("decode(x.{n}, 'base64') AS {n}"),
                _ => format!("x.{n}"),
            })
            .collect();
        let types: Vec<String> = self
            .columns
            .iter()
            .map(|(n, t)| format!("{n} {}", t.sql()))
            .collect();
        format!(
            "SELECT {} FROM json_to_recordset({param}::json) AS x({})",
            list.join(", "),
            types.join(", ")
        )
    }

    /// The parameter: the rows as one JSON array.
    pub fn into_value(self) -> Value {
        serde_json::Value::Array(self.rows).to_string().into()
    }
}

fn json_cell(v: &Value) -> serde_json::Value {
    match v {
        Value::Bytes(Some(b)) => base64::engine::general_purpose::STANDARD.encode(b).into(),
        other => sea_orm::sea_query::value::sea_value_to_json_value(other),
    }
}

/// `col IN (values)`: on PostgreSQL `col = ANY(ARRAY(SELECT
/// json_array_elements_text($n::json)))` with the values as one JSON
/// parameter (the same SQL text for any number of values), elsewhere a
/// plain `IN` list. The array form matters: the planner turns it into an
/// index condition (`= ANY($initplan)`), while `col IN (SELECT
/// json_array_elements_text(…))` guesses 100 rows and hashes a full scan
/// of the table.
pub fn is_in_texts(db: &impl ConnectionTrait, col: &str, values: &[String]) -> SimpleExpr {
    if !is_postgres(db) {
        return Expr::col(Alias::new(col)).is_in(values.iter().cloned());
    }
    Expr::cust_with_values(
        format!("\"{col}\" = ANY(ARRAY(SELECT json_array_elements_text(CAST($1 AS json))))"),
        [text_list(values)],
    )
}

/// `values` as one JSON array parameter, for `json_array_elements_text`.
pub fn text_list(values: &[String]) -> Value {
    serde_json::Value::from(values.to_vec()).to_string().into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn select_decodes_bytea_and_types_every_column() {
        static COLS: [(&str, ColType); 3] = [
            ("a", ColType::Text),
            ("b", ColType::Int8),
            ("c", ColType::Bytea),
        ];
        let mut rows = JsonRows::new(&COLS);
        rows.push(["x".into(), 7i64.into(), vec![0u8, 255].into()]);
        assert_eq!(rows.names(), "a, b, c");
        assert_eq!(
            rows.select("$1"),
            "SELECT x.a, x.b, decode(x.c, 'base64') AS c FROM json_to_recordset($1::json) \
             AS x(a text, b int8, c text)"
        );
        let Value::String(Some(json)) = rows.into_value() else {
            panic!("a string")
        };
        assert_eq!(json.to_string(), r#"[{"a":"x","b":7,"c":"AP8="}]"#);
    }
}

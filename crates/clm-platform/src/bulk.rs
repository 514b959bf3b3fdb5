//! Lists of values sent to PostgreSQL as **one JSON parameter**.
//!
//! Why: an `IN ($1, …, $n)` list has a different SQL text for every
//! length, so sqlx prepares (parses and plans) the statement anew for each
//! batch size and its statement cache churns. One JSON array parameter
//! keeps the text the same for any number of values: the statement is
//! prepared once per connection and has no bind-parameter limit. SQLite
//! plans cheaply and keeps the plain list.
//!
//! ```text
//! … WHERE customer = ANY(ARRAY(SELECT json_array_elements_text($1::json)))
//! INSERT INTO t (customer) SELECT json_array_elements_text($1::json) …
//! ```
//!
//! Row batches stay multi-row `VALUES` with binary bind parameters, one
//! statement per full chunk of [`crate::db::rows_per_statement`]: measured
//! on the scoring ledger, `json_to_recordset` was slower (1,000,000 rows in
//! 14.1 s against 12.0 s), the server's JSON parsing costing more than the
//! planning it saves.

use crate::db::is_postgres;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, SimpleExpr};
use sea_orm::{ConnectionTrait, Value};

/// `col IN (values)`: on PostgreSQL `col = ANY(ARRAY(SELECT
/// json_array_elements_text($n::json)))` with the values as one JSON
/// parameter (the same SQL text for any number of values), elsewhere a
/// plain `IN` list. The array form matters: the planner turns it into an
/// index condition (`= ANY($initplan)`), while `col IN (SELECT
/// json_array_elements_text(…))` guesses 100 rows and hashes a full scan
/// of the table.
pub fn is_in_texts(db: &impl ConnectionTrait, col: &str, values: &[String]) -> SimpleExpr {
    if is_postgres(db) {
        any_of_json(col, values)
    } else {
        Expr::col(Alias::new(col)).is_in(values.iter().cloned())
    }
}

/// PostgreSQL's form of [`is_in_texts`].
fn any_of_json(col: &str, values: &[String]) -> SimpleExpr {
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
    use sea_orm::sea_query::{PostgresQueryBuilder, Query};

    #[test]
    fn a_list_is_one_json_parameter_whatever_its_length() {
        let select = |n: usize| {
            let texts: Vec<String> = (0..n).map(|i| format!("c\"{i}")).collect();
            Query::select()
                .column(Alias::new("a"))
                .from(Alias::new("t"))
                .and_where(Expr::col(Alias::new("b")).eq(1))
                .and_where(any_of_json("a", &texts))
                .to_owned()
                .build(PostgresQueryBuilder)
        };
        let (sql, values) = select(3);
        assert_eq!(
            sql,
            r#"SELECT "a" FROM "t" WHERE "b" = $1 AND ("a" = ANY(ARRAY(SELECT json_array_elements_text(CAST($2 AS json)))))"#
        );
        assert_eq!(
            values.0,
            vec![
                1.into(),
                Value::from(r#"["c\"0","c\"1","c\"2"]"#.to_owned())
            ]
        );
        assert_eq!(select(1_000).0, sql, "the same text for any length");
    }
}

//! Lists and rows of values sent to PostgreSQL in **statements of one
//! text**.
//!
//! Why: an `IN ($1, …, $n)` list or a multi-row `VALUES` has a different
//! SQL text for every length, so sqlx prepares (parses and plans) the
//! statement anew for each batch size and its statement cache churns. A
//! parameter holding the whole list keeps the text the same for any number
//! of values: the statement is prepared once per connection and has no
//! bind-parameter limit. SQLite plans cheaply and keeps the plain list.
//!
//! * Query-builder conditions ([`is_in_texts`]): one JSON array parameter.
//!
//!   ```text
//!   … WHERE customer = ANY(ARRAY(SELECT json_array_elements_text($1::json)))
//!   ```
//!
//! * Raw statements ([`rows`], [`any_text`]): one binary array parameter
//!   per column, `WITH v (customer_id, at_us) AS (SELECT * FROM
//!   unnest($1::text[], $2::int8[]))` and `customer_id = ANY($1::text[])`:
//!   no JSON for the server to parse. Array elements cannot be NULL here.
//!
//! Large row batches of entity inserts stay multi-row `VALUES` with binary
//! bind parameters, one statement per full chunk of
//! [`crate::db::rows_per_statement`]: measured on the scoring ledger,
//! `json_to_recordset` was slower (1,000,000 rows in 14.1 s against
//! 12.0 s), the server's JSON parsing costing more than the planning it
//! saves.

use crate::db::is_postgres;
use sea_orm::sea_query::ArrayType;
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

/// A column of [`rows`]: its element type on PostgreSQL (`text`, `int8`,
/// `int4`, `int2`, `bool`) and its values, one per row, none NULL (an
/// array parameter cannot hold one here).
pub type Column = (&'static str, Vec<Value>);

/// The row source of raw SQL's `WITH v (a, b, …) AS (<source>)`, its
/// parameters numbered from `$from`. On PostgreSQL `SELECT * FROM
/// unnest($from::t1[], …)`: one binary array parameter per column, so the
/// text is the same for any number of rows and each pooled connection
/// prepares the statement once (a multi-row `VALUES` is a new text, parsed
/// and planned again, for every row count). Elsewhere the plain `VALUES
/// (…), …`. Every column must have the same number of values, at least one.
pub fn rows(postgres: bool, from: usize, columns: Vec<Column>) -> (String, Vec<Value>) {
    let n = columns.first().map_or(0, |(_, v)| v.len());
    debug_assert!(columns.iter().all(|(_, v)| v.len() == n));
    if postgres {
        let sql = unnest(from, columns.iter().map(|(ty, _)| *ty));
        let values = columns
            .into_iter()
            .map(|(ty, v)| Value::Array(array_type(ty), Some(Box::new(v))))
            .collect();
        return (format!("SELECT * FROM {sql}"), values);
    }
    let width = columns.len();
    let mut values = Vec::with_capacity(n * width);
    let mut iters: Vec<_> = columns.into_iter().map(|(_, v)| v.into_iter()).collect();
    let mut tuples = Vec::with_capacity(n);
    for r in 0..n {
        values.extend(iters.iter_mut().filter_map(Iterator::next));
        let marks: Vec<String> = (0..width)
            .map(|c| format!("${}", from + r * width + c))
            .collect();
        tuples.push(format!("({})", marks.join(", ")));
    }
    (format!("VALUES {}", tuples.join(", ")), values)
}

/// PostgreSQL's `unnest($from::t1[], $from+1::t2[], …)` over array
/// parameters of the element types `types` (`text`, `int8`, `bytea`, …):
/// rows from one binary array per column, the same text for any number of
/// rows. Each parameter is typically a [`column`].
pub fn unnest<'a>(from: usize, types: impl IntoIterator<Item = &'a str>) -> String {
    let arrays: Vec<String> = types
        .into_iter()
        .enumerate()
        .map(|(i, ty)| format!("${}::{ty}[]", from + i))
        .collect();
    format!("unnest({})", arrays.join(", "))
}

/// One array parameter of [`unnest`]: the value `f` reads from each row.
/// Its element type must hold no NULL (sea-query cannot bind one in an
/// array).
pub fn column<T, V>(rows: &[T], f: impl Fn(&T) -> V) -> Value
where
    Vec<V>: Into<Value>,
{
    rows.iter().map(f).collect::<Vec<V>>().into()
}

/// `col` is one of `values`, for raw SQL, the parameter numbered `$from`:
/// on PostgreSQL `col = ANY($from::text[])` (one array parameter, the same
/// text for any number of values), elsewhere `col IN ($from, …)`.
pub fn any_text<S: AsRef<str>>(
    postgres: bool,
    col: &str,
    from: usize,
    values: &[S],
) -> (String, Vec<Value>) {
    let text = |v: &S| Value::from(v.as_ref().to_owned());
    if postgres {
        let array = values.iter().map(text).collect();
        return (
            format!("{col} = ANY(${from}::text[])"),
            vec![Value::Array(ArrayType::String, Some(Box::new(array)))],
        );
    }
    let marks: Vec<String> = (0..values.len())
        .map(|i| format!("${}", from + i))
        .collect();
    (
        format!("{col} IN ({})", marks.join(", ")),
        values.iter().map(text).collect(),
    )
}

fn array_type(ty: &str) -> ArrayType {
    match ty {
        "int8" => ArrayType::BigInt,
        "int4" => ArrayType::Int,
        "int2" => ArrayType::SmallInt,
        "bool" => ArrayType::Bool,
        _ => ArrayType::String,
    }
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

    #[test]
    fn rows_are_arrays_on_postgres_and_values_elsewhere() {
        let cols = || {
            vec![
                ("text", vec![Value::from("a"), Value::from("b")]),
                ("int8", vec![Value::from(1_i64), Value::from(2_i64)]),
            ]
        };
        let (sql, values) = rows(true, 3, cols());
        assert_eq!(sql, "SELECT * FROM unnest($3::text[], $4::int8[])");
        assert_eq!(values.len(), 2);
        assert!(matches!(&values[1], Value::Array(ArrayType::BigInt, Some(v)) if v.len() == 2));
        let (sql, values) = rows(false, 3, cols());
        assert_eq!(sql, "VALUES ($3, $4), ($5, $6)");
        assert_eq!(
            values,
            vec![
                Value::from("a"),
                Value::from(1_i64),
                Value::from("b"),
                Value::from(2_i64)
            ]
        );
    }

    #[test]
    fn any_text_is_one_array_on_postgres() {
        let ids = vec!["x".to_owned(), "y".to_owned()];
        assert_eq!(any_text(true, "c", 2, &ids).0, "c = ANY($2::text[])");
        assert_eq!(any_text(true, "c", 2, &ids).1.len(), 1);
        assert_eq!(any_text(false, "c", 2, &ids).0, "c IN ($2, $3)");
    }
}

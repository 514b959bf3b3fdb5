//! Keyset pagination with opaque page tokens: one typed [`Pager`] for every
//! list rpc of every service.
//!
//! # Convention
//!
//! A list rpc (AIP-158) reads `page_size` with
//! `clm_domain::validation::page_size`, builds a [`Pager`] from the parts of
//! the request that shape the query (filter, order_by, parent...), asks it
//! for the position to start [`after`](Pager::after) (typed by the sort
//! key: `i64` for a time in microseconds, `String` for a name...), fetches
//! `size + 1` rows after that position ordered by (sort key, unique id),
//! and lets [`Pager::page`] turn them into the page and its
//! `next_page_token`:
//!
//! ```ignore
//! let pager = Pager::new(&[&req.parent, &req.filter]);
//! let after = pager.after::<i64>(&req.page_token)?;
//! let rows = store::list(db, after, size as u64 + 1).await?;
//! let (items, next_page_token) =
//!     pager.page(&rows, size, to_proto, |r| (r.time_us, r.id.to_string()));
//! ```
//!
//! A token records the sort key of the last row returned, its unique
//! tie-breaker and a fingerprint of the query, so a token reused with
//! another query is refused instead of returning a wrong page, and a token
//! that is not one of ours (garbage, or tampered with: a string where a
//! number was) is `INVALID_ARGUMENT` on `page_token`, never an internal
//! error from the database.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clm_domain::Violation;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The request field every list rpc names its page token with (AIP-158).
pub const PAGE_TOKEN_FIELD: &str = "page_token";

/// Largest list response body: under the 4 MB that gRPC clients accept by
/// default, so a page never fails to arrive because of its size.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// What a page token holds: the query's fingerprint, the last sort value
/// and the last row's unique tie-breaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Token<K> {
    q: String,
    v: K,
    id: String,
}

/// Pages one list query; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pager {
    fingerprint: String,
}

impl Pager {
    /// A pager for the query shaped by `query` (filter, order_by, parent...:
    /// anything that changes which rows come in which order).
    pub fn new(query: &[&str]) -> Self {
        Self {
            fingerprint: fingerprint(query),
        }
    }

    /// The position (sort key, tie-breaker) after which the requested page
    /// starts; `None` for the first page (an empty token).
    pub fn after<K: DeserializeOwned>(
        &self,
        page_token: &str,
    ) -> Result<Option<(K, String)>, Violation> {
        if page_token.is_empty() {
            return Ok(None);
        }
        let bad = || {
            Violation::new(
                PAGE_TOKEN_FIELD,
                "is not a page token returned by this list call",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(page_token).map_err(|_| bad())?;
        let token: Token<K> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if token.q != self.fingerprint {
            return Err(Violation::new(
                PAGE_TOKEN_FIELD,
                "belongs to a different filter or order_by; start again without a token",
            ));
        }
        Ok(Some((token.v, token.id)))
    }

    /// The page made of `rows` (fetched with a limit of `size + 1`) turned
    /// into messages by `to_proto`, and the token of the next page (empty on
    /// the last). `key` gives a row's position: its sort key and unique
    /// tie-breaker. The page stops early (never before its first item) when
    /// it would outgrow [`MAX_PAGE_BYTES`].
    pub fn page<R, M: prost::Message, K: Serialize>(
        &self,
        rows: &[R],
        size: usize,
        to_proto: impl FnMut(&R) -> M,
        key: impl Fn(&R) -> (K, String),
    ) -> (Vec<M>, String) {
        let items = fill(rows.iter().map(to_proto), size);
        let next = match items.len().checked_sub(1).map(|i| &rows[i]) {
            Some(last) if rows.len() > items.len() => {
                let (v, id) = key(last);
                self.token(v, id)
            }
            _ => String::new(),
        };
        (items, next)
    }

    fn token<K: Serialize>(&self, v: K, id: String) -> String {
        let token = Token {
            q: self.fingerprint.clone(),
            v,
            id,
        };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
    }
}

/// Takes at most `limit` messages, stopping early (but never before the
/// first) when the page would outgrow [`MAX_PAGE_BYTES`]. A page shorter than
/// `page_size` with a next token is normal list behaviour (AIP-158).
pub fn fill<M: prost::Message>(items: impl IntoIterator<Item = M>, limit: usize) -> Vec<M> {
    let mut out = Vec::new();
    let mut bytes = 0;
    for m in items.into_iter().take(limit) {
        bytes += m.encoded_len() + 8;
        if bytes > MAX_PAGE_BYTES && !out.is_empty() {
            break;
        }
        out.push(m);
    }
    out
}

/// Fingerprint of a query's shape.
fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_respects_the_limit_and_the_byte_budget() {
        let small = (0..10).map(|i| prost_types::Timestamp {
            seconds: i,
            nanos: 0,
        });
        assert_eq!(fill(small, 4).len(), 4);
        let mb = || prost_types::Any {
            type_url: String::new(),
            value: vec![0; 1024 * 1024],
        };
        assert_eq!(
            fill((0..10).map(|_| mb()), 1000).len(),
            2,
            "2 MB fit in 3 MB, 3 do not"
        );
        let huge = prost_types::Any {
            type_url: String::new(),
            value: vec![0; 5 * 1024 * 1024],
        };
        assert_eq!(fill([huge], 10).len(), 1, "a page always makes progress");
    }

    fn ts(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn pages_round_trip_and_refuse_other_queries() {
        let pager = Pager::new(&["stage = RETENTION", "create_time"]);
        let rows: Vec<i64> = (1..=4).collect();
        let (items, next) = pager.page(&rows, 3, |r| ts(*r), |r| (*r, format!("id{r}")));
        assert_eq!(items.len(), 3);
        assert_eq!(pager.after::<i64>(&next), Ok(Some((3, "id3".to_owned()))));
        let (items, last) = pager.page(&rows[3..], 3, |r| ts(*r), |r| (*r, String::new()));
        assert_eq!(
            (items.len(), last.as_str()),
            (1, ""),
            "no token on the last page"
        );
        assert_eq!(pager.after::<i64>(""), Ok(None));
        let other = Pager::new(&["stage = LOYALTY", "create_time"]);
        assert_eq!(other.after::<i64>(&next).unwrap_err().field, "page_token");
        assert_eq!(
            pager.after::<i64>("garbage!").unwrap_err().field,
            "page_token"
        );
    }

    #[test]
    fn a_token_with_a_value_of_the_wrong_type_is_bad_input() {
        let pager = Pager::new(&["q"]);
        let by_name = pager.token("Ada".to_owned(), "id".into());
        assert!(pager.after::<String>(&by_name).is_ok());
        assert_eq!(
            pager.after::<i64>(&by_name).unwrap_err().field,
            "page_token"
        );
        let float = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"q":"{}","v":1.5,"id":"x"}}"#,
            pager.fingerprint
        ));
        assert_eq!(pager.after::<i64>(&float).unwrap_err().field, "page_token");
    }
}

//! Opaque page tokens for keyset pagination.
//!
//! A token records the sort key of the last row returned and a fingerprint
//! of the query (filter and order) it belongs to, so a token reused with
//! another query is refused instead of returning a wrong page.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clm_domain::Violation;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Position after the last row of a page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Fingerprint of the query.
    pub q: String,
    /// Last sort value (as text or number).
    pub v: serde_json::Value,
    /// Last row's unique tie-breaker.
    pub id: String,
}

/// Largest list response body: under the 4 MB that gRPC clients accept by
/// default, so a page never fails to arrive because of its size.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

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
pub fn fingerprint(parts: &[&str]) -> String {
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

/// Encodes a cursor as a page token.
pub fn encode(c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(c).unwrap_or_default())
}

/// Decodes a page token for the query with fingerprint `q`; empty = first page.
pub fn decode(field: &str, token: &str, q: &str) -> Result<Option<Cursor>, Violation> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Violation::new(field, "is not a page token returned by this list call");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let c: Cursor = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if c.q != q {
        return Err(Violation::new(
            field,
            "belongs to a different filter or order_by; start again without a token",
        ));
    }
    Ok(Some(c))
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

    #[test]
    fn round_trip_and_mismatch() {
        let q = fingerprint(&["stage = RETENTION", "create_time"]);
        let c = Cursor {
            q: q.clone(),
            v: 5.into(),
            id: "x".into(),
        };
        let t = encode(&c);
        assert_eq!(decode("page_token", &t, &q), Ok(Some(c)));
        assert!(decode("page_token", &t, "other").is_err());
        assert_eq!(
            decode("page_token", "garbage!", &q).unwrap_err().field,
            "page_token"
        );
    }
}

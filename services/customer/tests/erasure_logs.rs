//! Logs never carry an erased person's values: every log line of a whole
//! erasure journey (create, identifiers, erase, refused and flagged
//! re-imports, lookups) is captured and searched for them. One test in its
//! own binary, because the log subscriber is process-wide. SQLite +
//! in-process cache, or PostgreSQL + Redis when `CLM_TEST_DATABASE_URL` /
//! `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::config::ErasedIdentifierPolicy;
use clm_proto::customer as pb;
use pb::IdentifierType as It;
use std::io::Write;
use std::sync::{Arc, Mutex};

mod common;
use common::*;

/// Every log line, as written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

async fn journey(policy: ErasedIdentifierPolicy, tag: &str) {
    let h = start_with(|c| c.customer.erased_identifier_policy = policy).await;
    let mut c = h.client();
    let email = format!("secret-{tag}@example.com");
    let ada = c
        .create_customer(create_req(
            pb::Customer {
                email: email.clone(),
                external_id: format!("crm:secret-{tag}"),
                display_name: format!("Secret Person {tag}"),
                ..Default::default()
            },
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    c.add_customer_identifier(add(&ada.name, It::Phone, "+44 20 7946 0999"))
        .await
        .unwrap();
    erase(&mut c, ada.name.clone()).await;
    let again = c.create_customer(create_req(customer(&email), "")).await;
    let other = create(&mut c, &format!("other-{tag}@example.com")).await;
    let phone = c
        .add_customer_identifier(add(&other.name, It::Phone, "+44 20 7946 0999"))
        .await;
    match policy {
        ErasedIdentifierPolicy::Refuse => {
            assert!(again.is_err() && phone.is_err());
        }
        ErasedIdentifierPolicy::Flag => {
            assert!(again.unwrap().into_inner().reimported_after_erasure);
            phone.unwrap();
        }
    }
    // Lookups of what is gone, and a removal of what was never held.
    let _ = lookup(&mut c, It::Email, "nobody-secret@example.com").await;
    let _ = c
        .remove_customer_identifier(pb::RemoveCustomerIdentifierRequest {
            parent: other.name.clone(),
            identifier: ident(It::Email, "removed-secret@example.com"),
            request_id: String::new(),
        })
        .await;
    h.server.stop().await;
}

#[tokio::test]
async fn no_log_line_carries_an_erased_value() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_env_filter("debug,h2=info,hyper=info,tower=info,sqlx=info")
        .with_writer(captured.clone())
        .with_ansi(false)
        // Timestamps are digits too: one could contain the phone's.
        .without_time()
        .init();
    journey(ErasedIdentifierPolicy::Refuse, "refuse").await;
    journey(ErasedIdentifierPolicy::Flag, "flag").await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("reimported_after_erasure"),
        "the flag policy logs what it accepted (by hash): {logs}"
    );
    for secret in [
        "secret-refuse",
        "secret-flag",
        "Secret Person",
        "7946 0999",
        "79460999",
        "nobody-secret",
        "removed-secret",
    ] {
        assert!(
            !logs.to_lowercase().contains(&secret.to_lowercase()),
            "{secret} in the logs:\n{}",
            logs.lines()
                .filter(|l| l.to_lowercase().contains(&secret.to_lowercase()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

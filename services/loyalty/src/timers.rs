//! The loyalty timers on the platform queue, each fired at its exact
//! instant inside a transaction: lot expiry (what remains of a lot goes,
//! whatever created it), tier reviews (a grace period ends, a rolling
//! window moves) and coupon expiry. Lot and tier timers lock their members
//! first, in the order every writer uses.

use crate::ledger::{self, Program};
use crate::store;
use clm_domain::loyalty as dl;
use clm_platform::Error;
use clm_platform::changes::Apply;
use clm_platform::db::to_micros;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{OnDue, Timer};
use sea_orm::DatabaseTransaction;
use std::collections::{BTreeSet, HashMap};

fn subjects(due: &[Timer]) -> Vec<String> {
    let mut s: Vec<String> = due.iter().map(|t| t.subject.clone()).collect();
    s.sort();
    s.dedup();
    s
}

/// Expires lots.
#[derive(Debug)]
pub struct LotExpiry;

#[async_trait::async_trait]
impl OnDue for LotExpiry {
    async fn lock(&self, txn: &DatabaseTransaction, due: &[Timer]) -> Result<(), Error> {
        store::lock_customers(txn, &subjects(due)).await?;
        Ok(())
    }

    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let lots: Vec<i64> = due
            .iter()
            .filter_map(|t| t.key.strip_prefix("lot/")?.parse().ok())
            .collect();
        let txn = cx.txn();
        let made = ledger::expire_lots(txn, &lots, now).await?;
        let mut events = Vec::new();
        let mut programs: HashMap<String, Program> = HashMap::new();
        for (t, draws) in &made {
            if !programs.contains_key(&t.program) {
                programs.insert(t.program.clone(), Program::load(txn, &t.program).await?);
            }
            let balance = dl::balance(
                &store::open_lots(txn, &t.program, &t.customer, now).await?,
                now,
            );
            events.push(ledger::points_changed(
                &programs[&t.program],
                t,
                draws,
                balance,
            ));
        }
        for e in events {
            cx.emit(e);
        }
        Ok(())
    }
}

/// Reviews tiers.
#[derive(Debug)]
pub struct TierReview;

#[async_trait::async_trait]
impl OnDue for TierReview {
    async fn lock(&self, txn: &DatabaseTransaction, due: &[Timer]) -> Result<(), Error> {
        store::lock_customers(txn, &subjects(due)).await?;
        Ok(())
    }

    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let mut events = Vec::new();
        for t in &due {
            let Some((program, customer)) =
                t.key.strip_prefix("tier/").and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            let txn = cx.txn();
            let Some(m) = store::member(txn, program, customer).await? else {
                continue;
            };
            let p = Program::load(txn, program).await?;
            // Reviewed at the timer's own instant: the downgrade happens when the grace ends.
            if let Some(tc) = ledger::review_tier(txn, &p, &m, t.due_us.min(now)).await? {
                events.push(NewEvent::new(customer, &tc));
            }
        }
        for e in events {
            cx.emit(e);
        }
        Ok(())
    }
}

/// Pending points become spendable: the member's balance moves (a
/// PointsChanged without a transaction, so followers such as
/// segmentation's `loyalty.balance` are not stale) and, since spendable
/// points count towards tiers, its tier is reviewed (TierChanged if it moves).
#[derive(Debug)]
pub struct PointsSpendable;

#[async_trait::async_trait]
impl OnDue for PointsSpendable {
    async fn lock(&self, txn: &DatabaseTransaction, due: &[Timer]) -> Result<(), Error> {
        store::lock_customers(txn, &subjects(due)).await?;
        Ok(())
    }

    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let lots: Vec<i64> = due
            .iter()
            .filter_map(|t| t.key.strip_prefix("spendable/")?.parse().ok())
            .collect();
        let txn = cx.txn();
        // The lots' current owners (a merge may have moved them), once each.
        let owners: BTreeSet<(String, String)> =
            store::lot_owners(txn, &lots).await?.into_iter().collect();
        let mut events = Vec::new();
        let mut programs: HashMap<String, Program> = HashMap::new();
        for (program, customer) in owners {
            if !programs.contains_key(&program) {
                programs.insert(program.clone(), Program::load(txn, &program).await?);
            }
            let p = &programs[&program];
            let Some(m) = store::member(txn, &program, &customer).await? else {
                continue;
            };
            let balance = dl::balance(&store::open_lots(txn, &program, &customer, now).await?, now);
            events.push(ledger::points_spendable(p, &customer, balance));
            if let Some(tc) = ledger::review_tier(txn, p, &m, now).await? {
                events.push(NewEvent::new(&customer, &tc));
            }
        }
        for e in events {
            cx.emit(e);
        }
        Ok(())
    }
}

/// Expires coupons.
#[derive(Debug)]
pub struct CouponExpiry;

#[async_trait::async_trait]
impl OnDue for CouponExpiry {
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> Result<(), Error> {
        let now = to_micros(clm_domain::clock::micros(cx.now()));
        let codes: Vec<String> = due
            .iter()
            .filter_map(|t| t.key.strip_prefix("coupon/").map(str::to_owned))
            .collect();
        store::expire_codes(cx.txn(), &codes, now).await
    }
}

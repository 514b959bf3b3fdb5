//! Loyalty arithmetic: points live in lots (amount, remaining, spendable
//! and expiry instants); a spend draws from the spendable lots that expire
//! first and records each draw; a refund gives exactly those draws back to
//! the same lots (with their own expiry); expiry removes what remains of a
//! lot at its instant. The earning maths (points per unit of revenue, tier
//! multipliers, caps) and tier qualification (on points *earned*, never on
//! the balance) are here too. Pure: no I/O, times are microseconds.
//!
//! [`Ledger`] is the in-memory model of one member's ledger built from the
//! same functions the service uses in SQL transactions; the property test
//! drives it with random sequences and checks the invariants.

use std::collections::BTreeMap;

/// An expiry instant meaning "never" (stored as is, so comparisons need no NULL).
pub const NEVER: i64 = i64::MAX;

/// One lot of points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lot {
    /// Its id.
    pub id: i64,
    /// What is left of it.
    pub remaining: i64,
    /// From when it may be spent (µs).
    pub spendable_us: i64,
    /// When what remains expires (µs; [`NEVER`] if never).
    pub expire_us: i64,
}

impl Lot {
    /// Whether the lot can be spent from at `now_us`.
    pub fn spendable_at(&self, now_us: i64) -> bool {
        self.remaining > 0 && self.spendable_us <= now_us && self.expire_us > now_us
    }

    /// Whether the lot is still pending (earned, not yet spendable) at `now_us`.
    pub fn pending_at(&self, now_us: i64) -> bool {
        self.remaining > 0 && self.spendable_us > now_us && self.expire_us > now_us
    }
}

/// What a spend took from one lot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// The lot.
    pub lot: i64,
    /// Points taken from it.
    pub amount: i64,
}

/// A spend larger than the spendable balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insufficient {
    /// The spendable balance.
    pub balance: i64,
    /// What was asked.
    pub wanted: i64,
}

/// The spendable balance at `now_us`: the sum of the spendable lots' remainders.
pub fn balance(lots: &[Lot], now_us: i64) -> i64 {
    lots.iter()
        .filter(|l| l.spendable_at(now_us))
        .map(|l| l.remaining)
        .fold(0i64, i64::saturating_add)
}

/// Points earned but not spendable yet at `now_us`.
pub fn pending(lots: &[Lot], now_us: i64) -> i64 {
    lots.iter()
        .filter(|l| l.pending_at(now_us))
        .map(|l| l.remaining)
        .fold(0i64, i64::saturating_add)
}

/// Plans a spend of `amount` (> 0) at `now_us`: draws from the spendable
/// lots that expire first (then the earliest spendable, then the oldest
/// id), or [`Insufficient`] if they do not hold enough.
pub fn plan_spend(lots: &[Lot], amount: i64, now_us: i64) -> Result<Vec<Draw>, Insufficient> {
    let mut open: Vec<&Lot> = lots.iter().filter(|l| l.spendable_at(now_us)).collect();
    let have = open
        .iter()
        .map(|l| l.remaining)
        .fold(0i64, i64::saturating_add);
    if amount <= 0 || have < amount {
        return Err(Insufficient {
            balance: have,
            wanted: amount,
        });
    }
    open.sort_by_key(|l| (l.expire_us, l.spendable_us, l.id));
    let mut left = amount;
    let mut draws = Vec::new();
    for l in open {
        if left == 0 {
            break;
        }
        let take = l.remaining.min(left);
        draws.push(Draw {
            lot: l.id,
            amount: take,
        });
        left -= take;
    }
    Ok(draws)
}

/// Points for a purchase of `revenue_minor`: `points_per_unit` for every
/// whole `unit_minor` (no rounding up, no floats); 0 for bad rates.
pub fn purchase_points(revenue_minor: i64, unit_minor: i64, points_per_unit: i64) -> i64 {
    if revenue_minor <= 0 || unit_minor <= 0 || points_per_unit <= 0 {
        return 0;
    }
    (revenue_minor / unit_minor).saturating_mul(points_per_unit)
}

/// `points` times a tier multiplier in percent (100 = ×1), rounded down.
pub fn with_multiplier(points: i64, percent: i64) -> i64 {
    if percent <= 0 {
        return points;
    }
    i64::try_from(i128::from(points) * i128::from(percent) / 100).unwrap_or(i64::MAX)
}

/// What is left of `points` under a cap (0 = none) of which `used` is used.
pub fn capped(points: i64, cap: i64, used: i64) -> i64 {
    if cap <= 0 {
        return points;
    }
    points.min((cap - used).max(0))
}

/// The instant `months` calendar months after `at_us` (same day of month,
/// clamped to the month's last day), or `None` out of range.
pub fn add_months(at_us: i64, months: u32) -> Option<i64> {
    let t = chrono::DateTime::from_timestamp_micros(at_us)?;
    let later = t.checked_add_months(chrono::Months::new(months))?;
    Some(later.timestamp_micros())
}

/// `total` units spread over `slots` counters as evenly as integers allow:
/// each holds `total / slots`, and the first `total % slots` one more, so
/// the counters always sum to `total` (a reward's stock slots).
pub fn spread(total: i64, slots: usize) -> Vec<i64> {
    let n = i64::try_from(slots.max(1)).unwrap_or(i64::MAX);
    let (each, extra) = (total.max(0) / n, total.max(0) % n);
    (0..n).map(|i| each + i64::from(i < extra)).collect()
}

/// Start of the UTC day holding `at_us`.
pub fn day_start(at_us: i64) -> i64 {
    const DAY: i64 = 86_400_000_000;
    at_us.div_euclid(DAY) * DAY
}

/// The index of the highest tier whose threshold `earned` reaches, given
/// thresholds in ascending order (the first tier usually has 0); `None`
/// when no tier is reached.
pub fn qualifying_tier(thresholds: &[i64], earned: i64) -> Option<usize> {
    thresholds.iter().rposition(|t| earned >= *t)
}

/// What the tier rule decides for a member now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierMove {
    /// Stay in the current tier.
    Stay,
    /// Move up at once.
    Up(usize),
    /// Below the tier since `since_us`; kept until `until_us`.
    Grace {
        /// When it first fell below.
        since_us: i64,
        /// When the grace period ends.
        until_us: i64,
    },
    /// Move down (the grace period is over).
    Down(usize),
}

/// Decides the tier move of a member in tier `current` (index) whose
/// earned points qualify for `qualifying`, who has been below its tier
/// since `below_since_us` (if at all), with `grace_us` of grace, at `now_us`.
pub fn tier_move(
    current: Option<usize>,
    qualifying: Option<usize>,
    below_since_us: Option<i64>,
    grace_us: i64,
    now_us: i64,
) -> TierMove {
    match (current, qualifying) {
        (c, q) if q > c => TierMove::Up(q.unwrap_or(0)),
        (c, q) if q == c => TierMove::Stay,
        (_, q) => {
            let since = below_since_us.unwrap_or(now_us);
            let until = since.saturating_add(grace_us.max(0));
            if now_us >= until {
                TierMove::Down(q.unwrap_or(0))
            } else {
                TierMove::Grace {
                    since_us: since,
                    until_us: until,
                }
            }
        }
    }
}

/// The in-memory model of one member's ledger (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Lots by id.
    pub lots: BTreeMap<i64, Lot>,
    /// Draws of each spend, by spend id, and whether refunded.
    pub spends: BTreeMap<i64, (Vec<Draw>, bool)>,
    /// Points ever earned or added.
    pub credited: i64,
    /// Points spent and not refunded.
    pub spent: i64,
    /// Points expired.
    pub expired: i64,
    next: i64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn id(&mut self) -> i64 {
        self.next += 1;
        self.next
    }

    /// Earns `amount` (> 0) as a new lot; returns its id.
    pub fn earn(&mut self, amount: i64, spendable_us: i64, expire_us: i64) -> Option<i64> {
        if amount <= 0 {
            return None;
        }
        let id = self.id();
        self.lots.insert(
            id,
            Lot {
                id,
                remaining: amount,
                spendable_us,
                expire_us,
            },
        );
        self.credited += amount;
        Some(id)
    }

    /// Spends `amount` at `now_us`; returns the spend's id.
    pub fn spend(&mut self, amount: i64, now_us: i64) -> Result<i64, Insufficient> {
        let lots: Vec<Lot> = self.lots.values().copied().collect();
        let draws = plan_spend(&lots, amount, now_us)?;
        for d in &draws {
            if let Some(l) = self.lots.get_mut(&d.lot) {
                l.remaining -= d.amount;
            }
        }
        self.spent += amount;
        let id = self.id();
        self.spends.insert(id, (draws, false));
        Ok(id)
    }

    /// Refunds spend `id` into the lots it drew from, once; what returns
    /// into a lot expired by `now_us` expires at once. Returns the points
    /// given back.
    pub fn refund(&mut self, id: i64, now_us: i64) -> i64 {
        let Some((draws, refunded)) = self.spends.get_mut(&id) else {
            return 0;
        };
        if *refunded {
            return 0;
        }
        *refunded = true;
        let mut back = 0;
        for d in draws.iter() {
            if let Some(l) = self.lots.get_mut(&d.lot) {
                l.remaining += d.amount;
                back += d.amount;
            }
        }
        self.spent -= back;
        self.expire(now_us);
        back
    }

    /// Expires what remains of every lot whose instant is at or before `now_us`.
    pub fn expire(&mut self, now_us: i64) -> i64 {
        let mut gone = 0;
        for l in self.lots.values_mut() {
            if l.expire_us <= now_us && l.remaining > 0 {
                gone += l.remaining;
                l.remaining = 0;
            }
        }
        self.expired += gone;
        gone
    }

    /// The spendable balance.
    pub fn balance(&self, now_us: i64) -> i64 {
        let lots: Vec<Lot> = self.lots.values().copied().collect();
        balance(&lots, now_us)
    }

    /// What all lots still hold (spendable, pending or expired-but-not-yet-removed).
    pub fn held(&self) -> i64 {
        self.lots.values().map(|l| l.remaining).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lot(id: i64, remaining: i64, spendable_us: i64, expire_us: i64) -> Lot {
        Lot {
            id,
            remaining,
            spendable_us,
            expire_us,
        }
    }

    #[test]
    fn spends_from_the_soonest_expiring_spendable_lots() {
        let lots = [
            lot(1, 50, 0, 300),   // oldest, expires last
            lot(2, 30, 0, 100),   // expires first
            lot(3, 40, 500, 200), // pending
            lot(4, 20, 0, 200),
            lot(5, 10, 0, 5), // expired
        ];
        assert_eq!(balance(&lots, 10), 100);
        assert_eq!(pending(&lots, 10), 40);
        let d = plan_spend(&lots, 60, 10).unwrap();
        assert_eq!(
            d,
            vec![
                Draw { lot: 2, amount: 30 },
                Draw { lot: 4, amount: 20 },
                Draw { lot: 1, amount: 10 }
            ]
        );
        assert_eq!(
            plan_spend(&lots, 101, 10),
            Err(Insufficient {
                balance: 100,
                wanted: 101
            })
        );
        assert!(plan_spend(&lots, 0, 10).is_err());
    }

    #[test]
    fn earning_maths_is_integer() {
        assert_eq!(purchase_points(12_345, 100, 1), 123);
        assert_eq!(purchase_points(99, 100, 1), 0);
        assert_eq!(purchase_points(-5, 100, 1), 0);
        assert_eq!(with_multiplier(123, 150), 184);
        assert_eq!(capped(50, 100, 80), 20);
        assert_eq!(capped(50, 0, 80), 50);
        assert_eq!(capped(50, 10, 80), 0);
        let jan31 = chrono::DateTime::parse_from_rfc3339("2027-01-31T10:00:00Z")
            .unwrap()
            .timestamp_micros();
        let feb28 = chrono::DateTime::parse_from_rfc3339("2027-02-28T10:00:00Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(add_months(jan31, 1), Some(feb28));
        assert_eq!(day_start(86_400_000_000 + 5), 86_400_000_000);
    }

    #[test]
    fn tiers_go_up_at_once_and_down_after_the_grace_period() {
        let t = [0, 100, 500];
        assert_eq!(qualifying_tier(&t, 99), Some(0));
        assert_eq!(qualifying_tier(&t, 500), Some(2));
        assert_eq!(tier_move(Some(0), Some(1), None, 10, 0), TierMove::Up(1));
        assert_eq!(tier_move(Some(1), Some(1), None, 10, 0), TierMove::Stay);
        assert_eq!(
            tier_move(Some(2), Some(1), None, 10, 5),
            TierMove::Grace {
                since_us: 5,
                until_us: 15
            }
        );
        assert_eq!(
            tier_move(Some(2), Some(1), Some(5), 10, 15),
            TierMove::Down(1)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Earn {
            amount: i64,
            pending: i64,
            life: i64,
        },
        Spend(i64),
        Refund(usize),
        Advance(i64),
        Adjust(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..500, 0i64..3, 1i64..20).prop_map(|(amount, pending, life)| Op::Earn {
                amount,
                pending,
                life
            }),
            (1i64..800).prop_map(Op::Spend),
            (0usize..20).prop_map(Op::Refund),
            (0i64..4).prop_map(Op::Advance),
            (-300i64..300).prop_map(Op::Adjust),
        ]
    }

    #[test]
    fn a_spread_sums_to_its_total() {
        assert_eq!(spread(100, 16).iter().sum::<i64>(), 100);
        assert_eq!(spread(3, 4), vec![1, 1, 1, 0]);
        assert_eq!(spread(0, 2), vec![0, 0]);
        assert_eq!(spread(7, 0), vec![7]);
    }

    proptest! {
        /// Over random earn, spend, refund, expire and adjust: the balance
        /// is the sum of the spendable lots, never negative, nothing is
        /// lost or doubled (credited = held + spent + expired), and a
        /// refund gives each lot back exactly what was drawn from it.
        #[test]
        fn the_ledger_never_loses_doubles_or_overdraws(ops in proptest::collection::vec(op(), 1..80)) {
            let mut l = Ledger::new();
            let mut now = 0i64;
            let mut spends = Vec::new();
            for o in ops {
                match o {
                    Op::Earn { amount, pending, life } => {
                        l.earn(amount, now + pending, now + life);
                    }
                    Op::Spend(a) => {
                        let before = l.balance(now);
                        match l.spend(a, now) {
                            Ok(id) => {
                                prop_assert_eq!(l.balance(now), before - a);
                                spends.push(id);
                            }
                            Err(e) => {
                                prop_assert!(a > before);
                                prop_assert_eq!(e.balance, before);
                            }
                        }
                    }
                    Op::Refund(i) => {
                        if let Some(id) = spends.get(i).copied() {
                            let before: BTreeMap<i64, i64> = l.lots.iter().map(|(k, v)| (*k, v.remaining)).collect();
                            let (draws, was) = l.spends[&id].clone();
                            let back = l.refund(id, now);
                            if was {
                                prop_assert_eq!(back, 0);
                            } else {
                                prop_assert_eq!(back, draws.iter().map(|d| d.amount).sum::<i64>());
                                for d in &draws {
                                    let lot = l.lots[&d.lot];
                                    if lot.expire_us > now {
                                        prop_assert_eq!(lot.remaining, before[&d.lot] + d.amount);
                                    } else {
                                        prop_assert_eq!(lot.remaining, 0);
                                    }
                                }
                            }
                        }
                    }
                    Op::Advance(d) => {
                        now += d;
                        l.expire(now);
                    }
                    Op::Adjust(a) => {
                        if a > 0 {
                            l.earn(a, now, NEVER);
                        } else if a < 0 && l.spend(-a, now).is_err() {
                            prop_assert!(-a > l.balance(now));
                        }
                    }
                }
                let lots: Vec<Lot> = l.lots.values().copied().collect();
                prop_assert!(l.balance(now) >= 0);
                prop_assert!(lots.iter().all(|x| x.remaining >= 0));
                prop_assert_eq!(
                    l.balance(now),
                    lots.iter().filter(|x| x.spendable_at(now)).map(|x| x.remaining).sum::<i64>()
                );
                prop_assert_eq!(l.credited, l.held() + l.spent + l.expired);
            }
        }
    }
}

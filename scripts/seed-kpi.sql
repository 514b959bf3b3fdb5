-- KPI data set for scripts/seed-kpi.sh: set-based inserts only (one
-- statement per table, generate_series), on a database migrated by the
-- customer service. Variables: customers, touchpoints_per_customer,
-- campaigns. Times: customers are created through 2025, every move and
-- touchpoint follows; 1 hour = 3.6e9 µs.
\set ON_ERROR_STOP on
\timing off
SET synchronous_commit = off;

\echo '[seed] campaigns and spend'
CREATE TEMP TABLE seed_campaigns AS
SELECT i, gen_random_uuid()::text AS id,
       1 + (i % 7) AS channel,
       CASE WHEN i % 10 = 0 THEN 'USD' ELSE 'EUR' END AS currency
FROM generate_series(0, :campaigns - 1) AS i;
INSERT INTO campaigns (id, name, display_name, channel, start_us, end_us, currency,
                       total_spend_minor, create_us, update_us, version)
SELECT id, 'campaigns/' || id, 'Campaign ' || i, channel,
       1735689600000000, NULL, currency, 12 * (100000 + (i * 7919) % 900000),
       1735689600000000, 1735689600000000, 1
FROM seed_campaigns;
-- One entry a month through 2025.
INSERT INTO campaign_spend (campaign_id, amount_minor, currency, book_us, description, create_us)
SELECT c.id, 100000 + (c.i * 7919) % 900000, c.currency,
       1735689600000000 + m * 2629746000000, 'monthly media', 1735689600000000
FROM seed_campaigns c CROSS JOIN generate_series(0, 11) AS m;

\echo '[seed] customers'
CREATE TEMP TABLE seed_customers AS
SELECT n, gen_random_uuid()::text AS id,
       -- created through 2025
       1735689600000000 + n::bigint * (31536000000000 / :customers) AS create_us,
       (n::bigint * 7919) % 100 AS r1, (n::bigint * 104729) % 100 AS r2, (n::bigint * 1299709) % 100 AS r3
FROM generate_series(0, :customers - 1) AS n;
CREATE INDEX ON seed_customers (n);
ANALYZE seed_customers;

-- Stage moves: APPROACH at creation; 70 % → ACQUISITION after 1..20 days;
-- of them 5 % fall back to APPROACH; 40 % → CONVERSION 1..30 days later;
-- 25 % → RETENTION 10..60 days later; 8 % → LOYALTY 30..120 days later;
-- 10 % (r3 < 10) churn 20 days after their last move.
CREATE TEMP TABLE seed_moves AS
WITH p AS (
  SELECT n, id, create_us, r1, r2, r3,
         create_us + (1 + r2 % 20) * 86400000000::bigint AS acq_us,
         create_us + (1 + r2 % 20) * 86400000000::bigint + (1 + r3 % 30) * 86400000000::bigint AS conv_us
  FROM seed_customers
), q AS (
  SELECT p.*, conv_us + (10 + r1 % 50) * 86400000000::bigint AS ret_us,
         conv_us + (10 + r1 % 50) * 86400000000::bigint + (30 + r2 % 90) * 86400000000::bigint AS loy_us
  FROM p
)
SELECT id, NULL::smallint AS from_stage, 1::smallint AS to_stage, create_us AS change_us FROM q
UNION ALL SELECT id, 1, 2, acq_us FROM q WHERE r1 < 70
UNION ALL SELECT id, 2, 1, acq_us + 3600000000 * 24 FROM q WHERE r1 < 70 AND r1 >= 40 AND r2 < 5
UNION ALL SELECT id, 2, 3, conv_us FROM q WHERE r1 < 40
UNION ALL SELECT id, 3, 4, ret_us FROM q WHERE r1 < 25
UNION ALL SELECT id, 4, 5, loy_us FROM q WHERE r1 < 8
UNION ALL SELECT id, last_stage, 6,
    last_us + 20 * 86400000000::bigint FROM (
      SELECT id, r3,
        CASE WHEN r1 < 8 THEN 5 WHEN r1 < 25 THEN 4 WHEN r1 < 40 THEN 3
             WHEN r1 < 70 AND r2 < 5 THEN 1 WHEN r1 < 70 THEN 2 ELSE 1 END::smallint AS last_stage,
        CASE WHEN r1 < 8 THEN loy_us WHEN r1 < 25 THEN ret_us WHEN r1 < 40 THEN conv_us
             WHEN r1 < 70 AND r2 < 5 THEN acq_us + 3600000000 * 24 WHEN r1 < 70 THEN acq_us
             ELSE create_us END AS last_us
      FROM q) l WHERE r3 < 10;
ANALYZE seed_moves;

-- With the report rollups the service keeps on every move
-- (services/customer/src/store/rollups.rs).
INSERT INTO customers (id, external_id, email, display_name, stage, stage_change_us,
                       create_us, update_us, version, acquisition_campaign,
                       first_conversion_us, first_conversion_month, first_churn_us)
SELECT c.id, NULL, 'c' || c.n || '@example.com', 'Customer ' || c.n,
       m.to_stage, m.change_us, c.create_us, m.change_us, 1,
       CASE WHEN c.r2 >= 95 THEN 'campaigns/' || sc.id END,
       r.conv_us,
       (date_part('year', to_timestamp(r.conv_us / 1000000) AT TIME ZONE 'UTC') * 12
        + date_part('month', to_timestamp(r.conv_us / 1000000) AT TIME ZONE 'UTC') - 1)::int,
       CASE WHEN r.churn_us > r.conv_us THEN r.churn_us END
FROM seed_customers c
JOIN (SELECT DISTINCT ON (id) id, to_stage, change_us FROM seed_moves
      ORDER BY id, change_us DESC, to_stage DESC) m ON m.id = c.id
JOIN (SELECT id, MIN(CASE WHEN to_stage = 3 THEN change_us END) AS conv_us,
             MIN(CASE WHEN to_stage = 6 THEN change_us END) AS churn_us
      FROM seed_moves GROUP BY id) r ON r.id = c.id
LEFT JOIN seed_campaigns sc ON sc.i = c.n % :campaigns;

\echo '[seed] stage history'
INSERT INTO stage_history (customer_id, from_stage, to_stage, reason, actor, change_us,
                           left_us, next_stage)
SELECT id, from_stage, to_stage, 'seed', 'seed', change_us,
       LEAD(change_us) OVER w, LEAD(to_stage) OVER w
FROM seed_moves WINDOW w AS (PARTITION BY id ORDER BY change_us, to_stage)
ORDER BY change_us;

\echo '[seed] touchpoints (indexes dropped for the bulk insert, rebuilt after)'
ALTER TABLE touchpoints DROP CONSTRAINT touchpoints_pkey;
DROP INDEX touchpoints_timeline;
DROP INDEX touchpoints_kind_customer;
DROP INDEX touchpoints_time;
-- Kinds by k % 20: 6 feature use, 4 product access, 3 usage time,
-- 2 campaign touch, 2 purchase, 2 support contact, 1 custom; each
-- 0..90 days after creation.
INSERT INTO touchpoints (event_id, customer_id, kind, custom_type, occurred_us, record_us,
                         usage_ms, product, feature, revenue_minor, currency, campaign,
                         channel, properties)
SELECT 'e' || c.n || '-' || k, c.id,
       (CASE WHEN x < 6 THEN 3 WHEN x < 10 THEN 2 WHEN x < 13 THEN 1 WHEN x < 15 THEN 5
             WHEN x < 17 THEN 4 WHEN x < 19 THEN 6 ELSE 7 END)::smallint,
       CASE WHEN x = 19 THEN 'trial_started' END,
       c.create_us + ((c.n::bigint * 31 + k * 7777) % 90) * 86400000000::bigint
         + (k * 3600000000::bigint),
       c.create_us,
       CASE WHEN x BETWEEN 10 AND 12 THEN 60000 * (1 + k) END,
       CASE WHEN x BETWEEN 6 AND 9 THEN 'app' END,
       CASE WHEN x < 6 THEN 'reports' END,
       CASE WHEN x BETWEEN 15 AND 16 THEN 1000 + (c.n::bigint * 13 + k * 101) % 19000 END,
       CASE WHEN x BETWEEN 15 AND 16 THEN CASE WHEN c.n % 10 = 0 THEN 'USD' ELSE 'EUR' END END,
       CASE WHEN x BETWEEN 13 AND 14 THEN 'campaigns/' || sc.id END,
       NULL, NULL
FROM seed_customers c
CROSS JOIN generate_series(0, :touchpoints_per_customer - 1) AS k
CROSS JOIN LATERAL (SELECT ((c.n + k * 7) % 20) AS x) xx
LEFT JOIN seed_campaigns sc ON sc.i = (c.n::bigint * 3 + k) % :campaigns;

\echo '[seed] touchpoint indexes'
SET maintenance_work_mem = '512MB';
ALTER TABLE touchpoints ADD CONSTRAINT touchpoints_pkey PRIMARY KEY (event_id);
CREATE INDEX touchpoints_timeline ON touchpoints (customer_id, occurred_us, event_id);
CREATE INDEX touchpoints_kind_customer ON touchpoints (kind, customer_id, occurred_us);
CREATE INDEX touchpoints_time ON touchpoints (occurred_us, customer_id, kind, custom_type);

\echo '[seed] touchpoint rollups (services/customer/src/store/activity.rs)'
-- The same content as the service's set-based rebuild: kinds per customer
-- and UTC month (a bit per kind code), purchases per customer, month and
-- currency (both with the customer's first conversion time and month),
-- campaign touches at or before the first conversion.
INSERT INTO touch_months (customer_id, month, kinds, conv_us, conv_month)
SELECT t.customer_id, t.m, bit_or(1 << t.kind), c.first_conversion_us, c.first_conversion_month
FROM (SELECT customer_id, kind,
             (date_part('year', to_timestamp(occurred_us / 1000000) AT TIME ZONE 'UTC') * 12
              + date_part('month', to_timestamp(occurred_us / 1000000) AT TIME ZONE 'UTC') - 1)::int AS m
      FROM touchpoints) t JOIN customers c ON c.id = t.customer_id
GROUP BY t.customer_id, t.m, c.first_conversion_us, c.first_conversion_month;
INSERT INTO purchase_months (customer_id, month, currency, orders, revenue_minor, conv_us, conv_month)
SELECT t.customer_id, t.m, t.currency, count(*), sum(t.revenue_minor),
       c.first_conversion_us, c.first_conversion_month
FROM (SELECT customer_id, currency, revenue_minor,
             (date_part('year', to_timestamp(occurred_us / 1000000) AT TIME ZONE 'UTC') * 12
              + date_part('month', to_timestamp(occurred_us / 1000000) AT TIME ZONE 'UTC') - 1)::int AS m
      FROM touchpoints WHERE kind = 4 AND currency IS NOT NULL) t JOIN customers c ON c.id = t.customer_id
GROUP BY t.customer_id, t.m, t.currency, c.first_conversion_us, c.first_conversion_month;
INSERT INTO attribution_touches (customer_id, occurred_us, event_id, campaign)
SELECT t.customer_id, t.occurred_us, t.event_id, t.campaign
FROM touchpoints t JOIN customers c ON c.id = t.customer_id
WHERE t.kind = 5 AND t.campaign IS NOT NULL
  AND (c.first_conversion_us IS NULL OR t.occurred_us <= c.first_conversion_us);

\echo '[seed] journey rollup (services/customer/src/store/journeys.rs)'
SET work_mem = '256MB';
-- Every stage move with the customer's last 10 touchpoints at or before it
-- and its previous move into the same stage: the service's fill, for all.
INSERT INTO move_paths (history_id, customer_id, from_stage, to_stage, change_us, prev_same_us,
                        s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10)
SELECT h.id, h.customer_id, h.from_stage, h.to_stage, h.change_us, h.prev_same_us,
       MAX(CASE WHEN x.rn = 1 THEN x.step END),
       MAX(CASE WHEN x.rn = 2 THEN x.step END),
       MAX(CASE WHEN x.rn = 3 THEN x.step END),
       MAX(CASE WHEN x.rn = 4 THEN x.step END),
       MAX(CASE WHEN x.rn = 5 THEN x.step END),
       MAX(CASE WHEN x.rn = 6 THEN x.step END),
       MAX(CASE WHEN x.rn = 7 THEN x.step END),
       MAX(CASE WHEN x.rn = 8 THEN x.step END),
       MAX(CASE WHEN x.rn = 9 THEN x.step END),
       MAX(CASE WHEN x.rn = 10 THEN x.step END),
       MAX(CASE WHEN x.rn = 1 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 2 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 3 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 4 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 5 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 6 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 7 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 8 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 9 THEN x.occurred_us END),
       MAX(CASE WHEN x.rn = 10 THEN x.occurred_us END)
FROM (SELECT id, customer_id, from_stage, to_stage, change_us,
             LAG(change_us) OVER (PARTITION BY customer_id, to_stage ORDER BY change_us, id) AS prev_same_us
      FROM stage_history) h
LEFT JOIN (SELECT h2.id AS hid,
                  CASE WHEN t.kind = 7 THEN 'c:' || COALESCE(t.custom_type, '') ELSE CAST(t.kind AS TEXT) END AS step,
                  t.occurred_us,
                  ROW_NUMBER() OVER (PARTITION BY h2.id ORDER BY t.occurred_us DESC, t.event_id DESC) AS rn
           FROM stage_history h2 JOIN touchpoints t ON t.customer_id = h2.customer_id
                AND t.occurred_us <= h2.change_us) x
  ON x.hid = h.id AND x.rn <= 10
GROUP BY h.id, h.customer_id, h.from_stage, h.to_stage, h.change_us, h.prev_same_us;

\echo '[seed] vacuum analyze'
VACUUM ANALYZE;

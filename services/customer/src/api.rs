//! `clm.customer.v1.CustomerService`: each rpc authorizes (one
//! [`respond`] call), converts the request, runs one transaction (writes:
//! one [`idempotency::write`]) and converts the result back; lists page
//! with [`Pager`].

use crate::campaigns;
use crate::convert;
use crate::error::CustomerError;
use crate::events;
use crate::reports;
use crate::store::consent::{self, ConsentChangeRecord, ConsentRecord};
use crate::store::create;
use crate::store::customers::{self, CustomerRecord, NewCustomer, SortKey};
use crate::store::erasure::{self, ErasureRecord, ErasureRequestId};
use crate::store::identifiers::{self, ErasedMatch, IdentifierRecord};
use crate::store::merge;
use crate::store::stages::{self, StageChangeRecord};
use crate::store::touchpoints::{self, TouchpointRecord};
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Transition;
use clm_domain::validation::{optional_text, page_size, request_id, required_text};
use clm_domain::{Violation, Violations, attributes, contact, filter, touchpoint};
use clm_platform::auth::{Policy, Principal, Role};
use clm_platform::coalesce::{Batcher, Coalescer, Fetch, Run};
use clm_platform::config::ErasedIdentifierPolicy;
use clm_platform::error::respond;
use clm_platform::idempotency;
use clm_platform::outbox::Traced;
use clm_platform::page::Pager;
use clm_platform::{Error, Result, Runtime};
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_server::CustomerService;
use sea_orm::DatabaseTransaction;
use std::collections::{HashMap, HashSet};
use tonic::{Request, Response, Status};

/// Roles that read customers.
const READ: &[Role] = &[
    Role::Marketer,
    Role::DataSteward,
    Role::Service,
    Role::Analyst,
    Role::SegmentOwner,
];
/// Roles that create customers and record what they do (not data stewards).
const ENGAGE: &[Role] = &[Role::Marketer, Role::Service];
/// Roles that correct customer data: data-quality work (data stewards too).
const CURATE: &[Role] = &[Role::Marketer, Role::DataSteward, Role::Service];
/// Roles that erase customers and read erasure requests.
const ERASE: &[Role] = &[Role::DataSteward];
/// Roles that run campaigns and book their spend.
const CAMPAIGN: &[Role] = &[Role::Marketer];
/// Roles that read campaigns and KPI reports (analyst or above).
const REPORT: &[Role] = &[Role::Analyst, Role::SegmentOwner, Role::Marketer];

/// Who may call each rpc (admin may call all): the service's one role
/// table, which `clm roles --markdown` prints into docs/security.md.
pub const POLICY: Policy = Policy {
    service: "clm.customer.v1.CustomerService",
    rules: &[
        ("CreateCustomer", ENGAGE),
        ("GetCustomer", READ),
        ("GetCustomerView", READ),
        ("UpdateCustomer", CURATE),
        ("ListCustomers", READ),
        ("BatchCreateCustomers", ENGAGE),
        ("RecordTouchpoints", ENGAGE),
        ("ListTouchpoints", READ),
        ("TransitionStage", ENGAGE),
        ("ListStageHistory", READ),
        ("SetConsent", CURATE),
        ("GetConsent", READ),
        ("AddCustomerIdentifier", CURATE),
        ("RemoveCustomerIdentifier", CURATE),
        ("ListCustomerIdentifiers", READ),
        ("LookupCustomer", READ),
        ("BatchLookupCustomers", READ),
        ("MergeCustomers", CURATE),
        ("EraseCustomer", ERASE),
        ("GetErasureRequest", ERASE),
        ("ListErasureRequests", ERASE),
        ("CreateCampaign", CAMPAIGN),
        ("GetCampaign", REPORT),
        ("ListCampaigns", REPORT),
        ("UpdateCampaign", CAMPAIGN),
        ("AddCampaignSpend", CAMPAIGN),
        ("GetFunnelReport", REPORT),
        ("GetAcquisitionReport", REPORT),
        ("GetClvReport", REPORT),
        ("GetRetentionReport", REPORT),
        ("GetJourneyReport", REPORT),
    ],
};
/// Every service that erases a customer's data and sends a receipt.
const ERASING_SERVICES: [&str; 5] = ["customer", "scoring", "segmentation", "feedback", "loyalty"];
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
const MAX_BATCH_CUSTOMERS: usize = 1000;
/// Most consent changes GetConsent answers (the newest).
const MAX_CONSENT_HISTORY: u64 = 1000;
const MAX_BATCH_LOOKUP: usize = 1000;
const MAX_MERGE_DUPLICATES: usize = 100;

/// The customer service.
#[derive(Debug, Clone)]
pub struct CustomerApi {
    rt: Runtime,
    /// The installation's salt for erased identifiers' hashes (never changes).
    salt: std::sync::Arc<tokio::sync::OnceCell<String>>,
    /// What a write with an erased customer's identifier does.
    erased_policy: ErasedIdentifierPolicy,
    /// The services whose erasure receipts a new request expects.
    erasing_services: Vec<String>,
    /// GetCustomer's reads, gathered into one statement under load.
    lookups: std::sync::Arc<Coalescer<CustomerId, CustomerRecord>>,
    /// CreateCustomer's writes on PostgreSQL, gathered into one statement
    /// (one commit) under load.
    creates: std::sync::Arc<Batcher<std::sync::Arc<Creation>, Grouped>>,
}

/// Most customers one coalesced GetCustomer statement reads.
const COALESCED_READS: usize = 128;
/// Coalesced GetCustomer statements running at once (each holds a pooled
/// connection of the read pool while it runs).
const COALESCED_IN_FLIGHT: usize = 4;
/// Most CreateCustomer calls one statement writes.
const GROUPED_CREATES: usize = 64;
/// Grouped CreateCustomer statements running at once (each holds a pooled
/// connection of the write pool while it runs).
const GROUPED_CREATES_IN_FLIGHT: usize = 4;

impl CustomerApi {
    /// Serves from `rt`.
    pub fn new(rt: Runtime) -> Self {
        let erased_policy = rt.config.customer.erased_identifier_policy;
        let erasing_services = erasing_services(&rt.config);
        let read = rt.read.clone();
        let fetch: Fetch<CustomerId, CustomerRecord> = std::sync::Arc::new(move |ids| {
            let read = read.clone();
            Box::pin(async move { customers::get_found(&read, &ids).await })
        });
        let creates = Batcher::new(
            Creation::grouped(rt.clone()),
            GROUPED_CREATES,
            GROUPED_CREATES_IN_FLIGHT,
        );
        Self {
            rt,
            creates: std::sync::Arc::new(creates),
            salt: std::sync::Arc::default(),
            erased_policy,
            erasing_services,
            lookups: std::sync::Arc::new(Coalescer::new(
                fetch,
                COALESCED_READS,
                COALESCED_IN_FLIGHT,
            )),
        }
    }

    /// Applies `erased_identifier_policy` to the identifiers of a write
    /// that matched an erased customer's: the first is refused, or the
    /// answer is `true` (mark the customer `reimported_after_erasure`).
    /// Logs carry the field and a hash prefix, never the value.
    fn judge_erased(&self, matches: &[ErasedMatch]) -> Result<bool> {
        match (matches.first(), self.erased_policy) {
            (None, _) => Ok(false),
            (Some(m), ErasedIdentifierPolicy::Refuse) => Err(m.refused()),
            (Some(_), ErasedIdentifierPolicy::Flag) => {
                for m in matches {
                    tracing::warn!(
                        field = %m.field,
                        hash = %m.hash_prefix,
                        "identifier of an erased customer accepted; the customer is flagged reimported_after_erasure"
                    );
                }
                Ok(true)
            }
        }
    }

    /// Now, at the precision times are stored with, so every answer, event
    /// and replay carries what a read will answer.
    fn now(&self) -> DateTime<Utc> {
        clm_domain::clock::micros(self.rt.clock.now())
    }

    /// The salt of erased identifiers' hashes, read once.
    async fn salt(&self) -> Result<Option<&str>> {
        if let Some(s) = self.salt.get() {
            return Ok(Some(s.as_str()));
        }
        match erasure::existing_salt(&self.rt.read).await? {
            Some(s) => Ok(Some(self.salt.get_or_init(async || s).await.as_str())),
            None => Ok(None),
        }
    }

    /// Reads a customer for a change, checking the caller's etag if one was sent.
    async fn load_for_write(
        &self,
        txn: &DatabaseTransaction,
        id: CustomerId,
        etag: &str,
    ) -> Result<CustomerRecord> {
        let rec = customers::get(txn, id).await?;
        clm_platform::convert::check_etag(etag, rec.version)?;
        Ok(rec)
    }

    /// NOT_FOUND unless the customer exists.
    async fn ensure_exists(&self, id: CustomerId) -> Result<()> {
        if customers::existing_ids(&self.rt.read, &[id.to_string()])
            .await?
            .is_empty()
        {
            return Err(Error::NotFound(id.name()));
        }
        Ok(())
    }

    /// Inserts new customers with their first stage-history entries and
    /// identifiers inside `txn`, and answers them as protos with the
    /// `CustomerCreated` events still to append: the general path, taken on
    /// SQLite and on PostgreSQL when [`Creation::insert_at_once`] did not
    /// write (an identifier held or erased, or the request id seen
    /// before). The identifiers are checked first (naming the holder, or
    /// applying the erased-identifier policy), then the tables written one
    /// statement each.
    async fn insert_customers(
        &self,
        txn: &DatabaseTransaction,
        items: Vec<(String, NewCustomer)>,
        actor: &Principal,
        now: DateTime<Utc>,
        salt: Option<&str>,
    ) -> Result<(Vec<pb::Customer>, Vec<clm_platform::outbox::NewEvent>)> {
        let keys: Vec<(String, clm_domain::contact::Identifier)> = items
            .iter()
            .flat_map(|(p, c)| profile_keys(p, c.email.as_deref(), c.external_id.as_deref()))
            .collect();
        let mut records = new_records(items, now);
        let erased = identifiers::check_free(txn, &keys, None, salt).await?;
        self.judge_erased(&erased)?;
        for (prefix, r) in &mut records {
            r.reimported_after_erasure = erased.iter().any(|m| {
                m.field
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
            });
        }
        let records: Vec<CustomerRecord> = records.into_iter().map(|(_, r)| r).collect();
        customers::insert_many(txn, &records).await?;
        stages::insert_many(txn, &first_stages(&records, actor, now)).await?;
        identifiers::insert_many(txn, &profile_holdings(&records, now)).await?;
        let customers = protos(&records, now);
        let events = customers.iter().map(events::customer_created).collect();
        Ok((customers, events))
    }

    async fn create(
        &self,
        actor: Principal,
        req: pb::CreateCustomerRequest,
    ) -> Result<pb::Customer> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let c = req
            .customer
            .as_ref()
            .ok_or_else(|| Error::invalid("customer", "is required"))?;
        let draft = convert::new_customer("customer", c, now.date_naive())?;
        if let Some(ac) = &draft.acquisition_campaign {
            campaigns::check_exist(
                &self.rt,
                &[("customer.acquisition_campaign".into(), ac.clone())],
            )
            .await?;
        }
        // Read before the transaction: a second connection inside it could
        // wait for a pool that the transactions themselves hold.
        let salt = self.salt().await?;
        if let Some(mut creation) = Creation::at_once(
            &self.rt,
            &[("customer".into(), draft.clone())],
            &actor,
            now,
            salt,
        ) {
            let out = creation
                .customers
                .first()
                .cloned()
                .ok_or_else(|| Error::internal("one customer to create, none made"))?;
            creation.claim =
                idempotency::pg_claim("CreateCustomer", rid.as_deref(), &req, &out, now);
            // In one statement with the calls beside it; when that wrote
            // nothing, in one statement alone, which a conflict of its own
            // makes write nothing too: then the general path.
            let creation = std::sync::Arc::new(creation);
            let done = match self.creates.submit(creation.clone()).await {
                Some(Grouped::Done(done)) => done,
                // The shared statement may have committed: without a
                // request id a second try could create the customer twice.
                Some(Grouped::Unknown) if creation.claim.is_none() => {
                    return Err(Error::Unavailable(
                        "the database connection failed during the write: the customer may or may not have been created; retry with a request_id to be safe".into(),
                    ));
                }
                Some(Grouped::Unknown) | None => creation.insert_at_once(&self.rt).await?,
            };
            if done {
                return Ok(out);
            }
        }
        idempotency::write(
            &self.rt,
            "CreateCustomer",
            rid,
            &req,
            now,
            async move |txn| {
                let (customers, events) = self
                    .insert_customers(txn, vec![("customer".into(), draft)], &actor, now, salt)
                    .await?;
                let out = customers
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::internal("one customer inserted, none returned"))?;
                Ok((out, events))
            },
        )
        .await
    }

    async fn batch_create(
        &self,
        actor: Principal,
        req: pb::BatchCreateCustomersRequest,
    ) -> Result<pb::BatchCreateCustomersResponse> {
        let now = self.now();
        let today = now.date_naive();
        let rid = request_id("request_id", &req.request_id)?;
        let n = req.requests.len();
        if n == 0 || n > MAX_BATCH_CUSTOMERS {
            return Err(Error::invalid(
                "requests",
                format!("must hold 1..{MAX_BATCH_CUSTOMERS} customers, got {n}"),
            ));
        }
        let mut v = Violations::new();
        let mut items = Vec::with_capacity(n);
        let mut seen_email: HashMap<String, usize> = HashMap::new();
        let mut seen_external: HashMap<String, usize> = HashMap::new();
        for (i, r) in req.requests.iter().enumerate() {
            let prefix = format!("requests[{i}].customer");
            let Some(c) = r.customer.as_ref() else {
                v.push(Violation::new(prefix, "is required"));
                continue;
            };
            match convert::new_customer(&prefix, c, today) {
                Ok(draft) => {
                    if let Some(e) = &draft.email
                        && let Some(j) = seen_email.insert(e.clone(), i)
                    {
                        v.push(Violation::new(
                            format!("{prefix}.email"),
                            format!("duplicates requests[{j}].customer.email"),
                        ));
                    }
                    if let Some(x) = &draft.external_id
                        && let Some(j) = seen_external.insert(x.clone(), i)
                    {
                        v.push(Violation::new(
                            format!("{prefix}.external_id"),
                            format!("duplicates requests[{j}].customer.external_id"),
                        ));
                    }
                    items.push((prefix, draft));
                }
                Err(e) => v.0.extend(e.0),
            }
        }
        v.into_result()?;
        let refs: Vec<(String, String)> = items
            .iter()
            .filter_map(|(p, d)| {
                d.acquisition_campaign
                    .clone()
                    .map(|c| (format!("{p}.acquisition_campaign"), c))
            })
            .collect();
        campaigns::check_exist(&self.rt, &refs).await?;
        // Read before the transaction: a second connection inside it could
        // wait for a pool that the transactions themselves hold.
        let salt = self.salt().await?;
        if let Some(mut creation) = Creation::at_once(&self.rt, &items, &actor, now, salt) {
            let out = pb::BatchCreateCustomersResponse {
                customers: creation.customers.clone(),
            };
            creation.claim =
                idempotency::pg_claim("BatchCreateCustomers", rid.as_deref(), &req, &out, now);
            if creation.insert_at_once(&self.rt).await? {
                return Ok(out);
            }
        }
        idempotency::write(
            &self.rt,
            "BatchCreateCustomers",
            rid,
            &req,
            now,
            async move |txn| {
                let (customers, events) =
                    self.insert_customers(txn, items, &actor, now, salt).await?;
                Ok((pb::BatchCreateCustomersResponse { customers }, events))
            },
        )
        .await
    }

    async fn get(&self, req: pb::GetCustomerRequest) -> Result<pb::Customer> {
        let id = CustomerId::parse_name("name", &req.name)?;
        // Read in one statement with the calls beside it; a customer that
        // read did not find (merged, unknown) or could not read is read
        // alone, which tells those apart.
        if let Some(r) = self.lookups.get(id).await {
            return Ok(convert::customer_to_proto(&r, self.now().date_naive()));
        }
        // A merged id answers its survivor.
        let r = match customers::get(&self.rt.read, id).await {
            Err(Error::FailedPrecondition {
                reason: customers::MERGED,
                ..
            }) => match customers::redirect_of(&self.rt.read, id).await? {
                Some(survivor) => customers::get(&self.rt.read, survivor).await?,
                None => return Err(Error::NotFound(id.name())),
            },
            other => other?,
        };
        Ok(convert::customer_to_proto(&r, self.now().date_naive()))
    }

    async fn update(&self, req: pb::UpdateCustomerRequest) -> Result<pb::Customer> {
        let now = self.now();
        let today = now.date_naive();
        let rid = request_id("request_id", &req.request_id)?;
        let c = req
            .customer
            .as_ref()
            .ok_or_else(|| Error::invalid("customer", "is required"))?;
        let id = CustomerId::parse_name("customer.name", &c.name)?;
        let paths: Vec<String> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "is required: name the fields to change",
            ));
        }
        // Read before the transaction: a second connection inside it could
        // wait for a pool that the transactions themselves hold.
        let salt = self.salt().await?;
        idempotency::write(
            &self.rt,
            "UpdateCustomer",
            rid,
            &req,
            now,
            async move |txn| {
                let mut rec = self.load_for_write(txn, id, &c.etag).await?;
                let before = identifiers::profile_identifiers(
                    rec.email.as_deref(),
                    rec.external_id.as_deref(),
                );
                let attributes_changed = apply_mask(&mut rec, c, &paths, today)?;
                if paths.iter().any(|p| p == "email" || p == "external_id") {
                    let keys =
                        profile_keys("customer", rec.email.as_deref(), rec.external_id.as_deref());
                    let erased = identifiers::check_free(txn, &keys, Some(id), salt).await?;
                    if self.judge_erased(&erased)? {
                        rec.reimported_after_erasure = true;
                    }
                    // The profile's identifiers follow it: old and new
                    // values go, the new ones come back marked as profile.
                    let gone: Vec<_> = before.iter().chain(keys.iter().map(|(_, i)| i)).collect();
                    identifiers::remove(txn, id, &gone).await?;
                    let held: Vec<IdentifierRecord> = keys
                        .into_iter()
                        .map(|(_, identifier)| IdentifierRecord {
                            customer: id,
                            identifier,
                            profile: true,
                            create_time: now,
                        })
                        .collect();
                    identifiers::insert_many(txn, &held).await?;
                }
                let expected = rec.version;
                rec.version += 1;
                rec.update_time = now;
                if !customers::update(txn, &rec, expected, attributes_changed).await? {
                    return Err(CustomerError::Concurrent.into());
                }
                let out = convert::customer_to_proto(&rec, today);
                let events = vec![events::customer_updated(&out, paths)];
                Ok((out, events))
            },
        )
        .await
    }

    async fn list(&self, req: pb::ListCustomersRequest) -> Result<pb::ListCustomersResponse> {
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let comparisons = filter::parse("filter", &req.filter)?;
        let cond = customers::compile_filter("filter", &comparisons)?;
        let (sort, desc) = customers::parse_order_by("order_by", &req.order_by)?;
        let pager = Pager::new(&[&req.filter, &req.order_by]);
        // The token's sort value is typed by the order: a tampered token
        // with a value of the wrong type is bad input, not a database error.
        let after = match sort {
            SortKey::DisplayName => pager
                .after::<String>(&req.page_token)?
                .map(|(v, id)| (v.into(), id)),
            SortKey::CreateTime | SortKey::UpdateTime => pager
                .after::<i64>(&req.page_token)?
                .map(|(v, id)| (v.into(), id)),
        };
        let rows = customers::list(&self.rt.read, cond, sort, desc, after, size as u64 + 1).await?;
        let today = self.now().date_naive();
        let (customers, next_page_token) = pager.page(
            &rows,
            size,
            |r| convert::customer_to_proto(r, today),
            |r| (sort.value_of(r), r.id.to_string()),
        );
        Ok(pb::ListCustomersResponse {
            customers,
            next_page_token,
        })
    }

    async fn record_touchpoints(
        &self,
        req: pb::RecordTouchpointsRequest,
    ) -> Result<pb::RecordTouchpointsResponse> {
        let now = self.now();
        touchpoint::batch_size("touchpoints", req.touchpoints.len())?;
        let mut v = Violations::new();
        let mut batch = Vec::with_capacity(req.touchpoints.len());
        for (i, t) in req.touchpoints.iter().enumerate() {
            match convert::touchpoint(&format!("touchpoints[{i}]"), t, now) {
                Ok((customer, touchpoint)) => batch.push(TouchpointRecord {
                    customer,
                    touchpoint,
                    record_time: now,
                }),
                Err(e) => v.0.extend(e.0),
            }
        }
        v.into_result()?;
        // Campaign touches name an existing campaign, stored canonically.
        let refs: Vec<(String, String)> = batch
            .iter()
            .enumerate()
            .filter(|(_, r)| r.touchpoint.kind == touchpoint::TouchpointKind::CampaignTouch)
            .filter_map(|(i, r)| {
                r.touchpoint
                    .campaign
                    .clone()
                    .map(|c| (format!("touchpoints[{i}].campaign"), c))
            })
            .collect();
        campaigns::check_exist(&self.rt, &refs).await?;
        for r in &mut batch {
            if r.touchpoint.kind == touchpoint::TouchpointKind::CampaignTouch
                && let Some(c) = &r.touchpoint.campaign
                && let Ok(id) = clm_domain::ids::CampaignId::parse_name("campaign", c)
            {
                r.touchpoint.campaign = Some(id.name());
            }
        }
        let mut ids: Vec<String> = batch.iter().map(|r| r.customer.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Idempotent by event id, so no request key: the write only batches the outbox and commit.
        idempotency::write(
            &self.rt,
            "RecordTouchpoints",
            None,
            &req,
            now,
            async move |txn| {
                let existing: HashSet<String> = customers::share_existing(txn, &ids)
                    .await?
                    .into_iter()
                    .collect();
                if let Some(missing) = ids.iter().find(|id| !existing.contains(*id)) {
                    let id = CustomerId::parse_id("customer", missing).map_err(Error::internal)?;
                    return Err(customers::missing(txn, id).await);
                }
                let outcome = record_new(txn, &batch).await?;
                let events = outcome
                    .recorded
                    .iter()
                    .map(|&i| events::touchpoint_recorded(convert::touchpoint_to_proto(&batch[i])))
                    .collect();
                Ok((outcome.into_response(), events))
            },
        )
        .await
    }

    async fn list_touchpoints(
        &self,
        req: pb::ListTouchpointsRequest,
    ) -> Result<pb::ListTouchpointsResponse> {
        let id = CustomerId::parse_name("parent", &req.parent)?;
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let kind = match filter::parse("filter", &req.filter)?.as_slice() {
            [] => None,
            [c] if c.field == "type" && c.op == filter::Op::Eq => {
                let text = c.value.as_text().ok_or_else(|| {
                    Error::invalid("filter", "type must be compared with a type name")
                })?;
                Some(touchpoint::TouchpointKind::parse("filter", text)?)
            }
            _ => {
                return Err(Error::invalid(
                    "filter",
                    "only `type = <TYPE>` is supported",
                ));
            }
        };
        let pager = Pager::new(&[&req.filter]);
        let after = pager.after::<i64>(&req.page_token)?;
        self.ensure_exists(id).await?;
        let rows = touchpoints::list(&self.rt.read, id, kind, after, size as u64 + 1).await?;
        let (touchpoints, next_page_token) =
            pager.page(&rows, size, convert::touchpoint_to_proto, |r| {
                (
                    clm_platform::db::to_micros(r.touchpoint.occurred_time),
                    r.touchpoint.event_id.clone(),
                )
            });
        Ok(pb::ListTouchpointsResponse {
            touchpoints,
            next_page_token,
        })
    }

    async fn transition(
        &self,
        actor: Principal,
        req: pb::TransitionStageRequest,
    ) -> Result<pb::TransitionStageResponse> {
        let now = self.now();
        let today = now.date_naive();
        let rid = request_id("request_id", &req.request_id)?;
        let mut v = Violations::new();
        let id = v.check("", CustomerId::parse_name("name", &req.name));
        let to = v.check("", convert::stage("to_stage", req.to_stage));
        let reason = v.check("", required_text("reason", &req.reason, 500));
        v.into_result()?;
        let (Some(id), Some(to), Some(reason)) = (id, to, reason) else {
            return Err(Error::internal("validated fields missing"));
        };
        let etag = req.etag.as_str();
        let forward_only = req.forward_only;
        idempotency::write(
            &self.rt,
            "TransitionStage",
            rid,
            &req,
            now,
            async move |txn| {
                let mut rec = self.load_for_write(txn, id, etag).await?;
                let t = Transition::new(rec.stage, to, reason, actor.subject)
                    .map_err(CustomerError::from)?;
                if forward_only && t.kind != clm_domain::lifecycle::MoveKind::Forward {
                    return Err(Error::FailedPrecondition {
                        reason: "NOT_FORWARD",
                        message: format!(
                            "forward_only: {} to {} is not a forward move",
                            t.from.as_str(),
                            t.to.as_str()
                        ),
                    });
                }
                let expected = rec.version;
                rec.stage = t.to;
                rec.stage_change_time = now;
                rec.update_time = now;
                rec.version += 1;
                if !customers::update(txn, &rec, expected, false).await? {
                    return Err(CustomerError::Concurrent.into());
                }
                let change = StageChangeRecord {
                    id: 0,
                    customer: id,
                    from: Some(t.from),
                    to: t.to,
                    reason: t.reason,
                    actor: t.actor,
                    change_time: now,
                };
                stages::insert_many(txn, std::slice::from_ref(&change)).await?;
                let change = convert::stage_change_to_proto(&change, now);
                let events = vec![events::stage_changed(&id.name(), change.clone())];
                let out = pb::TransitionStageResponse {
                    customer: Some(convert::customer_to_proto(&rec, today)),
                    change: Some(change),
                };
                Ok((out, events))
            },
        )
        .await
    }

    async fn stage_history(
        &self,
        req: pb::ListStageHistoryRequest,
    ) -> Result<pb::ListStageHistoryResponse> {
        let id = CustomerId::parse_name("parent", &req.parent)?;
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let pager = Pager::new(&["stage_history"]);
        let after = pager.after::<i64>(&req.page_token)?.map_or(0, |(v, _)| v);
        self.ensure_exists(id).await?;
        let rows = stages::list(&self.rt.read, id, after, size as u64 + 1).await?;
        // Time in a stage lasts until the next move, or until now.
        let now = self.now();
        let until: HashMap<i64, DateTime<Utc>> = rows
            .windows(2)
            .map(|w| (w[0].id, w[1].change_time))
            .collect();
        let (changes, next_page_token) = pager.page(
            &rows,
            size,
            |c| convert::stage_change_to_proto(c, until.get(&c.id).copied().unwrap_or(now)),
            |c| (c.id, String::new()),
        );
        Ok(pb::ListStageHistoryResponse {
            changes,
            next_page_token,
        })
    }
}

impl CustomerApi {
    async fn set_consent(
        &self,
        actor: Principal,
        req: pb::SetConsentRequest,
    ) -> Result<pb::Consent> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let mut v = Violations::new();
        let id = v.check("", convert::consent_owner("name", &req.name));
        let source = v.check("", convert::consent_source("source", req.source));
        let settings = match convert::consent_settings("settings", &req.settings) {
            Ok(s) => Some(s),
            Err(e) => {
                v.0.extend(e.0);
                None
            }
        };
        v.into_result()?;
        let (Some(id), Some(source), Some(settings)) = (id, source, settings) else {
            return Err(Error::internal("validated fields missing"));
        };
        idempotency::write(&self.rt, "SetConsent", rid, &req, now, async move |txn| {
            // Concurrent changes of one customer's consent record
            // their `from_state` in order.
            customers::lock(txn, id).await?;
            let mut stated = consent::current(txn, id).await?;
            let mut changes = Vec::new();
            for s in settings {
                let now_state = stated
                    .iter()
                    .find(|r| r.purpose == s.purpose && r.channel == s.channel)
                    .map_or(clm_domain::consent::ConsentState::Unset, |r| r.state);
                if now_state == s.state {
                    continue;
                }
                changes.push(ConsentChangeRecord {
                    purpose: s.purpose,
                    channel: s.channel,
                    from: now_state,
                    to: s.state,
                    source,
                    actor: actor.subject.clone(),
                    change_time: now,
                });
            }
            if changes.is_empty() {
                return Ok((convert::consent_to_proto(id, &stated, &[]), vec![]));
            }
            consent::apply(txn, id, &changes).await?;
            stated.retain(|r| {
                !changes
                    .iter()
                    .any(|c| c.purpose == r.purpose && c.channel == r.channel)
            });
            stated.extend(changes.iter().map(|c| ConsentRecord {
                purpose: c.purpose,
                channel: c.channel,
                state: c.to,
                source: c.source,
                actor: c.actor.clone(),
                update_time: c.change_time,
            }));
            let event = events::consent_changed(
                &id.name(),
                changes
                    .iter()
                    .map(convert::consent_change_to_proto)
                    .collect(),
            );
            Ok((convert::consent_to_proto(id, &stated, &[]), vec![event]))
        })
        .await
    }

    /// Customer 360: the own part read here, the peers' parts asked at once
    /// (see [`crate::view`]).
    async fn customer_view(&self, req: pb::GetCustomerViewRequest) -> Result<pb::CustomerView> {
        let customer = self
            .get(pb::GetCustomerRequest {
                name: req.name.clone(),
            })
            .await?;
        let id = CustomerId::parse_name("name", &customer.name)?;
        let now = self.now();
        let newest = stages::newest(&self.rt.read, id, crate::view::VIEW_STAGE_HISTORY).await?;
        // Newest first: each move lasted until the one after it (the
        // previous element), the newest until now.
        let stage_history = newest
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let until = i
                    .checked_sub(1)
                    .and_then(|j| newest.get(j))
                    .map_or(now, |later| later.change_time);
                convert::stage_change_to_proto(c, until)
            })
            .collect();
        let stated = consent::current(&self.rt.read, id).await?;
        let mut view = pb::CustomerView {
            consent: Some(convert::consent_to_proto(id, &stated, &[])),
            stage_history,
            read_time: Some(clm_platform::convert::timestamp(now)),
            ..Default::default()
        };
        let within = std::time::Duration::from_millis(self.rt.config.customer.view_timeout_ms);
        crate::view::fill_peer_parts(&self.rt, &customer.name, within, &mut view).await;
        view.customer = Some(customer);
        Ok(view)
    }

    async fn get_consent(&self, req: pb::GetConsentRequest) -> Result<pb::Consent> {
        let id = convert::consent_owner("name", &req.name)?;
        self.ensure_exists(id).await?;
        let stated = consent::current(&self.rt.read, id).await?;
        let history = if req.include_history {
            consent::history(&self.rt.read, id, MAX_CONSENT_HISTORY).await?
        } else {
            Vec::new()
        };
        Ok(convert::consent_to_proto(id, &stated, &history))
    }
}

impl CustomerApi {
    async fn add_identifier(
        &self,
        req: pb::AddCustomerIdentifierRequest,
    ) -> Result<pb::CustomerIdentifier> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let mut v = Violations::new();
        let id = v.check("", CustomerId::parse_name("parent", &req.parent));
        let wanted = v.check(
            "",
            convert::identifier("identifier", req.identifier.as_ref()),
        );
        v.into_result()?;
        let (Some(id), Some(wanted)) = (id, wanted) else {
            return Err(Error::internal("validated fields missing"));
        };
        // Read before the transaction: a second connection inside it could
        // wait for a pool that the transactions themselves hold.
        let salt = self.salt().await?;
        idempotency::write(
            &self.rt,
            "AddCustomerIdentifier",
            rid,
            &req,
            now,
            async move |txn| {
                customers::lock(txn, id).await?;
                let erased = identifiers::check_free(
                    txn,
                    &[("identifier.value".to_owned(), wanted.clone())],
                    Some(id),
                    salt,
                )
                .await?;
                let flag = self.judge_erased(&erased)?;
                if let Some(h) = identifiers::holders(txn, &[&wanted]).await?.remove(&wanted) {
                    if h.customer != id {
                        return Err(identifiers::taken("identifier.value", &wanted, h.customer));
                    }
                    return Ok((convert::identifier_to_proto(&h), vec![]));
                }
                let rec = IdentifierRecord {
                    customer: id,
                    identifier: wanted,
                    profile: false,
                    create_time: now,
                };
                if !identifiers::insert_if_free(txn, &rec).await? {
                    let holder = identifiers::holders(txn, &[&rec.identifier])
                        .await?
                        .remove(&rec.identifier)
                        .ok_or_else(|| {
                            Error::Aborted("the identifier changed hands; retry".into())
                        })?;
                    return Err(identifiers::taken(
                        "identifier.value",
                        &rec.identifier,
                        holder.customer,
                    ));
                }
                let out = convert::identifier_to_proto(&rec);
                let mut events = vec![events::identifier_added(&id.name(), out.clone())];
                if flag && customers::mark_reimported(txn, id, now).await? {
                    let customer = customers::get(txn, id).await?;
                    events.push(events::customer_updated(
                        &convert::customer_to_proto(&customer, now.date_naive()),
                        vec!["reimported_after_erasure".into()],
                    ));
                }
                Ok((out, events))
            },
        )
        .await
    }

    async fn remove_identifier(
        &self,
        req: pb::RemoveCustomerIdentifierRequest,
    ) -> Result<pb::CustomerIdentifier> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let mut v = Violations::new();
        let id = v.check("", CustomerId::parse_name("parent", &req.parent));
        let gone = v.check(
            "",
            convert::lookup_identifier("identifier", req.identifier.as_ref()),
        );
        v.into_result()?;
        let (Some(id), Some(gone)) = (id, gone) else {
            return Err(Error::internal("validated fields missing"));
        };
        idempotency::write(
            &self.rt,
            "RemoveCustomerIdentifier",
            rid,
            &req,
            now,
            async move |txn| {
                customers::lock(txn, id).await?;
                let held = identifiers::holders(txn, &[&gone])
                    .await?
                    .remove(&gone)
                    .filter(|h| h.customer == id)
                    .ok_or_else(|| {
                        // Never the value: it may be an erased customer's.
                        Error::NotFound(format!("the requested identifier of {}", id.name()))
                    })?;
                if held.profile {
                    return Err(Error::FailedPrecondition {
                        reason: "PROFILE_IDENTIFIER",
                        message: "identifier: is the profile's own email or external_id; \
                                  change it with UpdateCustomer"
                            .into(),
                    });
                }
                identifiers::remove(txn, id, &[&gone]).await?;
                let out = convert::identifier_to_proto(&held);
                let events = vec![events::identifier_removed(&id.name(), out.clone())];
                Ok((out, events))
            },
        )
        .await
    }

    async fn list_identifiers(
        &self,
        req: pb::ListCustomerIdentifiersRequest,
    ) -> Result<pb::ListCustomerIdentifiersResponse> {
        let id = CustomerId::parse_name("parent", &req.parent)?;
        let held = identifiers::list(&self.rt.read, id).await?;
        if held.is_empty() {
            self.ensure_exists(id).await?;
        }
        Ok(pb::ListCustomerIdentifiersResponse {
            identifiers: held.iter().map(convert::identifier_to_proto).collect(),
        })
    }

    async fn lookup(&self, req: pb::LookupCustomerRequest) -> Result<pb::Customer> {
        let wanted = convert::lookup_identifier("identifier", req.identifier.as_ref())?;
        let holder = identifiers::holders(&self.rt.read, &[&wanted])
            .await?
            .remove(&wanted)
            .ok_or_else(|| {
                // Never the value: it may be an erased customer's.
                Error::NotFound("a customer with the requested identifier".into())
            })?;
        let r = customers::get(&self.rt.read, holder.customer).await?;
        Ok(convert::customer_to_proto(&r, self.now().date_naive()))
    }

    async fn batch_lookup(
        &self,
        req: pb::BatchLookupCustomersRequest,
    ) -> Result<pb::BatchLookupCustomersResponse> {
        let n = req.identifiers.len();
        if n == 0 || n > MAX_BATCH_LOOKUP {
            return Err(Error::invalid(
                "identifiers",
                format!("must hold 1..{MAX_BATCH_LOOKUP} identifiers, got {n}"),
            ));
        }
        let mut v = Violations::new();
        let wanted: Vec<_> = req
            .identifiers
            .iter()
            .enumerate()
            .filter_map(|(i, x)| {
                v.check(
                    "",
                    convert::lookup_identifier(&format!("identifiers[{i}]"), Some(x)),
                )
            })
            .collect();
        v.into_result()?;
        let refs: Vec<_> = wanted.iter().collect();
        let held = identifiers::holders(&self.rt.read, &refs).await?;
        Ok(pb::BatchLookupCustomersResponse {
            results: wanted
                .iter()
                .map(|w| pb::LookupResult {
                    identifier: Some(convert::bare_identifier_to_proto(w)),
                    customer: held.get(w).map(|h| h.customer.name()).unwrap_or_default(),
                })
                .collect(),
        })
    }
}

impl CustomerApi {
    async fn merge(
        &self,
        actor: Principal,
        req: pb::MergeCustomersRequest,
    ) -> Result<pb::MergeCustomersResponse> {
        let now = self.now();
        let today = now.date_naive();
        let rid = request_id("request_id", &req.request_id)?;
        let mut v = Violations::new();
        let survivor = v.check("", CustomerId::parse_name("survivor", &req.survivor));
        let n = req.duplicates.len();
        if n == 0 || n > MAX_MERGE_DUPLICATES {
            v.push(Violation::new(
                "duplicates",
                format!("must hold 1..{MAX_MERGE_DUPLICATES} customers, got {n}"),
            ));
        }
        let mut dups: Vec<CustomerId> = Vec::with_capacity(n);
        for (i, d) in req.duplicates.iter().enumerate() {
            let field = format!("duplicates[{i}]");
            let Some(d) = v.check("", CustomerId::parse_name(&field, d)) else {
                continue;
            };
            if Some(d) == survivor {
                v.push(Violation::new(
                    field,
                    "is the survivor: a customer cannot merge with itself",
                ));
            } else if let Some(j) = dups.iter().position(|x| *x == d) {
                v.push(Violation::new(field, format!("repeats duplicates[{j}]")));
            } else {
                dups.push(d);
            }
        }
        let policy = req.policy.clone().unwrap_or_default();
        let default_policy = v.check(
            "",
            convert::merge_policy(
                "policy.default_attribute_policy",
                policy.default_attribute_policy,
            ),
        );
        let mut per_key = HashMap::new();
        for (k, p) in &policy.attribute_policies {
            let field = format!(
                "policy.attribute_policies[{}]",
                clm_domain::validation::echo(k)
            );
            if let Some(p) = v.check("", convert::merge_policy(&field, *p)) {
                per_key.insert(k.clone(), p);
            }
        }
        v.into_result()?;
        let (Some(survivor), Some(default_policy)) = (survivor, default_policy) else {
            return Err(Error::internal("validated fields missing"));
        };
        idempotency::write(
            &self.rt,
            "MergeCustomers",
            rid,
            &req,
            now,
            async move |txn| {
                let mut all = dups.clone();
                all.push(survivor);
                let locked = customers::lock_many(txn, &all).await?;
                for id in &all {
                    if !locked.contains(&id.to_string()) {
                        return Err(customers::missing(txn, *id).await);
                    }
                }
                let records = customers::get_many(txn, &all).await?;
                let (mut rec, others): (Vec<_>, Vec<_>) =
                    records.into_iter().partition(|r| r.id == survivor);
                let mut rec = rec
                    .pop()
                    .ok_or_else(|| Error::internal("locked survivor not read"))?;
                let expected = rec.version;

                // Stage: the furthest, with a history entry saying why.
                let stage_before = rec.stage;
                let furthest = clm_domain::lifecycle::Stage::furthest(
                    std::iter::once(rec.stage).chain(others.iter().map(|o| o.stage)),
                )
                .unwrap_or(rec.stage);
                let merged_names: Vec<String> = dups.iter().map(CustomerId::name).collect();

                // Attributes by policy; the newest duplicate first.
                let mut sorted: Vec<&CustomerRecord> = others.iter().collect();
                sorted.sort_by_key(|o| std::cmp::Reverse(o.update_time));
                let sets: Vec<_> = sorted
                    .iter()
                    .map(|o| (&o.attributes, o.update_time))
                    .collect();
                let attrs = attributes::merge((&rec.attributes, rec.update_time), &sets, |k| {
                    per_key.get(k).copied().unwrap_or(default_policy)
                });
                let attributes_changed = attrs != rec.attributes;
                rec.attributes = attrs;
                let mut merged_from = rec.merged_from.clone();
                for o in &others {
                    merged_from.push(o.id);
                    merged_from.extend(o.merged_from.iter().copied());
                }
                merged_from.sort();
                merged_from.dedup();
                rec.merged_from = merged_from;
                // A duplicate's identifiers move here, and so does its mark.
                rec.reimported_after_erasure |= others.iter().any(|o| o.reimported_after_erasure);

                // Consent: the strictest statement per cell wins.
                let stated = consent::current_of_many(txn, &all).await?;
                let own = survivor.to_string();
                let mut changes: Vec<ConsentChangeRecord> = Vec::new();
                for (_, row) in stated.iter().filter(|(c, _)| *c != own) {
                    let mine = stated
                        .iter()
                        .find(|(c, r)| {
                            *c == own && r.purpose == row.purpose && r.channel == row.channel
                        })
                        .map_or(clm_domain::consent::ConsentState::Unset, |(_, r)| r.state);
                    let pending = changes
                        .iter_mut()
                        .find(|c| c.purpose == row.purpose && c.channel == row.channel);
                    let current = pending.as_ref().map_or(mine, |c| c.to);
                    let strictest = current.strictest(row.state);
                    if strictest == current {
                        continue;
                    }
                    match pending {
                        Some(c) => c.to = strictest,
                        None => changes.push(ConsentChangeRecord {
                            purpose: row.purpose,
                            channel: row.channel,
                            from: mine,
                            to: strictest,
                            source: clm_domain::consent::ConsentSource::Merge,
                            actor: actor.subject.clone(),
                            change_time: now,
                        }),
                    }
                }
                changes.sort_by_key(|c| (c.purpose, c.channel));

                merge::move_children(txn, survivor, &dups).await?;
                merge::redirect(txn, survivor, &dups, now).await?;
                consent::apply(txn, survivor, &changes).await?;
                let mut events = Vec::new();
                if furthest != stage_before {
                    rec.stage = furthest;
                    rec.stage_change_time = now;
                    let change = StageChangeRecord {
                        id: 0,
                        customer: survivor,
                        from: Some(stage_before),
                        to: furthest,
                        reason: format!("merged {}", merged_names.join(", ")),
                        actor: actor.subject.clone(),
                        change_time: now,
                    };
                    stages::insert_many(txn, std::slice::from_ref(&change)).await?;
                    events.push(events::stage_changed(
                        &survivor.name(),
                        convert::stage_change_to_proto(&change, now),
                    ));
                }
                rec.version += 1;
                rec.update_time = now;
                if !customers::update(txn, &rec, expected, attributes_changed).await? {
                    return Err(CustomerError::Concurrent.into());
                }
                let out = convert::customer_to_proto(&rec, today);
                if !changes.is_empty() {
                    events.push(events::consent_changed(
                        &survivor.name(),
                        changes
                            .iter()
                            .map(convert::consent_change_to_proto)
                            .collect(),
                    ));
                }
                events.insert(0, events::customers_merged(&out, merged_names));
                Ok((
                    pb::MergeCustomersResponse {
                        customer: Some(out),
                    },
                    events,
                ))
            },
        )
        .await
    }
}

impl CustomerApi {
    async fn erase(
        &self,
        actor: Principal,
        req: pb::EraseCustomerRequest,
    ) -> Result<pb::ErasureRequest> {
        let now = self.now();
        let rid = request_id("request_id", &req.request_id)?;
        let id = CustomerId::parse_name("name", &req.name)?;
        idempotency::write(
            &self.rt,
            "EraseCustomer",
            rid,
            &req,
            now,
            async move |txn| {
                match customers::lock(txn, id).await {
                    Ok(()) => {}
                    Err(Error::NotFound(e)) => {
                        // Erasing twice answers the first request.
                        return match erasure::of_customer(txn, id).await? {
                            Some(done) => Ok((erasure_to_proto(&done), vec![])),
                            None => Err(Error::NotFound(e)),
                        };
                    }
                    Err(e) => return Err(e),
                }
                let rec = customers::get(txn, id).await?;
                let held: Vec<_> = identifiers::list(txn, id)
                    .await?
                    .into_iter()
                    .map(|i| i.identifier)
                    .collect();
                let erasure_id = ErasureRequestId::new();
                let salt = erasure::salt(txn).await?;
                erasure::keep_hashes(txn, erasure_id, &salt, &held).await?;
                erasure::forget(
                    txn,
                    id,
                    &rec.merged_from,
                    events::SCRUBBED_TYPES,
                    events::scrubbed,
                )
                .await?;
                let receipts = vec![(crate::SERVICE.to_owned(), now)];
                let done = ErasureRecord {
                    id: erasure_id,
                    customer: id,
                    requester: actor.subject.clone(),
                    create_time: now,
                    // Complete at once when no peer's receipt is expected.
                    complete_time: erasure::covers(&self.erasing_services, &receipts)
                        .then_some(now),
                    expected: self.erasing_services.clone(),
                    receipts,
                };
                erasure::insert(txn, &done).await?;
                let out = erasure_to_proto(&done);
                let event = events::customer_erased(
                    &id.name(),
                    &erasure_id.name(),
                    rec.merged_from.iter().map(CustomerId::name).collect(),
                );
                Ok((out, vec![event]))
            },
        )
        .await
    }

    async fn get_erasure(&self, req: pb::GetErasureRequestRequest) -> Result<pb::ErasureRequest> {
        let id = ErasureRequestId::parse_name("name", &req.name)?;
        Ok(self.with_overdue(erasure_to_proto(&erasure::get(&self.rt.read, id).await?)))
    }

    async fn list_erasures(
        &self,
        req: pb::ListErasureRequestsRequest,
    ) -> Result<pb::ListErasureRequestsResponse> {
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let pager = Pager::new(&["erasure_requests"]);
        let after = pager.after::<i64>(&req.page_token)?;
        let rows = erasure::list(&self.rt.read, after, size as u64 + 1).await?;
        let (erasure_requests, next_page_token) = pager.page(
            &rows,
            size,
            |r| self.with_overdue(erasure_to_proto(r)),
            |r| (clm_platform::db::to_micros(r.create_time), r.id.to_string()),
        );
        Ok(pb::ListErasureRequestsResponse {
            erasure_requests,
            next_page_token,
        })
    }
}

/// The peers whose erasure receipts the service collects (from their
/// change streams, when `peers.<service>` is configured).
pub fn erasure_peers() -> impl Iterator<Item = &'static str> {
    ERASING_SERVICES
        .into_iter()
        .filter(|s| *s != crate::SERVICE)
}

/// The services a new erasure request expects receipts from: this one and
/// every peer it follows for receipts.
fn erasing_services(config: &clm_platform::config::Config) -> Vec<String> {
    ERASING_SERVICES
        .iter()
        .filter(|s| **s == crate::SERVICE || config.peers.contains_key(**s))
        .map(|s| (*s).to_owned())
        .collect()
}

impl CustomerApi {
    /// Marks `r` OVERDUE, naming the services whose receipt is missing,
    /// when it is still in progress `customer.erasure_overdue_secs` after
    /// it was made.
    fn with_overdue(&self, mut r: pb::ErasureRequest) -> pb::ErasureRequest {
        let limit = self.rt.config.customer.erasure_overdue_secs;
        let made = r.create_time.as_ref().map_or(0, |t| t.seconds);
        let overdue_at = made.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX));
        if r.state == pb::ErasureState::InProgress as i32 && self.now().timestamp() >= overdue_at {
            r.state = pb::ErasureState::Overdue as i32;
            r.overdue_services = r
                .expected_services
                .iter()
                .filter(|s| !r.receipts.iter().any(|x| &x.service == *s))
                .cloned()
                .collect();
        }
        r
    }
}

/// The gauge `clm.customer.erasures.overdue`: erasure requests still
/// missing receipts `customer.erasure_overdue_secs` after they were made,
/// counted every minute (and logged when there are any).
pub async fn watch_overdue_erasures(rt: Runtime, shutdown: tokio_util::sync::CancellationToken) {
    let gauge = clm_platform::telemetry::meter(crate::SERVICE)
        .u64_gauge("clm.customer.erasures.overdue")
        .with_description(
            "Erasure requests still missing receipts after customer.erasure_overdue_secs",
        )
        .build();
    let limit = chrono::Duration::seconds(
        i64::try_from(rt.config.customer.erasure_overdue_secs).unwrap_or(i64::MAX / 1_000_000),
    );
    loop {
        let before = rt.clock.now() - limit;
        match erasure::count_overdue(&rt.read, before).await {
            Ok(n) => {
                gauge.record(n, &[]);
                if n > 0 {
                    tracing::warn!(
                        overdue = n,
                        "erasure requests are overdue: a service has not sent its receipt"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not count overdue erasure requests"),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// A stored erasure request → proto; COMPLETED once every expected receipt is in.
fn erasure_to_proto(r: &ErasureRecord) -> pb::ErasureRequest {
    pb::ErasureRequest {
        name: r.id.name(),
        customer: r.customer.name(),
        state: if r.complete_time.is_some() {
            pb::ErasureState::Completed
        } else {
            pb::ErasureState::InProgress
        } as i32,
        expected_services: r.expected.clone(),
        receipts: r
            .receipts
            .iter()
            .map(|(service, at)| pb::ErasureReceipt {
                service: service.clone(),
                erase_time: Some(clm_platform::convert::timestamp(*at)),
            })
            .collect(),
        requester: r.requester.clone(),
        create_time: Some(clm_platform::convert::timestamp(r.create_time)),
        complete_time: r.complete_time.map(clm_platform::convert::timestamp),
        overdue_services: Vec::new(),
    }
}

/// What a grouped CreateCustomer statement did for a call.
#[derive(Debug, Clone, Copy)]
enum Grouped {
    /// It wrote the call's customer (`true`), or, the call alone in its
    /// batch, wrote nothing (`false`: take the general path).
    Done(bool),
    /// Its answer was lost (the connection failed): it may have committed.
    /// A call with a request id tries again safely (a committed key
    /// replays); one without cannot.
    Unknown,
}

/// New customers made ready for one statement on PostgreSQL
/// ([`create::insert_at_once`]): their rows, protos and events.
#[derive(Debug)]
struct Creation {
    records: Vec<CustomerRecord>,
    history: Vec<StageChangeRecord>,
    holdings: Vec<IdentifierRecord>,
    /// The identifiers to check, each with its erased-identifier hash.
    checks: Vec<(clm_domain::contact::Identifier, Option<String>)>,
    /// The answer: the customers as created.
    customers: Vec<pb::Customer>,
    events: Vec<clm_platform::outbox::NewEvent>,
    /// When, and the trace the events continue (the call's, also when
    /// they are written by a statement shared with other calls).
    now: DateTime<Utc>,
    traceparent: Option<String>,
    /// The request's idempotency key and response, if it has a request id.
    claim: Option<idempotency::PgClaim>,
}

impl Creation {
    /// `items` ready to insert at once on PostgreSQL; `None` on SQLite.
    fn at_once(
        rt: &Runtime,
        items: &[(String, NewCustomer)],
        actor: &Principal,
        now: DateTime<Utc>,
        salt: Option<&str>,
    ) -> Option<Self> {
        if !clm_platform::db::is_postgres(&rt.db) {
            return None;
        }
        let checks = items
            .iter()
            .flat_map(|(_, c)| {
                identifiers::profile_identifiers(c.email.as_deref(), c.external_id.as_deref())
            })
            .map(|i| {
                let hash = salt.map(|s| erasure::identifier_hash(s, &i));
                (i, hash)
            })
            .collect();
        let records: Vec<CustomerRecord> = new_records(items.to_vec(), now)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let customers = protos(&records, now);
        Some(Self {
            history: first_stages(&records, actor, now),
            holdings: profile_holdings(&records, now),
            events: customers.iter().map(events::customer_created).collect(),
            customers,
            records,
            checks,
            now,
            traceparent: clm_platform::client::current_traceparent(),
            claim: None,
        })
    }

    /// What [`create::insert_at_once`] writes for this call.
    fn new_customers(&self) -> create::NewCustomers<'_> {
        create::NewCustomers {
            records: &self.records,
            history: &self.history,
            identifiers: &self.holdings,
            checks: &self.checks,
            events: Traced {
                events: &self.events,
                now: self.now,
                traceparent: self.traceparent.clone(),
            },
            claim: self.claim.as_ref(),
        }
    }

    /// Inserts everything in one statement, its own transaction, with the
    /// claim stored under the request's key, and wakes the outbox relay;
    /// `false` when nothing was written (an identifier held or erased, or
    /// the key seen before): take the general path.
    async fn insert_at_once(&self, rt: &Runtime) -> Result<bool> {
        let done = create::insert_at_once(&rt.db, &[self.new_customers()]).await?;
        if done {
            rt.outbox.committed(true);
        }
        Ok(done)
    }

    /// Creations of concurrent calls written by one statement, one commit
    /// ([`Batcher`]): all of them, or none (each call then tries alone). A
    /// call alone in its batch hears whether it wrote; a statement whose
    /// answer was lost tells every call so ([`Grouped::Unknown`]).
    fn grouped(rt: Runtime) -> Run<std::sync::Arc<Self>, Grouped> {
        std::sync::Arc::new(move |calls: Vec<std::sync::Arc<Self>>| {
            let rt = rt.clone();
            Box::pin(async move {
                // Retries of one request side by side: one claim would fail
                // the other, so each goes alone (and waits for the first).
                let mut keys = std::collections::HashSet::new();
                if !calls
                    .iter()
                    .filter_map(|c| c.claim.as_ref())
                    .all(|k| keys.insert(k.key()))
                {
                    return Ok(vec![None; calls.len()]);
                }
                let parts: Vec<_> = calls.iter().map(|c| c.new_customers()).collect();
                let answer = match create::write(&rt.db, &parts).await {
                    Ok(done) => {
                        if done {
                            rt.outbox.committed(true);
                        }
                        (done || calls.len() == 1).then_some(Grouped::Done(done))
                    }
                    // Refused: nothing written, each call tries alone.
                    Err(e) if clm_platform::db::is_refused_by_database(&e) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, calls = calls.len(), "a grouped create's outcome is unknown");
                        Some(Grouped::Unknown)
                    }
                };
                Ok(vec![answer; calls.len()])
            })
        })
    }
}

/// `items` as the records of new customers created at `now`, each with
/// its field prefix.
fn new_records(
    items: Vec<(String, NewCustomer)>,
    now: DateTime<Utc>,
) -> Vec<(String, CustomerRecord)> {
    items
        .into_iter()
        .map(|(prefix, c)| {
            let record = CustomerRecord {
                reimported_after_erasure: false,
                id: CustomerId::new(),
                external_id: c.external_id,
                email: c.email,
                display_name: c.display_name,
                demographics: c.demographics,
                attributes: c.attributes,
                stage: c.stage,
                stage_change_time: now,
                create_time: now,
                update_time: now,
                version: 1,
                merged_from: Vec::new(),
                acquisition_campaign: c.acquisition_campaign,
            };
            (prefix, record)
        })
        .collect()
}

/// The first stage-history entries of new customers.
fn first_stages(
    records: &[CustomerRecord],
    actor: &Principal,
    now: DateTime<Utc>,
) -> Vec<StageChangeRecord> {
    records
        .iter()
        .map(|r| StageChangeRecord {
            id: 0,
            customer: r.id,
            from: None,
            to: r.stage,
            reason: "created".into(),
            actor: actor.subject.clone(),
            change_time: now,
        })
        .collect()
}

/// The identifiers new customers' profiles hold.
fn profile_holdings(records: &[CustomerRecord], now: DateTime<Utc>) -> Vec<IdentifierRecord> {
    records
        .iter()
        .flat_map(|r| {
            identifiers::profile_identifiers(r.email.as_deref(), r.external_id.as_deref())
                .into_iter()
                .map(|identifier| IdentifierRecord {
                    customer: r.id,
                    identifier,
                    profile: true,
                    create_time: now,
                })
        })
        .collect()
}

/// Records as protos, as of `now`'s date.
fn protos(records: &[CustomerRecord], now: DateTime<Utc>) -> Vec<pb::Customer> {
    records
        .iter()
        .map(|r| convert::customer_to_proto(r, now.date_naive()))
        .collect()
}

/// The identifiers of a profile's `email` and `external_id`, each with the
/// request field under `prefix` that carries it.
fn profile_keys(
    prefix: &str,
    email: Option<&str>,
    external_id: Option<&str>,
) -> Vec<(String, clm_domain::contact::Identifier)> {
    identifiers::profile_identifiers(email, external_id)
        .into_iter()
        .map(|i| {
            let f = match i.kind {
                clm_domain::contact::IdentifierKind::Email => "email",
                _ => "external_id",
            };
            (format!("{prefix}.{f}"), i)
        })
        .collect()
}

/// How the touchpoints of one batch (by position) were recorded.
#[derive(Debug, Default)]
struct Recorded {
    /// Newly recorded.
    recorded: Vec<usize>,
    /// Already recorded, or repeated in the batch, with the same payload.
    duplicates: usize,
    /// Event id taken by a different touchpoint.
    conflicts: Vec<pb::TouchpointConflict>,
}

impl Recorded {
    fn into_response(self) -> pb::RecordTouchpointsResponse {
        pb::RecordTouchpointsResponse {
            recorded_count: self.recorded.len() as i32,
            duplicate_count: self.duplicates as i32,
            conflict_count: self.conflicts.len() as i32,
            conflicts: self.conflicts,
        }
    }
}

/// Records the touchpoints of `batch` whose event id is new (the first of
/// each id in the batch), and tells duplicates from conflicts for the rest
/// by comparing each with the touchpoint holding its id: one insert that
/// skips the ids already stored, and a lookup of those only when there are
/// any (a retry or a conflict; never for a batch of new events).
async fn record_new(txn: &DatabaseTransaction, batch: &[TouchpointRecord]) -> Result<Recorded> {
    let event_ids: Vec<&str> = batch
        .iter()
        .map(|r| r.touchpoint.event_id.as_str())
        .collect();
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (i, id) in event_ids.iter().enumerate() {
        first.entry(id).or_insert(i);
    }
    let mut new_positions: Vec<usize> = first.values().copied().collect();
    new_positions.sort_unstable();
    let to_insert: Vec<&TouchpointRecord> = new_positions.iter().map(|&i| &batch[i]).collect();
    let inserted = touchpoints::insert_new(txn, &to_insert).await?;
    let stored: Vec<&str> = new_positions
        .iter()
        .map(|&i| event_ids[i])
        .filter(|id| !inserted.contains(*id))
        .collect();
    let holders = if stored.is_empty() {
        HashMap::new()
    } else {
        touchpoints::existing(txn, &stored).await?
    };
    let mut out = Recorded::default();
    for (i, r) in batch.iter().enumerate() {
        let id = event_ids[i];
        let holder = match (holders.get(id), first.get(id)) {
            (Some(stored), _) => stored,
            (None, Some(&f)) if f == i && inserted.contains(id) => {
                out.recorded.push(i);
                continue;
            }
            (None, Some(&f)) if inserted.contains(id) => &batch[f],
            _ => return Err(Error::internal("a touchpoint neither stored nor new")),
        };
        let reason = if holder.customer != r.customer {
            Some((
                pb::TouchpointConflictReason::OtherCustomer,
                "is recorded for another customer",
            ))
        } else if holder.touchpoint != r.touchpoint {
            Some((
                pb::TouchpointConflictReason::DifferentPayload,
                "is recorded with a different payload",
            ))
        } else {
            None
        };
        match reason {
            None => out.duplicates += 1,
            Some((reason, what)) => out.conflicts.push(pb::TouchpointConflict {
                index: i as i32,
                event_id: id.to_owned(),
                reason: reason as i32,
                description: format!("event id {} {what}", clm_domain::validation::echo(id)),
            }),
        }
    }
    Ok(out)
}

/// Applies the masked fields of `c` to `rec`; returns whether attributes changed.
fn apply_mask(
    rec: &mut CustomerRecord,
    c: &pb::Customer,
    paths: &[String],
    today: chrono::NaiveDate,
) -> Result<bool> {
    let mut v = Violations::new();
    let mut attributes_changed = false;
    let new_demo = if paths.iter().any(|p| p.starts_with("demographics")) {
        Some(convert::demographics(
            "customer.demographics",
            &c.demographics.clone().unwrap_or_default(),
            today,
        )?)
    } else {
        None
    };
    for path in paths {
        match path.as_str() {
            "external_id" => {
                if let Some(x) = v.check(
                    "",
                    contact::external_id("customer.external_id", &c.external_id),
                ) {
                    rec.external_id = x;
                }
            }
            "email" => {
                if let Some(x) = v.check("", contact::email("customer.email", &c.email)) {
                    rec.email = x;
                }
            }
            "display_name" => {
                if let Some(x) = v.check(
                    "",
                    optional_text("customer.display_name", &c.display_name, 200),
                ) {
                    rec.display_name = x.unwrap_or_default();
                }
            }
            "demographics" => rec.demographics = new_demo.clone().unwrap_or_default(),
            "demographics.birth_date" => {
                rec.demographics.birth_date = new_demo.as_ref().and_then(|d| d.birth_date)
            }
            "demographics.gender" => {
                rec.demographics.gender = new_demo.as_ref().and_then(|d| d.gender)
            }
            "demographics.annual_income" => {
                rec.demographics.annual_income =
                    new_demo.as_ref().and_then(|d| d.annual_income.clone())
            }
            "demographics.occupation" => {
                rec.demographics.occupation = new_demo.as_ref().and_then(|d| d.occupation.clone())
            }
            "attributes" => match convert::attribute_map("customer.attributes", &c.attributes) {
                Ok(a) => {
                    rec.attributes = a;
                    attributes_changed = true;
                }
                Err(e) => v.0.extend(e.0),
            },
            p if p.starts_with("attributes.") => {
                let key = &p["attributes.".len()..];
                let field = format!("customer.attributes[{}]", clm_domain::validation::echo(key));
                if let Some(key) = v.check("", attributes::key("update_mask", key)) {
                    match c.attributes.get(&key) {
                        Some(a) => {
                            if let Some(val) = v.check("", convert::attribute_value(&field, a)) {
                                rec.attributes.insert(key, val);
                            }
                        }
                        None => {
                            rec.attributes.remove(&key);
                        }
                    }
                    attributes_changed = true;
                }
            }
            "stage" | "stage_change_time" => {
                v.push(Violation::new(
                    "update_mask",
                    "stage cannot be updated here; use TransitionStage",
                ));
            }
            "name"
            | "create_time"
            | "update_time"
            | "etag"
            | "demographics.age"
            | "merged_from"
            | "reimported_after_erasure" => {
                v.push(Violation::new(
                    "update_mask",
                    format!("{path} is output only"),
                ));
            }
            other => v.push(Violation::new(
                "update_mask",
                format!("unknown field path {}", clm_domain::validation::echo(other)),
            )),
        }
    }
    if attributes_changed {
        v.check(
            "",
            attributes::count("customer.attributes", rec.attributes.len()),
        );
    }
    v.into_result()?;
    Ok(attributes_changed)
}

#[tonic::async_trait]
impl CustomerService for CustomerApi {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        respond(request, &POLICY, |p, r| self.create(p, r)).await
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        respond(request, &POLICY, |_, r| self.get(r)).await
    }

    async fn get_customer_view(
        &self,
        request: Request<pb::GetCustomerViewRequest>,
    ) -> Result<Response<pb::CustomerView>, Status> {
        respond(request, &POLICY, |_, r| self.customer_view(r)).await
    }

    async fn update_customer(
        &self,
        request: Request<pb::UpdateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        respond(request, &POLICY, |_, r| self.update(r)).await
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list(r)).await
    }

    async fn batch_create_customers(
        &self,
        request: Request<pb::BatchCreateCustomersRequest>,
    ) -> Result<Response<pb::BatchCreateCustomersResponse>, Status> {
        respond(request, &POLICY, |p, r| self.batch_create(p, r)).await
    }

    async fn record_touchpoints(
        &self,
        request: Request<pb::RecordTouchpointsRequest>,
    ) -> Result<Response<pb::RecordTouchpointsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.record_touchpoints(r)).await
    }

    async fn list_touchpoints(
        &self,
        request: Request<pb::ListTouchpointsRequest>,
    ) -> Result<Response<pb::ListTouchpointsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list_touchpoints(r)).await
    }

    async fn transition_stage(
        &self,
        request: Request<pb::TransitionStageRequest>,
    ) -> Result<Response<pb::TransitionStageResponse>, Status> {
        respond(request, &POLICY, |p, r| self.transition(p, r)).await
    }

    async fn list_stage_history(
        &self,
        request: Request<pb::ListStageHistoryRequest>,
    ) -> Result<Response<pb::ListStageHistoryResponse>, Status> {
        respond(request, &POLICY, |_, r| self.stage_history(r)).await
    }

    async fn set_consent(
        &self,
        request: Request<pb::SetConsentRequest>,
    ) -> Result<Response<pb::Consent>, Status> {
        respond(request, &POLICY, |p, r| self.set_consent(p, r)).await
    }

    async fn get_consent(
        &self,
        request: Request<pb::GetConsentRequest>,
    ) -> Result<Response<pb::Consent>, Status> {
        respond(request, &POLICY, |_, r| self.get_consent(r)).await
    }

    async fn add_customer_identifier(
        &self,
        request: Request<pb::AddCustomerIdentifierRequest>,
    ) -> Result<Response<pb::CustomerIdentifier>, Status> {
        respond(request, &POLICY, |_, r| self.add_identifier(r)).await
    }

    async fn remove_customer_identifier(
        &self,
        request: Request<pb::RemoveCustomerIdentifierRequest>,
    ) -> Result<Response<pb::CustomerIdentifier>, Status> {
        respond(request, &POLICY, |_, r| self.remove_identifier(r)).await
    }

    async fn list_customer_identifiers(
        &self,
        request: Request<pb::ListCustomerIdentifiersRequest>,
    ) -> Result<Response<pb::ListCustomerIdentifiersResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list_identifiers(r)).await
    }

    async fn lookup_customer(
        &self,
        request: Request<pb::LookupCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        respond(request, &POLICY, |_, r| self.lookup(r)).await
    }

    async fn batch_lookup_customers(
        &self,
        request: Request<pb::BatchLookupCustomersRequest>,
    ) -> Result<Response<pb::BatchLookupCustomersResponse>, Status> {
        respond(request, &POLICY, |_, r| self.batch_lookup(r)).await
    }

    async fn merge_customers(
        &self,
        request: Request<pb::MergeCustomersRequest>,
    ) -> Result<Response<pb::MergeCustomersResponse>, Status> {
        respond(request, &POLICY, |p, r| self.merge(p, r)).await
    }

    async fn erase_customer(
        &self,
        request: Request<pb::EraseCustomerRequest>,
    ) -> Result<Response<pb::ErasureRequest>, Status> {
        respond(request, &POLICY, |p, r| self.erase(p, r)).await
    }

    async fn get_erasure_request(
        &self,
        request: Request<pb::GetErasureRequestRequest>,
    ) -> Result<Response<pb::ErasureRequest>, Status> {
        respond(request, &POLICY, |_, r| self.get_erasure(r)).await
    }

    async fn list_erasure_requests(
        &self,
        request: Request<pb::ListErasureRequestsRequest>,
    ) -> Result<Response<pb::ListErasureRequestsResponse>, Status> {
        respond(request, &POLICY, |_, r| self.list_erasures(r)).await
    }

    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> std::result::Result<Response<pb::Campaign>, Status> {
        respond(request, &POLICY, |_, r| campaigns::create(&self.rt, r)).await
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> std::result::Result<Response<pb::Campaign>, Status> {
        respond(request, &POLICY, |_, r| campaigns::get(&self.rt, r)).await
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> std::result::Result<Response<pb::ListCampaignsResponse>, Status> {
        respond(request, &POLICY, |_, r| campaigns::list(&self.rt, r)).await
    }

    async fn update_campaign(
        &self,
        request: Request<pb::UpdateCampaignRequest>,
    ) -> std::result::Result<Response<pb::Campaign>, Status> {
        respond(request, &POLICY, |_, r| campaigns::update(&self.rt, r)).await
    }

    async fn add_campaign_spend(
        &self,
        request: Request<pb::AddCampaignSpendRequest>,
    ) -> std::result::Result<Response<pb::AddCampaignSpendResponse>, Status> {
        respond(request, &POLICY, |_, r| campaigns::add_spend(&self.rt, r)).await
    }

    async fn get_funnel_report(
        &self,
        request: Request<pb::GetFunnelReportRequest>,
    ) -> std::result::Result<Response<pb::FunnelReport>, Status> {
        respond(request, &POLICY, |_, r| reports::funnel(&self.rt, r)).await
    }

    async fn get_acquisition_report(
        &self,
        request: Request<pb::GetAcquisitionReportRequest>,
    ) -> std::result::Result<Response<pb::AcquisitionReport>, Status> {
        respond(request, &POLICY, |_, r| reports::acquisition(&self.rt, r)).await
    }

    async fn get_clv_report(
        &self,
        request: Request<pb::GetClvReportRequest>,
    ) -> std::result::Result<Response<pb::ClvReport>, Status> {
        respond(request, &POLICY, |_, r| reports::clv(&self.rt, r)).await
    }

    async fn get_retention_report(
        &self,
        request: Request<pb::GetRetentionReportRequest>,
    ) -> std::result::Result<Response<pb::RetentionReport>, Status> {
        respond(request, &POLICY, |_, r| reports::retention(&self.rt, r)).await
    }

    async fn get_journey_report(
        &self,
        request: Request<pb::GetJourneyReportRequest>,
    ) -> std::result::Result<Response<pb::JourneyReport>, Status> {
        respond(request, &POLICY, |_, r| reports::journey(&self.rt, r)).await
    }
}

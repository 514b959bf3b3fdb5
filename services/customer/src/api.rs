//! `clm.customer.v1.CustomerService`: each rpc authorizes, converts the
//! request, runs one transaction and converts the result back.

use crate::convert;
use crate::error::CustomerError;
use crate::events;
use crate::store::customers::{self, CustomerRecord, NewCustomer};
use crate::store::stages::{self, StageChangeRecord};
use crate::store::touchpoints::{self, TouchpointRecord};
use chrono::{DateTime, Utc};
use clm_domain::ids::CustomerId;
use clm_domain::lifecycle::Transition;
use clm_domain::validation::{optional_text, page_size, request_id, required_text};
use clm_domain::{Violation, Violations, attributes, contact, filter, touchpoint};
use clm_platform::auth::{Principal, Role, authorize};
use clm_platform::idempotency::{self, Begun};
use clm_platform::page::{self, Cursor};
use clm_platform::{Error, Result, Runtime};
use clm_proto::customer as pb;
use clm_proto::customer::customer_service_server::CustomerService;
use sea_orm::DatabaseTransaction;
use std::collections::{HashMap, HashSet};
use tonic::{Request, Response, Status};

/// Roles that may change customers.
const WRITERS: &[Role] = &[Role::Marketer, Role::DataSteward, Role::Service];
/// Roles that may read customers.
const READERS: &[Role] = &[
    Role::Marketer,
    Role::DataSteward,
    Role::Service,
    Role::Analyst,
    Role::SegmentOwner,
];

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
const MAX_BATCH_CUSTOMERS: usize = 1000;

/// The customer service.
#[derive(Debug, Clone)]
pub struct CustomerApi {
    rt: Runtime,
}

impl CustomerApi {
    /// Serves from `rt`.
    pub fn new(rt: Runtime) -> Self {
        Self { rt }
    }

    fn now(&self) -> DateTime<Utc> {
        self.rt.clock.now()
    }

    /// Begins an idempotent write, or returns the stored response of a retry.
    async fn begin<R: prost::Message + Default>(
        &self,
        scope: &'static str,
        request_id: Option<String>,
        request: &impl prost::Message,
    ) -> Result<Begun<R>> {
        idempotency::begin(&self.rt.db, scope, request_id, request, self.now()).await
    }

    /// Reads a customer for a change, checking the caller's etag if one was sent.
    async fn load_for_write(
        &self,
        txn: &DatabaseTransaction,
        id: CustomerId,
        etag: &str,
    ) -> Result<CustomerRecord> {
        let rec = customers::get(txn, id).await?;
        let current = convert::etag(rec.version);
        if !etag.is_empty() && etag != current {
            return Err(CustomerError::StaleEtag {
                sent: etag.to_owned(),
                current,
            }
            .into());
        }
        Ok(rec)
    }

    /// Inserts validated customers (with their creation stage entries) and
    /// returns the stored records. `items` pairs each with its field prefix.
    async fn insert_customers(
        &self,
        txn: &DatabaseTransaction,
        items: Vec<(String, NewCustomer)>,
        actor: &Principal,
    ) -> Result<Vec<CustomerRecord>> {
        let now = self.now();
        let keys: Vec<(&str, Option<&str>, Option<&str>)> = items
            .iter()
            .map(|(p, c)| (p.as_str(), c.email.as_deref(), c.external_id.as_deref()))
            .collect();
        customers::check_unique(txn, &keys, None).await?;
        let records: Vec<CustomerRecord> = items
            .into_iter()
            .map(|(_, c)| CustomerRecord {
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
            })
            .collect();
        customers::insert_many(txn, &records).await?;
        let history: Vec<StageChangeRecord> = records
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
            .collect();
        stages::insert_many(txn, &history).await?;
        Ok(records)
    }

    async fn create(
        &self,
        actor: Principal,
        req: pb::CreateCustomerRequest,
    ) -> Result<pb::Customer> {
        let today = self.now().date_naive();
        let rid = request_id("request_id", &req.request_id)?;
        let c = req
            .customer
            .as_ref()
            .ok_or_else(|| Error::invalid("customer", "is required"))?;
        let draft = convert::new_customer("customer", c, today)?;
        let write = match self.begin("CreateCustomer", rid, &req).await? {
            Begun::Replay(prev) => return Ok(prev),
            Begun::New(w) => w,
        };
        let records = self
            .insert_customers(write.txn(), vec![("customer".into(), draft)], &actor)
            .await?;
        let out = convert::customer_to_proto(&records[0], today);
        write
            .finish(
                &self.rt.outbox,
                &[events::customer_created(&out)],
                &out,
                self.now(),
            )
            .await?;
        Ok(out)
    }

    async fn batch_create(
        &self,
        actor: Principal,
        req: pb::BatchCreateCustomersRequest,
    ) -> Result<pb::BatchCreateCustomersResponse> {
        let today = self.now().date_naive();
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
        let write = match self.begin("BatchCreateCustomers", rid, &req).await? {
            Begun::Replay(prev) => return Ok(prev),
            Begun::New(w) => w,
        };
        let records = self.insert_customers(write.txn(), items, &actor).await?;
        let customers: Vec<pb::Customer> = records
            .iter()
            .map(|r| convert::customer_to_proto(r, today))
            .collect();
        let evs: Vec<_> = customers.iter().map(events::customer_created).collect();
        let out = pb::BatchCreateCustomersResponse { customers };
        write
            .finish(&self.rt.outbox, &evs, &out, self.now())
            .await?;
        Ok(out)
    }

    async fn get(&self, req: pb::GetCustomerRequest) -> Result<pb::Customer> {
        let id = CustomerId::parse_name("name", &req.name)?;
        let r = customers::get(&self.rt.read, id).await?;
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
        let write = match self.begin("UpdateCustomer", rid, &req).await? {
            Begun::Replay(prev) => return Ok(prev),
            Begun::New(w) => w,
        };
        let txn = write.txn();
        let mut rec = self.load_for_write(txn, id, &c.etag).await?;
        let attributes_changed = apply_mask(&mut rec, c, &paths, today)?;
        if paths.iter().any(|p| p == "email" || p == "external_id") {
            customers::check_unique(
                txn,
                &[("customer", rec.email.as_deref(), rec.external_id.as_deref())],
                Some(id),
            )
            .await?;
        }
        let expected = rec.version;
        rec.version += 1;
        rec.update_time = now;
        if !customers::update(txn, &rec, expected, attributes_changed).await? {
            return Err(CustomerError::Concurrent.into());
        }
        let out = convert::customer_to_proto(&rec, today);
        write
            .finish(
                &self.rt.outbox,
                &[events::customer_updated(&out, paths)],
                &out,
                now,
            )
            .await?;
        Ok(out)
    }

    async fn list(&self, req: pb::ListCustomersRequest) -> Result<pb::ListCustomersResponse> {
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let comparisons = filter::parse("filter", &req.filter)?;
        let cond = customers::compile_filter("filter", &comparisons)?;
        let (sort, desc) = customers::parse_order_by("order_by", &req.order_by)?;
        let q = page::fingerprint(&[&req.filter, &req.order_by]);
        let after = page::decode("page_token", &req.page_token, &q)?.map(|c| (c.v, c.id));
        let rows = customers::list(&self.rt.read, cond, sort, desc, after, size as u64 + 1).await?;
        let today = self.now().date_naive();
        let customers = page::fill(
            rows.iter().map(|r| convert::customer_to_proto(r, today)),
            size,
        );
        let next_page_token = if rows.len() > customers.len() {
            let last = &rows[customers.len() - 1];
            page::encode(&Cursor {
                q,
                v: sort.value_of(last),
                id: last.id.to_string(),
            })
        } else {
            String::new()
        };
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
        let mut records = Vec::with_capacity(req.touchpoints.len());
        let mut seen = HashSet::with_capacity(req.touchpoints.len());
        for (i, t) in req.touchpoints.iter().enumerate() {
            match convert::touchpoint(&format!("touchpoints[{i}]"), t, now) {
                Ok((customer, touchpoint)) => {
                    if seen.insert(touchpoint.event_id.clone()) {
                        records.push(TouchpointRecord {
                            customer,
                            touchpoint,
                            record_time: now,
                        });
                    }
                }
                Err(e) => v.0.extend(e.0),
            }
        }
        v.into_result()?;
        let mut ids: Vec<String> = records.iter().map(|r| r.customer.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        // Idempotent by event id, so no request key: the write only batches the outbox and commit.
        let Begun::New(write) = self
            .begin::<pb::RecordTouchpointsResponse>("RecordTouchpoints", None, &req)
            .await?
        else {
            return Err(Error::internal("a write without a key cannot be a replay"));
        };
        let txn = write.txn();
        let existing: HashSet<String> = customers::existing_ids(txn, &ids)
            .await?
            .into_iter()
            .collect();
        if let Some(missing) = ids.iter().find(|id| !existing.contains(*id)) {
            return Err(Error::NotFound(format!("customers/{missing}")));
        }
        let inserted = touchpoints::insert_new(txn, &records).await?;
        let evs: Vec<_> = records
            .iter()
            .filter(|r| inserted.contains(&r.touchpoint.event_id))
            .map(|r| events::touchpoint_recorded(convert::touchpoint_to_proto(r)))
            .collect();
        let recorded = inserted.len();
        let out = pb::RecordTouchpointsResponse {
            recorded_count: recorded as i32,
            duplicate_count: (req.touchpoints.len() - recorded) as i32,
        };
        write.finish(&self.rt.outbox, &evs, &out, now).await?;
        Ok(out)
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
        let q = page::fingerprint(&[&req.filter]);
        let after = match page::decode("page_token", &req.page_token, &q)? {
            Some(c) => Some((
                c.v.as_i64().ok_or_else(|| {
                    Error::invalid(
                        "page_token",
                        "is not a page token returned by this list call",
                    )
                })?,
                c.id,
            )),
            None => None,
        };
        if customers::existing_ids(&self.rt.read, &[id.to_string()])
            .await?
            .is_empty()
        {
            return Err(Error::NotFound(id.name()));
        }
        let rows = touchpoints::list(&self.rt.read, id, kind, after, size as u64 + 1).await?;
        let touchpoints = page::fill(rows.iter().map(convert::touchpoint_to_proto), size);
        let next_page_token = if rows.len() > touchpoints.len() {
            let last = &rows[touchpoints.len() - 1].touchpoint;
            page::encode(&Cursor {
                q,
                v: clm_platform::db::to_micros(last.occurred_time).into(),
                id: last.event_id.clone(),
            })
        } else {
            String::new()
        };
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
        let write = match self.begin("TransitionStage", rid, &req).await? {
            Begun::Replay(prev) => return Ok(prev),
            Begun::New(w) => w,
        };
        let txn = write.txn();
        let mut rec = self.load_for_write(txn, id, &req.etag).await?;
        let t =
            Transition::new(rec.stage, to, reason, actor.subject).map_err(CustomerError::from)?;
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
        let out = pb::TransitionStageResponse {
            customer: Some(convert::customer_to_proto(&rec, today)),
            change: Some(change.clone()),
        };
        write
            .finish(
                &self.rt.outbox,
                &[events::stage_changed(&id.name(), change)],
                &out,
                now,
            )
            .await?;
        Ok(out)
    }

    async fn stage_history(
        &self,
        req: pb::ListStageHistoryRequest,
    ) -> Result<pb::ListStageHistoryResponse> {
        let id = CustomerId::parse_name("parent", &req.parent)?;
        let size = page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE)? as usize;
        let q = page::fingerprint(&["stage_history"]);
        let after = match page::decode("page_token", &req.page_token, &q)? {
            Some(c) => c.v.as_i64().ok_or_else(|| {
                Error::invalid(
                    "page_token",
                    "is not a page token returned by this list call",
                )
            })?,
            None => 0,
        };
        if customers::existing_ids(&self.rt.read, &[id.to_string()])
            .await?
            .is_empty()
        {
            return Err(Error::NotFound(id.name()));
        }
        let rows = stages::list(&self.rt.read, id, after, size as u64 + 1).await?;
        let now = self.now();
        let changes = rows
            .iter()
            .take(size)
            .enumerate()
            .map(|(i, c)| {
                convert::stage_change_to_proto(c, rows.get(i + 1).map_or(now, |n| n.change_time))
            })
            .collect();
        let next_page_token = if rows.len() > size {
            page::encode(&Cursor {
                q,
                v: rows[size - 1].id.into(),
                id: String::new(),
            })
        } else {
            String::new()
        };
        Ok(pb::ListStageHistoryResponse {
            changes,
            next_page_token,
        })
    }
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
                let field = format!("customer.attributes[{key:?}]");
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
            "name" | "create_time" | "update_time" | "etag" | "demographics.age" => {
                v.push(Violation::new(
                    "update_mask",
                    format!("{path} is output only"),
                ));
            }
            other => v.push(Violation::new(
                "update_mask",
                format!("unknown field path {other:?}"),
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
        let p = authorize(&request, WRITERS)?;
        Ok(Response::new(self.create(p, request.into_inner()).await?))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        authorize(&request, READERS)?;
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn update_customer(
        &self,
        request: Request<pb::UpdateCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        authorize(&request, WRITERS)?;
        Ok(Response::new(self.update(request.into_inner()).await?))
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        authorize(&request, READERS)?;
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn batch_create_customers(
        &self,
        request: Request<pb::BatchCreateCustomersRequest>,
    ) -> Result<Response<pb::BatchCreateCustomersResponse>, Status> {
        let p = authorize(&request, WRITERS)?;
        Ok(Response::new(
            self.batch_create(p, request.into_inner()).await?,
        ))
    }

    async fn record_touchpoints(
        &self,
        request: Request<pb::RecordTouchpointsRequest>,
    ) -> Result<Response<pb::RecordTouchpointsResponse>, Status> {
        authorize(&request, WRITERS)?;
        Ok(Response::new(
            self.record_touchpoints(request.into_inner()).await?,
        ))
    }

    async fn list_touchpoints(
        &self,
        request: Request<pb::ListTouchpointsRequest>,
    ) -> Result<Response<pb::ListTouchpointsResponse>, Status> {
        authorize(&request, READERS)?;
        Ok(Response::new(
            self.list_touchpoints(request.into_inner()).await?,
        ))
    }

    async fn transition_stage(
        &self,
        request: Request<pb::TransitionStageRequest>,
    ) -> Result<Response<pb::TransitionStageResponse>, Status> {
        let p = authorize(&request, WRITERS)?;
        Ok(Response::new(
            self.transition(p, request.into_inner()).await?,
        ))
    }

    async fn list_stage_history(
        &self,
        request: Request<pb::ListStageHistoryRequest>,
    ) -> Result<Response<pb::ListStageHistoryResponse>, Status> {
        authorize(&request, READERS)?;
        Ok(Response::new(
            self.stage_history(request.into_inner()).await?,
        ))
    }
}

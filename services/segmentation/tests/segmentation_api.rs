//! The segmentation service through gRPC, following a real customer
//! service: each condition kind, nested logic, backfill on create and on
//! edit, exact window expiry with a controlled clock, a restart in the
//! middle of a window, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use clm_platform::testing::assert_bad_field;
use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use common::*;
use sea_orm::ConnectionTrait;
use tokio_stream::StreamExt;

#[tokio::test]
async fn window_expires_at_the_exact_instant_and_survives_a_restart() {
    let mut h = start().await;
    let mut cust = h.customers();
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    let t = t0();
    for i in 0..3 {
        feature_use(
            &mut cust,
            &ada,
            "export",
            t - Duration::days(2) + Duration::hours(i),
        )
        .await;
    }
    let mut seg = h.segments();
    let s = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "export", 7d) >= 3"#,
    )
    .await;
    let ready = wait_count(&mut seg, &s.name, 1).await;
    assert_eq!(ready.state, pb::SegmentState::Ready as i32, "{ready:?}");
    assert!(is_member(&mut seg, &s.name, &ada).await);

    // The first export leaves the window 7 days after it happened: at
    // t - 2d + 7d = t + 5d. Restart in the middle of the window first.
    h.advance(Duration::days(3));
    h.restart_segmentation().await;
    let mut seg = h.segments();
    assert!(is_member(&mut seg, &s.name, &ada).await);
    let exit_at = t - Duration::days(2) + Duration::days(7);
    h.clock.set(exit_at - Duration::microseconds(1));
    // Nothing is due yet; the stream shows only the entry so far.
    let mut watch = seg
        .watch_membership(pb::WatchMembershipRequest {
            segment: s.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let entered = watch.next().await.unwrap().unwrap();
    assert_eq!(
        entered.change.as_ref().unwrap().change,
        pb::MembershipChange::Entered as i32
    );
    assert!(is_member(&mut seg, &s.name, &ada).await);
    h.clock.set(exit_at);
    wait_member(&mut seg, &s.name, &ada, false).await;
    let exited = watch.next().await.unwrap().unwrap();
    let change = exited.change.unwrap();
    assert_eq!(change.change, pb::MembershipChange::Exited as i32);
    assert_eq!(change.customer, ada);
    assert_eq!(
        change.change_time,
        Some(ts(exit_at)),
        "left at the exact instant"
    );
    assert!(exited.sequence > entered.sequence);
}

/// A touchpoint that pushes a window's end later leaves the timer where
/// it was: it fires then, finds the customer still in and arms the new
/// end, where the exit happens at the exact instant. A touchpoint the
/// rule's filter does not pass changes nothing.
#[tokio::test]
async fn a_later_touchpoint_moves_the_exit_and_the_earlier_timer_arms_it() {
    let h = start().await;
    let mut cust = h.customers();
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    let t = t0();
    let second = t - Duration::days(2) + Duration::hours(1);
    feature_use(&mut cust, &ada, "export", t - Duration::days(2)).await;
    feature_use(&mut cust, &ada, "export", second).await;
    let mut seg = h.segments();
    let two = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "export", 7d) >= 2"#,
    )
    .await;
    let three = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "export", 7d) >= 3"#,
    )
    .await;
    wait_count(&mut seg, &two.name, 1).await;
    wait_count(&mut seg, &three.name, 0).await;
    let mut watch = seg
        .watch_membership(pb::WatchMembershipRequest {
            segment: two.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let entered = watch.next().await.unwrap().unwrap();
    assert_eq!(
        entered.change.as_ref().unwrap().change,
        pb::MembershipChange::Entered as i32
    );
    feature_use(&mut cust, &ada, "import", t).await;
    feature_use(&mut cust, &ada, "export", t).await;
    // Both applied: the third export put her in `three`.
    wait_member(&mut seg, &three.name, &ada, true).await;

    // The first export leaves the window at t + 5d: `three` loses her
    // then, `two` (its timer still due then) keeps her.
    h.clock.set(t + Duration::days(5));
    wait_member(&mut seg, &three.name, &ada, false).await;
    assert!(is_member(&mut seg, &two.name, &ada).await);
    // The second leaves at second + 7d: her exit from `two`, at that instant.
    let exit_at = second + Duration::days(7);
    h.clock.set(exit_at);
    wait_member(&mut seg, &two.name, &ada, false).await;
    let exited = watch.next().await.unwrap().unwrap();
    let change = exited.change.unwrap();
    assert_eq!(change.change, pb::MembershipChange::Exited as i32);
    assert_eq!(
        change.change_time,
        Some(ts(exit_at)),
        "left at the exact instant"
    );
}

/// A customer in several windowed segments has one timer, due at the
/// earliest exit: it fires then, the exit is recorded at that exact
/// instant, and it arms the next exit, recorded at its own instant.
#[tokio::test]
async fn one_timer_per_customer_fires_each_windows_exit_at_its_instant() {
    let h = start().await;
    let mut cust = h.customers();
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    let t = t0();
    let used = t - Duration::days(1);
    feature_use(&mut cust, &ada, "export", used).await;
    let mut seg = h.segments();
    let mut segments = Vec::new();
    for days in [2, 3, 5] {
        let s = create_segment(
            &mut seg,
            &format!(r#"count(feature_use where feature = "export", {days}d) >= 1"#),
        )
        .await;
        wait_count(&mut seg, &s.name, 1).await;
        segments.push((days, s));
    }
    let db = sea_orm::Database::connect(&h.seg_backend.database_url)
        .await
        .unwrap();
    let timers: i64 = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM timer_queue WHERE kind = 'segmentation.window'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "n")
        .unwrap();
    assert_eq!(timers, 1, "one timer for the customer, not one per segment");
    for (i, (days, s)) in segments.iter().enumerate() {
        let exit_at = used + Duration::days(*days);
        let mut watch = seg
            .watch_membership(pb::WatchMembershipRequest {
                segment: s.name.clone(),
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let entered = watch.next().await.unwrap().unwrap();
        assert_eq!(
            entered.change.unwrap().change,
            pb::MembershipChange::Entered as i32
        );
        h.clock.set(exit_at - Duration::microseconds(1));
        assert!(is_member(&mut seg, &s.name, &ada).await);
        h.clock.set(exit_at);
        wait_member(&mut seg, &s.name, &ada, false).await;
        let change = watch.next().await.unwrap().unwrap().change.unwrap();
        assert_eq!(change.change, pb::MembershipChange::Exited as i32);
        assert_eq!(
            change.change_time,
            Some(ts(exit_at)),
            "{days}d: exact instant"
        );
        // The later windows still hold her.
        for (_, later) in &segments[i + 1..] {
            assert!(is_member(&mut seg, &later.name, &ada).await);
        }
    }
}

#[tokio::test]
async fn incremental_backfill_on_create_and_edit_and_each_condition_kind() {
    let h = start().await;
    let mut cust = h.customers();
    let young = create_customer(&mut cust, "young@example.com", |c| {
        c.demographics = Some(cpb::Demographics {
            birth_date: Some(clm_proto::common::Date {
                year: 2000,
                month: 6,
                day: 1,
            }),
            gender: cpb::Gender::Female as i32,
            occupation: "engineer".into(),
            ..Default::default()
        });
        c.attributes.insert(
            "plan".into(),
            cpb::AttributeValue {
                value: Some(cpb::attribute_value::Value::StringValue("pro".into())),
            },
        );
    })
    .await;
    let old = create_customer(&mut cust, "old@example.com", |c| {
        c.demographics = Some(cpb::Demographics {
            birth_date: Some(clm_proto::common::Date {
                year: 1950,
                month: 1,
                day: 1,
            }),
            gender: cpb::Gender::Male as i32,
            ..Default::default()
        });
    })
    .await;
    let mut seg = h.segments();
    // Profile, attributes, nested logic, stage, consent (profiling is
    // granted unless denied).
    let s = create_segment(
        &mut seg,
        r#"(age between 18 and 40 and gender = FEMALE and occupation starts_with "eng")
           or (attributes.plan = "enterprise" and not stage = CHURNED)"#,
    )
    .await;
    wait_count(&mut seg, &s.name, 1).await;
    assert!(is_member(&mut seg, &s.name, &young).await);
    assert!(!is_member(&mut seg, &s.name, &old).await);

    let consent = create_segment(&mut seg, "consent(profiling, email) and stage = APPROACH").await;
    let consent = wait_count(&mut seg, &consent.name, 2).await;

    // Incremental: an update to the old customer's attributes brings them in.
    let got = cust
        .get_customer(cpb::GetCustomerRequest { name: old.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut changed = got.clone();
    changed.attributes.insert(
        "plan".into(),
        cpb::AttributeValue {
            value: Some(cpb::attribute_value::Value::StringValue(
                "enterprise".into(),
            )),
        },
    );
    cust.update_customer(cpb::UpdateCustomerRequest {
        customer: Some(changed),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["attributes".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_member(&mut seg, &s.name, &old, true).await;
    let mine = seg
        .get_customer_segments(pb::GetCustomerSegmentsRequest {
            customer: old.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut want = vec![s.name.clone(), consent.name.clone()];
    want.sort();
    assert_eq!(mine.segments, want);

    // Behaviour through purchases (sum of revenue) and recency.
    let tp = cpb::Touchpoint {
        customer: young.clone(),
        event_id: "p1".into(),
        r#type: cpb::TouchpointType::Purchase as i32,
        occurred_time: Some(ts(t0() - Duration::days(1))),
        product: "pro".into(),
        revenue: Some(clm_proto::common::Money {
            currency_code: "EUR".into(),
            amount_minor: 15_000,
        }),
        ..Default::default()
    };
    cust.record_touchpoints(cpb::RecordTouchpointsRequest {
        touchpoints: vec![tp],
    })
    .await
    .unwrap();
    let buyers = create_segment(
        &mut seg,
        r#"sum(purchase.revenue where product = "pro", 30d) >= 100.00 EUR and last(purchase) within 7d"#,
    )
    .await;
    wait_ready(&mut seg, &buyers.name).await;
    wait_member(&mut seg, &buyers.name, &young, true).await;
    assert!(!is_member(&mut seg, &buyers.name, &old).await);

    // Membership of another segment.
    let nested = create_segment(
        &mut seg,
        &format!(r#"in_segment("{}") and age > 60"#, s.name),
    )
    .await;
    wait_count(&mut seg, &nested.name, 1).await;
    assert!(is_member(&mut seg, &nested.name, &old).await);
    assert!(!is_member(&mut seg, &nested.name, &young).await);

    // Edit: a rule that no longer matches the young customer: she leaves.
    let before = seg
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let updated = seg
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                etag: before.etag.clone(),
                rule_text: r#"attributes.plan = "enterprise" and not stage = CHURNED"#.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["rule_text".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let diff = updated.rule_diff.unwrap();
    assert_eq!(diff.previous_version, 1);
    assert_eq!(updated.segment.unwrap().version, 2);
    assert!(
        diff.removed_conditions.iter().any(|c| c.contains("age")),
        "{diff:?}"
    );
    assert!(diff.added_conditions.is_empty(), "{diff:?}");
    wait_ready(&mut seg, &s.name).await;
    assert!(!is_member(&mut seg, &s.name, &young).await);
    assert!(is_member(&mut seg, &s.name, &old).await);
    // A stale etag is refused.
    let stale = seg
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                etag: before.etag,
                display_name: "x".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Aborted);

    // Members list and count.
    let page = seg
        .list_segment_members(pb::ListSegmentMembersRequest {
            parent: s.name.clone(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.members.len(), 1);
    assert_eq!(page.members[0].customer, old);
    let count = seg
        .count_segment_members(pb::CountSegmentMembersRequest {
            segment: consent.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.count, 2);
    let preview = seg
        .preview_segment(pb::PreviewSegmentRequest {
            rule_text: "age > 60".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.count, 1);
    assert_eq!(preview.sample, vec![old.clone()]);
    assert!(preview.rule.is_some());
}

#[tokio::test]
async fn bad_rules_are_refused_naming_the_field() {
    let h = start().await;
    let mut seg = h.segments();
    let create = |text: &str| pb::CreateSegmentRequest {
        segment: Some(pb::Segment {
            display_name: "x".into(),
            owner: "ada".into(),
            rule_text: text.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let e = seg.create_segment(create("age >=")).await.unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    assert!(e.message().contains("line 1, column"), "{}", e.message());
    let e = seg
        .create_segment(create(r#"age = "x""#))
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    let e = seg
        .create_segment(create("count(feature_use, 0d) > 1"))
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    let e = seg
        .create_segment(create("count(teleport, 1d) > 1"))
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    let e = seg
        .create_segment(create(
            r#"in_segment("segments/0190a0a0-0000-7000-8000-000000000000")"#,
        ))
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");

    // A cycle through in_segment is refused.
    let a = create_segment(&mut seg, "age > 1").await;
    let b = create_segment(&mut seg, &format!(r#"in_segment("{}")"#, a.name)).await;
    let a_now = wait_ready(&mut seg, &a.name).await;
    let e = seg
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: a.name.clone(),
                etag: a_now.etag,
                rule_text: format!(r#"in_segment("{}")"#, b.name),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["rule_text".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    assert!(e.message().contains("cycle"), "{}", e.message());
    // A segment another one names cannot be deleted.
    let e = seg
        .delete_segment(pb::DeleteSegmentRequest {
            name: a.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // A page token of another segment's member list.
    let page = |parent: &str, token: &str| pb::ListSegmentMembersRequest {
        parent: parent.into(),
        page_size: 1,
        page_token: token.into(),
    };
    let mut cust = h.customers();
    create_customer(&mut cust, "a@example.com", |_| {}).await;
    create_customer(&mut cust, "b@example.com", |_| {}).await;
    let all = create_segment(&mut seg, "stage = APPROACH").await;
    let all = wait_count(&mut seg, &all.name, 2).await;
    let first = seg
        .list_segment_members(page(&all.name, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let e = seg
        .list_segment_members(page(&a.name, &first.next_page_token))
        .await
        .unwrap_err();
    assert_bad_field(&e, "page_token");
    // Deleting a segment with members: each member's exit is watched.
    let mut watch = seg
        .watch_membership(pb::WatchMembershipRequest {
            segment: all.name.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let deleted = seg
        .delete_segment(pb::DeleteSegmentRequest {
            name: all.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.member_count, 2);
    let mut exited = 0;
    while exited < 2 {
        let change = watch.next().await.unwrap().unwrap().change.unwrap();
        if change.change == pb::MembershipChange::Exited as i32 {
            exited += 1;
        }
    }
    // The tree form is answered and accepted too.
    let tree = all.rule.clone().unwrap();
    let again = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "tree".into(),
                owner: "ada".into(),
                rule: Some(tree),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.rule_text, "stage = APPROACH");
}

/// A rule given as a tree names each problem by its proto field path
/// (AIP-193), not by the rule language's.
#[tokio::test]
async fn bad_rule_trees_name_the_proto_field_path() {
    use pb::{condition, operand, rule, test as t, value};
    let h = start().await;
    let mut seg = h.segments();
    let cond = |operand: operand::Kind, test: t::Kind| pb::Rule {
        kind: Some(rule::Kind::Condition(pb::Condition {
            kind: Some(condition::Kind::Compare(pb::Comparison {
                operand: Some(pb::Operand {
                    kind: Some(operand),
                }),
                test: Some(pb::Test { kind: Some(test) }),
            })),
        })),
    };
    let gt = |n: f64| {
        t::Kind::Compare(pb::ValueComparison {
            op: pb::Operator::Gt as i32,
            value: Some(pb::Value {
                kind: Some(value::Kind::NumberValue(n)),
            }),
        })
    };
    let feature_uses = |window_secs: i64, filter: Vec<pb::TouchPredicate>| {
        operand::Kind::Count(pb::TouchQuery {
            r#type: clm_proto::customer::TouchpointType::FeatureUse as i32,
            filter,
            window: Some(prost_types::Duration {
                seconds: window_secs,
                nanos: 0,
            }),
            ..Default::default()
        })
    };
    let by_feature_number = pb::TouchPredicate {
        field: pb::TouchField::Feature as i32,
        test: Some(pb::Test {
            kind: Some(gt(5.0)),
        }),
        ..Default::default()
    };
    let tree = pb::Rule {
        kind: Some(rule::Kind::All(pb::RuleList {
            rules: vec![
                pb::Rule {
                    kind: Some(rule::Kind::Negate(Box::new(cond(
                        operand::Kind::Score("karma".into()),
                        gt(1.0),
                    )))),
                },
                pb::Rule {
                    kind: Some(rule::Kind::Any(pb::RuleList {
                        rules: vec![
                            cond(operand::Kind::Field(pb::ProfileField::Age as i32), gt(1.0)),
                            cond(feature_uses(0, vec![by_feature_number]), gt(1.0)),
                        ],
                    })),
                },
            ],
        })),
    };
    let e = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "tree".into(),
                owner: "ada".into(),
                rule: Some(tree),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    for field in [
        "segment.rule.all.rules[0].negate.condition.compare.operand",
        "segment.rule.all.rules[1].any.rules[1].condition.compare.operand.count.window",
        "segment.rule.all.rules[1].any.rules[1].condition.compare.operand.count.filter[0].test.compare.value",
    ] {
        assert_bad_field(&e, field);
    }
}

#[tokio::test]
async fn every_segment_write_leaves_one_audit_entry_with_before_and_after() {
    use prost_types::value::Kind;
    let h = start().await;
    let mut seg = h.segments();
    let s = create_segment(&mut seg, r#"stage = RETENTION"#).await;
    let s = wait_ready(&mut seg, &s.name).await;
    let updated = seg
        .update_segment(pb::UpdateSegmentRequest {
            segment: Some(pb::Segment {
                name: s.name.clone(),
                display_name: "Retained".into(),
                etag: s.etag.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: "seg-upd-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    wait_ready(&mut seg, &s.name).await;
    seg.refresh_segment(pb::RefreshSegmentRequest {
        name: s.name.clone(),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_ready(&mut seg, &s.name).await;
    seg.delete_segment(pb::DeleteSegmentRequest {
        name: s.name.clone(),
        etag: String::new(),
        request_id: String::new(),
    })
    .await
    .unwrap();

    let entries = clm_proto::common::audit_service_client::AuditServiceClient::new(
        h.segmentation.as_ref().unwrap().channel(),
    )
    .list_audit_entries(clm_proto::common::ListAuditEntriesRequest {
        resource: s.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .audit_entries;
    let rpcs: Vec<&str> = entries
        .iter()
        .map(|e| {
            e.rpc
                .trim_start_matches("clm.segmentation.v1.SegmentationService/")
        })
        .collect();
    assert_eq!(
        rpcs,
        [
            "DeleteSegment",
            "RefreshSegment",
            "UpdateSegment",
            "CreateSegment"
        ]
    );
    let text = |s: &Option<prost_types::Struct>, f: &str| match s
        .as_ref()
        .and_then(|s| s.fields.get(f))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::StringValue(v)) => v,
        other => format!("{other:?}"),
    };
    let [delete, refresh, update, create] = &entries[..] else {
        unreachable!()
    };
    assert!(create.before.is_none());
    assert_eq!(text(&create.after, "rule_text"), "stage = RETENTION");
    assert_eq!(update.request_id, "seg-upd-1");
    assert_eq!(update.update_mask.as_ref().unwrap().paths, ["display_name"]);
    assert_eq!(text(&update.before, "display_name"), s.display_name);
    assert_eq!(text(&update.after, "display_name"), "Retained");
    assert_eq!(text(&update.after, "etag"), updated.etag);
    assert_eq!(text(&refresh.after, "state"), "SEGMENT_STATE_BACKFILLING");
    assert_eq!(text(&delete.before, "display_name"), "Retained");
    assert!(delete.after.is_none());
}

#[tokio::test]
async fn a_backfill_is_an_operation_with_progress_and_the_segment_names_it() {
    use clm_proto::google::longrunning::operations_client::OperationsClient;
    use clm_proto::google::longrunning::{ListOperationsRequest, WaitOperationRequest, operation};
    use prost::Message;
    let h = start().await;
    let mut seg = h.segments();
    let s = create_segment(&mut seg, r#"email = "op@example.com""#).await;
    assert!(s.operation.starts_with("operations/"), "{s:?}");
    let mut ops = OperationsClient::new(h.segmentation.as_ref().unwrap().channel());
    let op = ops
        .wait_operation(WaitOperationRequest {
            name: s.operation.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(op.done, "{op:?}");
    let meta = pb::BackfillSegmentMetadata::decode(op.metadata.unwrap().value.as_slice()).unwrap();
    assert_eq!(meta.segment, s.name);
    assert_eq!(meta.segment_version, 1);
    assert_eq!(meta.progress, 1.0);
    let Some(operation::Result::Response(any)) = op.result else {
        panic!("no response");
    };
    let done = pb::Segment::decode(any.value.as_slice()).unwrap();
    assert_eq!(done.name, s.name);
    assert_eq!(done.state, pb::SegmentState::Ready as i32);
    // A refresh is a new operation, named by the segment.
    let refreshed = seg
        .refresh_segment(pb::RefreshSegmentRequest {
            name: s.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(refreshed.operation, s.operation);
    wait_ready(&mut seg, &s.name).await;
    // The segment reads READY from the backfill's commit; its operation is
    // done once the cache is written too.
    ops.wait_operation(WaitOperationRequest {
        name: refreshed.operation.clone(),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    })
    .await
    .unwrap();
    let listed = ops
        .list_operations(ListOperationsRequest {
            filter: r#"kind = "segmentation.backfill" AND done = true"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations;
    let names: Vec<&str> = listed.iter().map(|o| o.name.as_str()).collect();
    assert!(names.contains(&s.operation.as_str()), "{names:?}");
    assert!(names.contains(&refreshed.operation.as_str()), "{names:?}");
}

/// WatchMembership answers what it cannot serve at once, as WatchChanges
/// does: OUT_OF_RANGE past the newest event, NOT_FOUND for a well-formed
/// segment that does not exist; PreviewSegment refuses an invalid timeout.
#[tokio::test]
async fn watch_membership_refuses_what_it_cannot_serve_and_preview_checks_its_timeout() {
    let h = start().await;
    let mut seg = h.segments();
    let beyond = seg
        .watch_membership(pb::WatchMembershipRequest {
            segment: String::new(),
            after_sequence: 1_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::OutOfRange, "{beyond:?}");
    let unknown = seg
        .watch_membership(pb::WatchMembershipRequest {
            segment: "segments/01a24a50-3e9b-7724-9133-581bc90128cc".into(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    for timeout in [
        prost_types::Duration {
            seconds: 1,
            nanos: 1_000_000_000,
        },
        prost_types::Duration {
            seconds: 1,
            nanos: -5,
        },
        prost_types::Duration {
            seconds: 0,
            nanos: 0,
        },
    ] {
        let bad = seg
            .preview_segment(pb::PreviewSegmentRequest {
                rule_text: "age > 60".into(),
                timeout: Some(timeout),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_bad_field(&bad, "timeout");
    }
}

/// The checks that guard segment writes hold under concurrency: two edits
/// that close a cycle only together (A names B while B names A) never both
/// commit, and a segment is never deleted while a concurrent edit starts
/// naming it.
#[tokio::test]
async fn concurrent_edits_never_close_a_cycle_or_name_a_deleted_segment() {
    let h = start().await;
    let mut seg = h.segments();
    let names = |me: &pb::Segment, other: &str| pb::UpdateSegmentRequest {
        segment: Some(pb::Segment {
            name: me.name.clone(),
            etag: me.etag.clone(),
            rule_text: format!(r#"in_segment("{other}")"#),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rule_text".into()],
        }),
        request_id: String::new(),
    };
    let refused = |r: &Result<tonic::Response<pb::UpdateSegmentResponse>, tonic::Status>| {
        if let Err(e) = r {
            assert!(
                matches!(
                    e.code(),
                    tonic::Code::InvalidArgument | tonic::Code::Aborted
                ),
                "{e:?}"
            );
        }
    };
    for round in 0..6 {
        let a = create_segment(&mut seg, "age >= 30").await;
        let b = create_segment(&mut seg, "age >= 30").await;
        let a_now = wait_ready(&mut seg, &a.name).await;
        let b_now = wait_ready(&mut seg, &b.name).await;
        let (mut s1, mut s2) = (h.segments(), h.segments());
        let (r1, r2) = tokio::join!(
            s1.update_segment(names(&a_now, &b.name)),
            s2.update_segment(names(&b_now, &a.name)),
        );
        refused(&r1);
        refused(&r2);
        assert!(
            !(r1.is_ok() && r2.is_ok()),
            "round {round}: a cycle was committed"
        );

        let c = create_segment(&mut seg, "age >= 30").await;
        let d = create_segment(&mut seg, "age >= 30").await;
        wait_ready(&mut seg, &c.name).await;
        let d_now = wait_ready(&mut seg, &d.name).await;
        let (mut s1, mut s2) = (h.segments(), h.segments());
        let (deleted, named) = tokio::join!(
            s1.delete_segment(pb::DeleteSegmentRequest {
                name: c.name.clone(),
                ..Default::default()
            }),
            s2.update_segment(names(&d_now, &c.name)),
        );
        refused(&named);
        if let Err(e) = &deleted {
            assert!(
                matches!(
                    e.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::Aborted
                ),
                "{e:?}"
            );
        }
        assert!(
            !(deleted.is_ok() && named.is_ok()),
            "round {round}: a segment names one that was deleted"
        );
    }
}

/// A rule that cannot be stored and evaluated is refused at create, naming
/// the field and the limit: here a rule whose strings hold control
/// characters, each stored escaped, so its canonical text would pass the
/// 64 KiB limit although the text sent is under it.
#[tokio::test]
async fn rules_too_large_to_store_are_refused_at_create() {
    let h = start().await;
    let mut seg = h.segments();
    let text = (0..6)
        .map(|i| format!("email = \"{}{i}\"", "\u{1}".repeat(3_500)))
        .collect::<Vec<_>>()
        .join(" or ");
    assert!(text.len() < 64 * 1024);
    let e = seg
        .create_segment(pb::CreateSegmentRequest {
            segment: Some(pb::Segment {
                display_name: "x".into(),
                rule_text: text,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "segment.rule_text");
    assert!(e.message().contains("65536"), "{}", e.message());
}

fn born(year: i32) -> impl FnOnce(&mut cpb::Customer) {
    move |c| {
        c.demographics = Some(cpb::Demographics {
            birth_date: Some(clm_proto::common::Date {
                year,
                month: 1,
                day: 1,
            }),
            ..Default::default()
        });
    }
}

/// A backfill writes the cache after its commit by reading back the rows
/// its membership versions wrote, chunk by chunk: its entries, its exits
/// and its cascade's reach customer sets the cache already holds whole.
#[tokio::test]
async fn a_backfill_writes_entries_exits_and_its_cascade_to_a_warm_cache() {
    let h = start().await;
    let mut cust = h.customers();
    let old = create_customer(&mut cust, "old@example.com", born(1950)).await;
    let young = create_customer(&mut cust, "young@example.com", born(2000)).await;
    let mut seg = h.segments();
    let s = create_segment(&mut seg, "age >= 30").await;
    wait_count(&mut seg, &s.name, 1).await;
    let d = create_segment(&mut seg, &format!(r#"in_segment("{}")"#, s.name)).await;
    wait_count(&mut seg, &d.name, 1).await;
    // Each customer's set is loaded into the cache, whole.
    for (segment, customer, want) in [
        (&s.name, &old, true),
        (&d.name, &old, true),
        (&s.name, &young, false),
        (&d.name, &young, false),
    ] {
        assert_eq!(is_member(&mut seg, segment, customer).await, want);
    }
    let before = seg
        .get_segment(pb::GetSegmentRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    seg.update_segment(pb::UpdateSegmentRequest {
        segment: Some(pb::Segment {
            name: s.name.clone(),
            etag: before.etag,
            rule_text: "age < 30".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rule_text".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_ready(&mut seg, &s.name).await;
    // The old customer left both (the second by the cascade), the young
    // one entered both: the cache answers so, without a reload.
    for (segment, customer, want) in [
        (&s.name, &old, false),
        (&d.name, &old, false),
        (&s.name, &young, true),
        (&d.name, &young, true),
    ] {
        wait_member(&mut seg, segment, customer, want).await;
    }
}

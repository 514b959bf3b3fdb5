//! Journey 2's freshness, for `scripts/bench.sh` (its journey part): how
//! long after an NPS answer is submitted the customer is in the at-risk
//! segment, through every hop of the closed feedback loop (feedback's
//! response event → scoring's award → scoring's score event →
//! segmentation's membership, read back with IsMember).
//!
//! `bench_journey --customer URL --scoring URL --segmentation URL
//! --feedback URL --samples N` against a running suite (`clm up`): sets up
//! journey 2's engagement model, its two segments and its NPS survey (the
//! requests of [`clm_tests::journey`], as the journey tests make them), then
//! for each sample a customer consenting to surveys with seven feature uses
//! (engagement 70, in "engaged" and out of "at-risk"), who answers NPS 3
//! (engagement 40, at risk). Prints
//! `journey 2: NPS answer -> at-risk member p50 X ms p99 Y ms max Z ms |
//! SubmitResponse p50 W ms (N samples)`. Samples run one after another
//! on an otherwise idle suite: this is the loop's latency, not its
//! throughput.

use anyhow::{Context, bail};
use clap::Parser;
use clm_proto::customer as cpb;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::feedback as fpb;
use clm_proto::feedback::feedback_service_client::FeedbackServiceClient;
use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
use clm_proto::segmentation as gpb;
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use clm_tests::journey;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Customer service URL.
    #[arg(long)]
    customer: String,
    /// Scoring service URL.
    #[arg(long)]
    scoring: String,
    /// Segmentation service URL.
    #[arg(long)]
    segmentation: String,
    /// Feedback service URL.
    #[arg(long)]
    feedback: String,
    /// Customers measured, one after another.
    #[arg(long, default_value_t = 50)]
    samples: usize,
}

/// How long any one step may take before the run fails.
const STEP: Duration = Duration::from_secs(30);

struct Clients {
    customers: CustomerServiceClient<Channel>,
    scoring: ScoringServiceClient<Channel>,
    segments: SegmentationServiceClient<Channel>,
    feedback: FeedbackServiceClient<Channel>,
}

async fn channel(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_owned())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Polls `check` every millisecond until it answers `Some`, for at most [`STEP`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(out) = check().await? {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("{what}: still not so after {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl Clients {
    /// Journey 2's model ([`journey::engagement_model`]).
    async fn model(&mut self) -> anyhow::Result<()> {
        self.scoring
            .create_scoring_model(journey::engagement_model())
            .await?;
        Ok(())
    }

    async fn segment(&mut self, id: &str, rule: &str) -> anyhow::Result<String> {
        Ok(self
            .segments
            .create_segment(gpb::CreateSegmentRequest {
                segment: Some(gpb::Segment {
                    display_name: id.into(),
                    rule_text: rule.into(),
                    ..Default::default()
                }),
                request_id: format!("bench-journey-{id}"),
            })
            .await?
            .into_inner()
            .name)
    }

    async fn survey(&mut self) -> anyhow::Result<String> {
        let survey = self
            .feedback
            .create_survey(journey::nps_survey("nps"))
            .await?
            .into_inner();
        self.feedback
            .publish_survey(fpb::PublishSurveyRequest {
                name: survey.name.clone(),
                ..Default::default()
            })
            .await?;
        Ok(survey.name)
    }

    /// A customer consenting to in-app surveys, with seven feature uses.
    async fn engaged_customer(&mut self, i: usize) -> anyhow::Result<String> {
        let name = self
            .customers
            .create_customer(cpb::CreateCustomerRequest {
                customer: Some(cpb::Customer {
                    email: format!("journey-{i}@bench.example"),
                    ..Default::default()
                }),
                request_id: format!("bench-journey-create-{i}"),
            })
            .await?
            .into_inner()
            .name;
        self.customers
            .set_consent(journey::survey_consent(
                &name,
                format!("bench-journey-consent-{i}"),
            ))
            .await?;
        let touchpoints = (0..7)
            .map(|n| cpb::Touchpoint {
                customer: name.clone(),
                event_id: format!("bench-journey-{i}-use-{n}"),
                r#type: cpb::TouchpointType::FeatureUse as i32,
                feature: "export".into(),
                occurred_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                ..Default::default()
            })
            .collect();
        self.customers
            .record_touchpoints(cpb::RecordTouchpointsRequest { touchpoints })
            .await?;
        Ok(name)
    }

    async fn is_member(&mut self, segment: &str, customer: &str) -> anyhow::Result<bool> {
        is_member(self.segments.clone(), segment, customer).await
    }

    /// An invitation of `customer` to `survey`, once feedback knows their consent.
    async fn invitation(&mut self, survey: &str, customer: &str) -> anyhow::Result<String> {
        until("feedback knows the consent", || {
            let mut fb = self.feedback.clone();
            let (survey, customer) = (survey.to_owned(), customer.to_owned());
            async move {
                Ok(fb
                    .create_invitations(fpb::CreateInvitationsRequest {
                        survey,
                        customers: vec![customer],
                        channel: cpb::ConsentChannel::InApp as i32,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .invitations
                    .into_iter()
                    .next()
                    .map(|i| i.name))
            }
        })
        .await
    }
}

async fn is_member(
    mut segments: SegmentationServiceClient<Channel>,
    segment: &str,
    customer: &str,
) -> anyhow::Result<bool> {
    Ok(segments
        .is_member(gpb::IsMemberRequest {
            segment: segment.into(),
            customer: customer.into(),
        })
        .await?
        .into_inner()
        .member)
}

/// Polls IsMember every millisecond until `customer` is in `segment`.
async fn wait_member(
    segments: &SegmentationServiceClient<Channel>,
    segment: &str,
    customer: &str,
) -> anyhow::Result<()> {
    until(&format!("{customer} in {segment}"), || async {
        Ok(is_member(segments.clone(), segment, customer)
            .await?
            .then_some(()))
    })
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let mut c = Clients {
        customers: CustomerServiceClient::new(channel(&args.customer).await?),
        scoring: ScoringServiceClient::new(channel(&args.scoring).await?),
        segments: SegmentationServiceClient::new(channel(&args.segmentation).await?),
        feedback: FeedbackServiceClient::new(channel(&args.feedback).await?),
    };
    c.model().await?;
    let at_risk = c.segment("at-risk", "score.engagement < 50").await?;
    let engaged = c.segment("engaged", "score.engagement >= 70").await?;
    let survey = c.survey().await?;

    let mut loop_times = Vec::with_capacity(args.samples);
    let mut submit_times = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let customer = c.engaged_customer(i).await?;
        wait_member(&c.segments, &engaged, &customer).await?;
        if c.is_member(&at_risk, &customer).await? {
            bail!("{customer} is at risk before answering");
        }
        let invitation = c.invitation(&survey, &customer).await?;
        let answered = Instant::now();
        c.feedback
            .submit_response(fpb::SubmitResponseRequest {
                name: format!("{survey}/responses/r{i}"),
                invitation,
                answers: journey::nps_answers(3, None),
                finish: true,
            })
            .await?;
        submit_times.push(answered.elapsed());
        wait_member(&c.segments, &at_risk, &customer).await?;
        loop_times.push(answered.elapsed());
    }
    loop_times.sort();
    submit_times.sort();
    println!(
        "journey 2: NPS answer -> at-risk member p50 {:.1} ms p99 {:.1} ms max {:.1} ms | SubmitResponse p50 {:.1} ms ({} samples)",
        percentile(&loop_times, 0.5),
        percentile(&loop_times, 0.99),
        percentile(&loop_times, 1.0),
        percentile(&submit_times, 0.5),
        args.samples
    );
    Ok(())
}

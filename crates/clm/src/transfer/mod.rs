//! The daily data work from the command line, through the public gRPC API
//! of a running CLM: `clm import customers|touchpoints FILE` and
//! `clm export segment ID` (docs/import-export.md).

pub mod convert;
pub mod export;
pub mod import;
pub mod progress;
pub mod rows;

use clm_proto::clm::customer::v1::customer_service_client::CustomerServiceClient;
use clm_proto::clm::segmentation::v1::segmentation_service_client::SegmentationServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Lazily connected channels to the services a transfer calls.
#[derive(Debug, Clone)]
pub struct Connection {
    customer: Channel,
    segmentation: Channel,
    bearer: Bearer,
}

impl Connection {
    pub fn new(
        customer: &str,
        segmentation: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Connection> {
        let channel = |url: &str| -> anyhow::Result<Channel> {
            Ok(Endpoint::from_shared(url.to_owned())?
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(60))
                .connect_lazy())
        };
        let bearer = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--token: not a valid header value"))?,
            ),
            None => None,
        };
        Ok(Connection {
            customer: channel(customer)?,
            segmentation: channel(segmentation)?,
            bearer: Bearer(bearer),
        })
    }

    pub fn customers(&self) -> CustomerServiceClient<InterceptedService<Channel, Bearer>> {
        CustomerServiceClient::with_interceptor(self.customer.clone(), self.bearer.clone())
            .max_decoding_message_size(64 << 20)
    }

    pub fn segments(&self) -> SegmentationServiceClient<InterceptedService<Channel, Bearer>> {
        SegmentationServiceClient::with_interceptor(self.segmentation.clone(), self.bearer.clone())
            .max_decoding_message_size(64 << 20)
    }
}

//! `keybroker.v1.Hyok`: the kill switch.

use keybroker_proto::v1::{self as pb, hyok_server::Hyok};
use tonic::{Request, Response, Status};

use super::{GrpcApi, HYOK, convert::hyok_to_pb};
use crate::api::{
    ops::hyok::{GetSwitch, SetSwitch},
    pipeline::Endpoint,
};

const DISCONNECT: Endpoint = Endpoint {
    service: HYOK,
    method: "Disconnect",
    op: "HyokDisconnect",
};
const RECONNECT: Endpoint = Endpoint {
    service: HYOK,
    method: "Reconnect",
    op: "HyokReconnect",
};
const GET_STATE: Endpoint = Endpoint {
    service: HYOK,
    method: "GetState",
    op: "HyokGetState",
};

#[tonic::async_trait]
impl Hyok for GrpcApi {
    async fn disconnect(
        &self,
        req: Request<pb::HyokSwitchRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.serve(
            DISCONNECT,
            req,
            |r| {
                let op = SetSwitch {
                    connected: false,
                    reason: r.reason,
                };
                (None, Ok(op))
            },
            hyok_to_pb,
        )
        .await
    }

    async fn reconnect(
        &self,
        req: Request<pb::HyokSwitchRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.serve(
            RECONNECT,
            req,
            |r| {
                let op = SetSwitch {
                    connected: true,
                    reason: r.reason,
                };
                (None, Ok(op))
            },
            hyok_to_pb,
        )
        .await
    }

    async fn get_state(
        &self,
        req: Request<pb::GetHyokStateRequest>,
    ) -> Result<Response<pb::HyokState>, Status> {
        self.serve(GET_STATE, req, |_| (None, Ok(GetSwitch)), hyok_to_pb)
            .await
    }
}

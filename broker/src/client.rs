//! Connecting to a broker as a client, with mutual TLS from PEM files.

use std::path::{Path, PathBuf};

use keybroker_proto::v1::{
    audit_client::AuditClient, hyok_client::HyokClient, key_broker_client::KeyBrokerClient,
    key_management_client::KeyManagementClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where the broker is and how to prove who we are.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// `https://host:port`.
    pub endpoint: String,
    /// The CA that issued the broker's certificate (PEM).
    pub ca: PathBuf,
    /// Our certificate (PEM).
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
}

fn read(p: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
}

/// Opens a channel (connects eagerly so errors show here).
pub async fn connect(s: &ClientSettings) -> Result<Channel, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&s.ca, "CA certificate")?))
        .identity(Identity::from_pem(
            read(&s.cert, "client certificate")?,
            read(&s.key, "client key")?,
        ));
    Endpoint::from_shared(s.endpoint.clone())
        .map_err(|e| format!("bad endpoint {:?}: {e}", s.endpoint))?
        .tls_config(tls)
        .map_err(|e| format!("TLS configuration: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", s.endpoint))
}

/// Every client, on one channel (cheap to clone: clones share the connection).
#[derive(Clone)]
pub struct Clients {
    /// Data plane.
    pub broker: KeyBrokerClient<Channel>,
    /// Control plane.
    pub mgmt: KeyManagementClient<Channel>,
    /// The audit trail.
    pub audit: AuditClient<Channel>,
    /// The HYOK kill switch.
    pub hyok: HyokClient<Channel>,
}

/// Connects and returns both clients.
pub async fn clients(s: &ClientSettings) -> Result<Clients, String> {
    let ch = connect(s).await?;
    Ok(Clients {
        broker: KeyBrokerClient::new(ch.clone()),
        mgmt: KeyManagementClient::new(ch.clone()),
        audit: AuditClient::new(ch.clone()),
        hyok: HyokClient::new(ch),
    })
}

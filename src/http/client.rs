//! One way to build the HTTP client: TLS against the system roots plus an
//! optional CA file, proxies from the environment (`HTTPS_PROXY`,
//! `NO_PROXY`), pooled connections, per-request and connect bounds, and no
//! automatic redirects (see `redirect`: `Range` must survive a redirect and
//! `Authorization` must not leave its origin).

use std::path::PathBuf;
use std::time::Duration;

use super::error::{error_chain, HttpError};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Bound for one request (headers and body).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) beside the system roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { request_timeout: Duration::from_secs(10), connect_timeout: Duration::from_secs(5), ca_file: None }
    }
}

pub fn build_client(cfg: &ClientConfig) -> Result<reqwest::Client, HttpError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .pool_max_idle_per_host(16)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("erofs-fanotify/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| HttpError::Permanent(format!("cannot read the CA file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| HttpError::Permanent(format!("{} holds no usable PEM certificate: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(HttpError::Permanent(format!("{} holds no PEM certificate", path.display())));
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| HttpError::Permanent(format!("cannot build the HTTP client: {}", error_chain(&e))))
}

//! A small client for the admin API, trusting the server the way devices do:
//! by pinning, never by public CAs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use qflare_edge::transport::Transport;
use qflare_protocol::api::ErrorBody;
use qflare_protocol::crypto::sha256;
use qflare_protocol::identity::ServerFingerprint;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An authenticated admin connection.
pub struct AdminClient {
    transport: Transport,
    token: String,
}

impl AdminClient {
    /// Connects to `server`, pinning either the fingerprint given with
    /// `--server-key` or the certificate in the local state directory.
    pub async fn connect(
        server: &str,
        fingerprint: Option<&str>,
        state_dir: &Path,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        let certificate_sha256 = match fingerprint {
            Some(text) => {
                let pin = ServerFingerprint::parse(text).context("--server-key")?;
                Transport::discover(server, &pin).await?.certificate_sha256
            }
            None => {
                let path = state_dir.join("tls/cert.pem");
                let cert = CertificateDer::from_pem_file(&path).with_context(|| {
                    format!(
                        "cannot read {}: run on the server's machine, or pass --server-key with the server's fingerprint",
                        path.display()
                    )
                })?;
                sha256(cert.as_ref())
            }
        };
        let token = match token.filter(|t| !t.is_empty()) {
            Some(token) => token,
            None => {
                let path = state_dir.join("admin-token");
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_owned())
                    .with_context(|| {
                        format!("no QFLARE_ADMIN_TOKEN and cannot read {}", path.display())
                    })?
            }
        };
        Ok(Self {
            transport: Transport::pinned(server, certificate_sha256, Duration::from_secs(60))?,
            token,
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let body = self.send_raw(request).await?;
        serde_json::from_slice(&body).context("decoding the answer")
    }

    /// Sends `request` with the admin token; the answer's body, or the
    /// server's error as an `anyhow` error (with its detail, when given).
    async fn send_raw(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Vec<u8>> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .context("contacting the server")?;
        let status = response.status();
        let body = response.bytes().await.context("reading the answer")?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(err) => match err.detail {
                    Some(detail) => bail!(
                        "the server refused ({status}): {}: {}: {detail}",
                        err.code,
                        err.message
                    ),
                    None => bail!(
                        "the server refused ({status}): {}: {}",
                        err.code,
                        err.message
                    ),
                },
                Err(_) => bail!("the server answered {status}"),
            }
        }
        Ok(body.to_vec())
    }

    /// GET `path`, returning the body's bytes.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.send_raw(self.transport.http.get(self.transport.url(path)))
            .await
    }

    /// POST `bytes` (as `application/octet-stream`) to `path` with the
    /// query parameters `query`.
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        bytes: Vec<u8>,
    ) -> anyhow::Result<T> {
        let mut url = reqwest::Url::parse(&self.transport.url(path)).context("the server URL")?;
        url.query_pairs_mut().extend_pairs(query);
        self.send(
            self.transport
                .http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes),
        )
        .await
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.transport.http.get(self.transport.url(path)))
            .await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(
            self.transport
                .http
                .post(self.transport.url(path))
                .json(body),
        )
        .await
    }
}

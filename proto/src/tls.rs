//! Mutual TLS between the cluster's processes: the coordinator's gRPC channels to its workers,
//! the workers' gRPC servers, and the worker-to-worker data plane.
//!
//! One certificate authority signs every process's certificate. Each side presents its own and
//! accepts only a peer whose certificate that CA signed, so a process without such a
//! certificate cannot assign a worker, feed it steps or join its data plane. Configured by three
//! PEM files (`--tls-cert`, `--tls-key`, `--tls-ca`): all three, or none (plain TCP).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "--tls-cert, --tls-key and --tls-ca go together: {given} given, {missing} missing; give \
         all three for mutual TLS, or none for plain TCP"
    )]
    Partial { given: String, missing: String },
    #[error("cannot read the TLS {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("the TLS {what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: String },
    #[error("{0}")]
    Config(String),
    #[error("{0:?} is not a name or address a certificate can be checked against")]
    ServerName(String),
}

/// The three PEM files of a process's TLS identity, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This process's certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that signs every certificate of the cluster.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// All three options, or none: one or two given is refused, naming the missing ones.
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let named = [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)];
        let (given, missing): (Vec<_>, Vec<_>) = named.iter().partition(|(_, p)| p.is_some());
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.to_path_buf(),
            })),
            (None, None, None) => Ok(None),
            _ => Err(TlsError::Partial {
                given: given.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
                missing: missing
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// A process's loaded TLS identity: its certificate and key, and the CA its peers must chain
/// to. Loading checks every file, so a bad file stops the process before it serves.
#[derive(Clone)]
pub struct TlsIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsIdentity")
            .field("certs", &self.certs.len())
            .field("roots", &self.roots.len())
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("TLS: {e}"))
}

impl TlsIdentity {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let cert_pem = read("certificate", &files.cert)?;
        let key_pem = read("key", &files.key)?;
        let ca_pem = read("CA certificate", &files.ca)?;
        let certs = certificates("certificate", &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Read {
            what: "key",
            path: files.key.display().to_string(),
            reason: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates("CA certificate", &files.ca, &ca_pem)? {
            roots.add(ca).map_err(|e| TlsError::Read {
                what: "CA certificate",
                path: files.ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let identity = Self {
            cert_pem,
            key_pem,
            ca_pem,
            certs,
            key: Arc::new(key),
            roots: Arc::new(roots),
        };
        // A key that does not match the certificate fails here, not at the first handshake.
        identity.data_plane_server()?;
        Ok(identity)
    }

    /// Loads the configured files, if any.
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        TlsFiles::from_options(cert, key, ca)?
            .map(|f| Self::load(&f))
            .transpose()
    }

    /// A worker's gRPC server: its certificate, and a client certificate from the CA required.
    pub fn grpc_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// The coordinator's channel to the worker at `host`: the worker's certificate must be the
    /// CA's and name `host`; the coordinator presents its own.
    pub fn grpc_client(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(host)
    }

    /// The data plane's accepting side: a peer must present a certificate from the CA.
    pub fn data_plane_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(config_error)?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }

    /// The data plane's dialling side: the peer's certificate must be the CA's; this worker
    /// presents its own.
    pub fn data_plane_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }
}

/// The host of a dialled `host:port` (or `[v6]:port`).
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The name a dialled `host:port` must carry in its certificate.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host_of(addr).to_string())
        .map_err(|_| TlsError::ServerName(addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_files_or_none() {
        let p = Path::new("/x");
        assert_eq!(TlsFiles::from_options(None, None, None).unwrap(), None);
        assert!(TlsFiles::from_options(Some(p), Some(p), Some(p))
            .unwrap()
            .is_some());
        let e = TlsFiles::from_options(Some(p), None, Some(p)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--tls-cert, --tls-key and --tls-ca go together: --tls-cert, --tls-ca given, \
             --tls-key missing; give all three for mutual TLS, or none for plain TCP"
        );
    }

    #[test]
    fn server_names_from_addresses() {
        assert_eq!(
            server_name("127.0.0.1:50052").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("gemma-worker-1.gemma-worker:50052").unwrap(),
            ServerName::try_from("gemma-worker-1.gemma-worker").unwrap()
        );
        assert_eq!(
            server_name("[::1]:50052").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert!(server_name("bad host:1").is_err());
    }

    #[test]
    fn a_missing_file_is_named() {
        let p = Path::new("/nonexistent/cert.pem");
        let e = TlsIdentity::from_options(Some(p), Some(p), Some(p)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the TLS certificate /nonexistent/cert.pem"),
            "{e}"
        );
    }
}

//! HTTPS for a server that terminates TLS itself (rustls): a certificate chain and key from PEM
//! files, optionally client certificates required and checked against a CA, all re-read on
//! [`ServerTls::reload`] — the scheduler calls it on SIGHUP and when the files change, so a
//! renewed certificate (cert-manager, ACME) is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The files a TLS listener is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, clients must present a certificate this CA (PEM, one or more) issued.
    pub client_ca_file: Option<PathBuf>,
}

/// Why the TLS files could not be used; names the file (never its contents).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: holds no {what}", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Rustls {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
}

/// The server's TLS configuration, swapped whole on reload.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<(Arc<rustls::ServerConfig>, Stamp)>,
}

/// What the files looked like when last read: their modification times and lengths.
type Stamp = Vec<Option<(SystemTime, u64)>>;

impl ServerTls {
    /// Reads the files; an error names the one at fault.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamp = stamp(&files);
        let config = server_config(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new((config, stamp)),
        }))
    }

    /// The configuration new connections are served with.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.read().0)
    }

    /// Re-reads the files. On error the configuration in use stays, and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.files);
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (config, stamp);
        Ok(())
    }

    /// Re-reads the files if any changed (time or size) since last read; `Ok(true)` if it did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if stamp(&self.files) == self.read().1 {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, (Arc<rustls::ServerConfig>, Stamp)> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    [
        Some(&files.cert_file),
        Some(&files.key_file),
        files.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
    .collect()
}

fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|source| TlsError::Read {
        path: files.key_file.clone(),
        source,
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| TlsError::Rustls {
        path: files.cert_file.clone(),
        source,
    })?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|source| TlsError::Rustls {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            )
            .build()
            .map_err(|source| TlsError::ClientCa {
                path: ca.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            path: files.key_file.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

//! TLS material: the listener's certificate (`[tls]`), and the roots Reprise
//! trusts when it is the client, of an upstream (`routes[].ca_file`) or of
//! Redis (`store.ca_file`).
//!
//! Everything here runs at start-up: files are read and parsed once, and a
//! bad file is a configuration error naming it. rustls with the `ring`
//! provider throughout, so no process-wide default provider is needed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A TLS file that cannot be used, and why. Never quotes the file's content
/// (a key file is a secret).
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct TlsError {
    pub file: PathBuf,
    pub reason: String,
}

impl TlsError {
    pub(crate) fn new(file: &Path, reason: impl fmt::Display) -> TlsError {
        TlsError {
            file: file.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The crypto provider of every TLS config Reprise builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first, so that a missing file says so rather than "no certificate".
    let pem = std::fs::read(path).map_err(|e| TlsError::new(path, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(
            path,
            "no CERTIFICATE block found (expected PEM)",
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::new(path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::new(path, "no PRIVATE KEY block found (expected PEM)")
        }
        // The error names the problem (base64, section), never key bytes.
        e => TlsError::new(path, format!("invalid PEM: {e}")),
    })
}

/// The system's roots plus, if given, every certificate of `ca_file`.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(cause = %e, "cannot load some system root certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 && ca_file.is_none() {
        tracing::warn!("no system root certificates found; TLS peers will fail verification");
    }
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::new(path, format!("not a usable CA certificate: {e}")))?;
        }
    }
    Ok(roots)
}

/// A client config trusting the system's roots and `ca_file`, without ALPN
/// (the caller sets the protocols it speaks).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let roots = root_store(ca_file)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(ca_file.unwrap_or(Path::new("")), e))?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The listener's config: the certificate chain and key of `[tls]`, with
/// ALPN offering HTTP/2 and HTTP/1.1 (hyper's auto builder serves both).
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(cert_file, e))?
        .with_no_client_auth()
        // Checks that the key matches the certificate.
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::new(
                key_file,
                format!("does not fit {}: {e}", cert_file.display()),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("reprise-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = load_certs(&missing).unwrap_err().to_string();
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );

        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let err = root_store(Some(&garbage)).unwrap_err().to_string();
        assert!(
            err.contains("garbage.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let err = load_key(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("garbage.pem") && err.contains("no PRIVATE KEY"),
            "{err}"
        );

        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certs(&broken).unwrap_err().to_string();
        assert!(err.contains("broken.pem"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

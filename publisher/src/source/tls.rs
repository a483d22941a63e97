//! TLS of the publisher's connections to the source database. The URL's mode and CA file
//! are read by `kausal_bus::tls::UrlTls` (libpq's `sslmode`/`sslrootcert`, the mysql
//! client's `ssl-mode`/`ssl-ca`); here is the rustls configuration the Postgres catalog
//! connection uses for each mode (the replication stream and the MySQL driver build
//! their own from the same settings).

use kausal_bus::tls::{read_ca_file, TlsSettingsError};
pub use kausal_bus::tls::{TlsMode, UrlTls as SourceTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

/// A rustls client configuration implementing the URL's mode.
pub fn client_config(tls: &SourceTls) -> Result<rustls::ClientConfig, TlsSettingsError> {
    kausal_bus::tls::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &tls.ca_file {
        let pem = read_ca_file(tls.ca_param, path)?;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
            // A CA file may hold certificates webpki cannot use; the others still count.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(TlsSettingsError::NoCertificate {
                param: tls.ca_param,
                path: path.clone(),
            });
        }
    }
    let roots = Arc::new(roots);
    let config = match tls.mode {
        TlsMode::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::Require | TlsMode::Disable => {
            let chain = if tls.mode == TlsMode::VerifyCa {
                let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsSettingsError::CaFile {
                        param: tls.ca_param,
                        path: tls.ca_file.clone().unwrap_or_default(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                Some(verifier)
            } else {
                None
            };
            let verifier = Arc::new(Lenient { chain, provider });
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// The modes libpq checks less than fully: `verify-ca` (`chain` set: the certificate
/// must lead to the CA file, any host name) and `require` (no chain: any certificate).
/// The handshake signatures are verified in both, so the session key belongs to
/// whoever holds the certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

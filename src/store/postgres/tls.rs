//! TLS for PostgreSQL connections: the rustls connector every connection is made with. It
//! checks the server's certificate as the `sslmode` and `sslrootcert` of `--db` say, with
//! libpq's meanings, on the rustls and ring that ureq already brings (one TLS stack).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::database::{Postgres, SslMode};

/// The connector for `db`'s connections. Reads `sslrootcert` when the mode checks
/// certificates: an unreadable file, or one with no certificate, is an error here, at start.
pub(crate) fn connector(db: &Postgres) -> anyhow::Result<MakeRustlsConnect> {
    let check = match (db.ssl_mode, db.ssl_root_cert.as_deref()) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => Check::Nothing,
        // libpq: `require` with a root certificate checks the chain, as `verify-ca` does.
        (SslMode::Require | SslMode::VerifyCa, root_cert) => Check::Chain(trusted(root_cert)?),
        (SslMode::VerifyFull, root_cert) => Check::ChainAndName(trusted(root_cert)?),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Verifier {
        check,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls offers no TLS version with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// How much of the server's certificate is checked.
#[derive(Debug)]
enum Check {
    /// None of it (`prefer`, `require` without `sslrootcert`): encryption, not identity. The
    /// server must still prove it holds the certificate's key.
    Nothing,
    /// Its chain up to a trusted CA, whatever host it names (`verify-ca`).
    Chain(Trusted),
    /// Its chain, and that it names the host connected to (`verify-full`).
    ChainAndName(Trusted),
}

/// The CAs a certificate must chain to, and where they came from, for errors.
#[derive(Debug)]
struct Trusted {
    roots: RootCertStore,
    from: String,
}

/// The CAs in the `sslrootcert` PEM file, or webpki-roots (Mozilla's list) when none is given.
fn trusted(root_cert: Option<&Path>) -> anyhow::Result<Trusted> {
    let Some(path) = root_cert else {
        return Ok(Trusted {
            roots: RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
            from: "webpki-roots (no sslrootcert given)".to_string(),
        });
    };
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read sslrootcert {}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("sslrootcert {} is not PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("sslrootcert {} holds a bad certificate", path.display()))?;
    }
    if roots.is_empty() {
        bail!("sslrootcert {} holds no certificate", path.display());
    }
    Ok(Trusted {
        roots,
        from: format!("sslrootcert {}", path.display()),
    })
}

/// Checks the server's certificate as `check` says; the handshake's signatures always.
#[derive(Debug)]
struct Verifier {
    check: Check,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (trusted, check_name) = match &self.check {
            Check::Nothing => return Ok(ServerCertVerified::assertion()),
            Check::Chain(trusted) => (trusted, false),
            Check::ChainAndName(trusted) => (trusted, true),
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &trusted.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(|cause| {
            rustls::Error::Other(OtherError(Arc::new(NotTrusted {
                from: trusted.from.clone(),
                cause,
            })))
        })?;
        if check_name {
            verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's certificate does not chain to a trusted CA: says so, and which CAs those were.
#[derive(Debug)]
struct NotTrusted {
    from: String,
    cause: rustls::Error,
}

impl fmt::Display for NotTrusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate is not trusted by {}: {}",
            self.from, self.cause
        )
    }
}

impl std::error::Error for NotTrusted {}

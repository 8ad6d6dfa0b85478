//! TLS for the PostgreSQL client: rustls under `tokio-postgres`'s TLS traits, with libpq's
//! `sslmode` levels, `sslrootcert`, and client certificates (`sslcert`, `sslkey`).
//!
//! `tokio-postgres` itself knows `sslmode=disable|prefer|require`; ragway takes the whole of
//! libpq's set off the address before handing the rest to it:
//! - `disable`: plain TCP; `prefer` (the default): TLS when the server offers it, not
//!   verified; `require`: TLS or no connection, not verified — unless `sslrootcert` is
//!   given, which makes it `verify-ca`, as in libpq;
//! - `verify-ca`: the server's certificate must chain to a root of `sslrootcert`;
//! - `verify-full`: that, and the certificate must name the host connected to.
//!
//! `sslrootcert` is a PEM file of root certificates, or `system` for the Mozilla roots built
//! into ragway (`webpki-roots`); `verify-ca` and `verify-full` need one of them.
//!
//! `sslcert` and `sslkey` (PEM files: the client's certificate chain and its private key,
//! PKCS#8, PKCS#1 or SEC1) are presented when the server asks for a certificate (`cert`
//! authentication, or `clientcert=verify-full` in `pg_hba.conf`). They come together; unlike
//! libpq, ragway does not look for `~/.postgresql/postgresql.crt` when they are absent.

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much the client checks of the server's certificate (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// An address split into what `tokio-postgres` parses and ragway's TLS settings.
#[derive(Debug)]
pub struct TlsAddress {
    /// The address with `sslmode` mapped to `tokio-postgres`'s and `sslrootcert` removed.
    pub address: String,
    pub mode: SslMode,
    pub root_cert: Option<String>,
    /// `sslcert` and `sslkey`: the client certificate to present.
    pub client_cert: Option<(String, String)>,
}

/// The TLS parameters ragway takes off an address (the rest go to `tokio-postgres`).
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` off a `postgres://` URL or a
/// `key=value` address.
pub fn split_address(address: &str) -> Result<TlsAddress, String> {
    let mut mode = None;
    let mut root_cert = None;
    let (mut cert, mut client_key) = (None, None);
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "unknown sslmode `{other}` (disable, prefer, require, verify-ca, verify-full)"
                        ))
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(value.to_string());
                Ok(true)
            }
            "sslcert" => {
                cert = Some(value.to_string());
                Ok(true)
            }
            "sslkey" => {
                client_key = Some(value.to_string());
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if address.starts_with("postgres://") || address.starts_with("postgresql://") {
        match address.split_once('?') {
            None => address.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, &percent_decode(v)?)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in address.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if TLS_KEYS.contains(&k) => {
                    if v.starts_with('\'') {
                        return Err(format!("write `{k}` without quotes"));
                    }
                    take(k, v)?;
                }
                _ => kept.push(token),
            }
        }
        kept.join(" ")
    };
    let client_cert = match (cert, client_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("sslcert and sslkey come together (the client certificate and its private key)".into()),
    };
    let mode = match (mode.unwrap_or(SslMode::Prefer), &root_cert) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let wire = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
    };
    let address = if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
        format!("{rest}{}sslmode={wire}", if rest.contains('?') { '&' } else { '?' })
    } else {
        format!("{rest} sslmode={wire}")
    };
    Ok(TlsAddress { address, mode, root_cert, client_cert })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("a `%` escape is cut short")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("`%{hex}` is not a `%` escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not UTF-8".to_string())
}

/// Makes TLS connections for `tokio-postgres` (and so for `postgres` and the pool).
#[derive(Clone, Debug)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    /// The client configuration for `mode` with the roots `root_cert` names, presenting
    /// `client_cert` (certificate and key files) when the server asks for one.
    pub fn new(
        mode: SslMode,
        root_cert: Option<&str>,
        client_cert: Option<(&str, &str)>,
    ) -> Result<MakeRustls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let roots = match root_cert {
            None => None,
            Some(r) => Some(Arc::new(roots(r)?)),
        };
        let config = match (mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(
                    "sslmode=verify-ca and verify-full need sslrootcert (a PEM file of roots, or `system`)".into()
                )
            }
            (SslMode::VerifyFull, Some(roots)) => builder.with_root_certificates(roots),
            (SslMode::VerifyCa, Some(roots)) => {
                let chain = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Verifier { chain: Some(chain), provider }))
            }
            _ => builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier { chain: None, provider })),
        };
        let config = match client_cert {
            None => config.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("sslcert {cert}: {e}"))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("sslcert {cert}: {e}"))?;
                if chain.is_empty() {
                    return Err(format!("sslcert {cert} holds no certificate"));
                }
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey {key}: {e}"))?;
                config.with_client_auth_cert(chain, key).map_err(|e| format!("sslcert and sslkey: {e}"))?
            }
        };
        Ok(MakeRustls { config: Arc::new(config) })
    }
}

fn roots(root_cert: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    if root_cert == "system" {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    }
    let path = PathBuf::from(root_cert);
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("sslrootcert {} holds no usable certificate", path.display()));
    }
    Ok(store)
}

/// The checks of `sslmode=prefer|require` (none: encrypted, the certificate not checked,
/// libpq's meaning) and of `verify-ca` (the chain, not the name). The handshake's
/// signatures are verified either way.
#[derive(Debug)]
struct Verifier {
    /// The roots' verifier for `verify-ca`; `None` checks no certificate.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
    type Stream = TlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("`{domain}`: {e}")))?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for RustlsConnect {
    type Stream = TlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream<S>>> + Send>>;

    fn connect(self, io: S) -> Self::Future {
        Box::pin(async move {
            let tls = ClientConnection::new(self.config, self.name).map_err(io::Error::other)?;
            let mut stream = TlsStream { io, tls };
            std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
            Ok(stream)
        })
    }
}

/// A TLS session over a socket.
pub struct TlsStream<S> {
    io: S,
    tls: ClientConnection,
}

/// The socket as blocking I/O for rustls within one poll: `Pending` reads as `WouldBlock`
/// (the waker is registered by then).
struct Polled<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for Polled<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut rb) {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Polled<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// `Pending` for `WouldBlock`, else the result.
fn ready<T>(r: io::Result<T>) -> Poll<io::Result<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Sends what rustls has queued; `Pending` until all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            match ready(self.tls.write_tls(&mut Polled { io: &mut self.io, cx })) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads TLS records from the socket and processes them; `Ok(false)` at end of stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        match ready(self.tls.read_tls(&mut Polled { io: &mut self.io, cx })) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(_)) => match self.tls.process_new_packets() {
                Ok(_) => Poll::Ready(Ok(true)),
                Err(e) => {
                    // Tell the server why (an alert), then fail.
                    let _ = self.poll_send(cx);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                }
            },
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.is_handshaking() {
            if self.tls.wants_write() {
                std::task::ready!(self.poll_send(cx))?;
                continue;
            }
            if !std::task::ready!(self.poll_receive(cx))? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                )));
            }
        }
        self.poll_send(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match this.tls.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Queued records (say, an answer to a key update) go first; not being able to
            // send them yet does not stop reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !std::task::ready!(this.poll_receive(cx))? {
                // The socket ended without a close_notify: what was received is all there is.
                return match this.tls.reader().read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        Poll::Ready(Ok(()))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
                    Err(e) => Poll::Ready(Err(e)),
                };
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            let n = this.tls.writer().write(buf)?;
            if n > 0 || buf.is_empty() {
                // Send what can go now; the rest goes on flush or the next write.
                if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            // rustls's buffer is full: send some of it first.
            std::task::ready!(this.poll_send(cx))?;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.tls.writer().flush()?;
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.tls.send_close_notify();
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (`channel_binding=prefer` falls back to it).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_come_off_both_address_forms() {
        let a = split_address(
            "postgres://u:p@db:5432/rag?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(a.mode, SslMode::VerifyFull);
        assert_eq!(a.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(a.address, "postgres://u:p@db:5432/rag?application_name=x&sslmode=require");
        let b = split_address("host=db user=u sslmode=require sslrootcert=/ca.pem").unwrap();
        assert_eq!((b.mode, b.address.as_str()), (SslMode::VerifyCa, "host=db user=u sslmode=require"));
        let c = split_address("postgres://db/rag").unwrap();
        assert_eq!((c.mode, c.address.as_str()), (SslMode::Prefer, "postgres://db/rag?sslmode=prefer"));
        let d = split_address("postgresql://db/rag?sslmode=disable").unwrap();
        assert_eq!((d.mode, d.address.as_str()), (SslMode::Disable, "postgresql://db/rag?sslmode=disable"));
        assert!(split_address("postgres://db?sslmode=sometimes").unwrap_err().contains("unknown sslmode"));
        assert!(split_address("postgres://db?sslrootcert=%zz").is_err());
        assert!(split_address("host=db sslrootcert='/a b'").is_err());
        assert!(MakeRustls::new(SslMode::VerifyFull, None, None).unwrap_err().contains("need sslrootcert"));
        assert!(MakeRustls::new(SslMode::VerifyCa, Some("/nonexistent/ca.pem"), None).is_err());
        assert!(MakeRustls::new(SslMode::VerifyFull, Some("system"), None).is_ok());
        assert!(MakeRustls::new(SslMode::Require, None, None).is_ok());
        let e = split_address("postgres://db?sslcert=%2Fc.pem&sslkey=%2Fk.pem&sslmode=require").unwrap();
        assert_eq!(e.client_cert, Some(("/c.pem".to_string(), "/k.pem".to_string())));
        assert_eq!(e.address, "postgres://db?sslmode=require");
        let f = split_address("host=db sslcert=/c.pem sslkey=/k.pem").unwrap();
        assert_eq!((f.address.as_str(), f.client_cert.is_some()), ("host=db sslmode=prefer", true));
        assert!(split_address("postgres://db?sslcert=/c.pem").unwrap_err().contains("come together"));
        let missing = MakeRustls::new(SslMode::Require, None, Some(("/nonexistent/c.pem", "/nonexistent/k.pem")));
        assert!(missing.unwrap_err().contains("sslcert /nonexistent/c.pem"));
    }

    proptest::proptest! {
        /// Any address either splits or says why; the kept part never carries sslrootcert.
        #[test]
        fn any_address_splits_or_says_why(address in "(postgres://|host=)?[a-z%=&? 0-9A-F/'.-]{0,60}") {
            if let Ok(a) = split_address(&address) {
                proptest::prop_assert!(!a.address.contains("sslrootcert") && !a.address.contains("sslkey"));
            }
        }
    }
}

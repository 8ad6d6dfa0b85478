//! A TLS front for the test PostgreSQL, whose build has no TLS of its own: it answers
//! PostgreSQL's `SSLRequest` with `S`, completes a real TLS handshake (rustls, server side)
//! with the certificate it is given, and relays the decrypted protocol to the server. The
//! client under test does the TLS of a real deployment; PostgreSQL answers behind it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConnection;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

pub struct TlsProxy {
    pub port: u16,
    /// TLS sessions completed.
    pub sessions: Arc<AtomicUsize>,
    /// Connections that did not ask for TLS (closed).
    pub plain: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TlsProxy {
    pub fn start(backend_port: u16, cert: &Path, key: &Path) -> TlsProxy {
        Self::start_with(backend_port, cert, key, None)
    }

    /// [`TlsProxy::start`], requiring with `client_ca` a client certificate it signed (as
    /// PostgreSQL's `cert` authentication does).
    pub fn start_with(backend_port: u16, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsProxy {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(c.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = Arc::new(builder.with_single_cert(certs, key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = TlsProxy {
            port: listener.local_addr().unwrap().port(),
            sessions: Arc::default(),
            plain: Arc::default(),
            stop: Arc::default(),
        };
        let (sessions, plain, stop) = (proxy.sessions.clone(), proxy.plain.clone(), proxy.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (config, sessions, plain, stop) =
                            (config.clone(), sessions.clone(), plain.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let _ = serve(client, backend_port, config, &sessions, &plain, &stop);
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            }
        });
        proxy
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut client: TcpStream,
    backend_port: u16,
    config: Arc<rustls::ServerConfig>,
    sessions: &AtomicUsize,
    plain: &AtomicUsize,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let mut first = [0u8; 8];
    client.read_exact(&mut first)?;
    if first != SSL_REQUEST {
        plain.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    client.write_all(b"S")?;
    let mut tls = ServerConnection::new(config).map_err(std::io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut client)?;
    }
    sessions.fetch_add(1, Ordering::Relaxed);
    let mut backend = TcpStream::connect(("127.0.0.1", backend_port))?;
    client.set_nonblocking(true)?;
    backend.set_nonblocking(true)?;
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        match tls.read_tls(&mut client) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                busy = true;
                tls.process_new_packets().map_err(std::io::Error::other)?;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    busy = true;
                    write_all(&mut backend, &buf[..n])?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        match backend.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                busy = true;
                tls.writer().write_all(&buf[..n])?;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        while tls.wants_write() {
            match tls.write_tls(&mut client) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e),
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

/// `write_all` on a non-blocking socket.
fn write_all(to: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

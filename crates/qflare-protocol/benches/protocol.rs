//! Protocol benchmarks (`cargo bench -p qflare-protocol`).
//!
//! One file of about 700 lines on purpose: the same-run ratios compare groups
//! that must share one Criterion run and one set of inputs.
//!
//! Criterion measures each primitive per suite, the handshake, the channel
//! and the envelope. Because this machine is shared and noisy, the headline
//! figures are *ratios measured in one run*: the closing `ratios` section
//! interleaves each pair (ours, yardstick) many times and reports medians,
//! so drift in machine load hits both sides alike.
//!
//! Yardsticks, all in the same process:
//! * rustls 0.23 TLS 1.3 handshakes over in-memory buffers with the
//!   X25519MLKEM768 group, verifying a pinned certificate and the handshake
//!   signature exactly as QFLARE's clients do: ECDSA-P256 server-only auth
//!   (what QFLARE's HTTPS uses), ML-DSA-65 server-only, and ML-DSA-65 mutual
//!   auth (the like-for-like comparison: our handshake authenticates both
//!   sides with ML-DSA-65 and establishes keys with ML-KEM-768).
//! * raw aws-lc-rs AES-256-GCM in place, for the sealed channel.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead;
use common::interleaved;
use criterion::{BatchSize, Criterion, Throughput};
use qflare_protocol::channel::{ClientChannel, ServerChannel};
use qflare_protocol::envelope::{self, UpdateMetadata};
use qflare_protocol::handshake::{ClientIdentity, ClientStart, ServerStart};
use qflare_protocol::identity::{DeviceId, DeviceKeys};
use qflare_protocol::kem::KemKeyPair;
use qflare_protocol::sig::SigningKey;
use qflare_protocol::{KemSuite, SignatureSuite};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs as provider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, ServerConfig,
    ServerConnection,
};

const NOW: u64 = 1_750_000_000;
/// The MNIST CNN's update: 1,663,370 f32 parameters.
const CNN_UPDATE_BYTES: usize = 1_663_370 * 4;
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- QFLARE handshake

struct HandshakeFixture {
    server: SigningKey,
    device: DeviceKeys,
    device_id: DeviceId,
    rng: ChaCha20Rng,
}

impl HandshakeFixture {
    fn new(kem: KemSuite, sig: SignatureSuite) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        Self {
            server: SigningKey::generate(sig, &mut rng).expect("server key"),
            device: DeviceKeys::generate(kem, sig, &mut rng).expect("device keys"),
            device_id: DeviceId::random(&mut rng),
            rng,
        }
    }

    /// Both sides, start to established, plus the channels.
    fn both_sides(&mut self) -> (ClientChannel, ServerChannel) {
        let identity = ClientIdentity {
            device_id: self.device_id,
            kem_public_key: &self.device.kem.public,
            kem_secret_key: &self.device.kem.secret,
            signing_key: &self.device.signing,
        };
        let (await_hello, hello) = ClientStart::new(identity, self.server.verifying_key())
            .hello(&mut self.rng)
            .expect("hello");
        let (await_confirm, server_hello) = ServerStart::new(&self.server)
            .respond(&hello, &self.device.kem.public, NOW, 3600, &mut self.rng)
            .expect("respond");
        let (client, confirm) = await_hello.finish(&server_hello, NOW).expect("finish");
        let server = await_confirm
            .confirm(&confirm, self.device.signing.verifying_key(), NOW)
            .expect("confirm");
        (
            client.into_client_channel().expect("client channel"),
            server.server_channel().expect("server channel"),
        )
    }
}

/// The server's share of the handshake, with the client's messages precomputed.
fn server_side_setup(f: &mut HandshakeFixture) -> impl FnMut() + '_ {
    let identity = ClientIdentity {
        device_id: f.device_id,
        kem_public_key: &f.device.kem.public,
        kem_secret_key: &f.device.kem.secret,
        signing_key: &f.device.signing,
    };
    let (_, hello) = ClientStart::new(identity, f.server.verifying_key())
        .hello(&mut f.rng)
        .expect("hello");
    let server = &f.server;
    let device = &f.device;
    let rng = &mut f.rng;
    move || {
        let (await_confirm, server_hello) = ServerStart::new(server)
            .respond(&hello, &device.kem.public, NOW, 3600, rng)
            .expect("respond");
        black_box((await_confirm, server_hello));
    }
}

// ---------------------------------------------------------------- rustls yardstick

#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("unpinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General("unpinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn certificate(
    alg: &'static rcgen::SignatureAlgorithm,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate_for(alg).expect("certificate key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed certificate");
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

struct TlsPair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn tls_pair(alg: &'static rcgen::SignatureAlgorithm, mutual: bool) -> TlsPair {
    let provider = Arc::new(provider::default_provider());
    assert_eq!(
        provider.kx_groups[0].name(),
        rustls::NamedGroup::X25519MLKEM768,
        "rustls prefers the hybrid group"
    );
    let (server_cert, server_key) = certificate(alg);
    let (client_cert, client_key) = certificate(alg);
    let server_pin = Arc::new(Pinned {
        certificate: server_cert.clone(),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(server_pin);
    let client = if mutual {
        builder
            .with_client_auth_cert(vec![client_cert.clone()], client_key)
            .expect("client cert")
    } else {
        builder.with_no_client_auth()
    };
    let server_builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13");
    let server_builder = if mutual {
        server_builder.with_client_cert_verifier(Arc::new(Pinned {
            certificate: client_cert,
            provider,
        }))
    } else {
        server_builder.with_no_client_auth()
    };
    let mut server = server_builder
        .with_single_cert(vec![server_cert], server_key)
        .expect("server cert");
    // Each handshake must be a full one, like a fresh device session.
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = client;
    client.resumption = rustls::client::Resumption::disabled();
    TlsPair {
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

fn pump(from: &mut dyn FnMut(&mut Vec<u8>) -> usize, to: &mut dyn FnMut(&[u8])) {
    let mut buf = Vec::new();
    while from(&mut buf) > 0 {}
    if !buf.is_empty() {
        to(&buf);
    }
}

/// One full TLS 1.3 handshake over memory buffers.
fn tls_handshake(pair: &TlsPair) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(pair.client.clone(), name).expect("client");
    let mut server = ServerConnection::new(pair.server.clone()).expect("server");
    while client.is_handshaking() || server.is_handshaking() {
        pump(
            &mut |buf| client.write_tls(buf).expect("client write"),
            &mut |bytes| {
                let mut cursor = bytes;
                while !cursor.is_empty() {
                    server.read_tls(&mut cursor).expect("server read");
                }
                server.process_new_packets().expect("server process");
            },
        );
        pump(
            &mut |buf| server.write_tls(buf).expect("server write"),
            &mut |bytes| {
                let mut cursor = bytes;
                while !cursor.is_empty() {
                    client.read_tls(&mut cursor).expect("client read");
                }
                client.process_new_packets().expect("client process");
            },
        );
    }
    assert_eq!(
        client.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    black_box((client, server));
}

// ---------------------------------------------------------------- raw AES-GCM yardstick

struct RawAead {
    key: aead::LessSafeKey,
}

impl RawAead {
    fn new() -> Self {
        Self {
            key: aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_256_GCM, &[9; 32]).expect("key"),
            ),
        }
    }

    fn seal(&self, buffer: &mut Vec<u8>) {
        self.key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key([1; 12]),
                aead::Aad::empty(),
                buffer,
            )
            .expect("seal");
    }

    fn open(&self, buffer: &mut Vec<u8>) {
        let n = self
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key([1; 12]),
                aead::Aad::empty(),
                buffer,
            )
            .expect("open")
            .len();
        buffer.truncate(n);
    }
}

// ---------------------------------------------------------------- criterion groups

fn primitives(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut group = c.benchmark_group("kem");
    for suite in KemSuite::ALL {
        let pair = KemKeyPair::generate(suite, &mut rng).expect("keygen");
        let (ct, _) = pair.public.encapsulate(&mut rng).expect("encaps");
        group.bench_function(format!("{suite}/keygen"), |b| {
            b.iter(|| black_box(KemKeyPair::generate(suite, &mut rng).expect("keygen")))
        });
        group.bench_function(format!("{suite}/encapsulate"), |b| {
            b.iter(|| black_box(pair.public.encapsulate(&mut rng).expect("encaps")))
        });
        group.bench_function(format!("{suite}/decapsulate"), |b| {
            b.iter(|| black_box(pair.secret.decapsulate(&ct).expect("decaps")))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("signature");
    for suite in SignatureSuite::ALL {
        let key = SigningKey::generate(suite, &mut rng).expect("keygen");
        let msg = [7u8; 48];
        let sig = key.sign(&msg).expect("sign");
        group.bench_function(format!("{suite}/keygen"), |b| {
            b.iter(|| black_box(SigningKey::generate(suite, &mut rng).expect("keygen")))
        });
        group.bench_function(format!("{suite}/sign"), |b| {
            b.iter(|| black_box(key.sign(&msg).expect("sign")))
        });
        group.bench_function(format!("{suite}/verify"), |b| {
            b.iter(|| {
                key.verifying_key()
                    .verify(&msg, &sig, "bench")
                    .expect("verify")
            })
        });
    }
    group.finish();
}

fn handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.sample_size(30);
    for kem in KemSuite::ALL {
        let mut fixture = HandshakeFixture::new(kem, SignatureSuite::MlDsa65);
        group.bench_function(format!("qflare/{kem}+ml-dsa-65/both-sides"), |b| {
            b.iter(|| black_box(fixture.both_sides()))
        });
    }
    let mut fixture = HandshakeFixture::new(KemSuite::MlKem768, SignatureSuite::MlDsa65);
    let mut server_side = server_side_setup(&mut fixture);
    group.bench_function("qflare/ml-kem-768+ml-dsa-65/server-side", |b| {
        b.iter(&mut server_side)
    });
    for (name, alg, mutual) in [
        (
            "rustls/x25519mlkem768+ecdsa-p256",
            &rcgen::PKCS_ECDSA_P256_SHA256,
            false,
        ),
        (
            "rustls/x25519mlkem768+ml-dsa-65",
            &rcgen::PKCS_ML_DSA_65,
            false,
        ),
        (
            "rustls/x25519mlkem768+ml-dsa-65-mutual",
            &rcgen::PKCS_ML_DSA_65,
            true,
        ),
    ] {
        let pair = tls_pair(alg, mutual);
        group.bench_function(name, |b| b.iter(|| tls_handshake(&pair)));
    }
    group.finish();
}

fn channel(c: &mut Criterion) {
    let mut fixture = HandshakeFixture::new(KemSuite::MlKem768, SignatureSuite::MlDsa65);
    let raw = RawAead::new();
    let mut group = c.benchmark_group("channel");
    group.sample_size(20);
    for (label, size) in [("1MiB", MIB), ("6.65MB", CNN_UPDATE_BYTES)] {
        let plaintext = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        let (mut client, server) = fixture.both_sides();
        let mut buffer = Vec::with_capacity(size + 64);
        group.bench_function(format!("seal/qflare/{label}"), |b| {
            b.iter(|| {
                buffer.clear();
                buffer.extend_from_slice(&plaintext);
                client
                    .seal_request("POST", "/v1/updates", &mut buffer, NOW)
                    .expect("seal");
            })
        });
        group.bench_function(format!("seal/aws-lc-aes-256-gcm/{label}"), |b| {
            b.iter(|| {
                buffer.clear();
                buffer.extend_from_slice(&plaintext);
                raw.seal(&mut buffer);
            })
        });
        let mut record = plaintext.clone();
        client
            .seal_request("POST", "/v1/updates", &mut record, NOW)
            .expect("seal");
        group.bench_function(format!("open/qflare/{label}"), |b| {
            b.iter(|| {
                buffer.clear();
                buffer.extend_from_slice(&record);
                server
                    .open_request("POST", "/v1/updates", &mut buffer, 0, NOW)
                    .expect("open");
            })
        });
        let mut raw_record = plaintext.clone();
        raw.seal(&mut raw_record);
        group.bench_function(format!("open/aws-lc-aes-256-gcm/{label}"), |b| {
            b.iter(|| {
                buffer.clear();
                buffer.extend_from_slice(&raw_record);
                raw.open(&mut buffer);
            })
        });
    }
    group.finish();
}

fn envelopes(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let device = SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).expect("device key");
    let enclave = KemKeyPair::generate(KemSuite::MlKem768, &mut rng).expect("enclave key");
    let meta = UpdateMetadata {
        round_id: 1,
        device_id: DeviceId::random(&mut rng),
        model_version: 1,
        example_count: 600,
    };
    let mut group = c.benchmark_group("envelope");
    group.sample_size(20);
    for (label, size) in [("2nn-796KB", 199_210 * 4), ("cnn-6.65MB", CNN_UPDATE_BYTES)] {
        let update = vec![0x11u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("seal/{label}"), |b| {
            b.iter(|| {
                black_box(
                    envelope::seal(&meta, &update, &device, &enclave.public, &mut rng)
                        .expect("seal"),
                )
            })
        });
        let sealed =
            envelope::seal(&meta, &update, &device, &enclave.public, &mut rng).expect("seal");
        group.bench_function(format!("open/{label}"), |b| {
            b.iter_batched(
                || sealed.clone(),
                |env| {
                    black_box(
                        envelope::open(
                            &env,
                            &enclave.secret,
                            &enclave.public,
                            device.verifying_key(),
                        )
                        .expect("open"),
                    )
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

// ---------------------------------------------------------------- same-run ratios

fn report(label: &str, ours: Duration, yardstick: Duration, target: &str) {
    println!(
        "| {label} | {:.1} µs | {:.1} µs | {:.2}x | {target} |",
        ours.as_secs_f64() * 1e6,
        yardstick.as_secs_f64() * 1e6,
        ours.as_secs_f64() / yardstick.as_secs_f64()
    );
}

fn ratios() {
    println!("\n## Same-run ratios (medians of interleaved batches)\n");
    println!("| comparison | ours | yardstick | ours / yardstick | target |");
    println!("|---|---|---|---|---|");
    let mut fixture = HandshakeFixture::new(KemSuite::MlKem768, SignatureSuite::MlDsa65);
    for (name, alg, mutual) in [
        (
            "handshake, both sides vs rustls X25519MLKEM768 + ECDSA-P256 (server auth)",
            &rcgen::PKCS_ECDSA_P256_SHA256,
            false,
        ),
        (
            "handshake, both sides vs rustls X25519MLKEM768 + ML-DSA-65 (server auth)",
            &rcgen::PKCS_ML_DSA_65,
            false,
        ),
        (
            "handshake, both sides vs rustls X25519MLKEM768 + ML-DSA-65 (mutual auth)",
            &rcgen::PKCS_ML_DSA_65,
            true,
        ),
    ] {
        let pair = tls_pair(alg, mutual);
        let (ours, theirs) = interleaved(
            || drop(black_box(fixture.both_sides())),
            || tls_handshake(&pair),
            20,
            31,
        );
        report(name, ours, theirs, "≤ 1.0x");
    }

    let raw = RawAead::new();
    for (label, size) in [("1 MiB", MIB), ("6.65 MB", CNN_UPDATE_BYTES)] {
        let plaintext = vec![0x5au8; size];
        let (mut client, server) = fixture.both_sides();
        let mut buf_a = Vec::with_capacity(size + 64);
        let mut buf_b = Vec::with_capacity(size + 64);
        let (ours, theirs) = interleaved(
            || {
                buf_a.clear();
                buf_a.extend_from_slice(&plaintext);
                client
                    .seal_request("POST", "/v1/updates", &mut buf_a, NOW)
                    .expect("seal");
            },
            || {
                buf_b.clear();
                buf_b.extend_from_slice(&plaintext);
                raw.seal(&mut buf_b);
            },
            5,
            41,
        );
        report(
            &format!(
                "channel seal {label} vs raw AES-256-GCM (throughput = {:.0}% of raw)",
                100.0 * theirs.as_secs_f64() / ours.as_secs_f64()
            ),
            ours,
            theirs,
            "throughput ≥ 85% of raw",
        );
        let mut record = plaintext.clone();
        client
            .seal_request("POST", "/v1/updates", &mut record, NOW)
            .expect("seal");
        let mut raw_record = plaintext.clone();
        raw.seal(&mut raw_record);
        let (ours, theirs) = interleaved(
            || {
                buf_a.clear();
                buf_a.extend_from_slice(&record);
                server
                    .open_request("POST", "/v1/updates", &mut buf_a, 0, NOW)
                    .expect("open");
            },
            || {
                buf_b.clear();
                buf_b.extend_from_slice(&raw_record);
                raw.open(&mut buf_b);
            },
            5,
            41,
        );
        report(
            &format!(
                "channel open {label} vs raw AES-256-GCM (throughput = {:.0}% of raw)",
                100.0 * theirs.as_secs_f64() / ours.as_secs_f64()
            ),
            ours,
            theirs,
            "throughput ≥ 85% of raw",
        );
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    primitives(&mut criterion);
    handshakes(&mut criterion);
    channel(&mut criterion);
    envelopes(&mut criterion);
    criterion.final_summary();
    // `cargo bench --no-run` builds; `cargo test --benches` runs each once in
    // test mode, where the long ratio section is skipped.
    if !std::env::args().any(|a| a == "--test" || a == "--list") {
        ratios();
    }
}

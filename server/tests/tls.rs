//! Mutual TLS: with `tls.*` set, a client presenting a certificate from the configured CA
//! is served; one without a certificate, one with a certificate from another CA, and one
//! speaking plain TCP are refused. Certificates come from `scripts/dev-ca.sh` (openssl),
//! the same one-command bootstrap operators use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions, ClientTls, RetryPolicy};
use capkv_rpc::tls::TlsFiles;
use rustls::pki_types::pem::PemObject;

fn dev_ca(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-ca.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(dir)
        .output()
        .expect("run dev-ca.sh");
    assert!(out.status.success(), "dev-ca.sh: {out:?}");
    dir.to_path_buf()
}

fn files(dir: &Path, who: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
    }
}

fn options(tls: Option<ClientTls>) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        retry: RetryPolicy::none(),
        tls,
        ..ClientOptions::default()
    }
}

/// Connects and makes one call; the error if either fails.
async fn call(addr: &str, options: ClientOptions) -> Result<(), capkv::ApiError> {
    let c = Client::connect(addr, options).await?;
    c.put(b"k", b"v").await?;
    c.get(b"k").await.map(|_| ())
}

#[test]
fn only_clients_with_a_certificate_from_the_ca_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let good = dev_ca(&tmp.path().join("good"));
    let other = dev_ca(&tmp.path().join("other"));
    let server_files = files(&good, "server");
    let mut config = common::test_config();
    config.tls.cert = Some(server_files.cert.clone());
    config.tls.key = Some(server_files.key.clone());
    config.tls.client_ca = Some(server_files.ca.clone());
    let server = common::start(config);
    let addr = server.addr().to_string();
    common::local_result(async {
        // A certificate from the CA: served (the server's name is 127.0.0.1 in its cert).
        let ok = ClientTls::from_files(&files(&good, "client"), "127.0.0.1").unwrap();
        call(&addr, options(Some(ok.clone())))
            .await
            .expect("a client from the CA is served");

        // No client certificate at all.
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(good.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let anonymous = ClientTls {
            config: Arc::new(anonymous),
            server_name: "127.0.0.1".into(),
        };
        let e = call(&addr, options(Some(anonymous))).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated, "{e}");
        eprintln!("no certificate: {e}");

        // A certificate from another CA (which also does not trust the server's).
        let mut stranger_files = files(&other, "client");
        stranger_files.ca = good.join("ca.pem");
        let stranger = ClientTls::from_files(&stranger_files, "127.0.0.1").unwrap();
        let e = call(&addr, options(Some(stranger))).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated, "{e}");
        eprintln!("certificate from another CA: {e}");

        // Plain TCP against a TLS listener.
        let e = call(&addr, options(None)).await.unwrap_err();
        eprintln!("plain TCP: {e}");
        assert!(
            matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal),
            "{e}"
        );

        // A client that does not trust the server's CA refuses the server.
        let wary = ClientTls::from_files(&files(&other, "client"), "127.0.0.1").unwrap();
        let e = call(&addr, options(Some(wary))).await.unwrap_err();
        eprintln!("client not trusting the server: {e}");
        assert!(e.message.contains("TLS"), "{e}");

        // The good client still works after all that.
        call(&addr, options(Some(ok))).await.expect("served again");
    });

    // kv-client's flags, as the README shows them.
    let kv_client = common::kv_client_bin();
    let run = |who: &Path| {
        Command::new(&kv_client)
            .args(["--addr", &addr, "--attempts", "1"])
            .arg("--tls-ca")
            .arg(good.join("ca.pem"))
            .arg("--tls-cert")
            .arg(who.join("client.pem"))
            .arg("--tls-key")
            .arg(who.join("client.key"))
            .args(["put", "cli-key", "cli-value"])
            .output()
            .expect("run kv-client")
    };
    let out = run(&good);
    assert!(out.status.success(), "{out:?}");
    let out = run(&other);
    assert!(
        !out.status.success(),
        "a client certificate from another CA: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{out:?}"
    );
}

#[test]
fn tls_settings_go_together() {
    let mut config = common::test_config();
    config.tls.cert = Some("server.pem".into());
    assert!(config.validate().is_err(), "cert without key and CA");
}

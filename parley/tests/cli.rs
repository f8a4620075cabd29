//! The `parley` binary as a user runs it.

use parley_tests::tool::http_get;
use parley_tests::turn_client::TurnClient;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use stun_turn::core::auth::rest_password;

const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// Runs `parley args…` to its end (at most a minute: one that serves
/// instead of failing is killed, and the test fails).
fn parley(args: &[&str]) -> std::process::Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run parley");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("run parley"),
        Err(_) => {
            parley_tests::tool::signal(pid, "-KILL");
            panic!("parley {args:?} did not finish within 60 s")
        }
    }
}

#[test]
fn help_explains_every_command() {
    let out = parley(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "up",
        "turn",
        "ids",
        "courier",
        "signaling",
        "sfu",
        "--config",
        "--data",
        "--admin",
        "PARLEY_",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let out = parley(&["ids", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--ids-listen",
        "--ids-database",
        "8444",
        "openapi.json",
        "outbox",
    ] {
        assert!(text.contains(word), "ids --help lacks {word}:\n{text}");
    }
    let out = parley(&["courier", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--courier-device-listen",
        "--courier-provider-listen",
        "--courier-database",
        "5223",
        "8443",
        "QUIC",
        "Web Push",
        "/3/device/",
    ] {
        assert!(text.contains(word), "courier --help lacks {word}:\n{text}");
    }
    let out = parley(&["signaling", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--sip-listen",
        "--sip-tls-listen",
        "--sip-wss-listen",
        "8445",
        "--sip-domain",
        "--sip-advertise",
        "5060",
        "5061",
        "%40",
        "signaling.accounts",
        "Call completed elsewhere",
    ] {
        assert!(
            text.contains(word),
            "signaling --help lacks {word}:\n{text}"
        );
    }
    let out = parley(&["turn", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--listen",
        "--allow-peer",
        "--user",
        "--rest-secret",
        "--relay-ip",
        "--alternate",
        "SIGHUP",
    ] {
        assert!(text.contains(word), "turn --help lacks {word}:\n{text}");
    }
}

#[test]
fn cluster_mode_without_postgresql_is_refused_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let out = parley(&[
        "--data",
        data.to_str().expect("utf8"),
        "--cluster-nats",
        "nats://127.0.0.1:9",
        "courier",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cluster mode needs PostgreSQL") && err.contains("courier.database"),
        "{err}"
    );
}

#[test]
fn bad_values_get_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let out = Command::new(BIN)
        .args(["--data", data.to_str().expect("utf8"), "turn"])
        .env("PARLEY_TURN_MIN_PORT", "70000")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("turn.min_port"), "{err}");

    let cfg = dir.path().join("parley.toml");
    std::fs::write(&cfg, "[turn]\nallow_peers = [\"10.0.0.0/99\"]\n").expect("write");
    let out = parley(&[
        "--config",
        cfg.to_str().expect("utf8"),
        "--data",
        data.to_str().expect("utf8"),
        "turn",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("turn.allow_peers"), "{err}");

    let out = parley(&[
        "--data",
        data.to_str().expect("utf8"),
        "turn",
        "--ports",
        "9-3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("turn.min_port"), "{err}");
}

/// Platform and cluster credentials that cannot be used stop start-up
/// with one line naming the key, before anything listens.
#[test]
fn unusable_push_and_nats_credentials_get_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let sa = dir.path().join("sa.json");
    std::fs::write(&sa, r#"{"project_id": "p"}"#).expect("write");
    for (config, service, key) in [
        (
            "[courier.upstream.apns]\nkey = \"/nonexistent/AuthKey.p8\"\nkey_id = \"K\"\nteam_id = \"T\"\nurl = \"127.0.0.1:1\"\n".to_owned(),
            "courier",
            "courier.upstream.apns.key",
        ),
        (
            format!("[courier.upstream.fcm]\nservice_account = \"{}\"\n", sa.display()),
            "courier",
            "courier.upstream.fcm.service_account",
        ),
        (
            "[cluster]\nnats = \"nats://127.0.0.1:9\"\nnats_user = \"u\"\n[courier]\ndatabase = \"postgres://x\"\n".to_owned(),
            "courier",
            "nats_password_file",
        ),
    ] {
        let cfg = dir.path().join("parley.toml");
        std::fs::write(&cfg, &config).expect("write");
        let mut args = vec![
            "--config",
            cfg.to_str().expect("utf8"),
            "--data",
            data.to_str().expect("utf8"),
            "--admin",
            "127.0.0.1:0",
            "--log",
            "error",
            service,
        ];
        args.extend([
            "--courier-device-listen",
            "127.0.0.1:0",
            "--courier-provider-listen",
            "127.0.0.1:0",
        ]);
        let out = parley(&args);
        assert!(!out.status.success(), "{config}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(key), "{config}: {err}");
    }
}

/// A running `parley up` and the addresses it printed.
struct Running {
    child: Child,
    udp: SocketAddr,
    admin: SocketAddr,
    ids: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "--data",
        data.to_str().expect("utf8"),
        "--admin",
        "127.0.0.1:0",
        "up",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--user",
        "ann:secret-pw",
        "--ids-listen",
        "127.0.0.1:0",
        "--courier-device-listen",
        "127.0.0.1:0",
        "--courier-provider-listen",
        "127.0.0.1:0",
        "--sip-listen",
        "127.0.0.1:0",
        "--sip-tls-listen",
        "127.0.0.1:0",
        "--sip-wss-listen",
        "127.0.0.1:0",
        "--sfu-listen",
        "127.0.0.1:0",
        "--sfu-api-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (child, printed) = parley_tests::tool::start_until_ready(BIN, &args);
    // From here on the guard kills and reaps the child on every path.
    let unset = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut run = Running {
        child,
        udp: unset,
        admin: unset,
        ids: unset,
    };
    for line in &printed {
        if let Some(rest) = line.strip_prefix("parley: turn udp=") {
            run.udp = rest
                .split([',', ' '])
                .next()
                .and_then(|s| s.parse().ok())
                .expect("udp address");
        }
        if let Some(rest) = line.strip_prefix("parley: admin http://") {
            run.admin = rest
                .split(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("admin address");
        }
        if let Some(rest) = line.strip_prefix("parley: ids https://") {
            let addr: SocketAddr = rest
                .split(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("ids address");
            TcpStream::connect(addr).expect("ids listens");
            run.ids = addr;
        }
    }
    assert!(
        run.udp.port() != 0 && run.admin.port() != 0 && run.ids.port() != 0,
        "addresses printed before ready"
    );
    run
}

/// `/readyz` answers 503 naming the database while ids' and the courier's
/// PostgreSQL is down, and 200 again once it is back, without a restart.
#[test]
fn readyz_is_unready_while_the_database_is_down() {
    let pg = parley_tests::postgres::Postgres::start("cli-readyz");
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let run = start(
        &dir.path().join("data"),
        &["--ids-database", &url, "--courier-database", &url],
    );
    assert_eq!(http_get(run.admin, "/readyz").0, 200);
    pg.stop();
    let (code, body) = http_get(run.admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("database"), "{body}");
    pg.start_again();
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = http_get(run.admin, "/readyz");
        if last.0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last.0, 200, "{}", last.1);
    // The process stayed up throughout.
    assert_eq!(http_get(run.admin, "/healthz").0, 200);
}

fn signal(child: &Child, sig: &str) {
    parley_tests::tool::signal(child.id(), sig);
}

fn rest_user(secret: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let user = format!("{expiry}:dora");
    let pass = rest_password(secret, &user);
    (user, pass)
}

#[test]
fn up_creates_the_data_dir_serves_admin_reloads_and_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("parley-data");
    let mut run = start(&data, &[]);

    for (file, mode) in [
        ("ca.pem", 0o644),
        ("ca-key.pem", 0o600),
        ("server.pem", 0o644),
        ("server-key.pem", 0o600),
        ("turn-secret", 0o600),
        ("ids-vrf.key", 0o600),
        ("ids-root.pk8", 0o600),
        ("ids.db", 0o644),
    ] {
        let meta = std::fs::metadata(data.join(file)).unwrap_or_else(|_| panic!("{file} created"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let ca = std::fs::read_to_string(data.join("ca.pem")).expect("ca");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));

    assert_eq!(http_get(run.admin, "/healthz").0, 200);
    assert_eq!(http_get(run.admin, "/readyz").0, 200);

    // The generated secret works for REST credentials; the static user works too.
    let secret = std::fs::read_to_string(data.join("turn-secret"))
        .expect("secret")
        .trim()
        .to_owned();
    let (user, pass) = rest_user(&secret);
    let mut rest = TurnClient::new(run.udp, &user, &pass);
    rest.allocate().expect("REST allocation");
    let mut kept = TurnClient::new(run.udp, "ann", "secret-pw");
    kept.allocate().expect("static user allocation");

    let (code, metrics) = http_get(run.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("parley_turn_allocations 2"), "{metrics}");
    // A lone identity service is the key directory's publisher.
    assert!(metrics.contains("parley_ids_epoch "), "{metrics}");
    assert!(
        metrics.contains("parley_ids_publisher_takeovers_total "),
        "{metrics}"
    );
    assert!(
        metrics.contains("parley_turn_auth_failures_total{reason=\"challenged\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&secret) && !metrics.contains("secret-pw"),
        "no secrets in metrics"
    );

    // SIGHUP: a rotated secret takes effect, allocations stay.
    std::fs::write(data.join("turn-secret"), "rotated-secret\n").expect("rotate");
    signal(&run.child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (new_user, new_pass) = rest_user("rotated-secret");
    loop {
        let mut c = TurnClient::new(run.udp, &new_user, &new_pass);
        if c.allocate().is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated secret was not picked up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut stale = TurnClient::new(run.udp, &user, &pass);
    assert_eq!(stale.allocate(), Err(401), "the old secret is gone");
    assert_eq!(
        kept.refresh(600),
        Ok(()),
        "the allocation survived the reload"
    );

    // SIGTERM: exits 0 promptly.
    signal(&run.child, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = run.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "parley did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    // A second start reuses the CA instead of making a new one.
    let again = start(&data, &[]);
    assert_eq!(
        std::fs::read_to_string(data.join("ca.pem")).expect("ca"),
        ca
    );

    // A second server on a port the first holds is refused, not let in
    // beside it through SO_REUSEPORT.
    let port = again.udp.to_string();
    let other = dir.path().join("other");
    let out = parley(&[
        "--data",
        other.to_str().expect("utf8"),
        "--admin",
        "127.0.0.1:0",
        "turn",
        "--listen",
        &port,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot bind") && err.contains(&port), "{err}");
}

/// `parley turn` listening on IPv4 and IPv6 with an IPv6 relay address
/// named still relays IPv4: an IPv4 Allocate gets an IPv4 relayed
/// address, not 440 (Address Family not Supported).
#[test]
fn an_ipv6_relay_address_keeps_ipv4_allocations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = [
        "--data",
        data.to_str().expect("utf8"),
        "--admin",
        "127.0.0.1:0",
        "turn",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "[::1]:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--relay-ipv6",
        "::1",
    ];
    let (mut child, printed) = parley_tests::tool::start_until_ready(BIN, &args);
    let udp4: Option<SocketAddr> = printed.iter().find_map(|l| {
        l.strip_prefix("parley: turn udp=")?
            .split([',', ' '])
            .filter_map(|s| s.parse::<SocketAddr>().ok())
            .find(SocketAddr::is_ipv4)
    });
    let secret = std::fs::read_to_string(data.join("turn-secret"))
        .expect("secret")
        .trim()
        .to_owned();
    let (user, pass) = rest_user(&secret);
    let result = udp4.map(|a| TurnClient::new(a, &user, &pass).allocate());
    let _ = child.kill();
    let _ = child.wait();
    let relayed = result
        .expect("an IPv4 listen address printed")
        .expect("an IPv4 allocation");
    assert!(relayed.is_ipv4(), "{relayed}");
}

/// `parley up` runs the SFU: its join API answers over HTTPS with the
/// data directory's certificate, and a join without a room token, or
/// with one signaling did not make, is refused and counted.
#[test]
fn parley_up_serves_the_sfu_join_api_over_https_behind_room_tokens() {
    parley_tests::tool::require("curl");
    let dir = tempfile::tempdir().unwrap();
    let (data, up) = parley_tests::up::start_lab(BIN, dir.path());
    let join = |auth: Option<&str>| -> String {
        let mut args = parley_tests::tool::args(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            data.join("ca.pem").to_str().unwrap(),
            "-X",
            "POST",
            "-H",
            "Content-Type: application/sdp",
            "--data",
            "v=0",
        ]);
        if let Some(a) = auth {
            args.extend(["-H".to_string(), format!("Authorization: Bearer {a}")]);
        }
        args.push(format!(
            "https://{}/v1/rooms/room-1-abcdefghijkl/participants",
            up.sfu
        ));
        parley_tests::tool::run("curl", &args, Duration::from_secs(20))
            .text
            .trim()
            .to_string()
    };
    assert_eq!(join(None), "401");
    assert_eq!(
        join(Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
        "403"
    );
    let (_, metrics) = parley_tests::tool::http_get(up.admin, "/metrics");
    assert!(metrics.contains("parley_sfu_rooms 0"), "{metrics}");
    assert!(
        metrics.contains("parley_sfu_joins_refused_total 2"),
        "{metrics}"
    );
}

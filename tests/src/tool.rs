//! Running third-party command-line clients with a deadline.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The path of `name`, or a panic that says how to install it: a missing
/// tool must fail the test, never skip it.
pub fn require(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` is not installed; run scripts/install-deps.sh (it installs the Debian packages the tests use)");
}

/// What a finished tool printed.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub code: Option<i32>,
    /// stdout and stderr, stdout first.
    pub text: String,
}

/// Runs `name args…`, killing it after `limit`. Returns what it printed.
pub fn run(name: &str, args: &[String], limit: Duration) -> Output {
    run_in(None, name, args, limit)
}

/// As [`run`], in working directory `dir` (for tools that leave state in
/// their working directory).
pub fn run_in(
    dir: Option<&std::path::Path>,
    name: &str,
    args: &[String],
    limit: Duration,
) -> Output {
    run_with(dir, &[], name, args, limit)
}

/// As [`run_in`], with extra environment variables.
pub fn run_with(
    dir: Option<&std::path::Path>,
    env: &[(&str, &str)],
    name: &str,
    args: &[String],
    limit: Duration,
) -> Output {
    let exe = require(name);
    let mut cmd = Command::new(&exe);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let mut out = child.stdout.take().map(reader);
    let mut err = child.stderr.take().map(reader);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut text = out
        .take()
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    text.push_str(
        &err.take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default(),
    );
    match status {
        Some(s) => Output {
            success: s.success(),
            code: s.code(),
            text,
        },
        None => panic!(
            "{name} {} did not finish within {limit:?}; it printed:\n{text}",
            args.join(" ")
        ),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Converts string literals to owned arguments.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A child's output lines, read on a thread of their own, so a test can
/// wait for a line with a timeout.
pub fn lines(out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts `exe args…` (a `parley` service) and waits up to 30 s for its
/// `parley: ready` line; returns the child and every line it printed up
/// to then (the addresses it listens on). A child that exits first, or
/// does not get ready in time (then killed), fails the test with what it
/// printed on stdout and stderr.
pub fn start_until_ready(exe: &str, args: &[&str]) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
    let rx = lines(child.stdout.take().expect("piped stdout"));
    // Its errors, kept for the report should it not get ready (and
    // drained, so a chatty process never blocks on a full pipe).
    let errors = lines(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut printed = Vec::new();
    let mut exited = None;
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            exited = child.try_wait().ok().flatten();
            if exited.is_some() {
                break;
            }
            continue;
        };
        if line == "parley: ready" {
            // Drained from now on, unread.
            std::thread::spawn(move || errors.into_iter().for_each(drop));
            return (child, printed);
        }
        printed.push(line);
    }
    if exited.is_none() {
        let _ = child.kill();
    }
    let status = child.wait();
    let stderr: Vec<String> = errors.try_iter().collect();
    panic!(
        "{exe} {args:?} did not report ready ({}); it printed {printed:?} and on stderr {stderr:?}",
        match exited {
            Some(s) => format!("it exited: {s}"),
            None => format!("not within 30 s; {status:?}"),
        }
    );
}

/// A port on `ip` free for both TCP and UDP a moment ago, outside the
/// range the system picks ephemeral ports from (Linux: 32768–60999), so a
/// client's outgoing socket never takes it while a server that listens
/// there restarts.
pub fn stable_port(ip: std::net::IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 20);
    for _ in 0..500 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let x = (seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 7) % 12_000;
        let port = 20_000 + x as u16;
        let addr = std::net::SocketAddr::new(ip, port);
        let tcp = std::net::TcpListener::bind(addr);
        let udp = std::net::UdpSocket::bind(addr);
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no port free for TCP and UDP on {ip} in 20000–31999");
}

/// DER bytes as a PEM block with `label` (`CERTIFICATE`, `PRIVATE KEY`…).
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

/// A plain HTTP/1.1 GET on loopback (an admin listener): status and body;
/// status 0 if nothing answered within 5 s.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::Write as _;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Sends `sig` (`-STOP`, `-CONT`, `-HUP`…) to process `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// A TCP port on 127.0.0.1 free a moment ago (bind, read, release): a
/// server the test starts binds it a moment later. Another process could
/// take it in between; on loopback in a test run that is rare, and the
/// server then fails loudly.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    port
}

//! Interop with baresip (Debian `baresip-core` 1.0): two headless baresip
//! instances register through `parley signaling` with digest accounts and
//! complete an audio call whose ICE goes through `parley turn` and whose
//! media is DTLS-SRTP, driven over baresip's ctrl_tcp module.
//!
//! baresip 1.0 does not gather host candidates on loopback, so each
//! instance runs in a network namespace this test creates, joined to the
//! host by a veth pair; signaling and the relay listen on the host end of
//! the first pair. The two namespaces cannot reach each other directly
//! (the host does not forward), so the only working ICE pair is through
//! the relay. Needs root (namespaces) and `ip` from iproute2.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_parley");
const HOST: &str = "10.213.1.1";
const ALICE: &str = "+14155550100";
const BOB: &str = "+14155550123";

/// Namespaces, links and processes this test made; removed on drop.
struct Lab {
    tag: String,
    children: Vec<Child>,
}

impl Lab {
    fn ns(&self, side: char) -> String {
        format!("plb{}{side}", self.tag)
    }

    fn veth(&self, side: char) -> String {
        format!("vb{}{side}", self.tag)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for side in ['a', 'b'] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(side)])
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(side)])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespace `side` with address 10.213.<n>.2, its host end 10.213.<n>.1,
/// default route through the host.
fn make_namespace(lab: &Lab, side: char, n: u8) {
    let (ns, veth) = (lab.ns(side), lab.veth(side));
    let inner = format!("{veth}n");
    ip(&["netns", "add", &ns]);
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", &inner]);
    ip(&["link", "set", &inner, "netns", &ns]);
    ip(&["addr", "add", &format!("10.213.{n}.1/24"), "dev", &veth]);
    ip(&["link", "set", &veth, "up"]);
    ip(&[
        "netns",
        "exec",
        &ns,
        "ip",
        "addr",
        "add",
        &format!("10.213.{n}.2/24"),
        "dev",
        &inner,
    ]);
    ip(&["netns", "exec", &ns, "ip", "link", "set", &inner, "up"]);
    ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
    ip(&[
        "netns",
        "exec",
        &ns,
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("10.213.{n}.1"),
    ]);
}

/// Starts `parley <args>`, kept for clean-up; returns its admin address.
fn start_parley(lab: &mut Lab, args: &[&str]) -> SocketAddr {
    let (child, printed) = parley_tests::tool::start_until_ready(BIN, args);
    lab.children.push(child);
    printed
        .iter()
        .find_map(|l| l.strip_prefix("parley: admin http://"))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("admin address")
}

fn metric(admin: SocketAddr, line_prefix: &str) -> u64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn write_baresip(dir: &Path, n: u8, handle: &str, password: &str, turn_user: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        "poll_method\t\tepoll\n\
         sip_listen\t\t10.213.{n}.2:5060\n\
         audio_source\t\tausine,440\n\
         audio_player\t\tsndfile,x\n\
         audio_alert\t\tsndfile,x\n\
         snd_path\t\t{dir}\n\
         module_path\t\t/usr/lib/baresip/modules\n\
         module\t\t\tuuid.so\n\
         module\t\t\topus.so\n\
         module\t\t\tausine.so\n\
         module\t\t\tsndfile.so\n\
         module\t\t\tice.so\n\
         module\t\t\tstun.so\n\
         module\t\t\tturn.so\n\
         module\t\t\tdtls_srtp.so\n\
         module_app\t\taccount.so\n\
         module_app\t\tmenu.so\n\
         module_app\t\tctrl_tcp.so\n\
         ctrl_tcp_listen\t\t10.213.{n}.2:4444\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("config"), config).unwrap();
    let account = format!(
        "<sip:{handle}@{HOST};transport=udp>;auth_pass={password};medianat=ice;\
         mediaenc=dtls_srtp;stunserver=turn:{HOST}:3478;stunuser={turn_user};\
         stunpass=turn-secret-pw;audio_codecs=opus/48000/2;answermode=auto;regint=600\n"
    );
    std::fs::write(dir.join("accounts"), account).unwrap();
}

/// A ctrl_tcp connection: netstring-framed JSON both ways.
struct Ctrl {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Ctrl {
    fn connect(addr: &str) -> Ctrl {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    return Ctrl {
                        stream,
                        buf: Vec::new(),
                    };
                }
                Err(e) if Instant::now() > deadline => panic!("ctrl_tcp {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn command(&mut self, command: &str, params: &str) {
        let json =
            serde_json::json!({"command": command, "params": params, "token": command}).to_string();
        write!(self.stream, "{}:{json},", json.len()).unwrap();
    }

    /// The next message, or None if none arrived within the read timeout.
    fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            if let Some(colon) = self.buf.iter().position(|b| *b == b':') {
                let n: usize = std::str::from_utf8(&self.buf[..colon]).ok()?.parse().ok()?;
                if self.buf.len() > colon + n {
                    let v = serde_json::from_slice(&self.buf[colon + 1..colon + 1 + n]).ok();
                    self.buf.drain(..colon + n + 2);
                    return v;
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("baresip closed ctrl_tcp"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }
}

fn wait_registered(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("200 OK () [1 binding]") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "baresip did not register:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn two_baresips_call_through_parley_signaling_and_turn_with_dtls_srtp() {
    parley_tests::tool::require("baresip");
    parley_tests::tool::require("ip");
    // SAFETY-free check of the effective user: namespaces need root.
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().nth(1).unwrap_or("1").to_owned())
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test creates network namespaces and must run as root"
    );

    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab {
        tag: format!("{}", std::process::id() % 10_000),
        children: Vec::new(),
    };
    make_namespace(&lab, 'a', 1);
    make_namespace(&lab, 'b', 2);

    let config = tmp.path().join("parley.toml");
    std::fs::write(
        &config,
        format!(
            "[signaling]\ndomains = [\"parley.test\"]\n\
             [[signaling.accounts]]\nhandle = \"{ALICE}\"\npassword = \"alice-password\"\n\
             [[signaling.accounts]]\nhandle = \"{BOB}\"\npassword = \"bob-password\"\n"
        ),
    )
    .unwrap();
    let sip = format!("{HOST}:5060");
    let data_sig = tmp.path().join("sig");
    start_parley(
        &mut lab,
        &[
            "--data",
            data_sig.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
            "signaling",
            "--sip-listen",
            &sip,
            "--sip-tls-listen",
            &format!("{HOST}:5061"),
            "--sip-wss-listen",
            &format!("{HOST}:8445"),
        ],
    );
    let data_turn = tmp.path().join("turn");
    let turn_admin = start_parley(
        &mut lab,
        &[
            "--data",
            data_turn.to_str().unwrap(),
            "--admin",
            "127.0.0.1:0",
            "turn",
            "--listen",
            &format!("{HOST}:3478"),
            "--tls-listen",
            &format!("{HOST}:5349"),
            "--relay-ip",
            HOST,
            "--allow-peer",
            "10.213.0.0/16",
            "--user",
            "alice:turn-secret-pw",
            "--user",
            "bob:turn-secret-pw",
        ],
    );

    let dirs: Vec<PathBuf> = ['a', 'b']
        .iter()
        .map(|s| tmp.path().join(format!("baresip-{s}")))
        .collect();
    write_baresip(&dirs[0], 1, ALICE, "alice-password", "alice");
    write_baresip(&dirs[1], 2, BOB, "bob-password", "bob");
    for (i, side) in ['a', 'b'].into_iter().enumerate() {
        let log = std::fs::File::create(dirs[i].join("out.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(side), "baresip", "-f"])
            .arg(&dirs[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn baresip");
        lab.children.push(child);
    }
    for d in &dirs {
        wait_registered(&d.join("out.log"));
    }

    let mut alice = Ctrl::connect("10.213.1.2:4444");
    let mut bob = Ctrl::connect("10.213.2.2:4444");
    alice.command("dial", &format!("sip:{BOB}@{HOST}"));
    // Both sides must see the call established, secured by DTLS-SRTP and
    // carrying RTP.
    let want = ["CALL_ESTABLISHED", "CALL_MENC", "CALL_RTPESTAB"];
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !seen
            .iter()
            .all(|s| want.iter().all(|w| s.iter().any(|x| x == w)))
    {
        for (i, c) in [&mut alice, &mut bob].into_iter().enumerate() {
            if let Some(v) = c.next() {
                if let Some(t) = v["type"].as_str() {
                    assert_ne!(t, "CALL_CLOSED", "call closed: {v}");
                    seen[i].push(t.to_owned());
                }
            }
        }
    }
    for (i, who) in ["caller", "callee"].iter().enumerate() {
        for w in want {
            assert!(
                seen[i].iter().any(|x| x == w),
                "{who} never saw {w}; events {:?}\n{}",
                seen[i],
                std::fs::read_to_string(dirs[i].join("out.log")).unwrap_or_default()
            );
        }
    }
    let log = std::fs::read_to_string(dirs[0].join("out.log")).unwrap();
    assert!(log.contains("DTLS-SRTP complete"), "{log}");

    // Media flowed through the relay, both ways.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut to_peer, mut to_client) = (0, 0);
    while Instant::now() < deadline && (to_peer < 100 || to_client < 100) {
        to_peer = metric(
            turn_admin,
            "parley_turn_relayed_packets_total{direction=\"to_peer\"}",
        );
        to_client = metric(
            turn_admin,
            "parley_turn_relayed_packets_total{direction=\"to_client\"}",
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        to_peer >= 100 && to_client >= 100,
        "relayed {to_peer} to peers and {to_client} to clients"
    );

    alice.command("hangup", "");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut closed = false;
    while Instant::now() < deadline && !closed {
        if let Some(v) = bob.next() {
            closed = v["type"] == "CALL_CLOSED";
        }
    }
    assert!(closed, "the callee saw the BYE");
}

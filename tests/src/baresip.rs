//! baresip (Debian `baresip-core` 1.0) as a test peer: network namespaces
//! to run it in, its configuration, and its ctrl_tcp control channel.
//!
//! baresip 1.0 does not gather host candidates on loopback, so each
//! instance runs in a network namespace the test creates, joined to the
//! host by a veth pair: namespace `side` numbered `n` has 10.213.n.2, the
//! host end 10.213.n.1, and its default route goes through the host. The
//! host does not forward, so namespaces cannot reach each other directly.
//! Needs root (namespaces) and `ip` from iproute2.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Namespaces, links and processes a test made; removed on drop.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    sides: Vec<char>,
    children: Vec<Child>,
}

impl Lab {
    /// Checks what the lab needs (root, `ip`, `baresip`) and starts an
    /// empty one. Tests in one process give their namespaces distinct
    /// sides and numbers.
    pub fn open() -> Lab {
        crate::tool::require("baresip");
        crate::tool::require("ip");
        let uid = std::fs::read_to_string("/proc/self/status")
            .expect("read /proc/self/status")
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
        Lab {
            tag: format!("{}", std::process::id() % 10_000),
            sides: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn ns(&self, side: char) -> String {
        format!("plb{}{side}", self.tag)
    }

    fn veth(&self, side: char) -> String {
        format!("vb{}{side}", self.tag)
    }

    /// Adds namespace `side` as 10.213.`n`.2 behind the host's 10.213.`n`.1.
    pub fn add_namespace(&mut self, side: char, n: u8) {
        let (ns, veth) = (self.ns(side), self.veth(side));
        let inner = format!("{veth}n");
        self.sides.push(side);
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["addr", "add", &format!("10.213.{n}.1/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("10.213.{n}.2/24"), "dev", &inner]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["link", "set", "lo", "up"]);
        inside(&["route", "add", "default", "via", &format!("10.213.{n}.1")]);
    }

    /// Keeps `child` to be killed when the lab goes.
    pub fn keep(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Starts baresip with the configuration in `dir` inside namespace
    /// `side`; its output goes to `dir/out.log`.
    pub fn baresip(&mut self, side: char, dir: &Path) {
        let log = std::fs::File::create(dir.join("out.log")).expect("create out.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(side), "baresip", "-f"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("spawn baresip");
        self.keep(child);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for &side in &self.sides {
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

/// One baresip account.
#[derive(Debug)]
pub struct Account<'a> {
    /// The handle, registered at `registrar` (`host:port`, UDP).
    pub handle: &'a str,
    pub password: &'a str,
    pub registrar: &'a str,
    /// The relay (`host:port`) and its static user; password `turn-pw`.
    pub turn: &'a str,
    pub turn_user: &'a str,
    /// RTP and RTCP on one port (`rtcp_mux yes`), as the SDK requires.
    /// Off by default in baresip 1.0; two baresips calling each other with
    /// it on sometimes never finish DTLS after the caller's re-INVITE, so
    /// they run without it.
    pub rtcp_mux: bool,
}

/// The password of every baresip's relay user.
pub const TURN_PASSWORD: &str = "turn-pw";

/// Writes a headless baresip configuration into `dir` for the instance at
/// 10.213.`n`.2: SIP on 5060, ctrl_tcp on 4444, a 440 Hz sine as its
/// microphone, Opus, ICE through the relay, DTLS-SRTP, auto answer. What it sends and hears is written as WAV
/// files into `dir` (the sndfile filter, see [`heard_wav`]).
pub fn configure(dir: &Path, n: u8, account: &Account) {
    std::fs::create_dir_all(dir).expect("create the baresip directory");
    let config = format!(
        "poll_method\t\tepoll\n\
         sip_listen\t\t10.213.{n}.2:5060\n\
         audio_source\t\tausine,440\n\
         audio_player\t\tsndfile,x\n\
         audio_alert\t\tsndfile,x\n\
         snd_path\t\t{dir}\n\
         rtcp_mux\t\t{rtcp_mux}\n\
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
        dir = dir.display(),
        rtcp_mux = if account.rtcp_mux { "yes" } else { "no" },
    );
    std::fs::write(dir.join("config"), config).expect("write the baresip config");
    let line = format!(
        "<sip:{handle}@{registrar};transport=udp>;auth_pass={password};medianat=ice;\
         mediaenc=dtls_srtp;stunserver=turn:{turn};stunuser={turn_user};\
         stunpass={TURN_PASSWORD};audio_codecs=opus/48000/2;answermode=auto;regint=600\n",
        handle = account.handle,
        registrar = account.registrar,
        password = account.password,
        turn = account.turn,
        turn_user = account.turn_user,
    );
    std::fs::write(dir.join("accounts"), line).expect("write the baresip accounts");
}

/// Waits (bounded) until the baresip logging to `log` has registered.
pub fn wait_registered(log: &Path) {
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

/// The WAV file the sndfile filter wrote of what baresip decoded (what
/// it heard from the far end), if any.
pub fn heard_wav(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dump") && n.ends_with("-dec.wav"))
        })
}

/// A ctrl_tcp connection: netstring-framed JSON both ways.
#[derive(Debug)]
pub struct Ctrl {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Ctrl {
    /// Connects (retrying for up to 10 s while baresip starts).
    pub fn connect(addr: &str) -> Ctrl {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .expect("set a read timeout");
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

    pub fn command(&mut self, command: &str, params: &str) {
        let json =
            serde_json::json!({"command": command, "params": params, "token": command}).to_string();
        write!(self.stream, "{}:{json},", json.len()).expect("write to ctrl_tcp");
    }

    /// The next message, or None if none arrived within the read timeout.
    pub fn next_message(&mut self) -> Option<serde_json::Value> {
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

    /// The types of the events that arrive within `wait`, until one of
    /// `until` (returned last) or the time is up.
    pub fn events_until(&mut self, until: &[&str], wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(t) = self
                .next_message()
                .and_then(|v| v["type"].as_str().map(str::to_owned))
            {
                let done = until.contains(&t.as_str());
                seen.push(t);
                if done {
                    break;
                }
            }
        }
        seen
    }
}

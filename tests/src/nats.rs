//! A throwaway NATS server for one test: Debian's `nats-server` on
//! 127.0.0.1 on a free port, killed on drop. scripts/install-deps.sh
//! installs it; a missing server fails the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Nats {
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    /// A user and password clients must give.
    login: Option<(String, String)>,
}

impl Nats {
    /// Starts a server and waits (bounded) until it accepts connections.
    pub fn start(name: &str) -> Nats {
        Nats::start_as(name, None)
    }

    /// As [`Nats::start`], admitting only `user` with `password`.
    pub fn start_with_password(name: &str, user: &str, password: &str) -> Nats {
        Nats::start_as(name, Some((user.to_owned(), password.to_owned())))
    }

    fn start_as(name: &str, login: Option<(String, String)>) -> Nats {
        let log =
            std::env::temp_dir().join(format!("parley-nats-{name}-{}.log", std::process::id()));
        let mut nats = Nats {
            bin: server_bin(),
            port: crate::tool::free_port(),
            log,
            child: None,
            login,
        };
        nats.start_again();
        nats
    }

    /// Starts the server again after [`Nats::stop`], on the same port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "NATS is running");
        let log = std::fs::File::create(&self.log).expect("create NATS log");
        let mut args = vec![
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
        ];
        if let Some((u, p)) = &self.login {
            args.extend([
                "--user".to_owned(),
                u.clone(),
                "--pass".to_owned(),
                p.clone(),
            ]);
        }
        let child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within 10 s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `nats-server` from PATH or Debian's /usr/sbin (not on a user's PATH).
fn server_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`nats-server` is not installed; run scripts/install-deps.sh (Debian package nats-server)")
        })
}

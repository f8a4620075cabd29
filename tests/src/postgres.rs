//! A throwaway PostgreSQL server for one test: `initdb` into a temporary
//! directory, listening on 127.0.0.1 on a free port, trust authentication,
//! stopped and deleted on drop. Needs Debian's `postgresql` package
//! (scripts/install-deps.sh installs it); a missing server fails the test.
//!
//! PostgreSQL refuses to run as root, so under root the server runs as the
//! `postgres` system user through `runuser`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::tool::require;

#[derive(Debug)]
pub struct Postgres {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

impl Postgres {
    /// Starts a server; `name` keeps temporary directories apart.
    pub fn start(name: &str) -> Postgres {
        let bin = server_bin();
        let root = std::env::temp_dir().join(format!("parley-pg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create postgres temp dir");
        let as_root = is_root();
        if as_root {
            require("runuser");
            let ok = Command::new("chown")
                .args(["postgres:", root.to_str().expect("utf8 path")])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "cannot hand {} to the postgres user", root.display());
        }
        let pg = Postgres {
            port: crate::tool::free_port(),
            root,
            bin,
            as_root,
        };
        let data = pg.root.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-U",
                "parley",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.start_again();
        pg
    }

    /// Starts the server again after [`Postgres::stop`] (same port, same
    /// data).
    pub fn start_again(&self) {
        let data = self.root.join("data");
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -F",
            self.port,
            self.root.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-o",
                &opts,
                "-l",
                self.root.join("log").to_str().expect("utf8"),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&self) {
        let data = self.root.join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ],
        );
    }

    /// `postgres://parley@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://parley@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}\nserver log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.root.join("data");
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args([
                "-D",
                data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "-w",
                "-t",
                "10",
                "stop",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
fn server_bin() -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!("PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/initdb); run scripts/install-deps.sh")
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

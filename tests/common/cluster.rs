//! Servers of a test's own, so that it may stop and restart them without disturbing the
//! shared ones other tests use: a Postgres cluster (pg_ctl) and a Redis server, each on a
//! free port, stopped and deleted on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub use super::cli::free_port;

/// A Postgres cluster of our own on a free port.
pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// `password`: `Some` for scram-sha-256 logins, `None` for trust (like the shared
    /// server). `settings`: `name=value` server settings.
    pub fn start(password: Option<&str>, settings: &[&str]) -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres server binaries in /usr/lib/postgresql (run scripts/setup.sh)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("kausal-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        let mut initdb = vec![
            bin.join("initdb").to_str().unwrap().to_string(),
            "-D".into(),
            data.to_str().unwrap().into(),
            "-U".into(),
            "postgres".into(),
        ];
        match password {
            Some(pw) => {
                let pwfile = dir.join("pw");
                std::fs::write(&pwfile, pw).unwrap();
                initdb.extend([
                    "-A".into(),
                    "scram-sha-256".into(),
                    "--pwfile".into(),
                    pwfile.to_str().unwrap().into(),
                ]);
            }
            None => initdb.extend(["-A".into(), "trust".into()]),
        }
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        let cluster = Cluster { dir, bin, port };
        cluster.as_postgres(&initdb.iter().map(String::as_str).collect::<Vec<_>>());
        let mut opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            cluster.dir.display()
        );
        for s in settings {
            opts += &format!(" -c {s}");
        }
        cluster.pg_ctl(&[
            "-o",
            &opts,
            "-l",
            cluster.dir.join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        cluster
    }

    /// A logical-replication source or a store: wal_level=logical, trust logins.
    pub fn logical() -> Cluster {
        Cluster::start(
            None,
            &[
                "wal_level=logical",
                "max_replication_slots=10",
                "max_wal_senders=10",
                "fsync=off",
            ],
        )
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `pg_ctl restart -m <mode>` (`fast`: clients disconnected, clean shutdown;
    /// `immediate`: no shutdown checkpoint, crash recovery at start). The server keeps
    /// the options it was started with.
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["-m", mode, "-w", "-t", "120", "restart"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let mut all = vec![pg_ctl.to_str().unwrap(), "-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        self.as_postgres(&all);
    }

    fn as_postgres(&self, args: &[&str]) {
        let status = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("runuser");
        assert!(status.success(), "{args:?}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server of our own on a free port, without persistence: a restart is a flush.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port, empty, and waits until it answers.
    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/setup.sh)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {}", self.port);
    }

    /// `kill -9`: every key is gone with it.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
    }
}

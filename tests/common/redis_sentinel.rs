//! Redis with Sentinel on this machine for one test: a primary, a replica and three
//! sentinels (Debian's `redis-server`, `--sentinel` mode), each on its own port, killed
//! when dropped.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "kausal";

pub struct Sentinel {
    dir: std::path::PathBuf,
    pub primary_port: u16,
    pub replica_port: u16,
    pub sentinel_ports: Vec<u16>,
    primary: Option<Child>,
    others: Vec<Child>,
}

fn redis(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Sentinel {
    /// Starts the primary, its replica and three sentinels (quorum 2, the primary
    /// judged down after 1 s), and waits until the sentinels know the replica.
    pub fn start() -> Sentinel {
        let id = std::process::id();
        let base = 26_000 + (id % 300) as u16 * 10;
        let dir = std::env::temp_dir().join(format!("kausal-sentinel-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (primary_port, replica_port) = (base + 1, base + 2);
        let sentinel_ports: Vec<u16> = (3..6).map(|i| base + i).collect();
        let common = |port: u16| {
            vec![
                "--port".to_string(),
                port.to_string(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--dbfilename".into(),
                format!("{port}.rdb"),
            ]
        };
        let primary = redis(&common(primary_port));
        let mut replica_args = common(replica_port);
        replica_args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary_port.to_string(),
        ]);
        let mut others = vec![redis(&replica_args)];
        for port in &sentinel_ports {
            let conf = dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            others.push(redis(&[conf.display().to_string(), "--sentinel".into()]));
        }
        let s = Sentinel {
            dir,
            primary_port,
            replica_port,
            sentinel_ports,
            primary: Some(primary),
            others,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.sentinel_ports.iter().any(|p| {
            !cli(*p, &["SENTINEL", "replicas", MASTER]).contains(&replica_port.to_string())
                || cli(*p, &["SENTINEL", "sentinels", MASTER])
                    .matches("127.0.0.1")
                    .count()
                    < 2
        }) {
            assert!(
                Instant::now() < deadline,
                "the sentinels never saw the replica and each other"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    /// `redis+sentinel://` URL of the three sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The port of the node the sentinels name master.
    pub fn master_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinel_ports[0],
            &["SENTINEL", "get-master-addr-by-name", MASTER],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// `kill -9` of the primary.
    pub fn kill_primary(&mut self) {
        if let Some(mut p) = self.primary.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill_primary();
        for c in &mut self.others {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

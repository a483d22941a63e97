//! A RabbitMQ cluster of three nodes on this machine for one test: each node with its
//! own name, AMQP and distribution ports and data directory, started from the Debian
//! package's scripts, joined to the first, stopped and removed when dropped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = "/usr/lib/rabbitmq/bin";
/// The nodes' own Erlang cookie (the CLI is given it on every call).
const COOKIE: &str = "KAUSALTESTCLUSTERCOOKIE";

pub struct RabbitCluster {
    dir: PathBuf,
    pub nodes: Vec<Node>,
}

pub struct Node {
    pub name: String,
    pub amqp_port: u16,
    dist_port: u16,
}

impl Node {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }
}

impl RabbitCluster {
    /// Starts three nodes and clusters them. Ports below the ephemeral range, chosen by
    /// this process's id.
    pub fn start(label: &str) -> RabbitCluster {
        let id = std::process::id();
        let base = 31_000 + (id % 300) as u16 * 10;
        let dir = std::env::temp_dir().join(format!("kausal-rabbit-{label}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plugins"), "[].").unwrap();
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, COOKIE).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)).unwrap();
        let nodes: Vec<Node> = (1..=3u16)
            .map(|i| Node {
                name: format!("kt{label}{id}n{i}@localhost"),
                amqp_port: base + i,
                dist_port: base + 3 + i,
            })
            .collect();
        let cluster = RabbitCluster { dir, nodes };
        for node in &cluster.nodes {
            cluster.launch(node);
        }
        for node in &cluster.nodes {
            cluster.await_startup(node);
        }
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"]);
            cluster.ctl(node, &["join_cluster", &first]);
            cluster.ctl(node, &["start_app"]);
        }
        cluster
    }

    fn launch(&self, node: &Node) {
        let home = &self.dir;
        let data = home.join(&node.name);
        let status = Command::new(format!("{BIN}/rabbitmq-server"))
            .arg("-detached")
            .env("HOME", home)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", data.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", data.join("log"))
            .env("RABBITMQ_PID_FILE", data.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", home.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", home.join("none"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                home.join("none-advanced.config"),
            )
            .status()
            .expect("start rabbitmq-server");
        assert!(status.success(), "rabbitmq-server {}: {status}", node.name);
    }

    /// Waits for a node launched detached: until it has registered, the CLI cannot
    /// reach it at all, and `await_startup` fails at once.
    fn await_startup(&self, node: &Node) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            match self.try_ctl(node, &["await_startup", "--timeout", "60"]) {
                Ok(_) => return,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
            }
        }
    }

    /// `rabbitmqctl -n <node> <args>`; its output. Panics when it fails.
    pub fn ctl(&self, node: &Node, args: &[&str]) -> String {
        self.try_ctl(node, args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_ctl(&self, node: &Node, args: &[&str]) -> Result<String, String> {
        let out = Command::new(format!("{BIN}/rabbitmqctl"))
            .args(["--erlang-cookie", COOKIE, "-n", &node.name])
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .expect("run rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl {args:?} on {}: {text} {}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Every node's URL, comma-separated (the `broker.url` of a cluster).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that leads quorum queue `queue` (asked of `via`).
    pub fn leader(&self, via: &Node, queue: &str) -> Option<usize> {
        let out = self.ctl(
            via,
            &[
                "list_queues",
                "name",
                "leader",
                "--quiet",
                "--no-table-headers",
            ],
        );
        let leader = out.lines().find_map(|l| {
            let (name, leader) = l.split_once('\t')?;
            (name == queue).then(|| leader.trim().to_string())
        })?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// Stops node `i` (its Erlang VM too), as losing a machine would.
    pub fn stop(&self, i: usize) {
        self.ctl(&self.nodes[i], &["stop"]);
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = Command::new(format!("{BIN}/rabbitmqctl"))
                .args(["--erlang-cookie", COOKIE, "-n", &node.name, "stop"])
                .env("HOME", &self.dir)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! `kausal tail`: prints a publisher's envelopes as they arrive, from a temporary,
//! exclusive, auto-deleted queue.

use kausal::bus::amqp::{AmqpConsumer, QueueSpec};
use kausal::bus::{decode, Envelope};
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct TailArgs {
    /// Broker URL.
    #[arg(
        long,
        env = "KAUSAL_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub broker: String,
    #[arg(long, default_value = kausal::bus::amqp::DEFAULT_EXCHANGE)]
    pub exchange: String,
    /// Publisher namespace to follow.
    #[arg(long)]
    pub namespace: String,
    /// Only changes of this (published) table.
    #[arg(long)]
    pub table: Option<String>,
    /// Only changes whose row has COLUMN equal to VALUE (e.g. `--where user_id=42`);
    /// repeat to require several. Compared as text.
    #[arg(long = "where", value_name = "COLUMN=VALUE", value_parser = parse_filter)]
    pub filters: Vec<(String, String)>,
    /// One JSON envelope per line instead of the human format.
    #[arg(long)]
    pub json: bool,
    /// Only count: one line per second with the messages and bytes received, nothing
    /// decoded (a throughput probe that costs the broker's delivery and little else).
    #[arg(long, conflicts_with_all = ["json", "table", "filters"])]
    pub count: bool,
}

fn parse_filter(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((c, v)) if !c.is_empty() => Ok((c.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: write it as COLUMN=VALUE")),
    }
}

/// Whether a change passes `--table` and every `--where`.
fn wanted(c: &kausal::bus::Change, args: &TailArgs) -> bool {
    if args.table.as_ref().is_some_and(|t| t != &c.table) {
        return false;
    }
    let row = c.new.as_ref().or(c.old.as_ref()).unwrap_or(&c.key);
    args.filters.iter().all(|(column, value)| {
        let found = row.get(column).or_else(|| c.key.get(column));
        match found {
            Some(serde_json::Value::String(s)) => s == value,
            Some(serde_json::Value::Null) => value == "null",
            Some(other) => value.as_str() == other.to_string().as_str(),
            None => false,
        }
    })
}

pub async fn run(args: TailArgs, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let spec = QueueSpec {
        name: format!("kausal.tail.{}.{}", args.namespace, std::process::id()),
        namespaces: vec![args.namespace.clone()],
        prefetch: 512,
        temporary: true,
        message_ttl_ms: None,
        expires_ms: None,
        partition: None,
        quorum: false,
    };
    let mut consumer = AmqpConsumer::connect(&args.broker, &args.exchange, &spec).await?;
    eprintln!("following namespace {:?} (Ctrl-C to stop)", args.namespace);
    let mut tally = Tally::default();
    let mut second = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let delivery = tokio::select! {
            _ = shutdown.changed() => break,
            _ = second.tick(), if args.count => {
                tally.print();
                continue;
            }
            d = consumer.next() => match d { Some(d) => d?, None => break },
        };
        if args.count {
            tally.messages += 1;
            tally.bytes += delivery.body.len() as u64;
            delivery.ack().await?;
            continue;
        }
        match decode(&delivery.body) {
            Ok(envelopes) => {
                for e in envelopes {
                    print_envelope(&e, &args);
                }
            }
            Err(error) => eprintln!("undecodable message: {error}"),
        }
        delivery.ack().await?;
    }
    consumer.close().await;
    Ok(())
}

/// What `--count` has received: in all, and at the last print.
#[derive(Default)]
struct Tally {
    messages: u64,
    bytes: u64,
    printed: (u64, u64),
}

impl Tally {
    fn print(&mut self) {
        let (m, b) = self.printed;
        println!(
            "{} messages/s, {} bytes/s ({} messages, {} bytes in all)",
            self.messages - m,
            self.bytes - b,
            self.messages,
            self.bytes
        );
        self.printed = (self.messages, self.bytes);
    }
}

fn print_envelope(e: &Envelope, args: &TailArgs) {
    let filtering = args.table.is_some() || !args.filters.is_empty();
    if filtering && !e.changes.iter().any(|c| wanted(c, args)) {
        return;
    }
    if args.json {
        if filtering {
            // Only the matching changes: what the filter asked for, nothing more.
            let mut shown = e.clone();
            shown.changes.retain(|c| wanted(c, args));
            println!("{}", serde_json::to_string(&shown).unwrap_or_default());
        } else {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        }
        return;
    }
    let part = match e.parts {
        Some(1) => String::new(),
        Some(n) => format!(" part {}/{}", e.part + 1, n),
        None => format!(" part {}", e.part + 1),
    };
    let mut who = String::new();
    if let Some(u) = &e.context.user {
        who += &format!(" user={u}");
    }
    if !e.context.sessions.is_empty() {
        who += &format!(" session={}", e.context.sessions.join(","));
    }
    println!(
        "#{} {}{} txid={} {} deps={}{}",
        e.seq,
        e.namespace,
        part,
        e.txid,
        e.position,
        e.deps.len(),
        who
    );
    for c in &e.changes {
        if !wanted(c, args) {
            continue;
        }
        let row = c.new.as_ref().or(c.old.as_ref()).unwrap_or(&c.key);
        println!(
            "  {:?} {} {}",
            c.op,
            c.table,
            serde_json::to_string(row).unwrap_or_default()
        );
    }
}

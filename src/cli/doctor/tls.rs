//! `kausal doctor`'s encryption check: what each configured connection's URL asks for.

use super::Findings;
use kausal::bus::tls::{is_local_host, protection, Protection};

/// Whether the connection is encrypted and the server verified; plaintext is a warning
/// when it crosses a network, a server on this host is fine without.
pub(super) fn encryption(check: &str, url: &str, f: &mut Findings) {
    let check = format!("{check} TLS");
    let shown = kausal::bus::amqp::redact_url(url);
    let fix = match url.split("://").next().unwrap_or("") {
        "postgres" | "postgresql" => "add sslmode=verify-full&sslrootcert=<CA file> to the URL",
        "mysql" | "mariadb" => "add ssl-mode=VERIFY_IDENTITY&ssl-ca=<CA file> to the URL",
        "amqp" | "amqps" => "use amqps://host:5671/…?cacertfile=<CA file>",
        "redis" | "rediss" => "use rediss://host:6380?cacert=<CA file>",
        _ => "add tls=true&tlsCAFile=<CA file> to the URL",
    };
    match protection(url) {
        Protection::Verified => f.ok(&check, "encrypted, server certificate and name checked"),
        Protection::Local => {}
        Protection::Unverified => f.warn(
            &check,
            format!("{shown}: encrypted, but the server's certificate is not fully checked"),
            fix,
        ),
        Protection::Plaintext if is_local_host(url) => {
            f.ok(&check, "not encrypted (a server on this host)")
        }
        Protection::Plaintext => f.warn(
            &check,
            format!("{shown}: not encrypted: what it carries crosses the network readable"),
            fix,
        ),
    }
}

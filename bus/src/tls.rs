//! TLS settings shared by every connection Kausal opens (source database, broker, Redis,
//! stores).
//!
//! Each server keeps the URL conventions its users know: Postgres `sslmode` +
//! `sslrootcert`, MySQL `ssl-mode` + `ssl-ca`, RabbitMQ `amqps://…?cacertfile=`, Redis
//! `rediss://…?cacert=`, MongoDB `tls=true&tlsCAFile=`. What this module adds is the part
//! they have in common:
//!
//! - one crypto provider for the whole process (ring: the build holds both ring and
//!   aws-lc-rs through its dependencies, and rustls refuses to guess between them);
//! - reading a CA file with an error that names the file and the URL parameter;
//! - taking Kausal's own parameters off a URL before the client library parses it;
//! - **no silent fallback to plaintext**: modes that may quietly connect unencrypted
//!   (`prefer`, `allow`, `PREFERRED`) are refused with the modes to use instead;
//! - a hint for the two certificate problems people hit (wrong CA, wrong host name).

use std::path::{Path, PathBuf};

/// Makes ring the process's rustls crypto provider. Cheap and idempotent: call it before
/// building any TLS client (some client libraries ask rustls for the process default).
pub fn install_crypto_provider() {
    // Err means a provider is already installed (by us or by the host program): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A problem with the TLS settings of a URL, found before connecting.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingsError {
    #[error(
        "{param}={value} may connect without encryption when the server offers none, and \
         Kausal never falls back to plaintext silently: use {instead}"
    )]
    MayFallBack {
        param: &'static str,
        value: String,
        instead: &'static str,
    },
    #[error("{param}={value} is not a TLS mode Kausal knows: use one of {known}")]
    UnknownMode {
        param: &'static str,
        value: String,
        known: &'static str,
    },
    #[error(
        "cannot read the CA file {} named by {param}: {source}; point {param} at the PEM file \
         of the CA that signed the server's certificate",
        path.display()
    )]
    CaFile {
        param: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the CA file {} named by {param} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NoCertificate { param: &'static str, path: PathBuf },
    #[error("{param} is set but the URL does not ask for TLS: {fix}")]
    CaWithoutTls {
        param: &'static str,
        fix: &'static str,
    },
}

/// Reads a PEM CA file, checking that it holds at least one certificate.
pub fn read_ca_file(param: &'static str, path: &Path) -> Result<String, TlsSettingsError> {
    let pem = std::fs::read_to_string(path).map_err(|source| TlsSettingsError::CaFile {
        param,
        path: path.to_path_buf(),
        source,
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsSettingsError::NoCertificate {
            param,
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// Takes the query parameters named in `keys` off `url`; returns the URL without them and
/// the values taken (percent-decoded), in the order of `keys` (`None` when absent; the
/// last one wins when a key repeats).
pub fn take_params(url: &str, keys: &[&str]) -> (String, Vec<Option<String>>) {
    let mut taken = vec![None; keys.len()];
    let (head, fragment) = match url.split_once('#') {
        Some((h, f)) => (h, Some(f)),
        None => (url, None),
    };
    let Some((base, query)) = head.split_once('?') else {
        return (url.to_string(), taken);
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match keys.iter().position(|key| *key == k) {
            Some(i) => taken[i] = Some(percent_decode(v)),
            None => kept.push(pair),
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (out, taken)
}

/// Adds `key=value` to a URL's query.
pub fn add_param(url: &str, key: &str, value: &str) -> String {
    let (head, fragment) = match url.split_once('#') {
        Some((h, f)) => (h.to_string(), Some(f)),
        None => (url.to_string(), None),
    };
    let sep = if head.contains('?') { '&' } else { '?' };
    let mut out = format!("{head}{sep}{key}={value}");
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a TLS failure most likely means and how to fix it, read from the error's text
/// (rustls names the certificate problem in it). `None` when the error is not about a
/// certificate.
pub fn hint(error_text: &str) -> Option<&'static str> {
    let t = error_text;
    if t.contains("NotValidForName") || t.contains("not valid for name") {
        Some(
            "the server's certificate is not valid for the host name in the URL: connect by a \
             name the certificate holds (its subjectAltName), or fix the certificate",
        )
    } else if t.contains("UnknownIssuer")
        || t.contains("unknown issuer")
        || t.contains("BadSignature")
    {
        Some(
            "the server's certificate is not signed by the CA in the configured CA file: point \
             the URL's CA parameter (sslrootcert, ssl-ca, cacertfile, cacert, tlsCAFile) at the \
             CA that signed it",
        )
    } else if t.contains("Expired") || t.contains("NotValidYet") {
        Some("the server's certificate is expired or not yet valid: renew it, check the clocks")
    } else if t.contains("InvalidCertificate")
        || t.contains("invalid peer certificate")
        || t.contains("certificate verify failed")
    {
        Some("the server's certificate was refused: check the CA file and the host name")
    } else if t.contains("InvalidContentType")
        || t.contains("CorruptMessage")
        || t.contains("received corrupt message")
    {
        Some("the server did not answer with TLS at this address: is this its TLS port?")
    } else {
        None
    }
}

/// The error's text with its sources, and the hint when there is one.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let text = crate::error::chain(error);
    match hint(&text) {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

/// How much TLS a connection asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// Encrypted; the server's certificate is not checked.
    Require,
    /// Encrypted; the certificate must chain to the CA file, any host name.
    VerifyCa,
    /// Encrypted; the certificate must chain to the CA file and name the host.
    VerifyFull,
}

/// The TLS mode and CA file of one database URL.
#[derive(Debug, Clone)]
pub struct UrlTls {
    pub mode: TlsMode,
    pub ca_file: Option<PathBuf>,
    /// The URL parameter that named the CA file, for messages.
    pub ca_param: &'static str,
}

impl UrlTls {
    /// Takes `sslmode` / `sslrootcert` off a Postgres URL.
    pub fn take_postgres(url: &str) -> Result<(String, UrlTls), TlsSettingsError> {
        let (rest, mut taken) = take_params(url, &["sslmode", "sslrootcert"]);
        let ca_file = taken[1].take().map(PathBuf::from);
        let mode = match taken[0].as_deref() {
            None | Some("disable") => TlsMode::Disable,
            // libpq: `require` with a root certificate file verifies the chain.
            Some("require") if ca_file.is_some() => TlsMode::VerifyCa,
            Some("require") => TlsMode::Require,
            Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(v @ ("prefer" | "allow")) => {
                return Err(TlsSettingsError::MayFallBack {
                    param: "sslmode",
                    value: v.to_string(),
                    instead: "sslmode=verify-full&sslrootcert=<CA file> (or require, or disable)",
                })
            }
            Some(v) => {
                return Err(TlsSettingsError::UnknownMode {
                    param: "sslmode",
                    value: v.to_string(),
                    known: "disable, require, verify-ca, verify-full",
                })
            }
        };
        let tls = UrlTls {
            mode,
            ca_file,
            ca_param: "sslrootcert",
        };
        tls.check("sslmode=verify-full")?;
        Ok((rest, tls))
    }

    /// Takes `ssl-mode` / `ssl-ca` off a MySQL/MariaDB URL (also `sslmode` / `sslca`, the
    /// spellings some drivers use).
    pub fn take_mysql(url: &str) -> Result<(String, UrlTls), TlsSettingsError> {
        let (rest, mut taken) = take_params(url, &["ssl-mode", "ssl-ca", "sslmode", "sslca"]);
        let mode_text = taken[0].take().or(taken[2].take());
        let ca_file = taken[1].take().or(taken[3].take()).map(PathBuf::from);
        let mode = match mode_text.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("DISABLED") => TlsMode::Disable,
            Some("REQUIRED") => TlsMode::Require,
            Some("VERIFY_CA") => TlsMode::VerifyCa,
            Some("VERIFY_IDENTITY") => TlsMode::VerifyFull,
            Some("PREFERRED") => {
                return Err(TlsSettingsError::MayFallBack {
                    param: "ssl-mode",
                    value: mode_text.unwrap_or_default(),
                    instead: "ssl-mode=VERIFY_IDENTITY&ssl-ca=<CA file> (or REQUIRED, or DISABLED)",
                })
            }
            Some(_) => {
                return Err(TlsSettingsError::UnknownMode {
                    param: "ssl-mode",
                    value: mode_text.unwrap_or_default(),
                    known: "DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY",
                })
            }
        };
        let tls = UrlTls {
            mode,
            ca_file,
            ca_param: "ssl-ca",
        };
        tls.check("ssl-mode=VERIFY_IDENTITY")?;
        Ok((rest, tls))
    }

    fn check(&self, tls_mode: &'static str) -> Result<(), TlsSettingsError> {
        match (&self.ca_file, self.mode) {
            (Some(_), TlsMode::Disable) => Err(TlsSettingsError::CaWithoutTls {
                param: self.ca_param,
                fix: match tls_mode {
                    "sslmode=verify-full" => "add sslmode=verify-full",
                    _ => "add ssl-mode=VERIFY_IDENTITY",
                },
            }),
            (Some(path), _) => read_ca_file(self.ca_param, path).map(|_| ()),
            // Verifying needs a CA, as in libpq: no silent use of some other trust store.
            (None, TlsMode::VerifyCa | TlsMode::VerifyFull) => Err(TlsSettingsError::CaFile {
                param: self.ca_param,
                path: PathBuf::from("<not set>"),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "verifying the server needs the CA file",
                ),
            }),
            _ => Ok(()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.mode != TlsMode::Disable
    }

    /// `rest` (the URL without its TLS parameters) with the mode written out in libpq's
    /// names, for drivers that read them (sqlx): the mode is always explicit, so a
    /// driver's own default (`prefer`) never applies.
    pub fn postgres_url(&self, rest: &str) -> String {
        let mode = match self.mode {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        };
        self.with_ca(add_param(rest, "sslmode", mode), "sslrootcert")
    }

    /// The same in the mysql client's names (`ssl-mode`, `ssl-ca`).
    pub fn mysql_url(&self, rest: &str) -> String {
        let mode = match self.mode {
            TlsMode::Disable => "DISABLED",
            TlsMode::Require => "REQUIRED",
            TlsMode::VerifyCa => "VERIFY_CA",
            TlsMode::VerifyFull => "VERIFY_IDENTITY",
        };
        self.with_ca(add_param(rest, "ssl-mode", mode), "ssl-ca")
    }

    fn with_ca(&self, url: String, param: &str) -> String {
        match &self.ca_file {
            Some(path) => add_param(&url, param, &path.display().to_string()),
            None => url,
        }
    }
}

/// How a connection is protected, as far as its URL tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Plaintext,
    /// Encrypted, but the server's certificate (or its name) is not checked.
    Unverified,
    /// Encrypted, the certificate checked against a CA and the host name.
    Verified,
    /// Not a network connection (a SQLite file).
    Local,
}

/// The protection a URL asks for (Kausal refuses the modes that may fall back, so what
/// a URL asks for is what it gets).
pub fn protection(url: &str) -> Protection {
    let (_, taken) = take_params(
        url,
        &[
            "sslmode",
            "ssl-mode",
            "sslrootcert",
            "tls",
            "ssl",
            "tlsInsecure",
            "tlsAllowInvalidHostnames",
            "tlsAllowInvalidCertificates",
        ],
    );
    let get = |i: usize| taken[i].as_deref().map(str::to_ascii_lowercase);
    let scheme = url.split("://").next().unwrap_or("").to_ascii_lowercase();
    match scheme.as_str() {
        "sqlite" => Protection::Local,
        "amqps" | "rediss" => {
            if url.contains("#insecure") {
                Protection::Unverified
            } else {
                Protection::Verified
            }
        }
        "postgres" | "postgresql" => match get(0).as_deref() {
            Some("verify-full") => Protection::Verified,
            Some("require" | "verify-ca") => Protection::Unverified,
            _ => Protection::Plaintext,
        },
        "mysql" | "mariadb" => match get(1).as_deref() {
            Some("verify_identity") => Protection::Verified,
            Some("required" | "verify_ca") => Protection::Unverified,
            _ => Protection::Plaintext,
        },
        "mongodb" | "mongodb+srv" => {
            let on = scheme == "mongodb+srv"
                || get(3).as_deref() == Some("true")
                || get(4).as_deref() == Some("true");
            let lax = [5, 6, 7].iter().any(|i| get(*i).as_deref() == Some("true"));
            match (on, lax) {
                (false, _) => Protection::Plaintext,
                (true, true) => Protection::Unverified,
                (true, false) => Protection::Verified,
            }
        }
        _ => Protection::Plaintext,
    }
}

/// Whether a URL's server is on this host (loopback or a Unix socket): plaintext there
/// does not cross a network.
pub fn is_local_host(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return true;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.is_empty()
        || host == "localhost"
        || host == "::1"
        || host.starts_with("127.")
        || host.starts_with('%')
        || host.starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_parameters_come_off_the_url_and_the_rest_stays() {
        let (url, got) = take_params(
            "amqps://u:p@host:5671/%2f?heartbeat=10&cacertfile=%2Fetc%2Fca.pem#frag",
            &["cacertfile", "missing"],
        );
        assert_eq!(url, "amqps://u:p@host:5671/%2f?heartbeat=10#frag");
        assert_eq!(got, vec![Some("/etc/ca.pem".to_string()), None]);
        let (url, got) = take_params("redis://h:6379/0?cacert=/a.pem", &["cacert"]);
        assert_eq!(url, "redis://h:6379/0");
        assert_eq!(got[0].as_deref(), Some("/a.pem"));
        assert_eq!(
            add_param("postgres://h/db", "sslmode", "disable"),
            "postgres://h/db?sslmode=disable"
        );
        assert_eq!(
            add_param("postgres://h/db?x=1", "a", "b"),
            "postgres://h/db?x=1&a=b"
        );
    }

    #[test]
    fn certificate_problems_get_a_hint_naming_the_fix() {
        assert!(hint("invalid peer certificate: NotValidForName")
            .unwrap()
            .contains("host name"));
        assert!(hint("invalid peer certificate: UnknownIssuer")
            .unwrap()
            .contains("CA"));
        assert!(hint("connection refused").is_none());
    }

    #[test]
    fn modes_that_may_fall_back_to_plaintext_are_refused_with_the_fix() {
        let e = UrlTls::take_postgres("postgres://h/db?sslmode=prefer").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
        let e = UrlTls::take_mysql("mysql://h/db?ssl-mode=PREFERRED").unwrap_err();
        assert!(e.to_string().contains("VERIFY_IDENTITY"), "{e}");
        let e = UrlTls::take_postgres("postgres://h/db?sslmode=verify-full").unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
    }

    #[test]
    fn the_mode_comes_off_the_url_and_the_rest_is_left_for_the_driver() {
        let (url, tls) =
            UrlTls::take_postgres("postgres://u@h/db?application_name=x&sslmode=require").unwrap();
        assert_eq!(url, "postgres://u@h/db?application_name=x");
        assert_eq!(tls.mode, TlsMode::Require);
        let (url, tls) = UrlTls::take_mysql("mysql://u@h/db").unwrap();
        assert_eq!(url, "mysql://u@h/db");
        assert_eq!(tls.mode, TlsMode::Disable);
    }

    #[test]
    fn the_protection_a_url_asks_for_is_read_per_server() {
        use Protection::*;
        assert_eq!(
            protection("postgres://h/db?sslmode=verify-full&sslrootcert=/c"),
            Verified
        );
        assert_eq!(protection("postgres://h/db?sslmode=require"), Unverified);
        assert_eq!(protection("postgres://h/db"), Plaintext);
        assert_eq!(
            protection("mysql://h/db?ssl-mode=VERIFY_IDENTITY"),
            Verified
        );
        assert_eq!(protection("amqps://h:5671/%2f"), Verified);
        assert_eq!(protection("amqp://h:5672/%2f"), Plaintext);
        assert_eq!(protection("rediss://h:6380/#insecure"), Unverified);
        assert_eq!(protection("mongodb://h/?tls=true"), Verified);
        assert_eq!(
            protection("mongodb://h/?tls=true&tlsInsecure=true"),
            Unverified
        );
        assert_eq!(protection("sqlite://x.db"), Local);
        assert!(is_local_host("postgres://u:p@127.0.0.1:5432/db"));
        assert!(is_local_host("redis://[::1]:6379"));
        assert!(!is_local_host("amqp://u:p@broker.internal:5672/%2f"));
    }
}

//! How database errors are classified, shared by the publisher (its source) and the
//! subscriber (its store). Fail-safe: an error is definite only when it is proven that
//! the same statement with the same data fails the same way again; anything else (disk
//! full, out of memory, too many connections, a failover in progress, an error code we
//! have not met) is transient and retried with backoff. A wrongly transient error costs
//! retries and a warning an operator sees; a wrongly definite one dead-letters a valid
//! transaction or stops a publisher.

use crate::error::ErrorClass;

/// A Postgres error by its SQLSTATE (PostgreSQL manual, Appendix A "PostgreSQL Error
/// Codes"). Definite classes: 21 cardinality violation, 22 data exception, 23 integrity
/// constraint violation, 28 invalid authorization, 3D/3F no such database/schema, 42
/// syntax error or access rule violation (undefined table/column, insufficient
/// privilege), 44 WITH CHECK OPTION violation, 54 program limit exceeded (a row or
/// statement too large), 0A feature not supported, P0 raised by a PL/pgSQL function (a
/// store trigger rejecting the row). Everything else, including 53 insufficient
/// resources, 57 operator intervention, 58 system error, XX internal error, 40
/// transaction rollback, 08 connection exception and 55 object not in prerequisite
/// state, is transient.
pub fn postgres_class(sqlstate: &str) -> ErrorClass {
    match sqlstate.get(..2) {
        Some("21" | "22" | "23" | "28" | "3D" | "3F" | "42" | "44" | "54" | "0A" | "P0") => {
            ErrorClass::Definite
        }
        _ => ErrorClass::Transient,
    }
}

/// Postgres insufficient privilege (42501): definite for the publisher (a grant is
/// configuration: it stops and names it), transient for a store write (a valid
/// transaction is retried until the grant is back, not dead-lettered).
pub const POSTGRES_INSUFFICIENT_PRIVILEGE: &str = "42501";

/// MySQL/MariaDB error numbers that are definite (server error reference: "Server Error
/// Message Reference"; MariaDB error codes are the same numbers). Access: 1044 1045
/// 1142 1143 1227 1370 1698. Unknown objects: 1049 database, 1054 column, 1146 table,
/// 1193 variable. Statements: 1064 1149 syntax, 1136 column count, 1118 row size too
/// large, 1381 binary logging off, 1236 binlog position unreadable. Data: 1048 null,
/// 1062 duplicate, 1264 out of range, 1265 truncated, 1292 bad datetime, 1364 no
/// default, 1366 bad value, 1406 too long, 1451 1452 foreign key, 1690 out of range,
/// 3140 invalid JSON, 3819 4025 check constraint, 1644 SIGNAL from a trigger.
const MYSQL_DEFINITE: &[u16] = &[
    1044, 1045, 1048, 1049, 1054, 1062, 1064, 1118, 1136, 1142, 1143, 1146, 1149, 1193, 1227, 1236,
    1264, 1265, 1292, 1364, 1366, 1370, 1381, 1406, 1451, 1452, 1644, 1690, 1698, 3140, 3819, 4025,
];

/// MySQL/MariaDB table and column privilege errors (1142, 1143): transient for a store
/// write, as [`POSTGRES_INSUFFICIENT_PRIVILEGE`].
pub const MYSQL_PRIVILEGE: &[u16] = &[1142, 1143];

/// A MySQL/MariaDB server error by its number: definite only when listed in
/// [`MYSQL_DEFINITE`]; disk full (1021), lock wait timeout (1205), deadlock (1213), too
/// many connections (1040), read-only during a failover (1290, 1836), shutdown (1053)
/// and every number not listed are transient.
pub fn mysql_class(number: u16) -> ErrorClass {
    if MYSQL_DEFINITE.contains(&number) {
        ErrorClass::Definite
    } else {
        ErrorClass::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::*;

    #[test]
    fn postgres_errors_are_definite_only_when_the_statement_or_its_data_cannot_succeed() {
        let table = [
            ("23505", Definite, "unique violation"),
            ("23503", Definite, "foreign key violation"),
            ("23502", Definite, "not null violation"),
            ("22001", Definite, "string data right truncation"),
            ("22P02", Definite, "invalid text representation"),
            ("42P01", Definite, "undefined table"),
            ("42703", Definite, "undefined column"),
            ("42601", Definite, "syntax error"),
            (
                "42501",
                Definite,
                "insufficient privilege (the store overrides)",
            ),
            ("28P01", Definite, "invalid password"),
            ("3D000", Definite, "invalid catalog name"),
            ("54000", Definite, "program limit exceeded"),
            ("0A000", Definite, "feature not supported"),
            ("P0001", Definite, "raise exception"),
            ("53100", Transient, "disk full"),
            ("53200", Transient, "out of memory"),
            ("53300", Transient, "too many connections"),
            ("57P01", Transient, "admin shutdown"),
            ("57014", Transient, "query canceled"),
            ("58030", Transient, "io error"),
            ("XX000", Transient, "internal error"),
            ("40001", Transient, "serialization failure"),
            ("40P01", Transient, "deadlock detected"),
            ("08006", Transient, "connection failure"),
            ("55P03", Transient, "lock not available"),
            (
                "25006",
                Transient,
                "read only sql transaction (a standby promoted meanwhile)",
            ),
            ("", Transient, "no code at all"),
            ("ZZ999", Transient, "a code we have never met"),
        ];
        for (code, class, what) in table {
            assert_eq!(postgres_class(code), class, "{code} {what}");
        }
    }

    #[test]
    fn mysql_errors_are_definite_only_when_listed() {
        let table = [
            (1062, Definite, "duplicate entry"),
            (1452, Definite, "foreign key"),
            (1406, Definite, "data too long"),
            (1146, Definite, "no such table"),
            (1054, Definite, "unknown column"),
            (1045, Definite, "access denied"),
            (1236, Definite, "binlog position unreadable"),
            (1644, Definite, "SIGNAL from a trigger"),
            (1021, Transient, "disk full"),
            (1114, Transient, "table is full"),
            (1041, Transient, "out of memory"),
            (1040, Transient, "too many connections"),
            (1205, Transient, "lock wait timeout"),
            (1213, Transient, "deadlock"),
            (1290, Transient, "read-only (failover)"),
            (1053, Transient, "server shutdown"),
            (1927, Transient, "connection killed"),
            (9999, Transient, "a number we have never met"),
        ];
        for (number, class, what) in table {
            assert_eq!(mysql_class(number), class, "{number} {what}");
        }
    }
}

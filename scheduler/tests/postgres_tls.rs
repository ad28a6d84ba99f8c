//! The registry's database over TLS as RDS serves it, with a PostgreSQL started here with
//! `ssl = on` and a certificate from a CA made in the test: `sslmode=verify-full` with
//! `sslrootcert` connects and migrates when the CA issued the server's certificate, and refuses
//! to connect when it did not, naming the database (without a password); `sslmode=require`,
//! which the docs no longer recommend, connects to that same untrusted server.

use sd_scheduler::db::Db;
use sd_testkit::{PgTls, TestCa};

#[tokio::test]
async fn verify_full_checks_the_servers_certificate_and_require_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("right"), "db-ca");
    let other = TestCa::new(&dir.path().join("other"), "other-ca");
    let server = PgTls::start(&ca).unwrap();
    let verified = |ca: &TestCa| {
        server.url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            ca.ca_file().display()
        ))
    };

    let db = Db::connect(&verified(&ca), 2).await;
    assert!(db.is_ok(), "verify-full with the right CA: {:?}", db.err());

    let refused = Db::connect(&verified(&other), 2).await;
    let Err(e) = refused else {
        panic!("verify-full accepted a certificate its CA did not issue")
    };
    let message = e.to_string();
    assert!(
        message.starts_with("database postgres://sd@localhost:"),
        "{message}"
    );

    // What sslmode=require gives: encryption to whoever answers.
    let unverified = server.url(&format!(
        "sslmode=require&sslrootcert={}",
        other.ca_file().display()
    ));
    assert!(Db::connect(&unverified, 2).await.is_ok());
}

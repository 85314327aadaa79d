//! `gpdp serve` driven as researchers' tools drive it: the Rust Flight SQL
//! client and (through the README's test command) Python's ADBC driver, against the
//! real binary on a generated store, compared with `gpdp query`; then a
//! bounded load test.

use std::sync::OnceLock;
use std::time::Instant;

use crate::common::*;

/// A small store with the NDOO list ingested, shared by the tests (each
/// starts its own server on it).
fn fixture() -> &'static Collected {
    static F: OnceLock<Collected> = OnceLock::new();
    F.get_or_init(|| collected_with_ndoo(2, 600, 23, 9))
}

/// A JSON value as the text a table shows ("null" for null).
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `gpdp query --format json` rows, as text in column order.
fn cli_rows(sql: &str) -> Vec<Vec<String>> {
    let o = query_as_alice(&fixture().store, &["--format", "json", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let columns: Vec<String> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| columns.iter().map(|c| text(&r[c])).collect())
        .collect()
}

/// Record batches as rows of text.
fn batch_rows(batches: &[arrow::array::RecordBatch]) -> Vec<Vec<String>> {
    use arrow::array::Array;
    let mut out = Vec::new();
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| {
                arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default())
                    .unwrap()
            })
            .collect();
        for i in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .zip(&formatters)
                    .map(|(c, f)| {
                        if c.is_null(i) {
                            "null".to_owned()
                        } else {
                            f.value(i).to_string()
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

const SAFE: &str = "SELECT sex, count(*) AS n FROM patients GROUP BY sex ORDER BY sex";
/// Small statistics: some are redacted (and small rows withheld).
const SUPPRESSING: &str = "SELECT imd_decile, count(*) AS n, count(*) FILTER (WHERE ethnicity = 'Other') AS other FROM patients GROUP BY imd_decile ORDER BY imd_decile";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_rust_client_gets_what_gpdp_query_releases_and_nothing_more() {
    let server = Server::start(&fixture().store);
    let rt = runtime();
    rt.block_on(async {
        let mut client =
            gpdp::serve::connect(server.addr, "alice", "demo-opensafely", "demo-alice-token")
                .await
                .unwrap();
        for sql in [SAFE, SUPPRESSING] {
            let got = batch_rows(&gpdp::serve::fetch(&mut client, sql).await.unwrap());
            assert_eq!(got, cli_rows(sql), "{sql}");
        }
        assert!(
            cli_rows(SUPPRESSING).iter().any(|r| r[2] == "null"),
            "nothing was redacted"
        );

        // Prepared statements: the same guard, the same answer.
        let mut prepared = client.prepare(SAFE.to_owned(), None).await.unwrap();
        let info = prepared.execute().await.unwrap();
        let ticket = info.endpoint[0].ticket.clone().unwrap();
        let batches: Vec<_> =
            futures::TryStreamExt::try_collect(client.do_get(ticket).await.unwrap())
                .await
                .unwrap();
        assert_eq!(batch_rows(&batches), cli_rows(SAFE));
        assert!(
            client
                .prepare("SELECT * FROM patients".into(), None)
                .await
                .is_err()
        );

        // A row-level query is refused, naming the rule.
        let e = gpdp::serve::fetch(&mut client, "SELECT patient_id FROM patients")
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("not_an_aggregate"), "{e:#}");
        let e = gpdp::serve::fetch(&mut client, "EXPLAIN SELECT count(*) FROM patients")
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("refused by rule"), "{e:#}");

        // The catalog holds the project's views and nothing else.
        let info = client
            .get_tables(arrow_flight::sql::CommandGetTables {
                include_schema: false,
                ..Default::default()
            })
            .await
            .unwrap();
        let ticket = info.endpoint[0].ticket.clone().unwrap();
        let batches: Vec<_> =
            futures::TryStreamExt::try_collect(client.do_get(ticket).await.unwrap())
                .await
                .unwrap();
        let names: Vec<String> = batch_rows(&batches).iter().map(|r| r[2].clone()).collect();
        assert_eq!(
            names,
            [
                "apcs",
                "clinical_events",
                "medications",
                "ons_deaths",
                "patients"
            ]
        );
        // Server information, for JDBC tools: read-only.
        let info = client
            .get_sql_info(vec![arrow_flight::sql::SqlInfo::FlightSqlServerReadOnly])
            .await
            .unwrap();
        let ticket = info.endpoint[0].ticket.clone().unwrap();
        let batches: Vec<arrow::array::RecordBatch> =
            futures::TryStreamExt::try_collect(client.do_get(ticket).await.unwrap())
                .await
                .unwrap();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);

        // Without a handshake, or with a wrong token: Unauthenticated.
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut anonymous = arrow_flight::sql::client::FlightSqlServiceClient::new(channel.clone());
        let e = anonymous.execute(SAFE.into(), None).await.unwrap_err();
        assert!(
            e.to_string().contains("refused by rule authentication"),
            "{e}"
        );
        let mut wrong = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        let e = wrong
            .handshake("alice@demo-opensafely", "not-the-token")
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("refused by rule authentication"),
            "{e}"
        );
        // A valid researcher, but not approved for the project.
        assert!(
            gpdp::serve::connect(server.addr, "bob", "demo-opensafely", "demo-bob-token")
                .await
                .is_err()
        );
    });
    let (status, rest) = server.stop();
    assert!(status.success(), "{status:?}");
    assert!(rest.contains("stopped"), "{rest}");
    let log = std::fs::read_to_string(fixture().store.join("audit/log.jsonl")).unwrap();
    assert!(
        log.contains("\"event\":\"connect\""),
        "refused connections are audited"
    );
    assert!(
        !log.contains("not-the-token"),
        "a credential reached the audit log"
    );
    assert_log_verifies(&fixture().store);
}

/// Python's ADBC Flight SQL driver, as a researcher's notebook uses it. Needs
/// the client installed: the README's test command installs it and runs this test.
#[test]
#[ignore = "needs the Python ADBC client: run the README's test command"]
fn the_python_adbc_client_gets_the_same_answers_and_the_same_refusals() {
    let python = std::env::var("GPDP_PYTHON").expect(
        "GPDP_PYTHON: the Python with adbc-driver-flightsql (the README's test command sets it)",
    );
    let server = Server::start(&fixture().store);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/adbc_client.py");
    let o = std::process::Command::new(python)
        .arg(script)
        .arg(format!("grpc://{}", server.addr))
        .args([SAFE, SUPPRESSING])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let cases: std::collections::HashMap<String, serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["case"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    for (case, sql) in [("sql0", SAFE), ("sql1", SUPPRESSING), ("bearer", SAFE)] {
        let c = &cases[case];
        assert_eq!(c["ok"], true, "{c}");
        let rows: Vec<Vec<String>> = c["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(text).collect())
            .collect();
        assert_eq!(rows, cli_rows(sql), "{case}");
    }
    for case in ["no_token", "wrong_token"] {
        let e = cases[case]["error"].as_str().unwrap();
        assert!(
            e.contains("UNAUTHENTICATED") && e.contains("refused by rule authentication"),
            "{case}: {e}"
        );
    }
    let e = cases["select_star"]["error"].as_str().unwrap();
    assert!(e.contains("not_an_aggregate"), "{e}");
    let (status, _) = server.stop();
    assert!(status.success());
}

/// 16 concurrent clients × 50 queries on loopback: no errors, no memory
/// growth across rounds, the audit chain intact; prints p50/p99 latency.
#[test]
fn sixteen_clients_times_fifty_queries() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 10;
    let server = Server::start(&fixture().store);
    let rt = runtime();
    let addr = server.addr;
    let mut clients: Vec<_> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..CLIENTS {
            v.push(
                gpdp::serve::connect(addr, "alice", "demo-opensafely", "demo-alice-token")
                    .await
                    .unwrap(),
            );
        }
        v
    });
    let mut latencies = Vec::new();
    let mut rss = Vec::new();
    let mut errors = 0;
    for _ in 0..ROUNDS {
        let results = rt.block_on(async {
            let tasks: Vec<_> = clients
                .drain(..)
                .map(|mut client| {
                    tokio::spawn(async move {
                        let mut times = Vec::new();
                        let mut failed = 0;
                        for _ in 0..PER_ROUND {
                            let t = Instant::now();
                            match gpdp::serve::fetch(&mut client, SAFE).await {
                                Ok(_) => times.push(t.elapsed()),
                                Err(_) => failed += 1,
                            }
                        }
                        (client, times, failed)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for (client, times, failed) in results {
            clients.push(client);
            latencies.extend(times);
            errors += failed;
        }
        rss.push(server.rss_kib());
    }
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "load: {} queries from {CLIENTS} clients: p50 {:?}, p99 {:?}; server RSS by round (KiB): {rss:?}",
        latencies.len(),
        at(0.5),
        at(0.99)
    );
    assert_eq!(errors, 0);
    assert_eq!(latencies.len(), CLIENTS * ROUNDS * PER_ROUND);
    // Memory: after the first round warms caches, it must not keep growing.
    assert!(
        rss[ROUNDS - 1] <= rss[1] + rss[1] / 4 + 16 * 1024,
        "server memory grew across rounds: {rss:?}"
    );
    drop(clients);
    let (status, _) = server.stop();
    assert!(status.success());
    assert_log_verifies(&fixture().store);
}

/// With a certificate the service speaks TLS (and only TLS); a non-loopback
/// address is refused without TLS.
#[test]
fn tls_and_remote_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let store = fixture().store.to_str().unwrap();
    for args in [
        vec!["serve", "--store", store, "--listen", "0.0.0.0:0"],
        vec![
            "serve",
            "--store",
            store,
            "--listen",
            "0.0.0.0:0",
            "--allow-remote",
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    }

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = Server::start_with(
        &fixture().store,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let port = server.addr.port();
    runtime().block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                certified.cert.pem(),
            ))
            .domain_name("localhost");
        let channel = tonic::transport::Channel::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        client
            .handshake("alice@demo-opensafely", "demo-alice-token")
            .await
            .unwrap();
        let batches = gpdp::serve::fetch(&mut client, SAFE).await.unwrap();
        assert_eq!(batch_rows(&batches), cli_rows(SAFE));
        // Clear text is not answered.
        assert!(
            gpdp::serve::connect(server.addr, "alice", "demo-opensafely", "demo-alice-token")
                .await
                .is_err()
        );
    });
    let (status, _) = server.stop();
    assert!(status.success());
}

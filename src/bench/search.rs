//! The knowledge base (issue 16): search latency over a store's vectors, measured in this
//! process on synthetic unit vectors (no upstream, no database: the scan alone, as a search
//! runs it once the store is cached), and ingestion through a gateway with the built-in mock,
//! from attaching a file to its completion.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::procs::{Backend, GatewaySpec, MockSpec};
use super::report::{Outcome, Row};
use super::Bench;
use crate::knowledge::vector::Matrix;

/// Dimensions of the synthetic vectors: OpenAI's text-embedding-3-small.
const DIMS: usize = 1536;
/// Store sizes measured, in chunks.
const SIZES: [usize; 2] = [10_000, 100_000];
/// Results a search keeps (the API's default).
const K: usize = 10;
/// Most searches timed per size.
const MAX_SEARCHES: usize = 200;
/// Goal for the 100k-chunk p50, in ms (issue 16).
const GOAL_P50_MS: f64 = 80.0;
/// Words in the file the ingestion phase attaches.
const INGEST_WORDS: usize = 200_000;

/// Measured phases: one a size, and the ingestion.
pub(crate) const PHASES: u64 = SIZES.len() as u64 + 1;

pub(crate) fn search(b: &mut Bench) -> anyhow::Result<Outcome> {
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    for size in SIZES {
        b.phase(format!(
            "search: {size} chunks × {DIMS} dimensions, top {K}"
        ));
        let (p50, p99, n) = scan(size, b.duration);
        b.bar.inc(1);
        sizes.push(
            json!({"chunks": size, "dims": DIMS, "p50_ms": p50, "p99_ms": p99, "searches": n}),
        );
        let figure = format!("search p50 / p99, {size} chunks × {DIMS}");
        let measured = format!("{p50:.1} / {p99:.1} ms ({n} searches)");
        rows.push(if size == 100_000 {
            Row::goal(
                &figure,
                measured,
                &format!("p50 ≤ {GOAL_P50_MS} ms"),
                p50 <= GOAL_P50_MS,
            )
        } else {
            Row::info(&figure, measured)
        });
    }
    b.phase(format!(
        "search: ingesting a {INGEST_WORDS}-word file through the mock"
    ));
    let ingest = ingest(b)?;
    b.bar.inc(1);
    rows.push(Row::info(
        "ingestion through the built-in mock",
        format!(
            "{:.0} chunks/s ({} chunks in {:.2} s)",
            ingest.chunks as f64 / ingest.seconds,
            ingest.chunks,
            ingest.seconds
        ),
    ));
    let json = json!({
        "sizes": sizes,
        "ingest": {"chunks": ingest.chunks, "seconds": ingest.seconds,
                   "chunks_per_s": ingest.chunks as f64 / ingest.seconds},
    });
    Ok(Outcome::new("search", json, rows))
}

/// p50 and p99 in ms of searches over `size` random unit vectors, and how many ran.
fn scan(size: usize, budget: Duration) -> (f64, f64, usize) {
    let mut rng = fastrand::Rng::with_seed(16);
    let mut random = |n: usize| (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect::<Vec<f32>>();
    let mut matrix = Matrix::with_capacity(DIMS, size);
    for id in 0..size {
        // Pushing normalises each row.
        let _ = matrix.push(id as i64, &random(DIMS));
    }
    let queries: Vec<Vec<f32>> = (0..16).map(|_| random(DIMS)).collect();
    // Warm: the pool's threads started, the matrix in cache as far as it fits.
    for q in queries.iter().take(3) {
        let _ = matrix.search_where(q, K, 0.0, |_| true);
    }
    let deadline = Instant::now() + budget;
    let mut times = Vec::new();
    while times.len() < MAX_SEARCHES && (times.len() < 10 || Instant::now() < deadline) {
        let q = &queries[times.len() % queries.len()];
        let started = Instant::now();
        let _ = matrix.search_where(q, K, 0.0, |_| true);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (at(0.50), at(0.99), times.len())
}

struct Ingested {
    chunks: usize,
    seconds: f64,
}

/// Uploads a long Markdown file to a gateway, attaches it to a new store (the built-in mock
/// embeds), and times the ingestion from the attach to `completed`.
fn ingest(b: &mut Bench) -> anyhow::Result<Ingested> {
    let spec = GatewaySpec {
        workers: 16,
        queue: 16,
        max_connections: 64,
        max_queue_wait_ms: 5000,
        log_requests: false,
        backend: Backend::Sqlite,
    };
    let (addr, _) = b.gateway(MockSpec::latency(0), spec)?;
    let vocabulary = [
        "harbour", "lamp", "keeper", "tide", "bread", "oven", "pilot", "moon", "wick", "lens",
    ];
    let mut text = String::from("# Synthetic handbook\n\n");
    for i in 0..INGEST_WORDS {
        text.push_str(vocabulary[i * 7 % vocabulary.len()]);
        text.push(if i % 12 == 11 { '.' } else { ' ' });
        if i % 120 == 119 {
            text.push_str("\n\n");
        }
    }
    let boundary = "syncgatebenchboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"handbook.md\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(text.as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let file = http(
        addr,
        "POST",
        "/v1/files",
        &format!("multipart/form-data; boundary={boundary}"),
        &body,
    )?;
    let file_id = file["id"].as_str().unwrap_or_default().to_string();
    let started = Instant::now();
    let store = http(
        addr,
        "POST",
        "/v1/vector_stores",
        "application/json",
        json!({"file_ids": [file_id]}).to_string().as_bytes(),
    )?;
    let vs = store["id"].as_str().unwrap_or_default().to_string();
    let deadline = started + Duration::from_secs(600);
    loop {
        let now = http(
            addr,
            "GET",
            &format!("/v1/vector_stores/{vs}"),
            "application/json",
            b"",
        )?;
        if now["file_counts"]["in_progress"] == 0 {
            anyhow::ensure!(
                now["file_counts"]["completed"] == 1,
                "the file did not complete: {now}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "ingestion took over 10 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = started.elapsed().as_secs_f64();
    let content = http(
        addr,
        "GET",
        &format!("/v1/vector_stores/{vs}/files/{file_id}/content"),
        "application/json",
        b"",
    )?;
    let chunks = content["data"].as_array().map_or(0, Vec::len);
    Ok(Ingested { chunks, seconds })
}

/// One request on its own connection; the JSON answer (an error status is an error).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<Value> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{method} {path}: no answer head"))?;
    let status = String::from_utf8_lossy(&answer[..split]);
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "{method} {path}: {}",
        status.lines().next().unwrap_or("")
    );
    Ok(serde_json::from_slice(&answer[split + 4..])?)
}

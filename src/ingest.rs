//! A file's ingestion into a vector store (issue 16), run by the durable job runner as a job of
//! kind `ingest`: its text extracted, cut into chunks, the chunks embedded in batches with the
//! store's model (through the same routing, retries and provider caps as `/v1/embeddings`),
//! and the chunks written with the file's completion in one transaction. A run lost with its
//! process is run again once its lease runs out; a file detached or cancelled meanwhile keeps
//! nothing. Also the embedding call that search shares.

use serde_json::{json, Map, Value};

use crate::knowledge::chunk::{self, Strategy};
use crate::knowledge::extract::{self, Caps};
use crate::knowledge::vector;
use crate::knowledge::words;
use crate::providers::{self, Answer, Call, ProviderError, UpstreamClock, Usage};
use crate::server::State;
use crate::spend::Cost;
use crate::store::chunks::{self, NewChunk};
use crate::store::files::{self, Owner};
use crate::store::jobs::{Claimed, RunEnd};
use crate::store::vector_stores::{self as stores, FileStatus};
use crate::store::StoreError;

/// Dimensions of the built-in `mock` model's vectors for the knowledge base: enough that
/// hashed words rarely share one.
pub(crate) const MOCK_DIMENSIONS: usize = 256;

/// Why embedding failed: the provider (another attempt may fix it), or an answer that is
/// not embeddings.
#[derive(Debug)]
pub(crate) enum EmbedError {
    Provider(ProviderError),
    NoModel(String),
    BadAnswer(String),
}

impl std::fmt::Display for EmbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmbedError::Provider(e) => write!(f, "the embedding model failed: {e}"),
            EmbedError::NoModel(m) => write!(f, "no model named {m:?} is configured"),
            EmbedError::BadAnswer(why) => write!(f, "the embedding model's answer: {why}"),
        }
    }
}

/// Texts embedded: their unit vectors in order, and what the call cost.
pub(crate) struct Embedded {
    pub(crate) vectors: Vec<Vec<f32>>,
    pub(crate) cost: Cost,
}

/// Embeds `texts` with `model`, one call, unit vectors in the texts' order. The call is priced
/// from the usage the provider reported (estimated, characters ÷ 4, when it reported none).
pub(crate) fn embed(state: &State, model: &str, texts: &[String]) -> Result<Embedded, EmbedError> {
    let targets = state
        .providers
        .route(model)
        .ok_or_else(|| EmbedError::NoModel(model.to_string()))?;
    let mut body = Map::new();
    body.insert("model".into(), Value::String(model.to_string()));
    body.insert("input".into(), json!(texts));
    let call = Call {
        path: "/embeddings",
        body: &body,
        stream: false,
    };
    let mut clock = UpstreamClock::default();
    let (answer, served) = providers::call(targets, &call, &state.metrics, &mut clock)
        .map_err(EmbedError::Provider)?;
    let estimate = Usage {
        prompt_tokens: texts.iter().map(|t| (t.len() as u64).div_ceil(4)).sum(),
        ..Usage::default()
    };
    let (mut vectors, usage, estimated) = match answer {
        Answer::Mock => {
            let vectors = texts
                .iter()
                .map(|t| words::embed(t, MOCK_DIMENSIONS))
                .collect();
            (vectors, estimate, false)
        }
        Answer::Json { value, .. } => {
            let reported = value.get("usage").and_then(Usage::from_json);
            let vectors = vectors_of(&value, texts.len())?;
            (vectors, reported.unwrap_or(estimate), reported.is_none())
        }
        Answer::Stream { .. } => return Err(EmbedError::BadAnswer("a stream".into())),
    };
    state.metrics.count_tokens(&served.provider, model, usage);
    for v in &mut vectors {
        vector::normalize(v);
    }
    let prices = &state.config.prices;
    let cost = Cost::of(
        prices,
        &served.provider,
        &served.upstream_model,
        usage,
        estimated,
    );
    Ok(Embedded { vectors, cost })
}

/// The vectors of an OpenAI embeddings answer, by `index`.
fn vectors_of(value: &Value, expected: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
    let data = value["data"]
        .as_array()
        .ok_or_else(|| EmbedError::BadAnswer("no data array".into()))?;
    let mut out: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (n, item) in data.iter().enumerate() {
        let index = item["index"].as_u64().map_or(n, |i| i as usize);
        let numbers = item["embedding"]
            .as_array()
            .ok_or_else(|| EmbedError::BadAnswer("an embedding is not an array".into()))?;
        let v: Option<Vec<f32>> = numbers
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect();
        let v = v.ok_or_else(|| EmbedError::BadAnswer("an embedding holds a non-number".into()))?;
        match out.get_mut(index) {
            Some(slot) => *slot = Some(v),
            None => return Err(EmbedError::BadAnswer(format!("index {index} out of range"))),
        }
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| EmbedError::BadAnswer(format!("fewer than {expected} embeddings")))
}

/// Runs one attempt of an ingestion job.
pub(crate) fn run(state: &State, job: &Claimed) -> RunEnd {
    let (Some(vs_id), Some(file_id)) = (
        job.request["vector_store_id"].as_str(),
        job.request["file_id"].as_str(),
    ) else {
        return RunEnd::Failed(
            json!({"message": "not an ingestion request", "code": "invalid_job"}),
        );
    };
    match ingest(state, vs_id, file_id) {
        Ok(Done::Completed(chunks)) => RunEnd::Succeeded(json!({
            "vector_store_id": vs_id, "file_id": file_id, "status": "completed", "chunks": chunks,
        })),
        Ok(Done::Skipped(why)) => RunEnd::Succeeded(json!({
            "vector_store_id": vs_id, "file_id": file_id, "status": why,
        })),
        Ok(Done::Failed(error)) => {
            state.metrics.knowledge_ingest("failed");
            match chunks::fail(&state.store, vs_id, file_id, error.clone()) {
                Ok(_) => RunEnd::Failed(error),
                Err(e) => RunEnd::Retry(store_error(&e)),
            }
        }
        Err(Again(error)) => RunEnd::Retry(error),
    }
}

/// How an ingestion ended.
enum Done {
    Completed(usize),
    /// Nothing to do: the file is no longer in progress in the store (why).
    Skipped(&'static str),
    /// The file cannot be ingested: its `last_error`.
    Failed(Value),
}

/// A failure another attempt may fix (the store or the provider): the job's error.
struct Again(Value);

fn ingest(state: &State, vs_id: &str, file_id: &str) -> Result<Done, Again> {
    let store = &state.store;
    let again = |e: StoreError| Again(store_error(&e));
    let Some(attached) = stores::file(store, vs_id, file_id).map_err(again)? else {
        return Ok(Done::Skipped("detached"));
    };
    if attached.status != FileStatus::InProgress {
        return Ok(Done::Skipped(attached.status.name()));
    }
    let Some(vs) = stores::get(store, Owner::All, vs_id).map_err(again)? else {
        return Ok(Done::Skipped("deleted"));
    };
    let file = files::get(store, Owner::All, file_id).map_err(again)?;
    let bytes = files::content(store, Owner::All, file_id).map_err(again)?;
    let (Some(file), Some(bytes)) = (file, bytes) else {
        return Ok(Done::Skipped("deleted"));
    };
    let Some(kind) = extract::kind_of(&file.filename, None) else {
        return Ok(Done::Failed(last_error(
            "unsupported_file",
            &format!(
                "{:?} is not a kind of file syncgate reads: txt, md, html or pdf",
                file.filename
            ),
        )));
    };
    let caps = Caps {
        max_input_bytes: usize::try_from(state.config.files.max_bytes).unwrap_or(usize::MAX),
        ..Caps::default()
    };
    let text = match extract::extract(kind, &bytes, &caps) {
        Ok(text) => text,
        Err(e) => return Ok(Done::Failed(last_error(e.code(), &e.to_string()))),
    };
    let strategy = Strategy::parse(&attached.chunking_strategy).unwrap_or(Strategy::Auto);
    let pieces = chunk::chunk(&text, &strategy);
    let held = chunks::count(store, vs_id).map_err(again)?;
    let max = state.config.knowledge.max_chunks_per_store;
    if held as u64 + pieces.len() as u64 > max {
        return Ok(Done::Failed(last_error(
            "invalid_file",
            &format!(
                "the file's {} chunks would take the store past its {max} chunks \
                 ([knowledge] max_chunks_per_store; it holds {held})",
                pieces.len()
            ),
        )));
    }
    let mut rows = Vec::with_capacity(pieces.len());
    let mut usage_bytes = 0i64;
    for batch in pieces.chunks(state.config.knowledge.embed_batch.max(1)) {
        let texts: Vec<String> = batch.iter().map(|c| c.text.clone()).collect();
        let vectors = match embed(state, &vs.store.embedding_model, &texts) {
            Ok(embedded) => embedded.vectors,
            Err(EmbedError::Provider(e)) if crate::jobs::is_transient(&e) => {
                return Err(Again(
                    json!({"message": e.to_string(), "code": "server_error"}),
                ))
            }
            Err(e) => return Ok(Done::Failed(last_error("server_error", &e.to_string()))),
        };
        for (piece, v) in batch.iter().zip(vectors) {
            let embedding = vector::to_bytes(&v);
            usage_bytes += (piece.text.len() + embedding.len()) as i64;
            rows.push(NewChunk {
                position: rows.len() as i64,
                text: piece.text.clone(),
                tokens: i64::from(piece.tokens),
                embedding,
            });
        }
    }
    let count = rows.len();
    match chunks::complete(store, vs_id, file_id, rows, usage_bytes).map_err(again)? {
        true => {
            state.metrics.knowledge_ingest("completed");
            Ok(Done::Completed(count))
        }
        false => Ok(Done::Skipped("no longer in progress")),
    }
}

/// A file's `last_error`, as OpenAI shows it.
fn last_error(code: &str, message: &str) -> Value {
    json!({"code": code, "message": message})
}

fn store_error(e: &StoreError) -> Value {
    json!({"message": e.to_string(), "code": e.code()})
}

//! Weights & Biases over its HTTP API, without an SDK.
//!
//! The run is created or resumed with the GraphQL `upsertBucket` mutation; history lines go
//! to the run's `file_stream` endpoint with line offsets; the summary and a final
//! `complete`/`exitcode` message close it. Everything happens on a background thread fed by
//! a channel: training never waits for the network. Lines that cannot be sent are kept and
//! retried; whatever is still unsent at the end is reported (it is in metrics.jsonl anyway).
//!
//! Each training step reaches the server exactly once: `_step` is the training step, and a
//! resumed run first asks the server for the last `_step` it holds (`historyTail`, as the
//! official SDK does), then sends only later steps, starting with the backlog kept in
//! metrics.jsonl. Steps recomputed after a crash equal what the server has (resume is
//! exact), so skipping them loses nothing.

use anyhow::{bail, Context, Result};
use reqwest::blocking::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const DEFAULT_BASE_URL: &str = "https://api.wandb.ai";
const HISTORY_FILE: &str = "wandb-history.jsonl";
const SUMMARY_FILE: &str = "wandb-summary.json";

fn default_flush_timeout() -> f64 {
    10.0
}

/// `[train.wandb]` of a config. The API key comes from `WANDB_API_KEY`, the server from
/// `WANDB_BASE_URL` (default the public one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WandbConfig {
    pub project: String,
    pub entity: Option<String>,
    /// Run id; defaults to the run folder's name, so a resumed run continues the same run.
    pub name: Option<String>,
    /// How long the end of a run waits for unsent lines when the server is slow or down.
    #[serde(default = "default_flush_timeout")]
    pub flush_timeout_s: f64,
}

const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, \
$config: JSONString, $displayName: String) { upsertBucket(input: {id: $id, name: $name, modelName: $project, \
entityName: $entity, config: $config, displayName: $displayName}) { bucket { id name displayName historyLineCount \
project { name entity { name } } } inserted } }";

const RUN_RESUME_STATUS: &str =
    "query RunResumeStatus($project: String, $entity: String, $name: String!) { \
model(name: $project, entityName: $entity) { bucket(name: $name) { historyLineCount historyTail } } }";

enum Message {
    History(Map<String, Value>),
    Finish {
        summary: Map<String, Value>,
        exit_code: i32,
    },
}

/// What the sender thread managed to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WandbReport {
    pub sent_lines: usize,
    /// Lines the server held already (sent before a crash the run resumed from).
    pub already_sent: usize,
    pub unsent_lines: usize,
    pub run_created: bool,
}

/// A handle on the background sender.
pub struct WandbRun {
    sender: Sender<Message>,
    reports: Receiver<WandbReport>,
    thread: Option<JoinHandle<()>>,
    logged: usize,
    flush_timeout: Duration,
}

struct Connection {
    client: Client,
    base_url: String,
    api_key: String,
    entity: Option<String>,
    project: String,
    run: String,
}

impl Connection {
    fn graphql(&self, query: &str, variables: Value) -> Result<Value> {
        let response = self
            .client
            .post(format!("{}/graphql", self.base_url))
            .basic_auth("api", Some(&self.api_key))
            .json(&json!({ "query": query, "variables": variables }))
            .send()?;
        let status = response.status();
        if !status.is_success() {
            bail!("graphql answered {status}");
        }
        let body: Value = response.json()?;
        if let Some(errors) = body.get("errors") {
            bail!("graphql errors: {errors}");
        }
        Ok(body)
    }

    fn file_stream(&self, body: Value) -> Result<()> {
        let entity = self
            .entity
            .as_deref()
            .context("no entity to stream history to")?;
        let url = format!(
            "{}/files/{entity}/{}/{}/file_stream",
            self.base_url, self.project, self.run
        );
        let response = self
            .client
            .post(url)
            .basic_auth("api", Some(&self.api_key))
            .json(&body)
            .send()?;
        if !response.status().is_success() {
            bail!("file_stream answered {}", response.status());
        }
        Ok(())
    }
}

impl WandbRun {
    /// Starts the sender. `run_config` is the resolved config; `resuming` asks the server
    /// where the run's history ends so offsets continue from there.
    pub fn start(
        config: &WandbConfig,
        default_name: &str,
        run_config: &Value,
        resuming: bool,
    ) -> Result<Self> {
        let api_key = std::env::var("WANDB_API_KEY")
            .context("[train.wandb] is configured but WANDB_API_KEY is not set")?;
        let base_url =
            std::env::var("WANDB_BASE_URL").unwrap_or_else(|_| DEFAULT_BASE_URL.to_string());
        let client = Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let connection = Connection {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            entity: config.entity.clone(),
            project: config.project.clone(),
            run: config
                .name
                .clone()
                .unwrap_or_else(|| default_name.to_string()),
        };
        // W&B wants each config key as {"key": {"value": ...}}.
        let wrapped: Map<String, Value> = match run_config {
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| (k.clone(), json!({ "value": v })))
                .collect(),
            other => [("config".to_string(), json!({ "value": other }))]
                .into_iter()
                .collect(),
        };
        let (sender, receiver) = channel();
        let (report_sender, reports) = channel();
        let flush_timeout = Duration::from_secs_f64(config.flush_timeout_s.max(0.0));
        let thread = std::thread::Builder::new()
            .name("wandb".into())
            .spawn(move || {
                let report =
                    Sender_::new(connection, Value::Object(wrapped), resuming, flush_timeout)
                        .run(receiver);
                let _ = report_sender.send(report);
            })?;
        Ok(Self {
            sender,
            reports,
            thread: Some(thread),
            logged: 0,
            flush_timeout,
        })
    }

    /// Queues one history line (never blocks).
    pub fn log(&mut self, scalars: &Map<String, Value>) {
        self.logged += 1;
        let _ = self.sender.send(Message::History(scalars.clone()));
    }

    /// Sends the summary and `complete`, and reports. Waits for the sender at most the
    /// flush timeout (plus the time to close the run); a sender stuck on a dead server is
    /// left behind and its lines counted as unsent.
    pub fn finish(mut self, summary: Map<String, Value>, exit_code: i32) -> WandbReport {
        self.close(summary, exit_code)
    }

    fn close(&mut self, summary: Map<String, Value>, exit_code: i32) -> WandbReport {
        let _ = self.sender.send(Message::Finish { summary, exit_code });
        let thread = self.thread.take();
        match self
            .reports
            .recv_timeout(self.flush_timeout + Duration::from_secs(5))
        {
            Ok(report) => {
                if let Some(thread) = thread {
                    let _ = thread.join();
                }
                report
            }
            Err(_) => {
                eprintln!("wandb: the server did not answer in time; {} lines unconfirmed (they are in metrics.jsonl)", self.logged);
                WandbReport {
                    sent_lines: 0,
                    already_sent: 0,
                    unsent_lines: self.logged,
                    run_created: false,
                }
            }
        }
    }
}

impl Drop for WandbRun {
    /// A run that ends by an error still tells the server it finished (exit code 1).
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.close(Map::new(), 1);
        }
    }
}

/// The background side.
struct Sender_ {
    connection: Connection,
    config: Value,
    resuming: bool,
    flush_timeout: Duration,
    created: bool,
    /// Offset of the next history line on the server.
    offset: usize,
    /// The last training step the server holds: lines up to it are not sent again.
    server_step: Option<u64>,
    /// Metrics lines (`step`, `time`, scalars) waiting to be sent, in step order.
    pending: VecDeque<Map<String, Value>>,
    sent: usize,
    already_sent: usize,
    started: Instant,
    next_attempt: Instant,
    backoff: Duration,
}

impl Sender_ {
    fn new(connection: Connection, config: Value, resuming: bool, flush_timeout: Duration) -> Self {
        Self {
            connection,
            config,
            resuming,
            flush_timeout,
            created: false,
            offset: 0,
            server_step: None,
            pending: VecDeque::new(),
            sent: 0,
            already_sent: 0,
            started: Instant::now(),
            next_attempt: Instant::now(),
            backoff: Duration::from_millis(200),
        }
    }

    fn run(mut self, receiver: Receiver<Message>) -> WandbReport {
        loop {
            match receiver.recv_timeout(Duration::from_millis(250)) {
                Ok(Message::History(line)) => self.pending.push_back(line),
                Ok(Message::Finish { summary, exit_code }) => {
                    return self.finish(summary, exit_code)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.finish(Map::new(), 1),
            }
            // Batch whatever else is already waiting.
            while let Ok(message) = receiver.try_recv() {
                match message {
                    Message::History(line) => self.pending.push_back(line),
                    Message::Finish { summary, exit_code } => {
                        return self.finish(summary, exit_code)
                    }
                }
            }
            if Instant::now() >= self.next_attempt {
                self.attempt();
            }
        }
    }

    /// One try at creating the run (if needed) and sending what is pending.
    fn attempt(&mut self) -> bool {
        let outcome = self.ensure_created().and_then(|()| self.send_pending());
        match outcome {
            Ok(()) => {
                self.backoff = Duration::from_millis(200);
                true
            }
            Err(error) => {
                eprintln!(
                    "wandb: {error:#}; will retry ({} lines waiting)",
                    self.pending.len()
                );
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                false
            }
        }
    }

    fn ensure_created(&mut self) -> Result<()> {
        if self.created {
            return Ok(());
        }
        let c = &self.connection;
        if self.resuming {
            let status = c.graphql(
                RUN_RESUME_STATUS,
                json!({ "project": c.project, "entity": c.entity, "name": c.run }),
            )?;
            let bucket = &status["data"]["model"]["bucket"];
            self.offset = bucket["historyLineCount"].as_u64().unwrap_or(0) as usize;
            self.server_step = last_history_step(&bucket["historyTail"]);
        }
        let created = c.graphql(
            UPSERT_BUCKET,
            json!({
                "name": c.run,
                "project": c.project,
                "entity": c.entity,
                "config": self.config.to_string(),
            }),
        )?;
        if self.connection.entity.is_none() {
            // Without `entity` in the config the run lives under the API key's default
            // entity, which the server names here; history goes to that path.
            let named = created["data"]["upsertBucket"]["bucket"]["project"]["entity"]["name"]
                .as_str()
                .filter(|name| !name.is_empty())
                .context("the server named no entity for the run: set train.wandb.entity")?;
            self.connection.entity = Some(named.to_string());
        }
        self.created = true;
        Ok(())
    }

    fn send_pending(&mut self) -> Result<()> {
        // Steps the server holds from before a crash: recomputed identically, not resent.
        while let Some(line) = self.pending.front() {
            match (line_step(line), self.server_step) {
                (Some(step), Some(held)) if step <= held => {
                    self.pending.pop_front();
                    self.already_sent += 1;
                }
                _ => break,
            }
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let runtime = self.started.elapsed().as_secs_f64();
        let lines: Vec<String> = self
            .pending
            .iter()
            .map(|line| history_line(line, runtime).to_string())
            .collect();
        let body =
            json!({ "files": { HISTORY_FILE: { "offset": self.offset, "content": lines } } });
        self.connection.file_stream(body)?;
        self.offset += lines.len();
        self.sent += lines.len();
        self.server_step = self.pending.back().and_then(line_step).or(self.server_step);
        self.pending.clear();
        Ok(())
    }

    fn finish(mut self, summary: Map<String, Value>, exit_code: i32) -> WandbReport {
        let deadline = Instant::now() + self.flush_timeout;
        loop {
            if self.attempt() && self.pending.is_empty() {
                break;
            }
            let wait = self.next_attempt.saturating_duration_since(Instant::now());
            if Instant::now() + wait >= deadline {
                break;
            }
            std::thread::sleep(wait);
        }
        if self.created {
            let summary = Value::Object(crate::metrics::tracker_scalars(&summary).collect());
            let summary_body = json!({ "files": { SUMMARY_FILE: { "offset": 0, "content": [summary.to_string()] } } });
            let closing = json!({ "complete": true, "exitcode": exit_code });
            for body in [summary_body, closing] {
                if let Err(error) = self.connection.file_stream(body) {
                    eprintln!("wandb: could not close the run: {error:#}");
                }
            }
        }
        let report = WandbReport {
            sent_lines: self.sent,
            already_sent: self.already_sent,
            unsent_lines: self.pending.len(),
            run_created: self.created,
        };
        if report.unsent_lines > 0 {
            eprintln!(
                "wandb: {} history lines could not be sent (they are in metrics.jsonl)",
                report.unsent_lines
            );
        }
        report
    }
}

fn line_step(line: &Map<String, Value>) -> Option<u64> {
    line.get("step").and_then(Value::as_u64)
}

/// A metrics line as W&B history: the training step as `_step`, the time it was logged as
/// `_timestamp` (so a line reads the same however often it is sent), grouped metric names.
fn history_line(line: &Map<String, Value>, runtime: f64) -> Value {
    let mut history: Map<String, Value> = crate::metrics::tracker_scalars(line).collect();
    history.insert("_step".into(), json!(line_step(line)));
    history.insert(
        "_timestamp".into(),
        line.get("time").cloned().unwrap_or(json!(0)),
    );
    history.insert("_runtime".into(), json!(runtime));
    Value::Object(history)
}

/// The `_step` of the last line in a `historyTail` answer: a JSON string holding a list of
/// JSON-encoded lines (the form the service and the official SDK use).
fn last_history_step(tail: &Value) -> Option<u64> {
    let lines: Vec<String> = serde_json::from_str(tail.as_str()?).ok()?;
    let last: Value = serde_json::from_str(lines.last()?).ok()?;
    last["_step"].as_u64()
}

//! Run telemetry through the real binary: Weights & Biases against a loopback HTTP server
//! written here (it speaks the W&B endpoints and checks offsets), and the plots.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
struct Request {
    path: String,
    authorization: Option<String>,
    body: Value,
}

#[derive(Default)]
struct ServerState {
    requests: Vec<Request>,
    /// History lines accepted, in order (what a W&B server would store).
    history: Vec<Value>,
    /// Offsets that did not continue the history: must stay empty.
    offset_errors: Vec<String>,
}

/// The entity the stand-in server gives runs that name none (the API key's default one).
const DEFAULT_ENTITY: &str = "viewer-team";

/// A W&B stand-in on 127.0.0.1: GraphQL (upsertBucket, RunResumeStatus) and file_stream.
struct FakeWandb {
    url: String,
    state: Arc<Mutex<ServerState>>,
    /// The next this many file_stream requests answer 500 (an outage).
    failures: Arc<AtomicUsize>,
}

impl FakeWandb {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState::default()));
        let failures = Arc::new(AtomicUsize::new(0));
        let (thread_state, thread_failures) = (state.clone(), failures.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = serve(stream, &thread_state, &thread_failures);
            }
        });
        Self {
            url,
            state,
            failures,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn serve(
    mut stream: TcpStream,
    state: &Mutex<ServerState>,
    failures: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let (mut length, mut authorization) = (0, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, answer) = {
        let mut state = state.lock().unwrap();
        state.requests.push(Request {
            path: path.clone(),
            authorization,
            body: body.clone(),
        });
        if path == "/graphql" {
            let query = body["query"].as_str().unwrap_or("");
            if query.contains("RunResumeStatus") {
                let count = state.history.len();
                (
                    200,
                    json!({ "data": { "model": { "bucket": { "historyLineCount": count } } } }),
                )
            } else {
                // Like the real service: a run without an entity goes to the key's default one,
                // and the answer names it.
                let entity = body["variables"]["entity"]
                    .as_str()
                    .unwrap_or(DEFAULT_ENTITY)
                    .to_string();
                let project =
                    json!({ "name": body["variables"]["project"], "entity": { "name": entity } });
                (
                    200,
                    json!({ "data": { "upsertBucket": { "bucket": { "id": "x", "name": body["variables"]["name"], "project": project }, "inserted": true } } }),
                )
            }
        } else if path.starts_with("/files//") {
            // An empty entity segment: the real service has no such path.
            (404, json!({ "error": "not found" }))
        } else if path.ends_with("/file_stream") {
            if failures.load(Ordering::SeqCst) > 0 {
                failures.fetch_sub(1, Ordering::SeqCst);
                (500, json!({ "error": "outage" }))
            } else {
                if let Some(history) = body["files"].get("wandb-history.jsonl") {
                    let offset = history["offset"].as_u64().unwrap() as usize;
                    if offset != state.history.len() {
                        let error =
                            format!("offset {offset} but {} lines stored", state.history.len());
                        state.offset_errors.push(error);
                    }
                    for line in history["content"].as_array().unwrap() {
                        let line: Value = serde_json::from_str(line.as_str().unwrap()).unwrap();
                        state.history.push(line);
                    }
                }
                (200, json!({}))
            }
        } else {
            (404, json!({}))
        }
    };
    let text = answer.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    stream.flush()
}

fn sft(run_dir: &Path, wandb_url: &str, extra: &[&str]) -> Output {
    let config = repo_root().join("tests/fixtures/configs/sft-tiny-test.toml");
    let mut command = Command::new(trainer_bin());
    command
        .current_dir(repo_root())
        .env("WANDB_API_KEY", "test-key")
        .env("WANDB_BASE_URL", wandb_url)
        .args(["recipe", "sft", "--config", config.to_str().unwrap()])
        .args(["--set", &format!("run.dir={}", run_dir.display())])
        .args([
            "--set",
            "train.wandb.project=proj",
            "--set",
            "train.wandb.entity=team",
            "--set",
            "train.wandb.name=run-1",
        ])
        .args(extra);
    command.output().unwrap()
}

#[test]
fn wandb_receives_every_line_once_across_outage_and_resume() {
    let server = FakeWandb::start();
    server.failures.store(2, Ordering::SeqCst); // the first two sends fail with 500
    let run = scratch_dir("wandb-run");
    assert_succeeded(&sft(
        &run,
        &server.url,
        &["--set", "train.steps=12", "--set", "train.save_every=6"],
    ));
    let first_run = server.requests().len();
    // Resume the finished run for six more steps.
    assert_succeeded(&sft(
        &run,
        &server.url,
        &[
            "--set",
            "train.steps=18",
            "--set",
            "train.save_every=6",
            "--resume",
            "auto",
        ],
    ));

    let requests = server.requests();
    let auth = "Basic YXBpOnRlc3Qta2V5"; // base64("api:test-key")
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(auth)),
        "{requests:?}"
    );
    for r in requests.iter().filter(|r| r.path != "/graphql") {
        assert_eq!(r.path, "/files/team/proj/run-1/file_stream");
    }

    // Run 1: created with upsertBucket, config in the {"key": {"value": ...}} form.
    let upsert = &requests[0];
    assert_eq!(upsert.path, "/graphql");
    assert!(upsert.body["query"]
        .as_str()
        .unwrap()
        .contains("upsertBucket"));
    let variables = &upsert.body["variables"];
    assert_eq!(
        (
            variables["name"].as_str(),
            variables["project"].as_str(),
            variables["entity"].as_str()
        ),
        (Some("run-1"), Some("proj"), Some("team"))
    );
    let config: Value = serde_json::from_str(variables["config"].as_str().unwrap()).unwrap();
    assert_eq!(config["train"]["value"]["steps"], 12);
    // ... and closed with the summary and complete/exitcode.
    let closing = &requests[first_run - 1].body;
    assert_eq!(closing, &json!({ "complete": true, "exitcode": 0 }));
    assert!(requests[first_run - 2].body["files"]["wandb-summary.json"].is_object());
    // The outage: two 500s, then the same lines again at the same offset.
    let history_posts: Vec<&Request> = requests[..first_run]
        .iter()
        .filter(|r| r.body["files"].get("wandb-history.jsonl").is_some())
        .collect();
    assert_eq!(
        history_posts[0].body["files"]["wandb-history.jsonl"]["offset"],
        0
    );
    assert_eq!(
        history_posts[1].body["files"]["wandb-history.jsonl"]["offset"], 0,
        "retried at the same offset"
    );

    // Run 2 asked where the history ends before sending.
    let resume = &requests[first_run];
    assert!(
        resume.body["query"]
            .as_str()
            .unwrap()
            .contains("RunResumeStatus"),
        "{:?}",
        resume.body
    );
    assert_eq!(
        requests.last().unwrap().body,
        json!({ "complete": true, "exitcode": 0 })
    );

    let state = server.state.lock().unwrap();
    assert!(state.offset_errors.is_empty(), "{:?}", state.offset_errors);
    let steps: Vec<u64> = state
        .history
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=18).collect::<Vec<_>>(),
        "every line exactly once, in order"
    );
    let wandb_steps: Vec<u64> = state
        .history
        .iter()
        .map(|l| l["_step"].as_u64().unwrap())
        .collect();
    assert_eq!(wandb_steps, (0..18).collect::<Vec<_>>());
    assert!(state.history.iter().all(|l| l["loss"].is_number()));
}

#[test]
fn an_unresponsive_server_never_slows_training() {
    // A server that accepts connections and never answers: a client that waited on it would
    // hang for its 30-second request timeout on every send.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let run = scratch_dir("wandb-dead");
    let start = Instant::now();
    let output = sft(
        &run,
        &url,
        &[
            "--set",
            "train.steps=10",
            "--set",
            "train.wandb.flush_timeout_s=1",
        ],
    );
    let seconds = start.elapsed().as_secs_f64();
    assert_succeeded(&output);
    assert!(
        seconds < 25.0,
        "the run took {seconds:.1}s: training waited for the server"
    );
    let lines = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.len(), 10, "every line is kept locally");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("10 lines unconfirmed") || stderr.contains("could not be sent"),
        "{stderr}"
    );
}

#[test]
fn plots_have_one_png_per_metric() {
    let run = scratch_dir("plots-run");
    let config = repo_root().join("tests/fixtures/configs/sft-tiny-test.toml");
    let output = Command::new(trainer_bin())
        .current_dir(repo_root())
        .args(["recipe", "sft", "--config", config.to_str().unwrap()])
        .args([
            "--set",
            &format!("run.dir={}", run.display()),
            "--set",
            "train.steps=12",
        ])
        .output()
        .unwrap();
    assert_succeeded(&output);
    let series = trainer::plot::metric_series(&run.join("metrics.jsonl")).unwrap();
    assert!(
        series.contains_key("loss")
            && series.contains_key("eval_loss")
            && series.contains_key("lr")
    );
    for name in series.keys() {
        let path = run.join(format!("plots/{name}.png"));
        let image = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        assert_eq!(image.dimensions(), (800, 500));
        // The curve is drawn in blue; axis labels in black on the left margin.
        let blue = image
            .pixels()
            .filter(|p| p[2] > 200 && p[0] < 80 && p[1] < 80)
            .count();
        let expected = if series[name].len() > 1 { 200 } else { 20 }; // one point is a dot
        assert!(blue > expected, "{name}: no curve ({blue} blue pixels)");
        let label_ink = (0..72u32)
            .flat_map(|x| (0..500u32).map(move |y| (x, y)))
            .filter(|&(x, y)| image.get_pixel(x, y)[0] < 100)
            .count();
        assert!(label_ink > 100, "{name}: no y-axis label");
    }
    // `trainer plot` redraws them on demand.
    std::fs::remove_dir_all(run.join("plots")).unwrap();
    let status = Command::new(trainer_bin())
        .args(["plot", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(run.join("plots/loss.png").exists());
}

/// In a terminal (a pseudo-terminal from `script`), the progress bar appears only once
/// training starts: no empty bar is left above the run's start line.
#[test]
fn the_progress_bar_starts_below_the_start_line() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` (util-linux) to run the binary in a terminal");
        return;
    }
    let run = scratch_dir("progress-tty");
    let command = format!(
        "{} recipe sft --config {} --set run.dir={}",
        trainer_bin(),
        test_config().display(),
        run.display()
    );
    let output = Command::new("script")
        .args(["-q", "-c", &command, "/dev/null"])
        .env("TERM", "xterm")
        .current_dir(repo_root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text
        .find("sft: ")
        .unwrap_or_else(|| panic!("no start line in {text:?}"));
    assert!(
        !text[..start].contains("/40"),
        "a bar was drawn before the start line: {:?}",
        &text[..start]
    );
    assert!(
        text[start..].contains("40/40"),
        "the bar reached the end: {text:?}"
    );
}

/// Without `entity` in the config, history goes to the entity the server named for the run
/// (an empty path segment is not a path the real service answers).
#[test]
fn wandb_without_an_entity_streams_to_the_entity_the_server_named() {
    let server = FakeWandb::start();
    let run = scratch_dir("wandb-no-entity");
    let output = Command::new(trainer_bin())
        .current_dir(repo_root())
        .env("WANDB_API_KEY", "test-key")
        .env("WANDB_BASE_URL", &server.url)
        .args(["recipe", "sft", "--config"])
        .arg(test_config())
        .args(["--set", &format!("run.dir={}", run.display())])
        .args([
            "--set",
            "train.wandb.project=proj",
            "--set",
            "train.steps=6",
        ])
        .output()
        .unwrap();
    assert_succeeded(&output);
    let streams: Vec<String> = server
        .requests()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p.ends_with("/file_stream"))
        .collect();
    assert!(!streams.is_empty(), "no history was sent");
    for path in &streams {
        assert_eq!(path, "/files/viewer-team/proj/wandb-no-entity/file_stream");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("6 history lines, 0 unsent"), "{stdout}");
}

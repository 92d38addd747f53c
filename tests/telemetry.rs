//! Run telemetry through the real binary: Weights & Biases against a loopback HTTP server
//! written here (it speaks the W&B endpoints and checks offsets), and the plots.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
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
    /// After this many more file_stream requests the server stops answering for good.
    answers_left: Arc<AtomicUsize>,
}

impl FakeWandb {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState::default()));
        let failures = Arc::new(AtomicUsize::new(0));
        let answers_left = Arc::new(AtomicUsize::new(usize::MAX));
        let (thread_state, thread_failures) = (state.clone(), failures.clone());
        let thread_answers_left = answers_left.clone();
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if thread_answers_left.load(Ordering::SeqCst) == 0 {
                    silent.push(stream); // held open, never answered
                    continue;
                }
                let _ = serve(
                    stream,
                    &thread_state,
                    &thread_failures,
                    &thread_answers_left,
                );
            }
        });
        Self {
            url,
            state,
            failures,
            answers_left,
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
    answers_left: &AtomicUsize,
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
                // As the service answers: the count, and the last lines as a JSON string of
                // JSON-encoded lines.
                let count = state.history.len();
                let tail: Vec<String> = state.history[count.saturating_sub(10)..]
                    .iter()
                    .map(Value::to_string)
                    .collect();
                let tail = serde_json::to_string(&tail).unwrap();
                (
                    200,
                    json!({ "data": { "model": { "bucket": { "historyLineCount": count, "historyTail": tail } } } }),
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
            let _ =
                answers_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
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

/// The `_step` of each line the server holds, in order.
fn history_steps(history: &[Value]) -> Vec<u64> {
    history
        .iter()
        .map(|l| l["_step"].as_u64().unwrap())
        .collect()
}

fn sft(run_dir: &Path, wandb_url: &str, extra: &[&str]) -> Output {
    wandb_sft_command(run_dir, wandb_url, extra)
        .output()
        .unwrap()
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
    assert_eq!(
        history_steps(&state.history),
        (1..=18).collect::<Vec<_>>(),
        "every line exactly once, in order, `_step` the training step"
    );
    for name in ["train/loss", "train/learning_rate", "train/grad_norm"] {
        assert!(state.history.iter().all(|l| l[name].is_number()), "{name}");
    }
    assert!(state.history[11]["eval/loss"].is_number());
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

/// SIGKILLed twice after the server received steps past the newest checkpoint, then resumed
/// to the end: the server holds every training step exactly once, `_step` the training
/// step, the values of metrics.jsonl, and the run's `complete`.
#[test]
fn wandb_holds_each_step_once_after_sigkills_and_resumes() {
    let server = FakeWandb::start();
    let run = scratch_dir("wandb-killed");
    let settings = [
        "--set",
        "train.steps=100",
        "--set",
        "train.save_every=20",
        "--resume",
        "auto",
    ];
    let held_step = || {
        history_steps(&server.state.lock().unwrap().history)
            .last()
            .copied()
    };
    let (mut kills, mut lives) = (0, 0);
    let mut last_kill_checkpoint = 0;
    while kills < 2 {
        lives += 1;
        assert!(lives <= 10, "could not kill the run between checkpoints");
        let mut child = wandb_sft_command(&run, &server.url, &settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill once the server holds a step past the newest checkpoint (after a checkpoint
        // newer than the last kill's, so that each kill loses steps the server has).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended unkilled"
            );
            assert!(Instant::now() < deadline, "the server got nothing new");
            let newest = checkpoint_steps(&run).first().copied().unwrap_or(0);
            if newest > last_kill_checkpoint && held_step().is_some_and(|held| held > newest) {
                child.kill().unwrap();
                child.wait().unwrap();
                // Counted only if no newer checkpoint slipped in before the kill.
                let newest_after = checkpoint_steps(&run).first().copied().unwrap_or(0);
                if held_step().unwrap() > newest_after {
                    kills += 1;
                    last_kill_checkpoint = newest_after;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_succeeded(
        &wandb_sft_command(&run, &server.url, &settings)
            .output()
            .unwrap(),
    );

    let state = server.state.lock().unwrap();
    assert!(state.offset_errors.is_empty(), "{:?}", state.offset_errors);
    assert_eq!(
        history_steps(&state.history),
        (1..=100).collect::<Vec<_>>(),
        "every step exactly once, `_step` the training step"
    );
    let metrics = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for (held, line) in state.history.iter().zip(&metrics) {
        for (name, value) in line.as_object().unwrap() {
            // Throughput is measured, not computed: a recomputed step takes its own time.
            if matches!(name.as_str(), "step" | "time") || name.ends_with("_per_s") {
                continue;
            }
            let tracked = &held[trainer::metrics::tracker_name(name)];
            assert_eq!(tracked, value, "step {}: {name}", line["step"]);
        }
    }
    let last = state.requests.last().unwrap();
    assert_eq!(last.body, json!({ "complete": true, "exitcode": 0 }));
}

/// The sft command with W&B pointed at `url` (project proj, entity team, run run-1).
fn wandb_sft_command(run_dir: &Path, url: &str, extra: &[&str]) -> Command {
    let mut command = sft_command(&test_config(), run_dir, extra);
    command
        .env("WANDB_API_KEY", "test-key")
        .env("WANDB_BASE_URL", url)
        .args(["--set", "train.wandb.project=proj"])
        .args(["--set", "train.wandb.entity=team"])
        .args(["--set", "train.wandb.name=run-1"]);
    command
}

/// A server that stops answering mid-run: the run still ends promptly, and every line the
/// server lacks is among those reported unconfirmed.
#[test]
fn a_server_that_stops_answering_loses_no_unreported_line() {
    let server = FakeWandb::start();
    server.answers_left.store(2, Ordering::SeqCst);
    let run = scratch_dir("wandb-stops");
    let output = sft(
        &run,
        &server.url,
        &[
            "--set",
            "train.steps=30",
            "--set",
            "train.wandb.flush_timeout_s=1",
        ],
    );
    assert_succeeded(&output);
    let held = history_steps(&server.state.lock().unwrap().history);
    assert_eq!(held, (1..=held.len() as u64).collect::<Vec<_>>());
    assert!(held.len() < 30, "the server answered everything: {held:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reported: usize = ["lines unconfirmed", "history lines could not be sent"]
        .iter()
        .filter_map(|phrase| {
            let before = &stderr[..stderr.find(phrase)?];
            before.split_whitespace().last()?.parse().ok()
        })
        .max()
        .unwrap_or_else(|| panic!("nothing reported unsent: {stderr}"));
    assert!(
        reported >= 30 - held.len(),
        "{} lines missing, {reported} reported: {stderr}",
        30 - held.len()
    );
}

/// One decoded TensorBoard event: (step, file_version, [(tag, simple_value)]).
type Event = (u64, Option<String>, Vec<(String, f32)>);

/// Reads a TFRecord file of `Event` messages, checking both checksums of every record.
fn read_events(path: &Path) -> Vec<Event> {
    use trainer::tensorboard::masked_crc;
    let bytes = std::fs::read(path).unwrap();
    let mut events = Vec::new();
    let mut at = 0;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    while at < bytes.len() {
        let length = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(at + 8),
            masked_crc(&bytes[at..at + 8]),
            "length checksum"
        );
        let data = &bytes[at + 12..at + 12 + length];
        assert_eq!(u32_at(at + 12 + length), masked_crc(data), "data checksum");
        events.push(decode_event(data));
        at += 16 + length;
    }
    events
}

/// The protobuf fields of a message as (field number, varint or bytes).
fn proto_fields(mut data: &[u8]) -> Vec<(u64, u64, &[u8])> {
    let varint = |data: &mut &[u8]| {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let byte = data[0];
            *data = &data[1..];
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte < 0x80 {
                return value;
            }
        }
    };
    let mut fields = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data);
        let (number, wire) = (key >> 3, key & 7);
        let (value, bytes): (u64, &[u8]) = match wire {
            0 => (varint(&mut data), &[]),
            1 | 5 => {
                let size = if wire == 1 { 8 } else { 4 };
                let (bytes, rest) = data.split_at(size);
                data = rest;
                (0, bytes)
            }
            2 => {
                let length = varint(&mut data) as usize;
                let (bytes, rest) = data.split_at(length);
                data = rest;
                (0, bytes)
            }
            other => panic!("wire type {other}"),
        };
        fields.push((number, value, bytes));
    }
    fields
}

fn decode_event(data: &[u8]) -> Event {
    let mut event: Event = (0, None, Vec::new());
    for (number, value, bytes) in proto_fields(data) {
        match number {
            2 => event.0 = value,
            3 => event.1 = Some(String::from_utf8(bytes.to_vec()).unwrap()),
            5 => {
                for (_, _, value_message) in proto_fields(bytes) {
                    let (mut tag, mut simple) = (String::new(), f32::NAN);
                    for (field, _, bytes) in proto_fields(value_message) {
                        match field {
                            1 => tag = String::from_utf8(bytes.to_vec()).unwrap(),
                            2 => simple = f32::from_le_bytes(bytes.try_into().unwrap()),
                            _ => {}
                        }
                    }
                    event.2.push((tag, simple));
                }
            }
            _ => {}
        }
    }
    event
}

/// The reader above follows TensorBoard: it decodes an event file TensorBoard's own writer
/// made (scripts/check-tensorboard-reads-ours), checksums included.
#[test]
fn the_event_reader_reads_tensorboards_own_files() {
    let dir = repo_root().join("tests/fixtures/tensorboard/reference");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let events = read_events(&file);
    assert_eq!(events[0].1.as_deref(), Some("brain.Event:2"));
    let scalars: Vec<(u64, Vec<(String, f32)>)> =
        events[1..].iter().map(|e| (e.0, e.2.clone())).collect();
    let expected = [(1, 2.5f32), (2, 2.25), (300, 0.125)].map(|(step, loss)| {
        let lr = loss / 1000.0;
        (
            step,
            vec![
                ("train/loss".to_string(), loss),
                ("train/learning_rate".to_string(), lr),
            ],
        )
    });
    assert_eq!(scalars, expected);
}

/// Our event files: one per run folder, every training step once (also after a resume),
/// values those of metrics.jsonl under the grouped names; and TensorBoard itself read the
/// same tags and steps from such a run (recorded by scripts/check-tensorboard-reads-ours).
#[test]
fn tensorboard_event_files_hold_each_step_once() {
    let run = scratch_dir("tensorboard-run");
    let first = ["--set", "train.steps=12", "--set", "train.save_every=6"];
    assert_succeeded(&sft_command(&test_config(), &run, &first).output().unwrap());
    let resumed = [
        "--set",
        "train.steps=18",
        "--set",
        "train.save_every=6",
        "--resume",
        "auto",
    ];
    assert_succeeded(
        &sft_command(&test_config(), &run, &resumed)
            .output()
            .unwrap(),
    );

    let files: Vec<_> = std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]);
    assert_eq!(events[0].1.as_deref(), Some("brain.Event:2"));
    let metrics = trainer::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(events.len() - 1, metrics.len());
    for (event, line) in events[1..].iter().zip(&metrics) {
        assert_eq!(Some(event.0), line["step"].as_u64());
        for (name, value) in line.as_object().unwrap() {
            if matches!(name.as_str(), "step" | "time") {
                continue;
            }
            let tag = trainer::metrics::tracker_name(name);
            let found = event.2.iter().find(|(t, _)| *t == tag);
            let expected = value.as_f64().unwrap() as f32;
            assert_eq!(
                found.map(|f| f.1),
                Some(expected),
                "step {}: {tag}",
                event.0
            );
        }
    }

    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo_root().join("tests/fixtures/tensorboard/tensorboard_reads_ours.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let steps: Vec<u64> = (1..=12).collect();
    for tag in ["train/loss", "train/learning_rate", "train/grad_norm"] {
        assert_eq!(record["scalars"][tag], json!(steps), "{tag}");
    }
    assert_eq!(record["scalars"]["eval/loss"], json!([12]));
}

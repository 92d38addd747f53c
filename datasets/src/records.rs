//! Training records from JSONL or CSV files: prompt/response pairs or chat conversations.
//!
//! JSONL lines are `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}...]}`;
//! CSV files have `prompt` and `response` columns. A malformed line is an error naming the
//! file and the line.

use crate::tokenizer::ChatMessage;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    PromptResponse { prompt: String, response: String },
    Chat { messages: Vec<ChatMessage> },
}

#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum JsonRecord {
    PromptResponse { prompt: String, response: String },
    Chat { messages: Vec<ChatMessage> },
}

/// Reads a `.jsonl` or `.csv` file, chosen by extension.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let records = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => load_jsonl(path)?,
        Some("csv") => load_csv(path)?,
        _ => bail!(
            "{}: unknown data format (expected .jsonl or .csv)",
            path.display()
        ),
    };
    if records.is_empty() {
        bail!("{} holds no records", path.display());
    }
    Ok(records)
}

pub fn load_jsonl(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: JsonRecord = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a record ({e}); expected {{\"prompt\", \"response\"}} or {{\"messages\": [...]}}",
                path.display(),
                index + 1
            )
        })?;
        records.push(match parsed {
            JsonRecord::PromptResponse { prompt, response } => {
                Record::PromptResponse { prompt, response }
            }
            JsonRecord::Chat { messages } => {
                if messages.is_empty() {
                    bail!("{}:{}: `messages` is empty", path.display(), index + 1);
                }
                Record::Chat { messages }
            }
        });
    }
    Ok(records)
}

pub fn load_csv(path: &Path) -> Result<Vec<Record>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (prompt_col, response_col) = (column("prompt")?, column("response")?);
    let mut records = Vec::new();
    for (index, row) in reader.records().enumerate() {
        // Line numbers count the header as line 1.
        let row = row.map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), index + 2))?;
        let field = |col: usize| row.get(col).map(str::to_string);
        match (field(prompt_col), field(response_col)) {
            (Some(prompt), Some(response)) => {
                records.push(Record::PromptResponse { prompt, response })
            }
            _ => bail!(
                "{}:{}: missing prompt or response",
                path.display(),
                index + 2
            ),
        }
    }
    Ok(records)
}

/// Writes prompt/response records as JSONL.
pub fn write_jsonl(path: &Path, records: &[(String, String)]) -> Result<()> {
    let mut text = String::new();
    for (prompt, response) in records {
        text += &serde_json::json!({ "prompt": prompt, "response": response }).to_string();
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("records-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_both_record_kinds_and_csv() {
        let path = temp(
            "ok.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        );
        let records = load_records(&path).unwrap();
        assert_eq!(
            records[0],
            Record::PromptResponse {
                prompt: "a".into(),
                response: "b".into()
            }
        );
        assert!(matches!(&records[1], Record::Chat { messages } if messages[0].content == "hi"));

        let path = temp("ok.csv", "prompt,response\n\"1+1?\",\"2, of course\"\n");
        assert_eq!(
            load_records(&path).unwrap(),
            vec![Record::PromptResponse {
                prompt: "1+1?".into(),
                response: "2, of course".into()
            }]
        );
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let path = temp(
            "bad.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
        );
        let err = load_records(&path).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        let path = temp(
            "bad2.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n\nnot json\n",
        );
        assert!(load_records(&path)
            .unwrap_err()
            .to_string()
            .contains("bad2.jsonl:4"));
        let path = temp("bad.csv", "prompt,answer\nx,y\n");
        assert!(load_records(&path)
            .unwrap_err()
            .to_string()
            .contains("`response`"));
    }
}

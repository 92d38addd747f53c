//! Training records from JSONL, JSON-array, CSV or Parquet files: prompt/response pairs, chat
//! conversations, or plain text.
//!
//! A record is read by its fields, with the names TRL uses too: `{"prompt", "response"}` or
//! `{"prompt", "completion"}` (strings, or TRL's conversational message lists),
//! `{"messages": [{"role", "content"}...]}`, or `{"text"}` (every token trained on). Other
//! fields (`id`, `source`, ...) are ignored, but one that looks like a misspelt known field
//! (`promt`) is an error, as is a record of no known layout. A file whose fields have other
//! names maps them (`data.fields = {prompt = "question", response = "answer"}`).
//!
//! A `.jsonl` file holds one record a line; a `.json` file one JSON array of records (or JSON
//! lines); a `.csv` file one record a row, named by its header; a `.parquet` file (the Hugging
//! Face Hub's format) one record a row, its columns the fields (lists of structs for
//! messages). Every error names the file and the line, array index or row.

use crate::tokenizer::ChatMessage;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    PromptResponse {
        prompt: String,
        response: String,
    },
    Chat {
        messages: Vec<ChatMessage>,
    },
    /// Plain text, every token trained on (language modelling).
    Text {
        text: String,
    },
}

/// The field names a record is read by.
pub const KNOWN_FIELDS: [&str; 5] = ["prompt", "response", "completion", "messages", "text"];

/// `data.fields`: our field name -> the name it has in the user's file.
pub type FieldMap = BTreeMap<String, String>;

/// Checks a field map's keys: each must be a field records are read by.
pub fn check_field_map(fields: &FieldMap) -> Result<()> {
    for ours in fields.keys() {
        if !KNOWN_FIELDS.contains(&ours.as_str()) {
            bail!(
                "data.fields.{ours}: not a record field (expected one of {})",
                KNOWN_FIELDS.join(", ")
            );
        }
    }
    Ok(())
}

/// Where a record sits in its file, for error messages.
#[derive(Debug, Clone, Copy)]
enum Location {
    Line(usize),
    Index(usize),
    Row(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, ":{n}"),
            Location::Index(n) => write!(f, ": record [{n}]"),
            Location::Row(n) => write!(f, ": row {n}"),
        }
    }
}

/// Reads a `.jsonl`, `.json`, `.csv` or `.parquet` file, chosen by extension, with the
/// user's field names mapped to ours by `fields`.
pub fn load_records(path: &Path, fields: &FieldMap) -> Result<Vec<Record>> {
    let objects = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => json_objects(path)?,
        Some("csv") => csv_objects(path)?,
        Some("parquet") => parquet_objects(path)?,
        _ => bail!(
            "{}: unknown data format (expected .jsonl, .json, .csv or .parquet)",
            path.display()
        ),
    };
    if objects.is_empty() {
        bail!("{} holds no records", path.display());
    }
    objects
        .into_iter()
        .map(|(location, object)| {
            map_fields(object, fields)
                .and_then(|object| parse_record(&object))
                .with_context(|| format!("{}{location}", path.display()))
        })
        .collect()
}

/// Renames the user's fields to ours (`fields`: ours -> theirs).
fn map_fields(object: Value, fields: &FieldMap) -> Result<Value> {
    let Value::Object(mut object) = object else {
        bail!("not a JSON object");
    };
    for (ours, theirs) in fields {
        let value = object
            .remove(theirs)
            .with_context(|| format!("no field `{theirs}` (data.fields maps it to `{ours}`)"))?;
        if object.insert(ours.clone(), value).is_some() {
            bail!("has both `{ours}` and `{theirs}`, which data.fields maps to `{ours}`");
        }
    }
    Ok(Value::Object(object))
}

/// The JSON values of a JSON-lines file, or of a file holding one JSON array of records.
fn json_objects(path: &Path) -> Result<Vec<(Location, Value)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: not a JSON array of records ({e})", path.display())
        })?;
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(index, item)| (Location::Index(index), item))
            .collect());
    }
    let mut objects = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not JSON ({e})", path.display(), index + 1))?;
        objects.push((Location::Line(index + 1), value));
    }
    Ok(objects)
}

/// A CSV file's reader and its header row, errors naming the file.
pub(crate) fn open_csv(path: &Path) -> Result<(csv::Reader<std::fs::File>, csv::StringRecord)> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = reader
        .headers()
        .with_context(|| format!("{}: no header row", path.display()))?
        .clone();
    Ok((reader, headers))
}

/// The rows of a CSV file as objects of string fields named by the header.
fn csv_objects(path: &Path) -> Result<Vec<(Location, Value)>> {
    let (mut reader, headers) = open_csv(path)?;
    let mut objects = Vec::new();
    for (index, row) in reader.records().enumerate() {
        // Line numbers count the header as line 1.
        let line = index + 2;
        let row = row.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
        let object: Map<String, Value> = headers
            .iter()
            .zip(row.iter())
            .map(|(name, field)| (name.to_string(), Value::String(field.to_string())))
            .collect();
        objects.push((Location::Line(line), Value::Object(object)));
    }
    Ok(objects)
}

/// The rows of a Parquet file as JSON objects (columns are fields; lists and structs nest).
fn parquet_objects(path: &Path) -> Result<Vec<(Location, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("{}: cannot read its rows", path.display()))?;
    rows.enumerate()
        .map(|(index, row)| {
            let row = row.with_context(|| format!("{}: row {index}", path.display()))?;
            Ok((Location::Row(index), row.to_json_value()))
        })
        .collect()
}

/// One record from its JSON object (see the module comment for the layouts).
pub fn parse_record(value: &Value) -> Result<Record> {
    let Some(fields) = value.as_object() else {
        bail!("not a JSON object");
    };
    for name in fields.keys() {
        if let Some(known) = KNOWN_FIELDS
            .iter()
            .find(|known| *known != name && strsim::levenshtein(known, name) <= 2)
        {
            bail!("unknown field `{name}` (did you mean `{known}`?)");
        }
    }
    let string = |key: &str| -> Result<Option<&str>> {
        match fields.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => bail!("`{key}` must be a string"),
        }
    };
    if let Some(messages) = fields.get("messages") {
        return Ok(Record::Chat {
            messages: messages_of(messages, "messages")?,
        });
    }
    let answer_key = ["response", "completion"]
        .into_iter()
        .find(|k| fields.contains_key(*k));
    match (fields.get("prompt"), answer_key) {
        (Some(Value::Array(_)), Some(key)) => {
            // TRL's conversational prompt-completion: message lists on both sides.
            let mut messages = messages_of(&fields["prompt"], "prompt")?;
            messages.extend(messages_of(&fields[key], key)?);
            Ok(Record::Chat { messages })
        }
        (Some(_), Some(key)) => Ok(Record::PromptResponse {
            prompt: string("prompt")?.expect("present").to_string(),
            response: string(key)?.expect("present").to_string(),
        }),
        (Some(_), None) => bail!("has `prompt` but no `response` (or `completion`)"),
        (None, Some(key)) => bail!("has `{key}` but no `prompt`"),
        (None, None) => match string("text")? {
            Some(text) => Ok(Record::Text {
                text: text.to_string(),
            }),
            None => bail!(
                "not a record: expected {{\"prompt\", \"response\"}}, {{\"prompt\", \"completion\"}}, \
                 {{\"messages\": [...]}} or {{\"text\"}} (fields: {}; name yours in data.fields, \
                 e.g. data.fields = {{prompt = \"question\", response = \"answer\"}})",
                fields.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
    }
}

/// A non-empty list of `{"role", "content"}` messages under `key`.
fn messages_of(value: &Value, key: &str) -> Result<Vec<ChatMessage>> {
    let messages: Vec<ChatMessage> = serde_json::from_value(value.clone())
        .with_context(|| format!("`{key}` must be a list of {{\"role\", \"content\"}} messages"))?;
    if messages.is_empty() {
        bail!("`{key}` is empty");
    }
    Ok(messages)
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
        let records = load_records(&path, &FieldMap::new()).unwrap();
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
            load_records(&path, &FieldMap::new()).unwrap(),
            vec![Record::PromptResponse {
                prompt: "1+1?".into(),
                response: "2, of course".into()
            }]
        );
    }

    #[test]
    fn reads_trl_layouts_json_arrays_and_ignores_extra_fields() {
        let path = temp(
            "trl.jsonl",
            concat!(
                "{\"id\": 7, \"source\": \"web\", \"prompt\": \"a\", \"completion\": \"b\"}\n",
                "{\"text\": \"plain words\"}\n",
                "{\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}], ",
                "\"completion\": [{\"role\": \"assistant\", \"content\": \"r\"}]}\n",
            ),
        );
        let records = load_records(&path, &FieldMap::new()).unwrap();
        assert_eq!(
            records[0],
            Record::PromptResponse {
                prompt: "a".into(),
                response: "b".into()
            }
        );
        assert_eq!(
            records[1],
            Record::Text {
                text: "plain words".into()
            }
        );
        assert!(
            matches!(&records[2], Record::Chat { messages } if messages.len() == 2 && messages[1].role == "assistant")
        );
        let path = temp(
            "array.json",
            "[{\"prompt\": \"a\", \"response\": \"b\"}, {\"text\": \"t\"}]",
        );
        assert_eq!(load_records(&path, &FieldMap::new()).unwrap().len(), 2);
        let path = temp("bad-array.json", "[{\"text\": \"t\"}, {\"txet\": \"t\"}]");
        let err = format!("{:#}", load_records(&path, &FieldMap::new()).unwrap_err());
        assert!(
            err.contains("[1]") && err.contains("`txet`") && err.contains("`text`"),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_field_is_an_error_naming_it() {
        let path = temp(
            "typo.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"promt\": \"a\", \"response\": \"b\"}\n",
        );
        let err = format!("{:#}", load_records(&path, &FieldMap::new()).unwrap_err());
        assert!(
            err.contains("typo.jsonl:2") && err.contains("`promt`") && err.contains("`prompt`"),
            "{err}"
        );
        // Also beside a complete record: a typo must not be silently dropped.
        let path = temp(
            "typo2.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\", \"responce\": \"c\"}\n",
        );
        assert!(
            format!("{:#}", load_records(&path, &FieldMap::new()).unwrap_err())
                .contains("`responce`")
        );
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let path = temp(
            "bad.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\"}\n",
        );
        let err = load_records(&path, &FieldMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        let path = temp(
            "bad2.jsonl",
            "{\"prompt\": \"a\", \"response\": \"b\"}\n\n\nnot json\n",
        );
        assert!(load_records(&path, &FieldMap::new())
            .unwrap_err()
            .to_string()
            .contains("bad2.jsonl:4"));
        let path = temp("bad.csv", "prompt,answer\nx,y\n");
        let err = format!("{:#}", load_records(&path, &FieldMap::new()).unwrap_err());
        assert!(
            err.contains("bad.csv:2") && err.contains("`response`"),
            "{err}"
        );
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/data")
            .join(name)
    }

    fn fields(pairs: &[(&str, &str)]) -> FieldMap {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Parquet written by pyarrow (scripts/make-parquet-fixtures): columns mapped by
    /// `data.fields`, extra columns ignored, TRL's message lists read as a chat.
    #[test]
    fn reads_parquet_with_a_field_mapping() {
        let qa = fixture("qa.parquet");
        let records = load_records(
            &qa,
            &fields(&[("prompt", "question"), ("response", "answer")]),
        )
        .unwrap();
        assert_eq!(records.len(), 6);
        assert_eq!(
            records[1],
            Record::PromptResponse {
                prompt: "3+4=".into(),
                response: "7".into()
            }
        );
        // Without the mapping the file has no known layout, and the error says which fields
        // it found.
        let err = format!("{:#}", load_records(&qa, &FieldMap::new()).unwrap_err());
        assert!(
            err.contains("qa.parquet: row 0") && err.contains("question"),
            "{err}"
        );
        // A mapping to a column the file lacks names it.
        let err = load_records(
            &qa,
            &fields(&[("prompt", "questoin"), ("response", "answer")]),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("no field `questoin`"),
            "{err:#}"
        );

        let chat = load_records(&fixture("chat.parquet"), &FieldMap::new()).unwrap();
        assert!(matches!(&chat[5], Record::Chat { messages }
            if messages.len() == 2 && messages[0].content == "2+2=" && messages[1].content == "4"));
    }

    #[test]
    fn field_maps_apply_to_json_and_csv_too() {
        let map = fields(&[("prompt", "question"), ("response", "answer")]);
        let path = temp(
            "mapped.jsonl",
            "{\"question\": \"q\", \"answer\": \"a\", \"id\": 1}\n",
        );
        let expected = vec![Record::PromptResponse {
            prompt: "q".into(),
            response: "a".into(),
        }];
        assert_eq!(load_records(&path, &map).unwrap(), expected);
        let path = temp("mapped.csv", "id,question,answer\n1,q,a\n");
        assert_eq!(load_records(&path, &map).unwrap(), expected);
        let path = temp(
            "both.jsonl",
            "{\"prompt\": \"p\", \"question\": \"q\", \"answer\": \"a\"}\n",
        );
        let err = format!("{:#}", load_records(&path, &map).unwrap_err());
        assert!(err.contains("both `prompt` and `question`"), "{err}");
        assert!(check_field_map(&fields(&[("promt", "question")])).is_err());
    }
}

//! Verifiers score a response 1 (correct) or 0. A small trait so users can bring their own
//! task through an external command.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

/// One response to judge, with the prompt and the reference answer.
#[derive(Debug, Clone, Serialize)]
pub struct Judged<'a> {
    pub prompt: &'a str,
    pub response: &'a str,
    pub answer: &'a str,
}

pub trait Verifier {
    /// A score in [0, 1] for each item, in order.
    fn score(&self, items: &[Judged<'_>]) -> Result<Vec<f32>>;
}

/// `[verifier]` of a config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VerifierConfig {
    /// The last `#### <answer>` or `\boxed{<answer>}` equals the reference (numbers normalised).
    FinalAnswer,
    /// `sh -c <command>` reads JSON lines `{"prompt", "response", "answer"}` on stdin and
    /// writes one line per item: a number, or `{"score": number}`.
    Command { command: String },
}

impl VerifierConfig {
    pub fn build(&self) -> Box<dyn Verifier> {
        match self {
            Self::FinalAnswer => Box::new(FinalAnswer),
            Self::Command { command } => Box::new(ExternalCommand {
                command: command.clone(),
            }),
        }
    }
}

pub struct FinalAnswer;

impl Verifier for FinalAnswer {
    fn score(&self, items: &[Judged<'_>]) -> Result<Vec<f32>> {
        Ok(items
            .iter()
            .map(|item| match final_answer(item.response) {
                Some(given) if answers_match(&given, item.answer) => 1.0,
                _ => 0.0,
            })
            .collect())
    }
}

/// The text after the last `####`, or inside the last `\boxed{...}` (braces balanced).
pub fn final_answer(response: &str) -> Option<String> {
    let hashes = response.rfind("####").map(|at| {
        (
            at,
            response[at + 4..]
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        )
    });
    let boxed = response.rfind("\\boxed{").and_then(|at| {
        let body = &response[at + 7..];
        let mut depth = 1;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((at, body[..i].trim().to_string()));
                    }
                }
                _ => {}
            }
        }
        None
    });
    // Whichever marker comes last is the final answer.
    match (hashes, boxed) {
        (Some(h), Some(b)) => Some(if h.0 > b.0 { h.1 } else { b.1 }),
        (h, b) => h.or(b).map(|(_, text)| text),
    }
    .filter(|text| !text.is_empty())
}

/// Numbers compare by value (`1,000`, `1000.0`, `1e3`, `$1000` are equal); other answers
/// compare with spaces removed.
pub fn answers_match(given: &str, reference: &str) -> bool {
    match (parse_number(given), parse_number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        _ => normalise_text(given) == normalise_text(reference),
    }
}

fn parse_number(text: &str) -> Option<f64> {
    let cleaned: String = text
        .trim()
        .trim_end_matches('.')
        .trim_start_matches('$')
        .trim_end_matches('%')
        .chars()
        .filter(|c| *c != ',' && !c.is_whitespace())
        .collect();
    if cleaned.is_empty()
        || cleaned
            .chars()
            .any(|c| c.is_alphabetic() && c != 'e' && c != 'E')
    {
        return None;
    }
    if let Some((numerator, denominator)) = cleaned.split_once('/') {
        return Some(numerator.parse::<f64>().ok()? / denominator.parse::<f64>().ok()?);
    }
    cleaned.parse().ok()
}

fn normalise_text(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .trim_end_matches('.')
        .to_lowercase()
}

pub struct ExternalCommand {
    pub command: String,
}

impl Verifier for ExternalCommand {
    fn score(&self, items: &[Judged<'_>]) -> Result<Vec<f32>> {
        let mut child = Command::new("sh")
            .args(["-c", &self.command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start verifier `{}`", self.command))?;
        let mut input = String::new();
        for item in items {
            input += &serde_json::to_string(item)?;
            input.push('\n');
        }
        let mut stdin = child.stdin.take().expect("piped");
        // Write from a thread so a verifier that answers as it reads cannot deadlock us.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let reader = BufReader::new(child.stdout.take().expect("piped"));
        let mut scores = Vec::with_capacity(items.len());
        for (index, line) in reader.lines().enumerate() {
            let line = line?;
            let value: serde_json::Value = serde_json::from_str(&line).with_context(|| {
                format!(
                    "verifier `{}` line {}: not JSON: {line}",
                    self.command,
                    index + 1
                )
            })?;
            let score = value
                .as_f64()
                .or_else(|| value["score"].as_f64())
                .with_context(|| {
                    format!(
                        "verifier `{}` line {}: expected a number or {{\"score\": n}}",
                        self.command,
                        index + 1
                    )
                })?;
            scores.push(score as f32);
        }
        let _ = writer.join();
        let status = child.wait()?;
        if !status.success() {
            bail!("verifier `{}` exited with {status}", self.command);
        }
        if scores.len() != items.len() {
            bail!(
                "verifier `{}` answered {} scores for {} items",
                self.command,
                scores.len(),
                items.len()
            );
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(response: &str, answer: &str) -> f32 {
        FinalAnswer
            .score(&[Judged {
                prompt: "",
                response,
                answer,
            }])
            .unwrap()[0]
    }

    #[test]
    fn final_answers_in_both_formats_with_normalised_numbers() {
        assert_eq!(judge("3 + 4 = 7. #### 7", "7"), 1.0);
        assert_eq!(judge("so the total is #### 1,000", "1000"), 1.0);
        assert_eq!(judge("#### 1000.0", "1e3"), 1.0);
        assert_eq!(judge("#### $1,000.", "1000"), 1.0);
        assert_eq!(
            judge("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
            1.0
        );
        assert_eq!(judge("\\boxed{ 42 }", "42.00"), 1.0);
        assert_eq!(judge("#### 0.5", "1/2"), 1.0);
    }

    #[test]
    fn tricky_wrong_or_missing_answers_score_zero() {
        assert_eq!(
            judge("#### 7 then I changed my mind #### 8", "7"),
            0.0,
            "the last marker counts"
        );
        assert_eq!(judge("\\boxed{7} ... #### 8", "7"), 0.0);
        assert_eq!(judge("#### 8 ... \\boxed{7}", "7"), 1.0);
        assert_eq!(judge("the answer is 7", "7"), 0.0, "no marker, no answer");
        assert_eq!(judge("#### ", "7"), 0.0);
        assert_eq!(judge("\\boxed{7", "7"), 0.0, "unclosed box");
        assert_eq!(judge("#### 70", "7"), 0.0);
        assert_eq!(judge("#### 7e", "7"), 0.0);
        assert_eq!(judge("#### seven", "7"), 0.0);
    }

    #[test]
    fn external_command_verifier() {
        // Scores 1 when the response contains the answer.
        let script = r#"while IFS= read -r line; do case "$line" in *'"response":"yes'*) echo 1;; *) echo '{"score": 0}';; esac; done"#;
        let verifier = VerifierConfig::Command {
            command: script.into(),
        }
        .build();
        let items = [
            Judged {
                prompt: "p",
                response: "yes indeed",
                answer: "a",
            },
            Judged {
                prompt: "p",
                response: "no",
                answer: "a",
            },
        ];
        assert_eq!(verifier.score(&items).unwrap(), vec![1.0, 0.0]);
        let broken = VerifierConfig::Command {
            command: "echo 1".into(),
        }
        .build();
        let err = broken.score(&items).unwrap_err().to_string();
        assert!(err.contains("1 scores for 2 items"), "{err}");
    }
}

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

/// Whether a final answer states the reference, as a math grader reads them: numbers compare
/// by value (`1,000` = `1000.0` = `1e3` = `$1000`), fractions by value (`\frac{1}{2}`,
/// `\dfrac12`, `1/2` and `0.5` are one answer), a percentage matches its number or its
/// fraction (`50\%` = `50` = `0.5`), trailing units are dropped (`12 cm`, `5\text{ apples}`),
/// and LaTeX wrappers (`\boxed{}`, `\text{}`, `$...$`, `\left(`) do not count. Other answers
/// compare as text with spaces, case and wrappers removed.
pub fn answers_match(given: &str, reference: &str) -> bool {
    match (math_answer(given), math_answer(reference)) {
        (MathAnswer::Number(a, a_percent), MathAnswer::Number(b, b_percent)) => {
            let same = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0);
            same(a, b)
                || (a_percent && !b_percent && same(a / 100.0, b))
                || (b_percent && !a_percent && same(a, b / 100.0))
        }
        (MathAnswer::Text(a), MathAnswer::Text(b)) => a == b,
        _ => false,
    }
}

/// A final answer as [`answers_match`] compares it.
#[derive(Debug, PartialEq)]
enum MathAnswer {
    /// The value, and whether it was written as a percentage.
    Number(f64, bool),
    Text(String),
}

fn math_answer(text: &str) -> MathAnswer {
    let plain = strip_latex(text);
    match parse_number(&plain) {
        Some((value, percent)) => MathAnswer::Number(value, percent),
        None => MathAnswer::Text(
            plain
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .trim_end_matches('.')
                .to_lowercase(),
        ),
    }
}

/// The index of the `}` closing the `{` at `open`.
fn closing_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The argument of a LaTeX command at the start of `text`: `{...}` or a single character.
fn latex_argument(text: &str) -> Option<(&str, &str)> {
    if text.starts_with('{') {
        let close = closing_brace(text, 0)?;
        return Some((&text[1..close], &text[close + 1..]));
    }
    let first = text.chars().next()?;
    Some(text.split_at(first.len_utf8()))
}

/// `text` without LaTeX wrappers, spacing commands and dollar signs; `\frac{a}{b}` as `(a)/(b)`.
fn strip_latex(text: &str) -> String {
    let mut s = text.trim().replace('\u{2212}', "-");
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", " "),
        ("\\$", ""),
        ("$", ""),
        ("\\%", "%"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\(", ""),
        ("\\)", ""),
    ] {
        s = s.replace(from, to);
    }
    // Wrappers whose contents are the answer.
    for command in [
        "\\boxed", "\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox",
    ] {
        let opening = format!("{command}{{");
        while let Some(at) = s.find(&opening) {
            let open = at + command.len();
            let Some(close) = closing_brace(&s, open) else {
                break;
            };
            s = format!("{}{}{}", &s[..at], &s[open + 1..close], &s[close + 1..]);
        }
    }
    while let Some(at) = s.find("\\frac") {
        let rest = &s[at + 5..];
        let Some((numerator, rest)) = latex_argument(rest) else {
            break;
        };
        let Some((denominator, rest)) = latex_argument(rest) else {
            break;
        };
        s = format!("{}({numerator})/({denominator}){rest}", &s[..at]);
    }
    // `x = 5` and `x \approx 5` state 5.
    if let Some((name, value)) = s.split_once('=') {
        if name.trim().chars().all(|c| c.is_alphabetic() || c == '_') && !name.trim().is_empty() {
            s = value.to_string();
        }
    }
    s.trim().to_string()
}

/// The value of a number, a fraction `a/b` (parts optionally in parentheses), a percentage,
/// or any of these followed by units (words after a space); `None` for anything else.
fn parse_number(text: &str) -> Option<(f64, bool)> {
    let text = text.trim().trim_end_matches('.');
    // Trailing units: words after the number, separated by a space.
    let number = match text.find(char::is_whitespace) {
        Some(at) if text[at..].trim_start().starts_with(char::is_alphabetic) => &text[..at],
        _ => text,
    };
    let number: String = number.chars().filter(|c| !c.is_whitespace()).collect();
    let (number, percent) = match number.strip_suffix('%') {
        Some(rest) => (rest.to_string(), true),
        None => (number, false),
    };
    let number = without_outer_parentheses(&number);
    let value = match number.split_once('/') {
        Some((numerator, denominator)) => signed_part(numerator)? / signed_part(denominator)?,
        None => signed_part(number)?,
    };
    value.is_finite().then_some((value, percent))
}

/// A fraction's part: a number, possibly negated and in parentheses (`-(1)`, `(-1)`).
fn signed_part(text: &str) -> Option<f64> {
    let text = without_outer_parentheses(text);
    match text.strip_prefix('-') {
        Some(rest) if rest.starts_with('(') => Some(-signed_part(rest)?),
        _ => plain_number(text),
    }
}

/// `text` without parentheses that enclose all of it (`((1)/(3))` -> `(1)/(3)`).
fn without_outer_parentheses(mut text: &str) -> &str {
    while text.starts_with('(') {
        let mut depth = 0;
        let closes_at = text.char_indices().find_map(|(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            (depth == 0).then_some(i)
        });
        if closes_at != Some(text.len() - 1) {
            break;
        }
        text = &text[1..text.len() - 1];
    }
    text
}

/// A decimal number, with an optional sign, leading `$`, and commas only as thousands
/// separators (`1,000,000`, not `1,2`).
fn plain_number(text: &str) -> Option<f64> {
    let text = text.trim_start_matches('$');
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest.trim_start_matches('$')),
        None => ("", text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.contains(',') {
        let integer = digits.split(['.', 'e', 'E']).next().unwrap_or("");
        let groups: Vec<&str> = integer.split(',').collect();
        let well_formed = (1..=3).contains(&groups[0].len())
            && groups[1..].iter().all(|g| g.len() == 3)
            && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()));
        if !well_formed {
            return None;
        }
    }
    let cleaned = format!("{sign}{}", digits.replace(',', ""));
    if cleaned
        .chars()
        .any(|c| c.is_alphabetic() && c != 'e' && c != 'E')
        || !cleaned.chars().any(|c| c.is_ascii_digit())
    {
        return None;
    }
    cleaned.parse().ok()
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
    fn math_answers_equal_by_value() {
        let same = [
            ("\\frac{1}{2}", "0.5"),
            ("\\dfrac{1}{2}", "1/2"),
            ("\\tfrac12", "0.5"),
            ("\\frac{3}{4}", "75\\%"),
            ("-\\frac{1}{4}", "-0.25"),
            ("\\frac{-1}{4}", "-0.25"),
            ("50%", "50"),
            ("50\\%", "0.5"),
            ("1,234,567", "1234567"),
            ("$1,000.50", "1000.5"),
            ("\\$12", "12"),
            ("12 cm", "12"),
            ("5\\text{ apples}", "5"),
            ("5 apples", "5 oranges"),
            ("90^\\circ", "90"),
            ("x = 7", "7"),
            ("\\boxed{\\frac{2}{3}}", "2/3"),
            ("\\left(\\frac{1}{3}\\right)", "1/3"),
            ("\u{2212}3", "-3"),
            ("$\\frac{10}{4}$", "2.5"),
            ("\\text{Tuesday}", "tuesday"),
        ];
        for (given, reference) in same {
            assert!(answers_match(given, reference), "{given} = {reference}");
            assert!(answers_match(reference, given), "{reference} = {given}");
        }
        let different = [
            ("1,2", "12"),
            ("\\frac{1}{3}", "0.33"),
            ("50%", "5"),
            ("7e", "7"),
            ("12cm", "12"),
            ("2/3", "3/2"),
            ("\\text{Monday}", "tuesday"),
            ("-5", "5"),
        ];
        for (given, reference) in different {
            assert!(!answers_match(given, reference), "{given} != {reference}");
        }
    }

    #[test]
    fn boxed_answers_nest() {
        assert_eq!(
            judge(
                "so \\boxed{\\frac{\\sqrt{4}}{2}} hmm",
                "\\frac{\\sqrt{4}}{2}"
            ),
            1.0
        );
        assert_eq!(judge("\\boxed{\\boxed{\\dfrac{1}{2}}}", "0.5"), 1.0);
        assert_eq!(judge("\\boxed{\\text{12 cm}}", "12"), 1.0);
        assert_eq!(
            final_answer("\\boxed{a{b}c} and \\boxed{d}"),
            Some("d".to_string())
        );
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

//! Records to token rows: the text is rendered with the chat template or a plain template,
//! and each token is marked as trained on (response) or not (prompt, template, padding).

use crate::records::Record;
use crate::tokenizer::{ChatMessage, TextTokenizer};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// The prompt followed directly by the response and the end-of-sequence token.
    Plain,
    /// The tokenizer's chat template (user turn, assistant turn).
    Chat,
}

/// A tokenized sequence. `loss_mask[t]` is true when token `t` is a training target.
/// `segment[t]` tells packed sequences apart (1, 2, ...; all 1 when unpacked).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub tokens: Vec<u32>,
    pub loss_mask: Vec<bool>,
    pub segment: Vec<u32>,
}

impl TokenRow {
    /// One sequence in which every token is trained on (plain language modelling).
    pub fn all_trained(tokens: Vec<u32>) -> Self {
        Self {
            loss_mask: vec![true; tokens.len()],
            segment: vec![1; tokens.len()],
            tokens,
        }
    }

    fn push(&mut self, tokens: &[u32], trained: bool) {
        self.tokens.extend_from_slice(tokens);
        self.loss_mask
            .extend(std::iter::repeat_n(trained, tokens.len()));
        self.segment.extend(std::iter::repeat_n(1, tokens.len()));
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Cuts the row to `length` tokens; says whether anything was cut.
    pub fn truncate(&mut self, length: usize) -> bool {
        let cut = self.tokens.len() > length;
        self.tokens.truncate(length);
        self.loss_mask.truncate(length);
        self.segment.truncate(length);
        cut
    }

    /// Number of targets when training on this row (the first token is never one).
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Tokenizes one prompt/response pair: returns the prompt tokens and the response tokens
/// (ending with the end-of-sequence token when the tokenizer has one).
pub fn prompt_and_response(
    tokenizer: &TextTokenizer,
    template: Template,
    prompt: &str,
    response: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    match template {
        Template::Plain => {
            let mut answer = tokenizer.encode(response, false)?;
            answer.extend(tokenizer.stop_ids().first());
            Ok((tokenizer.encode(prompt, true)?, answer))
        }
        Template::Chat => {
            let user = [ChatMessage::new("user", prompt)];
            let prefix = tokenizer.apply_chat_template(&user, true)?;
            let full = tokenizer.apply_chat_template(
                &[user[0].clone(), ChatMessage::new("assistant", response)],
                false,
            )?;
            let Some(answer) = full.strip_prefix(&prefix) else {
                bail!("the chat template renders the prompt differently once an answer follows");
            };
            Ok((
                tokenizer.encode(&prefix, false)?,
                tokenizer.encode(answer, false)?,
            ))
        }
    }
}

/// Prompt text as the model sees it before answering (for generation).
pub fn prompt_tokens(
    tokenizer: &TextTokenizer,
    template: Template,
    prompt: &str,
) -> Result<Vec<u32>> {
    match template {
        Template::Plain => tokenizer.encode(prompt, true),
        Template::Chat => {
            let text = tokenizer.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?;
            tokenizer.encode(&text, false)
        }
    }
}

/// Tokenizes a record, training on response / assistant tokens only, cut to `max_length`.
pub fn tokenize_record(
    tokenizer: &TextTokenizer,
    template: Template,
    record: &Record,
    max_length: usize,
) -> Result<TokenRow> {
    let mut row = TokenRow {
        tokens: vec![],
        loss_mask: vec![],
        segment: vec![],
    };
    match record {
        Record::PromptResponse { prompt, response } => {
            let (prompt, answer) = prompt_and_response(tokenizer, template, prompt, response)?;
            row.push(&prompt, false);
            row.push(&answer, true);
        }
        Record::Text { text } => {
            row.push(&tokenizer.encode(text, true)?, true);
        }
        Record::Chat { messages } => {
            if template != Template::Chat {
                bail!("chat records need `template = \"chat\"`");
            }
            // Render growing prefixes of the conversation; each new piece is trained on when
            // it is an assistant turn (its generation prompt is not).
            let mut done = String::new();
            for (i, message) in messages.iter().enumerate() {
                if message.role == "assistant" {
                    let asking = tokenizer.apply_chat_template(&messages[..i], true)?;
                    let header = asking.strip_prefix(&done).unwrap_or(&asking).to_string();
                    row.push(&tokenizer.encode(&header, false)?, false);
                    done = asking;
                }
                let rendered = tokenizer.apply_chat_template(&messages[..=i], false)?;
                let Some(piece) = rendered.strip_prefix(&done) else {
                    bail!("the chat template does not render conversations incrementally");
                };
                row.push(
                    &tokenizer.encode(piece, false)?,
                    message.role == "assistant",
                );
                done = rendered;
            }
        }
    }
    row.truncate(max_length);
    Ok(row)
}

/// Concatenates rows into rows of at most `length` tokens; each keeps its own segment id so
/// attention and positions stay within it. Rows longer than `length` are cut.
pub fn pack(rows: &[TokenRow], length: usize) -> Vec<TokenRow> {
    let mut packed: Vec<TokenRow> = Vec::new();
    let mut current = TokenRow {
        tokens: vec![],
        loss_mask: vec![],
        segment: vec![],
    };
    let mut segment = 0;
    for row in rows {
        if !current.is_empty() && current.len() + row.len() > length {
            packed.push(std::mem::replace(
                &mut current,
                TokenRow {
                    tokens: vec![],
                    loss_mask: vec![],
                    segment: vec![],
                },
            ));
            segment = 0;
        }
        segment += 1;
        let take = row.len().min(length);
        current.tokens.extend_from_slice(&row.tokens[..take]);
        current.loss_mask.extend_from_slice(&row.loss_mask[..take]);
        current.segment.extend(std::iter::repeat_n(segment, take));
    }
    if !current.is_empty() {
        packed.push(current);
    }
    packed
}

/// A training batch on the host: inputs and next-token targets, right-padded to one width.
/// `segment` is 0 on padding; attention stays within a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub inputs: Vec<Vec<u32>>,
    pub targets: Vec<Vec<u32>>,
    pub target_mask: Vec<Vec<bool>>,
    pub positions: Vec<Vec<i64>>,
    pub segment: Vec<Vec<u32>>,
}

impl TokenBatch {
    /// Shifts each row into (input, target) pairs and pads on the right with `pad_id`.
    pub fn from_rows(rows: &[&TokenRow], pad_id: u32) -> Self {
        let width = rows
            .iter()
            .map(|r| r.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut batch = Self {
            inputs: vec![],
            targets: vec![],
            target_mask: vec![],
            positions: vec![],
            segment: vec![],
        };
        for row in rows {
            let n = row.len().saturating_sub(1);
            let pad = width - n;
            let padded = |values: &[u32], fill: u32| -> Vec<u32> {
                values
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(fill, pad))
                    .collect()
            };
            batch.inputs.push(padded(&row.tokens[..n], pad_id));
            batch.targets.push(padded(&row.tokens[1..n + 1], pad_id));
            // A target is trained on only when it belongs to the same packed segment.
            let mask: Vec<bool> = (0..n)
                .map(|t| row.loss_mask[t + 1] && row.segment[t + 1] == row.segment[t])
                .chain(std::iter::repeat_n(false, pad))
                .collect();
            batch.target_mask.push(mask);
            let segment = padded(&row.segment[..n], 0);
            let mut positions = Vec::with_capacity(width);
            let mut start = 0;
            for t in 0..width {
                if t > 0 && segment[t] != segment[t - 1] {
                    start = t;
                }
                positions.push(if segment[t] == 0 {
                    0
                } else {
                    (t - start) as i64
                });
            }
            batch.positions.push(positions);
            batch.segment.push(segment);
        }
        batch
    }

    /// The same rows as [`from_rows`](Self::from_rows), split into batches of rows of similar
    /// length, each padded only to its own longest row. Together they hold the same targets,
    /// so a token-mean loss over them is the one batch's loss, with less padding to compute.
    /// Where to split is chosen to minimise the padded tokens plus `batch_cost` tokens for
    /// each batch (what a batch costs beyond its tokens: more, smaller operations).
    pub fn split_by_length(rows: &[&TokenRow], pad_id: u32, batch_cost: usize) -> Vec<Self> {
        if rows.is_empty() {
            return vec![Self::from_rows(rows, pad_id)];
        }
        let mut sorted: Vec<&TokenRow> = rows.to_vec();
        sorted.sort_by_key(|row| row.len()); // stable: equal lengths keep their order
        let width = |row: &TokenRow| row.len().saturating_sub(1);
        // cheapest[j]: the least cost of the first j rows; start[j]: where its last batch starts.
        let mut cheapest = vec![0usize; sorted.len() + 1];
        let mut start = vec![0usize; sorted.len() + 1];
        for end in 1..=sorted.len() {
            let last_width = width(sorted[end - 1]);
            (cheapest[end], start[end]) = (0..end)
                .map(|from| {
                    (
                        cheapest[from] + (end - from) * last_width + batch_cost,
                        from,
                    )
                })
                .min()
                .expect("at least one split");
        }
        let mut bounds = vec![sorted.len()];
        while let Some(&end) = bounds.last().filter(|&&end| end > 0) {
            bounds.push(start[end]);
        }
        bounds.reverse();
        bounds
            .windows(2)
            .map(|pair| Self::from_rows(&sorted[pair[0]..pair[1]], pad_id))
            .collect()
    }

    pub fn num_targets(&self) -> usize {
        self.target_mask.iter().flatten().filter(|&&m| m).count()
    }

    pub fn width(&self) -> usize {
        self.inputs.first().map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tokens: &[u32], trained_from: usize) -> TokenRow {
        TokenRow {
            tokens: tokens.to_vec(),
            loss_mask: (0..tokens.len()).map(|i| i >= trained_from).collect(),
            segment: vec![1; tokens.len()],
        }
    }

    #[test]
    fn batches_shift_targets_and_mask_prompt_and_padding() {
        let a = row(&[10, 11, 12, 13], 2); // prompt 10 11, response 12 13
        let b = row(&[20, 21], 1);
        let batch = TokenBatch::from_rows(&[&a, &b], 0);
        assert_eq!(batch.inputs, vec![vec![10, 11, 12], vec![20, 0, 0]]);
        assert_eq!(batch.targets, vec![vec![11, 12, 13], vec![21, 0, 0]]);
        assert_eq!(
            batch.target_mask,
            vec![vec![false, true, true], vec![true, false, false]]
        );
        assert_eq!(batch.segment, vec![vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(batch.num_targets(), 3);
    }

    #[test]
    fn splitting_by_length_keeps_every_row_and_pads_less() {
        let lengths = [9, 3, 12, 4, 10, 3, 11, 5];
        let rows: Vec<TokenRow> = lengths
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                row(
                    &(0..len as u32)
                        .map(|t| t + 100 * r as u32)
                        .collect::<Vec<_>>(),
                    1,
                )
            })
            .collect();
        let all: Vec<&TokenRow> = rows.iter().collect();
        let whole = TokenBatch::from_rows(&all, 0);
        let padded = |batches: &[TokenBatch]| -> usize {
            batches.iter().map(|b| b.inputs.len() * b.width()).sum()
        };
        let split = TokenBatch::split_by_length(&all, 0, 4);
        assert!(split.len() > 1, "{} batches", split.len());
        assert!(padded(&split) < padded(std::slice::from_ref(&whole)));
        // The same rows, each exactly as in the one batch but without its padding.
        let unpadded = |batch: &TokenBatch| -> Vec<(Vec<u32>, Vec<u32>, Vec<bool>)> {
            (0..batch.inputs.len())
                .map(|r| {
                    let n = batch.segment[r].iter().filter(|&&s| s != 0).count();
                    let cut = |v: &Vec<u32>| v[..n].to_vec();
                    (
                        cut(&batch.inputs[r]),
                        cut(&batch.targets[r]),
                        batch.target_mask[r][..n].to_vec(),
                    )
                })
                .collect()
        };
        let mut expected = unpadded(&whole);
        let mut got: Vec<_> = split.iter().flat_map(unpadded).collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
        let targets: usize = split.iter().map(TokenBatch::num_targets).sum();
        assert_eq!(targets, whole.num_targets());
        // Each batch is padded to its own longest row, and the batches go shortest first.
        let widths: Vec<usize> = split.iter().map(TokenBatch::width).collect();
        assert!(widths.windows(2).all(|w| w[0] < w[1]), "{widths:?}");
        // Free batches: one per distinct length; costly batches: just one.
        assert_eq!(TokenBatch::split_by_length(&all, 0, 0).len(), 7);
        let one = TokenBatch::split_by_length(&all, 0, 1000);
        assert_eq!((one.len(), padded(&one)), (1, padded(&[whole])));
        assert_eq!(TokenBatch::split_by_length(&[], 0, 4).len(), 1);
    }

    #[test]
    fn packing_restarts_positions_and_never_trains_across_segments() {
        let packed = pack(
            &[row(&[1, 2, 3], 1), row(&[4, 5], 0), row(&[6, 7, 8, 9], 2)],
            6,
        );
        assert_eq!(packed.len(), 2);
        assert_eq!(packed[0].tokens, vec![1, 2, 3, 4, 5]);
        assert_eq!(packed[0].segment, vec![1, 1, 1, 2, 2]);
        let batch = TokenBatch::from_rows(&[&packed[0]], 0);
        assert_eq!(batch.positions[0], vec![0, 1, 2, 0]);
        // 3 -> 4 crosses segments: not a target even though 4 is trained on.
        assert_eq!(batch.target_mask[0], vec![true, true, false, true]);
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;
    use crate::tokenizer::ChatMessage;

    fn tokenizer() -> TextTokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/llama-gqa");
        TextTokenizer::from_folder(&dir).unwrap()
    }

    fn trained_text(tokenizer: &TextTokenizer, row: &TokenRow) -> String {
        let ids: Vec<u32> = row
            .tokens
            .iter()
            .zip(&row.loss_mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        tokenizer.decode(&ids, false).unwrap()
    }

    #[test]
    fn chat_records_train_on_assistant_turns_only() {
        let tokenizer = tokenizer();
        let record = Record::Chat {
            messages: vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "2+2?"),
                ChatMessage::new("assistant", "4"),
                ChatMessage::new("user", "and 3+3?"),
                ChatMessage::new("assistant", "6"),
            ],
        };
        let row = tokenize_record(&tokenizer, Template::Chat, &record, 512).unwrap();
        let whole = tokenizer.decode(&row.tokens, false).unwrap();
        assert_eq!(
            whole,
            tokenizer
                .apply_chat_template(&record_messages(&record), false)
                .unwrap()
        );
        // The answers and their end-of-turn markers, not the prompts or the headers.
        assert_eq!(trained_text(&tokenizer, &row), "4<|im_end|>\n6<|im_end|>\n");
    }

    #[test]
    fn prompt_response_in_both_templates() {
        let tokenizer = tokenizer();
        let record = Record::PromptResponse {
            prompt: "Tom has 3".into(),
            response: " apples".into(),
        };
        let plain = tokenize_record(&tokenizer, Template::Plain, &record, 512).unwrap();
        assert_eq!(trained_text(&tokenizer, &plain), " apples<|im_end|>");
        let chat = tokenize_record(&tokenizer, Template::Chat, &record, 512).unwrap();
        assert_eq!(trained_text(&tokenizer, &chat), " apples<|im_end|>\n");
        assert!(tokenizer
            .decode(&chat.tokens, false)
            .unwrap()
            .starts_with("<|im_start|>user\nTom has 3"));
        // Cut to max_length keeps the start.
        let cut = tokenize_record(&tokenizer, Template::Plain, &record, 3).unwrap();
        assert_eq!(cut.tokens, plain.tokens[..3].to_vec());
    }

    fn record_messages(record: &Record) -> Vec<ChatMessage> {
        match record {
            Record::Chat { messages } => messages.clone(),
            _ => unreachable!(),
        }
    }
}

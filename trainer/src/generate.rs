//! Batched generation with a KV cache: prompts are left-padded into one batch, the prompt
//! is processed once, then one token per step attends over the cache.

use crate::backend::on_a_pool_thread;
use crate::model::llama::{CausalLm, KvCache};
use crate::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use crate::sampling::{sample, sequence_rng, SamplingParams};
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    /// Generation of a sequence ends after it emits one of these (the token is kept).
    pub stop_tokens: Vec<u32>,
    pub pad_id: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens per prompt, the stop token included when one was emitted.
    pub tokens: Vec<Vec<u32>>,
    /// Whether each sequence ended on a stop token (else it hit `max_new_tokens`).
    pub stopped: Vec<bool>,
}

impl Generated {
    pub fn num_tokens(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }
}

/// The sampling defaults a model folder's `generation_config.json` sets (as `transformers`
/// reads them): `do_sample = false` means greedy; `eos_token_id` adds stop tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub eos_token_ids: Vec<u32>,
}

impl GenerationDefaults {
    /// Reads `dir/generation_config.json`; a folder without one has no defaults.
    pub fn from_folder(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let number = |key: &str| json.get(key).and_then(serde_json::Value::as_f64);
        let greedy = json.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false);
        let eos_token_ids = match json.get("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => ids
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(id) => id.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        Ok(Self {
            temperature: if greedy {
                Some(0.0)
            } else {
                number("temperature").map(|t| t as f32)
            },
            top_p: number("top_p").map(|p| p as f32),
            max_new_tokens: number("max_new_tokens").map(|n| n as usize),
            eos_token_ids,
        })
    }
}

/// New tokens that fit after the longest of `prompts` within the model's context
/// (`max_position_embeddings`); an error names a prompt that leaves no room.
pub fn room_for_new_tokens<B: Backend>(model: &CausalLm<B>, prompts: &[Vec<u32>]) -> Result<usize> {
    let context = model.config.max_position_embeddings;
    if let Some((i, prompt)) = prompts.iter().enumerate().find(|(_, p)| p.len() >= context) {
        bail!(
            "prompt {i} has {} tokens; the model's context (max_position_embeddings) is {context}, \
             so no token can follow it",
            prompt.len()
        );
    }
    Ok(context - prompts.iter().map(Vec::len).max().unwrap_or(0))
}

/// Generates continuations of `prompts`. Sequence `i` samples from its own generator seeded
/// by `(seed, i)`, so results are reproducible and independent of the batch size. Generation
/// stops at the model's context length whatever `max_new_tokens` says.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
) -> Result<Generated> {
    generate_streaming(model, prompts, config, |_, _| {})
}

/// As [`generate`], calling `on_token(row, token)` for each new token as soon as it is chosen.
/// Runs on a thread of the thread pool (see [`on_a_pool_thread`]).
pub fn generate_streaming<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_token: impl FnMut(usize, u32) + Send,
) -> Result<Generated> {
    on_a_pool_thread(|| generate_here(model, prompts, config, on_token))
}

/// [`generate_streaming`] on this thread.
fn generate_here<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Generated> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: generation needs at least one token to start from");
    }
    let max_new_tokens = config
        .max_new_tokens
        .min(room_for_new_tokens(model, prompts)?);
    let device = model.device();
    let rows = prompts.len();
    let batch = PaddedBatch::left_padded(prompts, config.pad_id);
    let mut valid = batch.valid.clone();
    let positions = batch.positions();
    let mut next_position: Vec<i64> = positions
        .iter()
        .map(|p| p.last().copied().unwrap_or(0) + 1)
        .collect();
    let mut rngs: Vec<_> = (0..rows as u64)
        .map(|i| sequence_rng(config.seed, i))
        .collect();
    let mut out = Generated {
        tokens: vec![vec![]; rows],
        stopped: vec![false; rows],
    };
    if max_new_tokens == 0 || rows == 0 {
        return Ok(out);
    }

    let mut cache = KvCache::new(model.num_layers());
    let mut logits = model.forward_cached_last(
        token_tensor(&batch.tokens, &device),
        int_tensor(&positions, &device),
        causal_mask(&valid, batch.width(), &device),
        &mut cache,
    );
    for step in 0..max_new_tokens {
        let last = last_position_logits(logits);
        let vocab = last.len() / rows;
        // Rows sample on the thread pool, each from its own generator: the same tokens as
        // one after the other.
        let sampled: Vec<u32> = rngs
            .par_iter_mut()
            .zip(&out.stopped)
            .zip(last.par_chunks(vocab))
            .map(|((rng, &finished), logits)| match finished {
                true => config.pad_id,
                false => sample(logits, &config.sampling, rng),
            })
            .collect();
        let mut step_tokens = Vec::with_capacity(rows);
        for (row, &token) in sampled.iter().enumerate() {
            let finished = out.stopped[row];
            if !finished {
                out.tokens[row].push(token);
                out.stopped[row] = config.stop_tokens.contains(&token);
                on_token(row, token);
            }
            // A finished row keeps running (batch shapes stay fixed) but its tokens are
            // invisible to attention.
            valid[row].push(!finished);
            step_tokens.push(vec![token]);
        }
        if step + 1 == max_new_tokens || out.stopped.iter().all(|&s| s) {
            break;
        }
        let step_positions: Vec<Vec<i64>> = next_position.iter().map(|&p| vec![p]).collect();
        next_position.iter_mut().for_each(|p| *p += 1);
        logits = model.forward_cached_last(
            token_tensor(&step_tokens, &device),
            int_tensor(&step_positions, &device),
            causal_mask(&valid, 1, &device),
            &mut cache,
        );
    }
    Ok(out)
}

/// Logits of the last position of every row, flattened `[batch * vocab]` on the host.
fn last_position_logits<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [batch, seq, vocab] = logits.dims();
    logits
        .slice([0..batch, seq - 1..seq, 0..vocab])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("float logits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::ParamInit;
    use crate::model::llama::LlamaConfig;
    use crate::sampling::argmax;
    use crate::Cpu;

    fn tiny_model() -> CausalLm<Cpu> {
        let config = LlamaConfig::tiny(50, 32, 2, 4, 2);
        CausalLm::new(&config, &mut ParamInit::normal(3, 0.3), &Default::default())
    }

    /// Greedy decoding the slow way: the whole sequence through the model at every step.
    fn greedy_without_cache(
        model: &CausalLm<Cpu>,
        prompts: &[Vec<u32>],
        steps: usize,
    ) -> Vec<Vec<u32>> {
        let device = Default::default();
        let mut rows: Vec<Vec<u32>> = prompts.to_vec();
        for _ in 0..steps {
            let batch = PaddedBatch::left_padded(&rows, 0);
            let logits = model.forward(
                token_tensor(&batch.tokens, &device),
                int_tensor(&batch.positions(), &device),
                causal_mask(&batch.valid, batch.width(), &device),
            );
            let last = last_position_logits(logits);
            let vocab = last.len() / rows.len();
            for (i, row) in rows.iter_mut().enumerate() {
                row.push(argmax(&last[i * vocab..(i + 1) * vocab]));
            }
        }
        rows.iter()
            .zip(prompts)
            .map(|(row, p)| row[p.len()..].to_vec())
            .collect()
    }

    fn config(max_new_tokens: usize, sampling: SamplingParams) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens,
            sampling,
            seed: 11,
            stop_tokens: vec![],
            pad_id: 0,
        }
    }

    #[test]
    fn cached_greedy_equals_uncached_greedy() {
        let model = tiny_model();
        let prompts = vec![vec![3, 14, 15, 9, 2, 6], vec![5, 35], vec![8, 9, 7, 9]];
        let cached = generate(&model, &prompts, &config(10, SamplingParams::greedy())).unwrap();
        assert_eq!(cached.tokens, greedy_without_cache(&model, &prompts, 10));
    }

    #[test]
    fn sampling_is_seeded_and_independent_of_batch_mates() {
        let model = tiny_model();
        let sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
        };
        let prompts = vec![vec![1, 2, 3], vec![4, 5]];
        let together = generate(&model, &prompts, &config(8, sampling.clone())).unwrap();
        let again = generate(&model, &prompts, &config(8, sampling.clone())).unwrap();
        assert_eq!(together, again);
        let alone = generate(&model, &prompts[..1], &config(8, sampling)).unwrap();
        assert_eq!(alone.tokens[0], together.tokens[0]);
    }

    #[test]
    fn stops_on_stop_token_and_keeps_it() {
        let model = tiny_model();
        let prompts = vec![vec![1, 2, 3], vec![7, 7]];
        let free = generate(&model, &prompts, &config(6, SamplingParams::greedy())).unwrap();
        // Declare the third token of the first row a stop token: row 0 must end there.
        let stop = free.tokens[0][2];
        let mut stopping = config(6, SamplingParams::greedy());
        stopping.stop_tokens = vec![stop];
        let stopped = generate(&model, &prompts, &stopping).unwrap();
        let first_stop = free.tokens[0].iter().position(|&t| t == stop).unwrap();
        assert_eq!(stopped.tokens[0], free.tokens[0][..=first_stop].to_vec());
        assert!(stopped.stopped[0]);
        let row1_stop = free.tokens[1].iter().position(|&t| t == stop);
        match row1_stop {
            Some(p) => assert_eq!(stopped.tokens[1], free.tokens[1][..=p].to_vec()),
            None => assert_eq!(stopped.tokens[1], free.tokens[1]),
        }
    }

    #[test]
    fn generation_stops_at_the_context_length_and_streams() {
        let mut model = tiny_model();
        model.config.max_position_embeddings = 8;
        let mut streamed = vec![];
        let out = generate_streaming(
            &model,
            &[vec![1, 2, 3]],
            &config(100, SamplingParams::greedy()),
            |row, token| streamed.push((row, token)),
        )
        .unwrap();
        assert_eq!(
            out.tokens[0].len(),
            5,
            "3 prompt tokens + 5 new fill the context of 8"
        );
        let tokens: Vec<u32> = streamed.iter().map(|&(_, t)| t).collect();
        assert_eq!(tokens, out.tokens[0]);
        let error = generate(&model, &[vec![1; 8]], &config(1, SamplingParams::greedy()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_position_embeddings"), "{error}");
    }

    #[test]
    fn empty_prompt_is_an_error() {
        let err = generate(
            &tiny_model(),
            &[vec![1], vec![]],
            &config(2, SamplingParams::greedy()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("prompt 1"), "{err}");
    }
}

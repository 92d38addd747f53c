//! The decoder API every recipe builds on: one loop over input embeddings, an attention
//! context that survives dropping and re-inserting tokens, per-layer key/value stores (a
//! read-only prefix beside a written one), attention probabilities, and removing layers.

mod common;

use burn::prelude::*;
use common::*;
use serde_json::Value;
use trainer::model::init::ParamInit;
use trainer::model::llama::{
    Caches, Context, KvAccess, KvCache, LayerExec, LayerKv, LlamaConfig, TokenSlots,
};
use trainer::model::mask::{causal_mask, int_tensor, token_tensor, PaddedBatch};
use trainer::{CausalLm, Cpu};

type B = Cpu;

fn tiny(layers: usize) -> CausalLm<B> {
    let config = LlamaConfig::tiny(64, 32, layers, 4, 2);
    CausalLm::new(
        &config,
        &mut ParamInit::normal(21, 0.1),
        &Default::default(),
    )
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn ints(rows: &[Vec<i64>]) -> Tensor<B, 2, Int> {
    int_tensor(rows, &Default::default())
}

/// Two rows of 10 tokens, no padding.
fn tokens() -> Vec<Vec<u32>> {
    (0..2)
        .map(|r| {
            (0..10)
                .map(|i| ((i * 7 + r * 13 + 3) % 64) as u32)
                .collect()
        })
        .collect()
}

fn slots_of(rows: &[Vec<u32>]) -> TokenSlots<B> {
    let batch = PaddedBatch::left_padded(rows, 0);
    TokenSlots::from_rows(&batch.positions(), &batch.valid, &Default::default())
}

/// `hidden` through `layers`, each dense, in `context` (no cache).
fn run_layers(
    model: &CausalLm<B>,
    layers: std::ops::Range<usize>,
    mut hidden: Tensor<B, 3>,
    context: &Context<B>,
) -> Tensor<B, 3> {
    for index in layers {
        hidden = model
            .run_layer(index, hidden, context, KvAccess::none(), &LayerExec::Dense)
            .hidden;
    }
    hidden
}

/// The same context with the tokens flagged in `hidden_tokens` made invisible as keys.
fn masking_out(context: &Context<B>, hidden_tokens: &[Vec<bool>]) -> Context<B> {
    let flat: Vec<bool> = hidden_tokens.iter().flatten().map(|h| !h).collect();
    let [batch, width] = context.tokens.positions.dims();
    let keep = Tensor::<B, 2, Bool>::from_data(
        burn::tensor::TensorData::new(flat, [batch, width]),
        &Default::default(),
    );
    let mut masked = context.clone();
    masked.tokens.valid = masked.tokens.valid.bool_and(keep);
    masked
}

/// Rows of `hidden: [batch, n, dim]` at per-row `indices`.
fn rows_at(hidden: Tensor<B, 3>, indices: &[Vec<i64>]) -> Tensor<B, 3> {
    let [batch, _, dim] = hidden.dims();
    let k = indices[0].len();
    hidden.gather(
        1,
        ints(indices).reshape([batch, k, 1]).expand([batch, k, dim]),
    )
}

#[test]
fn decode_of_embeddings_equals_forward_of_tokens() {
    let model = tiny(3);
    let rows = vec![vec![5, 9, 11, 3, 60, 2], vec![7, 1, 33]];
    let device = Default::default();
    let batch = PaddedBatch::left_padded(&rows, 0);
    let tokens = token_tensor(&batch.tokens, &device);
    let logits = model.forward(
        tokens.clone(),
        int_tensor(&batch.positions(), &device),
        causal_mask(&batch.valid, batch.width(), &device),
    );
    // The context built from the tokens' slots (no index mask) gives the same real rows.
    let context = model.context(slots_of(&rows));
    let decoded = model.decode(
        model.embed(tokens),
        &context,
        Caches::default(),
        &mut model.inference_plan(),
    );
    let (ours, theirs) = (values(model.head(decoded.hidden)), values(logits));
    let vocab = 64;
    for (row, valid) in batch.valid.iter().enumerate() {
        for col in (0..batch.width()).filter(|&c| valid[c]) {
            let at = (row * batch.width() + col) * vocab..(row * batch.width() + col + 1) * vocab;
            assert_eq!(ours[at.clone()], theirs[at], "row {row} col {col}");
        }
    }
}

#[test]
fn dropping_tokens_mid_stack_equals_masking_them_out() {
    let model = tiny(4);
    let rows = tokens();
    let k = 1; // drop after layer 1
    let context = model.context(slots_of(&rows));
    let embeds = model.embed(token_tensor(&rows, &Default::default()));
    let after_k = run_layers(&model, 0..k + 1, embeds, &context);

    // Row 0 drops tokens 2, 5, 6; row 1 drops 0, 3, 9 (the same count per row).
    let keep: Vec<Vec<i64>> = vec![vec![0, 1, 3, 4, 7, 8, 9], vec![1, 2, 4, 5, 6, 7, 8]];
    let (short_context, short) = context.select(after_k.clone(), ints(&keep));
    let dropped = run_layers(&model, k + 1..4, short, &short_context);

    let removed: Vec<Vec<bool>> = keep
        .iter()
        .map(|kept| (0..10).map(|i| !kept.contains(&i)).collect())
        .collect();
    let reference = run_layers(&model, k + 1..4, after_k, &masking_out(&context, &removed));
    let reference = values(rows_at(reference, &keep));
    let error = max_abs_diff(&values(dropped), &reference);
    assert!(error < 1e-5, "survivors differ by {error}");
}

#[test]
fn reinserting_tokens_with_their_positions_equals_masking_them_until_then() {
    let model = tiny(4);
    let rows = tokens();
    let k = 2; // tokens re-enter before layer 2, as their layer-0 embeddings
    let context = model.context(slots_of(&rows));
    let embeds = model.embed(token_tensor(&rows, &Default::default()));
    let late: Vec<Vec<i64>> = vec![vec![2, 3, 4], vec![5, 6, 7]];
    let early: Vec<Vec<i64>> = late
        .iter()
        .map(|l| (0..10).filter(|i| !l.contains(i)).collect())
        .collect();

    let (early_context, early_hidden) = context.select(embeds.clone(), ints(&early));
    let (late_context, late_hidden) = context.select(embeds.clone(), ints(&late));
    let early_hidden = run_layers(&model, 0..k, early_hidden, &early_context);
    let (merged_context, merged) = early_context.insert(early_hidden, &late_context, late_hidden);
    assert_eq!(
        values(merged_context.tokens.positions.clone().float()),
        values(context.tokens.positions.clone().float()),
        "every token back at its place"
    );
    let ours = run_layers(&model, k..4, merged, &merged_context);

    // Reference: all tokens throughout, the late ones invisible before layer k and reset to
    // their embeddings there.
    let is_late: Vec<Vec<bool>> = late
        .iter()
        .map(|l| (0..10).map(|i| l.contains(&i)).collect())
        .collect();
    let hidden = run_layers(
        &model,
        0..k,
        embeds.clone(),
        &masking_out(&context, &is_late),
    );
    let flags: Vec<f32> = is_late.iter().flatten().map(|&l| l as i32 as f32).collect();
    let late_mask = Tensor::<B, 1>::from_floats(flags.as_slice(), &Default::default())
        .reshape([2, 10, 1])
        .equal_elem(1.0)
        .expand([2, 10, 32]);
    let hidden = hidden.mask_where(late_mask, embeds);
    let reference = run_layers(&model, k..4, hidden, &context);
    let error = max_abs_diff(&values(ours), &values(reference));
    assert!(error < 1e-5, "differ by {error}");
}

/// Logits of the text tokens, decoded after the frame tokens, two ways: with the frames in a
/// read-only prefix cache and the text in its own (masks from the slots), and with one
/// concatenated cache (explicit masks).
fn two_caches_against_one(text_start: i64) {
    let model = tiny(3);
    let device = Default::default();
    let frames: Vec<u32> = (0..6).map(|i| (i * 5 + 1) % 64).collect();
    let text: Vec<u32> = vec![9, 17, 4, 40];
    let frame_positions: Vec<i64> = (0..6).collect();
    let text_positions: Vec<i64> = (0..4).map(|i| text_start + i).collect();
    let tok = |t: &[u32]| token_tensor(&[t.to_vec()], &device);

    // Two stores: frames written once into their own cache, then read only.
    let mut frame_cache = KvCache::new(3);
    let frame_slots = TokenSlots::from_rows(
        std::slice::from_ref(&frame_positions),
        &[vec![true; 6]],
        &device,
    );
    model.decode(
        model.embed(tok(&frames)),
        &model.context(frame_slots),
        Caches::written(&mut frame_cache),
        &mut model.inference_plan(),
    );
    let mut text_cache = KvCache::new(3);
    let mut two = Vec::new();
    // The text as a prefill of three tokens, then one token with the caches.
    for (range, positions) in [(0..3, &text_positions[0..3]), (3..4, &text_positions[3..4])] {
        let slots =
            TokenSlots::from_rows(&[positions.to_vec()], &[vec![true; range.len()]], &device);
        let decoded = model.decode(
            model.embed(tok(&text[range])),
            &model.context(slots),
            Caches {
                prefix: Some(&frame_cache),
                cache: Some(&mut text_cache),
            },
            &mut model.inference_plan(),
        );
        two.extend(values(model.head(decoded.hidden)));
    }
    assert_eq!(text_cache.len_of(0), 4);
    assert_eq!(frame_cache.len_of(0), 6, "the prefix stays read-only");

    // One store: frames then text, with index masks (frames all visible to text).
    let mut cache = KvCache::new(3);
    let mut one = Vec::new();
    let steps: [(Vec<u32>, Vec<i64>, usize); 3] = [
        (frames.clone(), frame_positions, 0),
        (text[0..3].to_vec(), text_positions[0..3].to_vec(), 6),
        (text[3..4].to_vec(), text_positions[3..4].to_vec(), 9),
    ];
    for (index, (chunk, positions, before)) in steps.into_iter().enumerate() {
        let keys = before + chunk.len();
        let valid = vec![vec![true; keys]];
        let context = model.masked_context(
            int_tensor(&[positions], &device),
            causal_mask::<B>(&valid, chunk.len(), &device),
        );
        let decoded = model.decode(
            model.embed(tok(&chunk)),
            &context,
            Caches::written(&mut cache),
            &mut model.inference_plan(),
        );
        if index > 0 {
            one.extend(values(model.head(decoded.hidden)));
        }
    }
    let error = max_abs_diff(&two, &one);
    assert!(
        error < 1e-5,
        "text starting at {text_start}: differ by {error}"
    );
}

#[test]
fn a_read_only_prefix_cache_beside_a_written_one_equals_one_cache() {
    two_caches_against_one(6); // text continues the frames' positions
    two_caches_against_one(0); // text positions restart at 0, overlapping the frames'
    two_caches_against_one(10_000); // text at a large offset
}

#[test]
fn layers_may_hold_different_tokens_in_their_caches() {
    let model = tiny(4);
    let device = Default::default();
    let prompt: Vec<u32> = (0..8).map(|i| (i * 9 + 2) % 64).collect();
    let slots = TokenSlots::from_rows(&[(0..8).collect()], &[vec![true; 8]], &device);
    let mut full = KvCache::new(4);
    model.decode(
        model.embed(token_tensor(&[prompt], &device)),
        &model.context(slots),
        Caches::written(&mut full),
        &mut model.inference_plan(),
    );
    // Layer 3 forgets tokens 2 and 5: removed from its store, or kept but made invisible.
    let keep = ints(&[vec![0, 1, 3, 4, 6, 7]]);
    let layer = full.layers[3].clone().unwrap();
    let mut shorter = full.clone();
    let gather = |t: Tensor<B, 4>| {
        let [b, h, _, d] = t.dims();
        t.gather(2, keep.clone().reshape([b, 1, 6, 1]).expand([b, h, 6, d]))
    };
    shorter.layers[3] = Some(LayerKv::new(
        gather(layer.keys()),
        gather(layer.values()),
        layer.slots.as_ref().map(|slots| slots.select(keep.clone())),
    ));
    let mut masked = full.clone();
    let mut slots = layer.slots.clone().unwrap();
    slots.valid = Tensor::from_data(
        [[true, true, false, true, true, false, true, true]],
        &device,
    );
    masked.layers[3] = Some(LayerKv::new(layer.keys(), layer.values(), Some(slots)));
    assert_eq!((shorter.len_of(2), shorter.len_of(3)), (8, 6));

    let next = |cache: &mut KvCache<B>| {
        let slots = TokenSlots::from_rows(&[vec![8]], &[vec![true]], &device);
        let decoded = model.decode(
            model.embed(token_tensor(&[vec![33]], &device)),
            &model.context(slots),
            Caches::written(cache),
            &mut model.inference_plan(),
        );
        values(model.head(decoded.hidden))
    };
    let (a, b) = (next(&mut shorter), next(&mut masked));
    assert!(max_abs_diff(&a, &b) < 1e-5);
    // And layer 3 forgetting does change the result.
    assert!(max_abs_diff(&a, &next(&mut full.clone())) > 1e-4);
}

#[test]
fn attention_probabilities_match_transformers_output_attentions() {
    let fixture = repo_root().join("tests/fixtures/hf/llama-gqa");
    let model = CausalLm::<B>::load(&fixture, &Default::default()).unwrap();
    let reference = checkpoints::WeightSource::open(&[
        repo_root().join("tests/fixtures/decoder/attentions.safetensors")
    ])
    .unwrap();
    let prompt: Vec<Vec<u32>> = {
        let text = std::fs::read_to_string(fixture.join("reference.json")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        vec![serde_json::from_value(json["prompt_ids"][0].clone()).unwrap()]
    };
    let device = Default::default();
    let context = model.context(slots_of(&prompt)).returning_probs();
    let decoded = model.decode(
        model.embed(token_tensor(&prompt, &device)),
        &context,
        Caches::default(),
        &mut model.inference_plan(),
    );
    assert_eq!(decoded.attentions.len(), 2);
    for (layer, ours) in decoded.attentions.into_iter().enumerate() {
        let theirs = reference.get(&format!("layer_{layer}")).unwrap();
        assert_eq!(ours.dims().to_vec(), theirs.shape);
        let error = max_abs_diff(&values(ours), &theirs.data);
        // f32 rounding: the projections' products sum in another order than PyTorch's (on
        // the CPU the one-row product of `model/skinny_matmul.rs`); measured about 1e-5.
        assert!(error < 3e-5, "layer {layer}: {error}");
    }
}

#[test]
fn retained_layers_compute_the_kept_layers_and_save_the_new_depth() {
    let fixture = repo_root().join("tests/fixtures/hf/llama-gqa");
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo_root().join("tests/fixtures/decoder/retained_loads_ours.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["loaded"], true);
    assert_eq!(record["num_hidden_layers"], 1);
    assert!(record["max_abs_error"].as_f64().unwrap() < 1e-4);

    let full = CausalLm::<B>::load(&fixture, &Default::default()).unwrap();
    let rows = tokens();
    let context = full.context(slots_of(&rows));
    let embeds = full.embed(token_tensor(&rows, &Default::default()));
    let expected = full.head(run_layers(&full, 1..2, embeds.clone(), &context));

    let retained = CausalLm::<B>::load(&fixture, &Default::default())
        .unwrap()
        .retain_layers(&[1])
        .unwrap();
    let out = scratch_dir("retained");
    retained
        .save(&out, checkpoints::StoreDtype::F32, None)
        .unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let reloaded = CausalLm::<B>::load(&out, &Default::default()).unwrap();
    let decoded = reloaded.decode(
        embeds,
        &context,
        Caches::default(),
        &mut reloaded.inference_plan(),
    );
    assert_eq!(values(reloaded.head(decoded.hidden)), values(expected));
    assert!(full.clone().retain_layers(&[2]).is_err());
    assert!(full.retain_layers(&[0, 0]).is_err());
}

//! Attention and what it reads: the context of the hidden rows and per-layer key/value stores.
//!
//! A [`Context`] describes the rows of the hidden sequence: their position ids (rotary angles
//! and causal order), whether each is a real token, and its group (packed sequences attend
//! within their group). Unless a caller passes an explicit mask, who may attend to whom follows
//! from those: a key is visible to a query when it is real, in the same group and not after it
//! by position id. So the sequence can be edited between layers — [`Context::select`] drops
//! rows, [`Context::insert`] puts rows back — and tokens keep their position ids and their
//! causal order, which an index-based mask would lose.
//!
//! Each layer keeps its own keys, values and their token slots ([`LayerKv`]), so layers may
//! hold different positions. A read-only prefix store (frames, say) can sit beside the written
//! one: everything real in it is visible to every query.

use super::config::LlamaConfig;
use super::init::ParamInit;
use super::layers::{Linear, Rope, RopeTables};
use burn::prelude::*;
use burn::tensor::TensorData;
use std::sync::{Arc, Mutex};

/// Where each token of a sequence sits, `[batch, n]` each.
#[derive(Debug, Clone)]
pub struct TokenSlots<B: Backend> {
    /// Position ids: rotary angles and causal order.
    pub positions: Tensor<B, 2, Int>,
    /// False on padding (and on any token that must not be seen).
    pub valid: Tensor<B, 2, Bool>,
    /// Tokens attend within their group only (packed sequences); 0 for plain rows.
    pub groups: Tensor<B, 2, Int>,
}

impl<B: Backend> TokenSlots<B> {
    /// Slots of plain rows (one group) from host values.
    pub fn from_rows(positions: &[Vec<i64>], valid: &[Vec<bool>], device: &B::Device) -> Self {
        let (batch, width) = (positions.len(), positions.first().map_or(0, Vec::len));
        let flat_valid: Vec<bool> = valid.iter().flatten().copied().collect();
        Self {
            positions: super::mask::int_tensor(positions, device),
            valid: Tensor::from_data(TensorData::new(flat_valid, [batch, width]), device),
            groups: Tensor::zeros([batch, width], device),
        }
    }

    /// Every token real, one group.
    pub fn at_positions(positions: Tensor<B, 2, Int>) -> Self {
        let device = positions.device();
        let dims = positions.dims();
        Self {
            valid: Tensor::<B, 2, Int>::ones(dims, &device).equal_elem(1),
            groups: Tensor::zeros(dims, &device),
            positions,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.dims()[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slots at `keep: [batch, k]` (indices into each row).
    pub fn select(&self, keep: Tensor<B, 2, Int>) -> Self {
        Self {
            positions: self.positions.clone().gather(1, keep.clone()),
            // Through ints: gathering a bool tensor is not supported everywhere.
            valid: self
                .valid
                .clone()
                .int()
                .gather(1, keep.clone())
                .equal_elem(1),
            groups: self.groups.clone().gather(1, keep),
        }
    }

    /// `parts` side by side along the sequence.
    pub fn cat(parts: Vec<Self>) -> Self {
        let (mut positions, mut valid, mut groups) = (vec![], vec![], vec![]);
        for part in parts {
            positions.push(part.positions);
            valid.push(part.valid.int());
            groups.push(part.groups);
        }
        Self {
            positions: Tensor::cat(positions, 1),
            valid: Tensor::cat(valid, 1).equal_elem(1),
            groups: Tensor::cat(groups, 1),
        }
    }

    /// `[batch, 1, queries, keys]`: true where query (of `self`) may attend key (of `keys`):
    /// the key is real, in the query's group, and not after it by position id.
    pub fn may_see(&self, keys: &TokenSlots<B>) -> Tensor<B, 4, Bool> {
        let [batch, queries] = self.positions.dims();
        let keys_len = keys.len();
        let shape = [batch, 1, queries, keys_len];
        let as_query = |t: Tensor<B, 2, Int>| t.reshape([batch, 1, queries, 1]).expand(shape);
        let as_key = |t: Tensor<B, 2, Int>| t.reshape([batch, 1, 1, keys_len]).expand(shape);
        let causal = as_key(keys.positions.clone()).lower_equal(as_query(self.positions.clone()));
        let same_group = as_key(keys.groups.clone()).equal(as_query(self.groups.clone()));
        let real = as_key(keys.valid.clone().int()).equal_elem(1);
        causal.bool_and(same_group).bool_and(real)
    }
}

/// What attention needs besides the hidden rows.
#[derive(Debug, Clone)]
pub struct Context<B: Backend> {
    pub tokens: TokenSlots<B>,
    /// cos and sin at the tokens' positions.
    pub rope: RopeTables<B>,
    /// An explicit mask `[batch, 1, n, keys]` over every key attention sees (prefix store,
    /// written store, these tokens): replaces the one the token slots imply. It describes one
    /// fixed layout, so an edited context (select, insert) cannot carry one.
    pub allowed: Option<Tensor<B, 4, Bool>>,
    /// Added to the scores before the softmax, `[batch, 1 or heads, n, keys]`.
    pub bias: Option<Tensor<B, 4>>,
    /// Whether attention returns its probabilities (`[batch, heads, n, keys]` per layer).
    pub return_probs: bool,
    /// The mask, when this context decides it alone, made once for all layers (edit a clone,
    /// not a context already used: the mask is made from the fields on first use).
    shared_mask: SharedMask<B>,
}

/// A mask computed once and shared by every layer of a forward pass: `[batch, 1, queries,
/// keys]`, and spread over the heads (`[batch, kv_heads, groups, queries, keys]`, contiguous)
/// so that filling the scores takes the CPU backend's fast path instead of walking a broadcast
/// view element by element in every layer, forward and backward.
/// A cloned context may be edited (its fields are public), so a clone starts with an empty
/// mask of its own; [`SharedMask::handle`] is what shares one.
#[derive(Debug, Default)]
pub struct SharedMask<B: Backend>(Arc<Mutex<MaskState<B>>>);

impl<B: Backend> Clone for SharedMask<B> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[derive(Debug, Default)]
struct MaskState<B: Backend> {
    blocked: Option<Tensor<B, 4, Bool>>,
    spread: Option<Tensor<B, 5, Bool>>,
}

impl<B: Backend> SharedMask<B> {
    /// The same mask, for the layers of one forward pass.
    fn handle(&self) -> Self {
        Self(self.0.clone())
    }

    fn blocked_or(&self, make: impl FnOnce() -> Tensor<B, 4, Bool>) -> Tensor<B, 4, Bool> {
        let mut state = self.0.lock().expect("mask lock");
        state.blocked.get_or_insert_with(make).clone()
    }

    /// `blocked` spread over `kv_heads` x `groups` heads.
    fn spread(
        &self,
        blocked: &Tensor<B, 4, Bool>,
        kv_heads: usize,
        groups: usize,
    ) -> Tensor<B, 5, Bool> {
        let [batch, _, queries, keys] = blocked.dims();
        let shape = [batch, kv_heads, groups, queries, keys];
        let mut state = self.0.lock().expect("mask lock");
        match &state.spread {
            Some(spread) if spread.dims() == shape => spread.clone(),
            _ => {
                // Reshaping the expanded view copies it into a contiguous tensor.
                let spread = blocked
                    .clone()
                    .unsqueeze_dim::<5>(2)
                    .expand(shape)
                    .reshape([batch * kv_heads * groups, queries, keys])
                    .reshape(shape);
                state.spread = Some(spread.clone());
                spread
            }
        }
    }
}

impl<B: Backend> Context<B> {
    pub fn new(rope: &Rope, tokens: TokenSlots<B>) -> Self {
        Self {
            rope: rope.tables(tokens.positions.clone()),
            tokens,
            allowed: None,
            bias: None,
            return_probs: false,
            shared_mask: SharedMask::default(),
        }
    }

    pub fn with_mask(mut self, allowed: Tensor<B, 4, Bool>) -> Self {
        self.allowed = Some(allowed);
        self.shared_mask = SharedMask::default();
        self
    }

    pub fn with_bias(mut self, bias: Tensor<B, 4>) -> Self {
        self.bias = Some(bias);
        self
    }

    pub fn returning_probs(mut self) -> Self {
        self.return_probs = true;
        self
    }

    fn assert_editable(&self) {
        assert!(
            self.allowed.is_none() && self.bias.is_none(),
            "a context with an explicit mask or bias describes one layout and cannot be edited"
        );
    }

    /// Keeps the rows `keep: [batch, k]` (per-row indices, in the order given) of the context
    /// and of `hidden: [batch, n, dim]`; the kept tokens keep their position ids.
    pub fn select(&self, hidden: Tensor<B, 3>, keep: Tensor<B, 2, Int>) -> (Self, Tensor<B, 3>) {
        self.assert_editable();
        let [batch, k] = keep.dims();
        let dim = hidden.dims()[2];
        let head_dim = self.rope.cos.dims()[3];
        let rows = |t: Tensor<B, 4>| {
            t.gather(
                2,
                keep.clone()
                    .reshape([batch, 1, k, 1])
                    .expand([batch, 1, k, head_dim]),
            )
        };
        let context = Self {
            tokens: self.tokens.select(keep.clone()),
            rope: RopeTables::new(rows(self.rope.cos.clone()), rows(self.rope.sin.clone())),
            allowed: None,
            bias: None,
            return_probs: self.return_probs,
            shared_mask: SharedMask::default(),
        };
        let hidden = hidden.gather(1, keep.reshape([batch, k, 1]).expand([batch, k, dim]));
        (context, hidden)
    }

    /// Contexts side by side along the sequence (attention follows position ids, not the order
    /// of rows, so any order gives the same result).
    pub fn cat(parts: &[&Context<B>]) -> Self {
        for part in parts {
            part.assert_editable();
        }
        Self {
            tokens: TokenSlots::cat(parts.iter().map(|p| p.tokens.clone()).collect()),
            rope: RopeTables::new(
                Tensor::cat(parts.iter().map(|p| p.rope.cos.clone()).collect(), 2),
                Tensor::cat(parts.iter().map(|p| p.rope.sin.clone()).collect(), 2),
            ),
            allowed: None,
            bias: None,
            return_probs: parts.iter().any(|p| p.return_probs),
            shared_mask: SharedMask::default(),
        }
    }

    /// Puts `rows` (with their hidden states `row_hidden`) back among this context's rows:
    /// every row of the result is ordered by position id, so tokens return to their place.
    pub fn insert(
        &self,
        hidden: Tensor<B, 3>,
        rows: &Context<B>,
        row_hidden: Tensor<B, 3>,
    ) -> (Self, Tensor<B, 3>) {
        self.assert_editable();
        rows.assert_editable();
        let merged = Self {
            tokens: TokenSlots::cat(vec![self.tokens.clone(), rows.tokens.clone()]),
            rope: RopeTables::new(
                Tensor::cat(vec![self.rope.cos.clone(), rows.rope.cos.clone()], 2),
                Tensor::cat(vec![self.rope.sin.clone(), rows.rope.sin.clone()], 2),
            ),
            allowed: None,
            bias: None,
            return_probs: self.return_probs,
            shared_mask: SharedMask::default(),
        };
        let hidden = Tensor::cat(vec![hidden, row_hidden], 1);
        let order = merged.tokens.positions.clone().argsort(1);
        merged.select(hidden, order)
    }
}

/// One layer's keys and values `[batch, kv_heads, len, head_dim]` and the slots of their
/// tokens. A store written under explicit masks keeps no slots (generation needs none, and
/// skipping them keeps decoding as cheap as before): it must then always be read under
/// explicit masks.
///
/// The tensors have room after the stored tokens (the capacity doubles when full), so that
/// a decoding step writes its keys in place instead of copying the whole store.
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    /// `[batch, kv_heads, capacity, head_dim]`, the first `len` positions in use.
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
    pub slots: Option<TokenSlots<B>>,
}

impl<B: Backend> LayerKv<B> {
    /// A store of `keys` and `values`, each `[batch, kv_heads, len, head_dim]`.
    pub fn new(keys: Tensor<B, 4>, values: Tensor<B, 4>, slots: Option<TokenSlots<B>>) -> Self {
        Self {
            len: keys.dims()[2],
            keys,
            values,
            slots,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The stored keys, `[batch, kv_heads, len, head_dim]`.
    pub fn keys(&self) -> Tensor<B, 4> {
        self.in_use(&self.keys)
    }

    /// The stored values, `[batch, kv_heads, len, head_dim]`.
    pub fn values(&self) -> Tensor<B, 4> {
        self.in_use(&self.values)
    }

    fn in_use(&self, t: &Tensor<B, 4>) -> Tensor<B, 4> {
        match t.dims()[2] == self.len {
            true => t.clone(),
            false => t.clone().slice(s![.., .., 0..self.len]),
        }
    }

    fn append(self, newer: Self) -> Self {
        let (stored, len) = (self.len, self.len + newer.len);
        let [batch, heads, capacity, head_dim] = self.keys.dims();
        // Moved, not cloned: a store no one else holds is written in place.
        let write = |store: Tensor<B, 4>, new: Tensor<B, 4>| match len <= capacity {
            true => match crate::cpu_fused::write_positions(store, stored, new) {
                Ok(written) => written,
                Err((store, new)) => store.slice_assign(s![.., .., stored..len], new),
            },
            false => {
                let room = len.max(2 * capacity) - len;
                let room = Tensor::zeros([batch, heads, room, head_dim], &new.device());
                Tensor::cat(vec![store.slice(s![.., .., 0..stored]), new, room], 2)
            }
        };
        let (new_keys, new_values) = (newer.keys(), newer.values());
        Self {
            keys: write(self.keys, new_keys),
            values: write(self.values, new_values),
            len,
            slots: match (self.slots, newer.slots) {
                (Some(old), Some(new)) => Some(TokenSlots::cat(vec![old, new])),
                _ => None,
            },
        }
    }

    /// The slots, which masks implied by the tokens need.
    fn slots(&self) -> &TokenSlots<B> {
        self.slots.as_ref().expect(
            "this key/value store was written under explicit masks and keeps no token slots: \
             read it under explicit masks too",
        )
    }
}

/// Keys and values of earlier tokens, one store per layer (layers may hold different tokens).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerKv<B>>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Tokens held by `layer`.
    pub fn len_of(&self, layer: usize) -> usize {
        self.layers[layer].as_ref().map_or(0, LayerKv::len)
    }
}

/// The stores one layer's attention reads: a read-only prefix and a written store that the
/// layer's new keys and values are appended to. Without a written store the new keys are
/// only used for this call.
pub struct KvAccess<'a, B: Backend> {
    pub prefix: Option<&'a LayerKv<B>>,
    pub cache: Option<&'a mut Option<LayerKv<B>>>,
}

impl<B: Backend> KvAccess<'_, B> {
    pub fn none() -> Self {
        Self {
            prefix: None,
            cache: None,
        }
    }
}

/// Everything the queries of one attention call attend over.
pub struct Keys<B: Backend> {
    pub keys: Tensor<B, 4>,
    pub values: Tensor<B, 4>,
    /// `[batch, 1, queries, keys]`, true where a query may not look.
    pub blocked: Tensor<B, 4, Bool>,
    /// Where the mask is shared by every layer (see [`SharedMask`]).
    pub shared_mask: Option<SharedMask<B>>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let bias = config.attention_bias;
        Self {
            q_proj: Linear::new(h, q, bias, init, device),
            k_proj: Linear::new(h, kv, bias, init, device),
            v_proj: Linear::new(h, kv, bias, init, device),
            o_proj: Linear::new(q, h, false, init, device),
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        }
    }

    /// `[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]`, rotated by `rope`
    /// when given (before the heads move forward: the rotation reads contiguous rows).
    fn split_heads(
        &self,
        t: Tensor<B, 3>,
        heads: usize,
        rope: Option<&RopeTables<B>>,
    ) -> Tensor<B, 4> {
        let [batch, seq, _] = t.dims();
        let t = t.reshape([batch, seq, heads, self.head_dim]);
        match rope {
            Some(rope) => rope.apply(t),
            None => t,
        }
        .swap_dims(1, 2)
    }

    /// The keys and values of `x: [batch, seq, hidden]` (rotated at the context's positions),
    /// appended to the written store when there is one, behind the prefix store, with the
    /// mask of the context's queries over all of them.
    pub fn keys(&self, x: Tensor<B, 3>, context: &Context<B>, kv: KvAccess<'_, B>) -> Keys<B> {
        let new = LayerKv::new(
            self.split_heads(
                self.k_proj.forward(x.clone()),
                self.num_kv_heads,
                Some(&context.rope),
            ),
            self.split_heads(self.v_proj.forward(x), self.num_kv_heads, None),
            context.allowed.is_none().then(|| context.tokens.clone()),
        );
        let own = match kv.cache {
            Some(slot) => {
                let all = match slot.take() {
                    Some(past) => past.append(new),
                    None => new,
                };
                *slot = Some(all.clone());
                all
            }
            None => new,
        };
        // Without stores of earlier tokens (or with an explicit mask, which describes one
        // layout for all layers) the context alone decides the mask: every layer shares it.
        let shared =
            context.allowed.is_some() || (kv.prefix.is_none() && own.len() == context.tokens.len());
        let make_blocked = || {
            match &context.allowed {
                Some(allowed) => allowed.clone(),
                None => {
                    let own_mask = context.tokens.may_see(own.slots());
                    match kv.prefix {
                        Some(prefix) => {
                            let [batch, _, queries, _] = own_mask.dims();
                            let visible = prefix
                                .slots()
                                .valid
                                .clone()
                                .int()
                                .reshape([batch, 1, 1, prefix.len()])
                                .expand([batch, 1, queries, prefix.len()])
                                .equal_elem(1);
                            Tensor::cat(vec![visible.int(), own_mask.int()], 3).equal_elem(1)
                        }
                        None => own_mask,
                    }
                }
            }
            .bool_not()
        };
        let blocked = match shared {
            true => context.shared_mask.blocked_or(make_blocked),
            false => make_blocked(),
        };
        let (keys, values) = match kv.prefix {
            Some(prefix) => (
                Tensor::cat(vec![prefix.keys(), own.keys()], 2),
                Tensor::cat(vec![prefix.values(), own.values()], 2),
            ),
            None => (own.keys(), own.values()),
        };
        Keys {
            keys,
            values,
            blocked,
            shared_mask: shared.then(|| context.shared_mask.handle()),
        }
    }

    /// The attention output (after `o_proj`) of queries from `x: [batch, n, hidden]` rotated
    /// by `rope`, over `keys` (with their mask for these queries) plus `bias`; with the
    /// probabilities when asked.
    pub fn attend(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        keys: Keys<B>,
        bias: Option<Tensor<B, 4>>,
        return_probs: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let [batch, n, _] = x.dims();
        let q = self.split_heads(self.q_proj.forward(x), self.num_heads, Some(rope));
        let groups = self.num_heads / self.num_kv_heads;
        let blocked = match &keys.shared_mask {
            Some(shared) => shared.spread(&keys.blocked, self.num_kv_heads, groups),
            None => keys.blocked.unsqueeze_dim::<5>(2),
        };
        let (out, probs) =
            spread_grouped_attention(q, keys.keys, keys.values, blocked, bias, return_probs);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, n, self.num_heads * self.head_dim]);
        (self.o_proj.forward(out), probs)
    }

    /// The attention probabilities `[batch, heads, queries, keys]` of the rows `queries: [batch,
    /// q]` (indices into `x`) over every row of `x: [batch, n, hidden]` in `context`, as this
    /// layer would compute them (what token pruning scores tokens by).
    pub fn probabilities_of(
        &self,
        x: Tensor<B, 3>,
        context: &Context<B>,
        queries: Tensor<B, 2, Int>,
    ) -> Tensor<B, 4> {
        let (query_context, query_x) = context.select(x.clone(), queries);
        let keys = self.split_heads(
            self.k_proj.forward(x),
            self.num_kv_heads,
            Some(&context.rope),
        );
        let q = self.split_heads(
            self.q_proj.forward(query_x),
            self.num_heads,
            Some(&query_context.rope),
        );
        let blocked = query_context.tokens.may_see(&context.tokens).bool_not();
        // The values do not change the probabilities: the keys stand in for them.
        let (_, probs) = grouped_attention(q, keys.clone(), keys, blocked, None, true);
        probs.expect("asked for probabilities")
    }

    /// Every row of `x` attends: the dense case of [`keys`](Self::keys) + [`attend`](Self::attend).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: &Context<B>,
        kv: KvAccess<'_, B>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let keys = self.keys(x.clone(), context, kv);
        self.attend(
            x,
            &context.rope,
            keys,
            context.bias.clone(),
            context.return_probs,
        )
    }
}

/// `softmax(q k^T / sqrt(head_dim) + bias) v` for queries `q: [batch, heads, queries, head_dim]`
/// and keys and values `[batch, kv_heads, keys, head_dim]`, each key/value head serving
/// `heads / kv_heads` consecutive query heads (grouped-query attention, as `repeat_kv` in
/// `transformers`). The queries of a group are stacked as the rows of one matrix product, so
/// keys and values are never copied per query head (that copy of the whole KV cache took half
/// of the decoding time). `blocked: [batch, 1, queries, keys]` is true where a query may not
/// look; `bias` is `[batch, 1 or heads, queries, keys]`. Returns `[batch, heads, queries,
/// head_dim]` and, when asked, the probabilities `[batch, heads, queries, keys]`.
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    blocked: Tensor<B, 4, Bool>,
    bias: Option<Tensor<B, 4>>,
    return_probs: bool,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    spread_grouped_attention(q, k, v, blocked.unsqueeze_dim::<5>(2), bias, return_probs)
}

/// [`grouped_attention`] with the mask `[batch, 1 or kv_heads, 1 or groups, queries, keys]`.
fn spread_grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    blocked: Tensor<B, 5, Bool>,
    bias: Option<Tensor<B, 4>>,
    return_probs: bool,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    let [batch, heads, queries, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let groups = heads / kv_heads;
    let scale = (head_dim as f64).powf(-0.5);
    let (q, k, v) = match (&bias, return_probs) {
        (None, false) => match crate::cpu_fused::attention(q, k, v, &blocked, scale) {
            Ok(out) => return (out, None),
            Err(inputs) => inputs,
        },
        _ => (q, k, v),
    };
    let scores = q
        .reshape([batch, kv_heads, groups * queries, head_dim])
        .matmul(k.swap_dims(2, 3))
        .reshape([batch, kv_heads, groups, queries, keys]);
    // f32::MIN rather than -inf: a fully masked row (a padding query) stays finite.
    let probs = match bias {
        None => match crate::cpu_fused::masked_softmax(scores, &blocked, scale) {
            Ok(probs) => probs,
            Err(scores) => crate::cpu_fused::softmax_last(
                scores.mul_scalar(scale).mask_fill(blocked, f32::MIN),
            ),
        },
        Some(bias) => {
            let bias = match bias.dims()[1] {
                1 => bias.unsqueeze_dim::<5>(2),
                _ => bias.reshape([batch, kv_heads, groups, queries, keys]),
            };
            let scores = scores.mul_scalar(scale) + bias;
            crate::cpu_fused::softmax_last(scores.mask_fill(blocked, f32::MIN))
        }
    };
    let returned = return_probs.then(|| probs.clone().reshape([batch, heads, queries, keys]));
    let out = probs
        .reshape([batch, kv_heads, groups * queries, keys])
        .matmul(v)
        .reshape([batch, heads, queries, head_dim]);
    (out, returned)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::Cpu;

    /// What `grouped_attention` replaces: every key/value head copied per query head
    /// (`repeat_kv` in `transformers`), then plain attention.
    fn attention_with_copied_heads(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        blocked: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 4> {
        let [batch, heads, _, head_dim] = q.dims();
        let [_, kv_heads, keys, _] = k.dims();
        let repeat = |x: Tensor<B, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([batch, kv_heads, heads / kv_heads, keys, head_dim])
                .reshape([batch, heads, keys, head_dim])
        };
        let scores = q
            .matmul(repeat(k).swap_dims(2, 3))
            .mul_scalar((head_dim as f64).powf(-0.5))
            .mask_fill(blocked, f32::MIN);
        burn::tensor::activation::softmax(scores, 3).matmul(repeat(v))
    }

    #[test]
    fn grouped_attention_equals_attention_over_copied_heads() {
        let device = Default::default();
        let mut init = ParamInit::normal(11, 1.0);
        let (batch, heads, kv_heads, queries, keys, head_dim) = (2, 6, 2, 3, 5, 4);
        let q: Tensor<B, 4> = init
            .tensor([batch, heads, queries, head_dim], &device)
            .val();
        let k: Tensor<B, 4> = init
            .tensor([batch, kv_heads, keys, head_dim], &device)
            .val();
        let v: Tensor<B, 4> = init
            .tensor([batch, kv_heads, keys, head_dim], &device)
            .val();
        // Causal over the last `queries` keys, and the first key of row 1 is padding.
        let mut blocked = vec![false; batch * queries * keys];
        for (row, query, key) in (0..batch)
            .flat_map(|b| (0..queries).flat_map(move |q| (0..keys).map(move |k| (b, q, k))))
        {
            let causal = key > keys - queries + query;
            blocked[(row * queries + query) * keys + key] = causal || (row == 1 && key == 0);
        }
        let blocked = Tensor::<B, 1, Bool>::from_bool(
            TensorData::new(blocked, [batch * queries * keys]),
            &device,
        )
        .reshape([batch, 1, queries, keys]);
        let expected =
            attention_with_copied_heads(q.clone(), k.clone(), v.clone(), blocked.clone());
        let (got, probs) = grouped_attention(q, k, v, blocked, None, true);
        assert_eq!(got.dims(), [batch, heads, queries, head_dim]);
        let difference: f32 = (got - expected).abs().max().into_scalar();
        assert!(difference < 1e-5, "max difference {difference}");
        let probs = probs.unwrap();
        assert_eq!(probs.dims(), [batch, heads, queries, keys]);
        let row_sums: Vec<f32> = probs.sum_dim(3).into_data().to_vec().unwrap();
        assert!(row_sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }

    #[test]
    fn masks_follow_position_ids_groups_and_validity() {
        let device = Default::default();
        // Row 0: positions out of index order; row 1: padding first, two groups.
        let queries = TokenSlots::<B> {
            positions: Tensor::from_data([[2i64, 0, 1], [0, 0, 1]], &device),
            valid: Tensor::from_data([[true, true, true], [false, true, true]], &device),
            groups: Tensor::from_data([[0i64, 0, 0], [0, 1, 2]], &device),
        };
        let allowed: Vec<bool> = queries.may_see(&queries).into_data().to_vec().unwrap();
        #[rustfmt::skip]
        let expected = vec![
            true, true, true,     // position 2 sees 2, 0, 1
            false, true, false,   // position 0 sees itself
            false, true, true,    // position 1 sees 0 and 1
            false, false, false,  // padding is seen by no one (row 1, group 0)
            false, true, false,   // group 1 sees itself only
            false, false, true,   // group 2 sees itself only
        ];
        assert_eq!(allowed, expected);
    }
}

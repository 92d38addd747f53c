//! The Llama family of decoder-only models (Llama 2/3, Qwen2/2.5, SmolLM2): token embedding,
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, tied or untied head.
//!
//! Field names mirror the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`),
//! so a parameter's module path is its key in `model.safetensors`.
//!
//! One decoder loop, [`CausalLm::decode`], over any input embeddings in an attention
//! [`Context`] (position ids, validity, optional mask or bias), reading and writing per-layer
//! key/value stores; how each layer runs (dense, gated, skipping) is data from a plan, so the
//! methods that change how layers run live with their recipes, not here. A recipe that edits
//! the sequence between layers drives them one by one with [`CausalLm::run_layer`]. Every
//! linear can carry a LoRA adapter.

pub use super::attention::{Context, KvAccess, KvCache, LayerKv, TokenSlots};
pub use super::config::{LlamaConfig, RopeScaling, SKIP_ROUTERS_KEY};
pub use super::exec::{LayerDecisions, LayerExec, LayerGates};

use super::attention::{Attention, Keys};
use super::init::ParamInit;
use super::layers::{Embedding, Linear, Precision, RmsNorm, Rope, RopeTables, SwiGluMlp};
use super::router::LayerRouter;
use crate::weights;
use anyhow::{bail, Context as _, Result};
use burn::prelude::*;
use burn::tensor::{IndexingUpdateOp, TensorData};
use checkpoints::hf_folder::{save_hf_folder, HfFolder, CONFIG_FILE};
use checkpoints::StoreDtype;
use std::path::Path;

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: SwiGluMlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// A per-token router that decides which tokens run each module (SkipGPT's; `None` for a
    /// dense layer). Inference asks it how the layer runs.
    pub router: Option<LayerRouter<B>>,
}

/// A layer's new hidden states, and its attention probabilities when the context asked.
pub struct LayerOutput<B: Backend> {
    pub hidden: Tensor<B, 3>,
    pub attention: Option<Tensor<B, 4>>,
}

impl<B: Backend> DecoderLayer<B> {
    fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let mut mlp = SwiGluMlp::new(config.hidden_size, config.intermediate_size, init, device);
        if config.mlp_bias {
            for linear in [&mut mlp.gate_proj, &mut mlp.up_proj, &mut mlp.down_proj] {
                linear.bias = Some(init.constant([linear.d_out()], 0.0, device));
            }
        }
        Self {
            self_attn: Attention::new(config, init, device),
            mlp,
            input_layernorm: RmsNorm::new(config.hidden_size, config.rms_norm_eps, init, device),
            post_attention_layernorm: RmsNorm::new(
                config.hidden_size,
                config.rms_norm_eps,
                init,
                device,
            ),
            router: config
                .skip_routers
                .then(|| LayerRouter::new(config.hidden_size, config.routed_modules, init, device)),
        }
    }

    /// How inference runs this layer for the layer input `hidden`: as its router decides, or
    /// dense.
    pub fn inference_exec(&self, hidden: &Tensor<B, 3>) -> LayerExec<B> {
        match &self.router {
            Some(router) => LayerExec::Skipping(router.decisions(hidden)),
            None => LayerExec::Dense,
        }
    }

    /// `h + Attn(norm(h))`, then `h + MLP(norm(h))`, run as `exec` says.
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        context: &Context<B>,
        kv: KvAccess<'_, B>,
        exec: &LayerExec<B>,
    ) -> LayerOutput<B> {
        let gates = match exec {
            LayerExec::Skipping(decisions) => {
                return self.forward_skipping(hidden, context, kv, decisions)
            }
            LayerExec::Gated(gates) => Some(gates),
            LayerExec::Dense => None,
        };
        let (attn, attention) =
            self.self_attn
                .forward(self.input_layernorm.forward(hidden.clone()), context, kv);
        let hidden = hidden + gated(attn, gates.and_then(|g| g.attn.as_ref()));
        let mlp = self
            .mlp
            .forward(self.post_attention_layernorm.forward(hidden.clone()));
        LayerOutput {
            hidden: hidden + gated(mlp, gates.and_then(|g| g.mlp.as_ref())),
            attention,
        }
    }

    /// Each module only for the tokens that execute it (see [`LayerExec::Skipping`]).
    fn forward_skipping(
        &self,
        hidden: Tensor<B, 3>,
        context: &Context<B>,
        kv: KvAccess<'_, B>,
        decisions: &LayerDecisions,
    ) -> LayerOutput<B> {
        let [batch, seq, dim] = hidden.dims();
        let device = hidden.device();
        let normed = self.input_layernorm.forward(hidden.clone());
        let keys = self.self_attn.keys(normed.clone(), context, kv);
        let mut flat = hidden.reshape([batch * seq, dim]);
        for row in 0..batch {
            let picked = indices(&decisions.attn[row * seq..(row + 1) * seq], 0);
            if picked.is_empty() {
                continue;
            }
            let at = index_tensor::<B>(&picked, &device);
            let rows = |t: Tensor<B, 4>| t.slice(s![row..row + 1]).select(2, at.clone());
            let rope = RopeTables::new(
                rows(context.rope.cos.clone()),
                rows(context.rope.sin.clone()),
            );
            // Through ints: selecting rows of a bool tensor loses its dtype on Flex.
            let blocked = keys
                .blocked
                .clone()
                .slice(s![row..row + 1])
                .int()
                .select(2, at.clone())
                .equal_elem(1);
            let x = normed
                .clone()
                .slice([row..row + 1, 0..seq, 0..dim])
                .select(1, at.clone());
            let row_keys = Keys {
                keys: keys.keys.clone().slice(s![row..row + 1]),
                values: keys.values.clone().slice(s![row..row + 1]),
                blocked,
                shared_mask: None,
            };
            let bias = context.bias.clone().map(rows);
            let (update, _) = self.self_attn.attend(x, &rope, row_keys, bias, false);
            let targets: Vec<i64> = picked.iter().map(|&t| t + (row * seq) as i64).collect();
            flat = flat.select_assign(
                0,
                index_tensor::<B>(&targets, &device),
                update.reshape([picked.len(), dim]),
                IndexingUpdateOp::Add,
            );
        }

        // MLP: only the executed tokens, gathered from the whole batch.
        let picked = indices(&decisions.mlp, 0);
        if !picked.is_empty() {
            let at = index_tensor::<B>(&picked, &device);
            let x = self
                .post_attention_layernorm
                .forward(flat.clone().select(0, at.clone()));
            let update = self
                .mlp
                .forward(x.unsqueeze_dim::<3>(0))
                .squeeze_dim::<2>(0);
            flat = flat.select_assign(0, at, update, IndexingUpdateOp::Add);
        }
        LayerOutput {
            hidden: flat.reshape([batch, seq, dim]),
            attention: None,
        }
    }
}

fn gated<B: Backend>(branch: Tensor<B, 3>, gate: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
    match gate {
        Some(gate) => branch * gate.clone(),
        None => branch,
    }
}

fn indices(flags: &[bool], offset: usize) -> Vec<i64> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, &on)| on)
        .map(|(i, _)| (i + offset) as i64)
        .collect()
}

fn index_tensor<B: Backend>(indices: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(indices.to_vec(), [indices.len()]), device)
}

/// The key/value stores a decode reads: a read-only prefix cache and a written one (each
/// optional).
#[derive(Default)]
pub struct Caches<'a, B: Backend> {
    pub prefix: Option<&'a KvCache<B>>,
    pub cache: Option<&'a mut KvCache<B>>,
}

impl<'a, B: Backend> Caches<'a, B> {
    pub fn written(cache: &'a mut KvCache<B>) -> Self {
        Self {
            prefix: None,
            cache: Some(cache),
        }
    }
}

/// What a decode returns: the last hidden states (before the final norm) and, when the
/// context asked, each layer's attention probabilities.
pub struct Decoded<B: Backend> {
    pub hidden: Tensor<B, 3>,
    pub attentions: Vec<Tensor<B, 4>>,
}

#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A Llama-family language model with its head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: LlamaModel<B>,
    /// `None` when the head is tied to the token embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: LlamaConfig,
    #[module(skip)]
    pub rope: Rope,
    /// What the linear layers and a tied head multiply in (see [`Precision`]).
    #[module(skip)]
    pub precision: Precision,
}

impl<B: Backend> CausalLm<B> {
    pub fn new(config: &LlamaConfig, init: &mut ParamInit, device: &B::Device) -> Self {
        let embed_tokens = Embedding {
            weight: init.tensor([config.vocab_size, config.hidden_size], device),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| DecoderLayer::new(config, init, device))
            .collect();
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, init, device);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| Linear::new(config.hidden_size, config.vocab_size, false, init, device));
        Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
            config: config.clone(),
            rope: config.rope(),
            precision: Precision::F32,
        }
    }

    /// Loads a Hugging Face folder (config.json + safetensors, single or sharded).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let folder = HfFolder::new(dir)?;
        let config_path = folder.path(CONFIG_FILE);
        let config = LlamaConfig::from_json(&folder.config()?, &config_path.display().to_string())?;
        let source = folder.weights()?;
        let model = Self::new(&config, &mut ParamInit::Lazy, device);
        let (model, unused) = weights::load_from_source(model, &source)?;
        let unused: Vec<_> = unused
            .into_iter()
            .filter(|k| !checkpoints::names::is_ignorable_hf_key(k))
            .collect();
        if !unused.is_empty() {
            bail!(
                "{} holds tensors this model does not use: {} (does config.json match the weights?)",
                source.describe(),
                unused.join(", ")
            );
        }
        Ok(model)
    }

    /// Saves config.json and model.safetensors (plus the tokenizer files of `tokenizer_from`).
    pub fn save(&self, dir: &Path, dtype: StoreDtype, tokenizer_from: Option<&Path>) -> Result<()> {
        let tensors = weights::named_tensors(self);
        save_hf_folder(dir, &self.config.to_json(), &tensors, dtype, tokenizer_from)
            .with_context(|| format!("saving model to {}", dir.display()))
    }

    /// Runs the linear layers' matmuls (and a tied head's) in `precision`; weights stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for (_, linear) in self.linears_mut() {
            linear.precision = precision;
        }
        self.precision = precision;
        self
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`), for
    /// attaching adapters by name.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            let attn = &mut layer.self_attn;
            for (name, linear) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                out.push((format!("{prefix}.self_attn.{name}"), linear));
            }
            let mlp = &mut layer.mlp;
            for (name, linear) in [
                ("gate_proj", &mut mlp.gate_proj),
                ("up_proj", &mut mlp.up_proj),
                ("down_proj", &mut mlp.down_proj),
            ] {
                out.push((format!("{prefix}.mlp.{name}"), linear));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.lazy_device()
    }

    /// Token embeddings `[batch, seq] -> [batch, seq, hidden]`: the input of [`decode`](Self::decode).
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(tokens)
    }

    /// The input embedding matrix on the host, `[vocab, hidden]` row-major (what probes of the
    /// embedding space read).
    pub fn embedding_matrix(&self) -> Vec<f32> {
        self.model
            .embed_tokens
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 values")
    }

    /// The context of tokens at `slots` (rotary tables from this model's config).
    pub fn context(&self, slots: TokenSlots<B>) -> Context<B> {
        Context::new(&self.rope, slots)
    }

    /// The context of a padded batch at `positions` with an explicit mask `allowed`
    /// (`[batch, 1, queries, keys]`), the layout `forward` and generation use.
    pub fn masked_context(
        &self,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
    ) -> Context<B> {
        self.context(TokenSlots::at_positions(positions))
            .with_mask(allowed)
    }

    pub fn final_norm(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.model.norm.forward(hidden)
    }

    /// The output head on normed hidden states: `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn logits(&self, normed: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(normed),
            None => {
                let [batch, seq, dim] = normed.dims();
                let embedding = self.model.embed_tokens.weight.val();
                let vocab = embedding.dims()[0];
                self.precision
                    .matmul_transposed(normed.reshape([batch * seq, dim]), embedding)
                    .reshape([batch, seq, vocab])
            }
        }
    }

    /// Final norm and output head.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.logits(self.final_norm(hidden))
    }

    /// Runs layer `index` (a recipe that edits the sequence between layers drives them one by
    /// one with this; [`decode`](Self::decode) is the loop over all of them).
    pub fn run_layer(
        &self,
        index: usize,
        hidden: Tensor<B, 3>,
        context: &Context<B>,
        kv: KvAccess<'_, B>,
        exec: &LayerExec<B>,
    ) -> LayerOutput<B> {
        self.model.layers[index].forward(hidden, context, kv, exec)
    }

    /// The decoder loop: every layer on `hidden` (embeddings, or any input embeddings) in
    /// `context`, reading and writing `caches`, each layer run as `plan(layer, input)` says.
    /// Returns the hidden states before the final norm.
    pub fn decode(
        &self,
        mut hidden: Tensor<B, 3>,
        context: &Context<B>,
        mut caches: Caches<'_, B>,
        plan: &mut dyn FnMut(usize, &Tensor<B, 3>) -> LayerExec<B>,
    ) -> Decoded<B> {
        let mut attentions = Vec::new();
        for index in 0..self.num_layers() {
            let exec = plan(index, &hidden);
            let kv = KvAccess {
                prefix: caches
                    .prefix
                    .and_then(|prefix| prefix.layers[index].as_ref()),
                cache: caches
                    .cache
                    .as_deref_mut()
                    .map(|cache| &mut cache.layers[index]),
            };
            let out = self.run_layer(index, hidden, context, kv, &exec);
            hidden = out.hidden;
            attentions.extend(out.attention);
        }
        Decoded { hidden, attentions }
    }

    /// How inference runs each layer: as its router decides (a routed model really skips),
    /// else dense. `forward`, `forward_cached_last` and generation all decode with it.
    pub fn inference_plan(&self) -> impl FnMut(usize, &Tensor<B, 3>) -> LayerExec<B> + '_ {
        move |index, hidden| self.model.layers[index].inference_exec(hidden)
    }

    /// Logits for `tokens: [batch, seq]` at `positions: [batch, seq]` under mask `allowed`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        self.forward_with(tokens, positions, allowed, &mut self.inference_plan())
    }

    /// As [`forward`](Self::forward), each layer run as `plan(layer, input)` says.
    pub fn forward_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        plan: &mut dyn FnMut(usize, &Tensor<B, 3>) -> LayerExec<B>,
    ) -> Tensor<B, 3> {
        let context = self.masked_context(positions, allowed);
        let decoded = self.decode(self.embed(tokens), &context, Caches::default(), plan);
        self.head(decoded.hidden)
    }

    /// As [`forward`](Self::forward), attending also over `cache` and appending to it, with
    /// the logits of the last position only, `[batch, 1, vocab]`: what generation samples
    /// from (over a whole prompt the output head is a fifth of a 135M model's prefill).
    /// `allowed` covers all keys: `[batch, 1, new, cached + new]`.
    pub fn forward_cached_last(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        allowed: Tensor<B, 4, Bool>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let context = self.masked_context(positions, allowed);
        let decoded = self.decode(
            self.embed(tokens),
            &context,
            Caches::written(cache),
            &mut self.inference_plan(),
        );
        let [batch, seq, dim] = decoded.hidden.dims();
        self.head(decoded.hidden.slice([0..batch, seq - 1..seq, 0..dim]))
    }

    /// The model with only the layers `keep` (in that order): the config's depth follows, so
    /// the saved config.json says the new depth.
    pub fn retain_layers(mut self, keep: &[usize]) -> Result<Self> {
        let depth = self.num_layers();
        if keep.is_empty() {
            bail!("retain_layers: keep at least one layer");
        }
        if let Some(bad) = keep.iter().find(|&&i| i >= depth) {
            bail!("retain_layers: layer {bad} does not exist (the model has {depth})");
        }
        let mut layers: Vec<Option<DecoderLayer<B>>> = std::mem::take(&mut self.model.layers)
            .into_iter()
            .map(Some)
            .collect();
        for &index in keep {
            let layer = layers[index]
                .take()
                .with_context(|| format!("retain_layers: layer {index} named twice"))?;
            self.model.layers.push(layer);
        }
        self.config.num_hidden_layers = keep.len();
        Ok(self)
    }
}

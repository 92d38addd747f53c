//! Parameter names.
//!
//! Our module tree mirrors the Hugging Face Llama layout field for field, so the Burn path of
//! a parameter (`model.layers.3.self_attn.q_proj.weight`) *is* its Hugging Face key. This
//! module holds the translations to and from the other layouts we read or write.

/// Hugging Face keys that carry no learned weight and are skipped when loading
/// (older checkpoints store the rotary frequencies).
pub fn is_ignorable_hf_key(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
}

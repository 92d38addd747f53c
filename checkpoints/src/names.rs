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

/// The PEFT key of one of our adapter parameters:
/// `model.layers.0.self_attn.q_proj.lora.lora_a` ->
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(name: &str) -> String {
    let renamed = name
        .replace(".lora.lora_a", ".lora_A.weight")
        .replace(".lora.lora_b", ".lora_B.weight");
    format!("base_model.model.{renamed}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names() {
        assert_eq!(
            peft_key("model.layers.0.self_attn.q_proj.lora.lora_a"),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_key("lm_head.lora.lora_b"),
            "base_model.model.lm_head.lora_B.weight"
        );
        assert!(is_ignorable_hf_key(
            "model.layers.0.self_attn.rotary_emb.inv_freq"
        ));
    }
}

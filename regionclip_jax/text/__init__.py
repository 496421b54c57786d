"""regionclip_jax.text: CLIP tokenizer, RegionCLIP prompt templates, prompt-ensemble embeddings."""

from regionclip_jax.text.embeddings import clip_text_embeddings, prompt_ensemble_embeddings
from regionclip_jax.text.templates import (
    TEMPLATES,
    clean_class_name,
    clean_lvis_name,
    expand_templates,
    get_prompt_templates,
)
from regionclip_jax.text.tokenizer import EOT_ID, SOT_ID, Tokenizer, clean_text, tokenize

__all__ = [
    "EOT_ID",
    "SOT_ID",
    "TEMPLATES",
    "Tokenizer",
    "clean_class_name",
    "clean_lvis_name",
    "clean_text",
    "clip_text_embeddings",
    "expand_templates",
    "get_prompt_templates",
    "prompt_ensemble_embeddings",
    "tokenize",
]

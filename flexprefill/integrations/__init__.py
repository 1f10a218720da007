"""Integrations of flexprefill with model libraries. `hf`: Hugging Face transformers."""

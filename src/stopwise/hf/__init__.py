"""Shared Hugging Face plumbing for the adapters (imports torch and transformers lazily)."""

"""Models: every model, tokenizer and chat-template load, for every stage, in one place.

Submodules are imported where used (torch and transformers are heavy)."""

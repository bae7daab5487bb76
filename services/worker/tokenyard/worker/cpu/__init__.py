"""The real engine on the CPU: a Hugging Face causal LM (SmolLM2-135M-Instruct by default) run with
PyTorch, a paged KV cache with prefix caching, and continuous batching.

Import from the submodules; this package re-exports nothing, so that importing its configuration
(the worker's settings do) never pulls in PyTorch or transformers.
"""

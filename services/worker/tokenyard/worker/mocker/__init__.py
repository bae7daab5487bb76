"""The simulated engine: a vLLM-style scheduler and KV block manager that spend modelled time.

Import from the submodules (``tokenyard.worker.mocker.engine`` and friends); this package
re-exports nothing so that importing its configuration never pulls in the engine.
"""

"""Serving GLM: continuous batching for generation, Triton-style dynamic batching for one-shot requests, the
Triton/KServe v2 and OpenAI HTTP APIs, and export to a Triton model repository.

Layout (vLLM v1's shape: vllm/v1/request.py, vllm/v1/core/sched/scheduler.py, vllm/v1/engine/core.py): request.py (one
sequence's state), scheduler.py (which requests run each step), runner.py (one model step), engine.py (the loop and its
thread). Everything HTTP lives beside it and only calls the engines.
"""

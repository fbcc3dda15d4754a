"""fvboot: the in-image runtime of fast-vllm. Bakes a warmed vLLM server into a CRIU checkpoint
and restores it on `docker run`, falling back to a normal start when the checkpoint cannot be used.
Small on purpose: stdlib plus what vLLM already ships; importable without the builder."""

__version__ = "0.1.0"

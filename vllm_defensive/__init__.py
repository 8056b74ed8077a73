"""vllm-defensive: DefensiveKV KV-cache eviction for stock vLLM 0.24.0.

Importing this package must not import vLLM: the policy library is usable on its own and the
plugin entry point (`vllm_defensive.plugin:register`) does the version check before touching vLLM.
"""

__version__ = "0.1.0"
SUPPORTED_VLLM_VERSION = "0.24.0"

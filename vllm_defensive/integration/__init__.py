"""Everything that touches vLLM internals (vLLM 0.24.0 only; see compat.py).

Modules: compat (version check, patch targets), config (server/request settings), cli (serve
flags), checks (fail-closed start-up checks), scheduler + kv_manager (engine core), worker +
layout + scoring (model runner), frontend (validation, records in responses), plan (messages
between them), debug (test-only recording), install (wires it all up).
"""

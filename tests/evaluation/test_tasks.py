"""Task generation with the package's generators: splits, token counts, cache, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vllm_defensive.evaluation import tasks

from eval_helpers import SMOKE_LENGTH, SMOKE_SAMPLES, SMOKE_TASKS


def test_specs_follow_the_package_config():
    root = tasks.ruler_root()
    cfg = yaml.safe_load((root / "synthetic.yaml").read_text())
    assert set(cfg) == set(tasks.TASK_NAMES)
    from long_context_eval.eval.synthetic import constants as eval_constants

    for name in tasks.TASK_NAMES:
        spec = tasks.task_spec(name)
        assert spec.family == cfg[name]["task"] and spec.args == cfg[name]["args"]
        assert spec.script.is_file()
        fn = eval_constants.TASKS[spec.family]["metric_fn"].__name__
        assert spec.metric == fn


def test_generated_samples_split_and_count(ruler_data, tokenizer):
    assert set(ruler_data) == {(t, SMOKE_LENGTH) for t in SMOKE_TASKS}
    for (task, length), samples in ruler_data.items():
        assert len(samples) == SMOKE_SAMPLES
        assert len({s.uid for s in samples}) == SMOKE_SAMPLES
        for s in samples:
            assert s.task == task and s.length == length
            # the question part is after the context and ends with RULER's answer prefix
            assert 0.5 * len(s.prompt) < s.question_start < s.answer_start < len(s.prompt)
            q = s.question
            assert q.lstrip().startswith("What" if task.startswith("niah") else "Question:")
            assert s.prompt[s.answer_start:].lstrip().startswith(("The special magic", "Answer:"))
            # every answer is in the context, none in the question part
            for ans in s.outputs:
                assert ans in s.prompt[: s.question_start]
            ids = tokenizer(s.prompt, add_special_tokens=True)["input_ids"]
            assert s.prompt_tokens == len(ids)
            assert s.prompt_tokens + s.max_new_tokens <= length
            # the protected suffix decodes to the question part (a boundary token may add a char)
            tail = tokenizer.decode(ids[-s.question_tokens:])
            assert tail.rstrip().endswith(q.rstrip()[-20:])
            assert q.strip() in tail and len(tail) - len(q) <= 3
            assert 10 < s.question_tokens < 100


def test_cache_is_reused_and_prefix_stable(ruler_data, smollm2_dir, ruler_cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("generator ran although the data is cached")

    monkeypatch.setattr(tasks, "_run_generator", boom)
    req = tasks.DataRequest(tokenizer_path=smollm2_dir, tasks=SMOKE_TASKS, lengths=[SMOKE_LENGTH],
                            num_samples=SMOKE_SAMPLES - 1, seed=42, cache_dir=ruler_cache)
    fewer = tasks.prepare(req, progress=False)
    for key, samples in fewer.items():
        assert [s.uid for s in samples] == [s.uid for s in ruler_data[key][: SMOKE_SAMPLES - 1]]
    # more samples than cached, another seed, or another length: the generator must run
    for change in ({"num_samples": SMOKE_SAMPLES + 1}, {"seed": 7}, {"lengths": [SMOKE_LENGTH + 512]}):
        with pytest.raises(AssertionError, match="generator ran"):
            tasks.prepare(tasks.DataRequest(**{**req.__dict__, **change}), progress=False)


def test_a_damaged_cache_file_is_regenerated(ruler_data, smollm2_dir, ruler_cache, tmp_path, monkeypatch):
    fp = tasks.tokenizer_fingerprint(smollm2_dir)
    src = tasks.cache_path(ruler_cache, fp, "base", "vt", SMOKE_LENGTH, 42)
    assert tasks.read_cached(src, SMOKE_SAMPLES) is not None
    dst = tasks.cache_path(tmp_path, fp, "base", "vt", SMOKE_LENGTH, 42)
    dst.parent.mkdir(parents=True)
    dst.write_text(src.read_text()[:-200])  # torn last line
    assert tasks.read_cached(dst, SMOKE_SAMPLES) is None
    assert tasks.read_cached(dst, 1) is not None


def test_chat_format_wraps_and_keeps_the_split(ruler_data, tokenizer):
    """--prompt-format chat: RULER's prompt inside the chat template, the answer prefix after it."""
    spec = tasks.task_spec("niah_single_1")
    base = ruler_data[("niah_single_1", SMOKE_LENGTH)]
    raw = [{"index": s.index, "input": s.prompt, "outputs": s.outputs} for s in base]
    pre, post = tasks.chat_wrapper(tokenizer)
    # SmolLM2's bos_token is <|im_start|> but its tokenizer adds no BOS: nothing may be stripped
    assert pre.startswith("<|im_start|>system") and "<|im_start|>user" in pre and "<|im_start|>assistant" in post
    chat = tasks._finish(spec, raw, tokenizer, (pre, post), SMOKE_LENGTH)
    for b, c in zip(base, chat):
        assert c.prompt.startswith(pre) and post in c.question
        assert c.prompt[c.answer_start:] == b.prompt[b.answer_start:].lstrip()
        assert c.question.startswith(b.prompt[b.question_start:b.answer_start])
        assert c.question_tokens > b.question_tokens and c.uid != b.uid
        assert c.prompt_tokens == len(tokenizer(c.prompt, add_special_tokens=True)["input_ids"])


def test_parse_tasks():
    assert tasks.parse_tasks("all") == list(tasks.TASK_NAMES)
    assert tasks.parse_tasks("vt,niah_single_1,vt") == ["vt", "niah_single_1"]
    assert tasks.parse_tasks("niah")[-1] == "niah_multiquery"
    with pytest.raises(tasks.TaskError, match="unknown RULER task 'niah_single_9'"):
        tasks.parse_tasks("niah_single_9")


def test_bad_tokenizer_and_lengths_fail_clearly(tmp_path, smollm2_dir):
    with pytest.raises(tasks.TaskError, match="not a folder"):
        tasks.tokenizer_fingerprint(tmp_path / "missing")
    with pytest.raises(tasks.TaskError, match="no tokenizer files"):
        tasks.tokenizer_fingerprint(tmp_path)
    with pytest.raises(tasks.TaskError, match="too short"):
        tasks.prepare(tasks.DataRequest(tokenizer_path=smollm2_dir, tasks=["vt"], lengths=[100], num_samples=1,
                                        cache_dir=tmp_path), progress=False)
    with pytest.raises(tasks.TaskError, match="unknown prompt format"):
        tasks.prepare(tasks.DataRequest(tokenizer_path=smollm2_dir, tasks=["vt"], lengths=[2048], num_samples=1,
                                        cache_dir=tmp_path, prompt_format="xml"), progress=False)


def test_cache_header_records_provenance(ruler_data, smollm2_dir, ruler_cache):
    fp = tasks.tokenizer_fingerprint(smollm2_dir)
    header = json.loads(tasks.cache_path(ruler_cache, fp, "base", "vt", SMOKE_LENGTH, 42).read_text().splitlines()[0])
    assert header["generator"] == "nvidia-long-context-eval" and header["generator_version"]
    assert header["seed"] == 42 and header["tokenizer_fingerprint"] == fp


def test_relative_paths_and_fwe_fit_the_length(smollm2_dir, tmp_path, monkeypatch):
    """Generators run in a temporary cwd: relative cache and tokenizer paths must still resolve.
    fwe sizes its prompt to the whole max_seq_length (RULER quirk): ours leave room for the answer."""
    tasks.copy_tokenizer(smollm2_dir, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    req = tasks.DataRequest(tokenizer_path="tok", tasks=["fwe"], lengths=[1024], num_samples=2,
                            cache_dir=Path("cache"))
    samples = tasks.prepare(req, progress=False)[("fwe", 1024)]
    for s in samples:
        assert 700 < s.prompt_tokens and s.prompt_tokens + s.max_new_tokens <= 1024
        assert all(o in s.prompt[: s.question_start] for o in s.outputs)
    assert tasks.tokenizer_fingerprint("tok") == tasks.tokenizer_fingerprint(smollm2_dir)

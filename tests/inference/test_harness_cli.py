"""``llamalit-evaluate tasks=[...]`` end to end: our shipped tasks offline, eval_results.json, and one error
line for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from llamalit.checkpoints.run_export import export_weights  # noqa: E402
from llamalit.model.llama import Llama, ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("cli") / "run"
    export_weights(Llama(ModelConfig.preset("tiny", vocab_size=tiny_tokenizer.vocab_size)).eval(), out,
                   str(tiny_tokenizer.path), {"experiment_name": "demo"})
    return out


def evaluate(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    home = tmp_path / "hf"  # an empty Hugging Face cache: nothing can come from an earlier run
    environ = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH")] if p),
               **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "device=cpu",
                           f"paths.cache_dir={tmp_path / 'cache'}", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environ)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 1, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_shipped_tasks_offline_write_eval_results_and_match_the_adherence_evaluation(
        run_dir, synthetic_corpus, tmp_path):
    import io

    from llamalit.cli.evaluate import run_evaluate

    source = synthetic_corpus[0].parent
    proc = evaluate(tmp_path, f"ckpt={run_dir}", f"source={source}", "n=6", "max_new_tokens=24",
                    "tasks=[tinystories_perplexity,instruct_adherence]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|tinystories_perplexity|" in proc.stdout and "word_perplexity" in proc.stdout
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert set(results["results"]) == {"tinystories_perplexity", "instruct_adherence"}
    assert results["results"]["tinystories_perplexity"]["sample_len"] == 6
    legacy = run_evaluate({"ckpt": str(run_dir), "source": str(source), "n": 6, "max_new_tokens": 24,
                           "device": "cpu", "data": {"name": "synthetic"}, "paths": {"cache_dir": str(tmp_path)}},
                          out=io.StringIO())
    harness = results["results"]["instruct_adherence"]
    for key in ("adherence", "word_recall", "feature_rate"):
        assert harness[f"{key},none"] == pytest.approx(legacy[key], abs=1e-12), key


@pytest.mark.slow
def test_a_task_yaml_of_your_own_and_out(run_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"Tom has {i} balls.", "a": " Yes"}) + "\n"
                                              for i in range(5)))
    (tmp_path / "mine.yaml").write_text(
        f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'd.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    out = tmp_path / "res" / "r.json"
    proc = evaluate(tmp_path, f"ckpt={run_dir}", f"tasks=[{tmp_path / 'mine.yaml'}]", "limit=3", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["results"]["mine"]["sample_len"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown", "offline", "no_room", "too_long"])
def test_bad_input_is_one_error_line(run_dir, tmp_path, case):
    long_text = "Lily went to the park and played with her ball. " * 40
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": long_text, "a": " Yes"}) + "\n")
    task = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "d.jsonl")
            + "\ntest_split: test\ndoc_to_text: '{{{{q}}}}'\ndoc_to_target: '{{{{a}}}}'\n{rest}")
    (tmp_path / "gen.yaml").write_text(task.format(name="gen", rest="output_type: generate_until\n"
                                                   "generation_kwargs:\n  max_gen_toks: 500\n"))
    (tmp_path / "ll.yaml").write_text(task.format(name="ll", rest="output_type: loglikelihood\n"))
    args = {"unknown": ["tasks=[hellaswagg]"], "offline": ["tasks=[hellaswag]"],
            "no_room": [f"tasks=[{tmp_path / 'gen.yaml'}]"],
            "too_long": [f"tasks=[{tmp_path / 'll.yaml'}]", "truncate=false"]}[case]
    lines = error_lines(evaluate(tmp_path, f"ckpt={run_dir}", *args))
    assert len(lines) == 1
    expect = {"unknown": ["unknown task 'hellaswagg'", "hellaswag"],
              "offline": ["hellaswag", "HF_DATASETS_OFFLINE=1", "local task.yaml"],
              "no_room": ["task gen doc 0", "max_gen_toks=500", "context of 128"],
              "too_long": ["task ll doc 0", "context of 128", "truncate=true"]}[case]
    for words in expect:
        assert words in lines[0]


def test_missing_lm_eval_names_the_extra(run_dir, monkeypatch):
    from llamalit.inference.harness_run import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "llamalit.inference.harness", raising=False)
    with pytest.raises(ValueError, match=r"pip install llamalit\[eval\]"):
        run_harness({"ckpt": str(run_dir), "tasks": ["tinystories_perplexity"]})

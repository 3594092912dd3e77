"""Requests/s of llamalit's lm-eval model against the harness's own HFLM, same model, same tasks, same run.

    python scripts/bench_eval.py [--preset stories260k] [--docs 64] [--batch-size 16] [--device cpu|cuda]

Builds an offline setup in a temp dir (synthetic stories, a 512-piece tokenizer, a random ``--preset`` model
saved as our run dir, which is also a Hugging Face dir), writes a multiple-choice task (loglikelihood), a
rolling perplexity task and a generation task, and times each LM on each (after one warm-up pass).
Prints a table; ``--json`` writes the rows. Timings on a shared machine are noisy: compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_tasks(folder: Path, stories: list[str], docs: int, max_gen: int) -> list[str]:
    rng = random.Random(0)
    sentences = [s.split(". ") for s in stories]
    rows = {"mc": [], "ppl": [], "gen": []}
    for s in sentences[:docs]:
        right = s[1] if len(s) > 1 else s[0]
        choices = [right] + [rng.choice(o) for o in rng.sample(sentences, 3)]
        rng.shuffle(choices)
        rows["mc"].append({"q": s[0] + ".", "choices": choices, "answer": choices.index(right)})
    rows["ppl"] = [{"text": t} for t in stories[:docs]]
    rows["gen"] = [{"prompt": " ".join(t.split()[:12])} for t in stories[:docs]]
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "b_mc.yaml").write_text("task: b_mc\n" + head.format(folder / "mc.jsonl") +
                                      "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                                      "metric_list:\n  - metric: acc\n")
    (folder / "b_ppl.yaml").write_text("task: b_ppl\n" + head.format(folder / "ppl.jsonl") +
                                       "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                                       "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (folder / "b_gen.yaml").write_text("task: b_gen\n" + head.format(folder / "gen.jsonl") +
                                       "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                                       "doc_to_target: ''\ngeneration_kwargs:\n  until: ['\\n\\n']\n"
                                       f"  max_gen_toks: {max_gen}\n  do_sample: false\n"
                                       "metric_list:\n  - metric: exact_match\n")
    return ["b_mc", "b_ppl", "b_gen"]


def setup(tmp: Path, preset: str) -> tuple[Path, list[str]]:
    import torch

    from llamalit.checkpoints import save_model
    from llamalit.data.synthetic import make_corpus
    from llamalit.data.text_formats import read_records
    from llamalit.data.tokenizer import train_tokenizer
    from llamalit.model.llama import Llama, ModelConfig

    files = make_corpus(tmp / "corpus", 2, 200, seed=0)
    stories = [r["story"] for f in files for r in read_records(f)]
    tok = train_tokenizer(stories, 512, tmp / "tok.model")
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset(preset, vocab_size=512)).eval()
    save_model(model, tmp / "run", files={"tokenizer.model": tok})
    return tmp / "run", stories


def timed(lm, task: str, manager, n_requests: dict) -> tuple[float, int]:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=False)
    seconds = time.perf_counter() - start
    return seconds, out["results"][task]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="stories260k")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-gen", type=int, default=64)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamalit.inference.harness import LlamalitLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        run, stories = setup(Path(tmp), args.preset)
        tasks = write_tasks(Path(tmp), stories, args.docs, args.max_gen)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        hf_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        lms = {"llamalit": LlamalitLM.from_checkpoint(run, device=args.device, batch_size=args.batch_size),
               "HFLM": HFLM(pretrained=str(run), device=args.device, batch_size=args.batch_size, dtype=hf_dtype)}
        requests = {"b_mc": 4 * args.docs, "b_ppl": args.docs, "b_gen": args.docs}
        rows = []
        for task in tasks:
            for name, lm in lms.items():
                timed(lm, task, manager, requests)  # warm-up: datasets cache, kernels, CUDA graphs
                seconds, metrics = timed(lm, task, manager, requests)
                rows.append({"task": task, "lm": name, "requests": requests[task], "seconds": round(seconds, 3),
                             "requests_per_s": round(requests[task] / seconds, 1)})
        print(f"\nmodel {args.preset} (random weights, vocab 512), device {args.device}, batch {args.batch_size}, "
              f"torch {torch.__version__}; end-to-end simple_evaluate time per task (noisy on a shared machine)")
        print(f"{'task':<8} {'requests':>8} {'llamalit req/s':>15} {'HFLM req/s':>11} {'speedup':>8}")
        for task in tasks:
            ours, theirs = (next(r for r in rows if r["task"] == task and r["lm"] == n) for n in lms)
            print(f"{task:<8} {ours['requests']:>8} {ours['requests_per_s']:>15.1f} {theirs['requests_per_s']:>11.1f} "
                  f"{ours['requests_per_s'] / theirs['requests_per_s']:>7.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

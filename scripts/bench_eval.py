"""Requests/s of llamalit's lm-eval model against the harness's own HFLM, same model, same tasks, same run.

    python scripts/bench_eval.py [--shape stories260k] [--docs 64] [--batch-size 16] [--repeat 3]
                                 [--tasks b_mc,b_ppl,b_gen] [--device cpu|cuda] [--json rows.json]

Builds an offline setup in a temp dir (synthetic stories, a 512-piece tokenizer, a random model of shape
``--shape`` (a ``ModelConfig`` preset, vocab 512) saved as our run dir, which is also a Hugging Face dir), writes
a multiple-choice task (loglikelihood; ``b_mcw``: the same with long contexts and one-word answers), a rolling
perplexity task and a generation task, and times each LM on
each: one warm-up pass each, then ``--repeat`` passes alternating which LM goes first; the median is reported.
Two figures per LM: end to end (``simple_evaluate``, including the harness's own task building and environment
report, the same for both) and LM (the time inside the LM's request method, what the LM controls, as wall time
and as this process's CPU time: on a shared machine the CPU time leaves out the moments another job held the
core, so with ``--threads 1`` it is the steadier ratio); and the
tokens each LM's embedding saw in the last pass (padding included wherever the model computes it), a figure free
of the machine's noise.
Prints a table with the load average; ``--json`` writes the rows. Timings on a shared machine are noisy:
compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_tasks(folder: Path, stories: list[str], docs: int, max_gen: int) -> list[str]:
    rng, rng_w = random.Random(0), random.Random(1)  # b_mc's choices as before b_mcw was added
    sentences = [s.split(". ") for s in stories]
    rows = {"mc": [], "mcw": [], "ppl": [], "gen": []}
    for s in sentences[:docs]:
        right = s[1] if len(s) > 1 else s[0]
        choices = [right] + [rng.choice(o) for o in rng.sample(sentences, 3)]
        rng.shuffle(choices)
        rows["mc"].append({"q": s[0] + ".", "choices": choices, "answer": choices.index(right)})
        words = " ".join(s).split()  # a long context, one-word answers (the shape of ARC-like tasks)
        cut = max(1, len(words) * 2 // 3)
        others = [rng_w.choice(o.split() or ["the"]) for o in rng_w.choice(sentences)[:3]]
        choices = [words[cut]] + (others + ["the", "a", "and"])[:3] if cut < len(words) else [words[0], "a", "b", "c"]
        rng_w.shuffle(choices)
        rows["mcw"].append({"q": " ".join(words[:cut]), "choices": choices,
                            "answer": choices.index(words[cut] if cut < len(words) else words[0])})
    rows["ppl"] = [{"text": t} for t in stories[:docs]]
    rows["gen"] = [{"prompt": " ".join(t.split()[:12])} for t in stories[:docs]]
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    head = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "b_mc.yaml").write_text("task: b_mc\n" + head.format(folder / "mc.jsonl") +
                                      "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                                      "metric_list:\n  - metric: acc\n")
    (folder / "b_mcw.yaml").write_text("task: b_mcw\n" + head.format(folder / "mcw.jsonl") +
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
    return ["b_mc", "b_mcw", "b_ppl", "b_gen"]


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


METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def clock_requests(lm) -> dict:
    """Wrap ``lm``'s request methods (on the instance) to add their wall seconds to the returned dict's "lm" and
    their CPU seconds (this process, all threads) to its "cpu"."""
    spent = {"lm": 0.0, "cpu": 0.0}

    def clocked(method):
        def wrapped(*a, **kw):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return method(*a, **kw)
            finally:
                spent["lm"] += time.perf_counter() - start
                spent["cpu"] += time.process_time() - start_cpu
        return wrapped

    for name in METHODS:
        setattr(lm, name, clocked(getattr(lm, name)))
    return spent


def count_tokens(lm, spent: dict) -> None:
    """Add the tokens (padding included) each forward feeds ``lm``'s model to ``spent["tokens"]``."""
    embed = lm.model.tok_embeddings if hasattr(lm.model, "tok_embeddings") else lm.model.get_input_embeddings()

    def hook(module, args, output):
        spent["tokens"] += args[0].numel()
    embed.register_forward_hook(hook)
    if hasattr(lm.model, "tok_embeddings"):  # ours: the compiled CPU decode step embeds its tokens in C++
        from llamalit.inference.kernels import DecodeKernel

        checked = DecodeKernel._checked

        def counted(self, tok, *args, **kw):
            spent["tokens"] += tok.numel()
            return checked(self, tok, *args, **kw)
        DecodeKernel._checked = counted


def timed(lm, spent: dict, task: str, manager) -> tuple[float, float, float]:
    """(end-to-end seconds, seconds inside the LM, CPU seconds inside the LM) of one ``simple_evaluate``."""
    from lm_eval import simple_evaluate

    spent["lm"], spent["cpu"], spent["tokens"] = 0.0, 0.0, 0
    start = time.perf_counter()
    simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0, log_samples=False)
    return time.perf_counter() - start, spent["lm"], spent["cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", "--preset", dest="preset", default="stories260k",
                    help="model shape: a ModelConfig preset (stories260k, stories15m, ...); vocab is 512 either way")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-gen", type=int, default=64)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per LM and task (median reported)")
    ap.add_argument("--tasks", default="b_mc,b_ppl,b_gen",
                    help="comma-separated subset of b_mc,b_mcw (long context, one-word answers),b_ppl,b_gen")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for both LMs (0: torch's default); on a loaded machine 1 is far steadier")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="llamalit only: scoring batches more short rows per forward up to this many tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamalit.inference.harness import LlamalitLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run, stories = setup(Path(tmp), args.preset)
        tasks = write_tasks(Path(tmp), stories, args.docs, args.max_gen)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        ours_kw = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
        hf_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        lms = {"llamalit": LlamalitLM.from_checkpoint(run, device=args.device, batch_size=args.batch_size, **ours_kw),
               "HFLM": HFLM(pretrained=str(run), device=args.device, batch_size=args.batch_size, dtype=hf_dtype)}
        requests = {"b_mc": 4 * args.docs, "b_mcw": 4 * args.docs, "b_ppl": args.docs, "b_gen": args.docs}
        clocks = {name: clock_requests(lm) for name, lm in lms.items()}
        for name, lm in lms.items():
            count_tokens(lm, clocks[name])
        wanted = [t for t in args.tasks.split(",") if t]
        unknown = sorted(set(wanted) - set(tasks))
        if unknown:
            raise SystemExit(f"error: --tasks {','.join(unknown)}: unknown; choose from {','.join(tasks)}")
        load_before = os.getloadavg()
        rows = []
        for task in wanted:
            times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in lms}
            for name, lm in lms.items():
                timed(lm, clocks[name], task, manager)  # warm-up: datasets cache, kernels, CUDA graphs
            for rep in range(args.repeat):
                order = list(lms) if rep % 2 == 0 else list(lms)[::-1]
                for name in order:
                    times[name].append(timed(lms[name], clocks[name], task, manager))
            for name in lms:
                total = statistics.median(t for t, _, _ in times[name])
                inside = statistics.median(t for _, t, _ in times[name])
                cpu = statistics.median(c for _, _, c in times[name])
                rows.append({"task": task, "lm": name, "requests": requests[task], "tokens": clocks[name]["tokens"],
                             "seconds": round(total, 3),
                             "lm_seconds": round(inside, 3), "requests_per_s": round(requests[task] / total, 1),
                             "lm_requests_per_s": round(requests[task] / inside, 1),
                             "lm_cpu_seconds": round(cpu, 3),
                             "passes": [[round(t, 3), round(i, 3), round(c, 3)] for t, i, c in times[name]]})
        load_after = os.getloadavg()
        print(f"\nmodel {args.preset} (random weights, vocab 512), device {args.device}, batch {args.batch_size}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} after; median of {args.repeat} alternating passes (noisy on a shared machine)")
        print(f"{'task':<8} {'requests':>8} {'llamalit req/s':>15} {'HFLM req/s':>11} {'speedup':>8}"
              f" {'LM-only llamalit':>17} {'LM-only HFLM':>13} {'speedup':>8} {'LM CPU-time speedup':>20}"
              f" {'tokens llamalit/HFLM':>21}")
        for task in wanted:
            ours, theirs = (next(r for r in rows if r["task"] == task and r["lm"] == n) for n in lms)
            print(f"{task:<8} {ours['requests']:>8} {ours['requests_per_s']:>15.1f} {theirs['requests_per_s']:>11.1f} "
                  f"{theirs['seconds'] / ours['seconds']:>7.2f}x {ours['lm_requests_per_s']:>17.1f} "
                  f"{theirs['lm_requests_per_s']:>13.1f} {theirs['lm_seconds'] / ours['lm_seconds']:>7.2f}x "
                  f"{theirs['lm_cpu_seconds'] / ours['lm_cpu_seconds']:>19.2f}x "
                  f"{ours['tokens']:>10}/{theirs['tokens']:<10}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

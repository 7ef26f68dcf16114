"""VQA ``rank`` inference: the official ranking (reference) vs blip-fast's fast ranker.

Rankers, all on the same question states (images and questions encoded once, shared), same
random weights, same synthetic questions and answer list:
    reference          ``BlipVQA.candidate_scores`` in plain eager PyTorch (every op on its
                       ``reference`` backend), as official BLIP computes: each question's top-k
                       answers, padded to the list's longest, run as k rows that each carry a
                       copy of the question states
    reference+kernels  the same on the model's automatic backends, so the fast ranker's ratio to
                       it counts only what the fast algorithm changes
    fast               ``blip_fast.models.blip_vqa.fast_candidate_scores``
Every ranker is warmed up on one question before it is timed; with ``--repeats R`` they take
turns R times and each keeps its fastest run (``best_s``). The fast ranker must pick the
reference's answers, with the same candidates and scores within 1e-4. Matmul FLOPs of both
algorithms (torch's FlopCounterMode on a reference-backend copy) give the speed-up that doing
less arithmetic alone explains.

The answer list is synthetic, shaped like VQA v2's 3,128 answers: mostly one word, some of two
to four, a few of six. Default config on CPU: preset ``blip_small_demo`` (4 text layers, width
256), 32 questions (official ``vqa.yaml``'s ``batch_size_test``: the batch one ``rank`` call
sees), k_test 128; on CUDA ``blip_base_vit_b16_384``, 64 questions.

    python benchmarks/bench_vqa_rank.py [--device cpu|cuda] [--questions N] [--k-test K]
        [--answers A] [--threads N] [--repeats R] [--allow-dirty]

Writes benchmarks/results/vqa_rank-<device>.json; refuses an uncommitted tree unless
``--allow-dirty`` (a dry run).
"""

import argparse
import os
import random
import time
from pathlib import Path

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip_fast import create_model
from blip_fast.models.factory import as_config
from blip_fast.ops import _backend
from blip_fast.text import pre_question

BASELINES = ("reference", "reference+kernels")
# words per answer -> share of the list (VQA v2's answers are mostly one word)
ANSWER_WORDS = {1: 0.7, 2: 0.18, 3: 0.07, 4: 0.04, 6: 0.01}


def vocabulary_words(tokenizer) -> list[str]:
    """Whole lower-case words of the WordPiece vocabulary (no pieces, no specials)."""
    words = Path(tokenizer.vocab_file).read_text(encoding="utf-8").split("\n")
    return [w for w in words[2000:] if w.isalpha() and w.isascii()]


def synthetic_texts(tokenizer, n_questions: int, n_answers: int, seed: int = 0):
    """(questions normalised by pre_question, distinct answers)."""
    rng = random.Random(seed)
    words = vocabulary_words(tokenizer)
    lengths = rng.choices(list(ANSWER_WORDS), weights=list(ANSWER_WORDS.values()), k=n_answers)
    answers = list(dict.fromkeys(" ".join(rng.sample(words, n)) for n in lengths))
    questions = [
        pre_question(f"What {' '.join(rng.sample(words, rng.randint(3, 10)))}?")
        for _ in range(n_questions)
    ]
    return questions, answers


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", help="preset (default: blip_small_demo on CPU, see above)")
    p.add_argument("--questions", type=int, help="default: 32 on CPU, 64 on CUDA")
    p.add_argument("--k-test", type=int, default=128)
    p.add_argument("--answers", type=int, default=3128, help="answer list size (VQA v2: 3128)")
    p.add_argument("--repeats", type=int, default=5, help="alternated runs, fastest kept")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    return p.parse_args()


def matmul_flops(model, encodings, k):
    """Matmul FLOPs of both rankers, through a reference-backend copy of ``model`` (the
    counter does not see inside the C++ / Triton ops)."""
    counted = create_model("vqa", model.cfg, backend="reference").to(encodings[0].device).eval()
    counted.load_state_dict(model.state_dict())
    out = {}
    for name, fn in (
        ("reference", counted.candidate_scores),
        ("fast", counted.fast_candidate_scores),
    ):
        with FlopCounterMode(display=False) as counter:
            fn(*encodings, k)
        out[name] = counter.get_total_flops()
    out["ratio"] = out["reference"] / out["fast"]
    return out


def main():
    args = parse_args()
    commit = _harness.require_clean(args.allow_dirty)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    dev = args.device
    gpu = dev.startswith("cuda")
    args.config = args.config or ("blip_base_vit_b16_384" if gpu else "blip_small_demo")
    n_questions = args.questions or (64 if gpu else 32)
    torch.manual_seed(0)
    cfg = as_config(args.config)
    model = create_model("vqa", cfg).to(dev).eval()
    eager = create_model("vqa", cfg, backend="reference").to(dev).eval()
    eager.load_state_dict(model.state_dict())
    questions, answers = synthetic_texts(model.tokenizer, n_questions, args.answers)
    q_ids, q_mask = model.tokenize_questions(questions, dev)
    a_ids, a_mask = model.tokenize_answers(answers, dev)
    size = cfg.vision.image_size
    pixels = torch.randn(n_questions, 3, size, size, device=dev)
    with torch.no_grad():
        states = model.encode_questions(pixels, q_ids, q_mask)
    encodings = (states, q_mask, a_ids, a_mask)
    print(
        f"{_harness.device_name(dev)}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {args.config}: {n_questions} questions of {q_ids.shape[1]} tokens at most, "
        f"{len(answers)} answers of {a_ids.shape[1]} tokens at most, k_test {args.k_test}"
    )
    rankers = {
        "reference": eager.candidate_scores,
        "reference+kernels": model.candidate_scores,
        "fast": model.fast_candidate_scores,
    }
    for fn in rankers.values():  # first calls: allocation, lazy initialisation
        fn(states[:1], q_mask[:1], a_ids, a_mask, args.k_test)
    runs, results = {name: [] for name in rankers}, {}
    for _ in range(args.repeats):  # alternated: a slow spell of a shared machine hits all
        for name, fn in rankers.items():
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            results[name] = fn(*encodings, args.k_test)
            if gpu:
                torch.cuda.synchronize()
            runs[name].append(time.perf_counter() - t)
            print(f"{name:17s}: rank {runs[name][-1]:8.3f} s")
    load_after = os.getloadavg()[0]
    want_candidates, want_scores = results["reference"]
    picks = want_candidates.gather(1, want_scores.argmax(1, keepdim=True))
    rows = []
    for name in rankers:
        candidates, scores = results[name]
        if not torch.equal(candidates, want_candidates):
            raise AssertionError(f"{name} chose other candidates than the reference")
        diff = float((scores - want_scores).abs().max())
        same = torch.equal(candidates.gather(1, scores.argmax(1, keepdim=True)), picks)
        if diff >= 1e-4 or not same:
            raise AssertionError(f"{name}: scores differ by {diff:.2e}, same answers: {same}")
        rows.append(
            {
                "provider": name,
                "best_s": min(runs[name]),
                "runs_s": runs[name],
                "questions_per_s": n_questions / min(runs[name]),
                "max_abs_score_diff_vs_reference": diff,
            }
        )
    flops = matmul_flops(model, encodings, args.k_test)
    common = {
        "case": f"{n_questions} questions x {len(answers)} answers k{args.k_test}",
        "config": args.config,
        "questions": n_questions,
        "answers": len(answers),
        "answer_tokens_max": a_ids.shape[1],
        "k_test": args.k_test,
        "backends": {op: _backend.resolve(op, dev) for op in _backend.PREFERENCE},
        "matmul_flops": flops,
        "load_avg_1min": [load_before, load_after],
    }
    rows = [{**common, **row} for row in rows]
    path = _harness.write_results(
        "vqa_rank",
        dev,
        rows,
        sources=[*_harness.PACKAGE_SOURCES, "benchmarks/bench_vqa_rank.py"],
        commit=commit,
        allow_dirty=args.allow_dirty,
        baselines=BASELINES,
        time_key="best_s",
    )
    _harness.print_ratios(rows, time_key="best_s")
    print(
        f"matmul GFLOP: reference {flops['reference'] / 1e9:.1f}, fast "
        f"{flops['fast'] / 1e9:.1f} ({flops['ratio']:.2f}x less); 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after"
    )
    print("wrote", path)


if __name__ == "__main__":
    main()

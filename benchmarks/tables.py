"""README's benchmark tables, rendered from benchmarks/results/*.json and nothing else.

    python benchmarks/tables.py           # rewrite every table between README's markers
    python benchmarks/tables.py --check   # exit 1 when README differs from the rendering

A table sits between the lines ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``, NAME one of
TABLES, each exactly once. Every result file is checked first; one is refused, with its name and
the reason, when it lacks provenance, is a dry run, was measured on a dirty tree or at a commit
not in HEAD's history, or is stale: a later commit changed code it measures (one of its
provenance ``sources``). A stale result of a device this machine lacks (a GPU's, on a CPU-only
machine) is kept with a warning instead: only a machine with that device can re-measure it. The
rendering reads the JSON alone: the same files give the same bytes anywhere.
"""

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from collections.abc import Callable

from _git import REPO, RESULTS_SUBDIR, is_ancestor, later_changes

PROVENANCE_KEYS = ("commit", "dirty", "dry_run", "date", "device", "device_name", "torch")
PROVENANCE_KEYS += ("threads", "sources")
MARKERS = re.compile(r"^<!-- bench:([a-z_]+) -->\n(.*?)^<!-- /bench:\1 -->$", re.S | re.M)


class Refused(Exception):
    """A result file the tables must not show, or a README the tables cannot fill."""


def refusal(result: dict, filename: str, repo: str) -> str | None:
    """Why ``result`` (read from ``filename``) must not be shown, or None."""
    prov = result.get("provenance") if isinstance(result, dict) else None
    if not isinstance(prov, dict):
        return "no provenance (measured before results recorded it): re-measure"
    missing = [key for key in PROVENANCE_KEYS if key not in prov]
    if missing:
        return f"provenance lacks {', '.join(missing)}: re-measure"
    expected = f"{result.get('benchmark')}-{prov['device']}.json"
    if filename != expected:
        return (
            f"holds benchmark {result.get('benchmark')!r} on {prov['device']}: name it {expected}"
        )
    commit = prov["commit"]
    if prov["dry_run"]:
        return "a dry run (--allow-dirty): re-measure without it on a clean tree"
    if prov["dirty"]:
        return f"measured on a dirty tree (uncommitted changes over {commit[:12]}): re-measure"
    if not is_ancestor(commit, repo):
        return f"measured at commit {commit[:12]}, which is not in HEAD's history: re-measure"
    return None


def staleness(result: dict, repo: str) -> str | None:
    """Why ``result`` no longer measures the code at HEAD, or None when it still does."""
    prov = result["provenance"]
    changes = later_changes(prov["commit"], prov["sources"], repo)
    if not changes:
        return None
    newest, files = next(iter(changes.items()))
    return (
        f"stale: measured at {prov['commit'][:12]}; {len(changes)} later commit(s) changed code "
        f"it measures, newest {newest[:12]} ({', '.join(files[:4])}): re-measure"
    )


def devices_here() -> set[str]:
    """Devices whose results this machine can re-measure."""
    import torch

    return {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())


def load_results(results_dir: str, repo: str) -> dict[str, dict]:
    """file name -> result, for every results/*.json; raises Refused listing every bad file."""
    results, problems = {}, []
    for filename in sorted(f for f in os.listdir(results_dir) if f.endswith(".json")):
        try:
            with open(os.path.join(results_dir, filename), encoding="utf-8") as f:
                result = json.load(f)
        except ValueError as e:
            problems.append(f"{filename}: not valid JSON ({e})")
            continue
        reason = refusal(result, filename, repo) or staleness(result, repo)
        if reason is None:
            results[filename] = result
        elif reason.startswith("stale") and result["provenance"]["device"] not in devices_here():
            # a GPU result cannot be re-measured on a CPU-only machine: shown, and said so here
            print(f"warning: {filename}: {reason} (needs a {result['provenance']['device']})",
                  file=sys.stderr)  # fmt: skip
            results[filename] = result
        else:
            problems.append(f"{filename}: {reason}")
    if problems:
        raise Refused("refused result files in benchmarks/results:\n  " + "\n  ".join(problems))
    return results


# --- cells ----------------------------------------------------------------------------------


def number(value: float) -> str:
    """Three significant digits, or the whole number from 100 up."""
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f}"


def ms(value: float) -> str:
    return f"{number(value)} ms"


def seconds(value: float) -> str:
    return f"{value:.1f} s"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def with_memory(row: dict, cell: str) -> str:
    return cell + (f", +{row['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in row else "")


def by_case(result: dict) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        cases.setdefault(row["case"], {})[row["provider"]] = row
    return cases


# --- rows of one result file, per table --------------------------------------------------------


def speed_rows(result: dict) -> list[list[str]]:
    """Per case: the reference, the fastest baseline, blip-fast's fastest provider and its
    speed-up over both; a row with peak memory (ITC) shows it after the time."""
    key, baselines = result["time_key"], result["baselines"]
    lines = []
    for case, providers in by_case(result).items():
        ref = providers[result["reference"]]
        best = providers[ref["best_baseline"]]
        ours = [p for name, p in providers.items() if name not in baselines]
        top = min(ours, key=lambda p: p[key]) if ours else None
        lines.append(
            [
                f"`{result['benchmark']}`",
                result["provenance"]["device"],
                case,
                with_memory(ref, ms(ref[key])),
                f"`{best['provider']}` {ms(best[key])}",
                with_memory(top, f"`{top['provider']}` {ms(top[key])}") if top else "—",
                f"**{ratio(top['speedup_vs_reference'])}**" if top else "—",
                ratio(top["speedup_vs_best_baseline"]) if top else "—",
            ]
        )
    return lines


def train_step_rows(result: dict) -> list[list[str]]:
    lines = []
    for case, providers in by_case(result).items():
        ref, fast, eager = providers["reference"], providers["fast"], providers["fast eager"]
        # a lever's share: how much slower fast eager gets with that lever off (or, for
        # image-token dropout, how much faster with it on)
        shares = [
            f"{name.removeprefix('fast eager ')} {ratio(r['median_ms'] / eager['median_ms'])}"
            for name, r in providers.items()
            if name.startswith("fast eager ")
        ]
        mfu = fast.get("mfu")
        kept = providers.get("reference +keep_freed_memory")
        lines.append(
            [
                result["provenance"]["device"],
                case,
                f"{ref['precision']} / {fast['precision']}",
                *(
                    f"{ms(r['median_ms'])} ({number(r['q1_ms'])}-{number(r['q3_ms'])}), "
                    f"{r['samples_per_s']:.1f}/s"
                    for r in (ref, fast, eager)
                ),
                f"**{ratio(fast['speedup_vs_reference'])}** / "
                f"{ratio(eager['speedup_vs_reference'])}",
                f"{ms(kept['median_ms'])}, {ratio(kept['median_ms'] / fast['median_ms'])}"
                if kept
                else "—",
                f"+{ref['peak_extra_mib']:.0f} / +{fast['peak_extra_mib']:.0f} / "
                f"+{eager['peak_extra_mib']:.0f} MiB",
                ", ".join(shares) or "—",
                f"{100 * mfu:.1f}%" if mfu else "—",
            ]
        )
    return lines


RETRIEVAL_PROVIDERS = ("reference", "reference+kernels", "fast", "fast F.linear", "fast bf16")


def retrieval_rows(result: dict) -> list[list[str]]:
    lines = []
    for case, providers in by_case(result).items():
        fast = providers["fast"]
        diffs = [
            r["max_abs_score_diff_vs_fast"]
            for name, r in providers.items()
            if name != "fast" and "max_abs_score_diff_vs_fast" in r
        ]
        times = []
        for name in RETRIEVAL_PROVIDERS:
            row = providers.get(name)
            cell = seconds(row["best_s"]) if row else "—"
            if row and row["precision"] == "bf16":
                cell += (
                    f" (**{ratio(row['speedup_vs_fast_fp32'])}** fp32's speed, with encoding "
                    f"**{ratio(row['whole_speedup_vs_fast_fp32'])}**; metrics within "
                    f"{row['max_metric_diff_vs_fast']:.2f} of fp32's)"
                )
            times.append(cell)
        flops = fast["matmul_flops"]
        lines.append(
            [
                result["provenance"]["device"],
                str(result["provenance"]["threads"]),
                f"`{fast['config']}`, {fast['image_tokens']} image tokens",
                case,
                *times,
                f"**{ratio(fast['speedup_vs_reference'])}** / "
                f"{ratio(fast['speedup_vs_best_baseline'])}",
                f"{seconds(fast['encode_s'])} / {seconds(fast['fast_encode_s'])}",
                f"{seconds(fast['whole_s'])}, **{ratio(fast['whole_speedup_vs_reference'])}**",
                f"{max(diffs):.0e}" if diffs else "—",
                ratio(flops["ratio"]) if flops else "—",
            ]
        )
    return lines


def vqa_rank_rows(result: dict) -> list[list[str]]:
    lines = []
    for case, providers in by_case(result).items():
        fast = providers["fast"]
        lines.append(
            [
                result["provenance"]["device"],
                str(result["provenance"]["threads"]),
                f"{fast['config']}, {case}",
                *(seconds(providers[p]["best_s"]) for p in ("reference", "reference+kernels")),
                seconds(fast["best_s"]),
                f"**{ratio(fast['speedup_vs_reference'])}** / "
                f"{ratio(fast['speedup_vs_best_baseline'])}",
                f"{fast['max_abs_score_diff_vs_reference']:.1e}",
                ratio(fast["matmul_flops"]["ratio"]),
            ]
        )
    return lines


def caption_rows(result: dict) -> list[list[str]]:
    lines = []
    for case, providers in by_case(result).items():
        bf16 = providers["fast bf16"]
        lines.append(
            [
                result["provenance"]["device"],
                str(result["provenance"]["threads"]),
                case,
                *(
                    f"{providers[p]['images_per_s']:.1f}"
                    for p in ("reference", "fast", "fast bf16")
                ),
                f"**{ratio(bf16['speedup_vs_fast_fp32'])}**",
                f"{100 * bf16['identical_to_fast']:.0f}%",
            ]
        )
    return lines


def demo_rows(result: dict) -> list[list[str]]:
    return [
        [
            result["provenance"]["device"],
            row["case"],
            f"{seconds(row['best_wall_s'])} (best of {len(row['runs_wall_s'])})",
            seconds(row["training_s"]),
            *(f"{row['metrics'][key]:.1f}%" for key in ("txt_r1", "img_r1", "txt_r5", "img_r5")),
            _bf16_delta(row.get("bf16_vs_fp32")),
        ]
        for row in result["rows"]
    ]


def _bf16_delta(deltas: dict | None) -> str:
    if deltas is None:
        return "—"
    return f"{deltas['max_abs_delta']:.2f} ({deltas['images']} images, k {deltas['k_test']})"


def data_rows(result: dict) -> list[list[str]]:
    return [
        [
            result["provenance"]["device"],
            row["case"],
            f"`{row['provider']}`",
            f"{row['images_per_s']:.0f}",
            f"{row['images']} images, batch {row['batch_size']}, {row['workers']} workers",
        ]
        for row in result["rows"]
    ]


def search_rows(result: dict) -> list[list[str]]:
    lines = []
    for row in result["rows"]:
        notes = []
        if "recall_at_10" in row:
            notes.append(f"recall@10 {row['recall_at_10']:.3f}")
        if row["provider"].startswith("stored "):
            fmt = row["provider"].split()[1]
            notes.append(f"{row['bytes_per_item']['tokens'][fmt]:,} B/item of tokens")
        if "top10_agreement" in row:
            agreement = row["top10_agreement"]
            notes.append(f"top-10 {100 * agreement['share']:.0f}% as `{agreement['with']}`")
        if "images_per_s" in row:
            notes.append(f"{row['images_per_s']:.2f} images/s")
        lines.append(
            [
                result["provenance"]["device"],
                row["case"],
                f"`{row['provider']}`",
                ms(row["median_ms"]),
                ms(row["p95_ms"]),
                ratio(row["speedup_vs_reference"]),
                ", ".join(notes) or "—",
            ]
        )
    return lines


# --- tables ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    benchmarks: tuple[str, ...]  # the results shown, in this order (a name covers name_*)
    header: tuple[str, ...]
    rows: Callable[[dict], list[list[str]]]  # one result file -> its lines
    note: str = ""


_SPEED_HEADER = ("benchmark", "device", "case", "reference", "best baseline", "blip-fast")
_SPEED_HEADER += ("blip-fast vs reference", "vs best baseline")
TABLES = {
    "demo": Table(
        ("demo",),
        ("device", "demo arguments", "wall time", "training", "TR@1", "IR@1", "TR@5", "IR@5")
        + ("bf16 vs fp32: largest R@1/5/10 change",),
        demo_rows,
    ),
    "train_step": Table(
        ("train_step",),
        ("device", "task, config, batch", "precision (ref / fast)", "reference: median step")
        + ("fast", "fast eager", "fast / fast eager vs reference")
        + ("reference +keep_freed_memory, fast vs it",)
        + ("peak step memory (ref / fast / eager)", "lever shares (x = -lever / fast eager)")
        + ("MFU",),
        train_step_rows,
        "Median step time over the timed steps, quartiles in brackets; samples/s at the median. "
        "A lever's share: fast eager's step time with that one lever off (or +image_token_drop "
        "on) over fast eager's; -kernels = every op on its reference kernel; reference "
        "+keep_freed_memory: the official step with glibc keeping freed blocks, as fast does on "
        "the CPU (`train.heap`), so fast's ratio to it is on equal allocator terms.",
    ),
    "optimizer": Table(("optimizer",), _SPEED_HEADER, speed_rows),
    "data": Table(("data",), ("device", "image size", "loader", "images/s", "setup"), data_rows),
    "ops": Table(
        ("attention", "cross_attention", "gathered_cross_attention", "itc", "lm_head_loss")
        + ("linear",),
        _SPEED_HEADER,
        speed_rows,
        "Median times; blip-fast = the fastest of blip-fast's backends; ITC and LM head loss: "
        "+ peak extra memory of one step.",
    ),
    "vqa_rank": Table(
        ("vqa_rank",),
        ("device", "threads", "config, questions x answers, k", "reference")
        + ("reference+kernels", "fast", "fast vs reference / best baseline")
        + ("max score diff", "matmul FLOP ratio"),
        vqa_rank_rows,
        "Time to rank every question (best of the runs); best baseline = the faster of "
        "`reference` and `reference+kernels`; same chosen answers in every provider.",
    ),
    "caption": Table(
        ("caption",),
        ("device", "threads", "case", "reference img/s", "fast fp32 img/s", "fast bf16 img/s")
        + ("bf16 vs fp32", "bf16 captions identical to fp32"),
        caption_rows,
        "Beam 3, max 20, min 5 (official COCO decoding); best of the runs.",
    ),
    "search": Table(
        ("search",),
        ("device", "case", "provider", "p50", "p95", "vs section reference", "notes"),
        search_rows,
        "Per query (build: per image); section references: exact top-k, recomputed tokens, the "
        "bare ViT forward.",
    ),
    "retrieval_eval": Table(
        ("retrieval_eval",),
        ("device", "threads", "model", "images x texts, k")
        + tuple(f"`{name}`" for name in RETRIEVAL_PROVIDERS)
        + (
            "fast vs reference / best baseline",
            "encode: reference / fast",
            "fast eval with encoding, vs reference",
            "max score diff",
            "matmul FLOP ratio",
        ),
        retrieval_rows,
        "Rerank time of the whole set (best of the alternated runs); best baseline = the faster "
        "of `reference` and `reference+kernels`; encode: texts and images as `evaluate` encodes "
        "them in each mode (bf16 encodes in fp32); with encoding = encode + rerank, the fast "
        "evaluation end to end; matmul FLOP ratio = reference / fast, counted on the first "
        "2 x k images.",
    ),
}


def select(results: dict[str, dict], benchmarks: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(file name, result) of ``benchmarks`` (a name also covers its name_* variants), in the
    order of ``benchmarks``, then by file name."""
    chosen = []
    for filename, result in results.items():
        name = result["benchmark"]
        for i, wanted in enumerate(benchmarks):
            if name == wanted or name.startswith(wanted + "_"):
                chosen.append((i, filename, result))
    return [(filename, result) for _, filename, result in sorted(chosen, key=lambda c: c[:2])]


def provenance_lines(selected: list[tuple[str, dict]]) -> list[str]:
    """Where, when and on what the files were measured; one line per distinct provenance."""
    groups: dict[str, list[str]] = {}
    for filename, result in selected:
        p = result["provenance"]
        cuda = f", CUDA {p['cuda']}" if p.get("cuda") else ""
        where = (
            f"commit `{p['commit'][:12]}`, {p['date'][:10]}, {p['device_name']}, "
            f"{p['threads']} torch threads, torch {p['torch']}{cuda}"
        )
        groups.setdefault(where, []).append(f"`{filename}`")
    return [f"- {', '.join(files)}: {where}" for where, files in groups.items()]


def render_table(name: str, results: dict[str, dict]) -> list[str]:
    spec = TABLES[name]
    selected = select(results, spec.benchmarks)
    if not selected:
        wanted = ", ".join(f"{b}-<device>.json" for b in spec.benchmarks)
        return [f"No results measured yet ({wanted})."]
    lines = []
    for filename, result in selected:
        try:
            lines += spec.rows(result)
        except (KeyError, TypeError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            raise Refused(f"{filename}: cannot fill table {name!r} ({error})") from e
    out = ["| " + " | ".join(spec.header) + " |", "|" + "---|" * len(spec.header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    out += ["", *([spec.note, ""] if spec.note else [])]
    return out + provenance_lines(selected)


def render(readme: str, results: dict[str, dict]) -> str:
    """``readme`` with every marked table rendered from ``results``."""
    found = [m.group(1) for m in MARKERS.finditer(readme)]
    unknown = sorted(set(found) - set(TABLES))
    missing = sorted(set(TABLES) - set(found))
    repeated = sorted({name for name in found if found.count(name) > 1})
    for problem, names in (("unknown", unknown), ("missing", missing), ("repeated", repeated)):
        if names:
            raise Refused(f"README: {problem} benchmark table markers: {', '.join(names)}")

    def fill(match):
        name = match.group(1)
        body = "\n".join(render_table(name, results))
        return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"

    return MARKERS.sub(fill, readme)


def main(argv=None, repo: str = REPO) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README is out of date")
    args = parser.parse_args(argv)
    readme_path = os.path.join(repo, "README.md")
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    try:
        rendered = render(readme, load_results(os.path.join(repo, RESULTS_SUBDIR), repo))
    except Refused as e:
        print(e, file=sys.stderr)
        return 1
    if args.check:
        if rendered == readme:
            return 0
        diff = difflib.unified_diff(
            readme.splitlines(), rendered.splitlines(), "README.md", "rendered", lineterm=""
        )
        print("\n".join(diff), file=sys.stderr)
        print(
            "README.md's benchmark tables are out of date: run benchmarks/tables.py",
            file=sys.stderr,
        )
        return 1
    if rendered != readme:
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())

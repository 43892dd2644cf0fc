"""The bench report as markdown, and both files written where the user asked."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from squeezekv.bench.measure import GIB, HF_PATHS
from squeezekv.bench.shapes import SHAPES


def device_name(device: torch.device, count: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return f"{count}x {name}" if count > 1 else name


def strongest_transformers(measurements: list[dict]) -> dict | None:
    """The fastest ``model.generate`` row that ran: the baseline our ratios are stated against."""
    ran = [m for m in measurements if m["path"] in HF_PATHS and m["error"] is None]
    return max(ran, key=lambda m: m["tokens_per_second"], default=None)


def markdown(report: dict) -> str:
    """The report as a markdown table, with ratios against the strongest transformers path and our
    full cache, and every path's KV bytes against the limit."""
    measurements = report["measurements"]
    rows = {m["path"]: m for m in measurements}
    strongest = strongest_transformers(measurements)
    best = strongest["tokens_per_second"] if strongest else None
    full = rows.get("full", {}).get("tokens_per_second")
    limit = report["kv_limit_bytes"]
    config = report["config"]
    spread = ""
    if config.get("tp", 1) > 1:
        spread = f", tensor parallel over {config['tp']} ranks (memory and bytes per rank)"
    elif config.get("device_map"):
        spread = f", device_map={config['device_map']!r} (memory summed over GPUs)"
    decode = "CUDA graphs" if config.get("cuda_graphs", True) else "eager"
    if config.get("cuda_graphs", True) and config.get("compile_layers", False):
        decode += ", norms, MLPs and rotary embeddings compiled, projections joined"
    against = f"`{strongest['path']}`, the fastest transformers path here" if strongest else "none ran"
    lines = [
        f"{config['shape']}, prompt {config['prompt_tokens']} tokens, {config['new_tokens']} new tokens, "
        f"{report['device']}{spread}, squeezekv decode: {decode}, torch {report['torch']}, {report['date']}",
        f"KV memory limit: {limit / GIB:.2f} GiB (the full cache for {config['reference_batch']} "
        f"sequences); weights {report['weight_gib']:.1f} GiB; copy bandwidth "
        f"{report['copy_bandwidth_gbps']:.0f} GB/s",
        f"Every path: a warm-up run of the full length, then the median of {config['repeats']} timed "
        f"runs (spread: slowest - fastest, over the median). Ratios against {against}.",
        "",
        "| path | batch | prefill s | decode ms/step | spread | tokens/s | vs transformers | vs full "
        "| KV GiB | of limit | peak GiB | step / roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def number(value, digits=1) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    def ratio(value, base) -> str:
        return f"{value / base:.2f}x" if value and base else ""

    for m in measurements:
        if m["error"]:
            lines.append(f"| {m['path']} | {m['batch']} | {m['error']} |" + " |" * 9)
            continue
        runs = m["decode_ms_runs"]
        spread_cell = f"{(max(runs) - min(runs)) / m['decode_ms_per_step']:.1%}" if len(runs) > 1 else ""
        tps = m["tokens_per_second"]
        cells = [
            m["path"],
            str(m["batch"]),
            number(m["prefill_seconds"], 2),
            number(m["decode_ms_per_step"]),
            spread_cell,
            f"{tps:.0f}",
            ratio(tps, best),
            ratio(tps, full),
            number(m["kv_bytes"] / GIB, 2),
            f"{m['kv_bytes'] / limit:.1%}" + (" OVER" if m["kv_bytes"] > limit else ""),
            number(m["peak_gib"]),
            ratio(m["decode_ms_per_step"], m["roofline_ms"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    gqa = rows.get("hf_static_gqa", {}).get("extra", {}).get("same_tokens_as_hf_static")
    if gqa is not None:
        lines += [
            "",
            "`hf_static_gqa` is `hf_static` with transformers' SDPA decode on the key-value heads "
            "(`pack_gqa`) under compile too; its greedy tokens equal the stock path's in "
            f"{gqa:.1%} of positions.",
        ]
    cut = [m for m in measurements if "cut_from_batch" in m.get("extra", {})]
    if cut:
        lines += [
            "",
            "Batches cut to fit the limit (rows' per-layer budgets differ, a layer's buffer takes the "
            "widest): "
            + ", ".join(f"{m['path']} {m['extra']['cut_from_batch']} -> {m['batch']}" for m in cut),
        ]
    peer = report.get("peer")
    if peer:
        library = peer["library"]
        held = peer["main_process_gib_allocated"]
        lines += [
            "",
            f"{library} {peer.get(library, '?')} ran eagerly in its own environment (transformers "
            f"{peer.get('transformers', '?')}, torch {peer.get('torch', '?')}), after this process let go "
            f"of its model{'' if held is None else f' ({held:.2f} GiB still allocated here)'}: each "
            "prompt prefilled alone under the press, then the batch decoded in a Python loop as its "
            "pipeline does, at the largest batch whose caches fit the same KV memory.",
        ]
    checks = report.get("fast_equals_simple", {})
    if checks:
        verdicts = [
            f"{name} {'yes' if c['tokens_equal'] and c['kept_equal'] else 'NO'}" for name, c in checks.items()
        ]
        lines += [
            "",
            "Fast engine as benchmarked equals the simple path on this device (tokens and kept tokens, "
            "tiny float64 model): " + ", ".join(verdicts),
        ]
    lines += ["", "Prefill of one prompt, plain forward vs squeezekv (importance, planning, eviction):", ""]
    for policy, o in report["prefill_overhead"].items():
        lines.append(
            f"- {policy}: {o['plain_seconds']:.3f} s plain, {o['squeezekv_seconds']:.3f} s squeezekv "
            f"({100 * o['overhead']:+.1f}%)"
        )
    lines += ["", "Peak KV memory during the prefill of one prompt, whole vs in chunks:", ""]
    for policy, m in report["chunked_prefill_peak_kv"].items():
        if m["chunked_bytes"] is None:
            lines.append(
                f"- {policy}: {m['whole_bytes'] / GIB:.2f} GiB whole; no chunks (it scores the whole prompt)"
            )
            continue
        lines.append(
            f"- {policy}: {m['whole_bytes'] / GIB:.2f} GiB whole, {m['chunked_bytes'] / GIB:.2f} GiB "
            f"in chunks of {m['chunk_tokens']} ({m['chunked_bytes'] / m['whole_bytes']:.2f}x)"
        )
    return "\n".join(lines) + "\n"


def report_stem(report: dict) -> str:
    """The files' name: shape (a ``config.json`` path: its folder's name), spread, device and date."""
    config = report["config"]
    shape = Path(config["shape"])
    name = config["shape"] if config["shape"] in SHAPES else shape.parent.name or shape.stem
    spread = f"-tp{config['tp']}" if config.get("tp", 1) > 1 else ""
    spread += "-device-map" if config.get("device_map") else ""
    return f"{name}{spread}-{report['device'].replace(' ', '-')}-{report['date'][:10]}"


def write_report(report: dict, directory: Path) -> tuple[Path, Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` atomically into ``directory``."""
    stem = report_stem(report)
    paths = (directory / f"{stem}.json", directory / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(report, indent=2) + "\n", markdown(report)), strict=True):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return paths

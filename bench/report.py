"""hack/bench's outputs: the summary dict (JSON), a markdown report and a PNG chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

MIB = 1 << 20
CSI = "csi-oci publish"
CSI_NO_DIFF = "csi-oci publish, no diff_id check"
LAZY = "csi-oci lazy"
# Compressed images whose publish is also timed with --no-verify-diff-ids.
DIFF_CHECKED = ("tar+gzip", "tar+zstd")
# Uncompressed data: bounded by download + one sha256 pass (verified_pull_floor).
FLOORED = ("raw", "tar")

# The targets: (packaging, peer it is compared with or None for the
# fastest, minimum speed-up).
PEER_TARGETS = {
    "raw": ("oras pull", 1.2),
    "tar": ("oras cp + tar -x", 1.2),
    "tar+gzip": (None, 1.0),
    "tar+zstd": (None, 1.3),
}
LIMIT_TARGETS = {"raw": 0.8, "tar": 0.8}


def summarize(runs: list[dict[str, Any]], model_bytes: int) -> dict[str, dict[str, Any]]:
    """{packaging: {tool: stats}} from the list of individual runs."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        grouped.setdefault(run["packaging"], {}).setdefault(run["tool"], []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for packaging, tools in grouped.items():
        out[packaging] = {}
        for tool, items in tools.items():
            secs = [r["seconds"] for r in items]
            median = statistics.median(secs)
            stats: dict[str, Any] = {
                "median_s": median,
                "min_s": min(secs),
                "max_s": max(secs),
                "runs_s": secs,
                "mib_s": model_bytes / MIB / median,
            }
            for key in items[0].get("extra", {}):
                vals = [r["extra"][key] for r in items]
                stats[key] = max(vals) if "peak" in key else statistics.median(vals)
            out[packaging][tool] = stats
    return out


def ratios(summary: dict[str, dict[str, Any]], limits: dict[str, float], cores: int) -> dict:
    """csi-oci against its best peer and against the machine limit per packaging."""
    out: dict[str, dict[str, Any]] = {}
    for packaging, tools in summary.items():
        if CSI not in tools:
            continue
        csi = tools[CSI]
        peers = {t: s for t, s in tools.items() if not t.startswith("csi-oci")}
        row: dict[str, Any] = {}
        if peers:
            best = min(peers, key=lambda t: peers[t]["median_s"])
            row["best_peer"] = best
            row["speedup_vs_best_peer"] = peers[best]["median_s"] / csi["median_s"]
            for t, s in peers.items():
                row[f"speedup_vs[{t}]"] = s["median_s"] / csi["median_s"]
        limit_name, limit = limit_for(packaging, limits, cores)
        row["limit"] = limit_name
        row["limit_mib_s"] = limit
        row["fraction_of_limit"] = csi["mib_s"] / limit if limit else None
        # Every tool writes the whole model: past the kernel's dirty-page
        # threshold, writes go at the disk's pace whatever the CPU does.
        disk = limits.get("disk_write_page_cache")
        row["fraction_of_disk_write"] = csi["mib_s"] / disk if disk else None
        floor = limits.get("verified_pull_floor")
        if packaging in FLOORED and floor:
            row["floor_mib_s"] = floor
            row["fraction_of_floor"] = csi["mib_s"] / floor
            if peers:
                row["best_peer_fraction_of_floor"] = peers[row["best_peer"]]["mib_s"] / floor
        out[packaging] = row
    return out


def limit_for(packaging: str, limits: dict[str, float], cores: int) -> tuple[str, float]:
    """The serial stage that bounds a packaging: hashing on all cores for the
    uncompressed ones (blobs hash in parallel), the best decoder on one core
    for a single compressed layer (one stream inflates on one core)."""
    if packaging in ("raw", "tar"):
        key = f"sha256_{cores}_cores"
        return key, limits.get(key, 0.0)
    if packaging in ("tar+gzip", "estargz"):
        gz = {k: v for k, v in limits.items() if k.startswith("gzip_")}
        key = max(gz, key=lambda k: gz[k]) if gz else "gzip"
        return key + " (one core)", gz.get(key, 0.0)
    return "zstd (one core)", limits.get("zstd", 0.0)


def targets(summary: dict, rat: dict) -> list[dict[str, Any]]:
    rows = []
    for packaging, (peer, want) in PEER_TARGETS.items():
        if packaging not in rat:
            continue
        tools = summary[packaging]
        name = peer or rat[packaging].get("best_peer")
        if name not in tools:
            continue
        got = tools[name]["median_s"] / tools[CSI]["median_s"]
        bound = ""
        if "floor_mib_s" in rat[packaging]:
            most = rat[packaging]["floor_mib_s"] / tools[name]["mib_s"]
            bound = f"the verified-pull floor allows at most {most:.2f}x"
        elif CSI_NO_DIFF in tools:
            unchecked = tools[name]["median_s"] / tools[CSI_NO_DIFF]["median_s"]
            bound = f"{unchecked:.2f}x without the diff_id check"
        rows.append(
            {
                "target": f"{packaging}: csi-oci vs {name}",
                "want": f">= {want}x",
                "got": f"{got:.2f}x",
                "met": got >= want,
                "bound": bound,
            }
        )
    for packaging, want in LIMIT_TARGETS.items():
        if packaging in rat and rat[packaging]["fraction_of_limit"] is not None:
            got = rat[packaging]["fraction_of_limit"]
            bound = ""
            if "floor_mib_s" in rat[packaging]:
                most = rat[packaging]["floor_mib_s"] / rat[packaging]["limit_mib_s"]
                bound = f"the verified-pull floor is {most:.2f}x of it"
            rows.append(
                {
                    "target": f"{packaging}: csi-oci vs {rat[packaging]['limit']}",
                    "want": f">= {want}x",
                    "got": f"{got:.2f}x",
                    "met": got >= want,
                    "bound": bound,
                }
            )
    rss = [
        s
        for tools in summary.values()
        for t, s in tools.items()
        if t == CSI and "rss_idle_bytes" in s
    ]
    if rss:
        idle = max(s["rss_idle_bytes"] for s in rss) / 1e6
        peak = max(s["rss_peak_bytes"] for s in rss) / 1e6
        rows.append(
            {
                "target": "driver RSS at idle",
                "want": "< 100 MB",
                "got": f"{idle:.0f} MB",
                "met": idle < 100,
            }
        )
        rows.append(
            {
                "target": "driver RSS peak during a pull",
                "want": "< 300 MB",
                "got": f"{peak:.0f} MB",
                "met": peak < 300,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# csi-oci pull benchmark, {meta['date']}",
        "",
        f"Machine: {meta['machine']}. Model: {meta['model_mib']} MiB in {meta['files']} files "
        f"({meta['shards']} shards, half random and half low-entropy data, plus JSON files). "
        f"{meta['reps']} repetitions, page cache dropped before each run "
        f"(dropped: {meta['page_cache_dropped']}), registry blobs re-read into the cache "
        "so the registry serves from memory. Command: "
        f"`{meta['command']}`.",
        "",
        "## Times",
        "",
        "| packaging | tool | median s | min-max s | MiB/s | csi-oci speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for packaging, tools in report["results"].items():
        csi = tools.get(CSI)
        for tool, s in tools.items():
            speed = ""
            if csi and not tool.startswith("csi-oci"):
                speed = f"{s['median_s'] / csi['median_s']:.2f}x"
            extra = ""
            if "first_byte_s" in s:
                extra = f" (first byte {s['first_byte_s']:.3f} s)"
            lines.append(
                f"| {packaging} | {tool}{extra} | {s['median_s']:.2f} | "
                f"{s['min_s']:.2f}-{s['max_s']:.2f} | {s['mib_s']:.0f} | {speed} |"
            )
    lines += [
        "",
        "## Against the machine",
        "",
        "| packaging | best peer | csi-oci / best peer | limit | limit MiB/s | csi-oci / limit "
        "| csi-oci / disk write |",
        "|---|---|---|---|---|---|---|",
    ]
    for packaging, row in report["ratios"].items():
        frac = row["fraction_of_limit"]
        lines.append(
            f"| {packaging} | {row.get('best_peer', '-')} | "
            f"{row.get('speedup_vs_best_peer', 0):.2f}x | {row['limit']} | "
            f"{row['limit_mib_s']:.0f} | {frac:.2f} | "
            f"{row.get('fraction_of_disk_write') or 0:.2f} |"
            if frac is not None
            else f"| {packaging} | - | - | - | - | - | - |"
        )
    lines += machine_use(report)
    lines += ["", "## Machine limits", "", "| measure | value |", "|---|---|"]
    for name, value in report["limits"].items():
        unit = "CPU s per GiB" if name.endswith("_per_gib") else "MiB/s"
        lines.append(f"| {name} | {value:.{2 if unit != 'MiB/s' else 0}f} {unit} |")
    lines += [
        "",
        "## Targets",
        "",
        "| target | want | got | met | what bounds it |",
        "|---|---|---|---|---|",
    ]
    for row in report["targets"]:
        lines.append(
            f"| {row['target']} | {row['want']} | {row['got']} | "
            f"{'yes' if row['met'] else 'no'} | {row.get('bound', '')} |"
        )
    return "\n".join(lines) + "\n"


def machine_use(report: dict[str, Any]) -> list[str]:
    """Per tool: the machine's busy CPU seconds during a run (every process,
    the registry and kernel included) and how much of the cores that used."""
    cores = report["meta"]["cores"]
    lines = [
        "",
        "## Machine use during a run (medians, all processes)",
        "",
        "| packaging | tool | s | busy CPU s | cores busy | idle CPU s | steal CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for packaging, tools in report["results"].items():
        for tool, s in tools.items():
            if "cpu_busy_s" not in s:
                continue
            lines.append(
                f"| {packaging} | {tool} | {s['median_s']:.2f} | {s['cpu_busy_s']:.2f} | "
                f"{s['cpu_busy_s'] / s['median_s']:.2f} of {cores} | {s['cpu_idle_s']:.2f} | "
                f"{s['cpu_steal_s']:.2f} |"
            )
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: MiB/s per packaging and tool, with the sha256 limit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    packagings = list(results)
    tools: list[str] = []
    for t in results.values():
        tools += [name for name in t if name not in tools]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(tools))
    for i, tool in enumerate(tools):
        xs, ys = [], []
        for j, packaging in enumerate(packagings):
            if tool in results[packaging]:
                xs.append(j + i * width)
                ys.append(results[packaging][tool]["mib_s"])
        ax.bar(xs, ys, width, label=tool)
    ax.set_xticks([j + width * (len(tools) - 1) / 2 for j in range(len(packagings))])
    ax.set_xticklabels(packagings)
    ax.set_ylabel("MiB/s of model bytes (higher is faster)")
    cores = report["meta"]["cores"]
    sha = report["limits"].get(f"sha256_{cores}_cores")
    if sha:
        ax.axhline(sha, color="grey", linestyle="--", linewidth=1)
        ax.text(len(packagings) - 0.5, sha, f"sha256, {cores} cores", va="bottom", ha="right")
    ax.set_title(
        f"Pull + unpack of a {report['meta']['model_mib']} MiB model, {report['meta']['date']}"
    )
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

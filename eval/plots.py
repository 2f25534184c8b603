"""``s1fast eval``'s figure, ``OUT/scaling.png``: s1's sequential against parallel scaling."""

from __future__ import annotations


def _waits(n: int) -> str:
    """``1 forced wait``, ``2 forced waits``: the legend's count."""
    return f"{n} forced wait" if n == 1 else f"{n} forced waits"


def plot(points: list[dict], path: str, title: str) -> None:
    """s1's figure of sequential against parallel scaling: accuracy (pass@1) against mean thinking tokens per
    problem (log x), one solid line per number of waits over the budgets (or one line over the waits when the
    budget does not vary), each point labelled with its budget / waits; with --samples N > 1 also, per point, a
    dashed line of majority voting: cons@k against k times the point's mean thinking tokens, k = 1, 2, 4, ... N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    one_budget = len({p["max_thinking_tokens"] for p in points}) == 1
    groups: dict[str, list[dict]] = {}
    for p in points:
        name = "budget forcing" if one_budget else f"budget forcing, {_waits(p['num_waits'])}"
        groups.setdefault(name, []).append(p)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=150)
    for name, group in groups.items():
        group = sorted(group, key=lambda p: p["mean_thinking_tokens"])
        xs = [max(p["mean_thinking_tokens"], 1.0) for p in group]  # a budget of 0 would sit at -inf on a log axis
        ys = [100 * p["accuracy"] for p in group]
        ax.plot(xs, ys, marker="o", label=name)
        for p, x, y in zip(group, xs, ys):
            label = f"W{p['num_waits']}" if one_budget else (
                "no cap" if p["max_thinking_tokens"] is None else str(p["max_thinking_tokens"]))
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    accuracies = [100 * p["accuracy"] for p in points]
    for p in points:
        if "cons_at_k" not in p or p.get("samples", 1) < 2:
            continue
        ks = sorted(map(int, p["cons_at_k"]))
        xs = [max(k * p["mean_thinking_tokens"], 1.0) for k in ks]
        ys = [100 * p["cons_at_k"][str(k)] for k in ks]
        accuracies += ys
        budget = "no cap" if p["max_thinking_tokens"] is None else p["max_thinking_tokens"]
        ax.plot(xs, ys, marker=".", linestyle="--", label=f"majority vote (budget {budget}, {_waits(p['num_waits'])})")
        for k, x, y in zip(ks, xs, ys):
            ax.annotate(f"@{k}", (x, y), textcoords="offset points", xytext=(-14, 4), fontsize=6)
    ax.set_xscale("log", base=2)  # ticks at powers of two, like s1's figure (512, 1K, 2K, ...)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1024 else f"{v / 1024:g}K"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1)
    low, high = max(0.0, min(accuracies) - 5), min(100.0, max(accuracies) + 5)
    ax.set_ylim(max(0.0, min(low, high - 10)), min(100.0, max(high, low + 10)))
    ax.set_xlabel("average thinking tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

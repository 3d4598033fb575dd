"""What every benchmark script in baselines/ ends with: one aligned table on stdout and the figures as JSON."""
import json


def report(rows: list[tuple[str, str]], results: dict, out: str) -> None:
    """Print (label, value) rows as a two-column table, then write `results` to `out` (skipped when empty)."""
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"written {out}")

"""Markdown tables for metric reports (the sweep summary, `python -m unclip.sampling.evaluate`)."""

from __future__ import annotations


def format_markdown(rows: list[list[str]]) -> str:
    """A padded markdown table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)

"""``python -m moe_mlora.bench scaling``: every configuration runs, and the table and plot land."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_mlora.bench import scaling


def test_scaling_writes_its_table_and_plot_and_keeps_other_text(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    markdown = tmp_path / "scaling.md"
    markdown.write_text("# Scaling\n\nProse the benchmark must keep.\n")
    scaling.main(["rounds=1", "batches=1", "threads=1", f"out={tmp_path}", "domains=zipf"])
    text = markdown.read_text()
    assert "Prose the benchmark must keep." in text
    block = text.split("<!-- bench scaling zipf: begin -->")[1].split(
        "<!-- bench scaling zipf: end -->"
    )[0]
    assert "--allocator tuned" in block and "allocator tuned" in block
    rows = [line for line in block.splitlines() if line.startswith("| ") and "series" not in line]
    expected = {(case.series, str(case.count)) for case in scaling.cases()}
    expected = {("base", "-")} | {key for key in expected if key[0] != "base"}
    assert {tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows} == expected
    for row in rows:  # every measured cell is a positive time and its ratio to base
        cells = [cell.strip() for cell in row.split("|")[3:-1]]
        assert any(cells), row
        assert all(float(cell) > 0 for cell in cells if cell), row
    assert (tmp_path / "scaling_zipf.png").stat().st_size > 0


def test_scaling_rejects_an_unknown_allocator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        scaling.main(["allocator=jemalloc"])
    assert "allocator" in capsys.readouterr().err

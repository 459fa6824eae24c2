"""Every benchmark's --help says what it measures and what it writes: its whole module docstring
(a description cut at the first line ended mid-sentence and named no output)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tiny import REPO, load_script

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "bench_csv.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_whole_docstring(script, monkeypatch, capsys):
    module = load_script(f"bench/{script}", f"bench_help_{Path(script).stem}")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    last_line = module.__doc__.strip().splitlines()[-1].strip()
    assert last_line in printed and "writes" in printed.lower()

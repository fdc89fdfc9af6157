"""``keep_freed_memory`` takes effect: after it, a large temporary reuses pages the process already has instead
of faulting in fresh ones; ``SPAMOPT_ALLOCATOR=system`` leaves glibc's defaults, a misspelt value is refused
by name, and every ``spamopt`` command calls it before it runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from spamopt import cli
from spamopt.experiments.harness import allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

# A warm product of an 8M-element float32 tensor (32 MiB, so mmap-served by default): its page faults.
_FAULTS = """
import resource, sys, torch
from spamopt.experiments.harness.allocator import keep_freed_memory
kept = keep_freed_memory()
x = torch.randn(1 << 23)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    del y
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(choice: str) -> tuple[str, int]:
    env = {**os.environ, "SPAMOPT_ALLOCATOR": choice}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@glibc
def test_kept_memory_spares_a_large_temporary_its_page_faults():
    """With glibc's defaults the 32 MiB product faults in its 8,192 pages on every call; kept, it reuses the
    pages freed by the call before (allowing 1,024 faults)."""
    assert _faults("keep") == ("True", pytest.approx(0, abs=1024))
    kept, faults = _faults("system")
    assert kept == "False" and faults >= 8000


def test_a_misspelt_allocator_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SPAMOPT_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="SPAMOPT_ALLOCATOR.*'keep'.*'system'"):
        allocator.keep_freed_memory()


def test_every_command_keeps_freed_memory_before_it_runs(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    with pytest.raises(SystemExit):
        cli.main(["spikes", "report", str(tmp_path / "absent")])
    assert calls == ["kept"]

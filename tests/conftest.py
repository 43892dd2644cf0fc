import os
import stat
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models: threads only add overhead, and fight when the machine is busy
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, in its interpreter

STAND_IN_KVPRESS = """
import contextlib
import sys

sys.stderr.write("chatty warning\\n" * 20000)  # more than a pipe buffer holds


class Press:
    def __init__(self, compression_ratio=0.0, **settings):
        self.compression_ratio = compression_ratio

    @contextlib.contextmanager
    def __call__(self, model):
        yield


SnapKVPress = StreamingLLMPress = PyramidKVPress = ObservedAttentionPress = Press
"""


@pytest.fixture
def stand_in_python(tmp_path):
    """This interpreter, with a package named kvpress (version 0.0.0) whose presses compress nothing."""
    site = tmp_path / "site"
    (site / "kvpress").mkdir(parents=True)
    (site / "kvpress" / "__init__.py").write_text(STAND_IN_KVPRESS)
    (site / "kvpress-0.0.0.dist-info").mkdir()
    (site / "kvpress-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kvpress\nVersion: 0.0.0\n"
    )
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script

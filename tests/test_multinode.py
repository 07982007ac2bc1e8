"""Two torchrun nodes in two network namespaces (tests/multinode.sh); needs root and iproute2."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2 for network namespaces")
def test_two_nodes_in_two_namespaces_match_one_node():
    result = subprocess.run(["bash", "tests/multinode.sh", sys.executable], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "multinode: 2-node checkpoint equals the single-node one" in result.stdout

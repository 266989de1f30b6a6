"""The torch-free wing (imaging/, inference/) never imports torch: by folder rule, by test."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import anomalyvae.imaging
import anomalyvae.inference

WINGS = (anomalyvae.imaging, anomalyvae.inference)


def _modules() -> list[str]:
    names = []
    for package in WINGS:
        names.append(package.__name__)
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def test_wings_list_their_modules():
    names = _modules()
    assert "anomalyvae.inference.scan" in names and "anomalyvae.imaging.io" in names


@pytest.mark.parametrize("module", _modules())
def test_module_never_imports_torch(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_a_real_scan_never_imports_torch(onnx_model, synthetic_root, tmp_path):
    code = (
        "import sys\n"
        "from anomalyvae.inference.scan import scan\n"
        f"result = scan({str(onnx_model)!r}, {str(synthetic_root / 'test')!r}, "
        f"{str(tmp_path / 'out')!r}, progress=False)\n"
        "assert result.n_files > 0 and result.n_errors == 0, result\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "out" / "report.html").is_file()

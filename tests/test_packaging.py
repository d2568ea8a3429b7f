"""Install-time behaviour: the native module, the console command, builds without a compiler."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rlhf_fast
from rlhf_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_native_module_imports_and_reports_version():
    native = pytest.importorskip("rlhf_fast._C", reason="the C++ extension was not built in this environment")
    assert native.version() == rlhf_fast.__version__


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert rlhf_fast.__version__ in capsys.readouterr().out


def test_quick_bench_writes_csv_table_and_plots(tmp_path):
    main(["bench", "--quick", "--only", "reference", "--out", str(tmp_path)])
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header == "op,provider,shape,dtype,metric,value,device,commit"
    assert "| provider | median ms |" in (tmp_path / "results.md").read_text()
    assert list(tmp_path.glob("*.png"))


def test_bench_refuses_unknown_family(tmp_path):
    with pytest.raises(ValueError, match=r"only: expected families among .*got \['nope'\]"):
        main(["bench", "--quick", "--only", "nope", "--out", str(tmp_path)])


def _build_wheel(tmp_path, env_changes):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so",
                                                              "__pycache__", "bench_out", "demo_out"))
    env = {**os.environ, **env_changes}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("rlhf_fast-*.whl")
    return zipfile.ZipFile(wheel).namelist(), out


@pytest.mark.parametrize(
    "env_changes",
    [{"CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false"}, {"RLHF_FAST_SKIP_CPP_BUILD": "1"}],
    ids=["compiler-missing", "build-skipped"],
)
def test_install_succeeds_without_the_native_build(tmp_path, env_changes):
    pytest.importorskip("pybind11")
    names, _ = _build_wheel(tmp_path, env_changes)
    assert "rlhf_fast/ops/__init__.py" in names
    assert not [n for n in names if n.startswith("rlhf_fast/_C")]

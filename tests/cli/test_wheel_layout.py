"""The package is self-contained: the Hydra config tree (``conf/`` at the top of the checkout, one copy)
ships inside it as ``llamalit/conf``, every entry point finds it by package, and a user's own config
directory joins it through ``hydra.searchpath``."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llamalit.cli

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("train", "prepare", "generate", "export", "evaluate", "chat")


def _installed(dist: str) -> bool:
    """Whether ``dist`` is installed, read from its metadata. Not ``importlib.util.find_spec("pip")``: setuptools'
    distutils shim answers a lookup of pip by turning itself off for the whole process, and inductor's next
    C++ build (``import setuptools``) then fails its assertion."""
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_every_entry_point_composes_its_config_from_the_package(tmp_path):
    """Each console script's main, run from a directory that holds no conf/, composes its root config."""
    code = textwrap.dedent("""
        import importlib, sys
        for name in sys.argv[1:]:
            sys.argv = [name, "--cfg", "job"]
            importlib.import_module(f"llamalit.cli.{name}").main()
            print(f"== composed {name}", flush=True)
    """)
    proc = _run(code, tmp_path, *ENTRY_POINTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("== composed")] == \
        [f"== composed {name}" for name in ENTRY_POINTS]
    assert llamalit.cli.CONFIG_PATH == "pkg://llamalit.conf"


def test_a_checkout_reads_the_top_level_conf_and_holds_one_copy():
    """In a checkout the package's config tree is conf/ itself (the editable install maps llamalit.conf there),
    and no second tree sits in the package to drift from it."""
    if not (ROOT / "conf" / "train.yaml").is_file():
        pytest.skip("an installed wheel, not a checkout")
    assert Path(llamalit.cli.CONF_DIR).resolve() == (ROOT / "conf").resolve()
    assert not (ROOT / "src" / "llamalit" / "conf").exists(), "one copy of each YAML: conf/ only"


def test_user_experiment_found_through_hydra_searchpath(tmp_path):
    """README: ``hydra.searchpath=[file:///path/to/myconf]`` adds the user's experiment/*.yaml."""
    myconf = tmp_path / "myconf"
    (myconf / "experiment").mkdir(parents=True)
    (myconf / "experiment" / "my_tiny.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /model: tiny
        experiment_name: my_tiny
        trainer:
          max_steps: 7
    """))
    code = "from llamalit.cli.train import main; main()"
    proc = _run(code, tmp_path, f"hydra.searchpath=[file://{myconf}]", "experiment=my_tiny", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "experiment_name: my_tiny" in proc.stdout and "max_steps: 7" in proc.stdout
    # the shipped groups still compose beside it: model=tiny comes from the package
    tiny = OmegaConf.load(Path(llamalit.cli.CONF_DIR) / "model" / "tiny.yaml")
    assert f"n_layers: {tiny.n_layers}\n" in proc.stdout and f"dim: {tiny.dim}\n" in proc.stdout
    without = _run(code, tmp_path, "experiment=my_tiny", "--cfg", "job")
    assert without.returncode != 0 and "my_tiny" in without.stderr


@pytest.mark.skipif(not _installed("pip"), reason="pip builds the wheel")
def test_wheel_holds_the_config_tree_and_kernels(tmp_path):
    """The built wheel ships every file of conf/ and the kernels' sources (built from a copy: no build/ left)."""
    src = tmp_path / "src_copy"
    for tree in ("src", "conf"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("llamalit-*.whl"))).namelist())
    conf = Path(llamalit.cli.CONF_DIR)
    shipped = {f"llamalit/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    kernels = Path(llamalit.__file__).parent / "inference" / "kernels"
    assert {f"llamalit/inference/kernels/{p.name}" for p in kernels.glob("*.cpp")} <= names

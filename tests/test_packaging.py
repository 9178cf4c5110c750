"""losses/ and logprob_kernels/ install under align_cli (never as top-level `losses` / `kernels`), in both
an editable install (this environment) and a wheel; the recipes and builtin data ship inside."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_folders():
    import align_cli.kernels
    import align_cli.losses

    assert Path(align_cli.losses.__file__).parent == ROOT / "losses"
    assert Path(align_cli.kernels.__file__).parent == ROOT / "logprob_kernels"
    done = subprocess.run([sys.executable, "-c", "import losses"], capture_output=True, cwd="/")
    assert done.returncode != 0, "`losses` must not be importable as a top-level name"


def test_no_folder_of_the_repository_stands_in_for_the_hub_kernels_package():
    """transformers (5.25 on) imports Hugging Face's `kernels` package whenever it is installed; a `kernels/` folder
    at the repository root would be found in its place by anything started there with `python -m` or `-c` (the
    current directory comes first on sys.path), and every transformers import would fail."""
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip()   # None, or the installed package (which may lie in a .venv inside the checkout)
    assert origin == "None" or Path(origin).parent.parent != ROOT, origin


def test_wheel_contains_and_imports_the_subpackages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("align-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "align_cli/losses/__init__.py" in names and "align_cli/kernels/__init__.py" in names
    assert "align_cli/recipes/dpo.yaml" in names
    assert "align_cli/builtin_data/arithmetic_pairs.train.jsonl" in names
    assert not any(n.startswith(("losses/", "kernels/", "logprob_kernels/")) for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import align_cli.losses as l, align_cli.kernels as k, align_cli.recipe as r;"
             "print(l.__file__); print(k.__file__); print(sorted(r.builtin_recipes()))")
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(target) in done.stdout and "dpo" in done.stdout

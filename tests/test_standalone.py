"""A file of collectives/ or schedules/ works with only torch beside it (and the files of its own
folder that it names): copied out of minititan, with minititan made unimportable, each imports."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "minititan"
BLOCK_MINITITAN = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "minititan":
            raise ImportError(f"{name} imported from a file that should need only torch")
sys.meta_path.insert(0, Refuse())
"""


@pytest.mark.parametrize("folder", ["collectives", "schedules"])
def test_folder_imports_without_minititan(tmp_path, folder):
    shutil.copytree(ROOT / folder, tmp_path / "copied", ignore=shutil.ignore_patterns("__pycache__"))
    modules = sorted(p.stem for p in (tmp_path / "copied").glob("*.py") if p.stem != "__init__")
    script = BLOCK_MINITITAN + "".join(f"import copied.{m}\n" for m in modules)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

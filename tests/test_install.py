"""The README's set-up: the wheel installs the library alone; every README example runs outside the checkout."""

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_short_examples():
    examples = readme_examples()
    assert len(examples) >= 2
    assert all(len(e.strip().splitlines()) <= 15 for e in examples), "README examples are at most 15 lines"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs_outside_the_checkout(index, tmp_path):
    """Run from a temporary directory, so only the installed package (not the checkout's folders) is importable."""
    script = tmp_path / f"example_{index}.py"
    script.write_text(readme_examples()[index])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    done = subprocess.run(
        [sys.executable, "-P", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_wheel_holds_the_library_only(tmp_path):
    """The wheel installs trustsgd_jax with its licence; experiments/, benchmarks/ and results/ stay in the checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("trustsgd_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "trustsgd_jax" in tops
    assert not tops & {"experiments", "benchmarks", "results", "tests", "docs"}
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert any(n.startswith("trustsgd_jax/sample_data/") and n.endswith(".npz") for n in names)

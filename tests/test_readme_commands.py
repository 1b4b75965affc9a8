"""Every `--config my_run.yaml` / `run.yaml` command (and sbatch line) in the README's code blocks (and in
the docs pages moved out of it) resolves to a valid
config with the README's own my_run.yaml (`load_config`, the check every launch starts with): the
README's SePO line used to be refused (`unknown key 'method.beta'`). Training itself is covered
elsewhere; this catches a README command that cannot start as written."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sparsepo.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = (README, ROOT / "docs" / "methods.md", ROOT / "docs" / "families.md", ROOT / "docs" / "memory.md",
          ROOT / "docs" / "lora.md")  # the README and the reference pages moved out of it


def blocks(kind: str) -> list[str]:
    return [b for page in GUIDES for b in re.findall(rf"```{kind}\n(.*?)```", page.read_text(), flags=re.S)]


def config_commands() -> list[str]:
    """The README's command lines (continuations joined, comments cut) that train from a config file."""
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if re.search(r"sparsepo(\.train)?\b.*--config (my_run|run)\.yaml", line) and "demo" not in line \
                    or re.search(r"sbatch .*\.sbatch (my_run|run)\.yaml", line):
                lines.append(line)
    return lines


def overrides_of(line: str) -> list[str]:
    words = shlex.split(line)
    extra = []
    if "sae" in words and "train" in words and "--out" in words:  # `sparsepo sae train --out D` sets sae.path=D
        extra.append(f"sae.path={words[words.index('--out') + 1]}")
    if words[0].startswith("REFERENCE_NODES="):  # slurm/train_multinode.sbatch sets the reference ranks from it
        extra.append(f"topology.reference_ranks={words[0].split('=')[1]}")
    return extra + [w for w in words if re.match(r"^[a-z_]+\.[a-z_]+=", w)]


def test_the_readme_has_the_commands_this_test_reads():
    assert len(config_commands()) >= 8, config_commands()


@pytest.mark.parametrize("line", config_commands())
def test_readme_command_resolves_with_the_readmes_own_recipe(line, tmp_path):
    (recipe,) = [b for b in blocks("yaml") if b.startswith("# my_run.yaml")]
    path = tmp_path / "my_run.yaml"
    path.write_text(recipe)
    (tmp_path / "run.yaml").write_text(recipe)
    assert yaml.safe_load(recipe)["method"]["name"] == "dpo"
    load_config(path, overrides_of(line))  # raises ConfigError, naming the key, if the line cannot start

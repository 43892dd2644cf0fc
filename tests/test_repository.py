"""What a new user meets first: the README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_the_readme_examples_use_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in set(re.findall(r"--prompt-file (\S+)", readme)) - {"FILE"}:
        assert (ROOT / path).is_file(), path

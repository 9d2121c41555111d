"""README.md and docs/*.md name only what exists: repository paths (configs included), markdown
links, console commands, `python -m` modules, and the `--flags` of launch/train.py, the console
commands and the other scripts the docs run. A rename or removal that the docs did not follow fails
here, naming the page and the name."""
import argparse
import glob
import importlib
import importlib.util
import os
import re
import shlex
import sys

import pytest

from conftest import ROOT

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOP = ("launch", "sdlora_ds", "shards", "configs", "bench", "tests", "docs")
# A repository path: a top-level folder, then path characters (globs and <placeholders> allowed).
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>{}-]*)" % "|".join(TOP))
OUTPUTS = re.compile(r"^docs/compare_|_X\b|<|\{")  # folders a command creates, placeholders
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
OTHER_TOOLS = {"--no-deps", "--logdir"}  # pip's and tensorboard's, named in prose
COMMAND = re.compile(r"(?<![\w-])sdlora-[a-z0-9-]+")


def _text(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def _scripts() -> dict:
    """pyproject.toml's [project.scripts] (read by hand: tomllib is Python 3.11+, the package supports 3.10)."""
    text = _text("pyproject.toml")
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))
    assert "sdlora-sweep" in scripts, "pyproject.toml's [project.scripts] not found"
    return scripts


class _Parsed(Exception):
    pass


def _flags_of(main) -> set:
    """The option strings of the parser `main([])` builds (stopped at parse_args: nothing runs)."""
    got = {}

    def grab(self, args=None, namespace=None):
        got["parser"] = self
        raise _Parsed

    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        main([])
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    assert "parser" in got, f"{main} did not build a parser"
    return {s for a in got["parser"]._actions for s in a.option_strings}


def _entry(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


@pytest.fixture(scope="module")
def parsers() -> dict:
    """owner -> its flags. Owners: 'train' (launch/train.py), 'accelerate' (accelerate launch and
    launch/run.py, which takes its arguments), each console command, each `python -m` module and
    script the docs run with flags."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train
    import pretrain_demo_backbone
    import gpu_check
    import regime
    import zero_memory
    import zero_memory_full
    import activation_memory
    import axis_report
    from accelerate.commands.launch import launch_command_parser
    out = {"train": _flags_of(train.parse_args),
           "accelerate": {s for a in launch_command_parser()._actions for s in a.option_strings},
           "launch/pretrain_demo_backbone.py": _flags_of(pretrain_demo_backbone.main),
           "bench/gpu_check.sh": _flags_of(gpu_check.main),
           "bench/regime.py": _flags_of(regime.main), "bench/zero_memory.py": _flags_of(zero_memory.main),
           "bench/zero_memory_full.py": _flags_of(zero_memory_full.main),
           "bench/activation_memory.py": _flags_of(activation_memory.main),
           "bench/axis_report.py": _flags_of(axis_report.main)}
    for name, spec in _scripts().items():
        out[name] = _flags_of(_entry(spec))
    for spec in ("sdlora_ds.kernels.compile_check:main",):
        out[spec.split(":")[0]] = _flags_of(_entry(spec))
    for name, spec in _scripts().items():  # python -m shards.X == sdlora-shards-X
        if spec.endswith(":main") and spec.startswith("shards."):
            out[spec.split(":")[0]] = out[name]
    return out


def _commands(text: str) -> list:
    """Command lines: each logical line of a code block (continuations joined) and each inline code span."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        out += [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    out += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    indented = [ln.strip() for ln in text.splitlines() if ln.startswith("    ") and ln.strip().startswith(
        ("bash ", "python ", "sdlora-", "accelerate "))]
    return out + indented


def _owner(tok: str, prev: str, owners: dict):
    if tok == "launch/train.py":
        return "train"
    if tok in ("launch/run.py",) or (prev == "accelerate" and tok == "launch"):
        return "accelerate"
    if prev == "-m" and tok in owners:
        return tok
    if tok in owners:
        return tok
    if tok in ("tensorboard", "pip", "pytest", "launch/test.sh", "nvidia-smi", "apt-get", "-m") or \
            (prev == "-m" and tok not in owners):
        return "external"
    return None


def test_every_repository_path_exists():
    missing = []
    for page in PAGES:
        for m in PATH.finditer(_text(page)):
            path = m.group(1).rstrip(".,:;)")
            if OUTPUTS.search(path):
                continue
            if not glob.glob(os.path.join(ROOT, path)):
                missing.append(f"{page}: {path}")
    assert not missing, "named but absent:\n" + "\n".join(missing)


def test_every_markdown_link_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", _text(page)):
            if re.match(r"[a-z]+://", target):
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)):
                missing.append(f"{page}: {target}")
    assert not missing, "broken links:\n" + "\n".join(missing)


def test_every_console_command_and_module_exists():
    scripts, missing = _scripts(), []
    for page in PAGES:
        text = _text(page)
        for name in set(COMMAND.findall(text)):
            if name == "sdlora-ds" or name.endswith("-"):  # the project's name; sdlora-shards-<dataset>
                continue
            if name not in scripts:
                missing.append(f"{page}: command {name}")
        for module in set(re.findall(r"python -m ([\w.]+)", text)):
            if module.endswith("."):  # shards.<dataset>
                continue
            if importlib.util.find_spec(module) is None:
                missing.append(f"{page}: module {module}")
    assert not missing, "named but not installed:\n" + "\n".join(missing)


def test_every_flag_exists_for_its_command(parsers):
    known = set().union(*parsers.values()) | OTHER_TOOLS
    wrong = []
    for page in PAGES:
        text = _text(page)
        for cmd in _commands(text):
            try:
                tokens = shlex.split(cmd, comments=False)
            except ValueError:
                tokens = cmd.split()
            owner, prev = None, ""
            for tok in tokens:
                who = _owner(tok, prev, parsers)
                owner = who or owner
                prev = tok
                for flag in FLAG.findall(tok):
                    if owner == "external":
                        continue
                    if owner is None and flag not in known:
                        wrong.append(f"{page}: {flag} (in `{cmd.strip()[:60]}`): no command has it")
                    elif owner is not None and flag not in parsers[owner]:
                        wrong.append(f"{page}: {flag} is not a flag of {owner} (in `{cmd.strip()[:60]}`)")
        prose = re.sub(r"```.*?```|`[^`\n]+`", "", text, flags=re.S)
        for flag in set(FLAG.findall(prose)) - known:
            wrong.append(f"{page}: {flag} (in the text): no command has it")
    assert not wrong, "\n".join(wrong)


def test_the_readme_stays_short_and_names_the_two_commands():
    text = _text("README.md")
    assert len(text.splitlines()) <= 250
    assert "bash launch/demo.sh" in text and "bash launch/test.sh" in text
    for page in PAGES[1:]:
        if page.startswith("docs/") and not re.search(r"_results\.md$", page):
            assert f"({page})" in text, f"README.md does not link {page}"

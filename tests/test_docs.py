"""The docs cannot drift: every fenced block, command, repository path, name and link of README.md and docs/*.md is
run or checked here, one test per block (its id is ``file:line`` of the opening fence).

- ```` ```python ```` blocks run in this process, in an empty temporary folder holding ``data/corpus.jsonl`` (40 short
  documents: the snippets' corpus), after the substitutions of :data:`SUBSTITUTIONS` make them tiny (the embedded
  teacher becomes the suite's tiny random teacher, step counts and sizes shrink), on one torch thread, with W&B
  disabled. Each block must therefore be self-contained (its own imports).
- ```` ```bash ```` / ```` ```console ```` blocks are checked line by line (:func:`check_command`): ``lightning-distill
  fit|validate|test|predict ...`` is parsed by the real CLI with ``--print_config`` appended (in this process, nothing
  is built); ``export``, ``demo``, ``prepare``, ``serve`` and ``write`` must list every flag used in their
  ``--help``; ``make`` targets must exist in the Makefile; ``python benchmarks/X.py --flags``: the script exists
  and declares the flags; ``pip install`` names extras and pins the project declares; a command this file does not
  know fails (add it to :data:`EXTERNAL_COMMANDS` when it is another tool's).
- ```` ```yaml ```` blocks parse; one with a ``model:`` is parsed by the CLI with ``--print_config``; one whose first
  line names ``# configs/X.yaml`` must be an excerpt of that file (same keys, same values).
- Every repository path in code (``configs/...``, ``benchmarks/...``, ``docs/...``, ``lightning_distill/...``,
  ``tests/...``, ``notebooks/...``) exists; every ``lightning_distill.x.y`` name in inline code resolves; every
  ``runs/.../last.ckpt`` is where a config's ``ModelCheckpoint`` writes; relative links and their anchors resolve.

A block that cannot run here (it needs a GPU, a W&B login) is marked in the markdown, on the line before its fence:
``<!-- doc-test: skip (needs a GPU) -->``; the test then skips with that reason.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TINY_TEACHER = "<tiny teacher>"  # stands for the tiny_teacher_dir fixture's folder in SUBSTITUTIONS
#: What makes a Python snippet tiny, applied to its syntax tree: (where, what, replacement, why). "string": a string
#: constant anywhere; "dict key": the value of that key in any dict literal; "keyword": that keyword of a call to the
#: named callable (``L.Trainer`` and ``Trainer`` alike), when the call gives it; "keyword+": also added when not.
SUBSTITUTIONS: list[tuple[str, str, Any, str]] = [
    ("string", "builtin:smollm2-135m-instruct", TINY_TEACHER, "the embedded 135M teacher -> a 4-layer random one"),
    ("string", "builtin:python-docs", "data/corpus.jsonl", "the built-in corpus (113k tokens) -> 40 short documents"),
    ("dict key", "layers", 2, "a from_teacher student of the 4-layer tiny teacher keeps 2 of its layers"),
    ("keyword+", "SoftDistill.student", {"from_teacher": {"layers": 2}}, "the default student keeps 6 layers"),
    ("keyword+", "HardDistill.student", {"from_teacher": {"layers": 2}}, "the default student keeps 6 layers"),
    ("keyword+", "Trainer.max_steps", 2, "two optimizer steps"),
    ("keyword+", "Trainer.limit_val_batches", 2, "two validation batches"),
    ("keyword+", "Trainer.enable_progress_bar", False, "quiet"),
    ("keyword+", "Trainer.accelerator", "cpu", "the same on a machine with a GPU"),
    ("keyword+", "Trainer.num_sanity_val_steps", 0, "no validation before training"),
    ("keyword", "Trainer.val_check_interval", 2, "validate once, after the two steps"),
    ("keyword", "DistillDataModule.block_size", 32, "blocks within the tiny teacher's positions"),
    ("keyword", "prepare_corpus.block_size", 32, "as the data module's blocks"),
    ("keyword", "prepare_corpus.num_workers", 1, "one process"),
    ("keyword", "OnPolicy.prompt_tokens", 8, "prompts shorter than a 32-token block"),
    ("keyword", "OnPolicy.max_new_tokens", 8, "short samples"),
    ("keyword", "Generation.prompt_tokens", 8, "prompts shorter than a 32-token block"),
    ("keyword", "Generation.max_new_tokens", 8, "short continuations"),
    ("keyword", "Validation.prompt_tokens", 8, "prompts shorter than a 32-token block"),
    ("keyword", "Validation.new_tokens", 4, "short continuations"),
]
#: Environment of the Python snippets: no W&B process (a snippet's W&B logger is created, then does nothing).
SNIPPET_ENV = {"WANDB_MODE": "disabled"}
#: Other tools a shell block may call; their lines are not checked further.
EXTERNAL_COMMANDS = {"wandb", "export", "git", "cd", "time"}
REPO_PATH = re.compile(r"(?<![\w./~-])((?:configs|benchmarks|docs|lightning_distill|tests|notebooks)/[\w.{},*/-]*)")
SKIP = re.compile(r"<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->")
CLI_SUBCOMMANDS = {"fit", "validate", "test", "predict"}
HELP_SUBCOMMANDS = {"export", "demo", "prepare", "serve", "write"}


# ------------------------------------------------------------------------------------------------ the markdown
@dataclass(frozen=True)
class Block:
    """A fenced code block: where it opens, its language, its text and, when marked, why it is skipped."""

    doc: Path
    line: int
    lang: str
    text: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the skip marker on the nearest non-blank line before each."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening[1], i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = SKIP.search(before)
        found.append(Block(doc, start + 1, opening[2].lower(), "\n".join(lines[start + 1:i]),
                           marker[1] if marker else None))
        i += 1
    return found


def prose_of(doc: Path) -> str:
    """The markdown without its fenced blocks (their lines left empty, so line numbers hold)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    for block in blocks_of(doc):
        for k in range(block.line - 1, block.line + block.text.count("\n") + 2):
            if k < len(lines):
                lines[k] = ""
    return "\n".join(lines)


def inline_code(doc: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every inline code span (a span may run over a line break)."""
    prose = prose_of(doc)
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m[2].split()))
            for m in re.finditer(r"(`+)(.+?)\1", prose, re.DOTALL)]


ALL_BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]


def blocks(*langs: str) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in ALL_BLOCKS if b.lang in langs]


DOC_IDS = [str(doc.relative_to(REPO)) for doc in DOCS]


# --------------------------------------------------------------------------------------------- python blocks
def tiny_source(source: str, teacher: str) -> ast.Module:
    """The snippet's syntax tree with :data:`SUBSTITUTIONS` applied (``teacher``: the tiny teacher's folder)."""

    def constant(value: Any) -> ast.expr:
        return ast.parse(repr(teacher if value == TINY_TEACHER else value), mode="eval").body

    class Tiny(ast.NodeTransformer):
        def visit_Constant(self, node: ast.Constant) -> ast.AST:
            for where, what, value, _ in SUBSTITUTIONS:
                if where == "string" and node.value == what:
                    return ast.copy_location(constant(value), node)
            return node

        def visit_Dict(self, node: ast.Dict) -> ast.AST:
            self.generic_visit(node)
            for k, key in enumerate(node.keys):
                for where, what, value, _ in SUBSTITUTIONS:
                    if where == "dict key" and isinstance(key, ast.Constant) and key.value == what:
                        node.values[k] = ast.copy_location(constant(value), node.values[k])
            return node

        def visit_Call(self, node: ast.Call) -> ast.AST:
            self.generic_visit(node)
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            for where, what, value, _ in SUBSTITUTIONS:
                callee, _, keyword = what.partition(".")
                if not where.startswith("keyword") or callee != name:
                    continue
                given = [kw for kw in node.keywords if kw.arg == keyword]
                for kw in given:
                    kw.value = constant(value)
                if not given and where == "keyword+":
                    node.keywords.append(ast.keyword(keyword, constant(value)))
            return node

    return ast.fix_missing_locations(Tiny().visit(ast.parse(source)))


def write_corpus(path: Path, documents: int = 40, chars: int = 400) -> None:
    """A small JSONL corpus (the start of one Python docs topic per line): the snippets' ``builtin:python-docs``
    and ``data/*.jsonl``."""
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [topics[name][:chars] for name in sorted(topics) if len(topics[name]) >= chars][:documents]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.mark.parametrize("block", blocks("python", "py"))
def test_python_block(block: Block, tiny_teacher_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip:
        pytest.skip(block.skip)
    tree = tiny_source(block.text, tiny_teacher_dir)
    assert "builtin:smollm2-135m" not in ast.unparse(tree), "the snippet still names the embedded teacher"
    monkeypatch.chdir(tmp_path)
    for key, value in SNIPPET_ENV.items():
        monkeypatch.setenv(key, value)
    write_corpus(tmp_path / "data" / "corpus.jsonl")
    ast.increment_lineno(tree, block.line)  # a traceback names the markdown file and its line
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from more, and lose much on a shared machine
    try:
        exec(compile(tree, str(block.doc), "exec"), {"__name__": "__doc_snippet__"})
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- shell blocks
_CHECKED: dict[tuple[str, ...], str | None] = {}  # a command checked once per session, whatever block repeats it


def command_lines(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, ``$`` prompts of ``console`` blocks only."""
    text = re.sub(r"\\\n", " ", block.text)
    if block.lang == "console":
        return [line.strip()[1:].strip() for line in text.splitlines() if line.strip().startswith("$")]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def check_command(words: list[str]) -> str | None:
    """Why the command ``words`` does not hold, or ``None``. Results are cached by command."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    key = tuple(words)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = _check(words)
        except Exception as error:  # a broken package is a failed check, not a crashed test session
            _CHECKED[key] = f"{type(error).__name__}: {error}"
    return _CHECKED[key]


def _check(words: list[str]) -> str | None:
    if not words:
        return None
    tool, args = words[0], words[1:]
    python = re.fullmatch(r"(\.venv/bin/)?python3?", tool)
    if tool in ("lightning-distill", ".venv/bin/lightning-distill"):
        return check_cli(args)
    if python and args[:2] == ["-m", "lightning_distill"]:
        return check_cli(args[2:])
    if tool in ("pip", "pip3", ".venv/bin/pip") or (python and args[:2] == ["-m", "pip"]):
        return check_pip(args[2:] if python else args)
    if python and args[:1] == ["-m"]:
        import importlib.util

        return None if importlib.util.find_spec(args[1]) else f"no module {args[1]!r} to run with -m"
    if python:
        return check_script(args)
    if tool == "make":
        return check_make(args)
    if re.fullmatch(r"(\.venv/bin/)?pytest", tool):
        return check_pytest(args)
    if re.fullmatch(r"(\.venv/bin/)?(ruff|jupyter)", tool):
        return missing_paths(args)
    if tool in EXTERNAL_COMMANDS:
        return None
    return f"unknown command {tool!r}: fix it, or add it to EXTERNAL_COMMANDS in tests/test_docs.py (another tool)"


def run_captured(fn: Any) -> tuple[int, str]:
    """``fn()``, which is expected to exit; its exit code and everything it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            fn()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return code, out.getvalue()


def check_cli(args: list[str]) -> str | None:
    """``lightning-distill ARGS``: parsed by the real CLI in this process, from the repository root."""
    if not args:
        return "lightning-distill without a subcommand"
    sub = args[0]
    if sub in CLI_SUBCOMMANDS:
        from lightning_distill.cli import DistillCLI

        cwd = Path.cwd()
        os.chdir(REPO)
        try:
            code, printed = run_captured(lambda: DistillCLI(args=[*args, "--print_config"]))
        finally:
            os.chdir(cwd)
        reason = printed[printed.find("error:"):] if "error:" in printed else printed[-1500:]
        return None if code == 0 else f"the CLI refused it (exit {code}): {reason.strip()}"
    if sub in HELP_SUBCOMMANDS:
        text = help_text(sub)
        unknown = [f for f in flags(args[1:]) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
        return f"`lightning-distill {sub} --help` lists no {unknown}" if unknown else missing_paths(args[1:])
    return f"no subcommand {sub!r} in lightning-distill"


def help_text(sub: str) -> str:
    from lightning_distill import cli

    code, printed = run_captured(lambda: cli.run([sub, "--help"]))
    assert code == 0, f"lightning-distill {sub} --help failed: {printed[-1500:]}"
    return printed


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def check_script(args: list[str]) -> str | None:
    """``python benchmarks/X.py --flags``: the script exists and declares every flag (read from its source and
    the sibling modules it imports)."""
    if not args:
        return "python without a script"
    script = REPO / args[0]
    if not script.is_file():
        return f"no script {args[0]}"
    declared = set()
    sources, seen = [script], set()
    while sources:
        path = sources.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                declared |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            sources += [path.parent / f"{n}.py" for n in names if (path.parent / f"{n}.py").is_file()]
    unknown = [f for f in flags(args[1:]) if f not in declared]
    return f"{args[0]} declares no {unknown}" if unknown else missing_paths(args[1:])


def check_make(args: list[str]) -> str | None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.MULTILINE))
    wanted = [a for a in args if "=" not in a and not a.startswith("-")]
    unknown = [t for t in wanted if t not in targets]
    return f"the Makefile has no target {unknown}" if unknown else None


def check_pip(args: list[str]) -> str | None:
    """``pip install ...``: the project's extras exist; a pinned package is the one the Makefile or
    pyproject.toml pins; another package is one pyproject.toml names."""
    if args[:1] != ["install"]:
        return None
    declared = (REPO / "pyproject.toml").read_text(encoding="utf-8") + (REPO / "Makefile").read_text(encoding="utf-8")
    problems = []
    for spec in (a for a in args[1:] if not a.startswith("-")):
        extra = re.fullmatch(r"lightning-distill\[([\w,-]+)\]", spec)
        if extra:
            problems += [f"no extra {e!r}" for e in extra[1].split(",")
                         if not re.search(rf"^{re.escape(e)}\s*=", declared, re.MULTILINE)]
        elif spec not in declared:
            problems.append(f"{spec!r} is not what pyproject.toml or the Makefile installs")
    return "; ".join(problems) or None


def check_pytest(args: list[str]) -> str | None:
    if "-m" in args:
        expression = args[args.index("-m") + 1]
        pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
        unknown = [w for w in re.findall(r"\w+", expression)
                   if w not in ("and", "or", "not") and not re.search(rf'"{w}:', pyproject)]
        if unknown:
            return f"no pytest marker {unknown} registered in pyproject.toml"
    return missing_paths(args)


def missing_paths(args: list[str]) -> str | None:
    missing = [a for a in args if REPO_PATH.fullmatch(a) and not path_exists(a)]
    return f"no {missing} in the repository" if missing else None


@pytest.mark.parametrize("block", blocks("bash", "sh", "shell", "console"))
def test_shell_block(block: Block) -> None:
    if block.skip:
        pytest.skip(block.skip)
    problems = []
    for line in command_lines(block):
        words = shlex.split(line, comments=True)
        why = check_command(words)
        if why:
            problems.append(f"{line}\n    -> {why}")
    assert not problems, f"{block.id}:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------------------------- yaml blocks
def excerpt_problems(part: Any, whole: Any, where: str = "") -> list[str]:
    """Where ``part`` is not an excerpt of ``whole`` (every key of ``part`` there, with the same value)."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return [p for key, value in part.items()
                for p in (excerpt_problems(value, whole[key], f"{where}.{key}") if key in whole
                          else [f"{where}.{key} is not in the file"])]
    return [] if part == whole else [f"{where}: {part!r} here, {whole!r} in the file"]


@pytest.mark.parametrize("block", blocks("yaml", "yml"))
def test_yaml_block(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    content = yaml.safe_load(block.text)
    first = block.text.lstrip().splitlines()[0] if block.text.strip() else ""
    named = re.match(r"#\s*(configs/\S+\.ya?ml)\b", first)
    if named:
        whole = yaml.safe_load((REPO / named[1]).read_text(encoding="utf-8"))
        problems = excerpt_problems(content, whole)
        assert not problems, f"{block.id} is not an excerpt of {named[1]}:\n" + "\n".join(problems)
    if isinstance(content, dict) and "model" in content:
        config = tmp_path / "block.yaml"
        config.write_text(block.text, encoding="utf-8")
        sub = re.search(r"lightning-distill (\w+)", first)
        why = check_cli([sub[1] if sub else "fit", "--config", str(config)])
        assert why is None, f"{block.id}: {why}"


# ------------------------------------------------------------------------------ paths, names, links, the front
def path_exists(path: str) -> bool:
    """A repository path exists: a file or folder, a glob that matches, each ``{a,b}`` alternative, or the stem
    of existing files (an ``--out`` prefix such as ``benchmarks/results/quality_seed1``)."""
    braces = re.search(r"\{([^{}]*)\}", path)
    if braces:
        return all(path_exists(path[:braces.start()] + alt + path[braces.end():]) for alt in braces[1].split(","))
    path = path.rstrip(".,;:")
    if "*" in path:
        return any(REPO.glob(path))
    full = REPO / path
    return full.exists() or any(full.parent.glob(full.name + ".*"))


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_repository_paths_exist(doc: Path) -> None:
    spans = inline_code(doc) + [(b.line, b.text) for b in blocks_of(doc) if not b.skip]
    missing = sorted({f"line {line}: {p}" for line, text in spans for p in REPO_PATH.findall(text)
                      if "<" not in p and not path_exists(p)})
    assert not missing, f"{doc.name} names paths that are not in the repository:\n" + "\n".join(missing)


def resolves(name: str) -> bool:
    """``lightning_distill.a.b.C`` is an importable module, or an attribute of the longest importable prefix."""
    import importlib

    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            if not hasattr(found, attr):
                return False
            found = getattr(found, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_names_resolve(doc: Path) -> None:
    names = {m for _, text in inline_code(doc) for m in re.findall(r"\blightning_distill(?:\.\w+)+", text)}
    unresolved = sorted(n for n in names if not resolves(n))
    assert not unresolved, f"{doc.name} names what lightning_distill does not have: {unresolved}"


def checkpoint_folders() -> set[str]:
    """The folders the configs' ``ModelCheckpoint`` callbacks write to."""
    folders = set()
    for path in (REPO / "configs").rglob("*.yaml"):
        trainer = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
        for callback in trainer.get("callbacks") or []:
            if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                folders.add(str((callback.get("init_args") or {}).get("dirpath")))
    return folders


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_checkpoint_paths_are_where_configs_write(doc: Path) -> None:
    text, folders = doc.read_text(encoding="utf-8"), checkpoint_folders()
    wrong = sorted({m for m in re.findall(r"runs/[\w/.-]+/last\.ckpt", text) if m.rsplit("/", 1)[0] not in folders})
    assert not wrong, f"{doc.name}: no config writes {wrong} (they write to {sorted(folders)})"


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of the headings of ``doc``."""
    found = set()
    for line in prose_of(doc).splitlines():
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_links_resolve(doc: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose_of(doc)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, f"{doc.name} has broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300, "README.md is a front page: move the depth into docs/"
    first = blocks_of(REPO / "README.md")[0]
    assert first.lang == "bash" and "make demo" in first.text and "make test" in first.text, (
        "README.md opens with the two set-up commands, `make demo` and `make test` (CI and users rely on them)")
    assert "](docs/architecture.md)" in readme


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_no_design_documents(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert not re.search(r"DESIGN\.md|design doc", text, re.IGNORECASE), f"{doc.name} points outside the repository"


def test_docs_found() -> None:
    assert len(DOCS) >= 8 and blocks("python") and blocks("bash") and blocks("yaml")
    assert sys.version_info >= (3, 10)

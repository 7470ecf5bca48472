"""What `docker build` sends from the repository, and what `pip install .` must put in an image.

docker/Dockerfile.dockerignore is an allow-list (`**`, then `!package/` lines). `excluded` reads
it with Docker's rules (moby/patternmatcher, which BuildKit uses too): each line is cleaned like a
path, `*` and `?` stay within one path segment, `**` spans any number of them, a line that matches
a directory matches everything below it, and the last matching line wins (`!` lets a path back in).

`checkout_wheel` is the truth the image is held to: the wheel setuptools builds from this checkout
reading pyproject.toml (its packages.find and package-data), so a package added there is expected in
the image without anyone listing it again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
IGNORE_FILE = REPO / "docker" / "Dockerfile.dockerignore"

Pattern = tuple[re.Pattern, bool]  # (regex over a slash-separated relative path, is an exception "!")


def _regex(pattern: str) -> re.Pattern:
    """moby/patternmatcher's translation of one cleaned pattern."""
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/" is "**"
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif ch in ".+()|{}$^":
            out += "\\" + ch
        else:  # letters, "/", and [...] classes pass through as in Go's filepath.Match
            out += ch
        i += 1
    return re.compile(out + "$")


def read_patterns(path: Path = IGNORE_FILE) -> list[Pattern]:
    patterns = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        line = line[1:].strip() if exception else line
        cleaned = os.path.normpath(line).lstrip("/") if len(line) > 1 else line
        patterns.append((_regex(cleaned), exception))
    return patterns


def excluded(rel: str, patterns: list[Pattern]) -> bool:
    """Whether Docker leaves `rel` (relative to the context, with "/") out of the context."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]  # its parent directories
    matched = False
    for regex, exception in patterns:
        if exception != matched:  # only a later exception can undo a match, only a later exclusion make one
            continue
        if regex.match(rel) or any(regex.match(p) for p in prefixes):
            matched = not exception
    return matched


def context_files(root: Path = REPO, ignore_file: Path = IGNORE_FILE) -> list[str]:
    """Every file under root that the build context holds, relative and sorted."""
    patterns = read_patterns(ignore_file)
    # literal heads of the "!" lines: an excluded directory outside all of them is not walked (.venv, .git)
    heads = [_literal_head(line) for line in _exception_lines(ignore_file)]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        base = "" if base == "." else base + "/"
        dirnames[:] = [d for d in dirnames if not excluded(base + d, patterns)
                       or any(h.startswith(base + d + "/") or (base + d + "/").startswith(h) for h in heads)]
        out += [base + f for f in filenames if not excluded(base + f, patterns)]
    return sorted(out)


def _exception_lines(ignore_file: Path) -> list[str]:
    return [line.strip()[1:].strip() for line in ignore_file.read_text().splitlines()
            if line.strip().startswith("!")]


def _literal_head(pattern: str) -> str:
    """The part of a pattern before its first wildcard, as a directory prefix ("" if it starts with one)."""
    head = re.split(r"[*?\[\\]", pattern.lstrip("/"), maxsplit=1)[0]
    return head if head.endswith("/") or not head else head + "/"


def copy_tree(files: list[str], root: Path, dest: Path) -> Path:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return dest


def checkout_files(root: Path = REPO) -> list[str]:
    """The checkout as git sees it: tracked files and untracked ones .gitignore does not exclude."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    return sorted(f for f in listed.split("\0") if f and (root / f).is_file())


def build_wheel(source: Path, out: Path) -> Path:
    """`pip wheel --no-deps` of a source tree, offline with this venv's setuptools."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel {source} failed:\n{done.stderr[-3000:]}")
    (wheel,) = out.glob("engram_serve-*.whl")
    return wheel


def wheel_files(wheel: Path) -> set[str]:
    """The files a wheel installs into site-packages, its own metadata aside."""
    with zipfile.ZipFile(wheel) as z:
        return {n for n in z.namelist() if ".dist-info/" not in n}


def checkout_wheel(tmp: Path) -> set[str]:
    """What `pip install .` from this checkout installs (see the module's docstring)."""
    tree = copy_tree(checkout_files(), REPO, tmp / "checkout")
    return wheel_files(build_wheel(tree, tmp / "checkout-wheel"))


def context_wheel(tmp: Path) -> set[str]:
    """What the image's `pip install .` installs: the Dockerfile copies the whole context."""
    tree = copy_tree(context_files(), REPO, tmp / "context")
    return wheel_files(build_wheel(tree, tmp / "context-wheel"))


def top_level_packages() -> set[str]:
    """The top-level packages pyproject.toml's [tool.setuptools.packages.find] selects here."""
    import tomllib

    from setuptools import find_namespace_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = find_namespace_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    return {name.split(".")[0] for name in found}


def instructions(path=DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    return [(op.upper(), rest.strip()) for op, _, rest in
            (line.partition(" ") for line in text.splitlines() if line.strip() and not line.startswith("#"))]


def arg_defaults() -> dict[str, str]:
    out = {}
    for op, rest in instructions():
        if op == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default.strip('"')
    return out

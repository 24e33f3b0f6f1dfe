"""What a Docker build of this repository sees: the .dockerignore rules and the context paths the Dockerfile reads.

The rules follow Docker's own matcher (moby/patternmatcher, as BuildKit and the classic builder use it),
not gitignore's: a pattern is anchored at the context root (``handler`` is never ``deploy/handler``),
``*`` and ``?`` stop at ``/``, ``**`` spans any number of directories, a pattern that matches a
directory matches everything below it, and the last pattern that matches a path decides, so ``!``
re-admits a path below an excluded directory. (pathspec's gitwildmatch differs on the first point:
a pattern without a slash matches at any depth.)
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# Characters that are special in a regular expression but literal in a Docker pattern.
_LITERAL = set(".+()|{}$")


@dataclass(frozen=True)
class Rule:
    """One .dockerignore line: a path pattern, and whether ``!`` makes it re-admit what it matches."""

    pattern: re.Pattern[str]
    readmits: bool


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation of a cleaned pattern into a regular expression."""
    regex, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        i += 1
        if char == "*" and pattern[i : i + 1] == "*":
            i += 1
            if pattern[i : i + 1] == "/":
                i += 1
            regex += ".*" if i == len(pattern) else "(.*/)?"
        elif char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "\\" and i < len(pattern):
            regex += re.escape(pattern[i])
            i += 1
        elif char in _LITERAL or char == "\\":
            regex += "\\" + char
        else:  # literal characters and the brackets of a character class
            regex += char
    return re.compile(regex + "$")


def parse_dockerignore(text: str) -> list[Rule]:
    """The rules of a .dockerignore file, read as Docker reads it (moby/patternmatcher/ignorefile)."""
    rules = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pattern = line.strip()
        readmits = pattern.startswith("!")
        if readmits:
            pattern = pattern[1:].strip()
        pattern = posixpath.normpath(pattern)
        if len(pattern) > 1 and pattern.startswith("/"):
            pattern = pattern.lstrip("/")
        rules.append(Rule(pattern_regex(pattern), readmits))
    return rules


def excluded(path: str, rules: list[Rule]) -> bool:
    """Whether the build context leaves ``path`` (relative, with slashes) out: MatchesOrParentMatches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    result = False
    for rule in rules:
        if rule.readmits != result:  # only an exclusion can change an admitted path, and vice versa
            continue
        if any(rule.pattern.match(candidate) for candidate in candidates):
            result = not rule.readmits
    return result


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]  # --name=value options before the arguments
    body: str  # the rest of the line

    def arguments(self) -> list[str]:
        """The arguments, in the exec (JSON) form or the shell form."""
        return json.loads(self.body) if self.body.startswith("[") else shlex.split(self.body)


def instructions(dockerfile: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comment lines dropped."""
    logical, current = [], ""
    for line in dockerfile.splitlines():
        if line.lstrip().startswith("#") or not (current or line.strip()):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
        else:
            logical.append(current + line)
            current = ""
    parsed = []
    for line in logical:
        keyword, _, body = line.strip().partition(" ")
        flags = {}
        body = body.strip()
        while body.startswith("--"):
            flag, _, body = body.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            body = body.strip()
        parsed.append(Instruction(keyword.upper(), flags, body))
    return parsed


def arg_defaults(parsed: list[Instruction]) -> dict[str, str]:
    """Each ARG's default value (the last one wins, as in a stage that declares it again)."""
    defaults = {}
    for instruction in parsed:
        if instruction.keyword == "ARG":
            for argument in instruction.arguments():
                name, _, value = argument.partition("=")
                defaults[name] = value
    return defaults


def context_sources(dockerfile: str) -> list[str]:
    """Every build-context path the Dockerfile reads: COPY/ADD sources (not those of another stage,
    ``--from``), and the paths a ``RUN --mount=type=bind`` of the context names below its target,
    with ARG defaults substituted."""
    parsed = instructions(dockerfile)
    defaults = arg_defaults(parsed)
    sources = []
    for instruction in parsed:
        if instruction.keyword in ("COPY", "ADD") and "from" not in instruction.flags:
            sources += instruction.arguments()[:-1]
        elif instruction.keyword == "RUN" and instruction.flags.get("mount", "").startswith("type=bind"):
            options = dict(option.partition("=")[::2] for option in instruction.flags["mount"].split(","))
            if "from" in options:
                continue
            target = options.get("target") or options["dst"]
            sources += re.findall(rf"{re.escape(target)}/([\w$./{{}}-]+)", instruction.body)
    return [expand(source, defaults) for source in sources]


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: variables[match.group(1)], text)


def admitted_files(source: str, repo: Path, tracked: list[str], rules: list[Rule]) -> tuple[list[str], list[str]]:
    """The checkout's ``tracked`` files that COPY ``source`` takes: (admitted, left out by .dockerignore)."""
    source = posixpath.normpath(source)
    below = [path for path in tracked if path == source or path.startswith(source + "/")]
    if not below and (repo / source).exists():
        below = [source]  # an untracked file (a built archive)
    return [p for p in below if not excluded(p, rules)], [p for p in below if excluded(p, rules)]

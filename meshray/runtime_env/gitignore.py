"""gitignore pattern matching, for choosing what a working_dir upload leaves out.

Users already describe "not part of my project" in .gitignore files, and Ray
reads them plus `excludes` written in the same syntax; a pattern language
people know beats a new one. This is an independent implementation of the
rules in https://git-scm.com/docs/gitignore: `#` comments, `!` negation,
`/` anchoring, trailing `/` for directories, `*`, `?`, `[...]` and `**`,
last match wins, deeper files override shallower ones. Pure: no I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["IgnoreRule", "parse_patterns", "is_ignored"]


@dataclass(frozen=True)
class IgnoreRule:
    """One compiled pattern, relative to the directory `base` ('' = the package root)."""
    pattern: str
    regex: re.Pattern
    base: str
    negate: bool
    dir_only: bool

    def matches(self, rel_path: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        if self.base:
            prefix = self.base + "/"
            if not rel_path.startswith(prefix):
                return False
            rel_path = rel_path[len(prefix):]
        return self.regex.fullmatch(rel_path) is not None


def _strip_trailing_spaces(line: str) -> str:
    while line.endswith(" ") and not line.endswith("\\ "):
        line = line[:-1]
    return line


def _char_class(pat: str, i: int) -> tuple[str | None, int]:
    """Translate `[...]` starting at pat[i]; (None, i) when it never closes."""
    j = i + 1
    if j < len(pat) and pat[j] in "!^":
        j += 1
    if j < len(pat) and pat[j] == "]":
        j += 1
    while j < len(pat) and pat[j] != "]":
        j += 1
    if j >= len(pat):
        return None, i
    body = pat[i + 1:j]
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    body = body.replace("\\", "\\\\")
    return ("[^/" if negate else "[") + body + "]", j + 1


def _translate(pat: str) -> str:
    """gitignore glob (already without leading/trailing '/') -> regex source."""
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*" and pat[i:i + 2] == "**" and (i == 0 or pat[i - 1] == "/"):
            end = i + 2
            if end == n:                     # 'a/**' or '**': everything below
                out.append(".*")
                i = end
                continue
            if pat[end] == "/":              # '**/' : zero or more directories
                out.append("(?:.*/)?")
                i = end + 1
                continue
        if c == "*":
            while i < n and pat[i] == "*":
                i += 1
            out.append("[^/]*")
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            cls, nxt = _char_class(pat, i)
            if cls is not None:
                out.append(cls)
                i = nxt
                continue
            out.append(re.escape(c))
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pat[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse_patterns(lines: Iterable[str], base: str = "") -> list[IgnoreRule]:
    """Compile gitignore lines found in directory `base` (posix, relative to the root)."""
    rules = []
    base = base.strip("/")
    for raw in lines:
        line = _strip_trailing_spaces(raw.rstrip("\r\n"))
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        elif line.startswith("\\#") or line.startswith("\\!"):
            line = line[1:]
        dir_only = line.endswith("/") and not line.endswith("\\/")
        body = line.rstrip("/") if dir_only else line
        if not body:
            continue
        anchored = "/" in body
        body = body.lstrip("/")
        if not body:
            continue
        source = _translate(body)
        if not anchored:
            source = "(?:.*/)?" + source
        rules.append(IgnoreRule(line if not negate else "!" + line, re.compile(source, re.DOTALL),
                                base, negate, dir_only))
    return rules


def is_ignored(rel_path: str, is_dir: bool, rules: Sequence[IgnoreRule]) -> bool:
    """Whether the last rule that matches `rel_path` excludes it.

    Rules must be ordered shallow-to-deep and, within one file, top-to-bottom:
    that order is gitignore's precedence. Callers prune ignored directories
    while walking, which gives gitignore's "a file inside an excluded
    directory cannot be re-included".
    """
    for rule in reversed(rules):
        if rule.matches(rel_path, is_dir):
            return not rule.negate
    return False

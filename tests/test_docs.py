"""The docs stay true: docs/config.md is what scripts/gen_config_docs.py writes from the config, it
names every key, and every relative link in README.md and docs/ reaches an existing file and anchor."""
from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path
from typing import get_args, get_origin
from urllib.parse import unquote

from pydantic import BaseModel

from rlpost.config import Config

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]*)")              # [text](target) and ![alt](target)
REFERENCE = re.compile(r" {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")  # [label]: target
HEADING = re.compile(r" {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
EXPLICIT = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")               # http:, https:, mailto:, ...


def prose(text: str):
    """(line number, line) for every line outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line[m.end():].strip():
                fence = None
        else:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation but '-' and '_' dropped."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"<[^>]+>|[*]", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    found, seen = set(), Counter()
    for _, line in prose(text):
        found.update(EXPLICIT.findall(line))
        if m := HEADING.match(line):
            base = slug(m.group(1))
            found.add(base if not seen[base] else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def broken_links(files: list[Path], root: Path) -> list[str]:
    """'file:line: problem' for every relative link that does not resolve."""
    problems = []
    for path in files:
        text = path.read_text()
        for n, line in prose(text):
            line = INLINE_CODE.sub("code", line)
            reference = REFERENCE.match(line)
            for target in LINK.findall(line) + ([reference.group(1)] if reference else []):
                target = target.strip("<>")
                if not target or SCHEME.match(target):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / unquote(file_part)).resolve() if file_part else path
                where = f"{path.relative_to(root)}:{n}"
                if not dest.exists():
                    problems.append(f"{where}: {target}: no such file")
                elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest.read_text()):
                    problems.append(f"{where}: {target}: no heading or <a id> #{anchor} in {dest.name}")
    return problems


def doc_files(root: Path = REPO) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_doc_is_up_to_date():
    gen = _generator()
    assert (REPO / "docs" / "config.md").read_text() == gen.render(), \
        f"docs/config.md is out of date with rlpost/config.py: run {gen.REGENERATE}"


def test_config_doc_names_every_key():
    def section(tp) -> bool:
        return isinstance(tp, type) and issubclass(tp, BaseModel)

    def keys(model: type[BaseModel], prefix: str = ""):
        """Dotted keys, into sections and list items (`reward.functions[].fn`), not into `X | None`."""
        for name, field in model.model_fields.items():
            yield prefix + name
            tp = field.annotation
            if section(tp):
                yield from keys(tp, f"{prefix}{name}.")
            for item in [get_args(t)[0] for t in (tp, *get_args(tp)) if get_origin(t) is list]:
                if section(item):
                    yield from keys(item, f"{prefix}{name}[].")

    text = (REPO / "docs" / "config.md").read_text()
    all_keys = list(keys(Config))
    assert {"algorithm", "data.arithmetic.digits", "prime.train", "train.lr", "reward.functions[].fn"} <= set(all_keys)
    missing = [k for k in all_keys if f"`{k}`" not in text]
    assert not missing, f"docs/config.md lacks {missing}"


def test_relative_links_resolve():
    files = doc_files()
    assert REPO / "README.md" in files
    assert not broken_links(files, REPO), "\n".join(broken_links(files, REPO))


def test_link_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\nSee [ok](docs/a.md#the-setup-step), [dup](docs/a.md#usage-1), [id](docs/a.md#custom),\n"
        "[here](#top), ![img](docs/pic.png) and [web](https://example.com/missing.md).\n\n"
        "```\n[in a fence](docs/nowhere.md)\n```\n\n`[inline code](docs/nowhere.md)`\n\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#in-fence) [no such](#nowhere)\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## The *setup* step!\n\n## Usage\n\n## Usage\n\n<a id=\"custom\"></a>\n\n```\n# in fence\n```\n")
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    problems = broken_links(doc_files(tmp_path), tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["docs/missing.md", "docs/a.md#in-fence", "#nowhere"], problems
    assert all(p.startswith("README.md:12: ") for p in problems)


def test_slugs_follow_github():
    assert slug("2.3 Mechanism (as implemented)") == "23-mechanism-as-implemented"
    assert slug("`rlpost train`: the main job") == "rlpost-train-the-main-job"
    assert slug("data.arithmetic") == "dataarithmetic"

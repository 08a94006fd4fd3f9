"""The docs stay true to the code and to themselves: the config reference names every config field,
every relative link lands on a file (and heading) that exists, and every reference section is
reachable from a README short enough to enter by."""
import dataclasses
import re
from pathlib import Path

from cbd_cache.config import Config, TrainCfg

from .conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def without_code_blocks(text: str) -> list[str]:
    """The lines of a Markdown page outside ``` fences."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in without_code_blocks(page.read_text()):
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    found = []
    for line in without_code_blocks(page.read_text()):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: are not checked
                found.append(target)
    return found


def test_slug_follows_githubs_rule():
    assert slug("The paper's protocol on Fashion-MNIST-LT (`make paper-table`)") == \
        "the-papers-protocol-on-fashion-mnist-lt-make-paper-table"
    assert slug("The embedded default: long-tailed Fashion-MNIST") == "the-embedded-default-long-tailed-fashion-mnist"
    assert slug("Overrides, run names and errors") == "overrides-run-names-and-errors"


def test_config_reference_names_every_field():
    reference = (DOCS / "configuration.md").read_text()
    reference = reference[reference.index("## Configuration reference"):]
    missing = []
    for section in ("pipeline", "data", "views", "teacher", "export", "student", "eval"):
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            if section == "student" and f.name in {x.name for x in dataclasses.fields(TrainCfg)}:
                assert f"`{f.name}`" in reference    # listed once under "student.* training fields"
                continue
            if f"`{section}.{f.name}`" not in reference:
                missing.append(f"{section}.{f.name}")
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_relative_link_lands():
    broken, checked = [], 0
    for page in PAGES:
        for target in relative_links(page):
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert checked > 20, f"only {checked} relative links found: the link pattern is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_short_and_reaches_every_docs_section():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 250
    linked = set()
    for target in relative_links(readme):
        path, _, anchor = target.partition("#")
        if path.startswith("docs/") and anchor:
            linked.add((Path(path).name, anchor))
    unreached = []
    for page in sorted(DOCS.glob("*.md")):
        for line in without_code_blocks(page.read_text()):
            m = HEADING.match(line)
            if m and len(m.group(1)) >= 2 and (page.name, slug(m.group(2))) not in linked:
                unreached.append(f"{page.name}#{slug(m.group(2))}")
    assert not unreached, f"README.md links to none of these docs sections: {unreached}"

"""MkDocs hooks for the documentation site (mkdocs.yml `hooks:`), run at every `mkdocs build` / `mkdocs serve`.

* ``cli.md`` is generated here from the argparse parser (`laperm COMMAND --help` for every subcommand the parser
  has), so the CLI reference cannot drift from the code.
* Links from the tutorial notebook to other pages (``loop.md``) are rewritten to the pages' URLs, and a link to
  a page that does not exist is a warning (an error under ``--strict``), as for any markdown page.
* With ``LAPERM_EXECUTED_NOTEBOOKS=DIR`` (and ``LAPERM_DOCS_EXECUTE=false``), a notebook is rendered from its
  executed copy ``DIR/<name>.ipynb`` instead of being executed again: .ci/docs_check.sh executes and times the
  tutorial once with nbclient, then builds the site from that run.
* Pages may link to files of the repository outside docs/ (``../examples/with_lightning.py``), which is what reads
  well on GitHub; such files are copied into the site under ``_repo/`` and the links pointed there, so the strict
  build checks them like any other link.

`render_cli_reference` imports nothing from MkDocs, so the tests can call it without the docs extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.laperm_docs")
ROOT = Path(__file__).resolve().parent.parent
CLI_PAGE = "cli.md"
REPO_PREFIX = "_repo"
# a markdown link or image target that climbs out of docs/: ](../examples/x.py) or ](../../src/laperm/cli.py#L3)
_OUTSIDE_LINK = re.compile(r"\]\(((?:\.\./)+[^)\s#]+)(#[^)\s]*)?\)")
# a link to a page in the HTML of a notebook (mkdocs-jupyter converts notebooks itself, so MkDocs neither checks
# nor rewrites their links): href="loop.md" or href="api/laperm.md#laperm.LaPerm"
_NOTEBOOK_LINK = re.compile(r'href="([^":#?]+\.md)(#[^"]*)?"')
_HELP_WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every machine


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name, in the order they were added (aliases left out)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub not in found.values():
                    found[name] = sub
    return found


def _help_text(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _HELP_WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def render_cli_reference() -> str:
    """The markdown of the CLI reference: `laperm --help`, then `laperm COMMAND --help` for every subcommand."""
    from laperm.cli import build_parser

    parser = build_parser()
    commands = subcommands(parser)
    lines = [
        "# CLI reference",
        "",
        "Generated from the `laperm` command's own argument parser when the site is built "
        "(`scripts/docs_hooks.py`), so it always matches the installed code. "
        "[The command line](commands.md) shows the commands in use.",
        "",
        "## `laperm`",
        "",
        "```text",
        _help_text(parser),
        "```",
    ]
    for name, sub in commands.items():
        lines += ["", f"## `laperm {name}`", "", "```text", _help_text(sub), "```"]
    return "\n".join(lines) + "\n"


def outside_links(markdown: str, page_dir: str) -> dict[str, str]:
    """{link target as written: repository path} for the links of a page (in docs/page_dir) that leave docs/."""
    found = {}
    for target, _anchor in _OUTSIDE_LINK.findall(markdown):
        repo_path = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not repo_path.startswith(("../", "docs/")) and (ROOT / repo_path).is_file():
            found[target] = repo_path
    return found


def on_files(files: Any, config: Any) -> Any:
    """Add the generated CLI page and the repository files that pages link to."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, CLI_PAGE, content=render_cli_reference()))
    executed = os.environ.get("LAPERM_EXECUTED_NOTEBOOKS")
    for notebook in [f for f in files if f.src_uri.endswith(".ipynb")] if executed else []:
        copy = Path(executed) / notebook.src_uri
        if not copy.is_file():
            raise FileNotFoundError(f"LAPERM_EXECUTED_NOTEBOOKS has no executed copy of {notebook.src_uri} ({copy})")
        notebook.abs_src_path = str(copy)
    wanted: set[str] = set()
    for page in files.documentation_pages():
        if page.abs_src_path:
            text = Path(page.abs_src_path).read_text(encoding="utf-8")
            wanted.update(outside_links(text, posixpath.dirname(page.src_uri)).values())
    for repo_path in sorted(wanted):
        files.append(File.generated(config, f"{REPO_PREFIX}/{repo_path}", abs_src_path=str(ROOT / repo_path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Point links that leave docs/ at the copies under _repo/."""
    page_dir = posixpath.dirname(page.file.src_uri)
    for target, repo_path in outside_links(markdown, page_dir).items():
        copy = posixpath.relpath(f"{REPO_PREFIX}/{repo_path}", page_dir or ".")
        markdown = markdown.replace(f"]({target}", f"]({copy}")
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """In a notebook's HTML, point links to other pages (``loop.md#anchor``) at those pages' URLs."""
    source = page.file.src_uri
    if not source.endswith(".ipynb"):
        return html

    def link(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(source), match.group(1)))
        found = files.get_file_from_path(target)
        if found is None:
            log.warning(f"notebook {source} links to {match.group(1)!r}, which is not a page of the site")
            return match.group(0)
        return f'href="{found.url_relative_to(page.file)}{match.group(2) or ""}"'

    return _NOTEBOOK_LINK.sub(link, html)
